"""Soups are readable like any file the user's own code writes: the modes ``open``/``mkdir`` give
(umask applied), although safetensors files and ``mkdtemp`` folders are created private."""

import os
import stat

import pytest
import torch

from lightning_helpers import loaders, module, trainer
from merge_callback import BayesMergeCallback
from merge_callback.io import atomic_directory, publish_modes, save_safetensors_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_safetensors_soups_get_the_mode_open_gives(tmp_path, umask_022):
    path = save_safetensors_atomic(tmp_path / "soup.safetensors", {"w": torch.ones(3)})
    assert mode(path) == 0o644
    os.umask(0o077)  # a private umask stays private
    assert mode(save_safetensors_atomic(tmp_path / "p.safetensors", {"w": torch.ones(3)})) == 0o600


def test_atomic_folders_and_their_contents_get_the_modes_mkdir_and_open_give(tmp_path, umask_022):
    from safetensors.torch import save_file

    with atomic_directory(tmp_path / "soup") as tmp:
        save_file({"w": torch.ones(2)}, str(tmp / "model.safetensors"))  # created 0600
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "a.json").write_text("{}")
    out = tmp_path / "soup"
    assert mode(out) == 0o755 and mode(out / "sub") == 0o755
    assert mode(out / "model.safetensors") == 0o644 and mode(out / "sub" / "a.json") == 0o644


def test_publish_modes_on_a_single_file(tmp_path, umask_022):
    p = tmp_path / "f"
    p.write_text("x")
    p.chmod(0o600)
    publish_modes(p)
    assert mode(p) == 0o644


def test_lightning_soups_are_readable_like_the_checkpoints(tmp_path, umask_022):
    train, heldout = loaders()
    trainer(tmp_path, BayesMergeCallback(heldout=heldout, budget=3), max_steps=20).fit(
        module(), train)
    soups = sorted((tmp_path / "ckpt" / "soups").iterdir())
    assert [p.name for p in soups] == ["soup-step=20.json", "soup-step=20.safetensors"]
    ckpts = list((tmp_path / "ckpt").glob("*.ckpt"))
    assert ckpts and {mode(p) for p in soups} == {mode(p) for p in ckpts} == {0o644}


def test_hf_soup_folders_are_readable_like_the_checkpoints(tmp_path, umask_022):
    pytest.importorskip("transformers")
    from merge_callback import BayesMergeTrainerCallback
    from test_hf import heldout_set, run

    run(tmp_path, BayesMergeTrainerCallback(heldout=heldout_set(), budget=3), max_steps=20)
    soup = tmp_path / "soups" / "soup-20"
    assert mode(soup) == 0o755
    assert {p.name: mode(p) for p in soup.iterdir()} == {
        p.name: 0o644 for p in soup.iterdir()}
    assert "model.safetensors" in {p.name for p in soup.iterdir()}
