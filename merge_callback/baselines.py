"""Baseline merging methods: uniform soup, greedy soup, Fisher-weighted averaging and RegMean.

All four take a list of compatible state dicts (oldest first) and return a new state dict; the
inputs are never modified. Non-floating tensors (step counters, masks) come from the last state
dict, as in :func:`merge_callback.merge.weighted_average`.

* :func:`uniform_soup` — ``θ = (1/n) Σ_i θ_i``.
* :func:`greedy_soup` — Wortsman et al. (2022), Recipe 1: rank the checkpoints by their held-out
  score, best first; add each to the soup (a uniform average of its members) if the soup's score
  does not get worse.
* :func:`fisher_weighted_average` — Matena & Raffel (2022): per parameter entry
  ``θ = Σ_i (F_i + ε) θ_i / Σ_i (F_i + ε)`` with ``F_i`` the diagonal empirical Fisher of checkpoint
  ``i`` (see :func:`diagonal_fisher`).
* :func:`regmean` — Jin et al. (2022): for every ``nn.Linear`` with weight ``W_i`` (out × in) and
  input Gram matrix ``G_i = X_iᵀX_i / n`` collected on held-out inputs under checkpoint ``i``,
  ``W* = ((Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ)ᵀ`` where ``G̃`` multiplies the off-diagonal entries of ``G`` by
  ``alpha``; biases and all other parameters are averaged uniformly.

Fisher and RegMean need the network (an ``nn.Module`` whose ``state_dict()`` keys match the state
dicts) and held-out batches (Hugging Face style dicts with ``input_ids`` and optional
``attention_mask``/``labels``, or bare token-id tensors). The module's weights, gradients,
``requires_grad`` flags and train/eval modes are restored afterwards.

Command line (Hugging Face model folders or state-dict files; see ``--help``)::

    python -m merge_callback.baselines regmean ckpt-a ckpt-b --heldout macbeth.txt --out soup
"""

from __future__ import annotations

import argparse
import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merge_callback.evaluate import forward_logits, move_to_device, next_token_targets
from merge_callback.merge import check_compatible, is_mergeable, weighted_average

__all__ = [
    "METHODS",
    "GreedySoupResult",
    "uniform_soup",
    "greedy_selection",
    "greedy_soup",
    "diagonal_fisher",
    "fisher_merge",
    "fisher_weighted_average",
    "gram_matrices",
    "regmean_merge",
    "regmean",
    "loaded_state_dict",
    "state_dict_scorer",
    "main",
]

METHODS = ("uniform", "greedy", "fisher", "regmean")

StateDict = Mapping[str, Tensor]


# --------------------------------------------------------------------------- checks and helpers


def _check_state_dicts(state_dicts: Sequence[StateDict]) -> list[StateDict]:
    if isinstance(state_dicts, Mapping) or not isinstance(state_dicts, Sequence):
        raise ValueError("state_dicts must be a list of state dicts (oldest first), got "
                         f"{type(state_dicts).__name__}")
    sds = list(state_dicts)
    if not sds:
        raise ValueError("state_dicts must hold at least one state dict, got an empty list")
    for i, sd in enumerate(sds):
        if not isinstance(sd, Mapping):
            raise ValueError(f"state_dicts[{i}] must be a mapping of tensors, got {type(sd).__name__}")
    latest = sds[-1]
    for i, sd in enumerate(sds[:-1]):
        check_compatible(sd, latest, (f"checkpoint {i}", f"checkpoint {len(sds) - 1}"))
    return sds


def _check_max_batches(max_batches: int | None) -> None:
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def _iter_batches(batches: Iterable, max_batches: int | None) -> Iterable:
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        yield batch


@contextlib.contextmanager
def loaded_state_dict(module: nn.Module, state_dict: StateDict):
    """Load ``state_dict`` into ``module`` (``strict=True``) for the block, then restore its weights.

    Args:
        module: the network; its ``state_dict()`` keys must equal the state dict's keys.
        state_dict: the weights to use inside the block.

    Raises:
        RuntimeError: from ``load_state_dict`` if keys or shapes disagree.
    """
    original = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        module.load_state_dict(state_dict, strict=True)
        yield module
    finally:
        module.load_state_dict(original, strict=True)


@contextlib.contextmanager
def _grad_context(module: nn.Module):
    """Enable gradients on every parameter and eval mode; restore flags, modes and ``.grad``."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            yield
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in modes:
            m.training = mode


# --------------------------------------------------------------------------- uniform and greedy


def uniform_soup(state_dicts: Sequence[StateDict]) -> dict[str, Tensor]:
    """Plain average ``(1/n) Σ_i θ_i`` (fp32 accumulation; integer tensors from the last).

    Raises:
        ValueError: on an empty list or incompatible state dicts.

    Example:
        >>> uniform_soup([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])["w"].tolist()
        [0.5, 0.5]
    """
    sds = _check_state_dicts(state_dicts)
    n = len(sds)
    return weighted_average(sds, [1.0 / n] * n)


@dataclass(frozen=True)
class GreedySoupResult:
    """Outcome of :func:`greedy_soup`.

    Attributes:
        state_dict: the soup (uniform average of the members).
        members: indices into the input list, in the order they joined the soup.
        scores: each checkpoint's own held-out score, in input order.
        soup_score: the soup's held-out score.
        tried: ``((index, score of the soup with it), ...)`` for every candidate tried after the first.
    """

    state_dict: dict[str, Tensor]
    members: tuple[int, ...]
    scores: tuple[float, ...]
    soup_score: float
    tried: tuple[tuple[int, float], ...]


def greedy_selection(n: int, score: Callable[[tuple[int, ...]], float], *,
                     higher_is_better: bool = False
                     ) -> tuple[list[int], list[float], float, list[tuple[int, float]]]:
    """The greedy-soup rule (Wortsman et al. 2022, Recipe 1) over ``n`` candidates, on any score.

    Every candidate is scored alone (``score((i,))``) and ranked best first; **ties rank the later
    candidate first**. The soup starts as the best one; every other candidate, in rank order,
    joins when the soup with it (``score(members + (i,))``, members in joining order) scores **at
    least as well** as the current soup (a tie joins: more members average out more noise).

    Returns:
        ``(members, single scores in input order, soup score, ((i, score with i), ...))``.
    """
    sign = -1.0 if higher_is_better else 1.0
    scores = [score((i,)) for i in range(n)]
    order = sorted(range(n), key=lambda i: (sign * scores[i], -i))
    members = [order[0]]
    soup_score = scores[order[0]]
    tried = []
    for i in order[1:]:
        value = score((*members, i))
        tried.append((i, value))
        if sign * value <= sign * soup_score:
            members.append(i)
            soup_score = value
    return members, scores, soup_score, tried


def greedy_soup(state_dicts: Sequence[StateDict], score: Callable[[StateDict], float], *,
                higher_is_better: bool = False) -> GreedySoupResult:
    """Greedy soup (Wortsman et al. 2022, Recipe 1).

    The rule of :func:`greedy_selection` (ties rank the later checkpoint first; a candidate joins
    when the uniform average with it scores at least as well as the current soup).

    Args:
        state_dicts: compatible state dicts (oldest first).
        score: held-out score of a state dict (e.g. :func:`state_dict_scorer`).
        higher_is_better: whether a higher score is better (accuracy) or lower (loss).

    Returns:
        GreedySoupResult.

    Raises:
        ValueError: on an empty list, incompatible state dicts or a non-callable ``score``.
        FloatingPointError: if a score is NaN.
    """
    sds = _check_state_dicts(state_dicts)
    if not callable(score):
        raise ValueError(f"score must be a callable(state_dict) -> float, got {type(score).__name__}")

    def _score(sd: StateDict) -> float:
        value = float(score(sd))
        if math.isnan(value):
            raise FloatingPointError("greedy_soup: the score function returned NaN")
        return value

    def score_members(members: tuple[int, ...]) -> float:
        if len(members) == 1:
            return _score(sds[members[0]])
        return _score(uniform_soup([sds[j] for j in sorted(members)]))

    members, scores, soup_score, tried = greedy_selection(len(sds), score_members,
                                                          higher_is_better=higher_is_better)
    soup = (uniform_soup([sds[j] for j in sorted(members)]) if len(members) > 1
            else {k: v.clone() for k, v in sds[members[0]].items()})
    return GreedySoupResult(soup, tuple(members), tuple(scores), soup_score, tuple(tried))


def state_dict_scorer(module: nn.Module, evaluate: Callable[[nn.Module], float]
                      ) -> Callable[[StateDict], float]:
    """Turn ``evaluate(module) -> float`` into ``score(state_dict) -> float`` for :func:`greedy_soup`.

    Each call loads the state dict into ``module`` (``strict=True``), evaluates and restores the
    module's weights.

    Args:
        module: the network the state dicts belong to.
        evaluate: e.g. a :class:`merge_callback.evaluate.HeldoutEvaluator`.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not callable(evaluate):
        raise ValueError(f"evaluate must be a callable(module) -> float, got {type(evaluate).__name__}")

    def score(sd: StateDict) -> float:
        with loaded_state_dict(module, sd):
            return float(evaluate(module))

    return score


# --------------------------------------------------------------------------- Fisher


def diagonal_fisher(module: nn.Module, state_dict: StateDict, batches: Iterable, *,
                    max_batches: int | None = None) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of ``state_dict`` on held-out batches.

    For every batch ``b`` the gradient ``g_b = ∇_θ Σ_{targets t in b} log p_θ(y_t | y_<t)`` of the
    batch's *summed* next-token log-likelihood of the observed tokens is computed (eval mode, fp32
    loss); the Fisher is ``F = (1/B) Σ_b g_b²``. With batches of one sequence this is the
    per-sequence empirical Fisher of Matena & Raffel; larger batches give a cheaper estimate whose
    scale grows with the batch (the merge only uses ratios between checkpoints' Fishers computed on
    the same batches). Positions with label -100 or ``attention_mask == 0`` are ignored.

    Args:
        module: the network; its ``state_dict()`` keys must match ``state_dict``.
        state_dict: the checkpoint's weights (loaded into ``module`` for the computation; the
            module's own weights and gradients are restored afterwards).
        batches: an iterable of held-out batches.
        max_batches: use at most this many batches.

    Returns:
        ``{key: F}`` (fp32, on the module's device) for every parameter key of the state dict,
        including tied aliases.

    Raises:
        ValueError: on bad ``max_batches``, or when ``batches`` yields nothing.
    """
    _check_max_batches(max_batches)
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    device = _module_device(module)
    with loaded_state_dict(module, state_dict), _grad_context(module):
        named = list(module.named_parameters(remove_duplicate=False))
        fisher = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in named}
        n = 0
        for batch in _iter_batches(batches, max_batches):
            batch = move_to_device(batch, device)
            for _, p in named:
                p.grad = None
            logits = forward_logits(module, batch)[:, :-1]
            targets = next_token_targets(batch)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum")
            loss.backward()
            for name, p in named:
                if p.grad is not None:
                    fisher[name].add_(p.grad.detach().float().square())
            n += 1
        if n == 0:
            raise ValueError("diagonal_fisher: batches yielded no batch; pass a non-empty held-out "
                             "iterable")
        for t in fisher.values():
            t.div_(n)
    return fisher


def fisher_merge(state_dicts: Sequence[StateDict], fishers: Sequence[Mapping[str, Tensor]], *,
                 eps: float = 1e-8) -> dict[str, Tensor]:
    """Per entry ``θ = Σ_i w_i θ_i`` with ``w_i = (F_i + eps) / Σ_j (F_j + eps)`` (fp32 accumulation).

    Floating tensors without a Fisher in every checkpoint (buffers) are averaged uniformly; other
    tensors come from the last state dict. With equal Fishers the result equals
    :func:`uniform_soup` (bitwise when ``n`` is a power of two).

    Args:
        state_dicts: compatible state dicts (oldest first).
        fishers: one ``{key: F}`` per state dict (see :func:`diagonal_fisher`), non-negative.
        eps: floor added to every Fisher entry (> 0), so entries with zero Fisher are averaged
            uniformly.

    Raises:
        ValueError: on mismatched lengths, a Fisher whose shape disagrees with its tensor, a
            negative Fisher entry or ``eps <= 0``.
    """
    sds = _check_state_dicts(state_dicts)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if len(fishers) != len(sds):
        raise ValueError(f"got {len(fishers)} Fishers for {len(sds)} state dicts")
    n = len(sds)
    out: dict[str, Tensor] = {}
    for key, t in sds[-1].items():
        if not is_mergeable(t):
            out[key] = t.clone()
            continue
        if not all(key in f for f in fishers):
            out[key] = weighted_average([{key: sd[key]} for sd in sds], [1.0 / n] * n)[key]
            continue
        fs = []
        for i, f in enumerate(fishers):
            fi = f[key]
            if fi.shape != t.shape:
                raise ValueError(f"Fisher of checkpoint {i} for {key!r} has shape {tuple(fi.shape)}, "
                                 f"the tensor has {tuple(t.shape)}")
            fi = fi.to(device=t.device, dtype=torch.float32)
            if bool((fi < 0).any()):
                raise ValueError(f"Fisher of checkpoint {i} for {key!r} has negative entries")
            fs.append(fi + eps)
        total = fs[0].clone()
        for fi in fs[1:]:
            total.add_(fi)
        acc = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        for sd, fi in zip(sds, fs):
            acc.add_((fi / total) * sd[key].to(torch.float32))
        out[key] = acc.to(t.dtype)
    return out


def fisher_weighted_average(state_dicts: Sequence[StateDict], module: nn.Module, batches: Iterable, *,
                            eps: float = 1e-8, max_batches: int | None = None) -> dict[str, Tensor]:
    """Fisher-weighted averaging: :func:`diagonal_fisher` of every checkpoint, then :func:`fisher_merge`.

    Args:
        state_dicts: compatible state dicts (oldest first) matching ``module.state_dict()``.
        module: the network (weights restored afterwards).
        batches: held-out batches (re-iterated once per checkpoint; pass a list or a DataLoader).
        eps: Fisher floor (> 0).
        max_batches: use at most this many batches per checkpoint.

    Raises:
        ValueError: see :func:`diagonal_fisher` and :func:`fisher_merge`.
    """
    sds = _check_state_dicts(state_dicts)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    _check_max_batches(max_batches)
    fishers = [diagonal_fisher(module, sd, batches, max_batches=max_batches) for sd in sds]
    return fisher_merge(sds, fishers, eps=eps)


# --------------------------------------------------------------------------- RegMean


def _linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def gram_matrices(module: nn.Module, state_dict: StateDict, batches: Iterable, *,
                  max_batches: int | None = None) -> dict[str, Tensor]:
    """Input Gram matrices ``G = XᵀX / n`` (float64) of every ``nn.Linear`` under ``state_dict``.

    ``X`` stacks the layer's input vectors over all held-out tokens (positions where the batch's
    ``attention_mask`` is 0 are left out when the layer input has the batch's ``[B, T]`` shape);
    ``n`` is the number of rows.

    Args:
        module: the network; its ``state_dict()`` keys must match ``state_dict``.
        state_dict: the checkpoint's weights (the module's own weights are restored afterwards).
        batches: held-out batches.
        max_batches: use at most this many batches.

    Returns:
        ``{linear module name: G [in, in]}`` on the module's device.

    Raises:
        ValueError: on bad ``max_batches``, a module without ``nn.Linear`` layers, or no batches.
    """
    _check_max_batches(max_batches)
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    layers = _linear_layers(module)
    if not layers:
        raise ValueError("gram_matrices: the module has no nn.Linear layer (RegMean merges "
                         "linear layers)")
    device = _module_device(module)
    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
             for name, m in layers.items()}
    rows = {name: 0 for name in layers}
    current_mask: list[Tensor | None] = [None]

    def make_hook(name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = current_mask[0]
            if mask is not None and x.dim() == mask.dim() + 1 and x.shape[:-1] == mask.shape:
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            grams[name].addmm_(x.T, x)
            rows[name] += x.shape[0]
        return hook

    handles = []
    modes = [(m, m.training) for m in module.modules()]
    try:
        with loaded_state_dict(module, state_dict):
            for name, m in layers.items():
                handles.append(m.register_forward_pre_hook(make_hook(name)))
            module.eval()
            n = 0
            with torch.inference_mode():
                for batch in _iter_batches(batches, max_batches):
                    batch = move_to_device(batch, device)
                    current_mask[0] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                    forward_logits(module, batch)
                    n += 1
            if n == 0:
                raise ValueError("gram_matrices: batches yielded no batch; pass a non-empty held-out "
                                 "iterable")
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return {name: (g / rows[name] if rows[name] else g) for name, g in grams.items()}


def regmean_merge(state_dicts: Sequence[StateDict], grams: Sequence[Mapping[str, Tensor]], *,
                  alpha: float = 0.9) -> dict[str, Tensor]:
    """RegMean from precomputed Gram matrices (pure math).

    For every layer name ``L`` in the Gram dicts, ``L.weight`` (out × in) becomes
    ``((Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ)ᵀ`` computed in float64, with ``G̃ = alpha·G + (1 − alpha)·diag(G)``;
    every other floating tensor (biases included) is averaged uniformly; other tensors come from
    the last state dict. A singular ``Σ G̃`` falls back to the pseudo-inverse with a warning.

    Args:
        state_dicts: compatible state dicts (oldest first).
        grams: one ``{layer name: G}`` per state dict (see :func:`gram_matrices`), same layer names.
        alpha: off-diagonal scale in [0, 1] (1: plain RegMean, 0: per-input-feature weighting).

    Raises:
        ValueError: on bad ``alpha``, mismatched lengths or layer names, a missing ``L.weight`` key
            or a Gram matrix whose size is not the weight's input size.
    """
    sds = _check_state_dicts(state_dicts)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if len(grams) != len(sds):
        raise ValueError(f"got {len(grams)} Gram dicts for {len(sds)} state dicts")
    names = list(grams[0].keys())
    for i, g in enumerate(grams[1:], start=1):
        if set(g.keys()) != set(names):
            raise ValueError(f"Gram dict {i} has layers {sorted(g)} but Gram dict 0 has {sorted(names)}")
    n = len(sds)
    out = uniform_soup(sds)
    for name in names:
        key = f"{name}.weight" if name else "weight"
        if key not in sds[-1]:
            raise ValueError(f"RegMean layer {name!r} has no {key!r} in the state dicts; the module "
                             "and the state dicts must use the same key names")
        w_last = sds[-1][key]
        if w_last.dim() != 2:
            raise ValueError(f"{key!r} must be 2-D (out x in), got shape {tuple(w_last.shape)}")
        in_features = w_last.shape[1]
        total_g = torch.zeros(in_features, in_features, dtype=torch.float64, device=w_last.device)
        total_gw = torch.zeros(in_features, w_last.shape[0], dtype=torch.float64, device=w_last.device)
        for i in range(n):
            g = grams[i][name].to(device=w_last.device, dtype=torch.float64)
            if g.shape != (in_features, in_features):
                raise ValueError(f"Gram matrix of {name!r} in checkpoint {i} has shape "
                                 f"{tuple(g.shape)}, expected ({in_features}, {in_features})")
            diag = torch.diag(torch.diagonal(g))
            g_tilde = alpha * g + (1.0 - alpha) * diag
            total_g += g_tilde
            total_gw += g_tilde @ sds[i][key].to(torch.float64).T
        try:
            merged = torch.linalg.solve(total_g, total_gw)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            warnings.warn(f"RegMean: the summed Gram matrix of {name!r} is singular; using its "
                          "pseudo-inverse", RuntimeWarning, stacklevel=2)
            merged = torch.linalg.pinv(total_g) @ total_gw
        out[key] = merged.T.to(w_last.dtype).contiguous()
    return out


def regmean(state_dicts: Sequence[StateDict], module: nn.Module, batches: Iterable, *,
            alpha: float = 0.9, max_batches: int | None = None) -> dict[str, Tensor]:
    """RegMean: :func:`gram_matrices` of every checkpoint, then :func:`regmean_merge`.

    Args:
        state_dicts: compatible state dicts (oldest first) matching ``module.state_dict()``.
        module: the network (weights restored afterwards).
        batches: held-out batches (re-iterated once per checkpoint).
        alpha: off-diagonal scale in [0, 1].
        max_batches: use at most this many batches per checkpoint.

    Raises:
        ValueError: see :func:`gram_matrices` and :func:`regmean_merge`.
    """
    sds = _check_state_dicts(state_dicts)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    _check_max_batches(max_batches)
    grams = [gram_matrices(module, sd, batches, max_batches=max_batches) for sd in sds]
    return regmean_merge(sds, grams, alpha=alpha)


# --------------------------------------------------------------------------- command line


def _load_hf_state_dict(path: str, device: str) -> tuple[nn.Module, dict[str, Tensor]]:
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{path} must be a Hugging Face model folder (config.json + weights)")
    model = AutoModelForCausalLM.from_pretrained(str(p)).to(device)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _heldout_batches(path: str, tokenizer_dir: str, block_size: int, batch_size: int,
                     max_blocks: int) -> list[dict[str, Tensor]]:
    from transformers import AutoTokenizer

    from merge_callback.data import read_texts, tokenize_and_pack

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocks = tokenize_and_pack(read_texts(path), tok, block_size)[:max_blocks]
    if blocks.shape[0] == 0:
        raise ValueError(f"--heldout {path} is shorter than one block of {block_size} tokens")
    return [{"input_ids": blocks[i:i + batch_size]} for i in range(0, blocks.shape[0], batch_size)]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m merge_callback.baselines METHOD CKPT [CKPT ...] --out DIR [...]``.

    Checkpoints are Hugging Face causal-LM folders (oldest first). ``uniform`` needs nothing else;
    ``greedy`` (by held-out loss), ``fisher`` and ``regmean`` need ``--heldout`` text (a .txt,
    .jsonl or folder, read with :func:`merge_callback.data.read_texts`) and a tokenizer (the first
    checkpoint's folder unless ``--tokenizer`` is given). The soup is written with
    ``save_pretrained`` into ``--out`` atomically.
    """
    parser = argparse.ArgumentParser(prog="python -m merge_callback.baselines",
                                     description="Merge checkpoints with a baseline method.")
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("checkpoints", nargs="+", help="Hugging Face model folders, oldest first")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--heldout", help="held-out text (.txt, .jsonl or folder)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the first checkpoint)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-blocks", type=int, default=256, help="held-out blocks to use")
    parser.add_argument("--alpha", type=float, default=0.9, help="RegMean off-diagonal scale")
    parser.add_argument("--eps", type=float, default=1e-8, help="Fisher floor")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from merge_callback.io import atomic_directory

    if args.method != "uniform" and not args.heldout:
        parser.error(f"method {args.method!r} needs --heldout")
    model, first = _load_hf_state_dict(args.checkpoints[0], args.device)
    sds = [first] + [_load_hf_state_dict(p, args.device)[1] for p in args.checkpoints[1:]]
    info: dict[str, Any] = {"method": args.method, "checkpoints": list(args.checkpoints)}
    if args.method == "uniform":
        soup = uniform_soup(sds)
    else:
        batches = _heldout_batches(args.heldout, args.tokenizer or args.checkpoints[0],
                                   args.block_size, args.batch_size, args.max_blocks)
        if args.method == "greedy":
            from merge_callback.evaluate import HeldoutEvaluator, resolve_metric

            scorer = state_dict_scorer(model, HeldoutEvaluator(batches, resolve_metric("loss")))
            res = greedy_soup(sds, scorer)
            soup = res.state_dict
            info.update(members=[args.checkpoints[i] for i in res.members], loss=res.soup_score)
        elif args.method == "fisher":
            soup = fisher_weighted_average(sds, model, batches, eps=args.eps)
        else:
            soup = regmean(sds, model, batches, alpha=args.alpha)
    model.load_state_dict(soup, strict=True)
    with atomic_directory(args.out) as tmp:
        model.save_pretrained(str(tmp))
    print(info)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
