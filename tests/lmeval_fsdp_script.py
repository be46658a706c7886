"""Two-process FSDP2 run (ModelParallelStrategy + fully_shard, gloo, CPU) choosing λ on an lm-eval
task; started by test_lmeval.py. Lightning re-executes this script for rank 1.
Usage: python lmeval_fsdp_script.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lmeval_helpers as H  # noqa: E402
from lightning_helpers import exit_without_teardown  # noqa: E402
from fsdp_script import ShardedLM  # noqa: E402
from merge_callback import BayesMergeCallback  # noqa: E402
from merge_callback.lmeval import LOCAL_PPL_TASK, LmEvalMetric  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    cb = BayesMergeCallback(heldout=[], budget=3, metric=LmEvalMetric(
        [LOCAL_PPL_TASK], tokenizer=H.tokenizer(), limit=9))
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    trainer = L.Trainer(default_root_dir=str(out), max_steps=10, accelerator="cpu", devices=2,
                        strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=str(out / "ckpt"),
                                                   every_n_train_steps=5, save_top_k=-1), cb])
    trainer.fit(ShardedLM(H.model(), lr=3e-2), DataLoader(H.dataset(80), batch_size=8))
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"history": cb.history}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_without_teardown()  # every rank has written its results
