"""One prepared GPU check: what the merge callback costs and buys, at real scale, in one run.

Four phases, every number in one results file (``gpu.md`` + ``gpu.json``, or ``gpu_quick.*``):

1. ``kernels`` (Pythia-410M shape, fp32 and bf16 weights): the candidate merges the rounds run
   (``merge.lerp_tensors_`` for pairwise rounds, ``engine.combine_into_`` for the averaging
   families) in bytes moved per second against a device-to-device ``copy_`` of the same tensors;
   staging both operands on the device (``engine.stage_on_devices``); the in-place soup build
   (``engine.soup_state_dict(in_place=True, module=...)``).
2. ``snapshots`` and ``steps`` (Pythia-410M shape, bf16 autocast training): the device-to-host
   copy of ``Snapshot.capture`` into page-locked memory, how much of it the next training steps
   hide, and Lightning training steps/s with and without ``BayesMergeCallback`` (outside rounds,
   and over a stretch that includes a checkpoint save with its round).
3. ``round`` (Pythia-410M shape, a held-out pass of about a second): the share of a round that is
   not a held-out pass, the written soup against the scored one (re-scored, and tensor by tensor
   against a recomputation), host and device memory peaks as ratios of the model's bytes.
4. ``quality``: a Pythia-70M-architecture GPT-NeoX trained from scratch at a constant learning
   rate on Shakespeare plus Python standard-library source, checkpoints at a fixed interval, the
   callback in its recommended mode (:data:`QUALITY_SETTINGS`: ``averaging="auto"``; the cost
   phases use :data:`CALLBACK_SETTINGS`), exact per-step EMAs of a few
   decays on the device: held-out loss of the latest weights, the soup and the best EMA (chosen
   on the selection shard) on a test shard not used to choose.

A time guard keeps the full run within ``--budget-s`` (480 s): phases that would not fit are cut
short or skipped, and the results say so. An exception in one phase is recorded and the next
phase runs.

Usage::

    python -m benchmarks.gpu --prepare .cache/gpu_bundle    # here: wheels + Shakespeare text
    python -m benchmarks.gpu --bundle .cache/gpu_bundle      # on the GPU (see benchmarks/README.md)
    python -m benchmarks.gpu --quick                         # the same code paths, CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch  # first: benchmarks.overhead's OMP_NUM_THREADS=1 then no longer applies here

_ROOT = Path(__file__).resolve().parents[1]  # `python benchmarks/gpu.py` finds the packages
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.common import pick_blocks, environment, log
from benchmarks.overhead import (MODELS, TimedEvaluator, build_model, float_lists, median,
                                 model_bytes, reset_peak, rss_kib, run_round, token_batches)
from merge_callback.engine import (RoundConfig, Snapshot, combine_into_, soup_state_dict,
                                   stage_on_devices)
from merge_callback.io.soups import write_soup_files
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric
from merge_callback.merge import lerp_tensors_

RESULTS = Path(__file__).parent / "results"

#: the callback's settings in phases 2 and 4 ("recommended mode"); one line to switch
CALLBACK_SETTINGS: dict[str, Any] = dict(history=8, snapshot_every=10,
                                         ema_decays=(0.99, 0.995, 0.998, 0.999), budget=10)
#: the callback in the quality phase: the recommended mode (post-hoc EMA of any length, windows,
#: pairwise and a blend, chosen at every save; its first round comes at the second save)
QUALITY_SETTINGS: dict[str, Any] = dict(averaging="auto", snapshot_every=10)
#: per-step EMA decays tracked on the device in phase 4
EMA_DECAYS = (0.99, 0.995, 0.998, 0.999)
#: a device-to-device copy_ on the lent H200, bytes read + written per second (measured before)
REFERENCE_COPY_TBPS = 4.3
ROUND_BUDGET = 10

PYTHIA_410M = dict(vocab=50304, hidden_size=1024, num_layers=24, num_heads=16, max_len=2048)
PYTHIA_70M = dict(hidden_size=512, num_layers=6, num_heads=8)  # intermediate 4 × hidden = 2048
MODELS.setdefault("pythia-410m", PYTHIA_410M)
MODELS.setdefault("gpu-quick", dict(vocab=512, hidden_size=64, num_layers=2, num_heads=4,
                                    max_len=64))

WHEELS = ("scikit-optimize==0.10.2", "pyaml==26.7.0")
"""What the lent GPU image lacks for this package (its other dependencies are on the image)."""
WHEEL_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--only-binary", ":all:",
                  "--python-version", "3.12", "--platform", "manylinux2014_x86_64",
                  "--implementation", "cp", "--no-deps", "-d"]
SHAKESPEARE_FILE = "shakespeare.json.gz"
HELD_OUT_WORKS = {"sel": "macbeth", "test": "julius_caesar"}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (``FULL`` on a GPU, ``QUICK`` for the CPU test)."""

    name: str
    big: str                      # model of phases 1-3 (a key of benchmarks.overhead.MODELS)
    kernel_reps: int
    train_batch: int              # phases 2-3: training batch × block (random tokens)
    train_block: int
    plain_steps: int              # steps per timed stretch of the plain training loop
    plain_reps: int
    fit_steps: int                # steps of each Lightning fit in phase 2
    round_pass_s: float           # phase 3: target seconds of one held-out pass
    eval_batch: int
    eval_block: int
    q_vocab: int                  # phase 4
    q_model: dict
    q_block: int
    q_batch: int
    q_lr: float
    q_warmup: int
    q_train_s: float | None       # train for this long (steps sized by a short probe) ...
    q_steps: int | None           # ... or exactly this many steps
    q_saves: int
    q_sel_blocks: int
    q_test_blocks: int
    q_eval_batch: int
    stdlib_chars: int | None
    shakespeare_chars: int | None
    budget_s: float


FULL = Plan(name="full", big="pythia-410m", kernel_reps=5, train_batch=8, train_block=1024,
            plain_steps=8, plain_reps=3, fit_steps=60, round_pass_s=1.0, eval_batch=8,
            eval_block=1024, q_vocab=16384, q_model=PYTHIA_70M, q_block=512, q_batch=16,
            q_lr=1e-3, q_warmup=100, q_train_s=240.0, q_steps=None, q_saves=8, q_sel_blocks=128,
            q_test_blocks=128, q_eval_batch=32, stdlib_chars=None, shakespeare_chars=None,
            budget_s=480.0)
QUICK = Plan(name="quick", big="gpu-quick", kernel_reps=2, train_batch=4, train_block=32,
             plain_steps=4, plain_reps=2, fit_steps=24, round_pass_s=0.03, eval_batch=4,
             eval_block=32, q_vocab=320, q_model=dict(hidden_size=32, num_layers=2, num_heads=4),
             q_block=32, q_batch=8, q_lr=3e-3, q_warmup=4, q_train_s=None, q_steps=40, q_saves=4,
             q_sel_blocks=8, q_test_blocks=8, q_eval_batch=8, stdlib_chars=200_000,
             shakespeare_chars=100_000, budget_s=600.0)


# --------------------------------------------------------------------------- small helpers


class Deadline:
    """Seconds left of the run's budget; phases record where they stopped early."""

    def __init__(self, total_s: float):
        self.t0 = time.perf_counter()
        self.total_s = float(total_s)
        self.stops: list[str] = []

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.t0)

    def allows(self, need_s: float, what: str) -> bool:
        if self.left() >= need_s:
            return True
        self.stops.append(f"{what}: skipped, {self.left():.0f} s left and about {need_s:.0f} s "
                          "needed")
        log(self.stops[-1])
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA (what Lightning's ``bf16-mixed`` enters); nothing on the CPU."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def nbytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def perturb_on_device_(module: torch.nn.Module, seed: int, scale: float = 1e-3) -> None:
    """A small deterministic change of every float weight, drawn where the weights live."""
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
            p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype), alpha=scale)


def host_memory_peak():
    """Context: ``peak["extra"]`` = peak RSS over the RSS at entry (bytes); None where the kernel
    does not let the peak be reset."""
    peak: dict[str, int | None] = {"extra": None}

    @contextlib.contextmanager
    def window():
        base = rss_kib("VmRSS") * 1024
        try:
            reset_peak()
            ok = True
        except OSError:
            ok = False
        yield peak
        if ok:
            peak["extra"] = rss_kib("VmHWM") * 1024 - base

    return window()


def device_peak_start(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def device_peak_extra(device: torch.device, base: int) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def time_interleaved(variants: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]],
                     device: torch.device, reps: int, min_s: float) -> dict[str, list[float]]:
    """Seconds per call of each variant (``fn``, untimed ``pre`` run before every timing),
    repetitions interleaved (order reversed every other repetition); each timing is a loop of
    calls lasting about ``min_s``, synchronised with the device at both ends."""
    def once(fn, pre, n):
        if pre:
            pre()
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - t) / n

    inner = {k: max(1, min(200, math.ceil(min_s / max(once(fn, pre, 1), 1e-6))))
             for k, (fn, pre) in variants.items()}  # also the warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(reps):
        for k in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            fn, pre = variants[k]
            times[k].append(once(fn, pre, inner[k]))
    return times


def geometric_weights(k: int, gamma: float) -> list[float]:
    raw = [gamma ** (k - 1 - i) for i in range(k)]
    return [r / sum(raw) for r in raw]


# --------------------------------------------------------------------------- 1. kernels

KERNEL_COPY = "copy_ device to device (reference)"
KERNEL_PAIRWISE = "lerp_tensors_: every candidate of a pairwise round (history=2)"
KERNEL_LERP_FAMILY = ("combine_into_, lerp family: every pairwise/EMA candidate of an averaging "
                      "round")
KERNEL_GEOMETRIC = "combine_into_, geometric weights over 8 sources"
# tensor volumes read + written: copy 1+1; lerp 2+1; copy then in-place lerp (1+1)+(2+1);
# geometric over k: copy (1+1), scale (1+1), k-1 adds (2+1 each)
KERNEL_VOLUMES = {KERNEL_COPY: 2, KERNEL_PAIRWISE: 3, KERNEL_LERP_FAMILY: 5,
                  KERNEL_GEOMETRIC: 4 + 3 * 7}


def bench_kernels(module: torch.nn.Module, dtype_name: str, plan: Plan,
                  device: torch.device) -> dict:
    """Phase 1 on ``module`` (already on ``device`` in its dtype)."""
    prev = Snapshot.capture(module, 0)
    spare = Snapshot.capture(module, 0)  # page-locked like the callback's previous snapshot
    perturb_on_device_(module, seed=1)
    latest = Snapshot.capture(module, 1)
    keys, live, a_host, b_host = float_lists(module, prev, latest)
    nbytes = nbytes_of(live)
    spare_list = [spare.tensors[k] for k in keys]
    lam = 0.7
    out: dict[str, Any] = {"dtype": dtype_name, "bytes": nbytes, "tensors": len(live),
                           "page_locked": prev.page_locked, "lam": lam}

    # staging both operands on the device, as a round does first
    stage_s = []
    a_dev = b_dev = None
    for _ in range(plan.kernel_reps):
        a_dev = b_dev = None  # the previous copies are freed before the next staging
        sync(device)
        t = time.perf_counter()
        a_dev, b_dev = stage_on_devices(live, [a_host, b_host])
        sync(device)
        stage_s.append(time.perf_counter() - t)
    staged_on_device = all(x.device == o.device for x, o in zip(a_dev, live))
    # on a CPU the operands stay where they are: nothing is staged, no bandwidth to report
    out["stage"] = {"median_s": median(stage_s), "times_s": stage_s,
                    "on_device": staged_on_device and device.type != "cpu",
                    "bytes_per_s": (2 * nbytes / median(stage_s) if device.type != "cpu"
                                    else None)}
    geo_w = geometric_weights(8, 0.85)
    geo_src = [a_dev if i % 2 == 0 else b_dev for i in range(8)]

    def copy_():
        for o, s in zip(live, b_dev):
            o.copy_(s)

    def refill():
        torch._foreach_copy_(spare_list, a_host)

    variants = {
        KERNEL_COPY: (copy_, None),
        KERNEL_PAIRWISE: (lambda: lerp_tensors_(live, a_dev, b_dev, lam), None),
        KERNEL_LERP_FAMILY: (lambda: combine_into_(live, [a_dev, b_dev], (1 - lam, lam), True),
                             None),
        KERNEL_GEOMETRIC: (lambda: combine_into_(live, geo_src, geo_w, False), None),
    }
    with torch.no_grad():
        times = time_interleaved(variants, device, plan.kernel_reps, min_s=0.05)
        ref = median(times[KERNEL_COPY])
        rows = {}
        for k, v in times.items():
            bps = KERNEL_VOLUMES[k] * nbytes / median(v)
            rows[k] = {"median_s": median(v), "times_s": v, "volumes": KERNEL_VOLUMES[k],
                       "bytes_per_s": bps,
                       "bytes_per_s_vs_copy": bps / (KERNEL_VOLUMES[KERNEL_COPY] * nbytes / ref),
                       "time_vs_copy": median(v) / ref}
        out["rows"] = rows
        # the in-place soup build, as the callback (history=2) writes it: device kernels, copied
        # into the previous snapshot's page-locked buffers, live weights restored
        soup_times = time_interleaved(
            {"soup": (lambda: soup_state_dict(spare, latest, lam, in_place=True, module=module),
                      refill)}, device, plan.kernel_reps, min_s=0.0)["soup"]
        out["soup_in_place"] = {"median_s": median(soup_times), "times_s": soup_times,
                                "vs_stage": median(soup_times) / median(stage_s)}
        # exactness: the written soup is the scored candidate, bitwise
        lerp_tensors_(live, a_dev, b_dev, lam)
        candidate = [t.detach().to("cpu", copy=True) for t in live]
        refill()
        soup = soup_state_dict(spare, latest, lam, in_place=True, module=module)
        lerp_tensors_(live, a_host, b_host, 1.0)
        out["bitwise"] = {
            "soup_equals_scored_candidate": all(torch.equal(soup[k], c)
                                                for k, c in zip(keys, candidate)),
            "live_restored": all(torch.equal(t.detach().cpu(), b) for t, b in zip(live, b_host)),
            # informational: host and device kernels may round the last bit differently
            "device_lerp_equals_host_lerp": all(torch.equal(c, torch.lerp(x, y, lam))
                                                for c, x, y in zip(candidate, a_host, b_host))}
    del a_dev, b_dev, geo_src
    return out


# --------------------------------------------------------------------------- 2. snapshots


def make_train_step(module, batch: torch.Tensor, device: torch.device):
    """One AdamW step of ``module`` (an HF causal LM) on ``batch`` under the device's autocast."""
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5)
    ctx = autocast_for(device)

    def step():
        with ctx():
            loss = module(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_snapshots(module, step, plan: Plan, device: torch.device) -> dict:
    """Phase 2a: ``Snapshot.capture`` in a plain training loop (no Lightning)."""
    B = model_bytes(module)
    step()
    sync(device)
    t = time.perf_counter()
    first = Snapshot.capture(module, 0)
    issued = time.perf_counter() - t
    first.wait()
    out: dict[str, Any] = {"bytes": B, "page_locked": first.page_locked,
                           "first_capture": {"return_s": issued,
                                             "done_s": time.perf_counter() - t}}
    # steady state: the callback recycles a dropped snapshot's page-locked buffers (reuse=)
    snap = first
    ret, done = [], []
    for i in range(max(3, plan.plain_reps)):
        sync(device)
        t = time.perf_counter()
        snap = Snapshot.capture(module, i + 1, reuse=snap)
        ret.append(time.perf_counter() - t)
        snap.wait()
        done.append(time.perf_counter() - t)
    copy_s = median(done)
    out["reuse_capture"] = {"return_s": median(ret), "done_s": copy_s, "return_times_s": ret,
                            "done_times_s": done, "bytes_per_s": B / copy_s}
    # overlap: K steps plain, against K steps with a capture issued after the first step
    K = plan.plain_steps
    stretch: dict[str, list[float]] = {"plain": [], "capture": []}
    for r in range(plan.plain_reps):
        for variant in (["plain", "capture"] if r % 2 == 0 else ["capture", "plain"]):
            sync(device)
            t = time.perf_counter()
            for i in range(K):
                step()
                if variant == "capture" and i == 0:
                    snap = Snapshot.capture(module, 100 + r, reuse=snap)
            snap.wait()
            sync(device)
            stretch[variant].append(time.perf_counter() - t)
    extra = [c - p for c, p in zip(stretch["capture"], stretch["plain"])]
    plain_step = median(stretch["plain"]) / K
    out["stretch"] = {"steps": K, "times_s": stretch, "plain_step_s": plain_step,
                      "extra_s": median(extra), "extra_times_s": extra,
                      # on a CPU the copy is synchronous: nothing to hide
                      "hidden_fraction": (1.0 - median(extra) / copy_s
                                          if device.type == "cuda" else None),
                      "copy_vs_step": copy_s / plain_step}
    # exactness: the capture issued before the next steps holds the weights of its own step
    expected = {k: v.detach().clone() for k, v in module.state_dict().items()}
    snap = Snapshot.capture(module, 200, reuse=snap)
    step()
    step()
    out["capture_exact_while_training"] = all(
        torch.equal(snap.tensors[k], v.cpu()) for k, v in expected.items())
    del expected
    return out


# --------------------------------------------------------------------------- 2b. steps/s


def bench_fit_steps(module, plan: Plan, device: torch.device, workdir: Path,
                    deadline: Deadline) -> dict:
    """Phase 2b: Lightning fits with and without the callback; a checkpoint save with its round
    at about two thirds of the fit."""
    import lightning as L
    from torch.utils.data import DataLoader

    from merge_callback import BayesMergeCallback
    from merge_callback.data import BlockDataset
    from merge_callback.lm import CausalLMModule

    spec = MODELS[plan.big]
    N = plan.fit_steps
    save_at = (2 * N) // 3 + 1
    start = 3
    blocks = torch.randint(0, spec["vocab"], (plan.train_batch * N, plan.train_block),
                           generator=torch.Generator().manual_seed(5))
    heldout = token_batches(2, plan.eval_batch, plan.eval_block, spec["vocab"], 6)
    pl_module = CausalLMModule(module, lr=1e-5)

    class Clock(L.Callback):
        """Synchronised timestamps at the stretch boundaries (never in between: the device runs
        ahead of the host as in any training run)."""

        def __init__(self):
            self.t: dict[str, float] = {}

        def _mark(self, name):
            sync(device)
            self.t[name] = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == start:
                self._mark("start")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == save_at:
                self._mark("before_save")
                trainer.save_checkpoint(workdir / "fit.ckpt")
                self._mark("after_save")

        def on_train_end(self, trainer, pl_module):
            self._mark("end")

    runs: dict[str, dict] = {}
    for variant in ("with", "without"):
        if not deadline.allows(20.0 if plan.name == "full" else 1.0, f"steps/s fit {variant}"):
            break
        clock = Clock()
        callbacks: list = [clock]
        merge = None
        if variant == "with":
            # on_error="raise": a failing round ends the phase with its traceback in the results
            merge = BayesMergeCallback(heldout=heldout, soup_dir=workdir / "soups",
                                       on_error="raise", **CALLBACK_SETTINGS)
            callbacks.append(merge)
        trainer = L.Trainer(default_root_dir=str(workdir), max_steps=N, devices=1,
                            accelerator="gpu" if device.type == "cuda" else "cpu",
                            precision="bf16-mixed" if device.type == "cuda" else "32-true",
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=callbacks)
        trainer.fit(pl_module, DataLoader(BlockDataset(blocks), batch_size=plan.train_batch))
        t = clock.t
        runs[variant] = {
            "outside_rounds_steps_per_s": (save_at - start) / (t["before_save"] - t["start"]),
            "with_round_steps_per_s": (N - start) / (t["end"] - t["start"]),
            "save_s": t["after_save"] - t["before_save"],
            "checkpoint_bytes": (workdir / "fit.ckpt").stat().st_size,
            "rounds": list(merge.history) if merge is not None else []}
        (workdir / "fit.ckpt").unlink(missing_ok=True)
        shutil.rmtree(workdir / "soups", ignore_errors=True)
    out: dict[str, Any] = {"steps": N, "save_at": save_at, "from_step": start, "runs": runs,
                           "callback": {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in CALLBACK_SETTINGS.items()},
                           "precision": "bf16-mixed" if device.type == "cuda" else "32-true",
                           "checkpoint_dir": str(workdir)}
    if len(runs) == 2:
        w, wo = runs["with"], runs["without"]
        out["outside_rounds_ratio"] = (w["outside_rounds_steps_per_s"]
                                       / wo["outside_rounds_steps_per_s"])
        out["with_round_ratio"] = w["with_round_steps_per_s"] / wo["with_round_steps_per_s"]
    return out


# --------------------------------------------------------------------------- 3. round


def heldout_for(module, plan: Plan, device: torch.device, target_s: float):
    """Random-token held-out batches for a pass of about ``target_s`` and its evaluator."""
    spec = MODELS[plan.big]

    def evaluator(data):
        return HeldoutEvaluator(data, resolve_metric("loss"), context=autocast_for(device))

    probe = evaluator(token_batches(2, plan.eval_batch, plan.eval_block, spec["vocab"], 7))
    probe(module)  # warm-up
    t = time.perf_counter()
    probe(module)
    per_batch = (time.perf_counter() - t) / 2
    n = max(1, round(target_s / max(per_batch, 1e-4)))
    return evaluator(token_batches(n, plan.eval_batch, plan.eval_block, spec["vocab"], 7)), n


def bench_round(module, step, plan: Plan, device: torch.device, workdir: Path) -> dict:
    """Phase 3: one pairwise round as the callback runs it at a save, timed part by part."""
    from safetensors.torch import load_file

    B = model_bytes(module)
    evaluator, n_batches = heldout_for(module, plan, device, plan.round_pass_s)
    ev = TimedEvaluator(evaluator)
    step()
    sync(device)
    rss_training = rss_kib("VmRSS") * 1024
    prev = Snapshot.capture(module, 1)
    prev_device = {k: t.detach().clone() for k, t in module.state_dict().items()}
    value_previous = evaluator(module)  # known from the last round, in the callback
    spare = Snapshot.capture(module, 1)  # a dropped snapshot's buffers, recycled for the latest
    for _ in range(3):
        step()
    sync(device)
    # between rounds the host holds the previous snapshot and, on CUDA, the page-locked
    # buffers of the snapshot the last round dropped (kept for the next capture)
    rss_between = rss_kib("VmRSS") * 1024 - rss_training
    spare_locked = spare.page_locked
    dev_base = device_peak_start(device)
    rss_before = rss_kib("VmRSS") * 1024
    parts: dict[str, float] = {}
    with host_memory_peak() as host_peak:
        t0 = time.perf_counter()
        latest = Snapshot.capture(module, 5, reuse=spare)
        latest.wait()
        parts["snapshot"] = time.perf_counter() - t0
        t = time.perf_counter()
        result = run_round(module, prev, latest, ev, RoundConfig(budget=ROUND_BUDGET),
                           value_previous=value_previous)
        parts["run_round"] = time.perf_counter() - t
        t = time.perf_counter()
        soup = soup_state_dict(prev, latest, result.lam, in_place=True, module=module)
        parts["soup"] = time.perf_counter() - t
        t = time.perf_counter()
        st_path, _ = write_soup_files(workdir, "soup-round", soup, result)
        parts["write"] = time.perf_counter() - t
        total = time.perf_counter() - t0
    dev_extra = device_peak_extra(device, dev_base)
    passes = sum(ev.seconds)
    parts["passes"] = passes
    parts["run_round_not_passes"] = parts["run_round"] - passes
    # the written soup is the scored one: re-scored, and tensor by tensor
    written = load_file(str(st_path))
    same_as_returned = all(torch.equal(written[k], v) for k, v in soup.items())
    float_keys = [k for k, v in latest.tensors.items() if v.is_floating_point()]
    with torch.no_grad():
        recomputed = all(
            torch.equal(written[k], torch.lerp(prev_device[k], latest.tensors[k].to(device),
                                               result.lam).cpu())
            for k in float_keys)
    module.load_state_dict(written, strict=True)
    rescored = evaluator(module)
    module.load_state_dict(latest.tensors, strict=True)
    live_ok = all(torch.equal(v.cpu(), latest.tensors[k]) for k, v in module.state_dict().items())
    del written, soup, prev_device
    for f in workdir.iterdir():
        f.unlink()
    return {
        "bytes": B, "budget": ROUND_BUDGET, "heldout_batches": n_batches,
        "heldout_shape": [plan.eval_batch, plan.eval_block], "evaluations": len(ev.seconds),
        "pass_s": median(ev.seconds), "round_s": total, "parts_s": parts,
        "non_pass_share": (total - passes) / total, "lam": result.lam,
        "value_soup": result.value_soup, "value_latest": result.value_latest,
        "value_soup_rescored": rescored,
        "bitwise": {"rescored_equals_scored": rescored == result.value_soup,
                    "written_equals_returned_soup": same_as_returned,
                    "written_equals_device_recomputation": recomputed,
                    "live_restored": live_ok},
        "rescored_minus_scored": rescored - result.value_soup,
        "memory": {"host_between_rounds": rss_between / B,
                   "host_round_peak": (None if host_peak["extra"] is None else
                                       (host_peak["extra"] + rss_before - rss_training) / B),
                   "host_counted_between": 1 + int(spare_locked),
                   "host_counted_during": 2,
                   "device_round_peak_extra": None if dev_extra is None else dev_extra / B},
        "page_locked": latest.page_locked, "soup_dir": str(workdir)}


# --------------------------------------------------------------------------- 4. quality


def line_chunks(text: str, size: int = 100_000) -> list[str]:
    """``text`` cut after the first newline past every ``size`` characters (documents the
    tokenizer can train on and encode in parallel)."""
    out, i = [], 0
    while i < len(text):
        j = text.find("\n", i + size)
        j = len(text) if j < 0 else j + 1
        out.append(text[i:j])
        i = j
    return out


def load_corpus(bundle: Path | None, plan: Plan) -> dict:
    """Training documents and the two held-out sets: Shakespeare (from the bundle's file, when
    there is one) and the Python standard library of the running interpreter."""
    from merge_callback.data import stdlib_text

    std = stdlib_text(plan.stdlib_chars)
    a, b = int(len(std) * 0.94), int(len(std) * 0.97)
    docs = {"train": line_chunks(std[:a]), "sel": [std[a:b]], "test": [std[b:]]}
    source = {"stdlib_chars": len(std), "shakespeare": None}
    path = bundle / SHAKESPEARE_FILE if bundle is not None else None
    if path is not None and path.is_file():
        works = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
        missing = [w for w in HELD_OUT_WORKS.values() if w not in works]
        if missing:
            raise ValueError(f"{path} lacks the held-out works {missing}; rebuild it with "
                             "python -m benchmarks.gpu --prepare")
        cut = plan.shakespeare_chars
        for shard, work in HELD_OUT_WORKS.items():
            docs[shard].append(works[work][:cut])
        train = [works[w][:cut] for w in sorted(works) if w not in HELD_OUT_WORKS.values()]
        docs["train"].extend(train)
        source["shakespeare"] = {"file": str(path), "works": len(works),
                                 "train_chars": sum(map(len, train))}
    source["chars"] = {k: sum(map(len, v)) for k, v in docs.items()}
    return {"docs": docs, "source": source}


def device_ema_callback(decays, every: int, at_step):
    """A Lightning callback keeping exact per-step EMAs on the device.

    After every optimizer step ``ema ← d·ema + (1 − d)·θ`` (``torch._foreach_lerp_``; the first
    update copies θ) for each decay ``d``, over the float tensors of ``pl_module.state_dict()``,
    in fp32 on the module's device. Every ``every``-th step it calls
    ``at_step(step, pl_module, keys, emas)`` (``emas``: decay -> tensors aligned with ``keys``).
    """
    import lightning as L

    class DeviceEMA(L.Callback):
        def __init__(self):
            self.decays = tuple(decays)
            self.emas: dict[float, list[torch.Tensor]] = {}
            self.keys: list[str] = []
            self.updates = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step <= self.updates:
                return
            self.updates = step
            sd = pl_module.state_dict()
            with torch.no_grad():
                if not self.emas:
                    self.keys = [k for k, v in sd.items() if v.is_floating_point()]
                    self.emas = {d: [sd[k].detach().float().clone() for k in self.keys]
                                 for d in self.decays}
                else:
                    current = [sd[k].detach() for k in self.keys]
                    for d, ema in self.emas.items():
                        torch._foreach_lerp_(ema, current, 1.0 - d)
            if step % every == 0:
                at_step(step, pl_module, self.keys, self.emas)

    return DeviceEMA()


def bench_quality(plan: Plan, device: torch.device, bundle: Path | None, workdir: Path,
                  deadline: Deadline) -> dict:
    """Phase 4: a Pythia-70M-architecture run with the callback in its recommended mode."""
    import lightning as L
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from merge_callback import BayesMergeCallback
    from merge_callback.data import BlockDataset, tiny_gpt_neox, tokenize_and_pack, train_tokenizer
    from merge_callback.lm import CausalLMModule

    t0 = time.perf_counter()
    corpus = load_corpus(bundle, plan)
    docs = corpus["docs"]
    tok = train_tokenizer(docs["train"], vocab_size=plan.q_vocab)
    train = tokenize_and_pack(docs["train"], tok, plan.q_block)
    shards = {"sel": pick_blocks(tokenize_and_pack(docs["sel"], tok, plan.q_block),
                                  plan.q_sel_blocks, 1234),
              "test": pick_blocks(tokenize_and_pack(docs["test"], tok, plan.q_block),
                                   plan.q_test_blocks, 1235)}
    data_s = time.perf_counter() - t0
    log(f"quality: {train.shape[0]} training blocks of {plan.q_block} tokens ({data_s:.0f} s)")

    def batches(x):
        return [{"input_ids": x[i:i + plan.q_eval_batch]}
                for i in range(0, x.shape[0], plan.q_eval_batch)]

    evaluators = {s: HeldoutEvaluator(batches(x), resolve_metric("loss"),
                                      context=autocast_for(device)) for s, x in shards.items()}

    def new_module(seed=0):
        return CausalLMModule(tiny_gpt_neox(plan.q_vocab, seed=seed, max_len=plan.q_block,
                                            **plan.q_model),
                              lr=plan.q_lr, warmup_steps=plan.q_warmup, schedule="constant")

    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    accelerator = "gpu" if device.type == "cuda" else "cpu"

    def loader():
        return DataLoader(BlockDataset(train), batch_size=plan.q_batch, shuffle=True,
                          drop_last=True, generator=torch.Generator().manual_seed(0))

    def trainer(max_steps, callbacks, **kw):
        return L.Trainer(default_root_dir=str(workdir), max_steps=max_steps, devices=1,
                         accelerator=accelerator, precision=precision, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
                         callbacks=callbacks, **kw)

    every = QUALITY_SETTINGS.get("snapshot_every") or 1
    probe_rate = None
    if plan.q_steps is not None:
        steps = plan.q_steps
    else:  # size the run from a short probe fit (same batch, no callbacks, a throwaway model)
        probe_steps = 30
        marks: dict[int, float] = {}

        class Marks(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step in (10, probe_steps):
                    sync(device)
                    marks[trainer.global_step] = time.perf_counter()

        trainer(probe_steps, [Marks()], enable_checkpointing=False).fit(new_module(1), loader())
        probe_rate = (probe_steps - 10) / (marks[probe_steps] - marks[10])
        train_s = min(plan.q_train_s, deadline.left() - 60.0)
        # the callback's snapshots and host EMA tracks (every snapshot_every steps), its rounds
        # and the checkpoint writes (which carry its snapshots and tracks) slow the run down
        steps = int(train_s * probe_rate * 0.6)
    interval = max(every, (steps // plan.q_saves) // every * every)
    steps = interval * plan.q_saves
    log(f"quality: {steps} steps, a checkpoint every {interval} "
        + (f"(probe {probe_rate:.1f} steps/s)" if probe_rate else ""))

    pl_module = new_module(0)
    scratch = new_module(0).to(device)
    at_saves: dict[int, dict] = {}

    def score(module) -> dict[str, float]:
        return {s: ev(module) for s, ev in evaluators.items()}

    def at_step(step, live, keys, emas):
        row = {"latest": score(live), "ema": {}}
        sd = scratch.state_dict()
        targets = [sd[k] for k in keys]
        for d, ema in emas.items():
            with torch.no_grad():
                torch._foreach_copy_(targets, ema)
            row["ema"][str(d)] = score(scratch)
        at_saves[step] = row

    stop_at = time.perf_counter() + max(5.0, deadline.left() - 45.0)
    stopped: list[int] = []

    class TimeGuard(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if time.perf_counter() > stop_at and not trainer.should_stop:
                trainer.should_stop = True
                stopped.append(trainer.global_step)

    from lightning.pytorch.callbacks import ModelCheckpoint

    soups = workdir / "soups"
    merge = BayesMergeCallback(heldout=batches(shards["sel"]), soup_dir=soups, on_error="raise",
                               **QUALITY_SETTINGS)
    ema_cb = device_ema_callback(EMA_DECAYS, interval, at_step)
    ckpt = ModelCheckpoint(dirpath=workdir / "ckpt", every_n_train_steps=interval, save_top_k=1)
    t1 = time.perf_counter()
    trainer(steps, [ema_cb, merge, TimeGuard(), ckpt]).fit(pl_module, loader())
    train_s = time.perf_counter() - t1
    if stopped:
        deadline.stops.append(f"quality: training stopped by the time guard at step "
                              f"{stopped[0]} of {steps}")
    # score every written soup on both shards
    saves = []
    for step in sorted(at_saves):
        row = at_saves[step]
        entry: dict[str, Any] = {"step": step, "latest": row["latest"], "ema": row["ema"]}
        best = min(row["ema"], key=lambda d: row["ema"][d]["sel"])
        entry["best_ema"] = {"decay": float(best), **row["ema"][best]}
        meta_path = soups / f"soup-step={step}.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            scratch.load_state_dict(load_file(str(soups / f"soup-step={step}.safetensors")),
                                    strict=True)
            entry["soup"] = {**score(scratch), "family": meta.get("family"),
                             "param": meta.get("param"), "lambda": meta["lambda"],
                             "value_soup": meta["value_soup"],
                             "value_latest": meta["value_latest"],
                             "round_s": meta.get("seconds"),
                             "evaluations": meta.get("evaluations")}
            entry["soup"]["rescored_equals_scored"] = entry["soup"]["sel"] == meta["value_soup"]
            entry["soup"]["callback_latest_equals_ours"] = (meta["value_latest"]
                                                            == row["latest"]["sel"])
        saves.append(entry)
    with_soup = [s for s in saves if "soup" in s]
    for f in (workdir / "ckpt").glob("*"):
        f.unlink()
    summary = {
        "saves": len(saves), "saves_with_soup": len(with_soup),
        "soup_beats_latest_test": sum(s["soup"]["test"] < s["latest"]["test"] for s in with_soup),
        "soup_beats_best_ema_test": sum(s["soup"]["test"] < s["best_ema"]["test"]
                                        for s in with_soup),
        "best_ema_beats_latest_test": sum(s["best_ema"]["test"] < s["latest"]["test"]
                                          for s in saves),
        "rescored_equal": sum(bool(s["soup"]["rescored_equals_scored"]) for s in with_soup),
        "median_test_soup_minus_latest": (median([s["soup"]["test"] - s["latest"]["test"]
                                                for s in with_soup]) if with_soup else None),
        "median_test_soup_minus_best_ema": (median([s["soup"]["test"] - s["best_ema"]["test"]
                                                  for s in with_soup]) if with_soup else None),
        "median_round_s": (median([s["soup"]["round_s"] for s in with_soup
                                   if s["soup"]["round_s"] is not None]) if with_soup else None)}
    n_params = sum(p.numel() for p in pl_module.parameters())
    return {"parameters": n_params, "model": dict(plan.q_model, vocab=plan.q_vocab,
                                                  block=plan.q_block),
            "batch": plan.q_batch, "lr": plan.q_lr, "warmup_steps": plan.q_warmup,
            "schedule": "constant", "precision": precision, "steps_planned": steps,
            "steps_done": stopped[0] if stopped else steps, "interval": interval,
            "probe_steps_per_s": probe_rate, "train_s": train_s, "data_s": data_s,
            "train_blocks": int(train.shape[0]),
            "epochs": (stopped[0] if stopped else steps) * plan.q_batch / int(train.shape[0]),
            "corpus": corpus["source"], "shards": {k: list(v.shape) for k, v in shards.items()},
            "callback": {k: list(v) if isinstance(v, tuple) else v
                         for k, v in QUALITY_SETTINGS.items()},
            "ema_decays": list(EMA_DECAYS), "per_save": saves, "summary": summary}


# --------------------------------------------------------------------------- report


def fmt(x, spec=".3f", none="n/a"):
    return none if x is None else format(x, spec)


def summary_rows(res: dict) -> list[tuple[str, str, str]]:
    """(measure, target, value) for the printed table and the markdown."""
    rows: list[tuple[str, str, str]] = []
    for k in res.get("kernels", []):
        r = k["rows"]
        rows.append((f"kernels {k['dtype']}: copy_ TB/s (H200 reference {REFERENCE_COPY_TBPS})",
                     "—", f"{r[KERNEL_COPY]['bytes_per_s'] / 1e12:.3f}"))
        rows.append((f"kernels {k['dtype']}: pairwise candidate bytes/s vs copy_", "≥ 0.9",
                     f"{r[KERNEL_PAIRWISE]['bytes_per_s_vs_copy']:.2f}"))
        rows.append((f"kernels {k['dtype']}: averaging lerp candidate bytes/s vs copy_", "—",
                     f"{r[KERNEL_LERP_FAMILY]['bytes_per_s_vs_copy']:.2f}"))
        stage = k["stage"]["bytes_per_s"]
        rows.append((f"kernels {k['dtype']}: staging both operands, GB/s", "—",
                     "n/a (CPU)" if stage is None else f"{stage / 1e9:.1f}"))
        rows.append((f"kernels {k['dtype']}: in-place soup build, s", "—",
                     f"{k['soup_in_place']['median_s']:.3f}"))
    s = res.get("snapshots")
    if s:
        rows.append(("snapshot D2H copy (reuse), s; GB/s", "—",
                     f"{s['reuse_capture']['done_s']:.3f}; "
                     f"{s['reuse_capture']['bytes_per_s'] / 1e9:.1f}"))
        hidden = s["stretch"]["hidden_fraction"]
        rows.append(("snapshot copy hidden by the next steps", "—",
                     "n/a (CPU)" if hidden is None else f"{100 * hidden:.0f} %"))
    st = res.get("steps")
    if st and "outside_rounds_ratio" in st:
        rows.append(("steps/s with / without callback, outside rounds", "≥ 0.99",
                     f"{st['outside_rounds_ratio']:.3f}"))
        rows.append(("steps/s with / without callback, stretch with a round", "—",
                     f"{st['with_round_ratio']:.3f}"))
    r = res.get("round")
    if r:
        rows.append(("round: share not a held-out pass (pass s)", "≤ 5 %",
                     f"{100 * r['non_pass_share']:.1f} % ({r['pass_s']:.2f} s)"))
        rows.append(("round: written soup == scored soup (re-score; tensors)", "True",
                     f"{r['bitwise']['rescored_equals_scored']}; "
                     f"{r['bitwise']['written_equals_device_recomputation']}"))
        m = r["memory"]
        rows.append(("round: host memory over training alone / model bytes, peak (between "
                     "rounds)", "≤ 2.05 (1.05)",
                     f"{fmt(m['host_round_peak'], '.2f')} "
                     f"({fmt(m['host_between_rounds'], '.2f')})"))
        rows.append(("round: device peak extra / model bytes", "—",
                     fmt(m["device_round_peak_extra"], ".2f")))
    q = res.get("quality")
    if q:
        sm = q["summary"]
        rows.append(("quality: saves where soup < latest on test", "—",
                     f"{sm['soup_beats_latest_test']}/{sm['saves_with_soup']}"))
        rows.append(("quality: saves where soup < best EMA on test", "—",
                     f"{sm['soup_beats_best_ema_test']}/{sm['saves_with_soup']}"))
        rows.append(("quality: median test loss, soup − latest; soup − best EMA (nats)", "< 0",
                     f"{fmt(sm['median_test_soup_minus_latest'], '+.4f')}; "
                     f"{fmt(sm['median_test_soup_minus_best_ema'], '+.4f')}"))
        rows.append(("quality: soups re-scored bitwise to the chosen value", "all",
                     f"{sm['rescored_equal']}/{sm['saves_with_soup']}"))
    return rows


def render(res: dict) -> str:
    env = res["environment"]
    lines: list[str] = []
    w = lines.append
    w("# GPU check: cost and quality of the merge callback at real scale\n")
    w(f"Command: `{res['command']}`; wall time {res['wall_s']:.0f} s of a {res['budget_s']:.0f} s "
      f"budget. Device: {res['device']}. torch {env['torch']}, Lightning {env['lightning']}, "
      f"transformers {env['transformers']}, Python {env['python']}.\n")
    w("Callback settings (phases 2 and 4): `" + json.dumps(res["callback"]) + "`.\n")
    if res["stops"]:
        w("**Cut short by the time guard:** " + "; ".join(res["stops"]) + ".\n")
    if res["errors"]:
        w("**Phases that raised:** " + "; ".join(f"{k}: {v.splitlines()[-1]}"
                                                 for k, v in res["errors"].items()) + ".\n")
    w("## Summary\n")
    w("| measure | target | value |")
    w("|---|---|---|")
    for m, t, v in summary_rows(res):
        w(f"| {m} | {t} | {v} |")
    w("")
    for k in res.get("kernels", []):
        w(f"## 1. Kernels, {k['dtype']} weights ({k['bytes'] / 2**20:.0f} MiB, "
          f"{k['tensors']} tensors, snapshots page-locked: {k['page_locked']})\n")
        w("| kernel | median ms | tensor volumes moved | TB/s | bytes/s vs copy_ |")
        w("|---|---|---|---|---|")
        for name, r in k["rows"].items():
            w(f"| {name} | {1e3 * r['median_s']:.2f} | {r['volumes']} | "
              f"{r['bytes_per_s'] / 1e12:.3f} | {r['bytes_per_s_vs_copy']:.2f} |")
        w(f"\nStaging both operands (`stage_on_devices`): {1e3 * k['stage']['median_s']:.1f} ms, "
          f"{fmt(k['stage']['bytes_per_s'] and k['stage']['bytes_per_s'] / 1e9, '.1f')} GB/s "
          "host to device (on the device: "
          f"{k['stage']['on_device']}). In-place soup build (`soup_state_dict(in_place=True, "
          f"module=...)`: staging, device kernel, copy back into the previous snapshot, restore): "
          f"{1e3 * k['soup_in_place']['median_s']:.1f} ms = "
          f"{k['soup_in_place']['vs_stage']:.2f} × "
          f"the staging. Bitwise: {json.dumps(k['bitwise'])}.\n")
    s = res.get("snapshots")
    if s:
        f, rc, sc = s["first_capture"], s["reuse_capture"], s["stretch"]
        w(f"## 2. Snapshots during training ({s['bytes'] / 2**20:.0f} MiB, page-locked: "
          f"{s['page_locked']})\n")
        w(f"- First capture (allocates and page-locks the buffers): returns after "
          f"{1e3 * f['return_s']:.1f} ms, copy done after {1e3 * f['done_s']:.1f} ms.")
        w(f"- Capture into recycled buffers (`reuse=`): returns after "
          f"{1e3 * rc['return_s']:.2f} ms, copy done after {1e3 * rc['done_s']:.1f} ms "
          f"({rc['bytes_per_s'] / 1e9:.1f} GB/s).")
        w(f"- {sc['steps']} training steps with a capture issued after the first, against "
          f"without: {1e3 * sc['extra_s']:.1f} ms longer ({1e3 * sc['plain_step_s']:.1f} ms per "
          "step); "
          + ("the copy is synchronous on a CPU." if sc["hidden_fraction"] is None else
             f"{100 * sc['hidden_fraction']:.0f} % of the copy hidden by the steps."))
        w(f"- A capture issued before further steps holds its own step's weights bitwise: "
          f"{s['capture_exact_while_training']}.\n")
    st = res.get("steps")
    if st and st.get("runs"):
        w(f"Lightning fits of {st['steps']} steps ({st['precision']}), a checkpoint save at "
          f"step {st['save_at']}; rates from step {st['from_step']} on. *Outside rounds* ends "
          "just before the save and includes the callback's periodic snapshots (and EMA track "
          "updates); the second rate runs to the end of the fit, the save and its round "
          "included; the save is also made without the callback:\n")
        w("| run | steps/s outside rounds | steps/s over the stretch with the save | save s | "
          "checkpoint MiB | rounds |")
        w("|---|---|---|---|---|---|")
        for name, r in st["runs"].items():
            w(f"| {name} callback | {r['outside_rounds_steps_per_s']:.2f} | "
              f"{r['with_round_steps_per_s']:.2f} | {r['save_s']:.2f} | "
              f"{r['checkpoint_bytes'] / 2**20:.0f} | {len(r['rounds'])} |")
        w("")
    r = res.get("round")
    if r:
        w(f"## 3. A round ({r['bytes'] / 2**20:.0f} MiB fp32 weights, budget {r['budget']}, "
          f"held-out {r['heldout_batches']} × {r['heldout_shape'][0]}×{r['heldout_shape'][1]} "
          "tokens)\n")
        w(f"Round {r['round_s']:.2f} s, {r['evaluations']} passes of {r['pass_s']:.3f} s; "
          f"not a pass: {100 * r['non_pass_share']:.1f} %. Parts (s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in r["parts_s"].items()) + ".\n")
        w(f"λ = {r['lam']:.4f}; soup {r['value_soup']:.6f}, latest {r['value_latest']:.6f}, "
          f"written soup re-scored {r['value_soup_rescored']:.6f}. Bitwise: "
          f"{json.dumps(r['bitwise'])}. Memory / model bytes: {json.dumps(r['memory'])}.\n")
    q = res.get("quality")
    if q:
        sh = q["corpus"]["shakespeare"]
        w(f"## 4. Quality: Pythia-70M architecture ({q['parameters']:,} parameters, "
          f"vocabulary {q['model']['vocab']}, context {q['model']['block']})\n")
        w(f"{q['steps_done']} of {q['steps_planned']} steps planned, batch {q['batch']}, lr "
          f"{q['lr']} constant after {q['warmup_steps']} warmup steps, {q['precision']}, a "
          f"checkpoint every {q['interval']} steps; {q['train_s']:.0f} s of training, "
          f"{q['epochs']:.2f} epochs of {q['train_blocks']} blocks. Text: Python standard "
          f"library ({q['corpus']['stdlib_chars']} characters)"
          + (f" and {sh['works']} Shakespeare works" if sh else ", no Shakespeare file given")
          + f". Selection shard (the callback chooses on it; so is the best EMA): "
            f"{q['shards']['sel'][0]} blocks; test shard: {q['shards']['test'][0]} blocks.\n")
        decays = q["ema_decays"]
        w("| step | latest sel | latest test | soup sel | soup test | soup family (param) | "
          "best EMA (sel) | best EMA test | " + " | ".join(f"EMA {d} test" for d in decays) + " |")
        w("|---|---|---|---|---|---|---|---|" + "---|" * len(decays))
        for s in q["per_save"]:
            sp = s.get("soup")
            w(f"| {s['step']} | {s['latest']['sel']:.4f} | {s['latest']['test']:.4f} | "
              + (f"{sp['sel']:.4f} | {sp['test']:.4f} | {sp['family']} ({fmt(sp['param'])}) | "
                 if sp else "n/a | n/a | n/a | ")
              + f"{s['best_ema']['decay']} | {s['best_ema']['test']:.4f} | "
              + " | ".join(f"{s['ema'][str(d)]['test']:.4f}" for d in decays) + " |")
        w(f"\nSummary: {json.dumps(q['summary'])}.\n")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- prepare


RUN_SCRIPT = r"""#!/usr/bin/env bash
# The GPU check on a machine without a package index. From the repository root:
#   bash .cache/gpu_bundle/run.sh [more arguments of benchmarks/gpu.py]
# Results go to $OUT (default benchmarks/results): gpu.md, gpu.json.
set -euo pipefail
BUNDLE="$(cd "$(dirname "$0")" && pwd)"
SITE="${TMPDIR:-/tmp}/merge_callback_site"
# pip where the image has it; a wheel is a zip file, so unpacking it is the fallback
if ! python -m pip install --quiet --no-index --no-deps --target "$SITE" "$BUNDLE"/wheels/*.whl
then
  for w in "$BUNDLE"/wheels/*.whl; do python -m zipfile -e "$w" "$SITE"; done
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import skopt, merge_callback, lightning, transformers, safetensors"
python -m benchmarks.gpu --bundle "$BUNDLE" --out "${OUT:-benchmarks/results}" "$@"
"""


def prepare(bundle: Path) -> None:
    """Fill ``bundle`` with what the GPU machine cannot download: the wheels of
    :data:`WHEELS`, the Shakespeare texts (modern spelling, gzip-compressed JSON) and
    ``run.sh``, which installs the wheels offline and runs the check.

    Raises:
        subprocess.CalledProcessError: the wheel download failed.
        RuntimeError: the Shakespeare corpus could not be fetched.
    """
    from merge_callback.data import shakespeare_texts

    wheels = bundle / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = WHEEL_DOWNLOAD + [str(wheels), *WHEELS]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True)
    texts = shakespeare_texts()
    blob = gzip.compress(json.dumps(texts, sort_keys=True).encode("utf-8"), mtime=0)
    (bundle / SHAKESPEARE_FILE).write_bytes(blob)
    (bundle / "run.sh").write_text(RUN_SCRIPT)
    (bundle / "run.sh").chmod(0o755)
    log(f"wrote {bundle}: {len(list(wheels.glob('*.whl')))} wheels, {len(texts)} works "
        f"({len(blob) / 2**20:.1f} MiB compressed)")


# --------------------------------------------------------------------------- main


def run_phase(res: dict, name: str, fn: Callable[[], Any]) -> Any:
    """Run one phase; an exception is recorded under ``errors`` and the run goes on."""
    log(f"phase {name}")
    t = time.perf_counter()
    try:
        return fn()
    except Exception:  # noqa: BLE001 - one run on a lent machine: keep the other phases
        res["errors"][name] = traceback.format_exc()
        log(f"phase {name} raised:\n{res['errors'][name]}")
        return None
    finally:
        res["phase_s"][name] = time.perf_counter() - t


def scratch_dir(need_bytes: int) -> str | None:
    """``/dev/shm`` when it has room for ``need_bytes`` (checkpoints and soups are then written
    to memory, keeping disk speed out of the timings), else the default temporary folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes:
        return str(shm)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (runs on a CPU in a test)")
    p.add_argument("--out", default=str(RESULTS), help="folder for gpu.md / gpu.json")
    p.add_argument("--bundle", default=None,
                   help=f"folder made by --prepare (its {SHAKESPEARE_FILE} adds Shakespeare)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget of the run")
    p.add_argument("--phases", default="kernels,snapshots,round,steps,quality",
                   help="comma-separated subset of kernels,snapshots,round,steps,quality")
    p.add_argument("--prepare", metavar="DIR", help="download wheels and write the text, then exit")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare))
        return 0
    allowed = ("kernels", "snapshots", "round", "steps", "quality")
    phases = [x for x in args.phases.split(",") if x]
    if not phases or any(x not in allowed for x in phases):
        p.error(f"--phases must be a comma-separated subset of {','.join(allowed)}, "
                f"got {args.phases!r}")
    plan = QUICK if args.quick else FULL
    deadline = Deadline(args.budget_s or plan.budget_s)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick or device.type == "cpu":
        torch.set_num_threads(1)
    if device.type == "cpu" and not args.quick:
        log("no CUDA device: the full sizes would take hours on a CPU; use --quick")
        return 2
    bundle = Path(args.bundle) if args.bundle else None
    command = "python -m benchmarks.gpu" + " ".join([""] + (argv if argv is not None
                                                             else sys.argv[1:]))
    res: dict[str, Any] = {
        "command": command, "plan": asdict(plan), "budget_s": deadline.total_s,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "environment": environment(), "callback": {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in CALLBACK_SETTINGS.items()},
        "reference_copy_tbps": REFERENCE_COPY_TBPS, "errors": {}, "phase_s": {}, "stops": []}
    module = build_model(plan.big).to(device)
    B = model_bytes(module)
    res["big_model"] = {"name": plan.big, "parameters": sum(p.numel() for p in module.parameters()),
                        "bytes_fp32": B}
    spec = MODELS[plan.big]
    batch = torch.randint(0, spec["vocab"], (plan.train_batch, plan.train_block),
                          generator=torch.Generator().manual_seed(3)).to(device)
    # the largest writes: the recommended mode's checkpoint (weights, AdamW state, its snapshots
    # and EMA tracks: about 11 × B) next to a soup
    tmp_root = scratch_dir(16 * B)
    need = {"kernels": 20, "snapshots": 20, "round": 40, "steps": 60} if plan.name == "full" \
        else {"kernels": 1, "snapshots": 1, "round": 1, "steps": 1}
    if "kernels" in phases and deadline.allows(need["kernels"], "kernels fp32"):
        module.eval()
        res["kernels"] = [k for k in [run_phase(res, "kernels_fp32", lambda: bench_kernels(
            module, "fp32", plan, device))] if k]
        module.train()
    step = make_train_step(module, batch, device)
    if "snapshots" in phases and deadline.allows(need["snapshots"], "snapshots"):
        res["snapshots"] = run_phase(res, "snapshots", lambda: bench_snapshots(module, step, plan,
                                                                                device))
    if "round" in phases and deadline.allows(need["round"], "round"):
        with tempfile.TemporaryDirectory(prefix="gpu-round-", dir=tmp_root) as d:
            res["round"] = run_phase(res, "round", lambda: bench_round(module, step, plan, device,
                                                                       Path(d)))
    del step
    if "steps" in phases and deadline.allows(need["steps"], "steps"):
        with tempfile.TemporaryDirectory(prefix="gpu-steps-", dir=tmp_root) as d:
            res["steps"] = run_phase(res, "steps", lambda: bench_fit_steps(
                module, plan, device, Path(d), deadline))
        module.to(device)  # Lightning's teardown moves the model to the CPU
    if "kernels" in phases and deadline.allows(need["kernels"], "kernels bf16"):
        module.to(torch.bfloat16).eval()
        k = run_phase(res, "kernels_bf16", lambda: bench_kernels(module, "bf16", plan, device))
        res.setdefault("kernels", []).extend([k] if k else [])
    del module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "quality" in phases and deadline.allows(120 if plan.name == "full" else 1, "quality"):
        with tempfile.TemporaryDirectory(prefix="gpu-quality-", dir=tmp_root) as d:
            res["quality"] = run_phase(res, "quality", lambda: bench_quality(
                plan, device, bundle, Path(d), deadline))
    res["stops"] = deadline.stops
    res["wall_s"] = time.perf_counter() - deadline.t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_quick" if args.quick else "gpu"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    (out / f"{stem}.md").write_text(render(res))
    width = max(len(m) for m, _, _ in summary_rows(res)) if summary_rows(res) else 10
    print(f"\n{'measure':<{width}}  {'target':<14}  value")
    for m, t, v in summary_rows(res):
        print(f"{m:<{width}}  {t:<14}  {v}")
    if res["errors"]:
        print("phases that raised: " + ", ".join(res["errors"]))
    log(f"wrote {out / stem}.md and .json in {res['wall_s']:.0f} s")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    from merge_callback.console import quiet_third_party

    with quiet_third_party():  # Lightning's banner and tips; our lines and warnings stay
        sys.exit(main())
