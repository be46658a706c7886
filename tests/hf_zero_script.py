"""Two-process transformers.Trainer run (gloo, CPU) under DeepSpeed ZeRO-2 or ZeRO-3.

Started by test_zero.py through ``python -m torch.distributed.run --nproc_per_node 2``. In the
same two processes: trains with the shard-local merge probe (tests/zero_probe.py) running in
``on_save`` after the checkpoints of steps 4 and 8 are written; trains again without it, so the
test can compare the final weights bitwise; and resumes the second run from its step-4
checkpoint, recording the local view ``on_train_begin`` sees and the final weights.
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

from merge_callback.data import BlockDataset, tiny_gpt_neox  # noqa: E402
from lightning_helpers import VOCAB, token_blocks  # noqa: E402
from merge_callback.zero import local_state_dict_any  # noqa: E402
from zero_probe import Probe, gather_full  # noqa: E402

MAX_STEPS = 10


def collate(items):
    ids = torch.stack([it["input_ids"] for it in items])
    return {"input_ids": ids, "labels": ids.clone()}


def tiny_model():
    return tiny_gpt_neox(VOCAB, seed=0, hidden_size=32, num_layers=2, num_heads=4, max_len=32)


def ds_config(kind: str) -> dict:
    zero = {"stage": 2} if kind == "zero2" else {"stage": 3,
                                                 "stage3_param_persistence_threshold": 0}
    return {"zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": "auto",
                                                      "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto"}},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto"}


class ProbeCallback(TrainerCallback):
    def __init__(self, probe: Probe):
        self.probe = probe

    def on_save(self, args, state, control, model=None, **kwargs):
        self.probe.step(model, state.global_step)


class BeginView(TrainerCallback):
    """The local view (a copy) and the step when training begins or resumes."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        local, _ = local_state_dict_any(model)
        self.view = {k: t.clone() for k, t in local.items()}
        self.step = state.global_step


def train(out: Path, kind: str, callbacks, resume=None) -> tuple[Trainer, dict]:
    args = TrainingArguments(output_dir=str(out), max_steps=MAX_STEPS, save_steps=4,
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
    heldout = DataLoader(BlockDataset(token_blocks(24, seed=2)), batch_size=8,
                         collate_fn=collate)
    batch = next(iter(heldout))["input_ids"]
    probe = Probe(heldout, batch, out / "soups")
    trainer, merged = train(out / "probe", kind, [ProbeCallback(probe)])
    t1 = time.perf_counter()
    _, plain = train(out / "plain", kind, [])
    t2 = time.perf_counter()
    begin = BeginView()
    _, resumed = train(out / "plain", kind, [begin], resume=out / "plain" / "checkpoint-4")
    rank = trainer.args.process_index
    record = dict(probe.record)
    record.update(world_size=trainer.args.world_size, kind=kind,
                  zero_stage=trainer.accelerator.state.deepspeed_plugin.zero_stage,
                  is_deepspeed_enabled=trainer.is_deepspeed_enabled,
                  losses_equal=merged["losses"] == plain["losses"], losses=merged["losses"],
                  final_keys_equal=sorted(merged["final"]) == sorted(plain["final"]),
                  final_bitwise=all(torch.equal(merged["final"][k], plain["final"][k])
                                    for k in plain["final"]),
                  fit_seconds=[t1 - t0, t2 - t1],
                  resume_step=begin.step,
                  resume_view_equal=sorted(begin.view) == sorted(probe.prev_local) and all(
                      torch.equal(begin.view[k], probe.prev_local[k]) for k in begin.view),
                  resume_losses_equal=resumed["losses"][-6:] == plain["losses"][4:],
                  resume_losses=resumed["losses"],
                  resume_final_bitwise=all(torch.equal(resumed["final"][k], plain["final"][k])
                                           for k in plain["final"]))
    if rank == 0:
        probe.verify_on_rank_zero(tiny_model)
        record.update(probe.record)
    (out / f"rank{rank}.json").write_text(json.dumps(record, default=str))
    torch.distributed.barrier()
    # as in hf_ddp_script.py: leave without tearing down gloo (its destructors may hang)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
