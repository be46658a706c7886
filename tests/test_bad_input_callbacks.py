"""Bad input to the training callbacks: refused when the callback is built (each argument named
with what is allowed), or by the pre-flight check before training starts — never inside every
round, and never with a file written. A soup write that fails (a full disk) still leaves the
round's λ and metrics recorded and logged, and training unchanged."""

import csv
import errno

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_helpers import loaders, token_blocks
from merge_callback import BayesMergeCallback
from merge_callback.preflight import PreflightError
from test_lightning import assert_same_tensors, run

pytest.importorskip("transformers")

from merge_callback import BayesMergeTrainerCallback  # noqa: E402

CONSTRUCTOR_CASES = [
    ({"higher_is_better": "no"}, r"higher_is_better must be True or False, or None, got 'no'"),
    ({"save_soups": "no"}, r"save_soups must be True or False, got 'no'"),
    ({"save_soups": 1}, r"save_soups must be True or False, got 1"),
    ({"soup_dir": ""}, r"soup_dir must be a non-empty path \(str or os.PathLike\) or None, "
                       r"got ''"),
    ({"soup_dir": 123}, r"soup_dir must be a non-empty path \(str or os.PathLike\) or None, "
                        r"got 123"),
    ({"ema_decays": None, "snapshot_every": 5},
     r"ema_decays must be a sequence of distinct numbers in \(0, 1\) .*got None"),
    ({"ema_decays": 0.99, "snapshot_every": 5},
     r"ema_decays must be a sequence of distinct numbers in \(0, 1\) .*got 0.99"),
    ({"ema_decays": "0.99", "snapshot_every": 5},
     r"ema_decays must be a sequence of distinct numbers in \(0, 1\) .*got '0.99'"),
    ({"history": True}, r"history must be an integer >= 2 .*got True"),
    ({"history": 2.0}, r"history must be an integer >= 2 .*got 2.0"),
    ({"snapshot_every": 2.5}, r"snapshot_every must be a positive integer or None, got 2.5"),
    ({"budget": "10"}, r"budget must be an integer >= 3 \(held-out evaluations per round\), "
                       r"got '10'"),
    ({"alpha": True}, r"alpha must be a number in \(0, 1\), got True"),
    ({"warm_start": "yes"}, r"warm_start must be True or False, got 'yes'"),
    ({"every_n_saves": 1.0}, r"every_n_saves must be a positive integer, got 1.0"),
    ({"max_batches": -1}, r"max_batches must be a positive integer or None, got -1"),
]


@pytest.mark.parametrize("cls", [BayesMergeCallback, BayesMergeTrainerCallback],
                         ids=["lightning", "hf"])
@pytest.mark.parametrize("kwargs, match", CONSTRUCTOR_CASES,
                         ids=[next(iter(k)) + "=" + repr(v) for k, v in
                              ((next(iter(c[0])), next(iter(c[0].values())))
                               for c in CONSTRUCTOR_CASES)])
def test_constructors_refuse_wrong_types_naming_the_argument(cls, kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
    assert list(tmp_path.iterdir()) == []


def _one_shot():
    return (b for b in [token_blocks(8, seed=2)])


HELDOUT_CASES = [
    ([token_blocks(8, seed=2).float()], r"heldout batch 0: input_ids have dtype torch.float32; "
                                        r"token ids must be an integer dtype"),
    ([token_blocks(8, seed=2) + 64], r"heldout batch 0 holds token id 127, outside the model's "
                                     r"vocabulary of 64 \(ids 0..63\)"),
    ([torch.zeros(2, 40, dtype=torch.long)], r"heldout batch 0 has rows of 40 tokens, more than "
                                             r"the model's maximum of 32 positions"),
    ("one-shot", r"heldout is a one-shot generator \(iter\(x\) is x\)"),
    ({"input_ids": token_blocks(8, seed=2)}, r"heldout is a dict with keys \['input_ids'\]: a "
                                             r"single batch"),
    ([], r"heldout yields no batches"),
]


@pytest.mark.parametrize("heldout, match", HELDOUT_CASES,
                         ids=["float-ids", "ids-beyond-vocab", "too-long", "generator", "dict",
                              "empty"])
def test_bad_heldout_is_found_before_training_and_writes_nothing(heldout, match, tmp_path):
    data = _one_shot() if heldout == "one-shot" else heldout
    cb = BayesMergeCallback(heldout=data, budget=3, on_error="raise")
    with pytest.raises(PreflightError, match=match):
        run(tmp_path, cb)
    assert cb.history == []
    assert not (tmp_path / "ckpt" / "soups").exists()


def test_bad_heldout_with_warn_gives_one_warning_and_training_goes_on(tmp_path):
    cb = BayesMergeCallback(heldout=[token_blocks(8, seed=2) + 64], budget=3)
    with pytest.warns(UserWarning) as record:
        _, m = run(tmp_path / "a", cb)
    hits = [w for w in record if "outside the model's vocabulary" in str(w.message)]
    assert len(hits) == 1  # once, not at every save
    assert "merge rounds are disabled for this run" in str(hits[0].message)
    assert cb.history == [] and not (tmp_path / "a" / "ckpt" / "soups").exists()
    _, plain = run(tmp_path / "b")
    assert_same_tensors(m.state_dict(), plain.state_dict())


def test_soup_dir_below_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    cb = BayesMergeCallback(heldout=loaders()[1], budget=3, soup_dir=tmp_path / "file" / "soups",
                            on_error="raise")
    with pytest.raises(PreflightError, match=r"soup_dir .*file.* is a file|not a folder"):
        run(tmp_path / "run", cb)
    assert (tmp_path / "file").read_text() == "x"


def test_full_disk_keeps_the_round_recorded_and_logged(tmp_path, monkeypatch):
    import merge_callback.io.soups as soups

    def full(path, tensors, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(soups, "save_safetensors_atomic", full)
    cb = BayesMergeCallback(heldout=loaders()[1], budget=3)
    logger = CSVLogger(str(tmp_path / "logs"), name="run")
    with pytest.warns(UserWarning, match=r"writing the soup of step 20 failed \(.*soup-step=20"
                                         r"\.safetensors\): a soup needs about .* bytes\); the "
                                         r"round's result was recorded and logged"):
        _, m = run(tmp_path / "a", cb, logger=logger)
    monkeypatch.undo()
    assert [h["step"] for h in cb.history] == [20, 30]  # λ and metrics kept
    logger.finalize("success")
    with open(tmp_path / "logs" / "run" / "version_0" / "metrics.csv") as f:
        logged = [float(r["merge/lambda"]) for r in csv.DictReader(f) if r.get("merge/lambda")]
    assert logged == [h["lambda"] for h in cb.history]
    soups_dir = tmp_path / "a" / "ckpt" / "soups"
    assert not soups_dir.exists() or not any(soups_dir.glob("*.safetensors"))
    _, plain = run(tmp_path / "b")  # training itself is exactly as without the callback
    assert_same_tensors(m.state_dict(), plain.state_dict())


def test_callback_start_removes_debris_of_a_killed_writer(tmp_path):
    soups_dir = tmp_path / "ckpt" / "soups"
    soups_dir.mkdir(parents=True)
    dead = 2 ** 22 + 12345  # above the default pid_max of 4194304: no such process
    debris = soups_dir / f".soup-step=10.safetensors.tmp-{dead}"
    debris.write_bytes(b"partial")
    keep = soups_dir / "notes.txt"
    keep.write_text("mine")
    run(tmp_path, BayesMergeCallback(heldout=loaders()[1], budget=3))
    assert not debris.exists()
    assert keep.read_text() == "mine"
    assert (soups_dir / "soup-step=20.safetensors").exists()


def test_hf_callback_checks_heldout_before_training(tmp_path):
    from test_hf import run as hf_run

    cb = BayesMergeTrainerCallback(heldout=[{"input_ids": token_blocks(8, seed=2) + 64}],
                                   budget=3, on_error="raise")
    with pytest.raises(PreflightError, match=r"outside the model's vocabulary"):
        hf_run(tmp_path, cb, max_steps=10)
    assert not (tmp_path / "soups").exists()
