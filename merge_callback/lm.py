"""A LightningModule wrapping a causal language model (for example a Hugging Face one)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalLMModule", "SCHEDULES"]

SCHEDULES = ("constant", "wsd", "cosine")
"""Learning-rate schedules understood by :class:`CausalLMModule`."""

_MIN_LR_FACTOR = 0.1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CausalLMModule(L.LightningModule):
    """Next-token language modelling around any causal LM.

    The wrapped network is kept as ``self.model``, so ``state_dict()`` keys are
    ``model.<keys of the wrapped model>``. The model is called as
    ``model(input_ids)`` or ``model(input_ids, attention_mask=...)`` and may return
    a tensor of logits, an object with ``.logits`` (Hugging Face) or a tuple whose
    first element is the logits.

    Learning rate schedule (``step`` is the 0-based optimizer step):

    * warmup: factor ``min(1, (step + 1) / warmup_steps)`` when ``warmup_steps > 0``;
    * ``"constant"``: factor 1 after warmup;
    * ``"wsd"`` (warmup-stable-decay): factor 1 until ``total_steps - decay_steps``,
      then linear down to 0.1 at ``step == total_steps`` (0.1 afterwards);
    * ``"cosine"``: after warmup, ``0.1 + 0.45 * (1 + cos(pi * p))`` with
      ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to 1,
      i.e. 0.1 at ``step == total_steps``.

    Args:
        model: The causal LM (an ``nn.Module``).
        lr: Peak learning rate (> 0).
        weight_decay: AdamW weight decay (>= 0), applied to parameters with two or
            more dimensions only (not to biases and norms).
        warmup_steps: Linear warmup steps (int >= 0).
        schedule: One of ``"constant"``, ``"wsd"``, ``"cosine"``.
        decay_steps: Length of the final decay for ``"wsd"`` (an int > 0 with
            ``warmup_steps + decay_steps <= total_steps``); ignored by the other
            schedules (any int >= 0).
        total_steps: Planned number of optimizer steps; required (int > warmup_steps)
            for ``"wsd"`` and ``"cosine"``, optional otherwise.
        betas: AdamW betas, two floats in ``[0, 1)``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If any other argument is out of range; the message names the
            argument and the allowed values.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: str = "constant",
        decay_steps: int = 0,
        total_steps: int | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if (
            isinstance(weight_decay, bool)
            or not isinstance(weight_decay, (int, float))
            or not (math.isfinite(weight_decay) and weight_decay >= 0)
        ):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if not _is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not _is_int(decay_steps) or decay_steps < 0:
            raise ValueError(f"decay_steps must be an int >= 0, got {decay_steps!r}")
        if total_steps is not None and (not _is_int(total_steps) or total_steps <= 0):
            raise ValueError(f"total_steps must be None or an int > 0, got {total_steps!r}")
        try:
            b1, b2 = (float(b) for b in betas)
        except (TypeError, ValueError):
            raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}") from None
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
        if schedule in ("wsd", "cosine"):
            if total_steps is None:
                raise ValueError(f"total_steps must be an int > warmup_steps for schedule={schedule!r}, got None")
            if total_steps <= warmup_steps:
                raise ValueError(
                    f"total_steps must be > warmup_steps ({warmup_steps}) for schedule={schedule!r}, "
                    f"got {total_steps}"
                )
        if schedule == "wsd":
            if decay_steps <= 0:
                raise ValueError(f"decay_steps must be an int > 0 for schedule='wsd', got {decay_steps!r}")
            if warmup_steps + decay_steps > total_steps:
                raise ValueError(
                    f"decay_steps must be <= total_steps - warmup_steps ({total_steps - warmup_steps}) "
                    f"for schedule='wsd', got {decay_steps}"
                )

        self.model = model
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.decay_steps = decay_steps
        self.total_steps = total_steps
        self.betas = (b1, b2)
        self.save_hyperparameters(ignore=["model"])

    # ------------------------------------------------------------------ schedule

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at 0-based optimizer step ``step`` (see the class docstring)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        assert self.total_steps is not None
        if self.schedule == "wsd":
            start = self.total_steps - self.decay_steps
            if step < start:
                return 1.0
            progress = min(1.0, (step - start) / self.decay_steps)
            return 1.0 - (1.0 - _MIN_LR_FACTOR) * progress
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return _MIN_LR_FACTOR + (1.0 - _MIN_LR_FACTOR) * 0.5 * (1.0 + math.cos(math.pi * progress))

    # ------------------------------------------------------------------ model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for ``input_ids`` ``[batch, seq]``."""
        if attention_mask is None:
            out = self.model(input_ids)
        else:
            out = self.model(input_ids, attention_mask=attention_mask)
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, Mapping):
            logits = out.get("logits")
        if logits is None and isinstance(out, (tuple, list)) and out:
            logits = out[0]
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"cannot find logits in the model output of type {type(out).__name__}")
        return logits

    def compute_loss(self, batch: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch.

        Args:
            batch: ``{"input_ids", optional "attention_mask", optional "labels"}`` or a
                bare ``input_ids`` tensor. Labels are aligned with ``input_ids`` (the
                Hugging Face convention; the shift happens here) and default to
                ``input_ids``. Targets equal to -100 or at positions where
                ``attention_mask`` is 0 are ignored.
        """
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError("batch must be a tensor of input ids or a mapping with an 'input_ids' entry")
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        labels = batch.get("labels")
        labels = input_ids if labels is None else labels
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        logits = self(input_ids, attention_mask=attention_mask)
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:].to(shift_logits.device).long()
        return F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
        )

    @staticmethod
    def _batch_size(batch: Any) -> int:
        ids = batch if isinstance(batch, torch.Tensor) else batch["input_ids"]
        return int(ids.shape[0])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=self._batch_size(batch))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("val_loss", loss, prog_bar=True, batch_size=self._batch_size(batch), sync_dist=True)
        return loss

    # ------------------------------------------------------------------ optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with a per-step ``LambdaLR`` following :meth:`lr_factor`."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self.weight_decay > 0:
            decay = [p for p in params if p.dim() >= 2]
            no_decay = [p for p in params if p.dim() < 2]
            groups: Any = [
                {"params": decay, "weight_decay": self.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ]
        else:
            groups = params
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
