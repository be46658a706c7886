"""Shard-local merge probe shared by the ZeRO / FSDP1 two-process scripts.

At step ``first`` the probe copies this rank's local pieces (merge_callback.zero views) and, for
the checks only, the consolidated full weights (gathered with the engine's own tools). At step
``second`` it does what a merge round does in place: lerp the local pieces towards the step
``first`` copy with a fixed λ, runs forwards (one batch for exact logits, the balanced held-out
evaluator for the metric), restores the pieces exactly and writes the soup shard-locally. It
records everything the checks need; rank zero compares against a plain single-process model
loaded with the consolidated lerp.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from merge_callback.engine import RoundResult
from merge_callback.evaluate import HeldoutEvaluator, preserved_rng, resolve_metric
from merge_callback.fsdp import BalancedHeldoutEvaluator, ShardedSnapshot, write_sharded_soup
from merge_callback.merge import is_mergeable
from merge_callback.zero import (ReplicatedLayout, evaluation_context,
                                 gather_pieces_to_rank_zero, is_fsdp1, is_zero3,
                                 local_state_dict_any, read_pieces, sync_after_edit)

LAMBDA = 0.3


def gather_full(target: nn.Module) -> dict[str, Tensor]:
    """Consolidated weights on every rank (collective), for the checks only."""
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


def _reduce_sum(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t


def forward_logits(module: nn.Module, input_ids: Tensor) -> Tensor:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    context = evaluation_context(module) or torch.inference_mode
    try:
        with preserved_rng(0), context():
            out = module(input_ids=input_ids)
    finally:
        for m, mode in modes:
            m.training = mode
    out = out if isinstance(out, Tensor) else out.logits
    return out.detach().clone()


class Probe:
    """Call :meth:`step` after every optimizer step on every rank.

    Args:
        heldout: the held-out DataLoader (unsharded; the evaluator splits it across ranks).
        batch: a fixed batch of input ids for the exact-logits check.
        soup_dir: where the shard-local soup is written.
        first, second: the steps of the previous and latest weights.
    """

    def __init__(self, heldout, batch: Tensor, soup_dir: Path, first: int = 4, second: int = 8):
        self.heldout = heldout
        self.batch = batch
        self.soup_dir = Path(soup_dir)
        self.first, self.second = first, second
        self.record: dict[str, Any] = {}
        self.prev_local: dict[str, Tensor] | None = None
        self.prev_full: dict[str, Tensor] | None = None
        self.layouts = None
        self.checks: dict[str, Any] = {}

    def _view(self, target: nn.Module):
        local, layouts = local_state_dict_any(target)
        if layouts is None:  # replicated weights (ZeRO-1/2, DDP): rank zero owns every tensor
            layouts = {k: ReplicatedLayout(tuple(t.shape), dist.get_rank() == 0)
                       for k, t in local.items()}
        return local, layouts

    def step(self, target: nn.Module, global_step: int) -> None:
        if global_step == self.first:
            local, self.layouts = self._view(target)
            self.prev_local = {k: t.clone() for k, t in local.items()}
            self.prev_full = gather_full(target)
        elif global_step == self.second:
            self._probe(target)

    def _probe(self, target: nn.Module) -> None:
        t0 = time.perf_counter()
        rank, world = dist.get_rank(), dist.get_world_size()
        local, layouts = self._view(target)
        latest_local = {k: t.clone() for k, t in local.items()}
        latest_full = gather_full(target)
        rec = self.record
        rec["keys"] = list(local)
        rec["local_numel"] = sum(t.numel() for k, t in local.items()
                                 if isinstance(layouts[k], ReplicatedLayout) is False)
        rec["replicated_numel"] = sum(t.numel() for k, t in local.items()
                                      if isinstance(layouts[k], ReplicatedLayout))
        rec["full_numel"] = sum(t.numel() for t in latest_full.values())
        rec["layout_kinds"] = sorted({type(v).__name__ for v in layouts.values()})
        logits_latest = forward_logits(target, self.batch)
        evaluator = BalancedHeldoutEvaluator(self.heldout, resolve_metric("loss"), rank=rank,
                                             world_size=world, reduce_sum=_reduce_sum,
                                             context=evaluation_context(target))
        rec["value_latest"] = evaluator(target)
        # --- the in-place merge of the local pieces, as a round does it
        with torch.no_grad():
            for k, t in local.items():
                if is_mergeable(t):
                    t.copy_(torch.lerp(self.prev_local[k], latest_local[k], LAMBDA))
        sync_after_edit(target)
        logits_soup = forward_logits(target, self.batch)
        rec["value_soup"] = evaluator(target)
        with torch.no_grad():
            for k, t in local.items():
                t.copy_(latest_local[k])
        sync_after_edit(target)
        rec["restored_bitwise"] = all(torch.equal(local[k], latest_local[k]) for k in local)
        logits_after = forward_logits(target, self.batch)
        rec["logits_after_restore_equal"] = torch.equal(logits_after, logits_latest)
        rec["probe_seconds"] = time.perf_counter() - t0
        # --- the soup, written shard-locally in the FSDP2 sharded-soup format
        result = RoundResult(step=self.second, previous_step=self.first, lam=LAMBDA,
                             value_soup=rec["value_soup"], value_latest=rec["value_latest"],
                             value_previous=float("nan"), observations=(), metric="loss",
                             higher_is_better=False, alpha=0.5, budget=1, strategy="grid",
                             acq_func=None, seconds=0.0)
        prev = ShardedSnapshot(dict(self.prev_local), self.first, self.layouts)
        latest = ShardedSnapshot(latest_local, self.second, layouts)
        folder = write_sharded_soup(self.soup_dir, "soup", prev, latest, result)
        soup_local = {k: (torch.lerp(self.prev_local[k], t, LAMBDA) if is_mergeable(t) else t)
                      for k, t in latest_local.items()}
        gathered = gather_pieces_to_rank_zero(soup_local, layouts)
        rec["gathered_on_this_rank"] = gathered is not None
        self.checks = dict(logits_latest=logits_latest, logits_soup=logits_soup,
                           latest_full=latest_full, folder=folder, gathered=gathered)

    def verify_on_rank_zero(self, plain_factory: Callable[[], nn.Module]) -> None:
        """Compare with a plain single-process model (call on rank zero after training)."""
        rec, c = self.record, self.checks
        soup_full = {k: (torch.lerp(self.prev_full[k], v, LAMBDA) if is_mergeable(v) else v)
                     for k, v in c["latest_full"].items()}
        plain = plain_factory()
        plain.load_state_dict(c["latest_full"])
        rec["latest_logits_equal"] = torch.equal(forward_logits(plain, self.batch),
                                                 c["logits_latest"])
        plain.load_state_dict(soup_full)
        soup_logits = forward_logits(plain, self.batch)
        rec["soup_logits_equal"] = torch.equal(soup_logits, c["logits_soup"])
        rec["soup_logits_maxdiff"] = float((soup_logits - c["logits_soup"]).abs().max())
        rec["value_soup_plain"] = HeldoutEvaluator(self.heldout, resolve_metric("loss"))(plain)
        folder = c["folder"]
        import json

        index = json.loads((folder / "index.json").read_text())
        read = read_pieces([folder / f for f in index["files"]], index["keys"])
        rec["soup_keys_equal"] = sorted(read) == sorted(soup_full)
        rec["soup_file_bitwise"] = rec["soup_keys_equal"] and all(
            torch.equal(read[k], soup_full[k]) for k in soup_full)
        rec["gathered_bitwise"] = sorted(c["gathered"]) == sorted(soup_full) and all(
            torch.equal(c["gathered"][k], soup_full[k]) for k in soup_full)
        rec["soup_differs_from_latest"] = any(not torch.equal(soup_full[k], c["latest_full"][k])
                                              for k in soup_full)
