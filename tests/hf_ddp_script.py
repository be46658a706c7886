"""Two-process DDP run (gloo, CPU) of a transformers.Trainer with BayesMergeTrainerCallback.

Started by test_hf.py through ``python -m torch.distributed.run --nproc_per_node 2``.
Usage: hf_ddp_script.py OUT_DIR [averaging|auto]  (averaging: history=4, snapshots, EMA tracks;
auto: averaging="auto" with its snapshot store)
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from transformers import Trainer, TrainingArguments  # noqa: E402

from lightning_helpers import exit_without_teardown  # noqa: E402
from merge_callback import BayesMergeTrainerCallback  # noqa: E402
from test_hf import collate, heldout_set, tiny_model, train_set  # noqa: E402


MODES = {"pairwise": dict(budget=3),
         "averaging": dict(budget=6, history=4, snapshot_every=5, ema_decays=(0.8, 0.95)),
         "auto": dict(averaging="auto", snapshot_every=5)}


def main(out: Path, mode: str = "pairwise") -> None:
    torch.set_num_threads(1)
    cb = BayesMergeTrainerCallback(heldout=heldout_set(), **MODES[mode])
    args = TrainingArguments(output_dir=str(out / "out"), max_steps=30, save_steps=10,
                             per_device_train_batch_size=4, per_device_eval_batch_size=8,
                             learning_rate=1e-2, lr_scheduler_type="constant", report_to="none",
                             use_cpu=True, ddp_backend="gloo", ddp_find_unused_parameters=False,
                             logging_steps=5,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=train_set(),
                      data_collator=collate, callbacks=[cb])
    trainer.train()
    batches = cb._evaluator.totals(trainer.model)[2]  # a collective: every rank calls it
    merge_logs = [r for r in trainer.state.log_history if "merge/lambda" in r]
    (out / f"rank{args.process_index}.json").write_text(json.dumps(
        {"history": cb.history, "world_size": args.world_size, "evaluated_batches": batches,
         "merge_logs": merge_logs}))
    exit_without_teardown()  # every rank has written its results


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
