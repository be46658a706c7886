"""Searching the averaging against what users pick instead: per-step EMA, LAWA, the pairwise soup.

One training run per learning-rate schedule (constant after warmup; warmup-stable-decay with the
decay in the last 20% of steps) of a Pythia-architecture GPT-NeoX on the Shakespeare training
split, under a Lightning ``Trainer`` with

* ``ModelCheckpoint(every_n_train_steps=ckpt_every, save_top_k=-1)``,
* the real ``BayesMergeCallback`` with its recommended averaging settings (snapshots, geometric
  weights, EMA tracks; the selection shard is its held-out data), which writes one soup per save,
* :class:`PerStepEMA`, the "user's EMA": exact per-step EMAs of the weights for several decays
  (what Lightning's ``EMAWeightAveraging`` computes), saved at every checkpoint step.

At every checkpoint step the benchmark then evaluates, on the selection shard (first half of the
held-out plays' blocks), the second in-domain shard (the other half, never used to choose
anything) and an out-of-domain shard (Python standard-library source): the latest checkpoint, the
callback's soup (read from the file it wrote), every per-step EMA, LAWA (uniform average of the
last k checkpoints) and the paper's pairwise soup (previous and latest checkpoint, λ searched on the
selection shard). "Best EMA in hindsight" is, per step and per shard, the decay with the lowest
loss on that very shard.

Usage::

    python benchmarks/averaging.py            # full benchmark -> benchmarks/results/averaging.*
    python benchmarks/averaging.py --quick    # tiny settings -> averaging_quick.*
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from merge_callback.io import atomic_write_bytes, atomic_write_json, load_state_dict  # noqa: E402
from merge_callback.io import save_safetensors_atomic  # noqa: E402

SHARDS = ("sel", "test", "ood")
SHARD_TITLES = {"sel": "selection shard (first half of the held-out plays' blocks)",
                "test": "second in-domain shard (the other half; never used to choose)",
                "ood": "out-of-domain shard (Python standard library)"}
SCHEDULES = ("constant", "wsd")


@dataclass(frozen=True)
class AvgConfig:
    """Everything that defines the benchmark (fixed before any result was looked at)."""

    name: str
    # data
    vocab_size: int = 2048
    tokenizer_chars: int = 2_000_000
    train_chars: int | None = None
    block_size: int = 64
    shard_blocks: int = 128  # 128 x 64 = 8,192 tokens per shard
    ood_chars: int = 400_000
    shard_seed: int = 1234
    eval_batch_size: int = 32
    # model and training
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1600
    wsd_decay_fraction: float = 0.2
    gradient_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 100
    # what users pick instead
    user_ema_decays: tuple[float, ...] = (0.99, 0.995, 0.998, 0.999)
    lawa_ks: tuple[int, ...] = (3, 4)
    pairwise_budget: int = 10
    alpha: float = 0.5
    # the callback's recommended settings
    cb_history: int = 8
    cb_snapshot_every: int = 10
    cb_ema_decays: tuple[float, ...] = (0.99, 0.995, 0.998, 0.999)
    cb_budget: int = 10

    @property
    def checkpoint_steps(self) -> list[int]:
        return list(range(self.ckpt_every, self.total_steps + 1, self.ckpt_every))

    @property
    def late_steps(self) -> list[int]:
        """Checkpoint steps in the last half of the run."""
        return [s for s in self.checkpoint_steps if s > self.total_steps / 2]

    @property
    def decay_steps(self) -> int:
        return int(round(self.wsd_decay_fraction * self.total_steps))

    def data_key(self) -> str:
        keys = ("vocab_size", "tokenizer_chars", "train_chars", "block_size", "shard_blocks",
                "ood_chars", "shard_seed")
        return _digest({k: getattr(self, k) for k in keys})

    def run_key(self, schedule: str) -> str:
        return _digest({"schedule": schedule, "data": self.data_key(),
                        **{k: v for k, v in self.to_dict().items() if k != "name"}})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FULL = AvgConfig(name="full")

QUICK = AvgConfig(
    name="quick", vocab_size=300, tokenizer_chars=100_000, train_chars=300_000, block_size=32,
    shard_blocks=16, ood_chars=40_000, eval_batch_size=16, hidden_size=32, num_layers=2,
    num_heads=4, batch_size=8, lr=3e-3, warmup_steps=4, total_steps=48, ckpt_every=8,
    user_ema_decays=(0.9, 0.95), pairwise_budget=5, cb_history=4, cb_snapshot_every=2,
    cb_ema_decays=(0.9, 0.95), cb_budget=6)

RECOMMENDATION = """\
Recommended settings (decided before the runs, from the prototype facts and first principles):
`history=8, snapshot_every=10, ema_decays=(0.99, 0.995, 0.998, 0.999), budget=10`.

* `ema_decays` spans the EMA horizons 1/(1-d) = 100 ... 1000 steps that users choose between. The
  best decay depends on the learning rate, batch noise and run length, and a wrong one is worse
  than no averaging (prototype: 0.999 was +3% over the latest checkpoint), so the callback carries
  all four and lets the held-out shard pick. Each costs one host copy of the weights.
* `budget=10`: the latest weights (1) + one far end per family (pairwise, geometric, 4 EMA
  tracks: 6) leaves 3 evaluations to refine the family that did best. Every EMA track is evaluated
  on its own at every save, so on the selection shard the soup is never worse than the best of
  the callback's tracks, nor than the latest checkpoint.
* `snapshot_every=10`: the tracks are updated every `snapshot_every` steps with decay
  d^snapshot_every, i.e. they average one iterate per `snapshot_every` steps. For the shortest
  horizon (0.99: 100 steps) this keeps ~10 samples per horizon (effective sample size ~20 against
  ~200 for a per-step EMA); with `snapshot_every = ckpt_every/4 = 25` there would be only ~4, and
  the prototype measured that coarse snapshots (every 50 steps) left ~0.005 nats to the per-step
  EMA. The rule is `snapshot_every ≈ 1 / (10·(1 − min decay))`, independent of the checkpoint
  interval; a snapshot and the track updates cost one weight copy plus one lerp per track,
  amortised over `snapshot_every` steps.
* `history=8`: geometric weights over the last 8 snapshots (70 steps) cover horizons shorter than
  the shortest EMA track, which helps when the learning rate decays and long averages lag. It
  costs 8 host copies; drop to `history=4` where host memory is short.
"""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def environment() -> dict[str, Any]:
    import lightning
    import transformers

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "lightning": lightning.__version__,
            "transformers": transformers.__version__}


def default_cache() -> Path:
    from merge_callback.data import cache_dir

    return cache_dir() / "benchmarks"


# --------------------------------------------------------------------------- the user's EMA


class PerStepEMA(L.Callback):
    """Exact per-step EMAs of the module's floating-point state, one host copy per decay.

    After every optimizer step ``ema ← lerp(ema, θ, 1 − decay)`` (``torch._foreach_lerp_``); the
    first update copies θ, as Lightning's ``EMAWeightAveraging`` (``AveragedModel``) does.

    Args:
        decays: per-step decays in (0, 1).
        save_every: write every EMA to ``save_dir/ema{decay}-step{step:06d}.safetensors`` at the
            global steps divisible by ``save_every`` (``None``: never).
        save_dir: folder for those files.

    Raises:
        ValueError: a decay outside (0, 1), or ``save_every`` without ``save_dir``.
    """

    def __init__(self, decays: Sequence[float], save_every: int | None = None,
                 save_dir: str | os.PathLike | None = None):
        decays = tuple(float(d) for d in decays)
        if not decays or any(not (0.0 < d < 1.0) for d in decays):
            raise ValueError(f"decays must be numbers in (0, 1), got {list(decays)}")
        if save_every is not None and save_dir is None:
            raise ValueError("save_every needs save_dir (the folder the EMA files go to)")
        self.decays = decays
        self.save_every = save_every
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.keys: list[str] = []
        self.ema: dict[float, list[Tensor]] = {}
        self.step = 0
        self.updates = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step <= self.step:  # gradient accumulation: one update per optimizer step
            return
        sd = pl_module.state_dict()
        with torch.no_grad():
            if not self.ema:
                self.keys = [k for k, v in sd.items() if v.is_floating_point()]
                self.ema = {d: [sd[k].detach().to("cpu", copy=True) for k in self.keys]
                            for d in self.decays}
            else:
                cur = [sd[k].detach().to("cpu") for k in self.keys]
                for d, ema in self.ema.items():
                    torch._foreach_lerp_(ema, cur, 1.0 - d)
        self.step = step
        self.updates += 1
        if self.save_every and step % self.save_every == 0:
            for d in self.decays:
                save_safetensors_atomic(self.path(d, step), self.state_dict_for(d, sd),
                                        {"step": str(step), "decay": repr(d)})

    def path(self, decay: float, step: int) -> Path:
        assert self.save_dir is not None
        return self.save_dir / f"ema{decay:g}-step{step:06d}.safetensors"

    def state_dict_for(self, decay: float, latest: Mapping[str, Tensor] | None = None
                       ) -> dict[str, Tensor]:
        """The EMA with ``decay`` as a state dict (non-float entries from ``latest``)."""
        ema = dict(zip(self.keys, self.ema[float(decay)]))
        if latest is None:
            return {k: v.clone() for k, v in ema.items()}
        return {k: (ema[k].clone() if k in ema else v.detach().to("cpu", copy=True))
                for k, v in latest.items()}


class _Progress(L.Callback):
    def __init__(self, every: int):
        self.every = every
        self.t0 = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            loss = outputs["loss"].item() if isinstance(outputs, Mapping) else float(outputs)
            rate = step / max(1e-9, time.perf_counter() - self.t0)
            log(f"  step {step} train loss {loss:.4f} ({rate:.2f} steps/s incl. rounds)")


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    train: Tensor
    shards: dict[str, Tensor]


def pick_blocks(blocks: Tensor, n: int, seed: int) -> Tensor:
    if blocks.shape[0] < n:
        raise RuntimeError(f"only {blocks.shape[0]} blocks available, {n} requested")
    idx = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return blocks[torch.sort(idx).values]


def build_data(cfg: AvgConfig, cache: Path) -> Data:
    """Tokenizer, training blocks and the three evaluation shards (cached under ``cache``)."""
    folder = cache / f"averaging-data-{cfg.name}-{cfg.data_key()}"
    marker = folder / "blocks.pt"
    if marker.exists():
        blocks = torch.load(marker, weights_only=True)
        return Data(blocks["train"], {k: blocks[k] for k in SHARDS})
    from merge_callback.data import shakespeare_split, stdlib_text, tokenize_and_pack, train_tokenizer

    train_text, heldout_text = shakespeare_split()
    if cfg.train_chars is not None:
        train_text = train_text[: cfg.train_chars]
    tok = train_tokenizer([train_text[: cfg.tokenizer_chars]], vocab_size=cfg.vocab_size)
    train = tokenize_and_pack([train_text], tok, cfg.block_size)
    heldout = tokenize_and_pack([heldout_text], tok, cfg.block_size)
    half = heldout.shape[0] // 2
    sel = pick_blocks(heldout[:half], cfg.shard_blocks, cfg.shard_seed)
    test = pick_blocks(heldout[half:], cfg.shard_blocks, cfg.shard_seed + 1)
    ood = pick_blocks(tokenize_and_pack([stdlib_text(cfg.ood_chars)], tok, cfg.block_size),
                       cfg.shard_blocks, cfg.shard_seed + 2)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder / "tokenizer"))
    tmp = folder / f".blocks.pt.tmp-{os.getpid()}"
    torch.save({"train": train, "sel": sel, "test": test, "ood": ood}, tmp)
    os.replace(tmp, marker)
    return Data(train, {"sel": sel, "test": test, "ood": ood})


def make_module(cfg: AvgConfig, schedule: str = "constant"):
    from merge_callback.data import tiny_gpt_neox
    from merge_callback.lm import CausalLMModule

    model = tiny_gpt_neox(cfg.vocab_size, seed=cfg.seed, hidden_size=cfg.hidden_size,
                          num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                          max_len=cfg.block_size)
    kw: dict[str, Any] = {}
    if schedule == "wsd":
        kw = dict(schedule="wsd", decay_steps=cfg.decay_steps, total_steps=cfg.total_steps)
    return CausalLMModule(model, lr=cfg.lr, warmup_steps=cfg.warmup_steps, **kw)


def shard_loader(cfg: AvgConfig, blocks: Tensor):
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset

    return DataLoader(BlockDataset(blocks), batch_size=cfg.eval_batch_size, shuffle=False)


def n_batches(cfg: AvgConfig) -> int:
    return math.ceil(cfg.shard_blocks / cfg.eval_batch_size)


# --------------------------------------------------------------------------- training


def train_run(cfg: AvgConfig, schedule: str, data: Data, folder: Path) -> dict[str, Any]:
    """Train one run with checkpoints, the callback and the per-step EMAs (or reuse a finished one)."""
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        meta["reused"] = True
        return meta
    if folder.exists():
        shutil.rmtree(folder)
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from merge_callback import BayesMergeCallback
    from merge_callback.data import BlockDataset

    L.seed_everything(cfg.seed, verbose=False)
    module = make_module(cfg, schedule)
    loader = DataLoader(BlockDataset(data.train), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
    ckpt = ModelCheckpoint(dirpath=str(folder / "ckpt"), filename="{step:06d}",
                           every_n_train_steps=cfg.ckpt_every, save_top_k=-1)
    merge = BayesMergeCallback(heldout=shard_loader(cfg, data.shards["sel"]),
                               max_batches=n_batches(cfg), budget=cfg.cb_budget,
                               alpha=cfg.alpha, history=cfg.cb_history,
                               snapshot_every=cfg.cb_snapshot_every,
                               ema_decays=cfg.cb_ema_decays, on_error="raise",
                               soup_dir=str(folder / "soups"))
    ema = PerStepEMA(cfg.user_ema_decays, save_every=cfg.ckpt_every, save_dir=folder / "ema")
    trainer = L.Trainer(max_steps=cfg.total_steps, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0,
                        gradient_clip_val=cfg.gradient_clip, default_root_dir=str(folder),
                        callbacks=[ckpt, merge, ema, _Progress(cfg.ckpt_every)])
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - t0
    rounds = [json.loads((folder / "soups" / f"soup-step={s}.json").read_text())
              for s in cfg.checkpoint_steps]
    meta = {"schedule": schedule, "train_seconds": seconds,
            "round_seconds": sum(r["seconds"] for r in rounds),
            "parameters": sum(p.numel() for p in module.model.parameters()),
            "train_tokens": cfg.total_steps * cfg.batch_size * cfg.block_size,
            "train_blocks_available": int(data.train.shape[0]),
            "per_step_ema_updates": ema.updates, "reused": False}
    atomic_write_json(meta_path, meta)
    return meta


def ckpt_path(folder: Path, step: int) -> Path:
    matches = sorted((folder / "ckpt").glob(f"*step={step:06d}*.ckpt"))
    if len(matches) != 1:
        raise RuntimeError(f"expected one checkpoint for step {step} in {folder / 'ckpt'}, "
                           f"found {[m.name for m in matches]}")
    return matches[0]


# --------------------------------------------------------------------------- evaluation


class Scorer:
    """Held-out loss of state dicts on the shards (``HeldoutEvaluator``), memoised by key."""

    def __init__(self, cfg: AvgConfig, shards: Mapping[str, Tensor]):
        from merge_callback.evaluate import HeldoutEvaluator, resolve_metric

        self.module = make_module(cfg)
        self.evaluators = {s: HeldoutEvaluator(shard_loader(cfg, b), resolve_metric("loss"),
                                               max_batches=n_batches(cfg))
                           for s, b in shards.items()}
        self.memo: dict[tuple, float] = {}
        self.evaluations = 0
        self.seconds = 0.0

    def __call__(self, sd: Mapping[str, Tensor], shard: str, key: Any) -> float:
        if (key, shard) in self.memo:
            return self.memo[(key, shard)]
        t0 = time.perf_counter()
        self.module.load_state_dict(sd, strict=True)
        value = float(self.evaluators[shard](self.module))
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0
        self.memo[(key, shard)] = value
        return value


def analyse_run(cfg: AvgConfig, schedule: str, data: Data, folder: Path) -> dict[str, Any]:
    """Evaluate every method at every checkpoint step on the three shards."""
    from merge_callback.merge import lerp_state_dicts, weighted_average
    from merge_callback.search import search_lambda

    scorer = Scorer(cfg, data.shards)
    ckpts: dict[int, dict[str, Tensor]] = {}
    rows = []
    t0 = time.perf_counter()
    for step in cfg.checkpoint_steps:
        ckpts[step] = load_state_dict(ckpt_path(folder, step))
        ckpts.pop(step - max(cfg.lawa_ks) * cfg.ckpt_every, None)
        latest = ckpts[step]
        row: dict[str, Any] = {"step": step, "late": step in cfg.late_steps, "loss": {}}
        states: dict[str, tuple[Any, dict[str, Tensor]]] = {"latest": (("ckpt", step), latest)}
        soup_info = json.loads((folder / "soups" / f"soup-step={step}.json").read_text())
        soup_sd = load_state_dict(folder / "soups" / f"soup-step={step}.safetensors")
        states["soup"] = (("soup", step), soup_sd)
        row["soup"] = {k: soup_info[k] for k in ("family", "param", "weights", "inputs",
                                                  "value_soup", "value_latest", "seconds",
                                                  "evaluations")}
        anchors = {c["family"]: c["value"] for c in soup_info["candidates"]
                   if c["family"].startswith("ema") and c["param"] == 0.0}
        row["soup"]["track_values"] = anchors  # the callback's own EMA tracks on the sel shard
        for d in cfg.user_ema_decays:
            states[f"ema{d:g}"] = (("ema", d, step), load_state_dict(
                folder / "ema" / f"ema{d:g}-step{step:06d}.safetensors"))
        for k in cfg.lawa_ks:
            steps_k = [step - i * cfg.ckpt_every for i in range(k - 1, -1, -1)]
            if all(s in ckpts for s in steps_k):
                states[f"lawa{k}"] = (("lawa", k, step),
                                      weighted_average([ckpts[s] for s in steps_k], [1.0 / k] * k))
        previous = ckpts.get(step - cfg.ckpt_every)
        if previous is not None:
            def objective(lam: float, previous=previous) -> float:
                lam = round(float(lam), 12)
                if lam == 1.0:
                    return scorer(latest, "sel", ("ckpt", step))
                return scorer(lerp_state_dicts(previous, latest, lam), "sel",
                              ("pair", step, lam))

            res = search_lambda(objective, alpha=cfg.alpha, budget=cfg.pairwise_budget,
                                strategy="bayes", acq_func="gp_hedge", seed=step)
            lam = round(float(res.lam), 12)
            key = ("ckpt", step) if lam == 1.0 else ("pair", step, lam)
            states["pairwise"] = (key, lerp_state_dicts(previous, latest, lam))
            row["pairwise_lambda"] = lam
        for name, (key, sd) in states.items():
            row["loss"][name] = {s: scorer(sd, s, key) for s in SHARDS}
        row["soup"]["sel_recomputed_minus_json"] = (row["loss"]["soup"]["sel"]
                                                    - soup_info["value_soup"])
        for s in SHARDS:
            emas = {d: row["loss"][f"ema{d:g}"][s] for d in cfg.user_ema_decays}
            best = min(emas, key=emas.get)
            row.setdefault("best_ema", {})[s] = {"decay": best, "loss": emas[best]}
        rows.append(row)
        log(f"  {schedule} step {step}: latest {row['loss']['latest']['sel']:.4f} soup "
            f"{row['loss']['soup']['sel']:.4f} ({row['soup']['family']} "
            f"{row['soup']['param']:.3f}) best EMA {row['best_ema']['sel']['loss']:.4f} "
            f"[{scorer.evaluations} evaluations, {time.perf_counter() - t0:.0f} s]")
    return {"rows": rows, "evaluations": scorer.evaluations, "eval_seconds": scorer.seconds,
            "analysis_seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- summary


def _compare(rows: list[dict], shard: str, other: str) -> dict[str, Any]:
    """Soup vs ``other`` ("best_ema" or a method name) at the late steps on ``shard``."""
    gaps = []
    for r in rows:
        if not r["late"]:
            continue
        ref = r["best_ema"][shard]["loss"] if other == "best_ema" else \
            r["loss"].get(other, {}).get(shard)
        if ref is None:
            continue
        gaps.append(r["loss"]["soup"][shard] - ref)
    wins = sum(g < 0 for g in gaps)
    ties = sum(g == 0 for g in gaps)
    return {"n": len(gaps), "wins": wins, "ties": ties, "losses": len(gaps) - wins - ties,
            "win_rate": wins / len(gaps) if gaps else math.nan,
            "mean_gap": sum(gaps) / len(gaps) if gaps else math.nan,
            "max_gap": max(gaps) if gaps else math.nan, "min_gap": min(gaps) if gaps else math.nan}


def summarise(cfg: AvgConfig, rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for shard in SHARDS:
        out[shard] = {other: _compare(rows, shard, other)
                      for other in ("best_ema", "latest", "pairwise",
                                    *[f"lawa{k}" for k in cfg.lawa_ks],
                                    *[f"ema{d:g}" for d in cfg.user_ema_decays])}
    late = [r for r in rows if r["late"]]
    out["must_show"] = {
        "soup_beats_best_ema_in_hindsight_at_>=80%_of_late_steps":
            {s: out[s]["best_ema"]["win_rate"] >= 0.8 for s in SHARDS},
        "soup_beats_lawa3_at_every_late_step":
            {s: out[s]["lawa3"]["wins"] == out[s]["lawa3"]["n"] for s in SHARDS},
        "soup_beats_pairwise_at_every_late_step":
            {s: out[s]["pairwise"]["wins"] == out[s]["pairwise"]["n"] for s in SHARDS},
        "soup_never_worse_than_latest_on_sel":
            all(r["loss"]["soup"]["sel"] <= r["loss"]["latest"]["sel"] for r in rows),
    }
    fam_counts: dict[str, int] = {}
    for r in late:
        fam = "latest" if r["soup"]["weights"][-1] == 1.0 else r["soup"]["family"]
        fam_counts[fam] = fam_counts.get(fam, 0) + 1
    out["late_families"] = fam_counts
    # the callback's EMA tracks (updated every snapshot_every steps) vs the per-step EMAs, sel shard
    track_gap = []
    for r in late:
        tv = r["soup"]["track_values"]
        if tv:
            track_gap.append(min(tv.values()) - r["best_ema"]["sel"]["loss"])
    out["best_track_minus_best_per_step_ema_sel"] = {
        "mean": sum(track_gap) / len(track_gap) if track_gap else math.nan,
        "max": max(track_gap) if track_gap else math.nan}
    return out


def _fmt(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _family_label(soup: Mapping[str, Any]) -> str:
    fam, p = soup["family"], soup["param"]
    if soup["weights"][-1] == 1.0:
        return "latest"
    if fam == "pairwise" or fam.startswith("ema"):
        return f"{fam} λ={p:.2f}"
    return f"{fam} γ={p:.2f}"


def table(cfg: AvgConfig, rows: list[dict], shards: Sequence[str]) -> list[str]:
    emas = [f"ema{d:g}" for d in cfg.user_ema_decays]
    lawas = [f"lawa{k}" for k in cfg.lawa_ks]
    head = (["step", "latest", "callback soup", "(family, param)", "best EMA in hindsight"] + emas
            + [n.upper() for n in lawas] + ["pairwise (λ)"])
    lines = []
    for shard in shards:
        lines += [f"*{SHARD_TITLES[shard]}* — held-out loss (nats/token), lower is better; "
                  "late steps marked †", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            loss = r["loss"]
            be = r["best_ema"][shard]
            pw = loss.get("pairwise", {}).get(shard)
            pw_s = "—" if pw is None else f"{pw:.4f} ({r['pairwise_lambda']:.2f})"
            cells = ([f"{r['step']}{' †' if r['late'] else ''}", _fmt(loss["latest"][shard]),
                      f"**{loss['soup'][shard]:.4f}**", _family_label(r["soup"]),
                      f"{be['loss']:.4f} ({be['decay']:g})"]
                     + [_fmt(loss[e][shard]) for e in emas]
                     + [_fmt(loss.get(n, {}).get(shard)) for n in lawas] + [pw_s])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def win_lines(cfg: AvgConfig, summary: Mapping[str, Any]) -> list[str]:
    others = ["best_ema", "latest", "pairwise", *[f"lawa{k}" for k in cfg.lawa_ks],
              *[f"ema{d:g}" for d in cfg.user_ema_decays]]
    lines = ["| soup vs (late steps) | " + " | ".join(SHARD_TITLES[s].split(" (")[0]
                                                      for s in SHARDS) + " |",
             "|---|---|---|---|"]
    for o in others:
        cells = []
        for s in SHARDS:
            c = summary[s][o]
            cells.append(f"{c['wins']}/{c['n']} wins, {c['ties']} ties; mean {c['mean_gap']:+.4f}, "
                         f"worst {c['max_gap']:+.4f}")
        name = "best EMA in hindsight" if o == "best_ema" else o.upper() if o.startswith("lawa") \
            else o
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def shortfalls(cfg: AvgConfig, rows: list[dict]) -> list[str]:
    """Every late step where the soup did not beat the best EMA in hindsight, with the cause."""
    lines = []
    for shard in SHARDS:
        for r in rows:
            be = r["best_ema"][shard]
            gap = r["loss"]["soup"][shard] - be["loss"]
            if not r["late"] or gap < 0:
                continue
            soup = r["soup"]
            why = f"the round chose {_family_label(soup)} on the selection shard"
            name = f"ema{be['decay']:g}"
            track = soup["track_values"].get(name)
            if shard == "sel" and track is not None:
                why += (f"; the callback's {name} track (updated every {cfg.cb_snapshot_every} "
                        f"steps) is {track - r['loss'][name]['sel']:+.4f} from the per-step "
                        f"{name} here")
            if shard == "ood":
                why += f"; the best decay out of domain is {be['decay']:g}"
            lines.append(f"| {r['step']} | {shard} | {gap:+.4f} | {why} |")
    if not lines:
        return ["The soup beat the best EMA in hindsight at every late step on every shard.", ""]
    return (["Late steps where the soup did not beat the best EMA in hindsight (gap = soup − best "
             "EMA, nats):", "", "| step | shard | gap | choice and cause |", "|---|---|---|---|"]
            + lines + [""])


def plot(cfg: AvgConfig, results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scheds = list(results)
    fig, axes = plt.subplots(len(scheds), len(SHARDS), figsize=(5.2 * len(SHARDS),
                                                                3.6 * len(scheds)), squeeze=False)
    methods = (["soup"] + [f"ema{d:g}" for d in cfg.user_ema_decays]
               + [f"lawa{k}" for k in cfg.lawa_ks] + ["pairwise"])
    styles = {"soup": dict(color="black", lw=2.2, marker="o", ms=3), "pairwise":
              dict(color="tab:red", ls="--"), "lawa3": dict(color="tab:green", ls="-."),
              "lawa4": dict(color="tab:olive", ls="-.")}
    for i, sched in enumerate(scheds):
        rows = results[sched]["rows"]
        for j, shard in enumerate(SHARDS):
            ax = axes[i][j]
            for m in methods:
                pts = [(r["step"], r["loss"][m][shard] - r["loss"]["latest"][shard]) for r in rows
                       if m in r["loss"]]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, label=m, **styles.get(m, dict(lw=1)))
            ax.axhline(0.0, color="gray", lw=0.8)
            ax.axvspan(cfg.total_steps / 2, cfg.total_steps, color="0.93", zorder=0)
            late_vals = [r["loss"][m][shard] - r["loss"]["latest"][shard] for r in rows
                         for m in methods if m in r["loss"] and r["late"]]
            if late_vals:  # zoom on the best methods of the late half: 0 to the lowest curve
                lo = min(min(late_vals), -1e-3)
                ax.set_ylim(1.2 * lo, -0.6 * lo)
            ax.set_title(f"{sched}: {shard}", fontsize=10)
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("loss − latest checkpoint (nats)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("Held-out loss minus the latest checkpoint's (below 0 = better than the latest); "
                 "late half shaded, y-range zoomed on it", fontsize=11)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def report(cfg: AvgConfig, results: Mapping[str, Any], env: Mapping[str, Any],
           wall: float) -> str:
    lines = [f"# Searching the averaging vs tuned EMA, LAWA and the pairwise soup "
             f"({cfg.name} settings)", "",
             "Generated by `python benchmarks/averaging.py"
             f"{' --quick' if cfg.name == 'quick' else ''}`. Every number below was measured "
             "in this run.", "", "## Method (fixed before the runs)", "",
             f"* Model: Pythia-architecture GPT-NeoX (`tiny_gpt_neox`: hidden {cfg.hidden_size}, "
             f"{cfg.num_layers} layers, {cfg.num_heads} heads, vocab {cfg.vocab_size}, context "
             f"{cfg.block_size}; {next(iter(results.values()))['meta']['parameters']:,} "
             "parameters), random init, AdamW lr "
             f"{cfg.lr:g}, betas (0.9, 0.95), no weight decay, {cfg.warmup_steps} warmup steps, "
             f"gradient clipping {cfg.gradient_clip:g}, batch {cfg.batch_size}×{cfg.block_size} "
             f"tokens, {cfg.total_steps} steps, Shakespeare training split (all plays except "
             "Macbeth and Julius Caesar).",
             "* Schedules: `constant` (constant after warmup) and `wsd` (warmup-stable-decay: "
             f"linear decay to 0.1× over the last {cfg.decay_steps} steps).",
             f"* `ModelCheckpoint(every_n_train_steps={cfg.ckpt_every}, save_top_k=-1)`; "
             f"late steps = the checkpoints after step {cfg.total_steps // 2} "
             f"({len(cfg.late_steps)} per schedule).",
             f"* Callback: `BayesMergeCallback(history={cfg.cb_history}, "
             f"snapshot_every={cfg.cb_snapshot_every}, ema_decays={cfg.cb_ema_decays}, "
             f"budget={cfg.cb_budget})`, held-out data = the selection shard "
             f"(max_batches={n_batches(cfg)}); its soup is read back from the safetensors it "
             "wrote and re-evaluated.",
             f"* Shards: {cfg.shard_blocks} blocks × {cfg.block_size} tokens each "
             f"({cfg.shard_blocks * cfg.block_size:,} tokens), chosen by seed {cfg.shard_seed}: "
             "selection = drawn from the first half of the held-out plays' blocks (Macbeth and the "
             "opening of Julius Caesar), second in-domain = drawn from the other half (the rest "
             "of Julius Caesar), out-of-domain = Python standard-library source.",
             f"* User's EMA: exact per-step EMA (`torch._foreach_lerp_` every optimizer step, first "
             f"update copies the weights, as Lightning's `EMAWeightAveraging`) for decays "
             f"{cfg.user_ema_decays}. Best EMA in hindsight: per step and per shard, the decay that "
             "is best on that very shard.",
             f"* LAWA k: uniform average of the last k checkpoints (k in {cfg.lawa_ks}). Pairwise: "
             f"the paper's soup of the previous and latest checkpoints, λ ∈ [{cfg.alpha}, 1] by "
             f"`search_lambda` (GP-hedge, budget {cfg.pairwise_budget}) on the selection shard.",
             "* Soup \"beats\" X = strictly lower held-out loss.", ""]
    if cfg.name != FULL.name:
        lines += ["*Quick mode: a scaled-down smoke test of the pipeline; the callback settings "
                  "above are scaled down too. The recommendation below is what the full run "
                  "uses.*", ""]
    lines += [RECOMMENDATION, ""]
    for sched, res in results.items():
        meta, summ = res["meta"], res["summary"]
        lines += [f"## Schedule `{sched}`", "",
                  f"Training (with the callback and the per-step EMAs): "
                  f"{meta['train_seconds']:.0f} s ({cfg.total_steps / meta['train_seconds']:.2f} "
                  f"steps/s), of which merge rounds {meta['round_seconds']:.0f} s; analysis "
                  f"{res['analysis_seconds']:.0f} s ({res['evaluations']} evaluations)."
                  + (" (Read back from the cached run with identical settings.)"
                     if meta.get("reused") else ""), ""]
        lines += ["### Win rates of the callback's soup at the late steps", ""]
        lines += win_lines(cfg, summ) + [""]
        ms = summ["must_show"]
        lines += ["* Soup beats the best EMA in hindsight at ≥ 80% of late steps: "
                  + ", ".join(f"{s}: {'yes' if v else 'no'}" for s, v in
                              ms["soup_beats_best_ema_in_hindsight_at_>=80%_of_late_steps"].items()),
                  "* Soup beats LAWA3 at every late step: "
                  + ", ".join(f"{s}: {'yes' if v else 'no'}" for s, v in
                              ms["soup_beats_lawa3_at_every_late_step"].items()),
                  "* Soup beats the pairwise soup at every late step: "
                  + ", ".join(f"{s}: {'yes' if v else 'no'}" for s, v in
                              ms["soup_beats_pairwise_at_every_late_step"].items()),
                  f"* Soup never worse than the latest checkpoint on the selection shard: "
                  f"{'yes' if ms['soup_never_worse_than_latest_on_sel'] else 'no'}",
                  f"* Families chosen at the late steps: {summ['late_families']}",
                  f"* The callback's best EMA track (updated every {cfg.cb_snapshot_every} steps) "
                  f"minus the best per-step EMA, selection shard, late steps: mean "
                  f"{summ['best_track_minus_best_per_step_ema_sel']['mean']:+.4f}, worst "
                  f"{summ['best_track_minus_best_per_step_ema_sel']['max']:+.4f}", ""]
        lines += shortfalls(cfg, res["rows"])
        lines += [f"### Held-out loss per checkpoint (`{sched}`)", ""]
        lines += table(cfg, res["rows"], SHARDS)
    original = sum(r["meta"]["train_seconds"] + r["analysis_seconds"] for r in results.values())
    lines += ["## Environment", "",
              f"Training and analysis {original:.0f} s in all (this report written in "
              f"{wall:.0f} s). " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (files named *_quick*)")
    p.add_argument("--out", default=str(_ROOT / "benchmarks" / "results"),
                   help="folder for averaging[_quick].{md,json,png}")
    p.add_argument("--cache", default=None,
                   help="folder for data and training runs (default "
                        "$MERGE_CALLBACK_CACHE/benchmarks or ~/.cache/merge_callback/benchmarks)")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    p.add_argument("--retrain", action="store_true", help="train again even if a finished run "
                                                          "with the same settings is cached")
    p.add_argument("--reanalyse", action="store_true",
                   help="evaluate again even if the analysis of this run is cached")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else FULL
    out = Path(args.out)
    cache = Path(args.cache).expanduser() if args.cache else default_cache()
    t0 = time.perf_counter()
    log(f"data ({cfg.name})")
    data = build_data(cfg, cache)
    results: dict[str, Any] = {}
    for sched in args.schedules:
        folder = cache / f"averaging-run-{cfg.name}-{sched}-{cfg.run_key(sched)}"
        if args.retrain and folder.exists():
            shutil.rmtree(folder)
        log(f"train {sched} -> {folder}")
        meta = train_run(cfg, sched, data, folder)
        log(f"analyse {sched}")
        cached = folder / "analysis.json"
        if cached.exists() and not args.reanalyse:
            res = json.loads(cached.read_text())
            res["reused"] = True
        else:
            res = analyse_run(cfg, sched, data, folder)
            atomic_write_json(cached, res)
        res["meta"] = meta
        res["summary"] = summarise(cfg, res["rows"])
        results[sched] = res
    wall = time.perf_counter() - t0
    env = environment()
    stem = "averaging_quick" if args.quick else "averaging"
    out.mkdir(parents=True, exist_ok=True)
    plot(cfg, results, out / f"{stem}.png")
    atomic_write_json(out / f"{stem}.json", {
        "config": cfg.to_dict(), "recommendation": RECOMMENDATION,
        "late_steps": cfg.late_steps, "results": results, "wall_seconds": wall,
        "environment": env, "command": " ".join(["python benchmarks/averaging.py",
                                                 *(argv if argv is not None else sys.argv[1:])])})
    atomic_write_bytes(out / f"{stem}.md", report(cfg, results, env, wall).encode())
    log(f"wrote {out / stem}.{{md,json,png}} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    from merge_callback.console import quiet_third_party

    with quiet_third_party():  # Lightning's banner and tips; our lines and warnings stay
        raise SystemExit(main())
