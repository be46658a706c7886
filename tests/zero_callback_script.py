"""Two-process Lightning run (gloo, CPU) of the real BayesMergeCallback under DeepSpeed ZeRO-2/3 or
FSDP1; started by test_zero.py. Lightning re-executes this script for rank 1.

In the same two processes: (1) trains 10 steps with the callback, checkpoints every 5 steps
(a round at step 10), and saves the consolidated weights of steps 5 and 10 (gathered for the
checks only); (2) trains again without the callback (losses and final weights for the bitwise
comparison); (3) with ``resume``, resumes a fresh Trainer with a fresh callback from the step-5
checkpoint of (1), which must redo the same round and write the same soup.
Usage: python zero_callback_script.py OUT_DIR {zero2,zero3,fsdp1,fsdp1_flat} [resume]
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

from lightning_helpers import exit_without_teardown, loaders, module  # noqa: E402
from merge_callback import BayesMergeCallback  # noqa: E402
from merge_callback.lm import CausalLMModule  # noqa: E402
from strategies_cpu import (CPUDeepSpeedStrategy, CPUFSDPStrategy,  # noqa: E402
                            also_write_fixed_soup, gather_full, zero_config)

MAX_STEPS, EVERY = 10, 5


class FlatParamsLM(CausalLMModule):
    """FSDP1 with use_orig_params=False: the optimizer must see the wrapper's flat parameters."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainer.model.parameters(), lr=self.lr,
                                      betas=self.betas, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


class KeepingMergeCallback(BayesMergeCallback):
    """The real BayesMergeCallback; after each round it also writes the pairwise soup at a fixed
    λ = 0.7 (``fixed_dir``), the way the round's own soup is written, and keeps the round's
    observations."""

    def __init__(self, *args, fixed_dir: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed_dir, self.observations, self.empty_pieces = fixed_dir, [], None

    def _runtime(self, trainer, pl_module):
        rt = super()._runtime(trainer, pl_module)
        write = also_write_fixed_soup(rt.write, self.fixed_dir, "soup-step=",
                                      trainer.is_global_zero, self.observations)

        def keep(soup):
            self.empty_pieces = sum(1 for t in soup.sources["latest"].tensors.values()
                                    if t.numel() == 0)
            write(soup)

        rt.write = keep
        return rt


def strategy_for(kind: str):
    if kind == "zero2":
        return CPUDeepSpeedStrategy(config=zero_config(2))
    if kind == "zero3":
        return CPUDeepSpeedStrategy(config=zero_config(3, persistence_threshold=0))
    if kind in ("fsdp1", "fsdp1_flat"):
        from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

        return CPUFSDPStrategy(auto_wrap_policy={GPTNeoXLayer},
                               use_orig_params=kind != "fsdp1_flat")
    raise ValueError(f"unknown kind {kind!r}")


def target_of(trainer: L.Trainer, pl_module: L.LightningModule, kind: str):
    """The module the consolidated weights are gathered from (FSDP1: the root wrapper)."""
    return trainer.strategy.model if kind.startswith("fsdp1") else pl_module


class Recorder(Callback):
    """Losses per step; consolidated weights at every save (written by rank zero) and at the end."""

    def __init__(self, kind: str, out: Path | None = None):
        self.kind, self.out, self.losses, self.final = kind, out, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.out is None:
            return
        full = gather_full(target_of(trainer, pl_module, self.kind))
        if trainer.is_global_zero:
            torch.save(full, self.out / f"full-{trainer.global_step}.pt")

    def on_train_end(self, trainer, pl_module):
        self.final = gather_full(target_of(trainer, pl_module, self.kind))


def fit(out: Path, kind: str, callbacks, ckpt_path=None, save_full=False):
    L.seed_everything(0, verbose=False)
    train, _ = loaders()
    cls = FlatParamsLM if kind == "fsdp1_flat" else CausalLMModule
    pl_module = cls(module().model, lr=1e-2)
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(kind, out if save_full else None)
    trainer = L.Trainer(default_root_dir=str(out), max_steps=MAX_STEPS, accelerator="cpu",
                        devices=2, strategy=strategy_for(kind), logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=str(out / "ckpt"),
                                                   every_n_train_steps=EVERY, save_top_k=-1),
                                   *callbacks, rec])
    trainer.fit(pl_module, train, ckpt_path=ckpt_path)
    return trainer, rec


def main(out: Path, kind: str, resume: bool) -> None:
    torch.set_num_threads(1)
    _, heldout = loaders()
    t0 = time.perf_counter()
    cb = KeepingMergeCallback(heldout=heldout, budget=3, soup_dir=out / "merge" / "soups",
                              fixed_dir=out / "merge" / "fixed")
    trainer, merged = fit(out / "merge", kind, [cb], save_full=True)
    t1 = time.perf_counter()
    _, plain = fit(out / "plain", kind, [])
    t2 = time.perf_counter()
    record = {"world_size": trainer.world_size, "mode": cb._mode, "history": cb.history,
              "observations": cb.observations, "empty_pieces": cb.empty_pieces,
              "balanced": cb._evaluator.balanced,
              "sharded_snapshot": type(cb.schedule.ring[-1]).__name__,
              "losses_equal": merged.losses == plain.losses, "losses": merged.losses,
              "final_keys_equal": sorted(merged.final) == sorted(plain.final),
              "final_bitwise": all(torch.equal(merged.final[k], plain.final[k])
                                   for k in plain.final),
              "fit_seconds": [t1 - t0, t2 - t1]}
    if resume:
        ckpt5 = trainer.strategy.broadcast(str(min((out / "merge" / "ckpt").glob("*step=5*"))))
        again = KeepingMergeCallback(heldout=heldout, budget=3,
                                     soup_dir=out / "resume" / "soups",
                                     fixed_dir=out / "resume" / "fixed")
        _, resumed = fit(out / "resume", kind, [again], ckpt_path=ckpt5)
        record.update(resume_history=again.history, resume_observations=again.observations,
                      resume_losses_equal=resumed.losses == plain.losses[EVERY:],
                      resume_final_bitwise=all(torch.equal(resumed.final[k], plain.final[k])
                                               for k in plain.final),
                      resume_seconds=time.perf_counter() - t2)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "resume")
    exit_without_teardown()
