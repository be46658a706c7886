"""``merge-callback``: merge checkpoints that already exist on disk.

Subcommands::

    merge-callback merge A B --heldout heldout.txt --budget 10 --alpha 0.5 --out soup/
    merge-callback merge C1 C2 C3 --method cmaes --heldout a=a.txt --heldout b=task.jsonl:2 --out soup/
    merge-callback sweep A B --points 21 --heldout heldout.txt --out sweep/
    merge-callback heatmap C1 C2 C3 C4 --heldout heldout.txt --out heatmap/

Checkpoints are given oldest first: with two checkpoints λ is the weight of the second (the later
one), the soup is ``λ·B + (1 − λ)·A``. Every subcommand accepts ``--config FILE.yaml`` (defaults for
every option; command-line flags win) and ``--print_config`` (prints the resolved configuration as
YAML that ``--config`` reads back).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_callback.engine.options import ACQ_FUNCS
from merge_callback.evaluate import BUILTIN_METRICS
from merge_callback.io import (atomic_directory, detect_key_prefix, json_safe,
                               remove_stale_temporaries)
from merge_callback.nway import METHODS as WEIGHT_METHODS
from merge_callback.preflight import PreflightError, check_heldout, check_output_dir
from merge_callback.stream import (
    ModuleBinding,
    TensorReader,
    check_readers_compatible,
    checkpoint_format,
    parse_size,
    validate_weights,
    write_merged,
)

__all__ = ["main", "consolidate_main", "run", "build_parser", "parse_args", "config_dict", "dump_config",
           "HeldoutSpec", "parse_heldout", "MergeSession", "CONFIG_FILE_KEYS"]

PROG = "merge-callback"
#: held-out batches per file and candidate unless --max_batches says otherwise
DEFAULT_MAX_BATCHES = 20
METHODS = tuple(sorted(WEIGHT_METHODS))  # listed alphabetically in --help and errors
LM_METRICS = BUILTIN_METRICS
_NOT_IN_CONFIG = ("command", "config", "print_config")
CONFIG_FILE_KEYS = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json")
_CONFIG_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                   "_commit_hash", "architectures"}


class CLIError(ValueError):
    """A user error found before any work is done."""


# --------------------------------------------------------------------------- argument parsing

def _int_at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """``argparse`` type: an integer >= 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """``argparse`` type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def batches_or_all(text: str) -> int | None:
    """``argparse`` type of ``--max_batches``: an integer >= 1, or ``all`` (``None``)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        return _int_at_least(text, 1)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'all', got {text!r}") \
            from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in str(text).replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 0.3,0.7, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """Argument errors become :class:`CLIError` so that every bad input takes one path
    (``merge-callback: error: ...``, exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # show defaults only where they say something
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


_CHECKPOINTS_HELP = ("checkpoints, oldest first: Hugging Face folders (e.g. checkpoint-<step>/, "
                     "a local Pythia revision), .safetensors files, Lightning .ckpt files or "
                     ".pt/.bin state dicts; all of one format")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("held-out evaluation")
    g.add_argument("--heldout", action="append", metavar="[NAME=]PATH[:WEIGHT]",
                   help="held-out data, repeatable: a .txt file or folder, a .jsonl with 'text' "
                        "(language modelling) or with 'context', 'choices', 'label' (multiple-"
                        "choice accuracy), or pre-tokenised token ids in .npy/.pt ([n, T] or 1-D). "
                        "With several, the fitness is their weighted macro-average (WEIGHT "
                        "defaults to 1; when losses and accuracies are mixed, losses count "
                        "negatively and higher is better)")
    g.add_argument("--metric", choices=LM_METRICS, default="loss",
                   help="metric for language-modelling held-out data (multiple-choice tasks always "
                        "use accuracy)")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer folder for text held-out data (default: the checkpoint "
                        "folder's, or --model's)")
    g.add_argument("--block_size", type=positive_int, metavar="T",
                   help="tokens per held-out block (default: the model's context, at most 1024)")
    g.add_argument("--batch_size", type=positive_int, default=8, metavar="B",
                   help="held-out blocks (or questions) per forward pass")
    g.add_argument("--max_batches", type=batches_or_all, default=DEFAULT_MAX_BATCHES, metavar="N",
                   help="evaluate each candidate on at most the first N batches of each held-out "
                        "file ('all': the whole file; the time per evaluation grows with N)")
    g.add_argument("--device", default="auto",
                   help="evaluation device: auto (cuda when available), cpu, cuda, cuda:1, ...")
    m = p.add_argument_group("model (for .ckpt / .safetensors / .pt checkpoints)")
    m.add_argument("--model", metavar="PATH",
                   help="Hugging Face folder or config.json giving the architecture to evaluate "
                        "non-folder checkpoints with (Hugging Face folders need none)")
    m.add_argument("--key_prefix", default="auto", metavar="PREFIX",
                   help="prefix removed from checkpoint tensor names to match --model's "
                        "(auto: '' or 'model.', the LightningModule attribute)")


def _add_output_options(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help=f"output folder ({what}); required")
    g.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists and is not empty")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bars or per-evaluation lines (bars are also off when stderr "
                        "is not a terminal)")
    c = p.add_argument_group("configuration")
    c.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file with defaults for any option above (keys as the option names, "
                        "checkpoints as a list); command-line flags override it")
    c.add_argument("--print_config", action="store_true",
                   help="print the resolved configuration as YAML and exit")


def build_parser() -> argparse.ArgumentParser:
    """The ``merge-callback`` argument parser (subcommands merge, sweep, heatmap)."""
    parser = _Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge checkpoints that already exist on disk into a 'soup', with weights\n"
                    "searched on held-out data (Bayesian optimisation, CMA-ES) or given by hand,\n"
                    "and run the pilot experiments (λ sweep, pairwise heatmap) on your own runs.",
        epilog="examples:\n"
               f"  {PROG} merge run/checkpoint-1800 run/checkpoint-2000 --heldout val.txt \\\n"
               "      --budget 10 --alpha 0.5 --out soup/\n"
               f"  {PROG} merge c1 c2 c3 c4 --method cmaes --budget 30 \\\n"
               "      --heldout wiki=val.txt --heldout piqa=piqa.jsonl:2 --out soup/\n"
               f"  {PROG} merge a.ckpt b.ckpt --weights 0.3,0.7 --out soup/\n"
               f"  {PROG} sweep run/checkpoint-1800 run/checkpoint-2000 --points 21 "
               "--heldout val.txt --out sweep/\n"
               f"  {PROG} heatmap run/checkpoint-* --heldout val.txt --out heatmap/\n\n"
               f"'{PROG} COMMAND --help' lists a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    merge = sub.add_parser(
        "merge", formatter_class=_Formatter, help="merge 2 or more checkpoints into a soup",
        description="Merge checkpoints (oldest first) into θ = Σ_i w_i·θ_i with w_i ≥ 0, "
                    "Σ w_i = 1.\n\n"
                    "  2 checkpoints, --method bayes (default): the paper's search of λ ∈ [alpha, "
                    "1],\n    θ = λ·B + (1−λ)·A, with a Gaussian process (λ = alpha and λ = 1 "
                    "first).\n"
                    "  N checkpoints: --method cmaes (default for N > 2; needs optuna), bayes, "
                    "greedy\n    (greedy soup) or uniform; cmaes and bayes start from each "
                    "checkpoint alone and\n    the uniform soup.\n"
                    "  --weights 0.3,0.7: fixed weights, no search (held-out data optional).\n\n"
                    "Output: Hugging Face folders in -> a Hugging Face folder out (config and "
                    "tokenizer\ncopied); .ckpt/.safetensors/.pt in with --model -> a Hugging "
                    "Face folder of --model's\narchitecture (from_pretrained loads it; the "
                    "LightningModule key prefix is removed);\nwithout --model -> "
                    "model.safetensors with the input's tensor names.\n"
                    f"Each candidate is scored on at most --max_batches (default "
                    f"{DEFAULT_MAX_BATCHES}) batches per\nheld-out file; a progress bar (on a "
                    "terminal) shows the time left.\nLarge soups are sharded like Hugging Face's. "
                    "merge.json records the weights, the\nsearch history and the held-out "
                    "scores.",
        epilog="example:\n"
               f"  {PROG} merge run/checkpoint-1800 run/checkpoint-2000 --heldout val.txt "
               "--budget 10 --out soup/")
    merge.add_argument("checkpoints", nargs="*", metavar="CKPT", help=_CHECKPOINTS_HELP)
    s = merge.add_argument_group("weights and search")
    s.add_argument("--method", choices=METHODS,
                   help="weight search (default: bayes for 2 checkpoints, cmaes for more)")
    s.add_argument("--weights", type=_float_list, metavar="W1,W2,...",
                   help="fixed weights, one per checkpoint, >= 0 and summing to 1 (no search)")
    s.add_argument("--budget", type=positive_int, default=10, metavar="N",
                   help="held-out evaluations for bayes/cmaes (with N checkpoints, the first N+1 "
                        "are each checkpoint and the uniform soup; with 2, λ = alpha and λ = 1)")
    s.add_argument("--alpha", type=float, default=0.5,
                   help="2 checkpoints with bayes: lower bound of λ, the later checkpoint's weight")
    s.add_argument("--acq_func", choices=ACQ_FUNCS, default="gp_hedge",
                   help="bayes acquisition function")
    s.add_argument("--sigma0", type=float, metavar="S",
                   help="cmaes initial step size on unnormalised weights in [0, 1] "
                        "(default: optuna's, 1/6)")
    s.add_argument("--popsize", type=positive_int, metavar="P",
                   help="cmaes population (default: 4 + 3·ln N)")
    s.add_argument("--seed", type=int, default=0, help="seed of the search")
    s.add_argument("--max_shard_size", default="5GB", metavar="SIZE",
                   help="largest output file; bigger soups are written as "
                        "model-0000k-of-0000n.safetensors + model.safetensors.index.json")
    _add_eval_options(merge)
    _add_output_options(merge, "the soup and merge.json")

    sweep = sub.add_parser(
        "sweep", formatter_class=_Formatter, help="held-out metric along λ·B + (1−λ)·A (CSV + PNG)",
        description="Evaluate the soup λ·B + (1−λ)·A at --points evenly spaced λ in [0, 1] "
                    "(λ = 0 is A,\nλ = 1 is B) and write sweep.csv, sweep.png and sweep.json: "
                    "the paper's λ curve.",
        epilog=f"example:\n  {PROG} sweep run/checkpoint-1800 run/checkpoint-2000 --points 21 "
               "--heldout val.txt --out sweep/")
    sweep.add_argument("checkpoints", nargs="*", metavar="CKPT",
                       help="two checkpoints A B, oldest first")
    sweep.add_argument("--points", type=positive_int, default=21, metavar="K",
                       help="number of λ values, >= 2")
    _add_eval_options(sweep)
    _add_output_options(sweep, "sweep.csv, sweep.png, sweep.json")

    heat = sub.add_parser(
        "heatmap", formatter_class=_Formatter,
        help="held-out metric of every pairwise merge (CSV + PNG)",
        description="Evaluate every checkpoint alone and every pairwise soup (1−lam)·C_i + "
                    "lam·C_j\n(i earlier than j) and write heatmap.csv, heatmap.png and "
                    "heatmap.json: the paper's\npilot experiment (adjacent checkpoints merge "
                    "well, distant ones do not).",
        epilog=f"example:\n  {PROG} heatmap run/checkpoint-* --heldout val.txt --out heatmap/")
    heat.add_argument("checkpoints", nargs="*", metavar="CKPT",
                      help="two or more checkpoints, oldest first")
    heat.add_argument("--lam", type=float, default=0.5,
                      help="weight of the later checkpoint of each pair, in [0, 1]")
    _add_eval_options(heat)
    _add_output_options(heat, "heatmap.csv, heatmap.png, heatmap.json")
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _import_yaml():
    try:
        import yaml
    except ImportError as exc:
        raise CLIError("--config and --print_config need pyyaml: pip install pyyaml") from exc
    return yaml


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    where = f"{source}: {key}"
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise CLIError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        items = value if isinstance(value, list) else [value]
        return [str(v) for v in items]
    if action.dest == "weights":
        if isinstance(value, str):
            return _float_list(value)
        if not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise CLIError(f"{where} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if isinstance(value, (list, dict)):
        raise CLIError(f"{where} must be a single value, got {value!r}")
    if action.type is not None:
        if isinstance(value, bool) or (action.type in (int, positive_int)
                                       and isinstance(value, float)):
            raise CLIError(f"{where}: expected {getattr(action.type, '__name__', 'a value')}, "
                           f"got {value!r}")
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise CLIError(f"{where}: {exc}") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise CLIError(f"{where} must be one of {', '.join(map(str, action.choices))}, "
                       f"got {value!r}")
    return value


def _load_config(sub: argparse.ArgumentParser, path: str, command: str) -> dict[str, Any]:
    yaml = _import_yaml()
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CLIError(f"--config {p} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CLIError(f"--config {p} must hold a mapping of option names to values, "
                       f"got {type(raw).__name__}")
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help",) + _NOT_IN_CONFIG}
    cfg = {}
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key == "command":
            if value != command:
                raise CLIError(f"--config {p} is for '{value}', not '{command}'")
            continue
        if key not in actions:
            raise CLIError(f"--config {p}: unknown option {key!r} for '{command}'; allowed: "
                           f"{', '.join(sorted(actions))}")
        cfg[key] = _coerce(actions[key], key, value, f"--config {p}")
    return cfg


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line, applying ``--config`` (flags override the file).

    Raises:
        SystemExit: on ``--help`` (exit code 0).
        CLIError: an argument error (unknown option, bad value) or an invalid ``--config`` file.
        CLIError: an invalid ``--config`` file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        raise SystemExit(2)
    if ns.config:
        sub = _subparser(parser, ns.command)
        cfg = _load_config(sub, ns.config, ns.command)
        given_on_cli = {k for k in ("heldout", "checkpoints") if getattr(ns, k)}
        sub.set_defaults(**{k: v for k, v in cfg.items() if k not in given_on_cli})
        ns = parser.parse_args(argv)
    return ns


def config_dict(ns: argparse.Namespace) -> dict[str, Any]:
    """The resolved options of a parsed command, as plain YAML/JSON-able values."""
    return {k: v for k, v in vars(ns).items() if k not in _NOT_IN_CONFIG}


def dump_config(ns: argparse.Namespace) -> str:
    """YAML that ``--config`` reads back to the same options."""
    yaml = _import_yaml()
    return yaml.safe_dump({"command": ns.command, **config_dict(ns)}, sort_keys=False)


# --------------------------------------------------------------------------- held-out data

@dataclass(frozen=True)
class HeldoutSpec:
    """One ``--heldout [NAME=]PATH[:WEIGHT]``."""

    name: str
    path: Path
    weight: float = 1.0


def parse_heldout(text: str) -> HeldoutSpec:
    """Parse ``[NAME=]PATH[:WEIGHT]``.

    Raises:
        CLIError: empty path, a weight that is not a number > 0, or a missing file.
    """
    raw = str(text)
    name = None
    if "=" in raw and not Path(raw).exists():
        head, rest = raw.split("=", 1)
        if head and all(c.isalnum() or c in "_-." for c in head):
            name, raw = head, rest
    weight = 1.0
    if ":" in raw and not Path(raw).exists():
        head, tail = raw.rsplit(":", 1)
        try:
            weight = float(tail)
        except ValueError:
            pass
        else:
            raw = head
            if not (math.isfinite(weight) and weight > 0):
                raise CLIError(f"--heldout {text!r}: WEIGHT must be a number > 0, got {tail!r}")
    if not raw:
        raise CLIError(f"--heldout {text!r}: no path given (expected [NAME=]PATH[:WEIGHT])")
    path = Path(raw)
    if not path.exists():
        raise CLIError(f"--heldout file not found: {path}")
    return HeldoutSpec(name or path.stem, path, weight)


class _Progress:
    """Re-iterable wrapper that advances the current evaluation's progress bar per batch."""

    def __init__(self, data, session: MergeSession):
        self.data = data
        self.session = session

    def __iter__(self):
        for batch in self.data:
            yield batch
            if self.session.bar is not None:
                self.session.bar.update(1)


@dataclass
class _Shard:
    spec: HeldoutSpec
    kind: str                      # "lm" or "multiple_choice"
    data: Any                      # DataLoader
    metric: Any                    # evaluate.Metric
    batches: int                   # evaluated per candidate (<= --max_batches)
    total_batches: int = 0         # in the whole file


# --------------------------------------------------------------------------- the session

def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise CLIError('evaluating checkpoints needs transformers: pip install '
                       '"merge_callback[hf]"') from exc
    return transformers


def _checkpoint_label(paths: Sequence[Path]) -> list[str]:
    names = [p.name if p.is_dir() else p.stem for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{n}" for p, n in zip(paths, names)]
    return names


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read {path}: {exc}") from None


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def _tokenizer_difference(a: Path, b: Path) -> str | None:
    """None when the tokenizers in folders ``a`` and ``b`` are the same, else a description."""
    fa = {f: (a / f).read_bytes() for f in TOKENIZER_FILES if (a / f).is_file()}
    fb = {f: (b / f).read_bytes() for f in TOKENIZER_FILES if (b / f).is_file()}
    if fa == fb:
        return None
    transformers = _transformers()
    ta = transformers.AutoTokenizer.from_pretrained(str(a))
    tb = transformers.AutoTokenizer.from_pretrained(str(b))
    va, vb = ta.get_vocab(), tb.get_vocab()
    if va != vb:
        only = sorted(set(va) ^ set(vb))
        example = f" (e.g. token {only[0]!r} is in only one)" if only else \
            " (same tokens, different ids)"
        return f"vocabularies differ: {len(va)} vs {len(vb)} tokens{example}"
    if ta.all_special_tokens != tb.all_special_tokens:
        return f"special tokens differ: {ta.all_special_tokens} vs {tb.all_special_tokens}"
    backend_a = getattr(ta, "backend_tokenizer", None)
    backend_b = getattr(tb, "backend_tokenizer", None)
    if backend_a is not None and backend_b is not None:
        ma = json.loads(backend_a.to_str()).get("model")
        mb = json.loads(backend_b.to_str()).get("model")
        if ma != mb:
            return "tokenizer models (merges) differ"
    return None


def _config_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    keys = sorted((set(a) | set(b)) - _CONFIG_IGNORED)
    for k in keys:
        if a.get(k) != b.get(k):
            return f"config field {k!r} is {a.get(k)!r} in one and {b.get(k)!r} in the other"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _unreadable_reason(exc: BaseException) -> str:
    """Why a file could not be loaded, in one line (pickled objects vs. damaged bytes)."""
    import pickle

    text = str(exc)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(exc, pickle.UnpicklingError) and blocked:
        return (f"it holds pickled Python objects other than tensors ({blocked.group(1)}), which "
                "are not loaded: torch.load(weights_only=True) refused it")
    detail = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    return ("it is damaged or not a checkpoint ("
            + (f"{type(exc).__name__}: {detail.group(1).strip()}" if detail else _first_line(exc))
            + ")")


def _open_checkpoint(path: Path) -> TensorReader:
    """Open one checkpoint; any failure becomes a :class:`CLIError` that names the file."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes on foreign files
            return TensorReader(path)
    except (FileNotFoundError, CLIError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the file's bytes make the readers raise
        if isinstance(exc, ValueError) and str(path) in str(exc):
            raise CLIError(str(exc)) from None
        why = _unreadable_reason(exc)
        raise CLIError(f"cannot read checkpoint {path}: {why}; expected a Hugging Face folder, a "
                       ".safetensors file, or a Lightning .ckpt / .pt / .bin state dict saved "
                       "with torch.save") from None


def _resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text}: CUDA is not available")
    return device


def check_out_writable(ns: argparse.Namespace) -> None:
    """``--out`` is given and can be created or written; checked first, before any input is read.

    Raises:
        CLIError: no ``--out``; it (or a parent) is a file; no permission; it holds files and
            ``--overwrite`` is not given.
    """
    if not ns.out:
        raise CLIError("--out is required: the folder to write results to")
    out = Path(ns.out)
    try:
        check_output_dir(out, None, name="--out")
    except PreflightError as exc:
        raise CLIError(str(exc)) from None
    if out.is_dir() and any(out.iterdir()) and not ns.overwrite:
        raise CLIError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


class MergeSession:
    """Validated inputs, held-out data and the evaluation model of one command.

    All checks run in the constructor, before anything is evaluated or written, in this order:
    the output folder (given, creatable, writable, not a non-empty folder without --overwrite);
    checkpoint paths, formats and contents; architectures (tensor names, shapes, dtypes;
    ``config.json``); tokenizers; the output folder's overlap with inputs and (``soup_output``)
    its free space for one soup; held-out files (:func:`merge_callback.preflight.check_heldout`).
    For non-folder checkpoints with ``--model`` the evaluation model is built and bound here (so a
    ``--model`` that does not fit fails now); for Hugging Face folders it is built on first use.
    A failed check closes what was opened.

    Args:
        ns: parsed options (see :func:`parse_args`).
        need_eval: whether held-out evaluation is required.
        soup_output: the command writes a soup (checks the free space for one).

    Raises:
        CLIError, FileNotFoundError, ValueError: naming the option or file and what is allowed.
    """

    def __init__(self, ns: argparse.Namespace, *, need_eval: bool, soup_output: bool = False):
        self.ns = ns
        self.quiet = bool(ns.quiet)
        self.show_bars = not self.quiet and sys.stderr.isatty()
        self.bar = None
        self.readers: list[TensorReader] = []
        self.model = None
        self.binding: ModuleBinding | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.evaluations = 0
        self.eval_seconds = 0.0
        self.expected = 0
        self.expected_at_most = False
        try:
            self._validate(ns, need_eval, soup_output)
        except BaseException:
            self.close()
            raise

    def _validate(self, ns: argparse.Namespace, need_eval: bool, soup_output: bool) -> None:
        self.paths = [Path(p) for p in ns.checkpoints]
        self.specs = [parse_heldout(h) for h in (ns.heldout or [])]
        self._check_out_writable()
        for p in self.paths:
            if not p.exists():
                raise FileNotFoundError(f"checkpoint not found: {p}")
        formats = [checkpoint_format(p) for p in self.paths]
        if len(set(formats)) > 1:
            listing = ", ".join(f"{p} ({f})" for p, f in zip(self.paths, formats))
            raise CLIError(f"all checkpoints must have one format; got {listing}")
        self.format = formats[0]
        self.labels = _checkpoint_label(self.paths)
        if len({p.resolve() for p in self.paths}) < len(self.paths):
            raise CLIError("the same checkpoint is given twice: " + " ".join(map(str, self.paths)))
        for p in self.paths:
            self.readers.append(_open_checkpoint(p))
        check_readers_compatible(self.readers, [str(p) for p in self.paths])
        self.configs: list[dict[str, Any]] = []
        if self.format == "hf":
            for p in self.paths:
                if not (p / "config.json").is_file():
                    raise CLIError(f"Hugging Face folder {p} has no config.json")
                self.configs.append(_read_json(p / "config.json"))
            for p, cfg in zip(self.paths[1:], self.configs[1:]):
                diff = _config_difference(self.configs[0], cfg)
                if diff:
                    raise CLIError(f"checkpoints have different architectures: {diff} "
                                   f"({self.paths[0]} vs {p})")
            with_tok = [p for p in self.paths if _has_tokenizer(p)]
            for p in with_tok[1:]:
                diff = _tokenizer_difference(with_tok[0], p)
                if diff:
                    raise CLIError(f"checkpoints use different tokenizers ({with_tok[0]} vs {p}): "
                                   f"{diff}")
            if ns.model:
                raise CLIError("--model is only for .ckpt/.safetensors/.pt checkpoints; Hugging "
                               "Face folders carry their own config")
        self.model_path = Path(ns.model) if ns.model else None
        if self.model_path is not None and not self.model_path.exists():
            raise FileNotFoundError(f"--model not found: {self.model_path}")
        self.model_config = self._model_config()
        self.tokenizer_path = self._tokenizer_path()
        names = [s.name for s in self.specs]
        if len(set(names)) < len(names):
            raise CLIError(f"--heldout names must be unique, got {names}; name them NAME=PATH")
        if need_eval and not self.specs:
            raise CLIError("--heldout is required here (the held-out data the candidates are "
                           "scored on)")
        if self.specs and self.format != "hf" and self.model_path is None:
            raise CLIError(f"evaluating {self.format} checkpoints needs their architecture: pass "
                           "--model with a Hugging Face folder or config.json of the model (and "
                           "--key_prefix if the tensor names carry one other than 'model.'); "
                           "without held-out data, merge with --weights or --method uniform")
        self.device = _resolve_device(ns.device)
        self._check_out()
        if soup_output:
            try:
                check_output_dir(Path(ns.out), self.soup_nbytes, name="--out")
            except PreflightError as exc:
                raise CLIError(str(exc)) from None
        self.shards = [self._load_shard(s) for s in self.specs]
        if self.format != "hf" and self.model_config is not None:
            # build and bind the evaluation model now: a --model that does not fit the
            # checkpoints fails here, before any evaluation or write
            self._load_model()

    @property
    def soup_nbytes(self) -> int:
        """Bytes of one soup (the tensors of the latest checkpoint, in their dtypes)."""
        return self.readers[-1].nbytes

    @property
    def writes_hf_folder(self) -> bool:
        """Whether the soup is written as a Hugging Face folder ``from_pretrained`` loads."""
        return self.format == "hf" or self.model_config is not None

    # -- checks ------------------------------------------------------------------------------

    def _model_config(self) -> dict[str, Any] | None:
        if self.format == "hf":
            return self.configs[0]
        if self.model_path is None:
            return None
        cfg = self.model_path / "config.json" if self.model_path.is_dir() else self.model_path
        if not cfg.is_file():
            raise CLIError(f"--model {self.model_path} holds no config.json")
        return _read_json(cfg)

    def _tokenizer_path(self) -> Path | None:
        if self.ns.tokenizer:
            p = Path(self.ns.tokenizer)
            if not p.exists():
                raise FileNotFoundError(f"--tokenizer not found: {p}")
            return p
        for p in self.paths if self.format == "hf" else []:
            if _has_tokenizer(p):
                return p
        if self.model_path is not None:
            folder = self.model_path if self.model_path.is_dir() else self.model_path.parent
            if _has_tokenizer(folder):
                return folder
        return None

    def _protected(self) -> list[Path]:
        paths = list(self.paths) + [s.path for s in self.specs]
        for p in (self.model_path, self.tokenizer_path):
            if p is not None:
                paths.append(p)
        if self.ns.config:
            paths.append(Path(self.ns.config))
        return paths

    def _check_out_writable(self) -> None:
        check_out_writable(self.ns)

    def _check_out(self) -> None:
        out = Path(self.ns.out)
        for p in self._protected():
            if _inside(p, out) or _inside(out, p):
                raise CLIError(f"--out {out} overlaps an input ({p}); choose another folder")
        if out.exists():
            if not out.is_dir():
                raise CLIError(f"--out {out} exists and is not a folder")
            if any(out.iterdir()) and not self.ns.overwrite:
                raise CLIError(f"--out {out} exists and is not empty; pass --overwrite to "
                               "replace it")

    @property
    def vocab_size(self) -> int | None:
        v = (self.model_config or {}).get("vocab_size")
        return int(v) if isinstance(v, int) else None

    @property
    def context(self) -> int | None:
        cfg = self.model_config or {}
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            if isinstance(cfg.get(key), int):
                return int(cfg[key])
        return None

    def block_size(self) -> int:
        if self.ns.block_size:
            if self.context is not None and self.ns.block_size > self.context:
                raise CLIError(f"--block_size {self.ns.block_size} exceeds the model's context "
                               f"({self.context} tokens)")
            return self.ns.block_size
        return min(self.context or 1024, 1024)

    def tokenizer(self):
        if getattr(self, "_tokenizer", None) is None:
            if self.tokenizer_path is None:
                raise CLIError("text held-out data needs a tokenizer: pass --tokenizer (none found "
                               "in the checkpoint folders" + (" or --model" if self.model_path
                                                              else "") + ")")
            transformers = _transformers()
            try:
                self._tokenizer = transformers.AutoTokenizer.from_pretrained(
                    str(self.tokenizer_path))
            except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
                which = "--tokenizer" if self.ns.tokenizer else "tokenizer"
                raise CLIError(f"{which} {self.tokenizer_path}: cannot load a tokenizer "
                               f"({_first_line(exc)}); expected a folder with tokenizer.json or "
                               "tokenizer_config.json") from None
        return self._tokenizer

    # -- held-out data -------------------------------------------------------------------------

    def _load_shard(self, spec: HeldoutSpec) -> _Shard:
        from torch.utils.data import DataLoader

        from merge_callback.data import BlockDataset, read_texts, tokenize_and_pack
        from merge_callback.evaluate import resolve_metric
        from merge_callback.tasks import MULTIPLE_CHOICE, is_multiple_choice_file, \
            multiple_choice_loader

        p = spec.path
        suffix = p.suffix.lower()
        T = self.block_size()
        if not (p.is_dir() or suffix in (".txt", ".jsonl", ".npy", ".pt")):
            raise CLIError(f"--heldout {p}: unsupported file; expected .txt, .jsonl (text or "
                           "multiple choice), .npy or .pt token ids, or a folder of .txt/.jsonl")
        try:
            if is_multiple_choice_file(p):
                loader = multiple_choice_loader(p, self.tokenizer(),
                                                batch_size=self.ns.batch_size, max_length=T)
                return self._shard(spec, "multiple_choice", loader, MULTIPLE_CHOICE)
            if suffix in (".npy", ".pt"):
                blocks = self._token_array(p, T)
            else:
                texts = read_texts(p)
                blocks = tokenize_and_pack(texts, self.tokenizer(), T)
                if blocks.shape[0] == 0:
                    raise CLIError(f"--heldout {p} has fewer than --block_size={T} tokens")
        except (CLIError, FileNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001 - unreadable content, named with the file
            why = (_unreadable_reason(exc).replace("a checkpoint", "a token file")
                   if suffix == ".pt" else f"cannot read it ({_first_line(exc)})")
            raise CLIError(f"--heldout {p}: {why}; expected UTF-8 "
                           ".txt, .jsonl with 'text' (or 'context', 'choices', 'label'), or .npy/"
                           ".pt integer token ids") from None
        loader = DataLoader(BlockDataset(blocks), batch_size=self.ns.batch_size, shuffle=False)
        return self._shard(spec, "lm", loader, resolve_metric(self.ns.metric))

    def _shard(self, spec, kind, loader, metric) -> _Shard:
        n = len(loader)
        if self.ns.max_batches:
            n = min(n, self.ns.max_batches)
        try:
            check_heldout(loader, vocab_size=self.vocab_size, max_positions=self.context,
                          max_batches=n, name=f"--heldout {spec.path}")
        except PreflightError as exc:
            raise CLIError(str(exc)) from None
        return _Shard(spec, kind, loader, metric, n, len(loader))

    def _token_array(self, p: Path, T: int) -> torch.Tensor:
        if p.suffix.lower() == ".npy":
            import numpy as np

            try:
                arr = np.load(p, allow_pickle=False)
            except ValueError as exc:
                raise CLIError(f"--heldout {p}: not a numeric .npy array ({exc})") from None
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iubf":
                kind = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
                raise CLIError(f"--heldout {p}: expected integer token ids of shape [n, T] or "
                               f"[N], got {kind} {tuple(getattr(arr, 'shape', ()))}")
            arr = torch.from_numpy(arr.astype(np.int64) if arr.dtype.kind == "u" else arr)
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and "input_ids" in obj:
                obj = obj["input_ids"]
            if not isinstance(obj, torch.Tensor):
                raise CLIError(f"--heldout {p}: expected a tensor of token ids (or a dict with "
                               f"'input_ids'), got {type(obj).__name__}")
            arr = obj
        if arr.dtype.is_floating_point or arr.dtype == torch.bool or arr.dim() not in (1, 2):
            raise CLIError(f"--heldout {p}: expected integer token ids of shape [n, T] or [N], "
                           f"got {arr.dtype} {tuple(arr.shape)}")
        if arr.numel() == 0:
            raise CLIError(f"--heldout {p} holds no tokens (shape {tuple(arr.shape)})")
        arr = arr.long()
        if int(arr.min()) < 0:
            raise CLIError(f"--heldout {p}: token ids must be >= 0")
        if arr.dim() == 1:
            n = arr.numel() // T
            if n == 0:
                raise CLIError(f"--heldout {p} has {arr.numel()} tokens, fewer than "
                               f"--block_size={T}")
            arr = arr[: n * T].view(n, T)
        elif self.context is not None and arr.shape[1] > self.context:
            raise CLIError(f"--heldout {p} has rows of {arr.shape[1]} tokens, more than the "
                           f"model's context ({self.context})")
        if arr.shape[0] == 0:
            raise CLIError(f"--heldout {p} holds no token rows")
        return arr

    @property
    def higher_is_better(self) -> bool:
        dirs = {s.metric.higher_is_better for s in self.shards}
        return True if len(dirs) > 1 else dirs.pop()

    @property
    def fitness_name(self) -> str:
        if len(self.shards) == 1:
            return self.shards[0].metric.name
        dirs = {s.metric.higher_is_better for s in self.shards}
        return "weighted_mean" if len(dirs) == 1 else "signed_weighted_mean"

    def fitness(self, values: dict[str, float]) -> float:
        """Weighted macro-average of the shard values (loss-like ones negated when mixed)."""
        if len(self.shards) == 1:
            return values[self.shards[0].spec.name]
        mixed = len({s.metric.higher_is_better for s in self.shards}) > 1
        total = sum(s.spec.weight for s in self.shards)
        out = 0.0
        for s in self.shards:
            sign = -1.0 if mixed and not s.metric.higher_is_better else 1.0
            out += (s.spec.weight / total) * sign * values[s.spec.name]
        return out

    # -- model -------------------------------------------------------------------------------

    def _load_model(self):
        transformers = _transformers()
        transformers.utils.logging.set_verbosity_error()
        try:
            transformers.utils.logging.disable_progress_bar()
        except AttributeError:
            pass
        auto = transformers.AutoModelForCausalLM
        major = int(transformers.__version__.split(".")[0])
        dtype_kw = "dtype" if major >= 5 else "torch_dtype"
        ignore = ()
        if self.format == "hf":
            model = auto.from_pretrained(str(self.paths[0]), **{dtype_kw: "auto"})
            ignore = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            binding = ModuleBinding.build(model, self.readers[0], by_content=True, ignore=ignore)
        else:
            cfg = dict(self.model_config or {})
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise CLIError(f"--model {self.model_path}: config.json has no 'model_type'")
            try:
                config = transformers.AutoConfig.for_model(model_type, **cfg)
                model = auto.from_config(config)
            except Exception as exc:  # noqa: BLE001 - transformers' errors for unknown configs
                raise CLIError(f"--model {self.model_path}: cannot build a causal language model "
                               f"from its config.json ({_first_line(exc)})") from None
            ref = self.readers[0]
            float_dtypes = {ref.spec(k).dtype for k in ref.keys if ref.spec(k).dtype.is_floating_point}
            if len(float_dtypes) == 1:
                model.to(float_dtypes.pop())
            ignore = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            binding, errors = None, []
            for prefix in self._prefixes(model.state_dict()):
                try:
                    binding = ModuleBinding.build(model, ref, prefix=prefix, ignore=ignore)
                    break
                except ValueError as exc:
                    errors.append(str(exc))
            if binding is None and self.format == "safetensors":
                model, binding = self._load_via_folder(auto, dtype_kw, ignore, errors)
            if binding is None:
                shaped = [e for e in errors if "has shape" in e]
                raise CLIError(f"the checkpoints do not fit --model {self.model_path}: "
                               f"{(shaped or errors)[0]}")
        model.to(self.device)
        model.eval()
        self.model = model
        # re-bind after the move: parameters keep their identity, buffers may not
        self.binding = ModuleBinding(model, binding.pairs, binding.skipped)

    def _prefixes(self, module_keys) -> list[str]:
        if self.ns.key_prefix != "auto":
            return [self.ns.key_prefix]
        keys = self.readers[0].keys
        out = [""]
        detected = detect_key_prefix(keys, module_keys)
        if detected:
            out.append(detected)
        if all(k.startswith("model.") for k in keys) and "model." not in out:
            out.append("model.")
        common = os.path.commonprefix(keys)
        common = common[: common.rfind(".") + 1] if "." in common else ""
        if common and common not in out:
            out.append(common)
        return out

    def _load_via_folder(self, auto, dtype_kw, ignore, errors):
        """Load a .safetensors checkpoint through ``from_pretrained`` (renamed tensors)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="merge-callback-")
        folder = Path(self._tmp.name)
        (folder / "config.json").write_text(json.dumps(self.model_config))
        os.symlink(self.paths[0].resolve(), folder / "model.safetensors")
        try:
            model = auto.from_pretrained(str(folder), **{dtype_kw: "auto"})
            binding = ModuleBinding.build(model, self.readers[0], by_content=True, ignore=ignore)
        except Exception as exc:  # noqa: BLE001 - size mismatches raise RuntimeError
            errors.append(_first_line(exc))
            return None, None
        return model, binding

    def load(self, weights: Sequence[float]) -> None:
        """Put the soup with ``weights`` into :attr:`model`."""
        if self.model is None:
            self._load_model()
        self.binding.load(self.readers, weights)

    # -- evaluation ----------------------------------------------------------------------------

    def plan(self, evaluations: int, *, at_most: bool = False) -> None:
        """Announce the evaluations to come: opens the progress bar over all of them (batches,
        with an estimate of the time left) and logs how much of each held-out file is scored.

        Args:
            evaluations: candidates to evaluate (an upper bound when ``at_most``).
        """
        self.expected = evaluations
        self.expected_at_most = at_most
        per_eval = sum(s.batches for s in self.shards)
        for s in self.shards:
            if s.batches < s.total_batches:
                self.log(f"scoring the first {s.batches} of {s.total_batches} batches of "
                         f"{s.spec.path} per candidate (--max_batches {self.ns.max_batches}; "
                         "--max_batches all scores the whole file)")
        if self.show_bars and per_eval:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=evaluations * per_eval, desc="eval", leave=False,
                            file=sys.stderr, unit="batch", dynamic_ncols=True)

    def evaluate(self, weights: Sequence[float], label: str = "") -> tuple[float, dict[str, float]]:
        """Score the soup with ``weights``: ``(fitness, {shard name: value})``."""
        from merge_callback.evaluate import HeldoutEvaluator

        t0 = time.perf_counter()
        self.load(weights)
        self.evaluations += 1
        values: dict[str, float] = {}
        if self.bar is not None:
            self.bar.set_description_str(f"eval {self.evaluations}{label}", refresh=False)
        for s in self.shards:
            ev = HeldoutEvaluator(_Progress(s.data, self), s.metric, max_batches=s.batches)
            values[s.spec.name] = ev(self.model)
        dt = time.perf_counter() - t0
        self.eval_seconds += dt
        if self.evaluations == 1 and self.expected > 1:
            rest = self.expected - 1
            self.log(f"evaluation 1 took {dt:.1f} s ({sum(s.batches for s in self.shards)} "
                     f"batches); the remaining {'≤' if self.expected_at_most else ''}{rest} take "
                     f"about {_duration(dt * rest)}")
        return self.fitness(values), values

    def log(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close_progress(self) -> None:
        """Close the evaluation progress bar (before the summary is printed)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def save_pretrained(self, weights: Sequence[float], folder: Path) -> list[str]:
        """Write the soup with ``weights`` as a Hugging Face folder (``save_pretrained`` of the
        evaluation model, plus the tokenizer files), for checkpoints that are not folders.

        Returns:
            the file names written.
        """
        if self.model is None:
            self._load_model()
        self.load(weights)
        self.model.save_pretrained(str(folder), max_shard_size=parse_size(self.ns.max_shard_size))
        if self.tokenizer_path is not None and self.tokenizer_path.is_dir():
            for name in TOKENIZER_FILES:
                if (self.tokenizer_path / name).is_file():
                    shutil.copy2(self.tokenizer_path / name, folder / name)
        return sorted(p.name for p in folder.iterdir() if p.is_file())

    def close(self) -> None:
        self.close_progress()
        for r in self.readers:
            r.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def heldout_info(self) -> list[dict[str, Any]]:
        return [{"name": s.spec.name, "path": str(s.spec.path), "weight": s.spec.weight,
                 "kind": s.kind, "metric": s.metric.name,
                 "higher_is_better": s.metric.higher_is_better, "batches": s.batches}
                for s in self.shards]


# --------------------------------------------------------------------------- output helpers

def _copy_hf_files(session: MergeSession, tmp: Path) -> list[str]:
    copied = []
    ref = session.paths[-1]
    for name in CONFIG_FILE_KEYS + TOKENIZER_FILES:
        if (ref / name).is_file():
            shutil.copy2(ref / name, tmp / name)
            copied.append(name)
    if not any(n in copied for n in TOKENIZER_FILES) and session.tokenizer_path is not None \
            and session.tokenizer_path.is_dir():
        for name in TOKENIZER_FILES:
            if (session.tokenizer_path / name).is_file():
                shutil.copy2(session.tokenizer_path / name, tmp / name)
                copied.append(name)
    return copied


def _readable_like_save_pretrained(folder: Path) -> None:
    """Give a finished output folder the modes a plain ``mkdir``/``open`` would (umask applied);
    temporary folders and safetensors files are created private (0700 / 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _per_shard(values: dict[str, float]) -> str:
    if len(values) < 2:
        return ""
    return " (" + ", ".join(f"{k}={v:.4f}" for k, v in values.items()) + ")"


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _fmt_weights(w: Sequence[float]) -> str:
    return "[" + " ".join(f"{x:.4f}" for x in w) + "]"


def _common_record(session: MergeSession, ns: argparse.Namespace) -> dict[str, Any]:
    from merge_callback import __version__

    return {
        "command": ns.command,
        "checkpoints": [str(p) for p in session.paths],
        "labels": session.labels,
        "format": session.format,
        "heldout": session.heldout_info(),
        "fitness": ({"name": session.fitness_name, "higher_is_better": session.higher_is_better}
                    if session.shards else None),
        "merge_callback_version": __version__,
        "config": config_dict(ns),
    }


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise CLIError("plots need matplotlib: pip install matplotlib") from exc


# --------------------------------------------------------------------------- commands

def _cmd_merge(ns: argparse.Namespace) -> dict[str, Any]:
    check_out_writable(ns)
    n = len(ns.checkpoints)
    if n < 2:
        raise CLIError(f"merge needs at least 2 checkpoints, got {n}")
    if ns.weights is not None and ns.method is not None:
        raise CLIError("give either --weights (fixed) or --method (searched), not both")
    if ns.weights is not None:
        try:
            fixed = validate_weights(ns.weights, n, name="--weights")
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        method = "fixed"
    else:
        fixed = None
        method = ns.method or ("bayes" if n == 2 else "cmaes")
    if not (0.0 < ns.alpha < 1.0):
        raise CLIError(f"--alpha must be in (0, 1), got {ns.alpha}")
    try:
        parse_size(ns.max_shard_size)
    except ValueError as exc:
        raise CLIError(f"--max_shard_size: {exc}") from None
    searched = method in ("bayes", "cmaes", "greedy")
    if searched and not ns.heldout:
        raise CLIError(f"--heldout is required for --method {method} (candidates are scored on "
                       "held-out data); for a plain merge pass --weights or --method uniform")
    if method == "cmaes":
        from merge_callback.nway import import_optuna

        try:
            import_optuna()
        except ImportError as exc:
            raise CLIError(str(exc)) from None
    pairwise = method == "bayes" and n == 2
    if method in ("bayes", "cmaes") and not pairwise:
        from merge_callback.nway import validate_weight_search_args

        try:
            validate_weight_search_args(n, method, ns.budget, ns.sigma0, ns.popsize)
        except ValueError as exc:
            raise CLIError(f"--{str(exc)}") from None
    if pairwise and ns.budget < 3:
        raise CLIError(f"--budget must be >= 3 for 2 checkpoints (λ = alpha, λ = 1 and at least "
                       f"one searched point), got {ns.budget}")

    session = MergeSession(ns, need_eval=searched, soup_output=True)
    try:
        return _run_merge(session, ns, method, fixed, pairwise)
    finally:
        session.close()


def _run_merge(session: MergeSession, ns, method: str, fixed, pairwise: bool) -> dict[str, Any]:
    n = len(session.paths)
    t0 = time.perf_counter()
    observations: list[dict[str, Any]] = []
    best: dict[str, Any] = {"value": None}
    hib = session.higher_is_better if session.shards else False
    expected = {"bayes": ns.budget, "cmaes": ns.budget, "greedy": 2 * n - 1, "uniform": 1,
                "fixed": 1}[method]
    if session.shards:
        session.plan(expected, at_most=method == "greedy")

    def objective(weights: Sequence[float], lam: float | None = None) -> float:
        k = len(observations) + 1
        label = f"/{expected}" if method != "greedy" else ""
        value, values = session.evaluate(weights, label)
        obs = {"weights": list(weights), "value": value, "values": values}
        if lam is not None:
            obs = {"lam": lam, **obs}
        observations.append(obs)
        if best["value"] is None or (value > best["value"] if hib else value < best["value"]):
            best.update(value=value, weights=list(weights))
        where = f"λ={lam:.4f}" if lam is not None else f"w={_fmt_weights(weights)}"
        session.log(f"[{k}/{expected if method != 'greedy' else '≤' + str(expected)}] {where}  "
                    f"{session.fitness_name}={value:.6f}{_per_shard(values)}  "
                    f"best={best['value']:.6f}")
        return value

    result: dict[str, Any] = {}
    if method == "fixed" or (method == "uniform"):
        weights = list(fixed) if fixed is not None else [1.0 / n] * n
        value = objective(weights) if session.shards else None
        result.update(weights=weights, value=value)
    elif pairwise:
        from merge_callback.search import search_lambda

        r = search_lambda(lambda lam: objective([1.0 - lam, lam], lam), alpha=ns.alpha,
                          budget=ns.budget, strategy="bayes", acq_func=ns.acq_func, seed=ns.seed,
                          higher_is_better=hib)
        result.update(weights=[1.0 - r.lam, r.lam], lam=r.lam, value=r.value,
                      alpha=ns.alpha, acq_func=ns.acq_func)
    else:
        from merge_callback.nway import default_popsize, search_weights

        r = search_weights(lambda w: objective(w), n, method=method, budget=ns.budget,
                           seed=ns.seed, higher_is_better=hib, sigma0=ns.sigma0,
                           popsize=ns.popsize, acq_func=ns.acq_func)
        result.update(weights=list(r.weights), value=r.value)
        if method == "cmaes":
            result.update(popsize=ns.popsize or default_popsize(n), sigma0=ns.sigma0)
    weights = validate_weights(result["weights"], n)
    result["weights"] = list(weights)

    baselines = {}
    for obs in observations:
        w = obs["weights"]
        if w == [1.0 / n] * n:
            baselines["uniform"] = obs["value"]
        for i in range(n):
            if w[i] == 1.0:
                baselines[session.labels[i]] = obs["value"]
    record = {
        **_common_record(session, ns),
        "method": method,
        **result,
        "weights_by_checkpoint": dict(zip(session.labels, result["weights"])),
        "values": next((o["values"] for o in observations if o["weights"] == result["weights"]),
                       None),
        "baselines": baselines,
        "observations": observations,
        "evaluations": len(observations),
        "seed": ns.seed,
        "seconds_evaluating": round(session.eval_seconds, 3),
    }
    out = Path(ns.out)
    metadata = {"merge_callback": json.dumps(json_safe({
        "checkpoints": record["labels"], "weights": result["weights"], "method": method}))}
    session.close_progress()
    _remove_debris(session, out)
    with atomic_directory(out) as tmp:
        if session.format != "hf" and session.writes_hf_folder:
            files = session.save_pretrained(weights, tmp)
        else:
            files = write_merged(session.readers, weights, tmp, max_shard_size=ns.max_shard_size,
                                 metadata=metadata)
        if session.format == "hf":
            files += _copy_hf_files(session, tmp)
        record["files"] = sorted(files) + ["merge.json"]
        record["seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / "merge.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
        _readable_like_save_pretrained(tmp)
    _print_merge_summary(session, record)
    return record


def _print_merge_summary(session: MergeSession, record: dict[str, Any]) -> None:
    lines = []
    w = " + ".join(f"{x:.4f}·{lab}" for lab, x in zip(session.labels, record["weights"]))
    head = f"soup = {w}"
    if "lam" in record:
        head = f"λ = {record['lam']:.4f} (weight of {session.labels[-1]});  " + head
    lines.append(head)
    if record.get("value") is not None:
        lines.append(f"held-out {session.fitness_name}: {record['value']:.6f}"
                     f"{_per_shard(record['values'] or {})}  "
                     f"({record['evaluations']} evaluations, method {record['method']})")
        for name, v in record["baselines"].items():
            lines.append(f"  {name:>20s}: {v:.6f}")
    lines.append(f"wrote {record['config']['out']}: {', '.join(record['files'])}")
    print("\n".join(lines))


def _remove_debris(session: MergeSession, out: Path) -> None:
    """Remove what killed writes left next to ``out`` (temporaries of dead processes)."""
    for p in remove_stale_temporaries(out.parent):
        session.log(f"removed {p}, left by an interrupted write")


def _pair_rows(session: MergeSession, points: list[tuple[str, list[float], dict[str, Any]]]):
    session.plan(len(points))
    rows = []
    for label, weights, extra in points:
        value, values = session.evaluate(weights, label)
        rows.append({**extra, "value": value, **{f"heldout:{k}": v for k, v in values.items()}})
        session.log(f"[{len(rows)}/{len(points)}] {label.strip()}  "
                    f"{session.fitness_name}={value:.6f}{_per_shard(values)}")
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v)
                             for k, v in r.items()})


def _cmd_sweep(ns: argparse.Namespace) -> dict[str, Any]:
    check_out_writable(ns)
    if len(ns.checkpoints) != 2:
        raise CLIError(f"sweep needs exactly 2 checkpoints (A B, oldest first), got "
                       f"{len(ns.checkpoints)}")
    if ns.points < 2:
        raise CLIError(f"--points must be >= 2, got {ns.points}")
    _check_matplotlib()
    session = MergeSession(ns, need_eval=True)
    try:
        lams = [i / (ns.points - 1) for i in range(ns.points)]
        points = [(f" λ={lam:.4f}", [1.0 - lam, lam], {"lam": lam, "weight_a": 1.0 - lam,
                                                        "weight_b": lam}) for lam in lams]
        rows = _pair_rows(session, points)
        hib = session.higher_is_better
        best = (max if hib else min)(rows, key=lambda r: r["value"])
        record = {**_common_record(session, ns), "points": rows,
                  "best": {"lam": best["lam"], "value": best["value"]},
                  "seconds_evaluating": round(session.eval_seconds, 3)}
        session.close_progress()
        _remove_debris(session, Path(ns.out))
        with atomic_directory(Path(ns.out)) as tmp:
            _write_csv(tmp / "sweep.csv", rows)
            _plot_sweep(tmp / "sweep.png", session, rows)
            (tmp / "sweep.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
            _readable_like_save_pretrained(tmp)
        print(f"{'λ':>8s}  {session.fitness_name}")
        for r in rows:
            mark = "  <- best" if r is best else ""
            print(f"{r['lam']:8.4f}  {r['value']:.6f}{mark}")
        print(f"wrote {ns.out}: sweep.csv, sweep.png, sweep.json")
        return record
    finally:
        session.close()


def _plot_sweep(path: Path, session: MergeSession, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lams = [r["lam"] for r in rows]
    ax.plot(lams, [r["value"] for r in rows], "o-", label=session.fitness_name)
    if len(session.shards) > 1:
        for s in session.shards:
            ax.plot(lams, [r[f"heldout:{s.spec.name}"] for r in rows], ".--", alpha=0.6,
                    label=s.spec.name)
        ax.legend()
    ax.set_xlabel(f"λ  (weight of {session.labels[1]}; 0 = {session.labels[0]})")
    ax.set_ylabel(f"held-out {session.fitness_name}")
    ax.set_title(f"λ·B + (1−λ)·A,  A = {session.labels[0]},  B = {session.labels[1]}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cmd_heatmap(ns: argparse.Namespace) -> dict[str, Any]:
    check_out_writable(ns)
    n = len(ns.checkpoints)
    if n < 2:
        raise CLIError(f"heatmap needs at least 2 checkpoints, got {n}")
    if not (0.0 <= ns.lam <= 1.0):
        raise CLIError(f"--lam must be in [0, 1], got {ns.lam}")
    _check_matplotlib()
    session = MergeSession(ns, need_eval=True)
    try:
        labels = session.labels
        points = []
        for i in range(n):
            w = [0.0] * n
            w[i] = 1.0
            points.append((f" {labels[i]}", w, {"i": i, "j": i, "checkpoint_i": labels[i],
                                                 "checkpoint_j": labels[i], "lam": 1.0}))
        for i in range(n):
            for j in range(i + 1, n):
                w = [0.0] * n
                w[i], w[j] = 1.0 - ns.lam, ns.lam
                points.append((f" {labels[i]}+{labels[j]}", w,
                               {"i": i, "j": j, "checkpoint_i": labels[i],
                                "checkpoint_j": labels[j], "lam": ns.lam}))
        rows = _pair_rows(session, points)
        hib = session.higher_is_better
        single = {r["i"]: r["value"] for r in rows if r["i"] == r["j"]}
        for r in rows:
            parent = (max if hib else min)(single[r["i"]], single[r["j"]])
            r["gain_vs_best_parent"] = (r["value"] - parent) if hib else (parent - r["value"])
        record = {**_common_record(session, ns), "lam": ns.lam, "pairs": rows,
                  "seconds_evaluating": round(session.eval_seconds, 3)}
        session.close_progress()
        _remove_debris(session, Path(ns.out))
        with atomic_directory(Path(ns.out)) as tmp:
            _write_csv(tmp / "heatmap.csv", rows)
            _plot_heatmap(tmp / "heatmap.png", session, rows, ns.lam)
            (tmp / "heatmap.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
            _readable_like_save_pretrained(tmp)
        width = max(len(lab) for lab in labels)
        print(f"held-out {session.fitness_name} (diagonal: single checkpoint; above: "
              f"{1 - ns.lam:g}·row + {ns.lam:g}·column)")
        table = {(r["i"], r["j"]): r["value"] for r in rows}
        print(" " * width + "  " + "  ".join(f"{lab:>{max(10, len(lab))}s}" for lab in labels))
        for i in range(n):
            cells = []
            for j in range(n):
                v = table.get((i, j))
                cells.append(f"{v:>{max(10, len(labels[j]))}.5f}" if v is not None
                             else " " * max(10, len(labels[j])))
            print(f"{labels[i]:>{width}s}  " + "  ".join(cells))
        print(f"wrote {ns.out}: heatmap.csv, heatmap.png, heatmap.json")
        return record
    finally:
        session.close()


def _plot_heatmap(path: Path, session: MergeSession, rows, lam: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(session.labels)
    grid = np.full((n, n), np.nan)
    for r in rows:
        grid[r["i"], r["j"]] = r["value"]
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 2))
    cmap = "viridis" if session.higher_is_better else "viridis_r"
    im = ax.imshow(grid, cmap=cmap)
    for r in rows:
        red, green, blue, _ = im.cmap(im.norm(r["value"]))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        ax.text(r["j"], r["i"], f"{r['value']:.4f}", ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    ax.set_xticks(range(n), session.labels, rotation=45, ha="right")
    ax.set_yticks(range(n), session.labels)
    ax.set_title(f"held-out {session.fitness_name}: {1 - lam:g}·row + {lam:g}·column")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_COMMANDS = {"merge": _cmd_merge, "sweep": _cmd_sweep, "heatmap": _cmd_heatmap}


def run(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run a command and return its record (what it writes as JSON); ``None`` for
    ``--print_config``.

    Raises:
        CLIError, ValueError, FileNotFoundError: bad input, before any work.
        SystemExit: ``--help``.
    """
    ns = parse_args(argv)
    if ns.print_config:
        sys.stdout.write(dump_config(ns))
        return None
    return _COMMANDS[ns.command](ns)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``merge-callback``; returns the exit code: 0, 2 on bad input (one line
    ``merge-callback: error: ...`` on stderr, nothing written), 130 when interrupted."""
    try:
        run(argv)
    except (CLIError, ValueError, OSError, ImportError) as exc:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output was written", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return 0



def consolidate_main(argv: Sequence[str] | None = None) -> int:
    """``python -m merge_callback.fsdp SRC OUT [--hf-config DIR] [--prefix P]``."""
    from merge_callback.io.soups import consolidate_sharded_soup

    p = argparse.ArgumentParser(prog="python -m merge_callback.fsdp",
                                description="Consolidate a sharded soup into one safetensors "
                                            "file or (with --hf-config) a Hugging Face folder.")
    p.add_argument("src", help="the <stem>.sharded folder or its <stem>.json sidecar")
    p.add_argument("out", help="output .safetensors file, or folder with --hf-config")
    p.add_argument("--hf-config", help="folder or file with the model's config.json")
    p.add_argument("--prefix", default=None, help="key prefix to strip (default: detected)")
    args = p.parse_args(argv)
    model = None
    if args.hf_config:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.hf_config)
        model = AutoModelForCausalLM.from_config(config)
    out = consolidate_sharded_soup(args.src, args.out, model=model, prefix=args.prefix)
    print(out)
    return 0

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
