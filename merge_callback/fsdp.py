"""``python -m merge_callback.fsdp SRC OUT``: consolidate a sharded soup (see
:mod:`merge_callback.soups`) into one safetensors file or a Hugging Face model folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from merge_callback.soups import consolidate_sharded_soup

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m merge_callback.fsdp SRC OUT [--hf-config DIR] [--prefix P]``."""
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


if __name__ == "__main__":
    sys.exit(main())
