"""Two-process transformers.Trainer run (gloo, CPU) of the real BayesMergeTrainerCallback under
DeepSpeed ZeRO-2 or ZeRO-3; started by test_zero.py through ``torch.distributed.run``.

In the same two processes: (1) trains 8 steps with the callback, saving checkpoints at steps 4
and 8 (a round at step 8), and saves the consolidated weights of both saves (gathered for the
checks only); (2) trains again without the callback (bitwise comparison); (3) resumes (1)'s
step-4 checkpoint with a fresh callback, which must redo the same round and write the same soup;
(4) starts a run with ``history=3``, refused under ZeRO-3 (the message is recorded).
Usage: hf_zero_script.py OUT_DIR {zero2,zero3}
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from torch.utils.data import DataLoader  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lightning_helpers import VOCAB, exit_without_teardown, token_blocks  # noqa: E402
from merge_callback.data import BlockDataset, tiny_gpt_neox  # noqa: E402
from merge_callback.hf import BayesMergeTrainerCallback  # noqa: E402
from strategies_cpu import also_write_fixed_soup, gather_full  # noqa: E402

MAX_STEPS, EVERY = 8, 4


def collate(items):
    ids = torch.stack([it["input_ids"] for it in items])
    return {"input_ids": ids, "labels": ids.clone()}


def tiny_model():
    return tiny_gpt_neox(VOCAB, seed=0, hidden_size=32, num_layers=2, num_heads=4, max_len=32)


def heldout_loader() -> DataLoader:
    return DataLoader(BlockDataset(token_blocks(24, seed=2)), batch_size=8, collate_fn=collate)


def ds_config(kind: str) -> dict:
    zero = {"stage": 2} if kind == "zero2" else {"stage": 3,
                                                 "stage3_param_persistence_threshold": 0}
    return {"zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": "auto",
                                                      "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto"}},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto"}


class KeepingMergeCallback(BayesMergeTrainerCallback):
    """The real callback; after each round it also writes the pairwise soup at a fixed λ = 0.7
    (``fixed_dir``, written like the round's soup files) and keeps the round's observations."""

    def __init__(self, *args, fixed_dir: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed_dir, self.observations = fixed_dir, []

    def _runtime(self, args, state, target, processing_class):
        rt = super()._runtime(args, state, target, processing_class)
        rt.write = also_write_fixed_soup(rt.write, self.fixed_dir, "soup-", args.should_save,
                                         self.observations)
        return rt


class FullWeights(TrainerCallback):
    """Consolidated weights at every save (rank zero writes ``full-<step>.pt``) (collective)."""

    def __init__(self, out: Path):
        self.out = out

    def on_save(self, args, state, control, model=None, **kwargs):
        full = gather_full(model)
        if state.is_world_process_zero:
            torch.save(full, self.out / f"full-{state.global_step}.pt")


def train(out: Path, kind: str, callbacks, resume=None) -> tuple[Trainer, dict]:
    out.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(output_dir=str(out), max_steps=MAX_STEPS, save_steps=EVERY,
                             per_device_train_batch_size=4, learning_rate=1e-2,
                             lr_scheduler_type="constant", report_to="none", use_cpu=True,
                             ddp_backend="gloo", logging_steps=1, disable_tqdm=True, seed=0,
                             deepspeed=ds_config(kind))
    trainer = Trainer(model=tiny_model(), args=args,
                      train_dataset=BlockDataset(token_blocks(80, seed=1)),
                      data_collator=collate, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return trainer, {"losses": losses, "final": gather_full(trainer.model)}


def main(out: Path, kind: str) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cb = KeepingMergeCallback(heldout=heldout_loader(), budget=3,
                              soup_dir=out / "merge" / "soups", fixed_dir=out / "merge" / "fixed")
    trainer, merged = train(out / "merge", kind, [FullWeights(out / "merge"), cb])
    t1 = time.perf_counter()
    _, plain = train(out / "plain", kind, [])
    t2 = time.perf_counter()
    again = KeepingMergeCallback(heldout=heldout_loader(), budget=3,
                                 soup_dir=out / "resume" / "soups",
                                 fixed_dir=out / "resume" / "fixed")
    _, resumed = train(out / "resume", kind, [again], resume=out / "merge" / "checkpoint-4")
    refusal = None
    try:  # averaging families need full weights: refused at train begin under ZeRO-3
        train(out / "refused", kind, [BayesMergeTrainerCallback(heldout=heldout_loader(),
                                                                history=3)])
    except ValueError as e:
        refusal = str(e)
    rank = trainer.args.process_index
    record = {"world_size": trainer.args.world_size, "mode": cb._mode, "history": cb.history,
              "observations": cb.observations, "resume_observations": again.observations,
              "balanced": cb._evaluator.balanced,
              "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
              "losses_equal": merged["losses"] == plain["losses"], "losses": merged["losses"],
              "final_keys_equal": sorted(merged["final"]) == sorted(plain["final"]),
              "final_bitwise": all(torch.equal(merged["final"][k], plain["final"][k])
                                   for k in plain["final"]),
              "fit_seconds": [t1 - t0, t2 - t1, time.perf_counter() - t2],
              "resume_history": again.history, "refusal": refusal,
              "resume_losses_equal": resumed["losses"][-EVERY:] == plain["losses"][EVERY:],
              "resume_final_bitwise": all(torch.equal(resumed["final"][k], plain["final"][k])
                                          for k in plain["final"])}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    exit_without_teardown()  # every rank has written its results


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
