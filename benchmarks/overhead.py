"""What the merge callback costs a training run, as ratios measured side by side in one run.

Two models: the tiny example model (GPT-NeoX, vocab 4096, hidden 128, 4 layers: the defaults of
``examples/lightning_gpt_neox.py``) and a Pythia-160M shaped GPT-NeoX (vocab 50304, hidden 768,
12 layers, 162M parameters, random init). For each, interleaved repetitions (medians reported):

1. ``merge`` — the merge kernel (``merge.lerp_tensors_``, what every candidate evaluation runs)
   against a plain ``copy_`` of the same tensors.
2. ``round`` — one merge round as ``BayesMergeCallback`` runs it at a checkpoint save (snapshot,
   ``engine.run_round`` with budget 10, soup, ``engine.write_soup_files``, logging) against
   budget × one held-out pass; the held-out data is sized so that one pass takes about a second.
3. ``memory`` — extra host memory (peak RSS, in a fresh process with a fixed glibc mmap threshold
   so freed tensors go back to the OS) against the model's bytes, between rounds and during one.
4. ``steps`` — Lightning training steps/s with the callback attached against without it, outside
   rounds (one checkpoint save at the first step gives the callback its snapshot; the timed steps
   save nothing).
5. ``write`` — writing the soup (``engine.write_soup_files``) against
   ``safetensors.torch.save_file`` of the same tensors.

Rows marked *proposal* run code defined in this file (single-pass merges, the soup built in place
in the previous snapshot). The package has since adopted both, so they show its current round;
the unmarked round and memory rows show the earlier soup build.

Usage::

    python -m benchmarks.overhead            # both models, writes benchmarks/results/overhead.*
    python -m benchmarks.overhead --quick    # tiny model only, one repetition (overhead_quick.*)
    python -m benchmarks.overhead --render-only   # rewrite overhead.md from overhead.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import environment, log
from merge_callback import engine
from merge_callback.engine import RoundConfig, Snapshot, run_round, soup_state_dict, \
    write_soup_files
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric
from merge_callback.io import atomic_write_json
from merge_callback.merge import is_mergeable, lerp_tensors_

RESULTS = Path(__file__).parent / "results"
MODELS = {
    # train_batch x block: the training batch of the steps/s comparison; eval_batch x block: a
    # held-out batch; step_timed x step_reps: timed steps per fit and fits per configuration
    "tiny": dict(vocab=4096, hidden_size=128, num_layers=4, num_heads=4, max_len=128,
                 train_batch=16, block=128, eval_batch=32, step_timed=4, step_reps=4),
    "pythia-160m": dict(vocab=50304, hidden_size=768, num_layers=12, num_heads=12, max_len=2048,
                        train_batch=1, block=32, eval_batch=1, step_timed=2, step_reps=2),
}
TARGETS = {"merge": 0.9, "round_overhead": 0.05, "memory_between": 1.05, "memory_during": 2.05,
           "steps": 0.99, "write": 1.1}


# --------------------------------------------------------------------------- helpers


def build_model(name: str, seed: int = 0):
    """A GPT-NeoX of the named shape, N(0, 0.02) weights (layer norms 1/0), built quickly."""
    import transformers

    from merge_callback.data import tiny_gpt_neox_config

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    spec = MODELS[name]
    cfg = tiny_gpt_neox_config(spec["vocab"], hidden_size=spec["hidden_size"],
                               num_layers=spec["num_layers"], num_heads=spec["num_heads"],
                               max_len=spec["max_len"])
    with no_init_weights():
        model = transformers.GPTNeoXForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0 if n.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def model_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def token_batches(n: int, batch: int, block: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, block), generator=g)} for _ in range(n)]


def perturb_(module: torch.nn.Module, scale: float = 1e-3, seed: int = 1) -> None:
    """Stand-in for training between two saves: a small deterministic change of every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=scale)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def float_lists(module, prev: Snapshot, latest: Snapshot):
    targets = engine._live_targets(module, latest.tensors)
    keys = [k for k, _ in targets]
    return [t for _, t in targets], [prev.tensors[k] for k in keys], [latest.tensors[k] for k in keys]


# --------------------------------------------------------------------------- proposals


def lerp_tensors_single_pass_(out, previous, latest, lam: float) -> None:
    """Proposal: one pass per tensor, ``torch.lerp(previous, latest, lam, out=live)``."""
    with torch.no_grad():
        if lam == 1.0:
            torch._foreach_copy_(list(out), list(latest))
        elif lam == 0.0:
            torch._foreach_copy_(list(out), list(previous))
        else:
            for o, a, b in zip(out, previous, latest):
                torch.lerp(a, b.to(o.device, non_blocking=True), lam, out=o)


def soup_in_previous_(previous: Snapshot, latest: Snapshot, lam: float) -> dict[str, Tensor]:
    """Proposal: the soup computed in place in the previous snapshot (dropped after the round).

    Bitwise equal to ``soup_state_dict`` (``_foreach_lerp_`` is ``torch.lerp``); non-float tensors
    come from ``latest``. Tied tensors share one host copy and are merged once.
    """
    seen: set[int] = set()
    outs, ends = [], []
    for k, t in latest.tensors.items():
        p = previous.tensors[k]
        if is_mergeable(t) and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            outs.append(p)
            ends.append(t)
    if outs and lam != 1.0:
        torch._foreach_lerp_(outs, ends, lam)
    elif outs:
        torch._foreach_copy_(outs, ends)
    return {k: (previous.tensors[k] if is_mergeable(t) else t) for k, t in latest.tensors.items()}


# --------------------------------------------------------------------------- 1. merge kernel


def bench_merge(name: str, module, prev: Snapshot, latest: Snapshot, reps: int) -> dict:
    live, a, b = float_lists(module, prev, latest)
    nbytes = sum(t.numel() * t.element_size() for t in live)
    lam = 0.7
    spare = [x.clone() for x in a]  # holds previous for the in-place lerp

    def copy_():
        for o, s in zip(live, b):
            o.copy_(s)

    def refill():
        torch._foreach_copy_(spare, a)

    variants = {
        "copy_ (reference)": (copy_, None),
        "package lerp_tensors_ (one torch.lerp(out=) per tensor since this change)": (lambda: lerp_tensors_(live, a, b, lam),
                                                          None),
        "proposal: torch.lerp(out=) per tensor": (
            lambda: lerp_tensors_single_pass_(live, a, b, lam), None),
        "in place _foreach_lerp_ (proposal: soup in the previous copy)": (
            lambda: torch._foreach_lerp_(spare, b, lam), refill),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}

    def per_call(fn) -> float:
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t) / inner

    with torch.no_grad():
        for fn, pre in variants.values():  # warm-up: touch every page once
            if pre:
                pre()
            fn()
        # small models: time a loop of calls, each measurement lasting ~50 ms
        inner = max(1, min(500, math.ceil(0.05 / timed(copy_)[0])))
        for r in range(reps):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for k in order:
                fn, pre = variants[k]
                if pre:
                    pre()
                times[k].append(per_call(fn))
        # exactness of the proposals
        lerp_tensors_(live, a, b, lam)
        engine_out = [t.clone() for t in live]
        lerp_tensors_single_pass_(live, a, b, lam)
        same_single = all(torch.equal(x, y) for x, y in zip(live, engine_out))
        refill()
        torch._foreach_lerp_(spare, b, lam)
        same_inplace = all(torch.equal(x, y) for x, y in zip(spare, engine_out))
        lerp_tensors_(live, a, b, 1.0)
    ref = median(times["copy_ (reference)"])
    rows = {k: {"median_s": median(v), "times_s": v, "time_vs_copy": median(v) / ref,
                "copy_bandwidth_fraction": ref / median(v)} for k, v in times.items()}
    return {"model": name, "bytes": nbytes, "lam": lam, "rows": rows, "calls_per_timing": inner,
            "bitwise_equal_to_engine": {"single_pass": same_single, "in_place": same_inplace}}


# --------------------------------------------------------------------------- 2. round


class TimedEvaluator:
    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.seconds: list[float] = []

    def __call__(self, module) -> float:
        t = time.perf_counter()
        v = self.evaluator(module)
        self.seconds.append(time.perf_counter() - t)
        return v


class MergeTimer:
    """Wraps ``engine.lerp_tensors_`` to add up the time spent merging and restoring."""

    def __init__(self, fn):
        self.fn = fn
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        self.calls += 1


def one_round(module, prev: Snapshot, evaluator, budget: int, out_dir: Path, proposal: bool,
              step: int) -> dict:
    """One round as the callback runs it; ``proposal`` swaps in the proposed pieces."""
    from lightning.pytorch.loggers import CSVLogger

    from merge_callback.tracking import log_round_to_loggers

    timer = MergeTimer(lerp_tensors_single_pass_ if proposal else lerp_tensors_)
    ev = TimedEvaluator(evaluator)
    logger = CSVLogger(str(out_dir / "logs"), name="round")
    parts = {}
    original = engine.lerp_tensors_
    engine.lerp_tensors_ = timer
    t0 = time.perf_counter()
    try:
        parts["snapshot"], latest = timed(lambda: Snapshot.capture(module, step))
        t = time.perf_counter()
        result = run_round(module, prev, latest, ev, RoundConfig(budget=budget),
                           value_previous=1.0)
        run_s = time.perf_counter() - t
    finally:
        engine.lerp_tensors_ = original
    build = soup_in_previous_ if proposal else soup_state_dict
    parts["soup"], soup = timed(lambda: build(prev, latest, result.lam))
    parts["write"], _ = timed(lambda: write_soup_files(out_dir, f"soup-step={step}", soup, result))
    parts["log"], _ = timed(lambda: (log_round_to_loggers([logger], result, [(step, result.lam)]),
                                     logger.finalize("success")))
    total = time.perf_counter() - t0
    passes = sum(ev.seconds)
    parts["merges_and_restore"] = timer.seconds
    parts["search"] = run_s - passes - timer.seconds
    parts["passes"] = passes
    del soup
    return {"total_s": total, "parts_s": parts, "evaluations": len(ev.seconds),
            "pass_s": median(ev.seconds), "merge_calls": timer.calls, "latest": latest,
            "lam": result.lam}


def bench_search(budget: int, reps: int) -> dict:
    """``search_lambda`` (bayes, gp_hedge) with an instant objective: the search's own cost."""
    from merge_callback.search import search_lambda

    ts = [timed(lambda: search_lambda(lambda lam: (lam - 0.83) ** 2, alpha=0.5, budget=budget,
                                      seed=r))[0] for r in range(reps)]
    return {"budget": budget, "median_s": median(ts), "times_s": ts}


def calibrate_heldout(module, spec: dict, target_s: float, seed: int = 7) -> tuple[list, float]:
    """Held-out batches of ``eval_batch`` blocks, as many as a pass of ~``target_s`` needs."""
    batch = spec["eval_batch"]
    probe = token_batches(1, batch, spec["block"], spec["vocab"], seed)
    ev = HeldoutEvaluator(probe, resolve_metric("loss"))
    ev(module)
    t = median([timed(lambda: ev(module))[0] for _ in range(2)])
    n = max(1, round(target_s / t))
    return token_batches(n, batch, spec["block"], spec["vocab"], seed), t * n


def bench_round(name: str, module, spec: dict, reps: int, budget: int, target_pass_s: float,
                workdir: Path) -> dict:
    data, est = calibrate_heldout(module, spec, target_pass_s)
    evaluator = HeldoutEvaluator(data, resolve_metric("loss"))
    runs: dict[str, list[dict]] = {"engine": [], "proposal": []}
    step = 100
    for r in range(reps):
        for variant in (["engine", "proposal"] if r % 2 == 0 else ["proposal", "engine"]):
            prev = Snapshot.capture(module, step)
            perturb_(module, seed=step)
            step += 100
            out = workdir / f"round-{variant}-{r}"
            res = one_round(module, prev, evaluator, budget, out, variant == "proposal", step)
            # the live weights are the latest snapshot again (bitwise)
            live = module.state_dict()
            assert all(torch.equal(live[k], v) for k, v in res.pop("latest").tensors.items())
            del prev
            shutil.rmtree(out, ignore_errors=True)
            runs[variant].append(res)
    summary = {}
    for variant, rs in runs.items():
        total = median([x["total_s"] for x in rs])
        pass_s = median([x["pass_s"] for x in rs])
        non_pass = median([x["total_s"] - x["parts_s"]["passes"] for x in rs])
        parts = {k: median([x["parts_s"][k] for x in rs]) for k in rs[0]["parts_s"]}
        per_eval = parts["merges_and_restore"] / max(1, rs[0]["merge_calls"])
        fixed = non_pass - parts["merges_and_restore"]
        # pass time at which the non-pass share falls to 5 %: (F + n m) / (F + n m + n P) = 0.05
        n = budget
        p5 = 19 * (fixed + (n + 1) * per_eval) / n
        summary[variant] = {"round_s": total, "pass_s": pass_s,
                            "round_vs_budget_passes": total / (budget * pass_s),
                            "non_pass_s": non_pass, "non_pass_share": non_pass / total,
                            "parts_s": parts, "merge_s_per_call": per_eval,
                            "pass_s_for_5_percent": p5, "runs": rs}
    return {"model": name, "budget": budget, "heldout_batches": len(data),
            "heldout_shape": list(data[0]["input_ids"].shape), "estimated_pass_s": est,
            **summary}


# --------------------------------------------------------------------------- 3. memory (child)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(name: str, workdir: Path) -> dict:
    """Run in a fresh process: RSS of training with and without the callback's copies."""
    torch.set_num_threads(1)
    spec = MODELS[name]
    module = build_model(name)
    B = model_bytes(module)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = token_batches(1, spec["train_batch"], spec["block"], spec["vocab"], 3)[0]
    heldout = token_batches(1, 1, spec["block"], spec["vocab"], 4)
    evaluator = HeldoutEvaluator(heldout, resolve_metric("loss"))

    def train_step():
        loss = module(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    # warm-up: one throwaway round, so that imports and the interpreter's own caches (Lightning
    # loggers, the GP search) are in place before the baseline is taken
    warm = Snapshot.capture(module, 0)
    one_round(module, warm, evaluator, 3, workdir / "mem-warmup", False, 1)
    del warm
    shutil.rmtree(workdir / "mem-warmup", ignore_errors=True)
    train_step()
    r0 = _rss_kib("VmRSS") * 1024
    _reset_peak()
    evaluator(module)
    eval_peak = _rss_kib("VmHWM") * 1024 - r0
    out: dict[str, Any] = {"model": name, "model_bytes": B, "rss_training_bytes": r0,
                           "eval_pass_peak_extra_bytes": eval_peak}
    prev = Snapshot.capture(module, 1)
    train_step()
    out["between_rounds"] = (_rss_kib("VmRSS") * 1024 - r0) / B
    out["between_rounds_counted"] = prev.nbytes / B
    for variant, step in (("engine", 2), ("proposal", 3)):
        base = _rss_kib("VmRSS") * 1024
        _reset_peak()
        res = one_round(module, prev, evaluator, 3, workdir / f"mem-{variant}", variant == "proposal",
                        step)
        peak = _rss_kib("VmHWM") * 1024
        prev = res.pop("latest")  # the latest becomes the previous; the old one is dropped
        after = _rss_kib("VmRSS") * 1024
        shutil.rmtree(workdir / f"mem-{variant}", ignore_errors=True)
        # tensors alive at the peak, counted: previous + latest snapshots (+ the soup's own copy
        # in the engine; the proposal builds the soup inside the previous snapshot)
        counted = 2 + (1 if variant == "engine" else 0)
        out[variant] = {"during_round": (peak - r0) / B, "counted_tensor_copies": counted,
                        "during_round_without_eval_activations": (peak - r0 - eval_peak) / B,
                        "before_round": (base - r0) / B, "after_round": (after - r0) / B}
    return out


def bench_memory(name: str, workdir: Path) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "benchmarks.overhead", "--memory-child", name,
                        "--workdir", str(workdir)], env=env, capture_output=True, text=True,
                       cwd=root, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- 4. steps/s


def bench_steps(name: str, module, spec: dict, reps: int, timed_steps: int,
                workdir: Path) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from merge_callback import BayesMergeCallback
    from merge_callback.data import BlockDataset
    from merge_callback.lm import CausalLMModule

    steps = timed_steps + 3
    blocks = torch.randint(0, spec["vocab"], (spec["train_batch"] * steps, spec["block"]),
                           generator=torch.Generator().manual_seed(5))
    heldout = DataLoader(BlockDataset(blocks[:2]), batch_size=2)
    pl_module = CausalLMModule(module, lr=1e-4)

    class StepClock(Callback):
        def __init__(self):
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.starts.append(time.perf_counter())

    class SaveAtFirstStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                trainer.save_checkpoint(workdir / "steps.ckpt")

    per_rep: dict[str, list[float]] = {"with": [], "without": []}
    pooled: dict[str, list[float]] = {"with": [], "without": []}
    holds: list[bool] = []
    hook_s = None
    for r in range(reps):
        for variant in (["with", "without"] if r % 2 == 0 else ["without", "with"]):
            clock = StepClock()
            cbs: list = [clock, SaveAtFirstStep()]
            merge = None
            if variant == "with":
                merge = BayesMergeCallback(heldout=heldout, budget=3)
                cbs.append(merge)
            trainer = L.Trainer(default_root_dir=str(workdir), max_steps=steps, accelerator="cpu",
                                devices=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False,
                                num_sanity_val_steps=0, limit_val_batches=0, callbacks=cbs)
            loader = DataLoader(BlockDataset(blocks), batch_size=spec["train_batch"])
            trainer.fit(pl_module, loader)
            intervals = [b - a for a, b in zip(clock.starts, clock.starts[1:])]
            # intervals[0] holds the save, intervals[1] is a warm-up step
            per_rep[variant].append(median(intervals[2:]))
            pooled[variant] += intervals[2:]
            if merge is not None:
                holds.append(len(merge._ring) == 1)
                if hook_s is None:  # the callback's only per-step work: its batch-end hook
                    n = 20000
                    t = time.perf_counter()
                    for _ in range(n):
                        merge.on_train_batch_end(trainer, pl_module, None, None, 0)
                    hook_s = (time.perf_counter() - t) / n
            (workdir / "steps.ckpt").unlink(missing_ok=True)
    ratios = [wo / w for w, wo in zip(per_rep["with"], per_rep["without"])]
    step_s = {k: median(v) for k, v in pooled.items()}
    return {"model": name, "timed_steps": timed_steps, "reps": reps, "step_s": step_s,
            "step_s_runs": per_rep, "pooled_s": pooled, "callback_held_a_snapshot": all(holds),
            "steps_per_s_with_vs_without": step_s["without"] / step_s["with"],
            "per_rep_ratios": ratios, "hook_s": hook_s,
            "hook_bound": step_s["without"] / (step_s["without"] + hook_s)}


# --------------------------------------------------------------------------- 5. write


def bench_write(name: str, tensors: dict[str, Tensor], result, reps: int, ram: Path,
                disk: Path, disk_reps: int) -> dict:
    """``write_soup_files`` vs ``save_file``: on tmpfs (the code's own cost) and on disk."""
    from safetensors.torch import save_file

    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def variants(d: Path) -> dict[str, Callable[[], Any]]:
        def plain_fsync():
            save_file(tensors, str(d / "plain_fsync.safetensors"))
            with open(d / "plain_fsync.safetensors", "rb+") as f:
                os.fsync(f.fileno())

        return {"safetensors save_file (reference)":
                lambda: save_file(tensors, str(d / "plain.safetensors")),
                "save_file + fsync": plain_fsync,
                "engine write_soup_files": lambda: write_soup_files(d, "soup", tensors, result)}

    inner = 10 if nbytes < 64 * 2**20 else 1  # small files: time a loop of writes
    out = {"model": name, "bytes": nbytes, "writes_per_timing": inner}
    for where, root, n in (("ram", ram, reps), ("disk", disk, disk_reps)):
        d = root / f"write-{name}"
        d.mkdir(parents=True, exist_ok=True)
        vs = variants(d)
        times: dict[str, list[float]] = {k: [] for k in vs}
        for r in range(n):
            for k in (list(vs) if r % 2 == 0 else list(reversed(vs))):
                os.sync()
                t = time.perf_counter()
                for _ in range(inner):
                    vs[k]()
                times[k].append((time.perf_counter() - t) / inner)
                os.sync()
                for f in d.iterdir():
                    f.unlink()
        shutil.rmtree(d, ignore_errors=True)
        ref = median(times["safetensors save_file (reference)"])
        out[where] = {k: {"median_s": median(v), "times_s": v, "vs_save_file": median(v) / ref}
                      for k, v in times.items()}
    return out


# --------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


ENGINE_MERGE = "package lerp_tensors_ (one torch.lerp(out=) per tensor since this change)"
PROPOSAL_NOTE = ("Rows marked *proposal* run code defined in `benchmarks/overhead.py` (single-pass merges, the soup built inside the previous snapshot), bitwise equal in result. The package has since adopted both (`merge.lerp_tensors_` merges in one pass; with `history=2` the callback builds the soup in the previous snapshot), so the *proposal* numbers are the package's current round, and the unmarked round/memory rows show the earlier soup build.")
SINGLE_MERGE = "proposal: torch.lerp(out=) per tensor"
INPLACE_MERGE = "in place _foreach_lerp_ (proposal: soup in the previous copy)"
ENGINE_WRITE = "engine write_soup_files"


def render(res: dict, command: str) -> str:
    env = res["environment"]
    lines: list[str] = []
    w = lines.append
    by = {k: {x["model"]: x for x in res[k]} for k in ("merge", "round", "memory", "steps",
                                                        "write")}
    names = [m["model"] for m in res["models"]]
    w("# Overhead of the merge callback\n")
    w(f"Command: `{command}` (wall time {res['wall_s']:.0f} s).\n")
    w(f"Machine: {env['platform']}, {env.get('cpu_model') or env['processor']}, "
      f"{env['cpu_count']} CPU cores shared with other jobs (load average "
      f"{env['load_average_1_5_15_min'][0]:.1f} at the start, "
      f"{res['load_average_end'][0]:.1f} at the end), torch {env['torch']} with "
      f"{env['torch_threads']} thread, Lightning {env['lightning']}, transformers "
      f"{env['transformers']}. **No GPU**: the CUDA path (pinned host snapshots, asynchronous "
      "copies, merges on the device, autocast evaluation) was not measured; see `docs/scale.md`.\n")
    w("Every number is a ratio of runs interleaved in this one process (medians of the "
      "repetitions); raw times are in `overhead.json`. " + PROPOSAL_NOTE + "\n")
    w("Models: " + ", ".join(f"{m['model']} ({m['params'] / 1e6:.1f}M parameters, "
                             f"{m['bytes'] / 2**20:.0f} MiB fp32)" for m in res["models"])
      + ". The tiny one is the default model of `examples/lightning_gpt_neox.py`; the other is "
        "a Pythia-160M shaped GPT-NeoX with random weights.\n")

    w("## Summary\n")
    w("| measure | target | " + " | ".join(names) + " |")
    w("|---|---|" + "---|" * len(names))

    def row(label, target, fn):
        w(f"| {label} | {target} | " + " | ".join(fn(n) for n in names) + " |")

    def merge_frac(n, k):
        return by["merge"][n]["rows"][k]["copy_bandwidth_fraction"]

    row("merge kernel, copy_ bandwidth fraction (copy_ time / merge time)", "≥ 0.9",
        lambda n: f"{merge_frac(n, ENGINE_MERGE):.2f} {verdict(merge_frac(n, ENGINE_MERGE) >= 0.9)}"
                  f" (*proposal* {merge_frac(n, SINGLE_MERGE):.2f})")
    row("round: share that is not a held-out pass (budget 10, pass ≈ 1 s)", "≤ 5 %",
        lambda n: f"{100 * by['round'][n]['engine']['non_pass_share']:.0f} % "
                  f"{verdict(by['round'][n]['engine']['non_pass_share'] <= 0.05)} (*proposal* "
                  f"{100 * by['round'][n]['proposal']['non_pass_share']:.0f} %)")
    row("round wall time / (budget × one pass)", "≤ 1.05",
        lambda n: f"{by['round'][n]['engine']['round_vs_budget_passes']:.2f}")
    row("pass time at which the non-pass share is 5 %", "≤ 1 s",
        lambda n: f"{by['round'][n]['engine']['pass_s_for_5_percent']:.1f} s (*proposal* "
                  f"{by['round'][n]['proposal']['pass_s_for_5_percent']:.1f} s)")
    row("extra host memory between rounds / model bytes (peak RSS)", "≤ 1.05",
        lambda n: f"{by['memory'][n]['between_rounds']:.2f} "
                  f"{verdict(by['memory'][n]['between_rounds'] <= 1.05)}")
    row("extra host memory during a round / model bytes (peak RSS)", "≤ 2.05",
        lambda n: f"{by['memory'][n]['engine']['during_round']:.2f} "
                  f"{verdict(by['memory'][n]['engine']['during_round'] <= 2.05)} (*proposal* "
                  f"{by['memory'][n]['proposal']['during_round']:.2f})")
    row("training steps/s with / without the callback, outside rounds", "≥ 0.99",
        lambda n: f"{by['steps'][n]['steps_per_s_with_vs_without']:.3f} "
                  f"{verdict(by['steps'][n]['steps_per_s_with_vs_without'] >= 0.99)}; hook "
                  f"bound {by['steps'][n]['hook_bound']:.6f}")
    row("soup write / `save_file`, tmpfs (the code's own cost)", "≤ 1.1",
        lambda n: f"{by['write'][n]['ram'][ENGINE_WRITE]['vs_save_file']:.2f} "
                  f"{verdict(by['write'][n]['ram'][ENGINE_WRITE]['vs_save_file'] <= 1.1)}")
    row("soup write / `save_file`, disk (write includes fsync)", "≤ 1.1",
        lambda n: f"{by['write'][n]['disk'][ENGINE_WRITE]['vs_save_file']:.2f} "
                  f"{verdict(by['write'][n]['disk'][ENGINE_WRITE]['vs_save_file'] <= 1.1)}")
    w("")

    w("## 1. Merge kernel vs `copy_` of the same tensors\n")
    w("Every candidate λ writes `lerp(previous, latest, λ)` into the live weights; the restore is "
      "a copy. `copy_` here copies the latest snapshot into the live weights tensor by tensor.\n")
    for n in names:
        x = by["merge"][n]
        w(f"**{n}** ({x['bytes'] / 2**20:.0f} MiB of float tensors, λ = {x['lam']}, "
          f"{len(x['rows'][ENGINE_MERGE]['times_s'])} interleaved repetitions):\n")
        w("| kernel | median ms | time / copy_ | copy_ bandwidth fraction |")
        w("|---|---|---|---|")
        for k, v in x["rows"].items():
            w(f"| {k} | {1e3 * v['median_s']:.2f} | {v['time_vs_copy']:.2f} | "
              f"{v['copy_bandwidth_fraction']:.2f} |")
        eq = x["bitwise_equal_to_engine"]
        w(f"\nBitwise equal to the engine's merge: single pass {eq['single_pass']}, in place "
          f"{eq['in_place']}. Each timing is the mean of {x['calls_per_timing']} call(s).\n")
    w("With 7 MiB of weights the tensors can stay in the CPU caches and per-call overheads weigh "
      "in: the tiny model's fractions say little about memory bandwidth; the large model's do.\n")

    w("## 2. A round vs budget × one held-out pass\n")
    w("The round as `BayesMergeCallback` runs it at a checkpoint save: snapshot of the live "
      "weights, `run_round` (budget 10; the previous checkpoint's value known from the last round, "
      "so no λ = 0 evaluation), the soup, `write_soup_files`, logging to a `CSVLogger`. Soup files "
      "go to tmpfs here, so that disk noise stays out (section 5 has disk numbers). *Proposal*: "
      "single-pass merges and the soup built in place in the previous snapshot.\n")
    sr = res["search"]
    for n in names:
        x = by["round"][n]
        w(f"**{n}**: held-out {x['heldout_batches']} batch(es) of {x['heldout_shape'][0]}×"
          f"{x['heldout_shape'][1]} tokens.\n")
        w("| variant | round s | one pass s | round / (budget × pass) | not a pass, s | share | "
          "pass time for a 5 % share |")
        w("|---|---|---|---|---|---|---|")
        for v in ("engine", "proposal"):
            y = x[v]
            w(f"| {'engine (today)' if v == 'engine' else '*proposal*'} | {y['round_s']:.2f} | "
              f"{y['pass_s']:.3f} | {y['round_vs_budget_passes']:.3f} | {y['non_pass_s']:.2f} | "
              f"{100 * y['non_pass_share']:.1f} % | {y['pass_s_for_5_percent']:.2f} s |")
        parts = [p for p in x["engine"]["parts_s"] if p != "passes"]
        w("\nSeconds per round that are not a held-out pass:\n")
        w("| variant | " + " | ".join(parts) + " |")
        w("|---|" + "---|" * len(parts))
        for v in ("engine", "proposal"):
            w(f"| {v} | " + " | ".join(f"{x[v]['parts_s'][p]:.3f}" for p in parts) + " |")
        w("")
    w(f"The λ search on its own (`search_lambda`, bayes/gp_hedge, budget {sr['budget']}, an "
      f"objective that returns at once) takes {sr['median_s']:.2f} s (median of "
      f"{len(sr['times_s'])}).\n")

    w("## 3. Extra host memory / model bytes\n")
    w("Peak RSS (`VmHWM`, reset before each round) minus the RSS of training alone (AdamW, after "
      "a few steps and one throwaway round), in a fresh process with `MALLOC_MMAP_THRESHOLD_=65536`"
      " so that freed tensors go back to the OS. Rounds use budget 3 and one held-out batch; the "
      "pass's own activations are measured alone and shown. In brackets: copies of the weights "
      "alive at the peak, counted.\n")
    w("| model | between rounds | during a round, engine | engine less eval activations | "
      "*proposal* | *proposal* less eval activations | eval pass activations |")
    w("|---|---|---|---|---|---|---|")
    for n in names:
        x = by["memory"][n]
        w(f"| {n} | {x['between_rounds']:.3f} ({x['between_rounds_counted']:.0f}) | "
          f"{x['engine']['during_round']:.3f} ({x['engine']['counted_tensor_copies']}) | "
          f"{x['engine']['during_round_without_eval_activations']:.3f} | "
          f"{x['proposal']['during_round']:.3f} ({x['proposal']['counted_tensor_copies']}) | "
          f"{x['proposal']['during_round_without_eval_activations']:.3f} | "
          f"{x['eval_pass_peak_extra_bytes'] / x['model_bytes']:.3f} |")
    w("")

    w("## 4. Training steps/s outside rounds, with vs without the callback\n")
    w("Fits with and without the callback alternate; each saves one checkpoint at step 1 (the "
      "callback takes its snapshot there and holds it), then the timed steps save nothing. Ratio "
      "of the medians of all timed steps. The hook bound is step / (step + one call of the "
      "callback's `on_train_batch_end`), timed over 20,000 calls: the callback's only per-step "
      "work outside rounds.\n")
    w("| model | timed steps × fits each | step s without | step s with | steps/s with / without"
      " | per-fit ratios | hook µs | hook bound |")
    w("|---|---|---|---|---|---|---|---|")
    for n in names:
        x = by["steps"][n]
        w(f"| {n} | {x['timed_steps']} × {x['reps']} | {x['step_s']['without']:.4f} | "
          f"{x['step_s']['with']:.4f} | {x['steps_per_s_with_vs_without']:.3f} | "
          + ", ".join(f"{r:.3f}" for r in x["per_rep_ratios"])
          + f" | {1e6 * x['hook_s']:.2f} | {x['hook_bound']:.6f} |")
    held = all(by["steps"][n]["callback_held_a_snapshot"] for n in names)
    w(f"\nThe callback held its snapshot during every timed window: {held}.\n")

    w("## 5. Soup write vs `safetensors.torch.save_file`\n")
    w("`write_soup_files` = `save_file` to a temporary name, fsync, rename, fsync of the folder, "
      "then the JSON sidecar the same way. tmpfs shows the code's own cost (fsync is free there); "
      "the disk is shared with other jobs.\n")
    for n in names:
        x = by["write"][n]
        w(f"**{n}** ({x['bytes'] / 2**20:.0f} MiB):\n")
        w("| writer | tmpfs median s | tmpfs / save_file | disk median s | disk / save_file |")
        w("|---|---|---|---|---|")
        for k in x["ram"]:
            a, b = x["ram"][k], x["disk"][k]
            w(f"| {k} | {a['median_s']:.3f} | {a['vs_save_file']:.2f} | {b['median_s']:.3f} | "
              f"{b['vs_save_file']:.2f} |")
        w("")
    w(analysis(res, by, names))
    return "\n".join(lines) + "\n"


def analysis(res: dict, by: dict, names: list[str]) -> str:
    big = names[-1]
    m = by["merge"][big]["rows"]
    r = by["round"][big]
    e, p = r["engine"], r["proposal"]
    mem = by["memory"][big]
    wr = by["write"]
    copy_s = m["copy_ (reference)"]["median_s"]
    tiny = names[0]
    out = ["## Targets missed, and why\n"]
    out.append(
        f"- **Merge kernel** ({big}: {m[ENGINE_MERGE]['copy_bandwidth_fraction']:.2f} of copy_ "
        "bandwidth, target 0.9). `lerp_tensors_` makes two passes: `_foreach_copy_` of the "
        "previous snapshot into the live weights, then `_foreach_lerp_` toward the latest. One "
        f"`torch.lerp(previous, latest, λ, out=live)` per tensor does it in one pass "
        f"({m[SINGLE_MERGE]['copy_bandwidth_fraction']:.2f}, bitwise the same). It still reads two "
        "tensors where a copy reads one, so a merge into a third buffer stays below copy "
        "bandwidth on any memory-bound device. Only a lerp in place into a buffer that already "
        f"holds one operand reaches it ({m[INPLACE_MERGE]['copy_bandwidth_fraction']:.2f}): that "
        "is how the soup that gets written can be built (in the previous snapshot, which the "
        "round drops anyway), but not the candidates, which must be written into the live "
        "weights.")
    out.append(
        f"- **Round** ({big}: {100 * e['non_pass_share']:.0f} % of the round is not a held-out "
        f"pass with a {e['pass_s']:.1f} s pass; target 5 % at ≥ 1 s). Per round: snapshot "
        f"{e['parts_s']['snapshot']:.2f} s ({e['parts_s']['snapshot'] / copy_s:.1f}× a copy_ "
        "of the weights: the snapshot's memory is allocated fresh and its pages are faulted in), "
        "merges and restore "
        f"{e['parts_s']['merges_and_restore']:.2f} s ({e['merge_s_per_call']:.2f} s per "
        f"evaluation), λ search {e['parts_s']['search']:.2f} s (Gaussian-process fits, the same "
        f"for any model size: {res['search']['median_s']:.2f} s alone), soup "
        f"{e['parts_s']['soup']:.2f} s, write {e['parts_s']['write']:.2f} s. With single-pass "
        "merges and the soup built in place the non-pass time falls to "
        f"{p['non_pass_s']:.1f} s; on this CPU a 5 % share then needs a pass of "
        f"{p['pass_s_for_5_percent']:.0f} s or more (today {e['pass_s_for_5_percent']:.0f} s). "
        "The per-evaluation merge (a memory-bound pass over the weights) is what no change removes "
        f"on a CPU: {100 * p['merge_s_per_call'] / p['pass_s']:.0f} % of a held-out pass here "
        "even with one pass per merge. On a GPU "
        "the same merge runs at device bandwidth (milliseconds for 160M parameters), where the "
        f"{res['search']['median_s']:.1f} s of search and the host-side snapshot and write "
        "remain the fixed cost.")
    out.append(
        f"- **Memory during a round** ({big}: {mem['engine']['during_round']:.2f} × model bytes, "
        "target 2.05). The round holds the previous snapshot, the latest snapshot and the soup "
        "built by `soup_state_dict` (a third copy). Building the soup in place in the previous "
        f"snapshot measures {mem['proposal']['during_round']:.2f}.")
    ref = "safetensors save_file (reference)"
    ram_r = ", ".join(f"{n} {wr[n]['ram'][ENGINE_WRITE]['vs_save_file']:.2f}×" for n in names)
    disk_r = ", ".join(f"{n} {wr[n]['disk'][ENGINE_WRITE]['vs_save_file']:.2f}×" for n in names)
    spread = max(max(wr[n]["disk"][ref]["times_s"]) / min(wr[n]["disk"][ref]["times_s"])
                 for n in names)
    out.append(
        f"- **Soup write** (tmpfs: {ram_r}; disk: {disk_r} `save_file`). On tmpfs, where an fsync "
        "costs nothing, the writer's own code (a temporary name, a rename, the JSON sidecar) adds "
        "nothing measurable to `save_file`. On a disk it also fsyncs the data, so that the soup "
        "is durable before its sidecar marks it complete, while `save_file` returns with the data "
        "still in the page cache: the difference is the price of that durability, set by the "
        "disk. This disk is shared with other jobs: the same `save_file` varied "
        f"{spread:.1f}× between repetitions (raw times in `overhead.json`), so the disk ratios "
        "say little beyond that.")
    st = by["steps"]
    missed = [n for n in names if st[n]["steps_per_s_with_vs_without"] < 0.99]
    spread = "; ".join(f"{n}: " + ", ".join(f"{r:.3f}" for r in st[n]["per_rep_ratios"])
                       for n in names)
    verdict_text = ("met" if not missed else
                    "missed end to end on " + ", ".join(
                        f"{n} ({st[n]['steps_per_s_with_vs_without']:.3f})" for n in missed))
    out.append(
        f"- **Training steps/s**: {verdict_text}. Outside rounds the callback's only work is an "
        "early return from `on_train_batch_end` (hook bound "
        + ", ".join(f"{st[n]['hook_bound']:.6f}" for n in names)
        + "); the snapshot it holds is not touched. The end-to-end ratio of one fit pair moves by "
        f"several percent on this shared machine, in both directions (per-fit ratios {spread}).")
    return "\n".join(out) + "\n"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model only, one repetition")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the .md from the existing .json, measuring nothing")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.render_only:
        stem = "overhead_quick" if args.quick else "overhead"
        res = json.loads((Path(args.out) / f"{stem}.json").read_text())
        command = "python -m benchmarks.overhead" + (" --quick" if args.quick else "")
        (Path(args.out) / f"{stem}.md").write_text(render(res, command))
        return 0
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, Path(args.workdir))))
        return 0
    command = "python -m benchmarks.overhead" + (" --quick" if args.quick else "")
    t_start = time.perf_counter()
    env = environment()
    env["cpu_model"] = cpu_model()
    names = ["tiny"] if args.quick else ["tiny", "pythia-160m"]
    reps = {"merge": 1 if args.quick else 5, "round": 1 if args.quick else 2,
            "write": 1 if args.quick else 5, "disk_write": 1 if args.quick else 3}
    res: dict[str, Any] = {"environment": env, "targets": TARGETS, "models": [], "merge": [],
                           "round": [], "memory": [], "steps": [], "write": []}
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="overhead-") as disk_tmp, \
            tempfile.TemporaryDirectory(prefix="overhead-",
                                        dir=shm if shm.is_dir() else None) as ram_tmp:
        disk, ram = Path(disk_tmp), Path(ram_tmp)
        log("search alone (instant objective)")
        res["search"] = bench_search(budget=10, reps=1 if args.quick else 3)
        for name in names:
            log(f"{name}: building")
            module = build_model(name)
            module.eval()
            spec = MODELS[name]
            res["models"].append({"model": name, "params": sum(p.numel() for p in
                                                               module.parameters()),
                                  "bytes": model_bytes(module)})
            log(f"{name}: merge kernel")
            prev = Snapshot.capture(module, 0)
            perturb_(module, seed=0)
            latest = Snapshot.capture(module, 1)
            res["merge"].append(bench_merge(name, module, prev, latest, reps["merge"]))
            log(f"{name}: soup write")
            soup = soup_state_dict(prev, latest, 0.7)
            dummy = run_round(module, prev, latest, lambda m: 1.0, RoundConfig(budget=3),
                              value_previous=1.0)
            res["write"].append(bench_write(name, soup, dummy, reps["write"], ram, disk,
                                            reps["disk_write"]))
            del soup, prev, latest
            log(f"{name}: rounds")
            res["round"].append(bench_round(name, module, spec, reps["round"], budget=10,
                                            target_pass_s=1.0, workdir=ram))
            log(f"{name}: memory (fresh process)")
            res["memory"].append(bench_memory(name, ram))
            log(f"{name}: training steps/s")
            module.train()
            res["steps"].append(bench_steps(name, module, spec,
                                            reps=1 if args.quick else spec["step_reps"],
                                            timed_steps=spec["step_timed"], workdir=ram))
            del module
    res["wall_s"] = time.perf_counter() - t_start
    res["load_average_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "overhead_quick" if args.quick else "overhead"
    atomic_write_json(out / f"{stem}.json", res)
    (out / f"{stem}.md").write_text(render(res, command))
    log(f"wrote {out / stem}.md and .json in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
