"""Two-process Lightning resume under DeepSpeed ZeRO-2/3 or FSDP1 (gloo, CPU); see test_zero.py.

Trains 10 steps saving checkpoints every 5, then, in the same processes, resumes a fresh Trainer
from the step-5 checkpoint and trains to step 10. Records whether the resumed run's losses and
consolidated final weights equal the uninterrupted run's bitwise, whether a callback's state
came back from the checkpoint, and whether the shard-local view right after the resume equals
the uninterrupted run's view at step 5 (what a merge callback captures in on_train_start).
Usage: python zero_resume_script.py OUT_DIR {zero2,zero3,zero3_persist,fsdp1,fsdp1_flat}
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from lightning_helpers import loaders, module  # noqa: E402
from merge_callback.lm import CausalLMModule  # noqa: E402
from merge_callback.zero import local_state_dict_any  # noqa: E402
from zero_lightning_script import FlatParamsLM, Recorder, strategy_for, target_of  # noqa: E402


class StatefulProbe(Callback):
    """Counts steps in its checkpointed state; copies the local view at train start and step 5."""

    def __init__(self, kind: str):
        self.kind = kind
        self.steps_seen = 0
        self.loaded = None
        self.start_view = None
        self.view_at_5 = None

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state_dict):
        self.loaded = dict(state_dict)
        self.steps_seen = state_dict["steps_seen"]

    def _view(self, trainer, pl_module):
        local, _ = local_state_dict_any(target_of(trainer, pl_module, self.kind))
        return {k: t.clone() for k, t in local.items()}

    def on_train_start(self, trainer, pl_module):
        self.start_view = self._view(trainer, pl_module)
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps_seen += 1
        if trainer.global_step == 5:
            self.view_at_5 = self._view(trainer, pl_module)


def fit(out: Path, kind: str, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    train, _ = loaders()
    cls = FlatParamsLM if kind == "fsdp1_flat" else CausalLMModule
    pl_module = cls(module().model, lr=1e-2)
    rec, probe = Recorder(kind), StatefulProbe(kind)
    ckpt = ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_train_steps=5, save_top_k=-1)
    trainer = L.Trainer(default_root_dir=str(out), max_steps=10, accelerator="cpu", devices=2,
                        strategy=strategy_for(kind), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ckpt, probe, rec])
    trainer.fit(pl_module, train, ckpt_path=ckpt_path)
    return trainer, rec, probe


def main(out: Path, kind: str) -> None:
    torch.set_num_threads(1)
    trainer, full, full_probe = fit(out / "full", kind)
    ckpt5 = trainer.strategy.broadcast(str(min((out / "full" / "ckpt").glob("*step=5*"))))
    _, resumed, probe = fit(out / "resumed", kind, ckpt_path=ckpt5)
    record = {
        "kind": kind, "checkpoint": Path(ckpt5).name, "is_dir": Path(ckpt5).is_dir(),
        "losses_equal": full.losses[5:] == resumed.losses,
        "final_bitwise": all(torch.equal(full.final[k], resumed.final[k]) for k in full.final),
        "callback_state_loaded": probe.loaded, "start_step": probe.start_step,
        "start_view_equals_step5_view": sorted(probe.start_view) == sorted(full_probe.view_at_5)
        and all(torch.equal(probe.start_view[k], full_probe.view_at_5[k])
                for k in probe.start_view),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
