"""Command-line options of ``merge-callback``: the argument parser, the ``argparse`` value types,
and ``--config`` / ``--print_config`` (YAML files of option defaults)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merge_callback.engine.options import ACQ_FUNCS
from merge_callback.evaluate import BUILTIN_METRICS
from merge_callback.nway import METHODS as WEIGHT_METHODS

__all__ = ["PROG", "DEFAULT_MAX_BATCHES", "DEFAULT_ALPHA", "METHODS", "LM_METRICS", "CLIError",
           "positive_int", "non_negative_int", "positive_float", "batches_or_all", "build_parser",
           "parse_args", "config_dict", "dump_config"]

PROG = "merge-callback"
#: held-out batches per file and candidate unless --max_batches says otherwise
DEFAULT_MAX_BATCHES = 20
#: lower bound of λ searched by ``merge`` (2 checkpoints) unless --alpha says otherwise
DEFAULT_ALPHA = 0.5
METHODS = tuple(sorted(WEIGHT_METHODS))  # listed alphabetically in --help and errors
LM_METRICS = BUILTIN_METRICS
_NOT_IN_CONFIG = ("command", "config", "print_config")


class CLIError(ValueError):
    """A user error found before any work is done."""


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
    g.add_argument("--lm_eval", metavar="TASK[,TASK...]",
                   help="also score candidates on lm-evaluation-harness tasks (needs `pip install "
                        "'merge_callback[eval]'`): registry names, tasks under --lm_eval_include, "
                        "or the shipped offline ones (merge_callback_next_line, "
                        "merge_callback_macbeth_ppl); their macro-average is one more held-out "
                        "shard named lm-eval")
    g.add_argument("--lm_eval_limit", type=positive_int, metavar="N",
                   help="score at most N examples per lm-eval task (default: all)")
    g.add_argument("--lm_eval_include", action="append", metavar="DIR",
                   help="folder of local lm-eval task YAMLs, repeatable")
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
    s.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
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
