"""Checks of the recipe's paths before anything is written: model and tokenizer references, a
writable output folder (with room), a cache folder that is not below a file."""

from __future__ import annotations

import os
import re
from pathlib import Path

from merge_callback.recipe.config import RecipeError

__all__ = ["check_model_ref", "check_writable_folder", "check_not_below_file"]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(ref: str) -> bool:
    return (ref.startswith(("/", "./", "../", "~", "\\")) or ref.count("/") > 1
            or not _HUB_ID.match(ref) or ref.endswith((".safetensors", ".bin", ".ckpt", ".pt",
                                                       ".json")))


def check_model_ref(key: str, ref: str | None) -> None:
    """A local path must be a Hugging Face folder; a hub name is resolved later.

    Raises:
        RecipeError: a file, a folder without ``config.json`` (for ``model``), or a path
            that does not exist, naming ``key`` and what is allowed.
    """
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


def check_writable_folder(key: str, path: Path, need_bytes: int | None = None) -> None:
    """``path`` is a folder or can be created, its nearest existing folder accepts new entries,
    and (with ``need_bytes``) its file system has that much room.

    :func:`merge_callback.preflight.check_output_dir` checks the path, the permissions and the
    space; a temporary folder, removed at once, then proves the write (``os.access`` says yes to
    root and on some read-only mounts).

    Raises:
        RecipeError: the folder cannot be created or written, or has too little room.
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


def check_not_below_file(key: str, value: str | None) -> None:
    """``value`` (a folder, possibly not yet created) is not a file and not below one.

    Raises:
        RecipeError: it is a file or below one, naming ``key``.
    """
    if value is None:
        return
    p = Path(value).expanduser().absolute()
    anc = _first_existing(p)
    if not anc.is_dir():
        raise RecipeError(f"{key} {value} is {'a file' if anc == p else f'below a file ({anc})'}"
                          "; expected a folder")
