"""Two-process DDP run (gloo, CPU) choosing λ on an lm-eval task; started by test_lmeval.py.

Lightning re-executes this script for rank 1, so it must be a standalone file.
Usage: python lmeval_ddp_script.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lmeval_helpers as H  # noqa: E402
from lightning_helpers import exit_without_teardown  # noqa: E402
from merge_callback import BayesMergeCallback  # noqa: E402
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric  # noqa: E402
from merge_callback.lm import CausalLMModule  # noqa: E402
from merge_callback.lmeval import LOCAL_PPL_TASK, LmEvalMetric  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    metric = LmEvalMetric([LOCAL_PPL_TASK], tokenizer=H.tokenizer(), limit=23)
    cb = BayesMergeCallback(heldout=[], metric=metric, budget=3)
    trainer = L.Trainer(default_root_dir=str(out), max_steps=10, accelerator="cpu", devices=2,
                        strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=str(out / "ckpt"),
                                                   every_n_train_steps=5, save_top_k=-1), cb])
    module = CausalLMModule(H.model(), lr=3e-2)
    trainer.fit(module, DataLoader(H.dataset(80), batch_size=8))
    rank = trainer.global_rank
    # side values of a loss evaluation on the soup, each rank on its share of the batches
    soup = CausalLMModule(H.model())
    soup.load_state_dict(load_file(str(out / "ckpt" / "soups" / "soup-step=10.safetensors")))
    ev = HeldoutEvaluator(DataLoader(H.dataset(40, offset=200), batch_size=8),
                          resolve_metric("loss"), rank=rank, world_size=2,
                          reduce_sum=lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
    ev(soup)
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"history": cb.history, "share": len(metric.indices(LOCAL_PPL_TASK, rank, 2)),
         "extras": ev.last_extras}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_without_teardown()  # every rank has written its results
