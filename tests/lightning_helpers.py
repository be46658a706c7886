"""Tiny real training runs shared by the Lightning tests."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from merge_callback.data import BlockDataset, tiny_gpt_neox
from merge_callback.lm import CausalLMModule

VOCAB = 64


def token_blocks(n: int, t: int = 16, seed: int = 0) -> torch.Tensor:
    """Noisy arithmetic sequences: learnable, so losses fall and soups differ from checkpoints."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    seq = (start + stride * torch.arange(t)) % VOCAB
    noise = torch.rand(n, t, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (n, t), generator=g), seq)


def loaders(batch_size: int = 8, shuffle: bool = False):
    """80 training blocks (10 batches: an epoch ends at every 10-step save) and 24 held-out."""
    train = DataLoader(BlockDataset(token_blocks(80, seed=1)), batch_size=batch_size,
                       shuffle=shuffle)
    heldout = DataLoader(BlockDataset(token_blocks(24, seed=2)), batch_size=batch_size)
    return train, heldout


def module(dropout: float = 0.0, lr: float = 1e-2, seed: int = 0) -> CausalLMModule:
    model = tiny_gpt_neox(VOCAB, seed=seed, hidden_size=32, num_layers=2, num_heads=4,
                          max_len=32, attention_dropout=dropout, hidden_dropout=dropout)
    return CausalLMModule(model, lr=lr)


def trainer(root, *callbacks, max_steps: int = 30, every: int = 10, logger=False,
            **kwargs) -> L.Trainer:
    ckpt = ModelCheckpoint(dirpath=f"{root}/ckpt", every_n_train_steps=every, save_top_k=-1)
    return L.Trainer(default_root_dir=str(root), max_steps=max_steps, accelerator="cpu",
                     devices=1, logger=logger, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[ckpt, *callbacks],
                     num_sanity_val_steps=0, **kwargs)


def exit_without_teardown() -> None:
    """End a multi-process test script once every rank has written its results: wait for all
    ranks, then leave without running native destructors. Freeing gloo, DDP or DeepSpeed objects at
    interpreter exit has aborted processes ("terminate called without an active exception") or
    hung them; the results are already on disk."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
