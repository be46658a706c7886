"""Two-process FSDP2 run (ModelParallelStrategy + fully_shard, gloo, CPU); started by test_fsdp.py.

Trains the same model twice in the same two processes: once with the merge callback, once
without, so the test can compare the final checkpoints bitwise. Lightning re-executes this script
for rank 1, so it must be a standalone file.
Usage: python fsdp_script.py OUT_DIR
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lightning_helpers import exit_without_teardown, loaders, module  # noqa: E402
from merge_callback import BayesMergeCallback  # noqa: E402
from merge_callback.engine import ChosenSoup, ShardedSnapshot, pairwise_family  # noqa: E402
from merge_callback.lm import CausalLMModule  # noqa: E402


class ShardedLM(CausalLMModule):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.gpt_neox.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class ShardedMergeCallback(BayesMergeCallback):
    """The real BayesMergeCallback, keeping its last round's inputs for the checks below."""

    @property
    def mode(self):
        return self._mode

    def _runtime(self, trainer, pl_module):
        rt = super()._runtime(trainer, pl_module)
        write = rt.write

        def keep(soup):
            prev = soup.sources["previous"]  # a copy: the written soup may be built inside it
            prev = ShardedSnapshot({k: v.clone() for k, v in prev.tensors.items()}, prev.step,
                                   prev.layouts)
            self.last_round = (prev, soup.sources["latest"], soup.result, soup.target)
            write(soup)

        rt.write = keep
        return rt


def fit(out: Path, callbacks) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    train, _ = loaders()
    pl_module = ShardedLM(module().model, lr=1e-2)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    trainer = L.Trainer(default_root_dir=str(out), max_steps=10, accelerator="cpu", devices=2,
                        strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=str(out / "ckpt"),
                                                   every_n_train_steps=5, save_top_k=-1),
                                   *callbacks])
    trainer.fit(pl_module, train)
    return trainer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    _, heldout = loaders()
    cb = ShardedMergeCallback(heldout=heldout, budget=3)
    trainer = fit(out / "merge", [cb])
    prev = cb.schedule.ring[-1]
    full_bytes = sum(torch.Size(layout.shape).numel() * prev.tensors[k].element_size()
                     for k, layout in prev.layouts.items())
    previous, latest, result, target = cb.last_round
    # a soup at a fixed lambda < 1, written shard-locally by both ranks
    soup = ChosenSoup(dataclasses.replace(result, lam=0.7),
                      pairwise_family("previous", "latest", 0.5),
                      {"previous": previous, "latest": latest}, target)
    soup.write_files(out / "fixed", "soup", is_writer=trainer.is_global_zero)
    record = {"history": cb.history, "observations": [list(o) for o in result.observations], "world_size": trainer.world_size, "mode": cb.mode,
              "sharded_snapshot": isinstance(prev, ShardedSnapshot),
              "snapshot_bytes": prev.nbytes, "full_bytes": full_bytes,
              "evaluated_batches": cb._evaluator.totals(trainer.lightning_module)[2]}
    fit(out / "plain", [])
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_without_teardown()
