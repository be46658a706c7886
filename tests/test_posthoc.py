"""Post-hoc EMA math, host tracks, window weights and the disk snapshot store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merge_callback.posthoc import (
    SIGMA_REL_MAX, PowerEmaTrack, SnapshotStore, accumulate_into_, gamma_to_sigma_rel, power_ema_beta,
    power_ema_step_weights, power_profile_inner, reconstructed_step_weights,
    reconstruction_weights, sigma_rel_to_gamma, window_weights)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- σ_rel ↔ γ


def test_sigma_gamma_mapping_matches_the_paper():
    # Karras et al. 2024 / edm2: gamma 16.97 <-> sigma_rel 0.05, 6.94 <-> 0.10
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert gamma_to_sigma_rel(16.97) == pytest.approx(0.05, abs=1e-5)
    assert gamma_to_sigma_rel(6.94) == pytest.approx(0.10, abs=1e-4)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(SIGMA_REL_MAX, abs=1e-15)
    assert sigma_rel_to_gamma(SIGMA_REL_MAX) == 0.0


@pytest.mark.parametrize("s", [0.005, 0.01, 0.05, 0.1, 0.2, 0.28])
def test_sigma_gamma_round_trip(s):
    assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)


def test_sigma_rel_is_the_relative_std_of_the_profile():
    # the discrete per-step weights at large t have std / t -> sigma_rel
    t, s = 20000, 0.1
    w = power_ema_step_weights(t, sigma_rel_to_gamma(s))
    tau = np.arange(1, t + 1)
    mean = (w * tau).sum()
    std = math.sqrt((w * (tau - mean) ** 2).sum())
    assert std / t == pytest.approx(s, rel=2e-3)


@pytest.mark.parametrize("bad", [0, -0.1, 0.3, float("nan"), "0.1", True])
def test_sigma_rel_validation(bad):
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("bad", [-1, float("inf"), None])
def test_gamma_validation(bad):
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        gamma_to_sigma_rel(bad)


def test_beta_per_step_and_fold():
    g = 6.94
    assert power_ema_beta(1, g) == 0.0
    assert power_ema_beta(10, g) == pytest.approx((1 - 1 / 10) ** (g + 1), rel=1e-15)
    # folding n steps: the product of the per-step betas telescopes
    prod = math.prod(power_ema_beta(t, g) for t in range(41, 51))
    assert power_ema_beta(50, g, previous=40) == pytest.approx(prod, rel=1e-12)
    with pytest.raises(ValueError, match="t must be an integer step >= 1"):
        power_ema_beta(0, g)
    with pytest.raises(ValueError, match=r"previous must be an integer step in \[0, t=5\)"):
        power_ema_beta(5, g, previous=5)


def test_step_weights_sum_to_one_and_fold_blocks():
    g = sigma_rel_to_gamma(0.1)
    w1 = power_ema_step_weights(100, g)
    w10 = power_ema_step_weights(100, g, every=10)
    assert w1.sum() == pytest.approx(1.0, abs=1e-14)
    assert w10.sum() == pytest.approx(1.0, abs=1e-14)
    # folded weight of each block = the per-step weight of that block, on its last iterate
    np.testing.assert_allclose(w10.reshape(10, 10)[:, -1], w1.reshape(10, 10).sum(1), atol=1e-15)
    assert np.all(w10.reshape(10, 10)[:, :-1] == 0)
    # an interval that does not divide t: the last update is at t itself
    w7 = power_ema_step_weights(30, g, every=7)
    assert np.nonzero(w7)[0].tolist() == [6, 13, 20, 27, 29]
    with pytest.raises(ValueError, match="every must be a positive integer"):
        power_ema_step_weights(10, g, every=0)


# --------------------------------------------------------------------------- host tracks


def _trajectory(n: int, dim: int = 5, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(dim, dtype=torch.float64)
    out = []
    for _ in range(n):
        x = x + torch.randn(dim, generator=g, dtype=torch.float64)
        out.append({"w": x.clone(), "b": x[:2].clone() * 3, "n": torch.tensor([7])})
    return out


def test_track_matches_its_step_weights_exactly():
    traj = _trajectory(60)
    for every in (1, 4, 7):
        tr = PowerEmaTrack(0.1)
        for t in range(1, 61):
            if t % every == 0 or t == 60:
                tr.update(t, traj[t - 1])
        w = power_ema_step_weights(60, tr.gamma, every=every)
        expect = sum(wi * traj[i]["w"] for i, wi in enumerate(w))
        torch.testing.assert_close(tr.tensors["w"].double(), expect, atol=2e-5, rtol=1e-5)
        assert "n" not in tr.tensors  # integer tensors are not tracked
        assert tr.tensors["w"].dtype == torch.float32 and tr.step == 60


def test_track_first_update_copies_and_does_not_alias():
    live = {"w": torch.ones(3)}
    tr = PowerEmaTrack(0.05)
    assert tr.update(3, live) == 0.0
    live["w"].add_(1.0)
    assert tr.tensors["w"].tolist() == [1.0, 1.0, 1.0]


def test_track_validation_and_resume():
    tr = PowerEmaTrack(0.05)
    tr.update(5, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="step must increase between updates"):
        tr.update(5, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="live tensors changed since the first update"):
        tr.update(6, {"v": torch.ones(2)})
    with pytest.raises(ValueError, match="tensor 'w' changed shape"):
        tr.update(6, {"w": torch.ones(3)})
    # resume: a restored track continues bit-identically
    traj = _trajectory(30)
    a = PowerEmaTrack(0.1)
    for t in range(1, 16):
        a.update(t, traj[t - 1])
    b = PowerEmaTrack(0.1)
    b.load_state_dict({k: (dict(v) if k == "tensors" else v) for k, v in a.state_dict().items()})
    for t in range(16, 31):
        a.update(t, traj[t - 1])
        b.update(t, traj[t - 1])
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    with pytest.raises(ValueError, match="state is for sigma_rel=0.1"):
        PowerEmaTrack(0.05).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="PowerEmaTrack state lacks 'step'"):
        PowerEmaTrack(0.1).load_state_dict({"sigma_rel": 0.1, "tensors": {}})


# --------------------------------------------------------------------------- reconstruction


def test_inner_product_closed_form_matches_numeric_integral():
    ga, gb, ta, tb = 6.94, 2.5, 70.0, 100.0
    tau = np.linspace(0, tb, 2_000_001)[1:]
    pa = np.where(tau <= ta, (ga + 1) * tau ** ga / ta ** (ga + 1), 0.0)
    pb = (gb + 1) * tau ** gb / tb ** (gb + 1)
    numeric = np.sum(pa * pb) * (tau[1] - tau[0])
    assert power_profile_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)
    assert power_profile_inner(tb, gb, ta, ga) == pytest.approx(numeric, rel=1e-4)


def test_reconstructing_a_stored_profile_gives_weight_one_on_it():
    g05, g10 = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)
    steps = [100, 200, 300, 400] * 2
    gammas = [g05] * 4 + [g10] * 4
    c = reconstruction_weights(steps, gammas, 0.10, 300)
    np.testing.assert_allclose(c, [0, 0, 0, 0, 0, 0, 1, 0], atol=1e-9)
    assert math.fsum(c) == pytest.approx(1.0, abs=1e-15)


def test_reconstruction_between_tracks_matches_exact_per_step_ema():
    # two tracks updated every step, snapshots every 50 steps; rebuild sigma 0.07 at step 400
    traj = _trajectory(400, dim=8, seed=3)
    tracks = [PowerEmaTrack(0.05), PowerEmaTrack(0.10)]
    exact = PowerEmaTrack(0.07)
    snaps = []
    for t in range(1, 401):
        for tr in (*tracks, exact):
            tr.update(t, traj[t - 1])
        if t % 50 == 0:
            snaps += [(t, tr.gamma, tr.tensors["w"].double().clone()) for tr in tracks]
    c = reconstruction_weights([s[0] for s in snaps], [s[1] for s in snaps], 0.07, 400)
    rebuilt = sum(ci * s[2] for ci, s in zip(c, snaps))
    target = exact.tensors["w"].double()
    spread = (traj[-1]["w"] - traj[200]["w"]).abs().max()
    assert float((rebuilt - target).abs().max()) < 0.005 * float(spread)
    # the effective per-iterate weights are close to the exact profile's
    w_rb = reconstructed_step_weights([s[0] for s in snaps], [s[1] for s in snaps], c)
    w_ex = power_ema_step_weights(400, sigma_rel_to_gamma(0.07))
    assert np.abs(w_rb - w_ex).sum() < 0.03
    assert w_rb.sum() == pytest.approx(1.0, abs=1e-9)
    # and rebuilding exactly from those weights reproduces the combination
    direct = sum(wi * traj[i]["w"] for i, wi in enumerate(w_rb))
    torch.testing.assert_close(direct, rebuilt, atol=1e-4, rtol=1e-5)


def test_reconstruction_validation():
    with pytest.raises(ValueError, match="snapshot_steps must be a non-empty sequence"):
        reconstruction_weights([], [], 0.1, 10)
    with pytest.raises(ValueError, match="one exponent per snapshot"):
        reconstruction_weights([10, 20], [1.0], 0.1, 10)
    with pytest.raises(ValueError, match="snapshot_steps must be steps >= 1"):
        reconstruction_weights([0], [1.0], 0.1, 10)
    with pytest.raises(ValueError, match="snapshot_gammas must be finite exponents >= 0"):
        reconstruction_weights([10], [-2.0], 0.1, 10)
    with pytest.raises(ValueError, match="must be distinct"):
        reconstruction_weights([10, 10], [1.0, 1.0], 0.1, 10)
    with pytest.raises(ValueError, match="at_step must be a step >= 1"):
        reconstruction_weights([10], [1.0], 0.1, 0)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        reconstruction_weights([10], [1.0], 0.5, 10)
    with pytest.raises(ValueError, match="coefficients must have one entry per snapshot"):
        reconstructed_step_weights([10, 20], [1.0, 1.0], [1.0])


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("W", [1, 2, 3, 5, 8, 16, 64])
def test_window_weights(W):
    u = window_weights("uniform", W)
    assert u == [1.0 / W] * W
    lin = window_weights("linear", W)
    assert lin == [2 * i / (W * (W + 1)) for i in range(1, W + 1)]
    assert all(a < b for a, b in zip(lin, lin[1:]))
    s = window_weights("one_minus_sqrt", W)
    assert math.fsum(s) == 1.0
    assert all(a > b for a, b in zip(s, s[1:]))  # 1-sqrt decay: more weight on older saves
    for w in (u, lin):
        assert abs(math.fsum(w) - 1.0) <= W * 2 ** -53
    assert len(u) == len(lin) == len(s) == W
    # WSM correspondence: the suffix sums of the 1-sqrt weights are 1 - sqrt((i-1)/W)
    suffix = np.cumsum(s[::-1])[::-1]
    np.testing.assert_allclose(suffix, [1 - math.sqrt(i / W) for i in range(W)], atol=1e-14)


def test_window_validation():
    with pytest.raises(ValueError, match="window kind must be one of 'uniform', 'linear', "
                                         "'one_minus_sqrt'"):
        window_weights("cosine", 4)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="window length W must be a positive integer"):
            window_weights("uniform", bad)


# --------------------------------------------------------------------------- snapshot store


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(7, generator=g),
            "h": torch.randn(5, generator=g).half(), "i": torch.arange(3)}


def test_store_round_trip_is_bitwise(tmp_path):
    from safetensors.torch import load_file

    store = SnapshotStore(tmp_path / "s", keep=None)
    sd = _sd(0)
    e = store.put(120, "phema0.05", sd, {"gamma": 16.97})
    got = load_file(str(e.path))
    assert set(got) == {"a", "b", "h"}  # integer tensors are left out
    assert all(torch.equal(got[k], sd[k].float()) for k in ("a", "b", "h"))
    assert got["h"].dtype == torch.float32
    assert e.step == 120 and e.kind == "phema0.05" and e.nbytes == e.path.stat().st_size
    assert e.metadata()["info"] == {"gamma": 16.97}
    assert store.entries() == [e] and store.nbytes() == e.nbytes
    assert not list((tmp_path / "s").glob("*.tmp*"))


def test_store_accumulate_reads_each_snapshot_once(tmp_path):
    store = SnapshotStore(tmp_path, keep=None)
    sds = [_sd(i) for i in range(3)]
    es = [store.put(10 * (i + 1), "raw", sd) for i, sd in enumerate(sds)]
    w = [0.5, -0.25, 0.75]
    out = {k: torch.full_like(sds[0][k], 9.0, dtype=torch.float32) for k in ("a", "b")}
    st = SnapshotStore.accumulate_into_(out, list(zip(es, w)))
    for k in out:
        expect = sum(wi * sd[k].float() for wi, sd in zip(w, sds))
        torch.testing.assert_close(out[k], expect, atol=1e-6, rtol=1e-6)
    assert st.files_read == 3 and st.files_skipped == 0
    assert st.bytes_read == 3 * 4 * (12 + 7)  # the two requested tensors, once per file
    # a negligible weight is skipped and the rest rescaled to keep the sum
    st = SnapshotStore.accumulate_into_(out, [(es[0], 1.0), (es[1], 1e-6)], negligible=1e-4)
    assert st.files_read == 1 and st.files_skipped == 1 and st.skipped_weight == 1e-6
    torch.testing.assert_close(out["a"], sds[0]["a"] * (1.0 + 1e-6))
    # in-memory sources (the live tracks) mix with files; only files count as bytes read
    st = accumulate_into_(out, [(es[0], 0.5), ({"a": sds[1]["a"], "b": sds[1]["b"]}, 0.5)])
    torch.testing.assert_close(out["a"], 0.5 * (sds[0]["a"] + sds[1]["a"]))
    assert st.files_read == 1 and st.bytes_read == 4 * (12 + 7)


def test_store_accumulate_validation(tmp_path):
    store = SnapshotStore(tmp_path, keep=None)
    e = store.put(1, "raw", _sd(0))
    out = {"a": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match="a source must be a SnapshotEntry or a mapping"):
        SnapshotStore.accumulate_into_(out, [("file.safetensors", 1.0)])
    with pytest.raises(ValueError, match="in-memory source has no tensor 'a'"):
        SnapshotStore.accumulate_into_(out, [({"b": torch.zeros(1)}, 1.0)])
    with pytest.raises(ValueError, match="each snapshot may appear once"):
        SnapshotStore.accumulate_into_(out, [(e, 0.5), (e, 0.5)])
    with pytest.raises(ValueError, match="weights must be finite and non-empty"):
        SnapshotStore.accumulate_into_(out, [(e, float("nan"))])
    with pytest.raises(ValueError, match="the weights sum to 0"):
        SnapshotStore.accumulate_into_(out, [(e, 0.0)])
    with pytest.raises(ValueError, match=r"negligible must be a number in \[0, 1\)"):
        SnapshotStore.accumulate_into_(out, [(e, 1.0)], negligible=1.0)
    with pytest.raises(ValueError, match="output tensor 'a' must be float32"):
        SnapshotStore.accumulate_into_({"a": torch.zeros(4, 3).double()}, [(e, 1.0)])
    with pytest.raises(ValueError, match="has no tensor 'zz'"):
        SnapshotStore.accumulate_into_({"zz": torch.zeros(1)}, [(e, 1.0)])
    with pytest.raises(ValueError, match=r"has shape \(4, 3\), expected \(12,\)"):
        SnapshotStore.accumulate_into_({"a": torch.zeros(12)}, [(e, 1.0)])


def test_store_put_validation(tmp_path):
    store = SnapshotStore(tmp_path, keep=None)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        store.put(-1, "raw", _sd(0))
    with pytest.raises(ValueError, match="kind must be a non-empty name"):
        store.put(1, "a/b", _sd(0))
    with pytest.raises(ValueError, match="no floating-point tensor to store"):
        store.put(1, "raw", {"i": torch.arange(3)})
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="keep must be a positive integer or None"):
            SnapshotStore(tmp_path, keep=bad)


def test_store_pruning_keeps_newest_and_octave_anchors(tmp_path):
    store = SnapshotStore(tmp_path, keep=3)
    x = {"w": torch.zeros(2)}
    for step in range(50, 1001, 50):
        store.put(step, "raw", x)
        store.put(step, "phema0.05", x)
    for kind in ("raw", "phema0.05"):
        kept = [e.step for e in store.entries(kind)]
        # newest 3, plus the newest of each octave [32,64) [64,128) [128,256) [256,512) [512,1024)
        assert kept == [50, 100, 250, 500, 900, 950, 1000]
    # anchors are stable: a later save never removes an octave's anchor once the octave is past
    store.put(1050, "raw", x)
    assert [e.step for e in store.entries("raw")] == [50, 100, 250, 500, 950, 1000, 1050]
