"""Host snapshots: flat aligned buffers, buffer reuse across saves, soups computed where scored."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_helpers import loaders
from merge_callback import BayesMergeCallback
from merge_callback.engine import Snapshot, soup_from_live, soup_state_dict
from merge_callback.engine import MergeSchedule, RoundConfig, Runtime
from merge_callback.evaluate import resolve_metric
from merge_callback.merge import lerp_tensors_
from test_averaging import AVG
from test_lightning import assert_same_tensors, ckpt_files, run


def mixed_module():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 11), nn.LayerNorm(11))
    m[1].weight = m[0].weight  # tied
    m.register_buffer("count", torch.tensor(7))
    m.register_buffer("empty", torch.zeros(0, 5))
    m.register_buffer("scale", torch.tensor([2.5, 0.5], dtype=torch.float64))
    m.register_buffer("bf16", torch.randn(3, dtype=torch.bfloat16))
    return m


def test_snapshot_is_an_aligned_flat_copy_that_shares_tied_weights():
    m = mixed_module()
    snap = Snapshot.capture(m, 5)
    sd = m.state_dict()
    assert list(snap.tensors) == list(sd) and snap.step == 5
    for k, v in sd.items():
        h = snap.tensors[k]
        assert h.device.type == "cpu" and h.dtype == v.dtype and torch.equal(h, v), k
        assert h.is_contiguous()
        if v.numel():  # (empty tensors have no data pointer)
            assert h.data_ptr() != v.data_ptr()
            assert h.data_ptr() % 64 == 0, k  # vector-friendly alignment in the flat buffer
    assert snap.tensors["0.weight"] is snap.tensors["1.weight"]
    # one buffer per dtype: the float32 tensors are views of a single storage
    f32 = [snap.tensors[k] for k in ("0.weight", "1.bias", "2.weight", "empty")]
    assert len({t.untyped_storage().data_ptr() for t in f32}) == 1
    assert not snap.page_locked  # pageable on a CPU run: dropping it frees the memory
    with torch.no_grad():
        m[1].bias.add_(1.0)
    assert not torch.equal(snap.tensors["1.bias"], m[1].bias)  # a copy, not a view


def test_capture_reuses_the_buffers_of_a_dropped_snapshot():
    m = mixed_module()
    old = Snapshot.capture(m, 1)
    ptrs = [t.data_ptr() for t in old.tensors.values()]
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    new = Snapshot.capture(m, 2, reuse=old)
    assert [t.data_ptr() for t in new.tensors.values()] == ptrs
    assert_same_tensors(new.tensors, m.state_dict())
    assert old.tensors == {}  # emptied: nobody can read the overwritten weights through it

    other = nn.Linear(6, 11)  # another layout: fresh buffers, the offered snapshot is untouched
    keep = Snapshot.capture(other, 3)
    fresh = Snapshot.capture(m, 4, reuse=keep)
    assert_same_tensors(fresh.tensors, m.state_dict())
    assert sorted(keep.tensors) == ["bias", "weight"]
    assert_same_tensors(keep.tensors, other.state_dict())


def test_soup_from_live_equals_the_host_soup_and_restores_the_live_weights():
    m = mixed_module()
    previous = Snapshot.capture(m, 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    latest = Snapshot.capture(m, 2)
    live_before = {k: v.clone() for k, v in m.state_dict().items()}
    keys = [k for k in ("0.weight", "1.bias", "2.weight", "2.bias")]
    live = [m.state_dict()[k] for k in keys]
    prev_t = [previous.tensors[k] for k in keys]
    latest_t = [latest.tensors[k] for k in keys]
    dests = [torch.empty_like(t) for t in latest_t]
    soup = soup_from_live(latest.tensors, keys, live, dests,
                          lambda: lerp_tensors_(live, prev_t, latest_t, 0.625))
    expected = soup_state_dict(previous, latest, 0.625)
    assert list(soup) == list(expected)
    for k in keys:
        assert torch.equal(soup[k], torch.lerp(previous.tensors[k], latest.tensors[k], 0.625)), k
    assert soup["1.weight"] is soup["0.weight"]
    assert soup["count"] is latest.tensors["count"]
    assert_same_tensors(m.state_dict(), live_before)

    def broken():
        lerp_tensors_(live, prev_t, latest_t, 0.5)
        raise RuntimeError("out of memory while merging")

    with pytest.raises(RuntimeError, match="out of memory while merging"):
        soup_from_live(latest.tensors, keys, live, dests, broken)
    assert_same_tensors(m.state_dict(), live_before)


def force_recycling(monkeypatch):
    """Treat host snapshots as page-locked, so the callbacks recycle their buffers (what they do
    on CUDA, where page-locking is slow); returns the list of (reused step, new step)."""
    reused = []
    capture = Snapshot.capture.__func__

    def spy(cls, module, step, pin_memory=None, reuse=None):
        if reuse is not None:
            reused.append((reuse.step, step))
        return capture(cls, module, step, pin_memory=pin_memory, reuse=reuse)

    monkeypatch.setattr(Snapshot, "page_locked", property(lambda self: True))
    monkeypatch.setattr(Snapshot, "capture", classmethod(spy))
    return reused


@pytest.fixture
def recycle(monkeypatch):
    return force_recycling(monkeypatch)


def test_recycled_buffers_give_the_same_soups_pairwise(tmp_path, recycle):
    _, heldout = loaders()
    cb = BayesMergeCallback(heldout=heldout, budget=4)
    _, m = run(tmp_path, cb, max_steps=40)
    assert recycle == [(10, 30), (20, 40)]  # the previous save's buffers, after its round
    ckpts = ckpt_files(tmp_path)
    soups = tmp_path / "ckpt" / "soups"
    for prev, latest in zip(ckpts, ckpts[1:]):
        step = int(latest.stem.split("step=")[1])
        lam = json.loads((soups / f"soup-step={step}.json").read_text())["lambda"]
        a = torch.load(prev, weights_only=True)["state_dict"]
        b = torch.load(latest, weights_only=True)["state_dict"]
        soup = load_file(str(soups / f"soup-step={step}.safetensors"))
        for k in soup:
            assert torch.equal(soup[k], torch.lerp(a[k], b[k], lam)), k


@pytest.mark.parametrize("kwargs, expected", [
    (AVG, [(5, 25), (15, 35)]),
    # the previous save leaves the ring of snapshots: its buffers must not be recycled early
    (dict(budget=5, history=3, snapshot_every=2, ema_decays=(0.9,)), None),
], ids=["history4", "previous-save-beyond-the-ring"])
def test_recycled_buffers_give_the_same_averaging_rounds(tmp_path, monkeypatch, kwargs, expected):
    plain = BayesMergeCallback(heldout=loaders()[1], **kwargs)
    run(tmp_path / "plain", plain, max_steps=40)
    assert plain.schedule.spare is None  # CPU snapshots are not kept once dropped

    reused = force_recycling(monkeypatch)
    recycled = BayesMergeCallback(heldout=loaders()[1], **kwargs)
    run(tmp_path / "recycled", recycled, max_steps=40)
    if expected is not None:
        assert reused == expected  # one spare at a time, taken by the next capture
    assert len(reused) >= 2
    assert recycled.history == plain.history
    for step in (10, 20, 30, 40):
        a = tmp_path / "plain" / "ckpt" / "soups" / f"soup-step={step}.safetensors"
        b = tmp_path / "recycled" / "ckpt" / "soups" / f"soup-step={step}.safetensors"
        assert_same_tensors(load_file(str(a)), load_file(str(b)))


def test_schedule_recycles_the_previous_snapshot(recycle):
    m = nn.Linear(4, 3)
    sched = MergeSchedule(RoundConfig(budget=3), resolve_metric("loss"), on_error="raise")
    pairs = []

    def evaluate(module):
        sources, _ = sched.sources_and_families()
        previous, latest = sources["previous"], sources["latest"]
        pairs.append((previous.step, latest.step, previous.tensors["weight"].clone(),
                      latest.tensors["weight"].clone()))
        raise RuntimeError("round failed")  # the schedule advances and recycles anyway

    rt = Runtime(module=m, evaluate=evaluate)

    weights = {}
    for step in (10, 20, 30):
        with torch.no_grad():
            m.weight.fill_(float(step))
        weights[step] = m.weight.detach().clone()
        if step == 10:
            assert sched.on_save(step, rt) is None
        else:
            with pytest.raises(RuntimeError, match="round failed"):
                sched.on_save(step, rt)
    assert recycle == [(10, 30)]
    assert [(p, q) for p, q, _, _ in pairs] == [(10, 20), (20, 30)]
    for p, q, a, b in pairs:
        assert torch.equal(a, weights[p]) and torch.equal(b, weights[q])
    assert torch.equal(sched.last_save.tensors["weight"], weights[30])


def test_soup_writer_copies_tied_tensors_only(tmp_path, monkeypatch):
    from merge_callback.io import save_safetensors_atomic

    flat = torch.arange(24, dtype=torch.float32)
    tensors = {"a": flat[0:6].view(2, 3), "b": flat[8:24].view(4, 4), "tied": flat[0:6].view(2, 3),
               "part": flat[4:10], "empty": flat[6:6], "t": torch.ones(3, 2).t()}
    clones = []
    real_clone = torch.Tensor.clone

    def counting_clone(self, *args, **kwargs):
        clones.append(self.shape)
        return real_clone(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    path = save_safetensors_atomic(tmp_path / "s.safetensors", tensors, {"k": 1})
    monkeypatch.undo()
    # "tied" repeats "a", "part" overlaps "a" and "b"; the disjoint views are written in place
    assert sorted(clones) == [torch.Size([2, 3]), torch.Size([6])]
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    assert torch.equal(flat, torch.arange(24, dtype=torch.float32))  # the source is untouched


def test_snapshot_buffers_hold_no_stale_bytes_between_tensors(tmp_path):
    """The alignment padding is zeroed: a snapshot saved with torch.save (the ring and EMA
    snapshots in a Lightning checkpoint) is the same file for the same weights."""
    m = mixed_module()
    files = []
    for i in range(3):
        junk = torch.full((1 << 16,), float("nan"))  # dirty some freed memory first
        del junk
        snap = Snapshot.capture(m, 1)
        for flat in snap._buffers.flats:
            covered = torch.zeros(flat.numel(), dtype=torch.bool)
            base = flat.data_ptr()
            for t in snap._buffers.hosts:
                if t.dtype == flat.dtype and t.numel():
                    start = (t.data_ptr() - base) // t.element_size()
                    covered[start:start + t.numel()] = True
            gaps = flat[~covered]
            assert torch.equal(gaps, torch.zeros_like(gaps)), flat.dtype
        path = tmp_path / f"run{i}" / "snap.pt"  # (torch.save names the archive after the file)
        path.parent.mkdir()
        torch.save(snap.tensors, path)
        files.append(path.read_bytes())
    assert files[0] == files[1] == files[2]
