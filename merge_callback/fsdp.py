"""``python -m merge_callback.fsdp SRC OUT [--hf-config DIR] [--prefix P]``: consolidate a sharded
soup (see :mod:`merge_callback.io.soups`) into one safetensors file or a Hugging Face model folder
(the command lives with the other command-line front ends in :mod:`merge_callback.cli`)."""

import sys

from merge_callback.cli import consolidate_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
