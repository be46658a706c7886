"""The inputs of one ``merge-callback`` command, checked before any work: ``--heldout`` specs,
checkpoints (formats, architectures, tokenizers), the output folder; and :class:`MergeSession`,
which holds the held-out data and the evaluation model and scores soups."""

from __future__ import annotations

import argparse
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

from merge_callback.cli.args import CLIError
from merge_callback.console import quiet_third_party
from merge_callback.io import detect_key_prefix
from merge_callback.preflight import PreflightError, check_heldout, check_output_dir
from merge_callback.stream import (
    ModuleBinding,
    TensorReader,
    check_readers_compatible,
    checkpoint_format,
    parse_size,
)

__all__ = ["CONFIG_FILE_KEYS", "TOKENIZER_FILES", "HeldoutSpec", "parse_heldout",
           "check_out_writable", "MergeSession"]

CONFIG_FILE_KEYS = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json")
_CONFIG_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                   "_commit_hash", "architectures"}



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
        if need_eval and not self.specs and not ns.lm_eval:
            raise CLIError("--heldout is required here (the held-out data the candidates are "
                           "scored on)")
        if (self.specs or ns.lm_eval) and self.format != "hf" and self.model_path is None:
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
        if ns.lm_eval:
            self.shards.append(self._lm_eval_shard())
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

    def _lm_eval_shard(self) -> _Shard:
        """``--lm_eval``: one shard whose metric runs lm-evaluation-harness on the soup."""
        try:
            from merge_callback.lmeval import LmEvalMetric
        except ImportError as exc:
            raise CLIError(str(exc)) from None
        tasks = [t.strip() for t in self.ns.lm_eval.split(",") if t.strip()]
        for d in self.ns.lm_eval_include or []:
            if not Path(d).is_dir():
                raise CLIError(f"--lm_eval_include {d} is not a folder (expected a folder of "
                               "lm-eval task YAMLs)")
        try:
            metric = LmEvalMetric(tasks, tokenizer=self.tokenizer(), limit=self.ns.lm_eval_limit,
                                  include_path=self.ns.lm_eval_include or None,
                                  batch_size=self.ns.batch_size)
        except (ImportError, ValueError) as exc:
            raise CLIError(f"--lm_eval {self.ns.lm_eval}: {_first_line(exc)}") from None
        return _Shard(HeldoutSpec("lm-eval", Path(self.ns.lm_eval)), "lm_eval", (), metric, 0)

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
        with quiet_third_party():  # DeepSpeed's import notice, transformers' shard-writing bar
            self.model.save_pretrained(str(folder),
                                       max_shard_size=parse_size(self.ns.max_shard_size))
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


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
