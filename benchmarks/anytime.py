"""Anytime averaging: post-hoc EMA and decay-shaped windows searched at every save.

On a constant-learning-rate trajectory (Pythia-architecture GPT-NeoX on the Shakespeare training
split, two model sizes, three seeds) this benchmark simulates, offline and with the package's own
pieces, what a merge round at each save would do with post-hoc averaging
(:mod:`merge_callback.posthoc`):

* during training: two power-function EMA tracks on the host, updated every ``snapshot_every``
  steps (:class:`~merge_callback.posthoc.PowerEmaTrack`), a snapshot of both tracks and of the raw
  weights written at every save (:class:`~merge_callback.posthoc.SnapshotStore`); besides, as
  references only, exact per-step EMAs for five decays and exact per-step power-function EMAs for
  a grid of σ_rel;
* at every save: the recommended mode (:data:`MODE`) — latest weights, post-hoc EMA with σ_rel
  searched on a log scale (reconstructed by least squares from the stored snapshots), a 1−√
  window over the last W saves with W searched, the pairwise soup, and a blend of the best of
  these with the latest weights — every family searched with
  :func:`merge_callback.search.search_interval` on the selection shard; the chosen soup is
  reported on the test shard, which nothing is chosen on;
* baselines, each reported on the test shard: (a) per-step EMA with the decay chosen in
  hindsight (on the test shard itself, and on the selection shard), (b) exact per-step
  power-function EMA with σ_rel chosen in hindsight (same two ways), (c) LAWA and WSM 1−√ merges
  of the last k saves at fixed k, (d) the pairwise soup (λ by GP search on the selection shard),
  (e) the latest weights;
* the anytime annealed model: for a few late steps t, a warmup-stable-decay run branched from the
  constant run's trainer state at 0.8·t, decaying linearly (to 0.1×) over its last 0.2·t steps and
  ending exactly at t, against the constant-LR soup at t;
* reconstruction accuracy: post-hoc EMAs rebuilt from the snapshots against the exact per-step
  power-function EMA of the same σ_rel (max per-iterate weight error, max parameter difference,
  test-loss difference).

A separate cost micro-benchmark (``--cost``) measures writing and reading back snapshots and the
reconstruction at 160M parameters on the CPU.

Usage::

    python benchmarks/anytime.py            # -> benchmarks/results/anytime.{md,json,png}
    python benchmarks/anytime.py --quick    # tiny settings -> anytime_quick.*
    python benchmarks/anytime.py --cost     # -> benchmarks/results/anytime_cost.{md,json}
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import dataclasses
import json
import math
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
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks import averaging as av  # noqa: E402
from merge_callback.io import atomic_write_bytes, atomic_write_json, save_safetensors_atomic  # noqa: E402
from merge_callback.posthoc import (  # noqa: E402
    PowerEmaTrack, SnapshotStore, gamma_to_sigma_rel, power_ema_step_weights,
    reconstructed_step_weights, reconstruction_weights, sigma_rel_to_gamma, window_weights)
from merge_callback.search import search_interval, search_lambda  # noqa: E402

log = av.log
SHARDS = ("sel", "test")


@dataclass(frozen=True)
class AnytimeConfig:
    """Everything that defines the benchmark (fixed before the runs)."""

    name: str
    data: str = "full"  # averaging.py's data settings (FULL or QUICK)
    sizes: tuple[tuple[str, int, int], ...] = (("example", 96, 3), ("4x", 208, 4))
    seeds: tuple[int, ...] = (0, 1, 2)
    shard_blocks: int = 64  # per shard: 64 x 64 = 4,096 tokens
    eval_batch_size: int = 32
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 50
    total_steps: int = 800
    ckpt_every: int = 50
    # references
    user_ema_decays: tuple[float, ...] = (0.98, 0.99, 0.995, 0.998, 0.999)
    power_grid: tuple[float, ...] = (0.03, 0.05, 0.08, 0.12, 0.17, 0.25)
    recon_check: tuple[float, ...] = (0.08,)
    fixed_ks: tuple[int, ...] = (4, 8)
    pairwise_budget: int = 6
    branch_targets: tuple[int, ...] = (500, 650, 800)
    # the recommended mode (see MODE)
    track_sigmas: tuple[float, ...] = (0.05, 0.15)
    snapshot_every: int = 10
    sigma_range: tuple[float, float] = (0.02, 0.28)
    window_kind: str = "one_minus_sqrt"
    window_range: tuple[int, int] = (2, 16)
    budget_phema: int = 5
    budget_window: int = 3
    budget_pairwise: int = 3
    budget_blend: int = 3

    @property
    def checkpoint_steps(self) -> list[int]:
        return list(range(self.ckpt_every, self.total_steps + 1, self.ckpt_every))

    @property
    def late_steps(self) -> list[int]:
        return [s for s in self.checkpoint_steps if s > self.total_steps / 2]

    def avg_config(self, size: tuple[str, int, int], seed: int, total_steps: int | None = None):
        base = av.FULL if self.data == "full" else av.QUICK
        _, hidden, layers = size
        return dataclasses.replace(
            base, hidden_size=hidden, num_layers=layers, batch_size=self.batch_size, lr=self.lr,
            warmup_steps=self.warmup_steps, total_steps=total_steps or self.total_steps,
            seed=seed, ckpt_every=self.ckpt_every, shard_blocks=self.shard_blocks,
            eval_batch_size=self.eval_batch_size)

    def run_key(self, size: tuple[str, int, int], seed: int) -> str:
        keys = ("data", "batch_size", "lr", "warmup_steps", "total_steps", "ckpt_every",
                "user_ema_decays", "power_grid", "branch_targets", "track_sigmas",
                "snapshot_every")
        return av._digest({"size": size, "seed": seed, **{k: getattr(self, k) for k in keys}})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FULL = AnytimeConfig(name="full")
QUICK = AnytimeConfig(
    name="quick", data="quick", sizes=(("example", 32, 2), ("4x", 64, 2)), seeds=(0,),
    shard_blocks=16, eval_batch_size=16, batch_size=8, lr=3e-3, warmup_steps=4, total_steps=40,
    ckpt_every=8, user_ema_decays=(0.8, 0.9, 0.95, 0.98, 0.99), power_grid=(0.05, 0.12, 0.25),
    recon_check=(0.12,), fixed_ks=(2,), pairwise_budget=4, branch_targets=(40,),
    snapshot_every=2, window_range=(2, 4), budget_phema=3, budget_window=2, budget_pairwise=2,
    budget_blend=3)

MODE = """\
Recommended mode (`averaging="auto"`), fixed before the runs:

* host memory: two power-function EMA tracks, σ_rel = 0.05 and 0.15 (γ ≈ 16.97 and 3.56),
  updated every `snapshot_every = 10` steps with the exact n-step fold — 2 model copies (fp32);
  the previous save is read from disk, not kept;
* disk: at every save, one snapshot of each track and the raw weights (3 × the model's fp32 bytes
  per save), pruned to the 16 newest per kind plus one per octave of steps;
* each round (budget 12 held-out evaluations on the selection data, searched with
  `search_interval`): the latest weights (1); post-hoc EMA with log σ_rel ∈ [log 0.02, log 0.28],
  rebuilt by least squares over every stored track snapshot (5); a 1−√ window over the last W
  saves, W ∈ [2, 16] rounded to an integer (3); the pairwise soup λ ∈ [0.5, 1] (3, λ = 1 being
  the latest: 2 new); the best of these blended with the latest weights, μ ∈ [0, 1] (1 new).
  The soup is the best observed candidate on the selection data.
"""


# --------------------------------------------------------------------------- training


def _float_sd(pl_module) -> dict[str, Tensor]:
    return {k: v for k, v in pl_module.state_dict().items() if v.is_floating_point()}


class Recorder(L.Callback):
    """The mode's tracks and snapshots, the exact per-step power-function EMAs, branch states.

    Args:
        cfg: the benchmark configuration.
        folder: the run's folder (``snaps/``, ``pgrid/``, ``branch/``).
    """

    def __init__(self, cfg: AnytimeConfig, folder: Path):
        self.cfg = cfg
        self.folder = folder
        self.store = SnapshotStore(folder / "snaps", keep=None)
        self.tracks = [PowerEmaTrack(s) for s in cfg.track_sigmas]
        self.grid = [PowerEmaTrack(s) for s in cfg.power_grid]
        self.track_seconds = 0.0
        self.snapshot_seconds = 0.0
        self.branch_steps = {int(round(0.8 * t)): t for t in cfg.branch_targets}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        sd = None
        with torch.no_grad():
            sd = _float_sd(pl_module)
            for g in self.grid:
                g.update(step, sd)
            if step % self.cfg.snapshot_every == 0 or step % self.cfg.ckpt_every == 0:
                t0 = time.perf_counter()
                for tr in self.tracks:
                    tr.update(step, sd)
                self.track_seconds += time.perf_counter() - t0
        if step % self.cfg.ckpt_every == 0:
            t0 = time.perf_counter()
            self.store.put(step, "raw", sd)
            for tr in self.tracks:
                self.store.put(step, f"phema{tr.sigma_rel:g}", tr.tensors,
                               {"gamma": tr.gamma, "sigma_rel": tr.sigma_rel,
                                "every": self.cfg.snapshot_every})
            self.snapshot_seconds += time.perf_counter() - t0
            if step in self.cfg.late_steps:
                for g in self.grid:
                    save_safetensors_atomic(self.folder / "pgrid" / f"p{g.sigma_rel:g}-step{step:06d}"
                                            ".safetensors", g.tensors)
        if step in self.branch_steps:
            trainer.save_checkpoint(str(self.folder / "branch" / f"state-step{step:06d}.ckpt"))


def _trainer(cfg, max_steps: int, folder: Path, callbacks) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False,
                     gradient_clip_val=cfg.gradient_clip, default_root_dir=str(folder),
                     callbacks=callbacks)


def train_run(cfg: AnytimeConfig, size, seed: int, data, folder: Path) -> dict[str, Any]:
    """The constant-LR run with its recorders, then the warmup-stable-decay branches (cached)."""
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset

    meta_path = folder / "meta.json"
    if meta_path.exists():
        return {**json.loads(meta_path.read_text()), "reused": True}
    if folder.exists():
        shutil.rmtree(folder)
    acfg = cfg.avg_config(size, seed)
    L.seed_everything(seed, verbose=False)
    module = av.make_module(acfg, "constant")
    loader = DataLoader(BlockDataset(data.train), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(seed))
    rec = Recorder(cfg, folder)
    ema = av.PerStepEMA(cfg.user_ema_decays, save_every=cfg.ckpt_every, save_dir=folder / "ema")
    t0 = time.perf_counter()
    _trainer(acfg, cfg.total_steps, folder, [rec, ema]).fit(module, loader)
    seconds = time.perf_counter() - t0
    branches = {}
    for t in cfg.branch_targets:
        b0 = time.perf_counter()
        bcfg = cfg.avg_config(size, seed, total_steps=t)
        L.seed_everything(seed + 1000 + t, verbose=False)
        bmod = av.make_module(bcfg, "wsd")
        bloader = DataLoader(BlockDataset(data.train), batch_size=cfg.batch_size, shuffle=True,
                             drop_last=True, generator=torch.Generator().manual_seed(seed + t))
        ck = folder / "branch" / f"state-step{int(round(0.8 * t)):06d}.ckpt"
        lrs: list[float] = []

        class _LR(L.Callback):
            def on_train_batch_start(self, trainer, *a) -> None:
                lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        _trainer(bcfg, t, folder, [_LR()]).fit(bmod, bloader, ckpt_path=str(ck))
        save_safetensors_atomic(folder / "branch" / f"wsd-end{t:06d}.safetensors",
                                bmod.state_dict())
        branches[str(t)] = {"from_step": int(round(0.8 * t)), "steps": len(lrs),
                            "lr_first": lrs[0], "lr_last": lrs[-1],
                            "seconds": time.perf_counter() - b0}
    meta = {"size": size, "seed": seed, "train_seconds": seconds,
            "parameters": sum(p.numel() for p in module.model.parameters()),
            "model_bytes_fp32": 4 * sum(v.numel() for v in _float_sd(module).values()),
            "track_update_seconds": rec.track_seconds, "snapshot_write_seconds":
            rec.snapshot_seconds, "snapshot_bytes_per_save": sum(
                e.nbytes for e in rec.store.entries() if e.step == cfg.total_steps),
            "branches": branches, "reused": False}
    atomic_write_json(meta_path, meta)
    return meta


# --------------------------------------------------------------------------- analysis


class Combiner:
    """Weighted sums of stored snapshots as full state dicts (fp32 accumulation), memoised."""

    def __init__(self, template: Mapping[str, Tensor]):
        self.template = {k: v.clone() for k, v in template.items()}
        self.floats = [k for k, v in template.items() if v.is_floating_point()]
        self.bytes_read = 0
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, weighted) -> dict[str, Tensor]:
        merged: dict[Any, float] = {}
        for e, w in weighted:
            merged[e] = merged.get(e, 0.0) + float(w)
        out = {k: torch.zeros_like(self.template[k], dtype=torch.float32) for k in self.floats}
        st = SnapshotStore.accumulate_into_(out, list(merged.items()))
        self.bytes_read += st.bytes_read
        self.seconds += st.seconds
        self.calls += 1
        sd = dict(self.template)
        for k in self.floats:
            sd[k] = out[k].to(self.template[k].dtype)
        return sd


def analyse_run(cfg: AnytimeConfig, size, seed: int, data, folder: Path) -> dict[str, Any]:
    from merge_callback.io import load_state_dict

    acfg = cfg.avg_config(size, seed)
    shards = {s: data.shards[s][: cfg.shard_blocks] for s in SHARDS}
    scorer = av.Scorer(acfg, shards)
    store = SnapshotStore(folder / "snaps", keep=None)
    entries = store.entries()
    raw = {e.step: e for e in entries if e.kind == "raw"}
    tracks = [e for e in entries if e.kind.startswith("phema")]
    gammas = {e.kind: float(e.metadata()["info"]["gamma"]) for e in tracks}
    template = scorer.module.state_dict()
    comb = Combiner(template)
    sd_cache: dict[Any, dict[str, Tensor]] = {}
    rows = []
    t_start = time.perf_counter()
    E = cfg.ckpt_every

    for t in cfg.late_steps:
        sd_cache.clear()
        round_eval = {"n": 0}
        row: dict[str, Any] = {"step": t, "loss": {}, "choice": {}}

        def sd_of(key, weighted):
            if key not in sd_cache:
                sd_cache[key] = comb(weighted)
            return sd_cache[key]

        def score(key, weighted, shard):
            if (key, shard) not in scorer.memo and shard == "sel":
                round_eval["n"] += 1
            return scorer(sd_of(key, weighted), shard, key)

        latest_w = [(raw[t], 1.0)]

        def ph_weighted(sigma):
            snaps = [e for e in tracks if e.step <= t]
            c = reconstruction_weights([e.step for e in snaps], [gammas[e.kind] for e in snaps],
                                       sigma, t)
            return list(zip(snaps, c.tolist()))

        def win_weighted(W, kind=cfg.window_kind):
            W = max(1, min(int(W), t // E))
            w = window_weights(kind, W)
            return [(raw[t - (W - 1 - i) * E], w[i]) for i in range(W)]

        def pair_weighted(lam):
            return [(raw[t - E], 1.0 - lam), (raw[t], lam)]

        # ---------------- the recommended mode (selection shard only)
        cands: dict[Any, tuple[float, list]] = {}

        def cand(key, weighted):
            v = score(key, weighted, "sel")
            cands[key] = (v, weighted)
            return v

        cand(("latest", t), latest_w)
        lo, hi = (math.log(x) for x in cfg.sigma_range)
        r_ph = search_interval(lambda x: cand(("ph", t, round(math.exp(x), 5)),
                                              ph_weighted(round(math.exp(x), 5))),
                               lo, hi, budget=cfg.budget_phema, seed=t)
        wlo, whi = cfg.window_range
        r_win = search_interval(lambda x: cand(("win", t, int(round(x))),
                                               win_weighted(int(round(x)))),
                                wlo, whi, budget=cfg.budget_window, seed=t)
        r_pair = search_interval(
            lambda lam: cand(("latest", t), latest_w) if round(lam, 12) == 1.0 else
            cand(("pair", t, round(lam, 6)), pair_weighted(round(lam, 6))),
            0.5, 1.0, budget=cfg.budget_pairwise, seed=t)
        best_key = min((k for k in cands if k[0] != "latest"), key=lambda k: cands[k][0])
        best_w = cands[best_key][1]

        def blend(mu):
            mu = round(mu, 6)
            if mu == 0.0:
                return cand(("latest", t), latest_w)
            if mu == 1.0:
                return cand(best_key, best_w)
            return cand(("blend", best_key, mu), [(e, mu * w) for e, w in best_w]
                        + [(raw[t], 1.0 - mu)])

        search_interval(blend, 0.0, 1.0, budget=cfg.budget_blend, seed=t,
                        known={0.0: cands[("latest", t)][0], 1.0: cands[best_key][0]})
        row["mode_sel_evaluations"] = round_eval["n"]
        # the mode and its ablations (each = best observed candidate of its families)
        variants = {
            "mode": list(cands),
            "phema_only": [k for k in cands if k[0] in ("latest", "ph")],
            "window_only": [k for k in cands if k[0] in ("latest", "win")],
            "phema+window": [k for k in cands if k[0] in ("latest", "ph", "win")],
        }
        for name, keys in variants.items():
            k = min(keys, key=lambda k: cands[k][0])
            row["choice"][name] = {"key": list(map(str, k)), "sel": cands[k][0],
                                   "weights": {f"{e.kind}@{e.step}": w for e, w in cands[k][1]}}
            row["loss"][name] = {"sel": cands[k][0], "test": score(k, cands[k][1], "test")}
        row["choice"]["mode"]["phema_sigma"] = math.exp(r_ph.lam)
        row["choice"]["mode"]["window_W"] = int(round(r_win.lam))
        row["choice"]["mode"]["pair_lambda"] = r_pair.lam
        row["loss"]["latest"] = {s: score(("latest", t), latest_w, s) for s in SHARDS}

        # ---------------- (a) per-step EMA, (b) exact per-step power EMA
        for d in cfg.user_ema_decays:
            key = ("ema", d, t)
            sd = load_state_dict(folder / "ema" / f"ema{d:g}-step{t:06d}.safetensors")
            row["loss"][f"ema{d:g}"] = {"test": scorer(sd, "test", key)}
        exact: dict[float, dict[str, Tensor]] = {}
        for sg in cfg.power_grid:
            key = ("pgrid", sg, t)
            f = load_state_dict(folder / "pgrid" / f"p{sg:g}-step{t:06d}.safetensors")
            sd = {k: f.get(k, v) for k, v in template.items()}
            exact[sg] = f
            row["loss"][f"pexact{sg:g}"] = {"test": scorer(sd, "test", key)}
        # ---------------- reconstruction accuracy
        acc = {}
        snaps = [e for e in tracks if e.step <= t]
        for sg in cfg.power_grid:
            c = reconstruction_weights([e.step for e in snaps], [gammas[e.kind] for e in snaps],
                                       sg, t)
            rebuilt_w = reconstructed_step_weights([e.step for e in snaps],
                                                   [gammas[e.kind] for e in snaps], c,
                                                   every=cfg.snapshot_every, length=t)
            exact_w = power_ema_step_weights(t, sigma_rel_to_gamma(sg))
            ls_w = reconstructed_step_weights([e.step for e in snaps],
                                              [gammas[e.kind] for e in snaps], c, every=1,
                                              length=t)
            rb = sd_of(("ph", t, round(sg, 5)), ph_weighted(round(sg, 5)))
            dparam = max(float((rb[k].float() - exact[sg][k].float()).abs().max())
                         for k in exact[sg])
            scale = max(float(exact[sg][k].float().abs().max()) for k in exact[sg])
            a = {"max_weight_error": float(np.abs(rebuilt_w - exact_w).max()),
                 "max_exact_weight": float(exact_w.max()),
                 "l1_weight_error": float(np.abs(rebuilt_w - exact_w).sum()),
                 "ls_max_weight_error": float(np.abs(ls_w - exact_w).max()),
                 "ls_l1_weight_error": float(np.abs(ls_w - exact_w).sum()),
                 "max_param_diff": dparam, "max_param_abs": scale,
                 "coefficients": {f"{e.kind}@{e.step}": float(x) for e, x in zip(snaps, c)}}
            if sg in cfg.recon_check:
                a["test_loss_rebuilt"] = score(("ph", t, round(sg, 5)),
                                               ph_weighted(round(sg, 5)), "test")
                a["test_loss_exact"] = row["loss"][f"pexact{sg:g}"]["test"]
            acc[f"{sg:g}"] = a
        row["reconstruction"] = acc
        # ---------------- (c) LAWA and WSM 1-sqrt at fixed k, (d) pairwise
        for k in cfg.fixed_ks:
            if t // E >= k:
                row["loss"][f"lawa{k}"] = {"test": score(("win", t, k, "uniform"),
                                                         win_weighted(k, "uniform"), "test")}
                row["loss"][f"wsm{k}"] = {"test": score(("win", t, k),
                                                        win_weighted(k), "test")}

        def pair_obj(lam):
            lam = round(float(lam), 6)
            if lam == 1.0:
                return score(("latest", t), latest_w, "sel")
            return score(("pair", t, lam), pair_weighted(lam), "sel")

        rp = search_lambda(pair_obj, alpha=0.5, budget=cfg.pairwise_budget, strategy="bayes",
                           acq_func="gp_hedge", seed=t)
        lam = round(float(rp.lam), 6)
        pk, pw = ((("latest", t), latest_w) if lam == 1.0 else
                  (("pair", t, lam), pair_weighted(lam)))
        row["loss"]["pairwise"] = {"sel": rp.value, "test": score(pk, pw, "test")}
        row["pairwise_lambda"] = lam
        # ---------------- hindsight choices
        hs = {}
        for fam, names in (("ema", [f"ema{d:g}" for d in cfg.user_ema_decays]),
                           ("pexact", [f"pexact{s:g}" for s in cfg.power_grid])):
            oracle = min(names, key=lambda n: row["loss"][n]["test"])
            hs[fam] = {"oracle": oracle}
            row["loss"][f"best_{fam}_oracle"] = {"test": row["loss"][oracle]["test"]}
        row["hindsight"] = hs
        # ---------------- anytime annealed
        if t in cfg.branch_targets:
            bsd = load_state_dict(folder / "branch" / f"wsd-end{t:06d}.safetensors")
            row["loss"]["wsd_branch"] = {"test": scorer(bsd, "test", ("wsd", t))}
        rows.append(row)
        log(f"  {size[0]} seed {seed} step {t}: latest {row['loss']['latest']['test']:.4f} "
            f"mode {row['loss']['mode']['test']:.4f} ({row['choice']['mode']['key'][0]}) best "
            f"EMA {row['loss']['best_ema_oracle']['test']:.4f} [{scorer.evaluations} evals, "
            f"{time.perf_counter() - t_start:.0f} s]")
    return {"rows": rows, "evaluations": scorer.evaluations, "eval_seconds": scorer.seconds,
            "reconstruct_seconds": comb.seconds, "bytes_read": comb.bytes_read,
            "combinations": comb.calls, "analysis_seconds": time.perf_counter() - t_start}


# --------------------------------------------------------------------------- summary


COMPARE = (("best_ema_oracle", "(a) best per-step EMA, decay chosen on the test shard itself"),
           ("best_pexact_oracle", "(b) best exact power EMA, σ_rel chosen on the test shard"),
           ("lawa4", "(c) LAWA, last 4 saves"), ("lawa8", "(c) LAWA, last 8 saves"),
           ("wsm4", "(c) WSM 1−√, last 4 saves"), ("wsm8", "(c) WSM 1−√, last 8 saves"),
           ("pairwise", "(d) pairwise soup"), ("latest", "(e) latest"))


def summarise(cfg: AnytimeConfig, runs: Sequence[Mapping[str, Any]], method: str = "mode"
              ) -> dict[str, Any]:
    out = {}
    for other, _ in COMPARE:
        gaps = [r["loss"][method]["test"] - r["loss"][other]["test"]
                for run in runs for r in run["rows"] if other in r["loss"]]
        out[other] = {"n": len(gaps), "wins": sum(g < 0 for g in gaps),
                      "mean_gap": float(np.mean(gaps)) if gaps else math.nan,
                      "worst_gap": float(max(gaps)) if gaps else math.nan}
    return out


def report(cfg: AnytimeConfig, results: Mapping[str, Any], cost: Mapping[str, Any] | None,
           wall: float) -> str:
    L_ = [f"# Anytime averaging: post-hoc EMA and decay-shaped windows ({cfg.name} settings)", "",
          f"Generated by `python benchmarks/anytime.py{' --quick' if cfg.name == 'quick' else ''}`."
          " Every number below was measured in this run.", "", "## Method (fixed before the runs)",
          ""]
    sizes = ", ".join(f"`{s[0]}` (hidden {s[1]}, {s[2]} layers, "
                      f"{results[s[0]]['runs'][0]['meta']['parameters']:,} parameters)"
                      for s in cfg.sizes)
    a0 = cfg.avg_config(cfg.sizes[0], 0)
    L_ += [f"* Models: Pythia-architecture GPT-NeoX (`tiny_gpt_neox`, vocab {a0.vocab_size}, "
           f"context {a0.block_size}): "
           f"{sizes}; seeds {cfg.seeds}. AdamW lr {cfg.lr:g}, {cfg.warmup_steps} warmup steps, "
           f"then constant; batch {cfg.batch_size}×{a0.block_size} tokens; {cfg.total_steps} steps; Shakespeare "
           "training split (averaging.py's data).",
           f"* Saves every {cfg.ckpt_every} steps; late saves = after step {cfg.total_steps // 2} "
           f"({len(cfg.late_steps)} per run, {len(cfg.late_steps) * len(cfg.seeds)} per size).",
           f"* Shards: {cfg.shard_blocks} blocks × {a0.block_size} tokens each: selection = the first "
           f"{cfg.shard_blocks} blocks of averaging.py's selection shard (Macbeth / opening of "
           "Julius Caesar), test = the first blocks of its second in-domain shard (rest of Julius "
           "Caesar). Every choice of the mode and of (d) is made on the selection shard; "
           "(a) and (b) are chosen in hindsight on the test shard itself (the strongest form); "
           "every number compared below is on the test shard.",
           f"* (a) exact per-step EMA (first update copies) for decays {cfg.user_ema_decays}; "
           f"(b) exact per-step power-function EMA for σ_rel {cfg.power_grid}; (c) LAWA (uniform) "
           f"and WSM 1−√ weights over the last k saves, k ∈ {cfg.fixed_ks}; (d) pairwise soup of "
           f"the previous and latest save, λ ∈ [0.5, 1] by `search_lambda` (GP-hedge, budget "
           f"{cfg.pairwise_budget}) on the selection shard; (e) the latest weights.",
           "* Anytime annealed: for t ∈ " f"{cfg.branch_targets}, a run branched from the constant "
           "run's trainer state (weights, AdamW state) at 0.8·t with the package's warmup-stable-"
           "decay schedule (linear decay to 0.1× lr over its last 0.2·t steps, ending at t).",
           "* \"Beats\" = strictly lower test loss.", "", MODE, ""]
    L_ += ["## Results: the recommended mode's soup vs the baselines (test shard, late saves)", ""]
    for size in cfg.sizes:
        res = results[size[0]]
        L_ += [f"### `{size[0]}` ({res['runs'][0]['meta']['parameters']:,} parameters), "
               f"{len(cfg.seeds)} seeds", "",
               "| mode vs | wins | mean gap (nats) | worst gap |", "|---|---|---|---|"]
        for other, title in COMPARE:
            c = res["summary"]["mode"][other]
            if c["n"]:
                L_.append(f"| {title} | {c['wins']}/{c['n']} | {c['mean_gap']:+.4f} | "
                          f"{c['worst_gap']:+.4f} |")
        edge = {fam: sum(r["hindsight"][fam]["oracle"] == first for run in res["runs"]
                         for r in run["rows"])
                for fam, first in (("ema", f"ema{cfg.user_ema_decays[0]:g}"),
                                   ("pexact", f"pexact{cfg.power_grid[0]:g}"))}
        n_late = sum(len(run["rows"]) for run in res["runs"])
        fams: dict[str, int] = {}
        for run in res["runs"]:
            for r in run["rows"]:
                f = r["choice"]["mode"]["key"][0]
                fams[f] = fams.get(f, 0) + 1
        L_ += ["", f"The hindsight decay of (a) was the shortest of the grid "
               f"({cfg.user_ema_decays[0]:g}) at {edge['ema']}/{n_late} late saves; the hindsight "
               f"σ_rel of (b) was the smallest of its grid ({cfg.power_grid[0]:g}) at "
               f"{edge['pexact']}/{n_late}. Families the mode chose at the late saves: {fams} "
               "(`blend` = a post-hoc EMA blended with the latest weights)."]
        L_ += ["", "Ablations (same rounds, families restricted; vs (a) oracle / (c) WSM 4 / "
               "(e) latest):", "", "| variant | vs (a) | vs (b) | vs WSM4 | vs latest | mean test loss |",
               "|---|---|---|---|---|---|"]
        for v in ("mode", "phema_only", "window_only", "phema+window"):
            s = res["summary"][v]
            tl = np.mean([r["loss"][v]["test"] for run in res["runs"] for r in run["rows"]])
            L_.append(f"| {v} | {s['best_ema_oracle']['wins']}/{s['best_ema_oracle']['n']} "
                      f"({s['best_ema_oracle']['mean_gap']:+.4f}) | "
                      f"{s['best_pexact_oracle']['wins']}/{s['best_pexact_oracle']['n']} "
                      f"({s['best_pexact_oracle']['mean_gap']:+.4f}) | "
                      f"{s['wsm4']['wins']}/{s['wsm4']['n']} ({s['wsm4']['mean_gap']:+.4f}) | "
                      f"{s['latest']['wins']}/{s['latest']['n']} ({s['latest']['mean_gap']:+.4f})"
                      f" | {tl:.4f} |")
        L_ += ["", "Per late save (test loss; mode's choice on the selection shard):", "",
               "| seed | step | latest | mode | choice | best EMA (a) | best power EMA (b) | "
               "LAWA4 | WSM4 | pairwise | WSD branch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for run in res["runs"]:
            for r in run["rows"]:
                lo = r["loss"]
                ch = r["choice"]["mode"]
                hs = r["hindsight"]
                L_.append(
                    f"| {run['meta']['seed']} | {r['step']} | {lo['latest']['test']:.4f} | "
                    f"**{lo['mode']['test']:.4f}** | {' '.join(ch['key'][:1] + ch['key'][2:])} | "
                    f"{lo['best_ema_oracle']['test']:.4f} ({hs['ema']['oracle'][3:]}) | "
                    f"{lo['best_pexact_oracle']['test']:.4f} ({hs['pexact']['oracle'][6:]}) | "
                    + " | ".join(f"{lo[n]['test']:.4f}" if n in lo else "—"
                                 for n in ("lawa4", "wsm4", "pairwise", "wsd_branch")) + " |")
        L_.append("")
        # where not
        misses = []
        for run in res["runs"]:
            for r in run["rows"]:
                lo = r["loss"]
                for other in ("best_ema_oracle", "lawa4", "lawa8", "wsm4", "wsm8", "pairwise",
                              "latest"):
                    if other in lo and lo["mode"]["test"] >= lo[other]["test"]:
                        misses.append(f"| {run['meta']['seed']} | {r['step']} | {other} | "
                                      f"{lo['mode']['test'] - lo[other]['test']:+.4f} | "
                                      f"{' '.join(r['choice']['mode']['key'])} (sel "
                                      f"{r['choice']['mode']['sel']:.4f}) |")
        if misses:
            L_ += ["Late saves where the mode did not beat a baseline (gap = mode − baseline, "
                   "test):", "", "| seed | step | baseline | gap | mode's choice |",
                   "|---|---|---|---|---|"] + misses + [""]
        # anytime annealed
        ann = [(run["meta"]["seed"], r["step"], r["loss"]["wsd_branch"]["test"],
                r["loss"]["mode"]["test"], r["loss"]["latest"]["test"])
               for run in res["runs"] for r in run["rows"] if "wsd_branch" in r["loss"]]
        if ann:
            L_ += ["Anytime annealed (test): constant-LR soup at t vs the WSD run branched at 0.8·t "
                   "and ending at t:", "", "| seed | t | WSD branch | mode soup | latest (constant) "
                   "| soup − WSD |", "|---|---|---|---|---|---|"]
            L_ += [f"| {s} | {t} | {w:.4f} | {m:.4f} | {la:.4f} | {m - w:+.4f} |"
                   for s, t, w, m, la in ann] + [""]
        # reconstruction accuracy
        L_ += ["Reconstruction accuracy (rebuilt from the two tracks' snapshots at every save, "
               f"tracks updated every {cfg.snapshot_every} steps, vs the exact per-step power EMA; "
               "worst over late saves and seeds):", "",
               "Weight errors: the tracks' updates every "
               f"{cfg.snapshot_every} steps put each {cfg.snapshot_every}-step block's mass on its "
               "last iterate, so a per-iterate comparison with the per-step EMA mostly measures "
               "that folding (first two columns); the block column sums the weights per block "
               "(the fold is exact per block, so it is the error of the fit); the least-squares "
               "columns apply the same coefficients to per-step profiles.", "",
               "| σ_rel | per-iterate max error (max exact weight) | per-iterate L1 | per-block "
               "L1 | least-squares max / L1 | max param diff (max |param|) | test loss rebuilt − "
               "exact (mean, worst abs) |", "|---|---|---|---|---|---|---|"]
        for sg in cfg.power_grid:
            accs = [r["reconstruction"][f"{sg:g}"] for run in res["runs"] for r in run["rows"]]
            blk = [block_weight_error(cfg, r["step"], sg, r["reconstruction"][f"{sg:g}"]
                                      ["coefficients"]) for run in res["runs"] for r in run["rows"]]
            dl = [a["test_loss_rebuilt"] - a["test_loss_exact"] for a in accs
                  if "test_loss_rebuilt" in a]
            L_.append(f"| {sg:g} | {max(a['max_weight_error'] for a in accs):.2e} "
                      f"({max(a['max_exact_weight'] for a in accs):.2e}) | "
                      f"{max(a['l1_weight_error'] for a in accs):.3f} | {max(blk):.3f} | "
                      f"{max(a['ls_max_weight_error'] for a in accs):.2e} / "
                      f"{max(a['ls_l1_weight_error'] for a in accs):.3f} | "
                      f"{max(a['max_param_diff'] for a in accs):.2e} "
                      f"({max(a['max_param_abs'] for a in accs):.2f}) | "
                      + (f"{np.mean(dl):+.5f}, {max(map(abs, dl)):.5f}" if dl else "—") + " |")
        metas = [run["meta"] for run in res["runs"]]
        an = res["runs"]
        L_ += ["", f"Cost (`{size[0]}`, per run, mean of {len(metas)}): training "
               f"{np.mean([m['train_seconds'] for m in metas]):.0f} s, of which track updates "
               f"{np.mean([m['track_update_seconds'] for m in metas]):.2f} s and snapshot writes "
               f"{np.mean([m['snapshot_write_seconds'] for m in metas]):.2f} s; snapshots "
               f"{metas[0]['snapshot_bytes_per_save'] / 1e6:.1f} MB per save (3 × "
               f"{metas[0]['model_bytes_fp32'] / 1e6:.1f} MB); analysis: reconstructing "
               f"{np.mean([a['reconstruct_seconds'] for a in an]):.1f} s for "
               f"{np.mean([a['combinations'] for a in an]):.0f} combinations "
               f"({np.mean([a['bytes_read'] for a in an]) / 1e9:.2f} GB read), "
               f"{np.mean([a['evaluations'] for a in an]):.0f} held-out evaluations "
               f"{np.mean([a['eval_seconds'] for a in an]):.0f} s.", ""]
    if cost:
        L_ += ["## Cost at 160M parameters (CPU)", "", *cost_lines(cost), ""]
    L_ += ["## Environment", "", f"Wall time of this invocation {wall:.0f} s. "
           + ", ".join(f"{k} {v}" for k, v in av.environment().items()), ""]
    return "\n".join(L_)


def block_weight_error(cfg: AnytimeConfig, t: int, sigma: float,
                       coefficients: Mapping[str, float]) -> float:
    """L1 distance between the rebuilt and the exact per-step profile, per block of
    ``snapshot_every`` steps (the blocks the tracks' updates fold exactly)."""
    items = [(k.split("@")[0], int(k.split("@")[1]), c) for k, c in coefficients.items()]
    steps = [s for _, s, _ in items]
    gammas = [sigma_rel_to_gamma(float(k[len("phema"):])) for k, _, _ in items]
    rb = reconstructed_step_weights(steps, gammas, [c for *_, c in items],
                                    every=cfg.snapshot_every, length=t)
    ex = power_ema_step_weights(t, sigma_rel_to_gamma(sigma))
    n = cfg.snapshot_every
    pad = (-t) % n
    blocks = lambda w: np.concatenate([np.zeros(pad), w]).reshape(-1, n).sum(1)  # noqa: E731
    return float(np.abs(blocks(rb) - blocks(ex)).sum())


def plot(cfg: AnytimeConfig, results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfg.sizes), figsize=(6 * len(cfg.sizes), 4.2), squeeze=False)
    methods = [("mode", "mode soup", dict(color="black", lw=2.2, marker="o", ms=3)),
               ("best_ema_oracle", "(a) best EMA (oracle)", dict(color="tab:blue")),
               ("best_pexact_oracle", "(b) best power EMA (oracle)", dict(color="tab:purple")),
               (f"wsm{cfg.fixed_ks[0]}", f"(c) WSM 1−√ k={cfg.fixed_ks[0]}",
                dict(color="tab:green", ls="-.")),
               (f"lawa{cfg.fixed_ks[0]}", f"(c) LAWA k={cfg.fixed_ks[0]}",
                dict(color="tab:olive", ls="-.")),
               ("pairwise", "(d) pairwise", dict(color="tab:red", ls="--"))]
    for j, size in enumerate(cfg.sizes):
        ax = axes[0][j]
        runs = results[size[0]]["runs"]
        for key, label, st in methods:
            xs = cfg.late_steps
            rows_at = [[r for run in runs for r in run["rows"] if r["step"] == t] for t in xs]
            pts = [(t, np.mean([r["loss"][key]["test"] - r["loss"]["latest"]["test"]
                                for r in rs])) for t, rs in zip(xs, rows_at)
                   if rs and all(key in r["loss"] for r in rs)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label, **st)
        for k, t in enumerate(cfg.branch_targets):
            vals = [[r for r in run["rows"] if r["step"] == t][0]["loss"]
                    for run in runs if any(r["step"] == t for r in run["rows"])]
            if vals:
                y = np.mean([v["wsd_branch"]["test"] - v["latest"]["test"] for v in vals])
                ax.scatter([t], [y], marker="*", s=140, color="tab:orange", zorder=5,
                           label="WSD run ending at t (branched at 0.8·t)" if k == 0 else None)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(f"{size[0]} ({runs[0]['meta']['parameters']:,} params), mean of "
                     f"{len(runs)} seeds", fontsize=10)
        ax.set_xlabel("step (late saves)")
        ax.set_ylabel("test loss − latest (nats)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Constant-LR soups and the annealed run ending at t\n(test loss minus the "
                 "latest weights'; below 0 = better)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- 160M cost


def cost_benchmark(folder: Path, n_params: int = 160_000_000, n_saves: int = 4,
                   tensors: int = 16) -> dict[str, Any]:
    """Write/read/reconstruct timings for a 160M-parameter fp32 state dict on the CPU."""
    if folder.exists():
        shutil.rmtree(folder)
    store = SnapshotStore(folder, keep=None)
    g = torch.Generator().manual_seed(0)
    per = n_params // tensors
    live = {f"w{i}": torch.randn(per, generator=g) for i in range(tensors)}
    tracks = [PowerEmaTrack(s) for s in (0.05, 0.15)]
    out: dict[str, Any] = {"parameters": per * tensors, "model_bytes": 4 * per * tensors}
    upd = []
    write = []
    step = 0
    for s in range(n_saves):
        for _ in range(2):
            step += 10
            for v in live.values():
                v.add_(torch.randn(per, generator=g), alpha=0.01)
            t0 = time.perf_counter()
            for tr in tracks:
                tr.update(step, live)
            upd.append((time.perf_counter() - t0) / len(tracks))
        t0 = time.perf_counter()
        for tr in tracks:
            store.put(step, f"phema{tr.sigma_rel:g}", tr.tensors, {"gamma": tr.gamma})
        write.append((time.perf_counter() - t0) / len(tracks))
    out["track_update_seconds_per_track"] = float(np.median(upd[1:]))
    out["snapshot_write_seconds_per_file"] = float(np.median(write))
    entries = store.entries()
    out["snapshot_file_bytes"] = entries[0].nbytes
    gam = {e.kind: sigma_rel_to_gamma(float(e.kind[5:])) for e in entries}
    t0 = time.perf_counter()
    c = reconstruction_weights([e.step for e in entries], [gam[e.kind] for e in entries], 0.1,
                               step)
    out["solve_seconds"] = time.perf_counter() - t0
    acc = {k: torch.zeros_like(v) for k, v in live.items()}
    st = SnapshotStore.accumulate_into_(acc, list(zip(entries, c.tolist())))
    out["reconstruct_all"] = dataclasses.asdict(st)
    out["reconstruct_all"]["snapshots"] = len(entries)
    st2 = SnapshotStore.accumulate_into_(acc, list(zip(entries[-4:], [0.25] * 4)))
    out["window4"] = dataclasses.asdict(st2)
    out["read_gb_per_s"] = st.bytes_read / st.seconds / 1e9
    out["note"] = ("files were just written, so reads are served from the page cache "
                   "(warm); a cold read is bounded by the disk's bandwidth")
    shutil.rmtree(folder)
    return out


def cost_lines(c: Mapping[str, Any]) -> list[str]:
    r = c["reconstruct_all"]
    return [f"* {c['parameters'] / 1e6:.0f}M fp32 parameters ({c['model_bytes'] / 1e9:.2f} GB per "
            f"copy); one snapshot file {c['snapshot_file_bytes'] / 1e9:.2f} GB on disk (the mode "
            f"writes 3 per save: {3 * c['snapshot_file_bytes'] / 1e9:.2f} GB).",
            f"* Track update (fused `_foreach_lerp_`, one track): "
            f"{c['track_update_seconds_per_track']:.2f} s per update (every `snapshot_every` "
            "steps; zero on other steps).",
            f"* Snapshot write (atomic safetensors): {c['snapshot_write_seconds_per_file']:.2f} s "
            "per file.",
            f"* Least-squares solve over {r['snapshots']} snapshots: {c['solve_seconds'] * 1e3:.2f} ms.",
            f"* Reconstruction from {r['snapshots']} snapshots (each read once, one tensor at a "
            f"time, fp32 accumulation): {r['seconds']:.2f} s, {r['bytes_read'] / 1e9:.2f} GB read "
            f"({c['read_gb_per_s']:.2f} GB/s), {r['files_skipped']} skipped as negligible.",
            f"* A 4-save window: {c['window4']['seconds']:.2f} s, "
            f"{c['window4']['bytes_read'] / 1e9:.2f} GB read.",
            f"* {c['note']}."]


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (files named *_quick*)")
    p.add_argument("--cost", action="store_true", help="only the 160M cost micro-benchmark")
    p.add_argument("--sizes", nargs="+", default=None, help="subset of the size labels")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="subset of the seeds")
    p.add_argument("--out", default=str(_ROOT / "benchmarks" / "results"))
    p.add_argument("--cache", default=None, help="folder for data and runs (default: averaging.py's)")
    p.add_argument("--reanalyse", action="store_true", help="evaluate cached runs again")
    p.add_argument("--stage", choices=("all", "train", "analyse"), default="all",
                   help="train: only train (cached); analyse: analyse each run once its training "
                        "is cached (waits for it), then report; all: both in one process")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).expanduser() if args.cache else av.default_cache()
    t0 = time.perf_counter()
    if args.cost:
        c = cost_benchmark(cache / "anytime-cost")
        atomic_write_json(out / "anytime_cost.json", c)
        atomic_write_bytes(out / "anytime_cost.md", ("# Post-hoc averaging cost at 160M "
                                                     "parameters (CPU)\n\nGenerated by `python "
                                                     "benchmarks/anytime.py --cost`.\n\n"
                                                     + "\n".join(cost_lines(c)) + "\n").encode())
        log(f"wrote {out / 'anytime_cost'}.{{md,json}}")
        return 0
    data = av.build_data(av.FULL if cfg.data == "full" else av.QUICK, cache)
    results: dict[str, Any] = {}
    for size in cfg.sizes:
        if args.sizes and size[0] not in args.sizes:
            continue
        runs = []
        for seed in cfg.seeds:
            if args.seeds is not None and seed not in args.seeds:
                continue
            folder = cache / f"anytime-{cfg.name}-{size[0]}-s{seed}-{cfg.run_key(size, seed)}"
            if args.stage == "analyse":
                while not (folder / "meta.json").exists():
                    time.sleep(10)
            log(f"train {size[0]} seed {seed} -> {folder}")
            meta = train_run(cfg, size, seed, data, folder)
            if args.stage == "train":
                continue
            cached = folder / "analysis.json"
            if cached.exists() and not args.reanalyse:
                res = json.loads(cached.read_text())
            else:
                res = analyse_run(cfg, size, seed, data, folder)
                atomic_write_json(cached, res)
            res["meta"] = meta
            runs.append(res)
        if args.stage == "train":
            continue
        results[size[0]] = {"runs": runs, "summary": {
            v: summarise(cfg, runs, v) for v in ("mode", "phema_only", "window_only",
                                                 "phema+window")}}
    if args.stage == "train":
        log(f"trained in {time.perf_counter() - t0:.0f} s")
        return 0
    done = [s for s in cfg.sizes if s[0] in results]
    cfg_done = dataclasses.replace(cfg, sizes=tuple(done))
    wall = time.perf_counter() - t0
    stem = "anytime_quick" if args.quick else "anytime"
    cost_path = out / "anytime_cost.json"
    cost = json.loads(cost_path.read_text()) if cost_path.exists() and not args.quick else None
    plot(cfg_done, results, out / f"{stem}.png")
    atomic_write_json(out / f"{stem}.json", {
        "config": cfg.to_dict(), "mode": MODE, "results": results, "wall_seconds": wall,
        "environment": av.environment(), "command": " ".join(
            ["python benchmarks/anytime.py", *(argv if argv is not None else sys.argv[1:])])})
    atomic_write_bytes(out / f"{stem}.md", report(cfg_done, results, cost, wall).encode())
    log(f"wrote {out / stem}.{{md,json,png}} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    from merge_callback.console import quiet_third_party

    with quiet_third_party():  # Lightning's banner and tips; our lines and warnings stay
        raise SystemExit(main())
