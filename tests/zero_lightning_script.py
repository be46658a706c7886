"""Two-process Lightning run (gloo, CPU) under DeepSpeed ZeRO-2/3 or FSDP1; started by test_zero.py.

Trains the same model twice in the same two processes, saving checkpoints every 4 steps: once
with the shard-local merge probe (tests/zero_probe.py) running in ``on_save_checkpoint`` (where
the merge callback runs its rounds), once without, so the test can compare the final weights
bitwise. Lightning re-executes this script for rank 1, so it must be a standalone file.
Usage: python zero_lightning_script.py OUT_DIR
    {zero2,zero3,zero3_persist,fsdp1,fsdp1_flat,fsdp1_grad_op}
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from lightning_helpers import loaders, module  # noqa: E402
from merge_callback.lm import CausalLMModule  # noqa: E402
from strategies_cpu import CPUDeepSpeedStrategy, CPUFSDPStrategy, zero_config  # noqa: E402
from zero_probe import Probe, gather_full  # noqa: E402

MAX_STEPS = 10


class FlatParamsLM(CausalLMModule):
    """FSDP1 with use_orig_params=False: the optimizer must see the wrapper's flat parameters."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainer.model.parameters(), lr=self.lr,
                                      betas=self.betas, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def strategy_for(kind: str):
    if kind == "zero2":
        return CPUDeepSpeedStrategy(config=zero_config(2))
    if kind == "zero3":
        return CPUDeepSpeedStrategy(config=zero_config(3, persistence_threshold=0))
    if kind == "zero3_persist":  # DeepSpeed's default threshold: the tiny model stays gathered
        return CPUDeepSpeedStrategy(config=zero_config(3, persistence_threshold=100_000))
    if kind in ("fsdp1", "fsdp1_flat", "fsdp1_grad_op"):
        from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

        return CPUFSDPStrategy(auto_wrap_policy={GPTNeoXLayer},
                               use_orig_params=kind != "fsdp1_flat",
                               sharding_strategy="SHARD_GRAD_OP" if kind == "fsdp1_grad_op"
                               else "FULL_SHARD")
    raise ValueError(f"unknown kind {kind!r}")


def target_of(trainer: L.Trainer, pl_module: L.LightningModule, kind: str):
    """The module whose weights the views read (FSDP1: the root wrapper; ZeRO: the module)."""
    return trainer.strategy.model if kind.startswith("fsdp1") else pl_module


class ProbeCallback(Callback):
    def __init__(self, probe: Probe, kind: str):
        self.probe, self.kind = probe, kind

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.probe.step(target_of(trainer, pl_module, self.kind), trainer.global_step)


class Recorder(Callback):
    """Losses per step and the consolidated final weights (collective gather at the end)."""

    def __init__(self, kind: str):
        self.kind, self.losses, self.final = kind, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        self.final = gather_full(target_of(trainer, pl_module, self.kind))


def fit(out: Path, kind: str, callbacks) -> tuple[L.Trainer, Recorder]:
    L.seed_everything(0, verbose=False)
    train, _ = loaders()
    base = module()
    cls = FlatParamsLM if kind == "fsdp1_flat" else CausalLMModule
    pl_module = cls(base.model, lr=1e-2)
    rec = Recorder(kind)
    trainer = L.Trainer(default_root_dir=str(out), max_steps=MAX_STEPS, accelerator="cpu",
                        devices=2, strategy=strategy_for(kind), logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=str(out / "ckpt"),
                                                   every_n_train_steps=4, save_top_k=-1),
                                   *callbacks, rec])
    trainer.fit(pl_module, train)
    return trainer, rec


def main(out: Path, kind: str) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    _, heldout = loaders()
    batch = next(iter(heldout))["input_ids"]
    probe = Probe(heldout, batch, out / "soups")
    trainer, merged = fit(out / "probe", kind, [ProbeCallback(probe, kind)])
    t1 = time.perf_counter()
    _, plain = fit(out / "plain", kind, [])
    t2 = time.perf_counter()
    record = dict(probe.record)
    record.update(world_size=trainer.world_size, kind=kind,
                  losses_equal=merged.losses == plain.losses, losses=merged.losses,
                  final_keys_equal=sorted(merged.final) == sorted(plain.final),
                  final_bitwise=all(torch.equal(merged.final[k], plain.final[k])
                                    for k in plain.final),
                  fit_seconds=[t1 - t0, t2 - t1])
    if trainer.global_rank == 0:
        probe.verify_on_rank_zero(lambda: CausalLMModule(module().model))
        record.update(probe.record)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
