"""BayesMergeTrainerCallback with a real transformers.Trainer on a tiny GPT-NeoX."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.utils.data import DataLoader  # noqa: E402
from transformers import (AutoModelForCausalLM, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)

from lightning_helpers import token_blocks  # noqa: E402
from merge_callback import BayesMergeTrainerCallback  # noqa: E402
from merge_callback.data import BlockDataset, tiny_gpt_neox  # noqa: E402
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric  # noqa: E402
from merge_callback.io import load_state_dict  # noqa: E402

HERE = Path(__file__).parent
VOCAB = 64
NAME = "BayesMergeTrainerCallback"
SIDE_KEYS = {"step", "lambda", "alpha", "budget", "metric", "higher_is_better", "value_soup",
             "value_latest", "value_previous", "observations", "previous_step", "seconds",
             "checkpoint", "previous_checkpoint"}


def collate(items):
    ids = torch.stack([it["input_ids"] for it in items])
    return {"input_ids": ids, "labels": ids.clone()}


def train_set():
    return BlockDataset(token_blocks(80, seed=1))  # 10 batches of 8


def heldout_set():
    return BlockDataset(token_blocks(24, seed=2))  # 3 batches of 8


def heldout_loader():
    return DataLoader(heldout_set(), batch_size=8, collate_fn=collate)


def tiny_model(dropout=0.0):
    return tiny_gpt_neox(VOCAB, seed=0, hidden_size=32, num_layers=2, num_heads=4, max_len=32,
                         attention_dropout=dropout, hidden_dropout=dropout)


def make_trainer(root, *callbacks, max_steps=30, dropout=0.0, model=None, eval_dataset=None,
                 processing_class=None, **kwargs):
    opts = dict(output_dir=str(root), max_steps=max_steps, save_steps=10,
                per_device_train_batch_size=8, per_device_eval_batch_size=8,
                learning_rate=1e-2, lr_scheduler_type="constant", report_to="none",
                use_cpu=True, logging_steps=5, disable_tqdm=True, seed=0)
    opts.update(kwargs)
    return Trainer(model=model if model is not None else tiny_model(dropout),
                   args=TrainingArguments(**opts), train_dataset=train_set(),
                   eval_dataset=eval_dataset, data_collator=collate,
                   processing_class=processing_class, callbacks=list(callbacks))


def run(root, *callbacks, resume=None, **kwargs):
    """Train; to resume, pass ``model=from_pretrained(checkpoint)`` as well: transformers 5's
    Trainer restores GPT-NeoX's output layer (saved as ``embed_out.weight``) only that way."""
    tr = make_trainer(root, *callbacks, **kwargs)
    tr.train(resume_from_checkpoint=str(resume) if resume else None)
    return tr


def from_pretrained(path):
    return AutoModelForCausalLM.from_pretrained(str(path))


def assert_is_lerp(soup_dir, prev_ckpt, latest_ckpt, lam):
    """Every tensor of the soup folder is torch.lerp of the two checkpoint folders, bitwise."""
    soup = from_pretrained(soup_dir).state_dict()
    a, b = from_pretrained(prev_ckpt).state_dict(), from_pretrained(latest_ckpt).state_dict()
    assert sorted(soup) == sorted(b)
    for k in soup:
        assert torch.equal(soup[k], torch.lerp(a[k], b[k], lam)), k
    return soup


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


class FolderProbe(TrainerCallback):
    """Records checkpoint-<step>'s file hashes (and, if first, the live weights) at on_save."""

    def __init__(self, keep_weights=False):
        self.hashes, self.weights, self.trainer_state = {}, {}, {}
        self.keep_weights = keep_weights

    def on_save(self, args, state, control, model=None, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.hashes[state.global_step] = file_hashes(ckpt)
        self.trainer_state[state.global_step] = json.loads((ckpt / "trainer_state.json")
                                                           .read_text())
        if self.keep_weights:
            self.weights[state.global_step] = {k: v.clone() for k, v in
                                               model.state_dict().items()}


# ------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 1.5}, r"alpha must be a number in \(0, 1\), got 1.5"),
    ({"budget": 2}, r"budget must be an integer >= 3"),
    ({"acq_func": "ucb"}, r"acq_func must be one of 'gp_hedge', 'EI', 'PI', 'LCB', got 'ucb'"),
    ({"strategy": "optuna"}, r"strategy must be one of 'bayes', 'grid', 'random', 'greedy'"),
    ({"metric": "f1"}, r"metric must be one of 'loss', 'perplexity', 'accuracy' or a callable"),
    ({"metric": len}, r"a callable metric needs higher_is_better=True or False"),
    ({"max_batches": 0}, r"max_batches must be a positive integer or None, got 0"),
    ({"every_n_saves": 0}, r"every_n_saves must be a positive integer, got 0"),
    ({"on_error": "ignore"}, r"on_error must be 'warn' or 'raise', got 'ignore'"),
    ({"seed": "1"}, r"seed must be an integer, got '1'"),
    ({"keep_last_soups": 0}, r"keep_last_soups must be a positive integer or None \(keep all\), "
                             r"got 0"),
    ({"heldout": "heldout.txt"}, r"heldout must be a Dataset, a DataLoader or an iterable of "
                                 r"batches, or None to use the Trainer's eval_dataset; got str"),
    ({"heldout": 3}, r"heldout must be a Dataset, a DataLoader or an iterable of batches, or "
                     r"None to use the Trainer's eval_dataset; got int"),
])
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesMergeTrainerCallback(**kwargs)


def test_bind_needs_a_trainer():
    with pytest.raises(TypeError, match=r"bind\(\) needs a transformers.Trainer, got dict"):
        BayesMergeTrainerCallback().bind({})


def test_missing_transformers_says_how_to_install(monkeypatch):
    import importlib

    monkeypatch.delitem(sys.modules, "merge_callback.hf")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"BayesMergeTrainerCallback needs transformers and "
                                          r"accelerate; install them with `pip install "
                                          r"'merge_callback\[hf\]'`"):
        importlib.import_module("merge_callback.hf")


# ------------------------------------------------------------------------------ soups
def test_soups_are_hf_folders_holding_exact_merges(tmp_path, tiny_tokenizer):
    before, after = FolderProbe(keep_weights=True), FolderProbe()
    cb = BayesMergeTrainerCallback(heldout=heldout_set(), budget=4)
    tr = run(tmp_path, before, cb, after, processing_class=tiny_tokenizer)
    soups = tmp_path / "soups"
    assert sorted(p.name for p in soups.iterdir()) == ["soup-20", "soup-30"]
    for step in (20, 30):
        folder = soups / f"soup-{step}"
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "merge.json",
                "tokenizer.json", "tokenizer_config.json"} <= names
        info = json.loads((folder / "merge.json").read_text())
        assert SIDE_KEYS <= set(info)
        assert info["step"] == step and info["previous_step"] == step - 10
        assert info["checkpoint"] == f"checkpoint-{step}"
        assert info["previous_checkpoint"] == f"checkpoint-{step - 10}"
        lam = info["lambda"]
        assert 0.5 <= lam <= 1.0 and info["budget"] == 4 and len(info["observations"]) == 4
        assert [o[0] for o in info["observations"][:2]] == [0.5, 1.0]
        assert info["value_soup"] == min(v for _, v in info["observations"])
        assert info["value_latest"] == dict(map(tuple, info["observations"]))[1.0]
        soup = assert_is_lerp(folder, tmp_path / f"checkpoint-{step - 10}",
                              tmp_path / f"checkpoint-{step}", lam)
        # the soup's logits are those of a model holding the lerped weights
        ref = tiny_model()
        ref.load_state_dict(soup, strict=True)
        ids = token_blocks(2, seed=5)
        soup_model = from_pretrained(folder).eval()
        assert torch.equal(soup_model(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)
        assert info["value_soup"] == pytest.approx(cb._evaluator(soup_model), rel=1e-9)
    assert not list(soups.glob(".*"))  # no temporary folders left behind
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(soups / "soup-30") == mode(tmp_path / "checkpoint-30")
    # checkpoint folders: weights are the model at that step; nothing but this callback's own
    # trainer_state.json entry changed during on_save
    for step in (10, 20, 30):
        ckpt = tmp_path / f"checkpoint-{step}"
        assert_same_tensors(from_pretrained(ckpt).state_dict(), before.weights[step])
        h0, h1 = before.hashes[step], after.hashes[step]
        assert h0.keys() == h1.keys()
        assert {k for k in h0 if h0[k] != h1[k]} == {"trainer_state.json"}
        s0, s1 = before.trainer_state[step], after.trainer_state[step]
        assert s1["stateful_callbacks"][NAME]["attributes"]["merge_state"]["previous_step"] == step
        s0["stateful_callbacks"].pop(NAME), s1["stateful_callbacks"].pop(NAME)
        assert s0 == s1
    # the scalars went through Trainer.log: in log_history at the checkpoint's step
    rows = [r for r in tr.state.log_history if "merge/lambda" in r]
    assert [r["step"] for r in rows] == [20, 30]
    for r, h in zip(rows, cb.history):
        assert (r["merge/lambda"], r["merge/soup"], r["merge/latest"], r["merge/previous"]) == (
            h["lambda"], h["value_soup"], h["value_latest"], h["value_previous"])
    assert cb.history[1]["value_previous"] == cb.history[0]["value_latest"]


def test_save_total_limit_rotation_and_keep_last_soups(tmp_path):
    cb = BayesMergeTrainerCallback(heldout=heldout_set(), budget=3, keep_last_soups=2)
    run(tmp_path, cb, max_steps=50, save_total_limit=1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-50"]
    assert sorted(p.name for p in (tmp_path / "soups").iterdir()) == ["soup-40", "soup-50"]
    # rounds merged each pair although the older checkpoint folder was already rotated away
    assert [(h["previous_step"], h["step"]) for h in cb.history] == [(10, 20), (20, 30),
                                                                     (30, 40), (40, 50)]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """30 steps with dropout 0.1 and no merge callback."""
    root = tmp_path_factory.mktemp("plain")
    return root, run(root, dropout=0.1)


def test_training_is_bitwise_unchanged(tmp_path, plain_run):
    """Dropout and the Trainer's shuffling sampler make the run depend on every RNG draw."""
    a = run(tmp_path, BayesMergeTrainerCallback(heldout=heldout_set(), budget=3), dropout=0.1)
    root, b = plain_run
    assert_same_tensors(a.model.state_dict(), b.model.state_dict())
    s1, s2 = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][name], s2[k][name])
    for step in (10, 20, 30):
        assert_same_tensors(load_state_dict(tmp_path / f"checkpoint-{step}"),
                            load_state_dict(root / f"checkpoint-{step}"))
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert len(list((tmp_path / "soups").iterdir())) == 2


def test_resume_continues_the_schedule_with_identical_soups(tmp_path):
    heldout = heldout_set()
    full = BayesMergeTrainerCallback(budget=4)
    run(tmp_path / "full", full, max_steps=40, eval_dataset=heldout)

    part = tmp_path / "part"
    ckpt = part / "checkpoint-20"
    run(part, BayesMergeTrainerCallback(budget=4), max_steps=20, eval_dataset=heldout)
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"][NAME]
    assert saved["args"]["budget"] == 4 and saved["attributes"]["unsaved_args"] == []
    merge_state = saved["attributes"]["merge_state"]
    assert merge_state["previous_step"] == 20
    assert [h["step"] for h in merge_state["history"]] == [20]
    resumed = BayesMergeTrainerCallback(budget=4)
    run(part, resumed, max_steps=40, eval_dataset=heldout, resume=ckpt,
        model=from_pretrained(ckpt))
    assert resumed.history == full.history  # same λ, values, steps: continued, not restarted
    for step in (20, 30, 40):
        assert_same_tensors(load_state_dict(tmp_path / "full" / "soups" / f"soup-{step}"),
                            load_state_dict(part / "soups" / f"soup-{step}"))

    # the Trainer's own restore path rebuilds the callback from its JSON arguments
    tr = run(tmp_path / "flag", BayesMergeTrainerCallback(budget=4), max_steps=40,
             eval_dataset=heldout, resume=ckpt, model=from_pretrained(ckpt),
             restore_callback_states_from_checkpoint=True)
    (rebuilt,) = [c for c in tr.callback_handler.callbacks
                  if isinstance(c, BayesMergeTrainerCallback)]
    assert rebuilt.history == full.history


def test_trainer_rebuilding_the_callback_names_the_lost_dataloader(tmp_path):
    run(tmp_path, BayesMergeTrainerCallback(heldout=heldout_loader(), budget=3), max_steps=10)
    ckpt = tmp_path / "checkpoint-10"
    with pytest.raises(ValueError, match=r"restore_callback_states_from_checkpoint=True made the "
                                         r"Trainer rebuild BayesMergeTrainerCallback .* cannot "
                                         r"hold heldout; leave restore_callback_states_from_"
                                         r"checkpoint=False \(the default\)"):
        run(tmp_path, BayesMergeTrainerCallback(heldout=heldout_loader(), budget=3),
            max_steps=20, resume=ckpt, restore_callback_states_from_checkpoint=True)


def test_resume_from_another_step_restarts_merging_with_a_warning(tmp_path):
    run(tmp_path / "a", BayesMergeTrainerCallback(heldout=heldout_set(), budget=3), max_steps=20)
    ckpt = tmp_path / "a" / "checkpoint-20"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["stateful_callbacks"][NAME]["attributes"]["merge_state"]["previous_step"] = 10
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    cb = BayesMergeTrainerCallback(heldout=heldout_set(), budget=3)
    with pytest.warns(UserWarning, match=r"training starts at step 20 but the saved merge state "
                                         r"refers to step 10; merging restarts with the next "
                                         r"checkpoint save"):
        run(tmp_path / "a", cb, max_steps=40, resume=ckpt, model=from_pretrained(ckpt))
    assert [(h["previous_step"], h["step"]) for h in cb.history] == [(10, 20), (30, 40)]
    # an instance used again for a new run starts a new schedule
    run(tmp_path / "b", cb, max_steps=10)
    assert cb.history == [] and cb.merge_state["previous_step"] == 10


def test_failed_round_warns_and_training_goes_on(tmp_path, plain_run):
    calls = []

    def flaky(module, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("evaluation exploded")
        return torch.tensor(1.0), torch.tensor(1.0)

    cb = BayesMergeTrainerCallback(heldout=heldout_set(), metric=flaky, higher_is_better=False,
                                   budget=3, max_batches=1)
    with pytest.warns(UserWarning, match=r"merge round at step 20 failed and was skipped; "
                                         r"training continues unchanged. RuntimeError: "
                                         r"evaluation exploded"):
        a = run(tmp_path / "a", cb, dropout=0.1)
    assert_same_tensors(a.model.state_dict(), plain_run[1].model.state_dict())  # restored
    assert [h["step"] for h in cb.history] == [30]  # the next round ran normally
    assert sorted(p.name for p in (tmp_path / "a" / "soups").iterdir()) == ["soup-30"]

    calls.clear()
    raising = BayesMergeTrainerCallback(heldout=heldout_set(), metric=flaky,
                                        higher_is_better=False, budget=3, max_batches=1,
                                        on_error="raise")
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        run(tmp_path / "c", raising)


def test_nan_metric_writes_nothing(tmp_path):
    def nan_metric(module, batch):
        return torch.tensor(float("nan")), torch.tensor(1.0)

    cb = BayesMergeTrainerCallback(heldout=heldout_set(), metric=nan_metric,
                                   higher_is_better=False)
    with pytest.warns(UserWarning, match=r"held-out metric is nan at lambda=0.5; no soup was "
                                         r"written"):
        run(tmp_path, cb, max_steps=20)
    assert not (tmp_path / "soups").exists() and cb.history == []


# ------------------------------------------------------------------------------ held-out data
def test_heldout_dataset_dataloader_or_eval_dataset(tmp_path):
    from_dataset = BayesMergeTrainerCallback(heldout=heldout_set(), budget=3)
    run(tmp_path / "ds", from_dataset, max_steps=20)
    from_loader = BayesMergeTrainerCallback(heldout=heldout_loader(), budget=3)
    run(tmp_path / "dl", from_loader, max_steps=20)
    from_eval = BayesMergeTrainerCallback(budget=3, soup_dir=tmp_path / "my_soups")
    run(tmp_path / "ev", from_eval, max_steps=20, eval_dataset={"shakespeare": heldout_set()})
    assert len(from_dataset.history) == 1
    assert from_dataset.history == from_loader.history == from_eval.history
    assert (tmp_path / "my_soups" / "soup-20" / "merge.json").exists()
    # the value is the whole held-out set's mean token loss at checkpoint-20
    full = HeldoutEvaluator(heldout_loader(), resolve_metric("loss"))(
        from_pretrained(tmp_path / "ds" / "checkpoint-20"))
    assert from_dataset.history[0]["value_latest"] == pytest.approx(full, rel=1e-12)

    with pytest.raises(ValueError, match=r"BayesMergeTrainerCallback needs held-out data: pass "
                                         r"heldout=<Dataset or DataLoader>, or give the Trainer "
                                         r"an eval_dataset"):
        run(tmp_path / "none", BayesMergeTrainerCallback(), max_steps=20)
    assert not (tmp_path / "none" / "checkpoint-10").exists()  # refused before any training


# ------------------------------------------------------------------------------ training setups
def test_gradient_accumulation(tmp_path):
    cb = BayesMergeTrainerCallback(heldout=heldout_set(), budget=3)
    run(tmp_path, cb, max_steps=20, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert [(h["previous_step"], h["step"]) for h in cb.history] == [(10, 20)]
    lam = json.loads((tmp_path / "soups" / "soup-20" / "merge.json").read_text())["lambda"]
    assert_is_lerp(tmp_path / "soups" / "soup-20", tmp_path / "checkpoint-10",
                   tmp_path / "checkpoint-20", lam)


def test_mixed_precision_evaluates_as_training_computes(tmp_path):
    """bf16 on CPU: held-out evaluation under the Trainer's bf16 autocast. fp16 on CPU: accelerate
    trains in fp32, and evaluation is fp32 too."""
    cb = BayesMergeTrainerCallback(heldout=heldout_set(), budget=3)
    run(tmp_path / "bf16", cb, max_steps=20, bf16=True)
    model = from_pretrained(tmp_path / "bf16" / "checkpoint-20")
    fp32 = HeldoutEvaluator(heldout_loader(), resolve_metric("loss"))(model)
    bf16 = HeldoutEvaluator(heldout_loader(), resolve_metric("loss"),
                            context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))(model)
    assert abs(bf16 - fp32) > 1e-5  # the precisions are distinguishable on this model
    assert cb.history[0]["value_latest"] == pytest.approx(bf16, rel=1e-9)

    cb = BayesMergeTrainerCallback(heldout=heldout_set(), budget=3)
    run(tmp_path / "fp16", cb, max_steps=20, fp16=True)
    model = from_pretrained(tmp_path / "fp16" / "checkpoint-20")
    fp32 = HeldoutEvaluator(heldout_loader(), resolve_metric("loss"))(model)
    assert cb.history[0]["value_latest"] == pytest.approx(fp32, rel=1e-12)


def test_compiled_model_soups_have_plain_keys(tmp_path):
    """A model compiled before it is given to the Trainer: its checkpoints carry ``_orig_mod.``
    keys (the Trainer saves the wrapper's state_dict); soups are written from the inner module."""
    compiled = torch.compile(tiny_model(), backend="eager")
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    cb = BayesMergeTrainerCallback(heldout=heldout_set(), budget=3)
    run(tmp_path, cb, max_steps=30, model=compiled, remove_unused_columns=False)
    lam = cb.history[-1]["lambda"]
    soup = from_pretrained(tmp_path / "soups" / "soup-30").state_dict()
    prefix = "_orig_mod."
    a, b = (load_state_dict(tmp_path / f"checkpoint-{s}") for s in (20, 30))
    assert all(k.startswith(prefix) for k in b)
    assert sorted(soup) == sorted(k[len(prefix):] for k in b)
    for k in soup:
        assert torch.equal(soup[k], torch.lerp(a[prefix + k], b[prefix + k], lam)), k


# ------------------------------------------------------------------------------ trackers
def test_wandb_offline_and_tensorboard_get_the_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from wandb_records import history_rows

    wandb.teardown()  # W&B reads WANDB_* once per process setup: start from a fresh one
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "merge-test")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    cb = BayesMergeTrainerCallback(heldout=heldout_set(), budget=3)
    run(tmp_path / "out", cb, report_to=["wandb", "tensorboard"])
    wandb.finish()
    rows = history_rows(tmp_path)
    scalars = [r for r in rows if "train/merge/lambda" in r]
    assert [r["train/global_step"] for r in scalars] == [20, 30]
    assert [r["train/merge/lambda"] for r in scalars] == [h["lambda"] for h in cb.history]
    assert [r["train/merge/soup"] for r in scalars] == [h["value_soup"] for h in cb.history]
    curves = [r for r in rows if "merge/curve_table" in r]
    assert [r["train/global_step"] for r in curves] == [20, 30]
    assert curves[-1]["merge/curve_table"]["_type"] == "table-file"
    assert curves[-1]["merge/curve_table"]["nrows"] == 3
    assert any("merge/lambda_history_table" in r for r in rows)

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    for tag in ("train/merge/lambda", "train/merge/soup", "train/merge/latest",
                "train/merge/previous"):
        assert [e.step for e in acc.Scalars(tag)] == [20, 30]
    assert [e.value for e in acc.Scalars("train/merge/lambda")] == pytest.approx(
        [h["lambda"] for h in cb.history])


# ------------------------------------------------------------------------------ two processes
def test_ddp_two_processes_reduce_and_agree(tmp_path):
    dist_vars = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE),
                                           env.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(HERE / "hf_ddp_script.py"), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["history"] == ranks[1]["history"]  # one λ on every rank
    history = ranks[0]["history"]
    assert [h["step"] for h in history] == [20, 30]
    for r in ranks:  # Trainer.log ran on every rank, at the checkpoint's step
        assert [(m["step"], m["merge/lambda"]) for m in r["merge_logs"]] == [
            (h["step"], h["lambda"]) for h in history]
    # 3 held-out batches: rank 0 evaluated 2, rank 1 one, and the reduced count is all 3
    assert ranks[0]["evaluated_batches"] == ranks[1]["evaluated_batches"] == 3
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "soups").iterdir()) == ["soup-20", "soup-30"]
    # the reduced value equals a one-process evaluation of the checkpoint on the whole set
    full = HeldoutEvaluator(heldout_loader(), resolve_metric("loss"))(
        from_pretrained(out / "checkpoint-30"))
    assert history[-1]["value_latest"] == pytest.approx(full, rel=1e-9)
    info = json.loads((out / "soups" / "soup-30" / "merge.json").read_text())
    assert info["lambda"] == history[-1]["lambda"] < 1.0
    assert_is_lerp(out / "soups" / "soup-30", out / "checkpoint-20", out / "checkpoint-30",
                   info["lambda"])


def test_warm_start_and_stop_tol_reach_the_round():
    from merge_callback import BayesMergeTrainerCallback

    cb = BayesMergeTrainerCallback(warm_start=True, stop_tol=1e-3)
    assert cb.config.warm_start and cb.config.stop_tol == 1e-3
    assert cb.state()["args"]["warm_start"] is True
    with pytest.raises(ValueError, match=r"stop_tol needs strategy='bayes', got strategy='grid'"):
        BayesMergeTrainerCallback(stop_tol=1e-3, strategy="grid")
