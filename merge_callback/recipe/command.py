"""The ``merge-callback-recipe`` command line: any config key as ``--key value``, ``--config``,
``--print_config``, ``--resume`` / ``--overwrite``; bad input ends as
``merge-callback-recipe: error: ...`` with exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from merge_callback.recipe.config import (RecipeConfig, dump_config, load_config,
                                          split_optional, type_hints)
from merge_callback.recipe.runner import RESUME_MAY_CHANGE, RUN_OUTPUTS, execute, prepare

__all__ = ["main", "PROG"]


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
    hints = type_hints()
    for f in fields(RecipeConfig):
        base, optional = split_optional(hints[f.name])
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
        plan = prepare(config, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, OSError, ImportError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    execute(plan)
    return 0
