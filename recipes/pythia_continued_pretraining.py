#!/usr/bin/env python
"""Continued pretraining of a Pythia model (or any causal LM) with BayesMergeCallback.

Usage::

    python recipes/pythia_continued_pretraining.py --config recipes/configs/tiny-offline.yaml
    python recipes/pythia_continued_pretraining.py --config recipes/configs/pythia-70m.yaml \
        --output_dir outputs/pythia-70m --train_data my_corpus/ --max_steps 2000

Any key of the config can be overridden with ``--key value``; ``--help`` lists them.
The implementation is ``merge_callback.recipe`` (console script ``merge-callback-recipe``).
"""

import sys
from pathlib import Path

try:
    from merge_callback.recipe import main
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from merge_callback.recipe import main

if __name__ == "__main__":
    sys.exit(main())
