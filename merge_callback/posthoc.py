"""Post-hoc EMA and decay-shaped checkpoint windows: the math, the host tracks, the snapshot store.

Framework-free (torch + numpy). Three parts:

* **Power-function EMA** (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
  Diffusion Models", §3 and Appendix C; NVlabs/edm2 ``training/phema.py``). A track with exponent
  ``γ ≥ 0`` is updated after optimizer step ``t`` (1-based) as ``ema ← β_t·ema + (1 − β_t)·θ_t``
  with ``β_t = (1 − 1/t)^(γ+1)``. At step ``t`` it weights iterate ``θ_τ`` by
  ``(τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1)``: the mass that the continuous profile
  ``p_t(τ) = (γ+1) τ^γ / t^(γ+1)`` on ``[0, t]`` puts on ``(τ−1, τ]``. No weight is left on the
  initial weights and the profile stretches with the run. Its width relative to its length is
  ``σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3)))`` (paper Eq. 123, edm2 ``exp_to_std``); the inverse is the
  largest real root of ``γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0`` (Eq. 126, edm2
  ``std_to_exp``). ``γ = 16.97 ↔ σ_rel = 0.05`` and ``γ = 6.94 ↔ σ_rel = 0.10``, as the paper and
  edm2 state (checked in the tests); a pair of tracks written as ``sigma_rels = (0.05, 0.28)`` is a
  different pair (``σ_rel = 0.28 ↔ γ ≈ 0.17``, nearly the uniform average of the whole run).
  ``γ ≥ 0`` covers ``σ_rel ∈ (0, 1/√12 ≈ 0.2887]``.

  **Updates every n steps, folded exactly.** The product of the per-step betas over steps
  ``s+1 … s+n`` telescopes: ``Π ((u−1)/u)^(γ+1) = (s/(s+n))^(γ+1)``. An update at step ``t`` after
  the previous one at step ``s`` therefore uses ``β = (s/t)^(γ+1)`` (edm2's
  ``power_function_beta(std, t_next=t, t_delta=t−s)``): the old average then carries exactly the
  weight the per-step track gives to steps ``≤ s``, and ``θ_t`` receives the per-step track's
  whole weight on ``(s, t]`` — the weight profile is the continuous one integrated over blocks of
  ``n`` steps (:func:`power_ema_step_weights` with ``every=n``). The first update (``s = 0``)
  copies the weights.

* **Post-hoc reconstruction**: snapshots of tracks taken at steps ``t_i`` with exponents ``γ_i``
  are combined with coefficients ``c`` that minimise the L2 distance between ``Σ c_i p_i`` and the
  target profile ``p`` (exponent ``γ*``, length ``t*``), with the closed-form inner products
  ``<p_a, p_b> = (γa+1)(γb+1) / ((γa+γb+1) t_max) · (t_min/t_max)^(γ of the longer profile)``
  (paper Eq. 151, Algorithm 3; edm2 ``solve_posthoc_coefficients``), then scaled to sum 1.

* **Windows** of the last ``W`` saves with decay-shaped weights (:func:`window_weights`), and a
  disk :class:`SnapshotStore` that reads each snapshot once, one tensor at a time, to accumulate
  a weighted sum (:meth:`SnapshotStore.accumulate_into_`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SIGMA_REL_MAX",
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
    "power_ema_beta",
    "power_ema_step_weights",
    "power_profile_inner",
    "PowerEmaTrack",
    "reconstruction_weights",
    "reconstructed_step_weights",
    "WINDOW_KINDS",
    "window_weights",
    "SnapshotEntry",
    "SnapshotStore",
    "AccumulateStats",
    "NEGLIGIBLE_WEIGHT",
    "accumulate_into_",
]

#: Largest σ_rel with a non-decreasing profile (γ = 0: uniform average of the whole run).
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)

#: Default relative threshold below which :meth:`SnapshotStore.accumulate_into_` skips a weight.
NEGLIGIBLE_WEIGHT = 1e-4

WINDOW_KINDS = ("uniform", "linear", "one_minus_sqrt")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)


# --------------------------------------------------------------------------- σ_rel ↔ γ


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile with exponent ``gamma``.

    ``σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3)))`` (Karras et al. 2024, Eq. 123).

    Args:
        gamma: exponent ``γ ≥ 0``.

    Raises:
        ValueError: ``gamma`` not a finite number ``≥ 0``.
    """
    if not _is_real(gamma) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent ``γ`` of the power-function profile with relative width ``sigma_rel``.

    The largest real root of ``γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²)`` (Eq. 126, Algorithm 2),
    polished by Newton steps on :func:`gamma_to_sigma_rel` so the round trip is exact to ~1e-12.

    Args:
        sigma_rel: in ``(0, SIGMA_REL_MAX]`` (``SIGMA_REL_MAX = 1/√12``, the uniform average).

    Raises:
        ValueError: ``sigma_rel`` outside ``(0, 1/√12]``.
    """
    if not _is_real(sigma_rel) or not (0.0 < float(sigma_rel) <= SIGMA_REL_MAX + 1e-15):
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.6f}] (1/sqrt(12), the uniform "
                         f"average over the run), got {sigma_rel!r}")
    s = float(sigma_rel)
    if s >= SIGMA_REL_MAX:
        return 0.0
    t = s ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    g = float(max(r.real for r in roots if abs(r.imag) < 1e-6 * max(1.0, abs(r.real))))
    g = max(g, 0.0)
    for _ in range(4):  # Newton on f(g) = sigma(g)^2 - s^2 (the cubic loses digits for small s)
        f = (g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)) - s * s
        h = 1e-6 * max(1.0, g)
        df = ((g + h + 1.0) / ((g + h + 2.0) ** 2 * (g + h + 3.0))
              - (g - h + 1.0) / ((g - h + 2.0) ** 2 * (g - h + 3.0))) / (2 * h)
        if df == 0:
            break
        g = max(0.0, g - f / df)
    return g


def power_ema_beta(t: int, gamma: float, previous: int | None = None) -> float:
    """Decay of the power-function EMA for an update at step ``t``.

    ``β = (previous / t)^(γ+1)``; ``previous`` defaults to ``t − 1`` (the per-step
    ``β_t = (1 − 1/t)^(γ+1)``). With ``previous = s`` it is the exact product of the per-step
    betas over ``s+1 … t`` (see the module docstring). ``β = 0`` at the first update.

    Args:
        t: step of this update (1-based optimizer step count), ``t ≥ 1``.
        gamma: exponent ``γ ≥ 0``.
        previous: step of the previous update, ``0 ≤ previous < t`` (0: none yet).

    Raises:
        ValueError: on a non-integer or out-of-range step, or a bad ``gamma``.
    """
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
        raise ValueError(f"t must be an integer step >= 1, got {t!r}")
    if previous is None:
        previous = t - 1
    if (isinstance(previous, bool) or not isinstance(previous, (int, np.integer))
            or not (0 <= previous < t)):
        raise ValueError(f"previous must be an integer step in [0, t={t}), got {previous!r}")
    gamma_to_sigma_rel(gamma)  # validates gamma
    return (previous / t) ** (float(gamma) + 1.0)


def power_ema_step_weights(t: int, gamma: float, every: int = 1) -> np.ndarray:
    """Weight of each iterate ``θ_1 … θ_t`` in a power-function EMA at step ``t`` (float64).

    Index ``τ − 1`` holds the weight of ``θ_τ``. With ``every = n`` the track was updated at
    steps ``n, 2n, …`` (and at ``t``): the iterates at those steps carry the per-step profile's
    mass over their block, the other iterates 0.

    Args:
        t: step, ``t ≥ 1``.
        gamma: exponent ``γ ≥ 0``.
        every: update interval ``≥ 1``.

    Raises:
        ValueError: on out-of-range arguments.
    """
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
        raise ValueError(f"t must be an integer step >= 1, got {t!r}")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    gamma_to_sigma_rel(gamma)
    e = float(gamma) + 1.0
    updates = np.arange(every, t + 1, every, dtype=np.int64)
    if updates.size == 0 or updates[-1] != t:
        updates = np.append(updates, t)
    cdf = (updates / t) ** e
    w = np.zeros(t, dtype=np.float64)
    w[updates - 1] = np.diff(np.concatenate([[0.0], cdf]))
    return w


def power_profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """``∫ p_a p_b`` of two continuous power-function profiles (Eq. 151, edm2's
    ``power_function_correlation``); broadcasts over numpy arrays."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64)
                                  for x in (t_a, gamma_a, t_b, gamma_b))
    ratio = np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
    longer_gamma = np.where(t_a < t_b, gamma_b, gamma_a)
    num = (gamma_a + 1.0) * (gamma_b + 1.0) * ratio ** longer_gamma
    return num / ((gamma_a + gamma_b + 1.0) * np.maximum(t_a, t_b))


# --------------------------------------------------------------------------- host tracks


class PowerEmaTrack:
    """A power-function EMA of the floating-point tensors of a state dict, kept on the host (fp32).

    Call :meth:`update` after an optimizer step with the global step count (the number of
    optimizer steps taken, ``≥ 1``); calling it every ``n`` steps gives the exact fold described
    in the module docstring. The tensors are updated in place with one fused
    ``torch._foreach_lerp_``.

    Args:
        sigma_rel: the profile's relative width, in ``(0, 1/√12]``.

    Attributes:
        sigma_rel, gamma: the profile.
        step: step of the last update (0 before the first).
        tensors: ``{key: fp32 CPU tensor}`` (empty before the first update).

    Raises:
        ValueError: on a bad ``sigma_rel``.
    """

    def __init__(self, sigma_rel: float):
        self.gamma = sigma_rel_to_gamma(sigma_rel)
        self.sigma_rel = float(sigma_rel)
        self.step = 0
        self.tensors: dict[str, Tensor] = {}

    def update(self, step: int, live: Mapping[str, Tensor]) -> float:
        """Fold the iterates since the last update into the track; returns the β used.

        Args:
            step: optimizer steps taken so far, greater than at the previous update.
            live: the current state dict; only floating-point tensors are tracked, on any
                device (copied to the host once per tensor when not already fp32 on the CPU).

        Raises:
            ValueError: ``step`` not greater than the previous update's, or ``live`` holds other
                floating-point keys or shapes than at the first update.
        """
        beta = power_ema_beta(step, self.gamma, previous=self.step) if self.step < step else None
        if beta is None:
            raise ValueError(f"step must increase between updates: got step {step!r} after "
                             f"step {self.step}")
        keys = [k for k, v in live.items() if torch.is_tensor(v) and v.is_floating_point()]
        with torch.no_grad():
            cur = [live[k].detach().to("cpu", torch.float32) for k in keys]
            if not self.tensors:
                self.tensors = {k: c.clone() if c.data_ptr() == live[k].data_ptr() else c
                                for k, c in zip(keys, cur)}
            else:
                if keys != list(self.tensors):
                    raise ValueError("live tensors changed since the first update: expected keys "
                                     f"{list(self.tensors)[:4]}..., got {keys[:4]}...")
                mine = list(self.tensors.values())
                for k, a, b in zip(keys, mine, cur):
                    if a.shape != b.shape:
                        raise ValueError(f"tensor {k!r} changed shape: {tuple(a.shape)} -> "
                                         f"{tuple(b.shape)}")
                torch._foreach_lerp_(mine, cur, 1.0 - beta)
        self.step = int(step)
        return beta

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (the tensors are the track's own, not copies)."""
        return {"sigma_rel": self.sigma_rel, "gamma": self.gamma, "step": self.step,
                "tensors": self.tensors}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (tensors copied to fp32 host tensors).

        Raises:
            ValueError: the state is for another σ_rel, or malformed.
        """
        for k in ("sigma_rel", "step", "tensors"):
            if k not in state:
                raise ValueError(f"PowerEmaTrack state lacks {k!r} (has {sorted(state)})")
        if not math.isclose(float(state["sigma_rel"]), self.sigma_rel, rel_tol=0, abs_tol=1e-12):
            raise ValueError(f"state is for sigma_rel={state['sigma_rel']!r}, this track has "
                             f"sigma_rel={self.sigma_rel!r}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state step must be an integer >= 0, got {step!r}")
        self.step = step
        self.tensors = {k: v.detach().to("cpu", torch.float32, copy=True)
                        for k, v in state["tensors"].items()}


# --------------------------------------------------------------------------- reconstruction


def _check_steps_gammas(steps: Sequence[int], gammas: Sequence[float]) -> tuple[np.ndarray, ...]:
    steps_a = np.asarray(list(steps), dtype=np.float64)
    gammas_a = np.asarray(list(gammas), dtype=np.float64)
    if steps_a.ndim != 1 or steps_a.size == 0:
        raise ValueError("snapshot_steps must be a non-empty sequence of steps")
    if gammas_a.shape != steps_a.shape:
        raise ValueError(f"snapshot_gammas must have one exponent per snapshot: "
                         f"{gammas_a.size} for {steps_a.size} steps")
    if not np.all(np.isfinite(steps_a)) or np.any(steps_a < 1):
        raise ValueError(f"snapshot_steps must be steps >= 1, got {list(steps)}")
    if not np.all(np.isfinite(gammas_a)) or np.any(gammas_a < 0):
        raise ValueError(f"snapshot_gammas must be finite exponents >= 0, got {list(gammas)}")
    pairs = set(zip(steps_a.tolist(), gammas_a.tolist()))
    if len(pairs) != steps_a.size:
        raise ValueError("snapshot (step, gamma) pairs must be distinct (a repeated snapshot "
                         "makes the least-squares system singular)")
    return steps_a, gammas_a


def reconstruction_weights(snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float],
                           target_sigma_rel: float, at_step: int) -> np.ndarray:
    """Least-squares coefficients rebuilding a power-function EMA from stored snapshots.

    Solves ``A c = b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p*>`` (closed form,
    :func:`power_profile_inner`), ``p_i`` the profile of snapshot ``i`` (its track's exponent,
    length = its step) and ``p*`` the target (``γ(target_sigma_rel)``, length ``at_step``), then
    scales ``c`` to sum 1 — Karras et al. 2024, Algorithm 3. Snapshots taken after ``at_step``
    are allowed (their profiles extend past it) but usually not useful.

    Args:
        snapshot_steps: step of each snapshot.
        snapshot_gammas: exponent of the track each snapshot was taken from.
        target_sigma_rel: σ_rel of the EMA to rebuild, in ``(0, 1/√12]``.
        at_step: the step the rebuilt EMA ends at, ``≥ 1``.

    Returns:
        float64 coefficients, one per snapshot, summing to 1 (may be negative).

    Raises:
        ValueError: on malformed inputs or repeated snapshots.
    """
    steps, gammas = _check_steps_gammas(snapshot_steps, snapshot_gammas)
    if isinstance(at_step, bool) or not _is_real(at_step) or not at_step >= 1:
        raise ValueError(f"at_step must be a step >= 1, got {at_step!r}")
    g_star = sigma_rel_to_gamma(target_sigma_rel)
    A = power_profile_inner(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = power_profile_inner(steps, gammas, float(at_step), g_star)
    try:
        c = np.linalg.solve(A, b)
        if not np.all(np.isfinite(c)):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        c = np.linalg.lstsq(A, b, rcond=None)[0]
    return c / np.sum(c)


def reconstructed_step_weights(snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float],
                               coefficients: Sequence[float], every: int = 1,
                               length: int | None = None) -> np.ndarray:
    """Effective weight of each iterate ``θ_1 … θ_T`` in ``Σ c_i · snapshot_i`` (float64).

    Each snapshot's own per-iterate weights come from :func:`power_ema_step_weights` (tracks
    updated every ``every`` steps). Compare with ``power_ema_step_weights(at_step, γ*)`` for the
    exact weight error of a reconstruction.

    Args:
        snapshot_steps, snapshot_gammas: as in :func:`reconstruction_weights`.
        coefficients: one per snapshot.
        every: the tracks' update interval.
        length: ``T`` (default: the largest snapshot step).

    Raises:
        ValueError: on mismatched lengths or bad steps.
    """
    steps, gammas = _check_steps_gammas(snapshot_steps, snapshot_gammas)
    coef = np.asarray(list(coefficients), dtype=np.float64)
    if coef.shape != steps.shape:
        raise ValueError(f"coefficients must have one entry per snapshot: {coef.size} for "
                         f"{steps.size}")
    T = int(max(steps)) if length is None else int(length)
    out = np.zeros(T, dtype=np.float64)
    for s, g, c in zip(steps.astype(int), gammas, coef):
        w = power_ema_step_weights(int(s), float(g), every)
        out[: min(T, s)] += c * w[:T]
    return out


# --------------------------------------------------------------------------- windows


def window_weights(kind: str, W: int) -> list[float]:
    """Weights of the last ``W`` saves, oldest first, summing to 1.

    The kinds, with the learning-rate decay each is equivalent to by WSM's correspondence
    (arXiv 2507.17634: merging ``θ_{t−W+1} … θ_t`` with weights ``c`` equals training from
    ``θ_{t−W}`` with the learning rate of interval ``i`` scaled by ``m_i = Σ_{j≥i} c_j``):

    * ``"uniform"``: ``c_i = 1/W`` (LAWA) ↔ linear decay ``m_i = 1 − (i−1)/W``;
    * ``"linear"``: ``c_i = 2i / (W(W+1))``, growing towards the latest ↔ decay
      ``m_i = 1 − (i−1)i / (W(W+1))`` (concave, ~``1 − x²``);
    * ``"one_minus_sqrt"``: ``c_i = √(i/W) − √((i−1)/W)`` ↔ the 1−√ decay
      ``m_i = 1 − √((i−1)/W)`` (WSM's best), shrinking towards the latest.

    ``uniform`` and ``linear`` are their exact fractions (which sum to 1) each rounded once to
    float64 (so ``uniform`` weights are all equal); ``one_minus_sqrt`` is computed in float64
    with the last weight set to ``1 − math.fsum(others)``.

    Args:
        kind: one of ``"uniform"``, ``"linear"``, ``"one_minus_sqrt"``.
        W: window length ``≥ 1``.

    Raises:
        ValueError: unknown ``kind`` or ``W`` not a positive integer.
    """
    if kind not in WINDOW_KINDS:
        raise ValueError(f"window kind must be one of {', '.join(map(repr, WINDOW_KINDS))}, "
                         f"got {kind!r}")
    if isinstance(W, bool) or not isinstance(W, (int, np.integer)) or W < 1:
        raise ValueError(f"window length W must be a positive integer, got {W!r}")
    W = int(W)
    if kind == "uniform":
        fr = [Fraction(1, W)] * W
    elif kind == "linear":
        fr = [Fraction(2 * i, W * (W + 1)) for i in range(1, W + 1)]
    else:
        w = [math.sqrt(i / W) - math.sqrt((i - 1) / W) for i in range(1, W + 1)]
        w[-1] = 1.0 - math.fsum(w[:-1])
        return w
    return [float(f) for f in fr]


# --------------------------------------------------------------------------- snapshot store


_NAME = re.compile(r"^snap-step(\d{9})-([A-Za-z0-9_.]+)\.safetensors$")
_KIND = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class SnapshotEntry:
    """One stored snapshot: ``path``, the training ``step`` it was taken at, its ``kind`` (e.g.
    ``"raw"`` for the weights at a save, ``"phema0.05"`` for a track) and its ``nbytes``."""

    path: Path
    step: int
    kind: str
    nbytes: int

    def metadata(self) -> dict[str, Any]:
        """The JSON metadata stored in the file header."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
        return {k: json.loads(v) if k == "info" else v for k, v in meta.items()}


@dataclass
class AccumulateStats:
    """What :meth:`SnapshotStore.accumulate_into_` did: files read, files skipped (negligible
    weight), bytes read, seconds, and the skipped weights' absolute sum."""

    files_read: int = 0
    files_skipped: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    skipped_weight: float = 0.0


class SnapshotStore:
    """Snapshots of weights on disk, one safetensors file per (step, kind), written atomically.

    File names are ``snap-step{step:09d}-{kind}.safetensors``; the header metadata holds the step,
    the kind and a JSON ``info`` dict (e.g. ``{"gamma": 16.97, "sigma_rel": 0.05}``).

    **Pruning rule** (:meth:`prune`, run after every :meth:`put` when ``keep`` is set). Per kind,
    a snapshot is kept if it is among the ``keep`` newest of that kind, *or* it is the newest
    snapshot in its octave ``[2^k, 2^(k+1))`` of steps. The octave anchors are stable (once the
    run passes ``2^(k+1)`` the anchor of octave ``k`` never changes) and number ``log2(t)``, so a
    run of ``t`` steps keeps at most ``keep + log2(t) + 1`` snapshots per kind, spread over the
    whole run, as post-hoc reconstruction of long profiles needs (the profile ``∝ τ^γ`` spans the
    run). Disk per save: one model's floating-point bytes (fp32) per kind written.

    Args:
        directory: folder for the files (created if missing).
        keep: newest snapshots kept per kind besides the octave anchors, or ``None`` for no
            pruning.

    Raises:
        ValueError: ``keep`` not a positive integer or ``None``.
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 16):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a positive integer or None (no pruning), got {keep!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def path(self, step: int, kind: str) -> Path:
        return self.directory / f"snap-step{step:09d}-{kind}.safetensors"

    def put(self, step: int, kind: str, tensors: Mapping[str, Tensor],
            info: Mapping[str, Any] | None = None) -> SnapshotEntry:
        """Write the floating-point ``tensors`` (as fp32) for ``(step, kind)``, then prune.

        Args:
            step: training step, ``≥ 0``.
            kind: a name of letters, digits, ``_`` and ``.``.
            tensors: ``{key: tensor}``; non-floating-point tensors are left out.
            info: JSON-serialisable metadata (``gamma``, ``sigma_rel``, ...).

        Raises:
            ValueError: bad ``step`` or ``kind``, or no floating-point tensor.
        """
        from merge_callback.io import save_safetensors_atomic

        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ValueError(f"kind must be a non-empty name of letters, digits, '_' and '.', "
                             f"got {kind!r}")
        out = {k: v.detach().to("cpu", torch.float32) for k, v in tensors.items()
               if torch.is_tensor(v) and v.is_floating_point()}
        if not out:
            raise ValueError("no floating-point tensor to store")
        path = self.path(int(step), kind)
        save_safetensors_atomic(path, out, {"step": str(int(step)), "kind": kind,
                                            "info": dict(info or {})})
        entry = SnapshotEntry(path, int(step), kind, path.stat().st_size)
        if self.keep is not None:
            self.prune()
        return entry

    def entries(self, kind: str | None = None) -> list[SnapshotEntry]:
        """Stored snapshots sorted by (step, kind), optionally of one kind."""
        out = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m and (kind is None or m.group(2) == kind):
                out.append(SnapshotEntry(p, int(m.group(1)), m.group(2), p.stat().st_size))
        return sorted(out, key=lambda e: (e.step, e.kind))

    def kept(self, entries: Sequence[SnapshotEntry]) -> list[SnapshotEntry]:
        """The entries the pruning rule keeps (see the class docstring)."""
        keep: list[SnapshotEntry] = []
        by_kind: dict[str, list[SnapshotEntry]] = {}
        for e in entries:
            by_kind.setdefault(e.kind, []).append(e)
        for es in by_kind.values():
            es = sorted(es, key=lambda e: e.step)
            newest = set(id(e) for e in es[-self.keep:]) if self.keep else set(map(id, es))
            anchors: dict[int, SnapshotEntry] = {}
            for e in es:
                anchors[max(e.step, 1).bit_length()] = e  # octave [2^(k-1), 2^k); last wins
            keep += [e for e in es if id(e) in newest or anchors.get(max(e.step, 1).bit_length())
                     is e]
        return sorted(keep, key=lambda e: (e.step, e.kind))

    def prune(self) -> list[SnapshotEntry]:
        """Delete the snapshots the rule does not keep; returns the deleted entries."""
        if self.keep is None:
            return []
        entries = self.entries()
        kept = set(e.path for e in self.kept(entries))
        gone = [e for e in entries if e.path not in kept]
        for e in gone:
            e.path.unlink(missing_ok=True)
        return gone

    def nbytes(self) -> int:
        """Bytes on disk of all stored snapshots."""
        return sum(e.nbytes for e in self.entries())

    @staticmethod
    def accumulate_into_(out: Mapping[str, Tensor],
                         weighted: Iterable[tuple[SnapshotEntry, float]],
                         negligible: float = NEGLIGIBLE_WEIGHT) -> AccumulateStats:
        """Set ``out[k] = Σ w_i · snapshot_i[k]`` for every key of ``out``, in place.

        Each snapshot file is opened once and read one tensor at a time (``safe_open``), added in
        fp32 (``out``'s tensors must be fp32; they are zeroed first). A source may also be a
        mapping of tensors already in memory (e.g. the live tracks at the current step), which
        is read without touching the disk. A weight with
        ``|w_i| < negligible · Σ|w|`` is skipped and the remaining weights rescaled to keep
        ``Σ w`` unchanged; the element-wise error this causes is at most
        ``(Σ_skipped |w_i|) · max_{i,j} |snapshot_i − snapshot_j|`` (≤ ``n · negligible · Σ|w|``
        times the snapshots' largest element-wise spread), since an affine combination of
        snapshots changes by ``Σ_skipped w_i (snapshot_i − weighted mean)``.

        Args:
            out: ``{key: fp32 tensor}`` to fill (any device; the snapshot tensor is moved to it).
            weighted: ``(source, weight)`` pairs, a source being a :class:`SnapshotEntry` or a
                ``{key: tensor}`` mapping; a source may appear once.
            negligible: relative threshold in ``[0, 1)`` (0 keeps every nonzero weight).

        Returns:
            :class:`AccumulateStats`.

        Raises:
            ValueError: a repeated entry, a non-finite weight, weights summing to 0, a bad
                ``negligible``, a non-fp32 output tensor, or a key or shape missing from a file.
        """
        from safetensors import safe_open

        if not _is_real(negligible) or not (0.0 <= negligible < 1.0):
            raise ValueError(f"negligible must be a number in [0, 1), got {negligible!r}")
        pairs = [(e, float(w)) for e, w in weighted]
        for e, _ in pairs:
            if not isinstance(e, (SnapshotEntry, Mapping)):
                raise ValueError(f"a source must be a SnapshotEntry or a mapping of tensors, got "
                                 f"{type(e).__name__}")
        ids = [e.path if isinstance(e, SnapshotEntry) else id(e) for e, _ in pairs]
        if len(set(ids)) != len(ids):
            raise ValueError("each snapshot may appear once in the weighted list")
        if not pairs or not all(math.isfinite(w) for _, w in pairs):
            raise ValueError(f"weights must be finite and non-empty, got {[w for _, w in pairs]}")
        total = math.fsum(w for _, w in pairs)
        abs_total = math.fsum(abs(w) for _, w in pairs)
        if abs_total == 0 or total == 0:
            raise ValueError("the weights sum to 0; nothing to accumulate")
        for k, v in out.items():
            if v.dtype != torch.float32:
                raise ValueError(f"output tensor {k!r} must be float32, got {v.dtype}")
        stats = AccumulateStats()
        t0 = time.perf_counter()
        keep = [abs(w) >= negligible * abs_total and w != 0 for _, w in pairs]
        kept = [p for p, k in zip(pairs, keep) if k]
        stats.files_skipped = len(pairs) - len(kept)
        stats.skipped_weight = math.fsum(abs(w) for (_, w), k in zip(pairs, keep) if not k)
        scale = total / math.fsum(w for _, w in kept)
        for v in out.values():
            v.zero_()
        for e, w in kept:
            if isinstance(e, Mapping):
                for k, v in out.items():
                    if k not in e:
                        raise ValueError(f"in-memory source has no tensor {k!r}")
                    t = e[k]
                    if t.shape != v.shape:
                        raise ValueError(f"in-memory source tensor {k!r} has shape "
                                         f"{tuple(t.shape)}, expected {tuple(v.shape)}")
                    v.add_(t.to(v.device, torch.float32), alpha=w * scale)
                continue
            with safe_open(str(e.path), framework="pt") as f:
                names = set(f.keys())
                for k, v in out.items():
                    if k not in names:
                        raise ValueError(f"snapshot {e.path.name} has no tensor {k!r}")
                    t = f.get_tensor(k)
                    if t.shape != v.shape:
                        raise ValueError(f"snapshot {e.path.name} tensor {k!r} has shape "
                                         f"{tuple(t.shape)}, expected {tuple(v.shape)}")
                    stats.bytes_read += t.numel() * t.element_size()
                    v.add_(t.to(v.device, torch.float32), alpha=w * scale)
            stats.files_read += 1
        stats.seconds = time.perf_counter() - t0
        return stats


#: Module-level name for :meth:`SnapshotStore.accumulate_into_`.
accumulate_into_ = SnapshotStore.accumulate_into_
