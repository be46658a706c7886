"""One merge round, independent of the training framework: ``run_round`` and the soup it chose.

A round takes host snapshots (*sources*: the latest weights, the previous checkpoint, recent
snapshots, EMA tracks) and averaging *families* over them, searches on a held-out evaluator by
writing each candidate *into the live module in place*, and always restores the live weights
bitwise from the latest snapshot before returning, also when the search raises. The paper's
pairwise soup is the one-family case. :func:`build_soup` then computes the chosen soup's tensors
(where it was scored, with the same kernel); writing and logging happen elsewhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor, nn

from merge_callback.engine.families import (AutoPlan, Family, Mix, combine_into_, live_targets,
                                            mix_into_, mix_scratch, pairwise_family,
                                            stage_on_devices)
from merge_callback.engine.snapshot import Snapshot
from merge_callback.merge import check_compatible, is_mergeable
from merge_callback.search import search_interval, validate_search_args

__all__ = ["MergeRoundError", "RoundConfig", "RoundResult", "run_round", "build_soup",
           "build_mix_soup", "load_mix", "soup_state_dict", "soup_from_live"]


class MergeRoundError(RuntimeError):
    """A merge round failed; the live weights were restored and no soup was written."""


@dataclass(frozen=True)
class RoundConfig:
    """Search settings for a round (validated on construction)."""

    alpha: float = 0.5
    budget: int = 10
    strategy: str = "bayes"
    acq_func: str = "gp_hedge"
    seed: int = 0
    warm_start: bool = False
    stop_tol: float | None = None

    def __post_init__(self) -> None:
        validate_search_args(self.alpha, self.budget, self.strategy, self.acq_func)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"warm_start must be True or False, got {self.warm_start!r}")
        if self.stop_tol is not None:
            if isinstance(self.stop_tol, bool) or not isinstance(self.stop_tol, (int, float)) \
                    or not self.stop_tol > 0:
                raise ValueError(f"stop_tol must be a positive number or None, got "
                                 f"{self.stop_tol!r}")
            if self.strategy != "bayes":
                raise ValueError(f"stop_tol needs strategy='bayes', got strategy="
                                 f"{self.strategy!r}")


@dataclass(frozen=True)
class RoundResult:
    """What a round decided (plain Python values, JSON-ready via :meth:`to_json`).

    ``lam`` is the weight of the latest weights in the chosen soup. Rounds over several families
    add ``extras``: ``family``, ``param``, ``inputs`` (source names and steps), ``weights`` and
    ``candidates`` (every evaluation as ``{"family", "param", "value"}`` in order). When the
    evaluator reports side values of its forward passes (``last_extras``: loss, perplexity,
    accuracy), ``extras["side_values"]`` lists them per evaluated candidate, and the schedule adds
    ``extras["side"]``: those of the soup, the latest and the previous weights.
    ``averaging="auto"`` rounds also record ``averaging``, ``searched`` (each family's optimum:
    ``phema`` σ_rel, ``window`` W, ``pairwise`` λ), ``blend_of`` (the blended candidate's family
    and param) and ``reconstruction`` (σ_rel, the track snapshots and their least-squares
    coefficients) when a post-hoc EMA is chosen or blended; their ``inputs`` name stored
    snapshots (``raw``, ``phema<σ>``) and ``weights`` are the ones applied.
    """

    step: int
    previous_step: int
    lam: float
    value_soup: float
    value_latest: float
    value_previous: float
    observations: tuple[tuple[float, float], ...]
    metric: str
    higher_is_better: bool
    alpha: float
    budget: int
    strategy: str
    acq_func: str | None
    seconds: float
    extra_evaluations: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def gain(self) -> float:
        """Improvement of the soup over the latest weights (positive = better)."""
        diff = self.value_soup - self.value_latest
        return diff if self.higher_is_better else -diff

    @property
    def family(self) -> str:
        """The family of the chosen soup (``"pairwise"`` for the paper's round)."""
        return self.extras.get("family", "pairwise")

    @property
    def param(self) -> float:
        """The chosen soup's parameter within its family (λ for the pairwise family)."""
        return self.extras.get("param", self.lam)

    def to_json(self) -> dict:
        d = asdict(self)
        d["lambda"] = d.pop("lam")
        d["observations"] = [list(o) for o in self.observations]
        extras = d.pop("extras")
        d.update(extras)
        return d


def _refresh(view: nn.Module) -> None:
    refresh = getattr(view, "refresh", None)
    if refresh is not None:
        refresh()


def run_round(module: nn.Module, sources: Mapping[str, Snapshot],
              families: Sequence[Family] | AutoPlan,
              evaluate: Callable[[nn.Module], float], config: RoundConfig, *,
              latest: str = "latest", previous: str | None = "previous", metric: str = "loss",
              higher_is_better: bool = False, value_previous: float | None = None,
              initial: Mapping[str, float] | None = None,
              on_evaluation: Callable[[float, float], None] | None = None,
              view: nn.Module | None = None) -> RoundResult:
    """Choose the best average among ``families`` with at most ``config.budget`` evaluations.

    With one family (the paper's pairwise soup) λ is searched on ``[family.lo, family.hi]``
    (α and 1 first). With several, the budget is shared: the latest weights, then one far-end
    point ("anchor") per family, then a 1-D search inside the family whose anchor did best.

    Args:
        module: the live module, called by ``evaluate``; it must hold ``sources[latest]`` on entry
            and holds it again, bitwise, on return (also when an exception propagates).
        sources: name -> host snapshot; ``families`` refer to these names.
        families: the candidates; the first must contain the latest weights (all do). An
            :class:`~merge_callback.engine.families.AutoPlan` runs the ``averaging="auto"``
            round instead (:func:`_auto_round`: its own per-family budgets; ``sources`` then
            needs only ``latest``, the exact restore's source).
        evaluate: ``module -> metric value`` on the held-out data.
        config: search settings; the round's seed is ``config.seed + step of the latest``.
        latest, previous: the names of the latest weights and of the previous checkpoint
            (``previous=None``: there is none to score).
        metric, higher_is_better: recorded in the result; ``higher_is_better`` steers the search.
        value_previous: the previous weights' metric if known (from the last round); otherwise
            the previous checkpoint is evaluated once, outside the budget.
        initial: ``{family name: parameter}`` evaluated early in that family's search (the last
            round's choice; used when ``config.warm_start``).
        on_evaluation: called with ``(parameter, value)`` after each evaluation (progress).
        view: the module whose ``state_dict()`` holds the tensors to write candidates into (a
            :class:`~merge_callback.engine.sharded.ShardLocalView` for sharded models; its
            ``refresh()`` runs before each evaluation and after the restore); default ``module``.

    Raises:
        MergeRoundError: incompatible sources, or a NaN/inf metric value; weights restored.
    """
    t0 = time.perf_counter()
    view = module if view is None else view
    latest_snap = sources[latest]
    step = latest_snap.step
    try:
        for name, snap in sources.items():
            if name != latest:
                check_compatible(snap.tensors, latest_snap.tensors, (name, latest))
        targets = live_targets(view, latest_snap.tensors)
    except ValueError as e:
        prev_step = sources[previous].step if previous in sources else step
        raise MergeRoundError(f"cannot merge step {prev_step} with step {step}: {e}") from e
    keys = [k for k, _ in targets]
    live = [t for _, t in targets]
    if isinstance(families, AutoPlan):
        return _auto_round(module, view, latest_snap, keys, live, families, evaluate, config,
                           t0=t0, metric=metric, higher_is_better=higher_is_better,
                           value_previous=value_previous,
                           initial=dict(initial or {}) if config.warm_start else {},
                           on_evaluation=on_evaluation)
    names = list(sources)
    staged = dict(zip(names, stage_on_devices(live, [[sources[n].tensors[k] for k in keys]
                                                     for n in names])))
    seed = (config.seed + step) % (2**31)
    initial = dict(initial or {}) if config.warm_start else {}

    side: list[dict] = []  # the evaluator's side values (loss, accuracy, ...) per candidate

    def load(family: Family, t: float) -> float:
        combine_into_(live, [staged[n] for n in family.sources], family.weights(t),
                      family.kind == "lerp")
        _refresh(view)
        value = float(evaluate(module))
        extras = getattr(evaluate, "last_extras", None)
        if extras:
            side.append({"family": family.name, "param": float(t), "value": value, **extras})
        if on_evaluation is not None:
            on_evaluation(t, value)
        return value

    try:
        if len(families) == 1:
            result = _one_family(families[0], load, config, seed, t0, step=step,
                                 previous_step=sources[previous].step if previous else step,
                                 metric=metric, higher_is_better=higher_is_better,
                                 value_previous=value_previous, initial=initial)
        else:
            result = _several_families(families, load, config, seed, t0, sources, latest,
                                       previous, metric=metric,
                                       higher_is_better=higher_is_better,
                                       value_previous=value_previous, initial=initial)
        if side:
            result = replace(result, extras={**result.extras, "side_values": side})
        return result
    except FloatingPointError as e:
        raise MergeRoundError(f"merge round at step {step}: {e}; no soup was written") from e
    finally:
        combine_into_(live, [staged[latest]], (1.0,), False)  # exact restore: copies the latest
        _refresh(view)


def _one_family(family: Family, load: Callable[[Family, float], float], config: RoundConfig,
                seed: int, t0: float, *, step: int, previous_step: int, metric: str,
                higher_is_better: bool, value_previous: float | None,
                initial: Mapping[str, float]) -> RoundResult:
    """The paper's round: λ on ``[lo, hi]`` of one family; the previous weights scored if
    unknown."""
    init = (initial[family.name],) if family.name in initial else ()
    result = search_interval(lambda t: load(family, t), family.lo, family.hi,
                             budget=config.budget, strategy=config.strategy,
                             acq_func=config.acq_func, seed=seed,
                             higher_is_better=higher_is_better, initial=init,
                             stop_tol=config.stop_tol)
    extra = 0
    if value_previous is None:
        value_previous = load(family, 0.0)
        extra = 1
        if not math.isfinite(value_previous):
            raise FloatingPointError(f"held-out metric is {value_previous} at lambda=0")
    return RoundResult(
        step=step, previous_step=previous_step, lam=result.lam, value_soup=result.value,
        value_latest=result.value_at(family.latest_at), value_previous=float(value_previous),
        observations=result.observations, metric=metric, higher_is_better=higher_is_better,
        alpha=config.alpha, budget=config.budget, strategy=config.strategy,
        acq_func=result.acq_func, seconds=time.perf_counter() - t0, extra_evaluations=extra)


def _several_families(families: Sequence[Family], load: Callable[[Family, float], float],
                      config: RoundConfig, seed: int, t0: float,
                      sources: Mapping[str, Snapshot], latest: str, previous: str | None, *,
                      metric: str, higher_is_better: bool, value_previous: float | None,
                      initial: Mapping[str, float]) -> RoundResult:
    budget = config.budget
    sign = -1.0 if higher_is_better else 1.0
    candidates: list[dict] = []
    cache: dict[tuple, float] = {}

    def evaluate_weights(family: Family, t: float) -> float:
        w = family.weights(t)
        active = tuple((n, round(x, 12)) for n, x in zip(family.sources, w) if x != 0.0)
        if active == ((latest, 1.0),):
            active = ("latest",)
        if active not in cache:
            value = load(family, t)
            if not math.isfinite(value):
                raise FloatingPointError(f"held-out metric is {value} for {family.name} at {t:.6g}")
            cache[active] = value
        candidates.append({"family": family.name, "param": float(t), "value": cache[active]})
        return cache[active]

    value_latest = evaluate_weights(families[0], families[0].latest_at)
    anchors: list[tuple[float, Family]] = []
    for fam in families:
        if len(cache) >= budget:
            break
        anchors.append((sign * evaluate_weights(fam, fam.anchor), fam))
    per_family: dict[str, dict[float, float]] = {f.name: {f.latest_at: value_latest}
                                                 for f in families}
    for score, fam in anchors:
        per_family[fam.name][fam.anchor] = sign * score
    if anchors and len(cache) < budget:
        best_fam = min(anchors, key=lambda a: a[0])[1]
        known = per_family[best_fam.name]
        init = (initial[best_fam.name],) if best_fam.name in initial else ()
        search_interval(lambda t: evaluate_weights(best_fam, t), best_fam.lo, best_fam.hi,
                        budget=len(known) + budget - len(cache), strategy=config.strategy,
                        acq_func=config.acq_func, seed=seed, higher_is_better=higher_is_better,
                        known=known, initial=init, stop_tol=config.stop_tol)
    if value_previous is None and previous is not None:
        fam = next(f for f in families if f.name == "pairwise")
        value_previous = evaluate_weights(fam, 0.0)
        candidates.pop()
    fam_by_name = {f.name: f for f in families}
    best = min(candidates, key=lambda c: (sign * c["value"],
                                          -fam_by_name[c["family"]].weights(c["param"])[-1]))
    fam = fam_by_name[best["family"]]
    weights = fam.weights(best["param"])
    return RoundResult(
        step=sources[latest].step,
        previous_step=sources[previous].step if previous else sources[latest].step,
        lam=float(weights[-1]), value_soup=best["value"], value_latest=value_latest,
        value_previous=float(value_previous) if value_previous is not None else math.nan,
        observations=tuple((c["param"], c["value"]) for c in candidates
                           if c["family"] == best["family"]),
        metric=metric, higher_is_better=higher_is_better, alpha=config.alpha, budget=budget,
        strategy=config.strategy, acq_func=config.acq_func if config.strategy == "bayes" else None,
        seconds=time.perf_counter() - t0, extra_evaluations=max(0, len(cache) - budget),
        extras={"family": fam.name, "param": best["param"],
                "inputs": [{"name": n, "step": sources[n].step} for n in fam.sources],
                "weights": list(weights), "candidates": candidates,
                "evaluations": len(cache)})


def _auto_round(module: nn.Module, view: nn.Module, latest_snap: Snapshot, keys: list[str],
                live: list[Tensor], plan: AutoPlan, evaluate: Callable[[nn.Module], float],
                config: RoundConfig, *, t0: float, metric: str, higher_is_better: bool,
                value_previous: float | None, initial: Mapping[str, float],
                on_evaluation: Callable[[float, float], None] | None) -> RoundResult:
    """The ``averaging="auto"`` round (``benchmarks/anytime.py``'s ``MODE``, searched the same
    way): the latest weights; post-hoc EMA with log σ_rel searched on ``mode.sigma_range``; a
    decay-shaped window over the last W saves, W searched on ``mode.window_range`` (rounded);
    the pairwise soup λ ∈ [α, 1] (λ = 1 is the latest); the best of these blended with the
    latest weights, μ ∈ [0, 1] (both ends known). Each family is one
    :func:`~merge_callback.search.search_interval` with its own budget; a candidate seen before
    is not evaluated again. The soup is the best observed candidate. Every candidate is written
    into the live tensors through an fp32 host scratch (:func:`load_mix`; fp32 host weights are
    their own scratch); the live weights are restored bitwise from ``latest_snap`` in
    ``finally``.
    """
    mode = plan.mode
    step = plan.step
    sign = -1.0 if higher_is_better else 1.0
    seed = (config.seed + step) % (2**31)
    scratch = mix_scratch(keys, live)
    cands: dict[tuple, dict] = {}  # key -> {"family", "param", "value", "base"}
    candidates: list[dict] = []
    search = dict(strategy=config.strategy, acq_func=config.acq_func, seed=seed,
                  higher_is_better=higher_is_better, stop_tol=config.stop_tol)

    def score(mix: Mix) -> float:
        load_mix(view, live, keys, mix, scratch)
        value = float(evaluate(module))
        if not math.isfinite(value):
            raise FloatingPointError(f"held-out metric is {value}")
        return value

    def cand(key: tuple, family: str, param: float, base: tuple | None = None) -> float:
        if key not in cands:
            value = score(plan.mix(family, param, base))
            if on_evaluation is not None:
                on_evaluation(param, value)
            cands[key] = {"family": family, "param": param, "value": value, "base": base}
        candidates.append({"family": family, "param": float(param),
                           "value": cands[key]["value"]})
        return cands[key]["value"]

    def init(name: str, to_x: Callable[[float], float] = float) -> tuple[float, ...]:
        return (to_x(initial[name]),) if name in initial else ()

    try:
        value_latest = cand(("latest",), "latest", 1.0)
        lo, hi = (math.log(x) for x in mode.sigma_range)

        def phema(x: float) -> float:
            sigma = round(math.exp(x), 5)
            return cand(("phema", sigma), "phema", sigma)

        r_ph = search_interval(phema, lo, hi, budget=mode.budget_phema,
                               initial=init("phema", math.log), **search)

        def window(x: float) -> float:
            W = plan.window_size(int(round(x)))
            if W == 1:
                return cand(("latest",), "latest", 1.0)
            return cand(("window", W), "window", W)

        wlo, whi = mode.window_range
        r_win = search_interval(window, wlo, whi, budget=mode.budget_window,
                                initial=init("window"), **search)

        def pair(lam: float) -> float:
            if round(lam, 12) == 1.0:
                return cand(("latest",), "latest", 1.0)
            lam = round(lam, 6)
            return cand(("pairwise", lam), "pairwise", lam)

        r_pair = search_interval(pair, plan.alpha, 1.0, budget=mode.budget_pairwise,
                                 initial=init("pairwise"), **search)
        best_key = min((k for k in cands if k[0] != "latest"),
                       key=lambda k: sign * cands[k]["value"])
        best = cands[best_key]
        base = (best["family"], best["param"])

        def blend(mu: float) -> float:
            mu = round(mu, 6)
            if mu == 0.0:
                return cand(("latest",), "latest", 1.0)
            if mu == 1.0:
                return cand(best_key, *base)
            return cand(("blend", best_key, mu), "blend", mu, base)

        search_interval(blend, 0.0, 1.0, budget=mode.budget_blend,
                        known={0.0: value_latest, 1.0: best["value"]},
                        **{**search, "stop_tol": None})
        evaluations = len(cands)
        extra = 0
        if value_previous is None and plan.previous is not None:
            value_previous = score(plan.mix("pairwise", 0.0))
            extra = 1
    except FloatingPointError as e:
        raise MergeRoundError(f"merge round at step {step}: {e}; no soup was written") from e
    finally:
        combine_into_(live, [[latest_snap.tensors[k] for k in keys]], (1.0,), False)  # exact
        _refresh(view)
    chosen = min(cands.values(), key=lambda c: sign * c["value"])
    mix = plan.mix(chosen["family"], chosen["param"], chosen["base"])
    lam = math.fsum(w for s, w in mix if s is plan.latest)
    extras = {"family": chosen["family"], "param": chosen["param"],
              "inputs": [s.label() for s, _ in mix], "weights": [w for _, w in mix],
              "candidates": candidates, "evaluations": evaluations + extra,
              "averaging": "auto",
              "searched": {"phema": math.exp(r_ph.lam), "window": plan.window_size(
                  int(round(r_win.lam))), "pairwise": r_pair.lam}}
    if chosen["base"] is not None:
        extras["blend_of"] = {"family": chosen["base"][0], "param": chosen["base"][1]}
    ph = chosen["base"] if chosen["family"] == "blend" else (chosen["family"], chosen["param"])
    if ph[0] == "phema":
        _, coef = plan.phema_mix(ph[1])
        extras["reconstruction"] = {"sigma_rel": ph[1], "inputs": [s.label() for s, _ in
                                                                   plan.tracks],
                                    "weights": coef}
    return RoundResult(
        step=step, previous_step=plan.previous.step if plan.previous is not None else step,
        lam=lam, value_soup=chosen["value"], value_latest=value_latest,
        value_previous=float(value_previous) if value_previous is not None else math.nan,
        observations=tuple((c["param"], c["value"]) for c in candidates
                           if c["family"] == chosen["family"]),
        metric=metric, higher_is_better=higher_is_better, alpha=config.alpha,
        budget=mode.budget, strategy=config.strategy,
        acq_func=config.acq_func if config.strategy == "bayes" else None,
        seconds=time.perf_counter() - t0, extra_evaluations=extra, extras=extras)


def load_mix(view: nn.Module, live: list[Tensor], keys: list[str], mix: Mix,
             scratch: Mapping[str, Tensor]) -> None:
    """Write ``mix`` into the ``live`` tensors through the fp32 host ``scratch`` (the one path
    for scoring and for the written soup), then ``refresh()`` a shard view."""
    mix_into_(live, keys, mix, scratch)
    _refresh(view)


def build_mix_soup(latest: Snapshot, mix: Mix, module: nn.Module | None = None
                   ) -> dict[str, Tensor]:
    """The full state dict of an ``averaging="auto"`` candidate, bitwise the one scored: the
    same fp32 host accumulation, converted to each tensor's dtype (on the live module's devices
    when they are not the CPU, then copied back; the live weights are restored bitwise).

    Args:
        latest: the latest weights (non-float tensors and the keys' layout come from it).
        mix: the candidate (:meth:`AutoPlan.mix`).
        module: the live module (or shard view) the round scored in; ``None`` builds on the host.
    """
    latest_sd = latest.tensors
    keys, live = _soup_targets(latest_sd, module)
    scratch = {k: torch.empty(latest_sd[k].shape, dtype=torch.float32) for k in keys}
    if live is not None and any(x.device.type != "cpu" for x in live):
        dests = [torch.empty_like(latest_sd[k]) for k in keys]
        return soup_from_live(latest_sd, keys, live, dests,
                              lambda: mix_into_(live, keys, mix, scratch),
                              refresh=lambda: _refresh(module))
    # on the host an fp32 tensor is its scratch itself (no second copy); others are converted
    dests = [scratch[k] if latest_sd[k].dtype == torch.float32 else torch.empty_like(latest_sd[k])
             for k in keys]
    mix_into_(dests, keys, mix, scratch)
    return _full_state_dict(latest_sd, keys, dests)


def _soup_targets(latest: Mapping[str, Tensor], module: nn.Module | None
                  ) -> tuple[list[str], list[Tensor] | None]:
    """The keys a soup is computed for and the live tensors that hold them: the live module's
    mergeable targets (each storage once), or without a module the mergeable keys of ``latest``
    (tied keys once) and ``None``."""
    if module is not None:
        targets = live_targets(module, latest)
        return [k for k, _ in targets], [t for _, t in targets]
    seen: set[int] = set()
    return [k for k, v in latest.items()
            if is_mergeable(v) and not (id(v) in seen or seen.add(id(v)))], None


def _full_state_dict(latest: Mapping[str, Tensor], keys: list[str],
                     dests: list[Tensor]) -> dict[str, Tensor]:
    """Every key of ``latest``: the soup tensors ``dests`` for ``keys`` (and the keys tied to
    them), the latest's own tensors for the rest (non-float ones)."""
    by_id = {id(latest[k]): d for k, d in zip(keys, dests)}
    return {k: by_id.get(id(v), v) if is_mergeable(v) else v for k, v in latest.items()}


def build_soup(sources: Mapping[str, Snapshot], family: Family, t: float, *,
               latest: str = "latest", module: nn.Module | None = None,
               into: str | None = None) -> dict[str, Tensor]:
    """The full state dict of ``family`` at ``t`` (all keys of the latest; non-float tensors and
    tied keys as there).

    Args:
        module: the live module (or shard view) the round scored in, holding the latest weights.
            When its weights are not on the CPU the soup is computed there by the same kernel as
            when it was scored, copied back, and the live weights restored — so the soup written
            is bitwise the soup scored (device and host kernels may round the last bit
            differently).
        into: build the soup inside this source's tensors (no further copy of the weights; that
            source must not be used afterwards). Only the family's first source of a ``lerp``
            family qualifies (it is read before it is overwritten).

    Raises:
        ValueError: ``into`` is not the first source of a ``lerp`` family.
    """
    if into is not None and (family.kind != "lerp" or family.sources[0] != into):
        raise ValueError(f"a soup can be built in place only inside the first source of a lerp "
                         f"family; {family.name} has sources {family.sources}, got into={into!r}")
    latest_sd = sources[latest].tensors
    keys, live = _soup_targets(latest_sd, module)
    srcs = [[sources[n].tensors[k] for k in keys] for n in family.sources]
    weights, lerp = family.weights(t), family.kind == "lerp"
    dests = ([sources[into].tensors[k] for k in keys] if into is not None
             else [torch.empty_like(latest_sd[k]) for k in keys])
    if live is not None and any(x.device.type != "cpu" for x in live):
        staged = stage_on_devices(live, srcs)  # operands where they were in the round
        return soup_from_live(latest_sd, keys, live, dests,
                              lambda: combine_into_(live, staged, weights, lerp),
                              refresh=lambda: _refresh(module))
    combine_into_(dests, srcs, weights, lerp)
    return _full_state_dict(latest_sd, keys, dests)


def soup_state_dict(previous: Snapshot, latest: Snapshot, lam: float, in_place: bool = False,
                    module: nn.Module | None = None) -> dict[str, Tensor]:
    """The pairwise soup ``lerp(previous, latest, lam)`` as a full state dict (see
    :func:`build_soup`; ``in_place=True`` builds it inside ``previous``, which must not be used
    afterwards). Bitwise ``torch.lerp``."""
    return build_soup({"previous": previous, "latest": latest},
                      pairwise_family("previous", "latest", 0.5), lam, module=module,
                      into="previous" if in_place else None)


def soup_from_live(latest: Mapping[str, Tensor], keys: list[str], live: list[Tensor],
                   dests: list[Tensor], apply: Callable[[], None],
                   refresh: Callable[[], None] | None = None) -> dict[str, Tensor]:
    """Run ``apply()`` (which writes the soup into the ``live`` tensors of ``keys``), copy the
    live tensors into the host tensors ``dests``, and restore the live tensors from the host
    state dict ``latest`` (also on an exception; then ``refresh()``). Returns the soup's full
    state dict (non-float tensors from ``latest``; tied keys share one tensor)."""
    latest_t = [latest[k] for k in keys]
    try:
        apply()
        with torch.no_grad():
            for d, t in zip(dests, live):
                d.copy_(t, non_blocking=t.is_cuda and d.is_pinned())
        for device in {t.device for t in live if t.is_cuda}:
            torch.cuda.current_stream(device).synchronize()
    finally:
        combine_into_(live, [latest_t], (1.0,), False)  # exact restore: copies the latest
        if refresh is not None:
            refresh()
    return _full_state_dict(latest, keys, dests)
