"""CPU versions of Lightning's DeepSpeedStrategy and FSDPStrategy, for tests only.

Lightning refuses both strategies without CUDA; the classes below lift exactly those refusals so a
two-process gloo run exercises the real DeepSpeed ZeRO engine and the real FSDP1
``FullyShardedDataParallel`` on CPU. Everything else is Lightning's own code path.

DeepSpeed must be imported with ``DS_ACCELERATOR=cpu`` in the environment (set below before any
import of it).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy  # noqa: E402
from lightning.pytorch.strategies.ddp import DDPStrategy  # noqa: E402
from torch.nn import Module  # noqa: E402


def zero_config(stage: int, persistence_threshold: int = 0) -> dict[str, Any]:
    """A DeepSpeed config for fp32 ZeRO ``stage`` on CPU.

    ``stage3_param_persistence_threshold=0`` makes ZeRO-3 partition every parameter (with
    DeepSpeed's default of 1e5 elements a tiny model stays entirely gathered).
    """
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": 1,
            "zero_allow_untested_optimizer": True}


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that runs on the CPU accelerator with gloo.

    Skips the CUDA-only check in ``setup_environment`` and the device-index validation in
    ``setup_distributed``, and hands DeepSpeed the local rank as its device rank.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # the parent of DeepSpeedStrategy, without the check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Module, optimizer: Any, lr_scheduler: Any = None):
        import deepspeed

        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=model_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler,
            dist_init_required=False)
        return engine, ds_optimizer


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` (FSDP1) on CPU with gloo: wraps with ``device_id=torch.device("cpu")``.

    Checkpoints default to ``state_dict_type="sharded"``: Lightning's ``"full"`` checkpoint
    gathers with ``offload_to_cpu=True``, which on a CPU-only run frees the storage FSDP is
    reading and crashes the save (segmentation fault or "setStorage ... storage of size 0").
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("process_group_backend", "gloo")
        kwargs.setdefault("state_dict_type", "sharded")
        super().__init__(*args, **kwargs)

    def _setup_model(self, model: Module) -> Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        return FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)


def gather_full(target: Module) -> dict[str, torch.Tensor]:
    """Consolidated weights on every rank (collective), for the checks only.

    Args:
        target: a ZeRO-3 module (gathered with ``deepspeed.zero.GatheredParameters``), a root
            FSDP1 wrapper (``FULL_STATE_DICT``) or a module with full weights.
    """
    from merge_callback.engine.zero import is_fsdp1, is_zero3

    if is_zero3(target):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(target.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in target.state_dict().items()}
    if is_fsdp1(target):
        from torch.distributed.fsdp import (FullStateDictConfig, FullyShardedDataParallel,
                                            StateDictType)

        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FullyShardedDataParallel.state_dict_type(target, StateDictType.FULL_STATE_DICT, cfg):
            return {k: v.detach().clone() for k, v in target.state_dict().items()}
    return {k: v.detach().clone() for k, v in target.state_dict().items()}


def also_write_fixed_soup(write, fixed_dir, stem_prefix: str, is_writer: bool,
                          observations: list, lam: float = 0.7):
    """Wrap a ``Runtime.write``: write the round's soup, record its observations, then write the
    pairwise soup at a fixed ``lam`` of the same two saves, the same way (shard-local when the
    snapshots are) into ``fixed_dir`` — the tiny test models often choose λ = 1, where a soup is
    just the latest weights. Returns the wrapper."""
    import dataclasses

    from merge_callback.engine import ChosenSoup, ShardedSnapshot, Snapshot, pairwise_family

    def keep(soup):
        prev = soup.sources["previous"]  # a copy: the written soup may be built inside it
        copy = {k: v.clone() for k, v in prev.tensors.items()}
        prev = (ShardedSnapshot(copy, prev.step, prev.layouts)
                if isinstance(prev, ShardedSnapshot) else Snapshot(copy, prev.step))
        latest = soup.sources["latest"]
        write(soup)
        observations.append([list(o) for o in soup.result.observations])
        fixed = ChosenSoup(dataclasses.replace(soup.result, lam=lam),
                           pairwise_family("previous", "latest", 0.5),
                           {"previous": prev, "latest": latest}, soup.target)
        fixed.write_files(fixed_dir, f"{stem_prefix}{soup.result.step}", is_writer=is_writer)

    return keep

