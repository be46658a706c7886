"""The recipe's models: loading a hub or local model and its tokenizer (with a revision), the
training precision, pretraining the ``scratch`` base model, and saving a soup as a Hugging Face
folder."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge_callback.recipe.callbacks import StepProgressBar
from merge_callback.recipe.config import RecipeConfig
from merge_callback.recipe.console import quiet_third_party
from merge_callback.recipe.data import RecipeData, prepare_data, train_loader

__all__ = ["require_recipe_dependencies", "load_model_and_tokenizer", "resolved_precision",
           "pretrain_base_model", "export_soup"]


_INSTALL_HINT = "pip install 'merge_callback[recipe]'"


def require_recipe_dependencies() -> None:
    """Check that the recipe's optional dependencies are installed.

    Raises:
        ImportError: transformers, tokenizers, PyYAML or matplotlib is missing (the message
            says what to install).
    """
    missing = []
    for mod in ("transformers", "tokenizers", "yaml", "matplotlib"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(f"the recipe needs {', '.join(missing)}; install them with "
                          f"`{_INSTALL_HINT}`")


def load_model_and_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None,
                             tokenizer: str | os.PathLike | None = None,
                             cache_dir: str | os.PathLike | None = None):
    """``AutoModelForCausalLM.from_pretrained(name_or_path, revision=...)`` in float32, and its
    tokenizer.

    Args:
        name_or_path: a hub name or a local Hugging Face folder.
        revision: hub branch, tag or commit (Pythia: ``"step142000"``); transformers ignores it for
            a local folder.
        tokenizer: another tokenizer name or folder (loaded without ``revision``); ``None`` loads
            the model's own at the same revision.
        cache_dir: Hugging Face cache folder (``None``: the default).

    Returns:
        ``(model, tokenizer)``; the tokenizer has an eos token (its pad token defaults to it).

    Raises:
        ValueError: the tokenizer has no eos token.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    cache = str(cache_dir) if cache_dir is not None else None
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), revision=revision,
                                                 cache_dir=cache, **{dtype_kw: torch.float32})
    if tokenizer is None:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision, cache_dir=cache)
    else:
        tok = AutoTokenizer.from_pretrained(str(tokenizer), cache_dir=cache)
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer of {tokenizer or name_or_path} has no eos token; packing "
                         "documents needs one (set `tokenizer` to one that has)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def resolved_precision(config: RecipeConfig) -> str:
    """``config.precision``; ``auto``: bf16-mixed (16-mixed without bf16) on a GPU, else 32-true."""
    if config.precision != "auto":
        return config.precision
    gpu = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def pretrain_base_model(config: RecipeConfig, out_dir: str | os.PathLike,
                        train_texts: Sequence[str], *, tokenizer: Any = None,
                        data: RecipeData | None = None) -> dict[str, Any]:
    """Pretrain a small GPT-NeoX from scratch and save it with its tokenizer to ``out_dir``.

    A byte-level BPE tokenizer (``scratch_vocab_size``) is trained on ``train_texts``; the model
    (``scratch_*`` sizes, context ``block_size``) is trained for ``scratch_steps`` at
    ``scratch_lr`` on the training blocks (the held-out split, if any, excluded), then written
    atomically with ``save_pretrained``.

    Args:
        config: the recipe config.
        out_dir: the folder to write (replaced atomically).
        train_texts: the training documents.
        tokenizer: a tokenizer already trained for this config (skips training one).
        data: the blocks already packed with ``tokenizer`` (skips packing).

    Returns:
        what was done: steps, seconds, final training loss, parameter count.

    Raises:
        ValueError: too little text for the configuration (from :func:`prepare_data`).
    """
    import lightning as L

    from merge_callback.data import tiny_gpt_neox, train_tokenizer
    from merge_callback.io import atomic_directory, atomic_write_json
    from merge_callback.lm import CausalLMModule

    t0 = time.perf_counter()
    if tokenizer is None:
        tokenizer = train_tokenizer(list(train_texts), vocab_size=config.scratch_vocab_size)
        data = None
    if data is None:
        data = prepare_data(dataclasses.replace(config, ood_data=None), tokenizer, train_texts)
    model = tiny_gpt_neox(len(tokenizer), seed=config.seed,
                          hidden_size=config.scratch_hidden_size,
                          num_layers=config.scratch_num_layers,
                          num_heads=config.scratch_num_heads, max_len=config.block_size)
    module = CausalLMModule(model, lr=config.scratch_lr,
                            warmup_steps=min(config.scratch_warmup_steps, config.scratch_steps))
    with quiet_third_party():
        L.seed_everything(config.seed, verbose=False)
        trainer = L.Trainer(max_steps=config.scratch_steps, accelerator=config.accelerator,
                            devices=1, precision=resolved_precision(config), logger=False,
                            enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=config.progress_bar,
                            callbacks=[StepProgressBar("pretraining")] if config.progress_bar
                            else [], limit_val_batches=0,
                            gradient_clip_val=config.gradient_clip_val,
                            default_root_dir=str(out_dir))
        trainer.fit(module, train_loader(data.train, config, config.seed))
    loss = trainer.callback_metrics.get("train_loss")
    info = {"steps": config.scratch_steps, "lr": config.scratch_lr,
            "seconds": time.perf_counter() - t0,
            "final_train_loss": float(loss) if loss is not None else None,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "train_blocks": int(data.train.shape[0])}
    with atomic_directory(out_dir) as tmp, quiet_third_party():
        model.cpu().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / "pretraining.json", info)
    return info


def export_soup(soup_file: str | os.PathLike, module: Any, tokenizer: Any,
                out_dir: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Write a soup (keys ``model.<hf keys>``) as a Hugging Face folder, atomically.

    The tensors are loaded with ``load_state_dict(strict=True)`` into a copy of the
    ``CausalLMModule``; the copy's model is saved with ``save_pretrained`` next to the tokenizer
    and ``merge_info.json``.

    Raises:
        RuntimeError: the soup's keys or shapes do not match the module (from ``load_state_dict``).
    """
    from safetensors.torch import load_file

    from merge_callback.io import atomic_directory, atomic_write_json
    from merge_callback.lm import CausalLMModule

    tensors = load_file(str(soup_file))
    copy_module = CausalLMModule(copy.deepcopy(module.model).cpu())
    copy_module.load_state_dict(tensors, strict=True)
    with atomic_directory(out_dir) as tmp:
        copy_module.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / "merge_info.json", dict(info or {}))
    return Path(out_dir)
