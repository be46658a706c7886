"""Shared pieces of the quality benchmarks: configuration, data shards, one cached training run.

One training run of a Pythia-architecture GPT-NeoX on Shakespeare (warmup, constant learning
rate, then a linear decay: ``CausalLMModule(schedule="wsd")`` under a Lightning ``Trainer``) keeps a
copy of the weights every ``ckpt_every`` steps and, for a few decays, per-step exponential moving
averages (EMA) of the weights. The trajectory is stored under a cache folder keyed by the
configuration, so a rerun of the analysis reuses it instead of training again.

Shards (fixed by ``shard_seed`` before any result was looked at):

* ``sel`` — selection shard: random blocks of *Macbeth* (held out of training). Every merge weight
  (BO soup λ, greedy-soup membership, Fisher and RegMean statistics) is chosen on it.
* ``test`` — in-domain test shard: random blocks of *Julius Caesar* (held out of training).
* ``ood`` — out-of-domain shard: random blocks of Python standard-library source code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from merge_callback.evaluate import forward_logits, next_token_targets
from merge_callback.io import atomic_write_json, load_state_dict, save_safetensors_atomic
from merge_callback.merge import lerp_state_dicts

SHARDS = ("sel", "test", "ood")
SHARD_TITLES = {
    "sel": "selection (Macbeth)",
    "test": "in-domain test (Julius Caesar)",
    "ood": "out-of-domain (Python stdlib)",
}


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a benchmark run (model, data, schedule, pairs, search settings)."""

    name: str
    # data
    vocab_size: int = 4096
    tokenizer_chars: int | None = None
    train_chars: int | None = None
    block_size: int = 128
    sel_blocks: int = 100
    test_blocks: int = 120
    ood_blocks: int = 120
    ood_chars: int = 1_500_000
    shard_seed: int = 1234
    eval_batch_size: int = 50
    # model and training
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 2000
    decay_steps: int = 600
    gradient_clip: float = 1.0
    ckpt_every: int = 100
    ema_decays: tuple[float, ...] = (0.99, 0.995, 0.998, 0.999)
    seed: int = 0
    # analysis
    alpha: float = 0.5
    budget: int = 10
    quality_pairs: tuple[tuple[str, int, int], ...] = (
        ("early", 100, 200), ("early", 200, 300),
        ("late, constant LR", 1200, 1300), ("late, constant LR", 1300, 1400),
        ("late, decaying LR", 1800, 1900), ("late, decaying LR", 1900, 2000),
        ("distant", 400, 1400), ("distant", 1000, 2000),
    )
    fisher_sequences: int = 32
    regmean_alpha: float = 0.9
    lawa_ks: tuple[int, ...] = (3, 5)
    sweep_pairs: tuple[tuple[int, int], ...] = ((100, 200), (1300, 1400), (1900, 2000), (400, 1400))
    sweep_points: int = 21
    heatmap_every: int = 200
    heatmap_budget: int = 6
    search_pairs: tuple[tuple[int, int], ...] = (
        (100, 200), (200, 300), (1200, 1300), (1300, 1400), (1800, 1900), (1900, 2000))
    search_seeds: tuple[int, ...] = (0, 1, 2)
    search_budget: int = 10
    dense_points: int = 101

    @property
    def checkpoint_steps(self) -> list[int]:
        return list(range(self.ckpt_every, self.total_steps + 1, self.ckpt_every))

    @property
    def decay_start(self) -> int:
        return self.total_steps - self.decay_steps

    @property
    def user_steps(self) -> list[int]:
        """Steps at which EMA / LAWA are compared: the latest checkpoint of every quality pair."""
        return sorted({b for _, _, b in self.quality_pairs})

    def data_key(self) -> str:
        keys = ("vocab_size", "tokenizer_chars", "train_chars", "block_size", "sel_blocks",
                "test_blocks", "ood_blocks", "ood_chars", "shard_seed")
        return _digest({k: getattr(self, k) for k in keys})

    def trajectory_key(self) -> str:
        keys = ("hidden_size", "num_layers", "num_heads", "batch_size", "lr", "warmup_steps",
                "total_steps", "decay_steps", "gradient_clip", "ckpt_every", "ema_decays", "seed")
        return _digest({"data": self.data_key(), **{k: getattr(self, k) for k in keys},
                        "ema_steps": self.user_steps})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FULL = BenchConfig(name="full")

QUICK = BenchConfig(
    name="quick",
    vocab_size=512, tokenizer_chars=200_000, train_chars=400_000, block_size=32,
    sel_blocks=16, test_blocks=16, ood_blocks=16, ood_chars=60_000, eval_batch_size=16,
    hidden_size=32, num_layers=2, num_heads=4, batch_size=8, lr=3e-3,
    warmup_steps=4, total_steps=48, decay_steps=16, ckpt_every=8, ema_decays=(0.9, 0.95),
    budget=5,
    quality_pairs=(("early", 8, 16), ("late, constant LR", 24, 32), ("late, decaying LR", 40, 48),
                   ("distant", 8, 48)),
    fisher_sequences=4, lawa_ks=(3,),
    sweep_pairs=((8, 16), (40, 48)), sweep_points=6,
    heatmap_every=16, heatmap_budget=4,
    search_pairs=((16, 32), (40, 48)), search_seeds=(0, 1, 2), search_budget=4, dense_points=11,
)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def bench_cache_root(cache: str | os.PathLike | None = None) -> Path:
    """``cache`` or ``$MERGE_CALLBACK_CACHE/benchmarks`` (default ``~/.cache/merge_callback/benchmarks``)."""
    if cache is not None:
        return Path(cache).expanduser()
    from merge_callback.data import cache_dir

    return cache_dir() / "benchmarks"


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    import lightning
    import numpy
    import skopt
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "scikit-optimize": skopt.__version__,
        "numpy": numpy.__version__,
        "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    tokenizer: Any
    train: Tensor
    shards: dict[str, Tensor]


def pick_blocks(blocks: Tensor, n: int, seed: int) -> Tensor:
    if blocks.shape[0] < n:
        raise RuntimeError(f"only {blocks.shape[0]} blocks available, {n} requested")
    idx = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return blocks[torch.sort(idx).values]


def build_data(cfg: BenchConfig, cache: str | os.PathLike | None = None) -> Data:
    """Tokenizer, packed training blocks and the three evaluation shards (cached on disk)."""
    from transformers import AutoTokenizer

    from merge_callback.data import (shakespeare_split, shakespeare_texts, stdlib_text,
                                     tokenize_and_pack, train_tokenizer)

    folder = bench_cache_root(cache) / f"data-{cfg.name}-{cfg.data_key()}"
    marker = folder / "blocks.pt"
    if marker.exists():
        blocks = torch.load(marker, weights_only=True)
        tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        return Data(tok, blocks["train"], {k: blocks[k] for k in SHARDS})
    train_text, _ = shakespeare_split()
    if cfg.train_chars is not None:
        train_text = train_text[: cfg.train_chars]
    tok_text = train_text if cfg.tokenizer_chars is None else train_text[: cfg.tokenizer_chars]
    tok = train_tokenizer([tok_text], vocab_size=cfg.vocab_size)
    texts = shakespeare_texts()
    train = tokenize_and_pack([train_text], tok, cfg.block_size)
    sel = pick_blocks(tokenize_and_pack([texts["macbeth"]], tok, cfg.block_size), cfg.sel_blocks,
                       cfg.shard_seed)
    test = pick_blocks(tokenize_and_pack([texts["julius_caesar"]], tok, cfg.block_size),
                        cfg.test_blocks, cfg.shard_seed + 1)
    ood = pick_blocks(tokenize_and_pack([stdlib_text(cfg.ood_chars)], tok, cfg.block_size),
                       cfg.ood_blocks, cfg.shard_seed + 2)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder / "tokenizer"))
    tmp = folder / f".blocks.pt.tmp-{os.getpid()}"
    torch.save({"train": train, "sel": sel, "test": test, "ood": ood}, tmp)
    os.replace(tmp, marker)
    return Data(tok, train, {"sel": sel, "test": test, "ood": ood})


def make_model(cfg: BenchConfig):
    from merge_callback.data import tiny_gpt_neox

    return tiny_gpt_neox(cfg.vocab_size, seed=cfg.seed, hidden_size=cfg.hidden_size,
                         num_layers=cfg.num_layers, num_heads=cfg.num_heads, max_len=cfg.block_size)


# --------------------------------------------------------------------------- training callbacks


class MultiEMA(L.Callback):
    """Per-step EMAs of a module's floating state for several decays, kept as host copies.

    After every optimizer step ``ema = decay·ema + (1 − decay)·θ`` (the first update copies θ), the
    update Lightning's ``EMAWeightAveraging`` / ``torch.optim.swa_utils.get_ema_avg_fn`` performs;
    one callback serves all decays. Copies are taken at ``snapshot_steps``.

    Args:
        decays: EMA decays in (0, 1).
        snapshot_steps: global steps at which ``snapshots[(decay, step)]`` is stored.
        attribute: the submodule of the LightningModule to track (``""`` for the whole module).
    """

    def __init__(self, decays: Sequence[float], snapshot_steps: Sequence[int] = (),
                 attribute: str = "model"):
        for d in decays:
            if not (0.0 < float(d) < 1.0):
                raise ValueError(f"EMA decays must be in (0, 1), got {d!r}")
        self.decays = tuple(float(d) for d in decays)
        self.snapshot_steps = set(int(s) for s in snapshot_steps)
        self.attribute = attribute
        self.keys: list[str] = []
        self.ema: dict[float, list[Tensor]] = {}
        self.updates = 0
        self.snapshots: dict[tuple[float, int], dict[str, Tensor]] = {}

    def _tracked(self, pl_module) -> dict[str, Tensor]:
        module = pl_module.get_submodule(self.attribute) if self.attribute else pl_module
        return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step <= self.updates:
            return
        tracked = self._tracked(pl_module)
        current = [t.detach().to("cpu") for t in tracked.values()]
        with torch.no_grad():
            if not self.ema:
                self.keys = list(tracked)
                self.ema = {d: [t.clone() for t in current] for d in self.decays}
            else:
                for d, ema in self.ema.items():
                    scaled = torch._foreach_mul(current, 1.0 - d)
                    torch._foreach_mul_(ema, d)
                    torch._foreach_add_(ema, scaled)
        self.updates = trainer.global_step
        if trainer.global_step in self.snapshot_steps:
            for d in self.decays:
                self.snapshots[(d, trainer.global_step)] = self.state_dict_for(d)

    def state_dict_for(self, decay: float) -> dict[str, Tensor]:
        """A copy of the current EMA with ``decay`` as a state dict."""
        return {k: t.clone() for k, t in zip(self.keys, self.ema[float(decay)])}


class Snapshots(L.Callback):
    """Keep a host copy of ``pl_module.<attribute>.state_dict()`` every ``every`` optimizer steps."""

    def __init__(self, every: int, attribute: str = "model", log_every: int | None = None):
        self.every = every
        self.attribute = attribute
        self.log_every = log_every
        self.states: dict[int, dict[str, Tensor]] = {}
        self._t0 = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step not in self.states:
            module = pl_module.get_submodule(self.attribute) if self.attribute else pl_module
            self.states[step] = {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}
        if self.log_every and step % self.log_every == 0:
            loss = outputs["loss"].item() if isinstance(outputs, Mapping) else float(outputs)
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            rate = step / (time.perf_counter() - self._t0)
            log(f"train step {step} loss {loss:.4f} lr {lr:.2e} ({rate:.2f} steps/s)")


# --------------------------------------------------------------------------- trajectory


@dataclass
class Trajectory:
    config: BenchConfig
    data: Data
    checkpoints: dict[int, dict[str, Tensor]]
    ema: dict[tuple[float, int], dict[str, Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)


def train_trajectory(cfg: BenchConfig, cache: str | os.PathLike | None = None,
                     progress: bool = True) -> Trajectory:
    """Train once (or load the cached run) and return its checkpoints and EMA snapshots."""
    data = build_data(cfg, cache)
    folder = bench_cache_root(cache) / f"trajectory-{cfg.name}-{cfg.trajectory_key()}"
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        ckpts = {s: load_state_dict(folder / f"ckpt-{s:06d}.safetensors") for s in cfg.checkpoint_steps}
        ema = {(d, s): load_state_dict(folder / f"ema-{d}-{s:06d}.safetensors")
               for d in cfg.ema_decays for s in cfg.user_steps}
        meta["loaded_from_cache"] = True
        return Trajectory(cfg, data, ckpts, ema, meta)

    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset
    from merge_callback.lm import CausalLMModule

    L.seed_everything(cfg.seed, verbose=False)
    module = CausalLMModule(make_model(cfg), lr=cfg.lr, warmup_steps=cfg.warmup_steps, schedule="wsd",
                            decay_steps=cfg.decay_steps, total_steps=cfg.total_steps)
    loader = DataLoader(BlockDataset(data.train), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
    ema = MultiEMA(cfg.ema_decays, cfg.user_steps)
    snaps = Snapshots(cfg.ckpt_every, log_every=cfg.ckpt_every if progress else None)
    trainer = L.Trainer(max_steps=cfg.total_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        gradient_clip_val=cfg.gradient_clip, callbacks=[ema, snaps])
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(module, loader)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    missing = [s for s in cfg.checkpoint_steps if s not in snaps.states]
    if missing:
        raise RuntimeError(f"training ended without checkpoints at steps {missing}")
    folder.mkdir(parents=True, exist_ok=True)
    for s in cfg.checkpoint_steps:
        save_safetensors_atomic(folder / f"ckpt-{s:06d}.safetensors", snaps.states[s], {"step": s})
    for (d, s), sd in ema.snapshots.items():
        save_safetensors_atomic(folder / f"ema-{d}-{s:06d}.safetensors", sd, {"step": s, "decay": d})
    meta = {"train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
            "steps_per_second": cfg.total_steps / seconds,
            "parameters": sum(p.numel() for p in module.model.parameters()),
            "train_tokens": cfg.total_steps * cfg.batch_size * cfg.block_size,
            "train_blocks_available": int(data.train.shape[0]),
            "environment": environment()}
    atomic_write_json(meta_path, meta)
    meta["loaded_from_cache"] = False
    return Trajectory(cfg, data, {s: snaps.states[s] for s in cfg.checkpoint_steps},
                      dict(ema.snapshots), meta)


# --------------------------------------------------------------------------- evaluation


class Scorer:
    """Held-out loss and next-token accuracy of state dicts on the shards, with a memo.

    ``scorer(sd, shard, key=...)`` loads ``sd`` into a scratch model (``strict=True``) and returns
    ``(loss, accuracy)``; results are remembered under ``(key, shard)`` when ``key`` is given.
    """

    def __init__(self, cfg: BenchConfig, shards: Mapping[str, Tensor]):
        self.model = make_model(cfg)
        self.model.eval()
        self.shards = dict(shards)
        self.batch_size = cfg.eval_batch_size
        self.memo: dict[tuple, tuple[float, float]] = {}
        self.evaluations = 0
        self.seconds = 0.0

    def batches(self, shard: str, batch_size: int | None = None) -> list[dict[str, Tensor]]:
        blocks = self.shards[shard]
        bs = batch_size or self.batch_size
        return [{"input_ids": blocks[i:i + bs]} for i in range(0, blocks.shape[0], bs)]

    def __call__(self, sd: Mapping[str, Tensor], shard: str, key: Any = None) -> tuple[float, float]:
        if key is not None and (key, shard) in self.memo:
            return self.memo[(key, shard)]
        t0 = time.perf_counter()
        self.model.load_state_dict(sd, strict=True)
        loss_sum, correct, count = 0.0, 0.0, 0.0
        with torch.inference_mode():
            for batch in self.batches(shard):
                logits = forward_logits(self.model, batch)[:, :-1].float()
                targets = next_token_targets(batch)
                loss_sum += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"))
                correct += float((logits.argmax(-1) == targets).sum())
                count += targets.numel()
        out = (loss_sum / count, correct / count)
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0
        if key is not None:
            self.memo[(key, shard)] = out
        return out


def lam_key(previous: int, latest: int, lam: float) -> tuple:
    """Memo key of the pairwise soup λ·θ_latest + (1 − λ)·θ_previous."""
    lam = round(float(lam), 12)
    if lam == 1.0:
        return ("ckpt", latest)
    if lam == 0.0:
        return ("ckpt", previous)
    return ("lerp", previous, latest, lam)


def soup_objective(traj: Trajectory, scorer: Scorer, previous: int, latest: int, shard: str = "sel"):
    """``f(λ)`` = held-out loss of the pairwise soup on ``shard`` (memoised by λ)."""
    a, b = traj.checkpoints[previous], traj.checkpoints[latest]

    def f(lam: float) -> float:
        key = lam_key(previous, latest, lam)
        if (key, shard) in scorer.memo:
            return scorer.memo[(key, shard)][0]
        return scorer(lerp_state_dicts(a, b, lam), shard, key=key)[0]

    return f
