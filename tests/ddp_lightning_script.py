"""Two-process DDP run (gloo, CPU) with BayesMergeCallback; started by test_ddp.py.

Lightning re-executes this script for rank 1, so it must be a standalone file.
Usage: python ddp_lightning_script.py OUT_DIR [averaging|auto]
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_helpers import exit_without_teardown, loaders, module  # noqa: E402
from merge_callback import BayesMergeCallback  # noqa: E402


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    train, heldout = loaders()
    extra = {"averaging": dict(history=3, snapshot_every=2, ema_decays=(0.9,), budget=5),
             "auto": dict(averaging="auto", snapshot_every=2)}.get(mode, dict(budget=3))
    cb = BayesMergeCallback(heldout=heldout, **extra)
    trainer = L.Trainer(default_root_dir=str(out), max_steps=10, accelerator="cpu", devices=2,
                        strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=str(out / "ckpt"),
                                                   every_n_train_steps=5, save_top_k=-1), cb])
    trainer.fit(module(), train)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"history": cb.history, "world_size": trainer.world_size,
         "evaluated_batches": cb._evaluator.totals(trainer.lightning_module)[2]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "pairwise")
    exit_without_teardown()
