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

Modules: :mod:`~merge_callback.cli.args` (options, ``--config``), :mod:`~merge_callback.cli.session`
(input checks, held-out data, evaluation), :mod:`~merge_callback.cli.plots` (``sweep.png``,
``heatmap.png``), :mod:`~merge_callback.cli.commands` (the commands, their output files,
:func:`main`), :mod:`~merge_callback.cli.consolidate` (``python -m merge_callback.fsdp``).
"""

from merge_callback.cli.args import (DEFAULT_ALPHA, DEFAULT_MAX_BATCHES, LM_METRICS, METHODS,
                                     PROG, CLIError, batches_or_all, build_parser, config_dict,
                                     dump_config, non_negative_int, parse_args, positive_float,
                                     positive_int)
from merge_callback.cli.commands import main, run
from merge_callback.cli.consolidate import consolidate_main
from merge_callback.cli.session import (CONFIG_FILE_KEYS, TOKENIZER_FILES, HeldoutSpec,
                                        MergeSession, check_out_writable, parse_heldout)

__all__ = ["main", "consolidate_main", "run", "build_parser", "parse_args", "config_dict",
           "dump_config", "HeldoutSpec", "parse_heldout", "MergeSession", "CONFIG_FILE_KEYS",
           "TOKENIZER_FILES", "CLIError", "PROG", "DEFAULT_ALPHA", "DEFAULT_MAX_BATCHES", "METHODS",
           "LM_METRICS", "positive_int", "non_negative_int", "positive_float", "batches_or_all",
           "check_out_writable"]
