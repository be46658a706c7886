"""Pre-flight checks: held-out data, output folders, model limits (merge_callback.preflight)."""

import os
import shutil
import subprocess

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from merge_callback.data import BlockDataset
from merge_callback.preflight import (PreflightError, check_heldout, check_output_dir,
                                      format_bytes, model_limits)

V, P = 64, 32


def _blocks(n=6, t=8, hi=V):
    return torch.arange(n * t).reshape(n, t) % hi


def test_good_data_returns_batches_checked():
    loader = DataLoader(BlockDataset(_blocks()), batch_size=2)
    assert check_heldout(loader, vocab_size=V, max_positions=P) == 3
    assert check_heldout(loader, vocab_size=V, max_positions=P, max_batches=2) == 2
    assert check_heldout([_blocks()], vocab_size=V) == 1
    assert check_heldout([(_blocks(), "extra")], vocab_size=V) == 1


class _Restartable:
    """Re-iterable object that is not a list: iterated twice by the check."""

    def __init__(self):
        self.starts = 0

    def __iter__(self):
        self.starts += 1
        yield {"input_ids": _blocks()}


def test_custom_reiterable_is_iterated_twice():
    data = _Restartable()
    assert check_heldout(data, vocab_size=V) == 1
    assert data.starts == 2


class _Exhausting:
    def __init__(self):
        self.gen = iter([_blocks()])

    def __iter__(self):
        return self.gen


class _OnceStream(IterableDataset):
    def __init__(self):
        self.used = False

    def __iter__(self):
        if not self.used:
            self.used = True
            yield from _blocks()


@pytest.mark.parametrize("data, match", [
    (None, r"heldout is None"),
    ("val.npy", r"is a str .*not a path"),
    ({"input_ids": _blocks()}, r"a single batch, not an iterable of batches"),
    (_blocks(), r"is a torch.int64 tensor of shape \(6, 8\); pass an iterable of batches"),
    ((b for b in [_blocks()]), r"one-shot generator \(iter\(x\) is x\)"),
    (iter([_blocks()]), r"one-shot list_iterator"),
    (42, r"int, which is not iterable"),
    ([], r"yields no batches"),
    (_Exhausting(), r"\(_Exhausting\) yields batches only once"),
    (DataLoader(_OnceStream(), batch_size=2), r"yields batches only once"),
    ([[1, 2, 3]], r"batch 0 is a list; each batch must be a LongTensor"),
    ([{"ids": _blocks()}], r"batch 0 is a dict with keys \['ids'\] without 'input_ids'"),
    ([{"input_ids": [[1, 2]]}], r"'input_ids' is a list, not a tensor"),
    ([_blocks().float()], r"batch 0: input_ids have dtype torch.float32; token ids must be an "
                          r"integer dtype"),
    ([_blocks().bool()], r"dtype torch.bool"),
    ([_blocks()[0]], r"shape \(8,\); expected \[batch, time\]"),
    ([_blocks(n=0)], r"batch 0 has 0 rows"),
    ([_blocks(t=1)], r"rows of 1 token\(s\); next-token metrics need at least 2"),
    ([_blocks(), _blocks() + V], r"batch 1 holds token id 111, outside the model's vocabulary of "
                                 r"64 \(ids 0..63\)"),
    ([_blocks() - 1], r"holds token id -1; token ids must be >= 0"),
    ([_blocks(t=40)], r"rows of 40 tokens, more than the model's maximum of 32 positions"),
    ([{"input_ids": _blocks(), "attention_mask": torch.ones(6, 7)}],
     r"attention_mask has shape \(6, 7\), input_ids \(6, 8\)"),
    ([{"input_ids": _blocks(), "labels": torch.full((6, 8), 99)}],
     r"labels hold 99; allowed are -100 \(ignored\) and 0..63"),
])
def test_bad_heldout(data, match):
    with pytest.raises(PreflightError, match=match):
        check_heldout(data, vocab_size=V, max_positions=P)


def test_only_checked_batches_count_and_name_is_used():
    data = [_blocks(), _blocks() + 1000]
    assert check_heldout(data, vocab_size=V, max_batches=1) == 1
    with pytest.raises(PreflightError, match=r"^--heldout x.npy batch 1 holds token id 1047"):
        check_heldout(data, vocab_size=V, name="--heldout x.npy")
    with pytest.raises(PreflightError, match=r"max_batches must be an integer >= 1"):
        check_heldout(data, max_batches=0)
    assert isinstance(PreflightError("x"), ValueError)


def test_labels_with_ignore_index_pass():
    labels = _blocks().clone()
    labels[:, :3] = -100
    assert check_heldout([{"input_ids": _blocks(), "labels": labels}], vocab_size=V) == 1


# --------------------------------------------------------------------------- output folders


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_output_dir_creates_nothing(tmp_path):
    before = _tree(tmp_path)
    free = check_output_dir(tmp_path / "a" / "b" / "soups", 1000, name="soup_dir")
    assert free == shutil.disk_usage(tmp_path).free or free > 1000
    check_output_dir(tmp_path, 10)
    assert _tree(tmp_path) == before


def test_output_dir_below_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PreflightError, match=r"^--out .*f/soup cannot be created: .*f is a file, "
                                             r"not a folder"):
        check_output_dir(tmp_path / "f" / "soup", 1, name="--out")
    with pytest.raises(PreflightError, match=r"soup_dir .*f exists and is not a folder"):
        check_output_dir(tmp_path / "f", 1)


def test_output_dir_not_enough_space(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    need = free * 4
    with pytest.raises(PreflightError, match=rf"not enough free space for one soup: .* \({need} "
                                             rf"bytes\) needed, .* free"):
        check_output_dir(tmp_path / "soups", need)
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(12) == "12 B"


@pytest.fixture
def unwritable(tmp_path):
    """A folder no one (not even root) may create files in."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["chattr", "+i", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("root without chattr: cannot make an unwritable folder")
        yield d
        subprocess.run(["chattr", "-i", str(d)], check=True)
    else:
        d.chmod(0o500)
        yield d
        d.chmod(0o700)


def test_output_dir_not_writable(unwritable):
    with pytest.raises(PreflightError, match=r"soup_dir .*ro/soups is not writable: no permission "
                                             r"to create files in its parent .*ro"):
        check_output_dir(unwritable / "soups", 1)
    with pytest.raises(PreflightError, match=r"is not writable"):
        check_output_dir(unwritable, 1)


# --------------------------------------------------------------------------- model limits


def test_model_limits_hf_and_wrapped(tiny_neox):
    assert model_limits(tiny_neox) == (64, 32)

    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

    assert model_limits(Wrapper(tiny_neox)) == (64, 32)


def test_model_limits_plain_modules():
    class GPTish(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(50, 4)
            self.wpe = nn.Embedding(16, 4)

    assert model_limits(GPTish()) == (50, 16)
    assert model_limits(nn.Linear(3, 3)) == (None, None)
