"""Score a live module on lm-evaluation-harness tasks (``pip install 'merge_callback[eval]'``).

:class:`LmEvalMetric` is a metric the callbacks and
:class:`~merge_callback.evaluate.HeldoutEvaluator` accept wherever they take ``"loss"``: each
candidate soup is scored by running lm-eval's ``HFLM`` on the module itself (no copy;
``HFLM(pretrained=<model object>, tokenizer=...)``), inside the evaluator's precision context.
Under data parallelism every rank scores its share of the examples (rank ``r`` takes examples
``r, r + world, ...``) and the per-task sums are added across ranks, so the value equals a
single-process run of lm-eval on the same examples.

Tasks are found by name in lm-eval's registry and in ``include_path`` folders of task YAMLs; the
package ships two offline tasks under :data:`TASKS_DIR`, built from Macbeth (held out of the
Shakespeare training split): :data:`LOCAL_TASK` (the next line of a speech among four, ``acc``)
and :data:`LOCAL_PPL_TASK` (perplexity of speeches). :func:`next_line_examples`,
:func:`speech_examples` and :func:`write_next_line_task` build such tasks from any text.

Example::

    from merge_callback.lmeval import LmEvalMetric, LOCAL_TASK
    metric = LmEvalMetric([LOCAL_TASK], tokenizer=tokenizer, limit=32)
    cb = BayesMergeTrainerCallback(metric=metric)
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LmEvalMetric", "TASKS_DIR", "LOCAL_TASK", "LOCAL_PPL_TASK", "next_line_examples",
           "speech_examples", "write_next_line_task",
           "find_lm", "require_lm_eval", "run_lm_eval"]

#: folder of task YAMLs shipped with the package (always on the task search path)
TASKS_DIR = Path(__file__).with_name("lmeval_tasks")
#: a shipped offline task: pick the next line of a Macbeth speech among four (``acc``)
LOCAL_TASK = "merge_callback_next_line"
#: a shipped offline task: perplexity of Macbeth speeches (``word_perplexity``; lower is better)
LOCAL_PPL_TASK = "merge_callback_macbeth_ppl"

# aggregation name -> how (total, count) become the task's value
_FINALIZE: dict[str, Callable[[float], float]] = {
    "mean": lambda x: x,
    "perplexity": lambda x: math.exp(-x) if -x < 700 else math.inf,
    "weighted_perplexity": lambda x: math.exp(-x) if -x < 700 else math.inf,
    "bits_per_byte": lambda x: -x / math.log(2),
}
_WEIGHTED = {"weighted_perplexity", "bits_per_byte"}  # per-example (numerator, denominator)


def require_lm_eval():
    """Import ``lm_eval`` or raise an ImportError that says how to install it."""
    try:
        import lm_eval  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as e:
        raise ImportError("lm-eval metrics need lm-evaluation-harness: "
                          "pip install 'merge_callback[eval]' (or pip install lm-eval)") from e
    return lm_eval


def find_lm(module: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside ``module`` (``module`` itself when it is one).

    A LightningModule that keeps its network as ``self.model`` gives that network.

    Raises:
        TypeError: no submodule is a ``transformers.PreTrainedModel``, or several are and none
            contains the others.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - lm-eval depends on transformers
        raise ImportError("lm-eval metrics need transformers: pip install transformers") from e
    if isinstance(module, PreTrainedModel):
        return module
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, PreTrainedModel)]
    top = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]
    if len(top) != 1:
        names = [n for n, _ in top]
        raise TypeError(f"{type(module).__name__} must be a transformers PreTrainedModel or hold "
                        f"exactly one (e.g. as self.model) for lm-eval; found {names or 'none'}")
    return top[0][1]


class LmEvalMetric:
    """A metric that scores the module on lm-evaluation-harness tasks.

    The value is the weighted mean over tasks of each task's metric (by default the first metric in
    the task's ``metric_list``, e.g. ``acc``); tasks must agree on the direction.

    Args:
        tasks: task names (lm-eval's registry, ``include_path`` folders or :data:`LOCAL_TASK`).
        tokenizer: a ``transformers`` tokenizer object or a path/name for ``AutoTokenizer``.
        limit: score only the first ``limit`` examples of each task (None: all).
        weights: None for the plain mean over tasks, or one non-negative weight per task (a
            sequence aligned with ``tasks`` or a mapping task -> weight; they are normalised).
        metrics: the metric per task (a mapping task -> metric name, or one name for all tasks).
        include_path: extra folders of task YAMLs (:data:`TASKS_DIR` is always included).
        include_defaults: also index lm-eval's built-in tasks; None: only when a task is not found
            in the local folders (indexing the built-in tasks takes seconds).
        batch_size: lm-eval's batch size for the forward passes.
        max_length: the context length lm-eval truncates to (None: the model config's).
        num_fewshot: few-shot examples per prompt (None: the task's default, else 0).
        fewshot_seed: seed of the few-shot draws, reset before every evaluation so that every
            candidate sees the same prompts (lm-eval's default, 1234). Under data parallelism
            each rank draws for its own share, as in lm-eval's own multi-process runs.
        name: the name recorded with each round (default ``lmeval:<task>/<metric>,...``).

    Raises:
        ValueError: no task, duplicate tasks, bad ``limit``/``weights``/``batch_size``, an unknown
            task or metric, a task whose aggregation cannot be summed across ranks, or tasks whose
            metrics disagree on the direction.
        ImportError: lm-eval is not installed.
    """

    #: the evaluator runs :meth:`score_module` instead of its batch loop
    scores_module = True

    def __init__(self, tasks: str | Sequence[str], *, tokenizer: Any, limit: int | None = None,
                 weights: Sequence[float] | Mapping[str, float] | None = None,
                 metrics: str | Mapping[str, str] | None = None,
                 include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 include_defaults: bool | None = None, batch_size: int = 8,
                 max_length: int | None = None, num_fewshot: int | None = None,
                 fewshot_seed: int = 1234, name: str | None = None):
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct, got {tasks}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"limit must be a positive integer or None (all examples), "
                             f"got {limit!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if tokenizer is None:
            raise ValueError("tokenizer is required: a transformers tokenizer or a path to one")
        self.tasks = tasks
        self.limit = limit
        self.weights = _normalise_weights(tasks, weights)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        if num_fewshot is not None and (isinstance(num_fewshot, bool)
                                        or not isinstance(num_fewshot, int) or num_fewshot < 0):
            raise ValueError(f"num_fewshot must be an integer >= 0 or None, got {num_fewshot!r}")
        self.num_fewshot = num_fewshot
        self.fewshot_seed = fewshot_seed
        paths = [] if include_path is None else (
            [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
        self.include_path = [str(TASKS_DIR)] + [str(Path(p)) for p in paths]
        for p in self.include_path:
            if not Path(p).is_dir():
                raise ValueError(f"include_path {p!r} is not a folder of task YAMLs")
        require_lm_eval()
        self._task_dict = self._load_tasks(include_defaults)
        self.metrics, self._aggregations, directions = self._choose_metrics(metrics)
        if len(set(directions.values())) != 1:
            raise ValueError("the tasks' metrics disagree on the direction (higher or lower is "
                             f"better): {directions}; score them in separate metrics")
        self.higher_is_better = next(iter(directions.values()))
        self.name = name or "lmeval:" + ",".join(f"{t}/{self.metrics[t]}" for t in tasks)
        self._docs = {t: len(self._task_dict["tasks"][t].eval_docs) for t in tasks}
        self._lm_cache: tuple[weakref.ref, Any] | None = None

    # ------------------------------------------------------------- set-up
    def _load_tasks(self, include_defaults: bool | None) -> dict[str, Any]:
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=self.include_path,
                         include_defaults=bool(include_defaults))
        if include_defaults is None and any(t not in tm.all_tasks for t in self.tasks):
            tm = TaskManager(include_path=self.include_path, include_defaults=True)
        unknown = [t for t in self.tasks if t not in tm.all_subtasks]
        if unknown:
            groups = [t for t in unknown if t in tm.all_tasks]
            hint = (f" ({groups} are groups or tags: list their tasks instead)" if groups else
                    f"; local tasks: {[t for t in tm.all_subtasks if not _is_builtin(tm, t)][:20]}")
            raise ValueError(f"unknown lm-eval task(s) {unknown}{hint}")
        if hasattr(tm, "load"):
            tasks = tm.load(self.tasks)["tasks"]
        else:  # lm-eval before TaskManager.load
            from lm_eval.tasks import get_task_dict

            tasks = get_task_dict(self.tasks, tm)
        for t in tasks.values():  # as simple_evaluate: the YAML's count, else 0
            if self.num_fewshot is not None:
                t.set_config(key="num_fewshot", value=self.num_fewshot)
            elif t.get_config("num_fewshot") is None:
                t.set_config(key="num_fewshot", value=0)
        return {"tasks": {t: tasks[t] for t in self.tasks}, "groups": {}}

    def _choose_metrics(self, metrics):
        chosen, aggs, directions = {}, {}, {}
        for t in self.tasks:
            task = self._task_dict["tasks"][t]
            agg = task.aggregation()
            hib = task.higher_is_better()
            listed = [m["metric"] for m in (task.config.metric_list or [])] or list(agg)
            want = metrics.get(t) if isinstance(metrics, Mapping) else metrics
            m = want if want is not None else listed[0]
            if m not in agg:
                raise ValueError(f"task {t!r} has no metric {m!r}; it has {sorted(agg)}")
            agg_name = getattr(agg[m], "__name__", str(agg[m]))
            if agg_name not in _FINALIZE:
                raise ValueError(f"task {t!r} metric {m!r} aggregates with {agg_name!r}, which "
                                 f"cannot be summed across ranks; allowed: {sorted(_FINALIZE)}")
            chosen[t], aggs[t], directions[t] = m, agg_name, bool(hib.get(m, True))
        if isinstance(metrics, Mapping):
            extra = sorted(set(metrics) - set(self.tasks))
            if extra:
                raise ValueError(f"metrics names tasks that are not scored: {extra}")
        return chosen, aggs, directions

    def _lm(self, model: nn.Module):
        """An HFLM wrapping ``model`` (no copy), built once per model object."""
        if self._lm_cache is not None and self._lm_cache[0]() is model:
            return self._lm_cache[1]
        from lm_eval.models.huggingface import HFLM

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size,
                  max_length=self.max_length)
        for request in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            # no progress bars for every candidate soup
            setattr(lm, request, functools.partial(getattr(lm, request), disable_tqdm=True))
        self._lm_cache = (weakref.ref(model), lm)
        return lm

    # ------------------------------------------------------------- scoring
    def indices(self, task: str, rank: int = 0, world_size: int = 1) -> list[int]:
        """The example indices of ``task`` scored on ``rank`` (all when ``world_size`` is 1)."""
        n = self._docs[task] if self.limit is None else min(self.limit, self._docs[task])
        return list(range(rank, n, world_size))

    def task_totals(self, module: nn.Module, rank: int = 0, world_size: int = 1) -> Tensor:
        """Per-task ``[total, count]`` sums (float64, shape ``[tasks, 2]``) over this rank's share.

        Call inside the evaluator's contexts (eval mode, inference mode, precision); the caller
        restores training flags.
        """
        import lm_eval.evaluator

        model = find_lm(module)
        device = _device(model)
        out = torch.zeros(len(self.tasks), 2, dtype=torch.float64, device=device)
        share = {t: self.indices(t, rank, world_size) for t in self.tasks}
        todo = [t for t in self.tasks if share[t]]
        if not todo:
            return out
        lm = self._lm(model)
        # HFLM enters its own torch.autocast (disabled unless mixed_precision_dtype is set), which
        # would switch off the caller's precision context: hand it the caller's autocast dtype
        lm.mixed_precision_dtype = (torch.get_autocast_dtype(device.type)
                                    if torch.is_autocast_enabled(device.type) else None)
        for t in todo:
            self._task_dict["tasks"][t].set_fewshot_seed(seed=self.fewshot_seed)
        res = lm_eval.evaluator.evaluate(
            lm, {"tasks": {t: self._task_dict["tasks"][t] for t in todo}, "groups": {}},
            samples={t: share[t] for t in todo}, log_samples=True, bootstrap_iters=0)
        for i, t in enumerate(self.tasks):
            if t not in todo:
                continue
            rows = res["samples"][t]
            first_filter = rows[0]["filter"]
            values = [r[self.metrics[t]] for r in rows if r["filter"] == first_filter]
            if self._aggregations[t] in _WEIGHTED:
                total = sum(float(a) for a, _ in values)
                count = sum(float(b) for _, b in values)
            else:
                total, count = sum(float(v) for v in values), float(len(values))
            out[i, 0], out[i, 1] = total, count
        return out

    def value_from_totals(self, totals: Tensor) -> tuple[float, dict[str, float]]:
        """The weighted mean over tasks and each task's value from ``[tasks, 2]`` totals.

        Raises:
            ValueError: a task counted no example.
        """
        per_task = {}
        for i, t in enumerate(self.tasks):
            total, count = (float(x) for x in totals[i].tolist())
            if count <= 0:
                raise ValueError(f"lm-eval task {t!r} scored no example (limit={self.limit}, "
                                 f"{self._docs[t]} examples in its evaluation split)")
            per_task[t] = float(_FINALIZE[self._aggregations[t]](total / count))
        value = sum(self.weights[t] * per_task[t] for t in self.tasks)
        return float(value), per_task

    def score_module(self, module: nn.Module, *, rank: int = 0, world_size: int = 1,
                     balanced: bool = False,
                     reduce_sum: Callable[[Tensor], Tensor] | None = None
                     ) -> tuple[float, dict[str, float]]:
        """Score ``module``: ``(value, {"<task>/<metric>": task value})``, the same on every rank.

        With ``world_size > 1`` each rank scores its share and the totals are summed with
        ``reduce_sum``; with ``balanced`` (sharded weights: every rank must run the same forward
        passes) every rank scores every example and nothing is summed.
        """
        if balanced or world_size <= 1 or reduce_sum is None:
            totals = self.task_totals(module)
        else:
            totals = reduce_sum(self.task_totals(module, rank, world_size))
        value, per_task = self.value_from_totals(totals)
        return value, {f"{t}/{self.metrics[t]}": v for t, v in per_task.items()}

    # a per-batch function for code that expects Metric.fn; the evaluator never calls it
    def fn(self, module: nn.Module, batch: Any):
        raise TypeError(f"{self.name} scores a whole module (LmEvalMetric.score_module), not "
                        "batches; use it through HeldoutEvaluator or the callbacks")

    def __repr__(self) -> str:
        return (f"LmEvalMetric(tasks={self.tasks}, metrics={self.metrics}, limit={self.limit}, "
                f"weights={self.weights})")


def _is_builtin(tm, name: str) -> bool:
    entry = tm._index.get(name) if hasattr(tm, "_index") else None
    path = str(getattr(entry, "yaml_path", "") or "")
    return "lm_eval" in path and str(TASKS_DIR) not in path


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _normalise_weights(tasks: list[str], weights) -> dict[str, float]:
    if weights is None:
        return {t: 1.0 / len(tasks) for t in tasks}
    if isinstance(weights, Mapping):
        missing, extra = set(tasks) - set(weights), set(weights) - set(tasks)
        if missing or extra:
            raise ValueError(f"weights must have one entry per task {tasks}; missing "
                             f"{sorted(missing)}, unknown {sorted(extra)}")
        values = [weights[t] for t in tasks]
    else:
        values = list(weights)
        if len(values) != len(tasks):
            raise ValueError(f"weights must have one entry per task ({len(tasks)}), "
                             f"got {len(values)}")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
           for w in values) or sum(values) <= 0:
        raise ValueError(f"weights must be finite non-negative numbers with a positive sum, "
                         f"got {values}")
    s = float(sum(values))
    return {t: float(w) / s for t, w in zip(tasks, values)}


def run_lm_eval(model: nn.Module, tasks: Sequence[str], tokenizer: Any, *,
                limit: int | None = None, include_path: Sequence[str | os.PathLike] = (),
                batch_size: int = 8, num_fewshot: int | None = None,
                **hflm_kwargs: Any) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on ``model`` (a loaded model), as a user would directly.

    ``hflm_kwargs`` go to ``HFLM`` (e.g. ``mixed_precision_dtype="bfloat16"``). Returns lm-eval's
    results dict (``["results"][task]["acc,none"]`` etc.).
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(TASKS_DIR), *map(str, include_path)],
                     include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **hflm_kwargs)
    with torch.inference_mode():
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=tm,
                                       bootstrap_iters=0, log_samples=False,
                                       num_fewshot=num_fewshot)


# ------------------------------------------------------------------ building a local task
def _blocks(text: str) -> list[list[str]]:
    """Blocks of stripped lines split at blank lines; a leading speaker's name is dropped."""
    blocks = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [ln.strip() for ln in block.split("\n") if ln.strip()]
        if lines and lines[0].isupper() and lines[0].endswith("."):
            lines = lines[1:]
        if lines:
            blocks.append(lines)
    return blocks


def speech_examples(text: str, n: int, *, min_lines: int = 3, max_chars: int = 400,
                    seed: int = 0) -> list[dict[str, str]]:
    """Perplexity documents ``{"text": ...}``: ``n`` blocks of ``min_lines`` or more lines.

    Blocks are split at blank lines, a leading speaker's name is dropped, blocks longer than
    ``max_chars`` are cut after the last whole line that fits and blocks holding a word of three
    or more capitals (a list of characters, a stage direction) are skipped. Chosen at random
    (``seed``), in text order.

    Raises:
        ValueError: ``n`` is not a positive integer or the text has fewer usable blocks.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    docs = []
    for lines in _blocks(text):
        kept: list[str] = []
        for line in lines:
            if len("\n".join(kept + [line])) > max_chars:
                break
            kept.append(line)
        if len(kept) >= min_lines and not any(w.isupper() and len(w) > 2 for ln in kept
                                              for w in ln.replace(",", " ").split()):
            docs.append("\n".join(kept))  # (a block with a capitalised name: not a speech)
    if len(docs) < n:
        raise ValueError(f"the text gives {len(docs)} blocks of {min_lines}+ lines, {n} needed")
    chosen = sorted(random.Random(seed).sample(range(len(docs)), n))
    return [{"text": docs[i]} for i in chosen]


def next_line_examples(text: str, n: int, *, choices: int = 4, seed: int = 0,
                       min_chars: int = 20) -> list[dict[str, Any]]:
    """Multiple-choice examples "which line comes next?" from verse or prose split into blocks.

    Blocks are separated by blank lines (a play's speeches); a first line in capitals ending with
    a full stop (a speaker's name) is dropped, and lines shorter than ``min_chars`` or starting
    with ``[`` (stage directions) are not used. Each example gives two consecutive lines of a block
    as ``context``; ``choices`` holds the true next line and ``choices - 1`` lines drawn from other
    blocks; ``label`` is the index of the true line.

    Raises:
        ValueError: ``n`` or ``choices`` out of range, or the text has too few usable lines.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(choices, bool) or not isinstance(choices, int) or choices < 2:
        raise ValueError(f"choices must be an integer >= 2, got {choices!r}")
    blocks = _blocks(text)
    rng = random.Random(seed)
    def usable(line: str) -> bool:  # long enough, not a stage direction
        return len(line) >= min_chars and not line.startswith("[")

    triples = [(b, i) for b, lines in enumerate(blocks) for i in range(len(lines) - 2)
               if all(usable(x) for x in lines[i:i + 3])]
    pool = [(b, ln) for b, lines in enumerate(blocks) for ln in lines if usable(ln)]
    if len(triples) < n:
        raise ValueError(f"the text gives {len(triples)} usable line triples, {n} needed")
    out = []
    for b, i in rng.sample(triples, n):
        lines = blocks[b]
        answer = lines[i + 2]
        others = sorted({line for ob, line in pool if ob != b and line != answer})
        if len(others) < choices - 1:
            raise ValueError(f"the text has {len(others)} distinct usable lines outside block "
                             f"{b}, {choices - 1} wrong choices needed (separate blocks by a "
                             "blank line)")
        wrong = rng.sample(others, choices - 1)
        label = rng.randrange(choices)
        opts = wrong[:label] + [answer] + wrong[label:]
        out.append({"context": lines[i] + "\n" + lines[i + 1], "choices": opts, "label": label})
    return out


_TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}\\n"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_next_line_task(folder: str | os.PathLike, task: str, examples: Sequence[Mapping]) -> Path:
    """Write ``examples`` (see :func:`next_line_examples`) as an lm-eval task in ``folder``.

    The folder gets ``<task>.yaml`` (``dataset_path: json`` with the absolute path of the data) and
    ``<task>.jsonl``; pass the folder as ``include_path``. Returns the YAML path.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(dict(e)) + "\n" for e in examples), encoding="utf-8")
    yaml = folder / f"{task}.yaml"
    yaml.write_text(_TASK_YAML.format(task=task, data=json.dumps(str(data))), encoding="utf-8")
    return yaml
