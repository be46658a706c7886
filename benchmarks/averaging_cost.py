"""Per-step cost of the averaging options: training steps/s and host memory, side by side.

Every option trains the same module under a fresh Lightning ``Trainer`` for a few steps; the
options take turns (round robin, several rounds) in one process so that the machine's load hits
all of them alike, and only ratios to plain training are reported. The steps/s window starts after
``snapshot_every`` steps and spans whole snapshot periods, so snapshots and EMA-track updates are
amortised exactly as in a long run. No checkpoint is saved, so no merge round runs: what is
measured is the price of keeping the averages, paid at every step whether or not a soup is made.

Options: no averaging; ``BayesMergeCallback`` as in the paper (``history=2``, nothing per step);
with snapshots (``history=8, snapshot_every=10``); the recommended settings (plus EMA tracks
``0.99, 0.995, 0.998, 0.999``); what users run instead: Lightning's ``EMAWeightAveraging`` (one
decay, every step) and four per-step EMAs (one per decay the callback carries).

Models: the example's model (``examples/lightning_gpt_neox.py`` defaults: hidden 128, 4 layers,
vocab 4096, batch 16x128) and a Pythia-160M-shaped GPT-NeoX (hidden 768, 12 layers, 12 heads,
vocab 50304, random init) at a small batch.

Usage::

    python benchmarks/averaging_cost.py          # -> benchmarks/results/averaging_cost.{md,json}
    python benchmarks/averaging_cost.py --quick  # tiny smoke run -> averaging_cost_quick.*
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.averaging import PerStepEMA, environment, log  # noqa: E402
from merge_callback.io import atomic_write_bytes, atomic_write_json  # noqa: E402

DECAYS = (0.99, 0.995, 0.998, 0.999)
SNAPSHOT_EVERY = 10


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    batch_size: int
    block_size: int
    measured_steps: int  # a multiple of SNAPSHOT_EVERY
    rounds: int
    options: tuple[str, ...]


ALL_OPTIONS = ("none", "paper", "snapshots", "recommended", "lightning_ema", "per_step_ema4")
OPTION_TITLES = {
    "none": "no averaging",
    "paper": "BayesMergeCallback() — paper, history=2",
    "snapshots": f"BayesMergeCallback(history=8, snapshot_every={SNAPSHOT_EVERY})",
    "recommended": f"BayesMergeCallback(history=8, snapshot_every={SNAPSHOT_EVERY}, "
                   f"ema_decays={DECAYS}) — recommended",
    "lightning_ema": "Lightning EMAWeightAveraging(decay=0.999), every step",
    "per_step_ema4": f"per-step EMA for {len(DECAYS)} decays, every step",
}

MODELS = (
    ModelSpec("example model (hidden 128, 4 layers, vocab 4096)", 4096, 128, 4, 4, 16, 128,
              measured_steps=30, rounds=3, options=ALL_OPTIONS),
    ModelSpec("Pythia-160M shape (hidden 768, 12 layers, vocab 50304)", 50304, 768, 12, 12, 1, 64,
              measured_steps=10, rounds=2,
              options=("none", "recommended", "lightning_ema", "per_step_ema4")),
)
QUICK_MODELS = (
    ModelSpec("tiny (hidden 32, 2 layers, vocab 256)", 256, 32, 2, 4, 4, 32, measured_steps=10,
              rounds=2, options=ALL_OPTIONS),
)


class StepTimer(L.Callback):
    """Wall-clock and process CPU time at the end of every optimizer step (put it last)."""

    def __init__(self):
        self.times: dict[int, tuple[float, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times[trainer.global_step] = (time.perf_counter(), time.process_time())


def _distinct_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _make_option(name: str, heldout: list
                 ) -> tuple[list[L.Callback], Callable[[], tuple[int, int, int]]]:
    """The callbacks of an option and a function returning ``(bytes held, copies held, copies
    held in steady state)`` by its averages (a copy = one snapshot of the weights)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from merge_callback import BayesMergeCallback

    if name == "none":
        return [], lambda: (0, 0, 0)
    if name in ("paper", "snapshots", "recommended"):
        kw: dict[str, Any] = {}
        if name != "paper":
            kw = dict(history=8, snapshot_every=SNAPSHOT_EVERY)
        if name == "recommended":
            kw["ema_decays"] = DECAYS
        cb = BayesMergeCallback(heldout=heldout, **kw)

        def held() -> tuple[int, int, int]:
            ring, emas = cb.schedule.ring, [e for e in cb.schedule.emas if e.snapshot is not None]
            tensors = [t for s in ring for t in s.tensors.values()]
            tensors += [t for e in emas for t in e.snapshot.tensors.values()]
            # steady state: `history` snapshots just before a save, plus one per EMA track
            steady = (cb.history_size if cb.snapshot_every else cb.history_size - 1) + len(emas)
            return _distinct_bytes(tensors), len(ring) + len(emas), steady

        return [cb], held
    if name == "lightning_ema":
        cb = EMAWeightAveraging(decay=0.999)

        def held() -> tuple[int, int, int]:
            m = cb._average_model  # noqa: SLF001
            return _distinct_bytes([*m.parameters(), *m.buffers()]), 1, 1

        return [cb], held
    if name == "per_step_ema4":
        cb = PerStepEMA(DECAYS)
        return [cb], lambda: (_distinct_bytes([t for ts in cb.ema.values() for t in ts]),
                              len(cb.ema), len(cb.ema))
    raise ValueError(f"unknown option {name!r}")


def measure(spec: ModelSpec) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset, tiny_gpt_neox
    from merge_callback.lm import CausalLMModule

    warm = SNAPSHOT_EVERY
    total = warm + spec.measured_steps
    model = tiny_gpt_neox(spec.vocab_size, seed=0, hidden_size=spec.hidden_size,
                          num_layers=spec.num_layers, num_heads=spec.num_heads,
                          max_len=spec.block_size)
    module = CausalLMModule(model, lr=1e-4)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = _distinct_bytes(module.state_dict().values())
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, spec.vocab_size, (spec.batch_size * total, spec.block_size),
                           generator=g)
    heldout = [{"input_ids": blocks[:1]}]
    rates: dict[str, list[float]] = {o: [] for o in spec.options}
    cpu_rates: dict[str, list[float]] = {o: [] for o in spec.options}
    held: dict[str, tuple[int, int, int]] = {}
    for r in range(spec.rounds):
        order = spec.options if r % 2 == 0 else tuple(reversed(spec.options))
        for opt in order:
            callbacks, held_fn = _make_option(opt, heldout)
            timer = StepTimer()
            trainer = L.Trainer(max_steps=total, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0,
                                limit_val_batches=0, callbacks=[*callbacks, timer])
            loader = DataLoader(BlockDataset(blocks), batch_size=spec.batch_size, shuffle=False)
            trainer.fit(module, loader)
            (w1, c1), (w0, c0) = timer.times[total], timer.times[warm]
            rate, cpu_rate = spec.measured_steps / (w1 - w0), spec.measured_steps / (c1 - c0)
            rates[opt].append(rate)
            cpu_rates[opt].append(cpu_rate)
            held[opt] = held_fn()
            log(f"  round {r} {opt}: {rate:.3f} steps/s wall, {cpu_rate:.3f} per CPU second, "
                f"holds {held[opt][0] / 2**20:.1f} MiB")
            del trainer, callbacks, held_fn
            gc.collect()
    base = statistics.median(rates["none"])
    cpu_base = statistics.median(cpu_rates["none"])
    rows = []
    for opt in spec.options:
        # each round's rate relative to the same round's baseline, then the median over rounds
        ratios = [a / b for a, b in zip(rates[opt], rates["none"])]
        cpu_ratios = [a / b for a, b in zip(cpu_rates[opt], cpu_rates["none"])]
        rows.append({"option": opt, "title": OPTION_TITLES[opt], "steps_per_s": rates[opt],
                     "ratio_to_none": statistics.median(ratios), "ratios": ratios,
                     "steps_per_cpu_s": cpu_rates[opt],
                     "cpu_ratio_to_none": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios,
                     "held_bytes": held[opt][0], "held_copies": held[opt][1],
                     "steady_copies": held[opt][2],
                     "steady_bytes": held[opt][2] * weight_bytes})
        if opt in ("snapshots", "recommended"):  # a snapshot is exactly the state dict's size
            assert held[opt][0] == held[opt][1] * weight_bytes, (opt, held[opt], weight_bytes)
    return {"model": spec.name, "parameters": params, "weight_bytes": weight_bytes,
            "batch": f"{spec.batch_size}x{spec.block_size}", "measured_steps": spec.measured_steps,
            "warmup_steps": warm, "rounds": spec.rounds, "baseline_steps_per_s": base,
            "baseline_steps_per_cpu_s": cpu_base,
            "rows": rows}


def report(results: Sequence[dict], env: dict, wall: float, quick: bool) -> str:
    lines = ["# Per-step cost of keeping the averages", "",
             f"Generated by `python benchmarks/averaging_cost.py{' --quick' if quick else ''}`. "
             "Each option trains the same module in turn (round robin, order reversed every "
             "other round) in one process; a rate is measured over whole snapshot periods after "
             f"{SNAPSHOT_EVERY} warm-up steps; the ratio is each round's rate over the same "
             "round's rate without averaging, median over rounds. Rates are given per CPU second of the "
             "process (`time.process_time`, one torch thread: insensitive to other processes on "
             "a shared machine) and per wall-clock second. No checkpoint is saved, so no "
             "merge round runs (its cost is the held-out evaluations, reported by the quality "
             "benchmark). Memory: what the option's averages hold on the host at the end of a "
             "turn (measured), and in steady state (`history` snapshots just before a save plus "
             "one per EMA track; a copy is exactly the fp32 weights' size, checked). Absolute rates depend on the shared machine's "
             "load and are not the point; the ratios are.", ""]
    for res in results:
        lines += [f"## {res['model']}", "",
                  f"{res['parameters']:,} parameters ({res['weight_bytes'] / 2**20:.1f} MiB in "
                  f"fp32), batch {res['batch']} tokens, {res['measured_steps']} measured steps "
                  f"per turn, {res['rounds']} rounds; plain training "
                  f"{res['baseline_steps_per_s']:.3f} steps/s wall-clock, "
                  f"{res['baseline_steps_per_cpu_s']:.3f} steps per CPU second (medians).", "",
                  "| option | steps per CPU second, ratio to no averaging (median; per round) | "
                  "steps/s wall-clock, ratio (median; per round) | held at the end (copies) | "
                  "steady state between saves (copies) |", "|---|---|---|---|---|"]
        for row in res["rows"]:
            per = ", ".join(f"{x:.3f}" for x in row["ratios"])
            cper = ", ".join(f"{x:.3f}" for x in row["cpu_ratios"])
            lines.append(f"| {row['title']} | {row['cpu_ratio_to_none']:.3f} ({cper}) | "
                         f"{row['ratio_to_none']:.3f} ({per}) | "
                         f"{row['held_bytes'] / 2**20:.1f} MiB ({row['held_copies']}) | "
                         f"{row['steady_bytes'] / 2**20:.1f} MiB ({row['steady_copies']}) |")
        lines.append("")
    lines += ["Total wall time " f"{wall:.0f} s. " + ", ".join(f"{k} {v}" for k, v in env.items()),
              ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one tiny model, few steps")
    p.add_argument("--out", default=str(_ROOT / "benchmarks" / "results"))
    p.add_argument("--models", nargs="+", type=int, default=None,
                   help="indices into the model list (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    specs = QUICK_MODELS if args.quick else MODELS
    if args.models is not None:
        specs = tuple(specs[i] for i in args.models)
    t0 = time.perf_counter()
    results = []
    for spec in specs:
        log(f"model: {spec.name}")
        results.append(measure(spec))
    wall = time.perf_counter() - t0
    env = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "averaging_cost_quick" if args.quick else "averaging_cost"
    atomic_write_json(out / f"{stem}.json", {"results": results, "wall_seconds": wall,
                                             "environment": env})
    atomic_write_bytes(out / f"{stem}.md", report(results, env, wall, args.quick).encode())
    log(f"wrote {out / stem}.{{md,json}} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    from merge_callback.console import quiet_third_party

    with quiet_third_party():  # Lightning's banner and tips; our lines and warnings stay
        raise SystemExit(main())
