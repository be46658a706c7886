"""The continued-pretraining recipe: configs, the hub loading path, an end-to-end run, the CLI."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("yaml")
pytest.importorskip("matplotlib")

from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from merge_callback import recipe  # noqa: E402
from merge_callback.data import BlockDataset, tiny_gpt_neox  # noqa: E402
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric  # noqa: E402
from merge_callback.io import load_state_dict  # noqa: E402
from merge_callback.lm import CausalLMModule  # noqa: E402
from merge_callback.recipe import RecipeConfig, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
LAUNCHER = ROOT / "recipes" / "pythia_continued_pretraining.py"


# ----------------------------------------------------------------------------- configs

def test_the_expected_configs_exist():
    assert {"tiny-offline.yaml", "pythia-70m.yaml", "pythia-410m.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_every_key_is_commented(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    config = load_config(path)
    assert isinstance(config, RecipeConfig)
    names = [f.name for f in dataclasses.fields(RecipeConfig)]
    assert list(raw) == [n for n in names if n in raw]  # in the order of the dataclass
    if path.name == "tiny-offline.yaml":
        assert list(raw) == names  # the demo spells out every key
    else:  # hub configs: every key but the scratch model's
        assert set(names) - set(raw) == {n for n in names if n.startswith("scratch_")}
    for key, value in raw.items():  # every key reached the config with its YAML value
        assert getattr(config, key) == value, key
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^([A-Za-z_]\w*):", line)
        if m:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") or " #" in line, f"{path.name}: {m.group(1)} uncommented"


def test_dumped_config_round_trips(tmp_path):
    config = load_config(ROOT / "recipes" / "configs" / "pythia-410m.yaml")
    out = tmp_path / "config.yaml"
    out.write_text(recipe.dump_config(config))
    assert load_config(out) == config


def test_hub_configs_name_pythia_and_a_revision():
    c70 = load_config(ROOT / "recipes" / "configs" / "pythia-70m.yaml")
    c410 = load_config(ROOT / "recipes" / "configs" / "pythia-410m.yaml")
    assert (c70.model, c70.revision) == ("EleutherAI/pythia-70m", "step142000")
    assert (c410.model, c410.revision) == ("EleutherAI/pythia-410m", "step142000")
    assert c70.precision == c410.precision == "auto" and c410.schedule == "wsd"


def test_tiny_offline_yaml_is_the_embedded_default():
    assert load_config(ROOT / "recipes" / "configs" / "tiny-offline.yaml") == RecipeConfig()
    assert load_config(None) == RecipeConfig()


def test_unknown_key_names_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: scratch\nlearning_rate: 0.001\n")
    with pytest.raises(ValueError, match=r"unknown key 'learning_rate' in .*bad.yaml; valid keys: "
                                         r"model, revision, tokenizer, .*, lr, "):
        load_config(bad)
    with pytest.raises(ValueError, match=r"unknown key 'steps' in the overrides; valid keys: mod"):
        load_config(None, {"steps": "10"})
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n")
    with pytest.raises(ValueError, match=r"must hold a YAML mapping of keys to values, got list"):
        load_config(listed)
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("overrides, match", [
    ({"schedule": "linear"}, r"schedule must be one of 'constant', 'wsd', 'cosine', got 'linear'"),
    ({"precision": "fp8"}, r"precision must be one of 'auto', '32-true', 'bf16-mixed', '16-mixed', "
                           r"got 'fp8'"),
    ({"merge_strategy": "optuna"}, r"merge_strategy must be one of 'bayes', 'grid', 'random', "
                                   r"'greedy', got 'optuna'"),
    ({"merge_metric": "f1"}, r"merge_metric must be one of 'loss', 'perplexity', 'accuracy'"),
    ({"logger": "tensorboard"}, r"logger must be one of 'auto', 'csv', 'wandb', 'none'"),
    ({"merge_alpha": "1.5"}, r"merge_alpha must be a number in \(0, 1\), got 1.5"),
    ({"merge_budget": "2"}, r"merge_budget must be an integer >= 3, got 2"),
    ({"batch_size": "0"}, r"batch_size must be an integer >= 1, got 0"),
    ({"lr": "fast"}, r"lr must be a number, got 'fast'"),
    ({"lr": "-1e-3"}, r"lr must be a finite number > 0, got -0.001"),
    ({"max_steps": "10.5"}, r"max_steps must be an integer, got '10.5'"),
    ({"progress_bar": "maybe"}, r"progress_bar must be true or false, got 'maybe'"),
    ({"max_train_chars": "0"}, r"max_train_chars must be null or an integer >= 1, got 0"),
    ({"checkpoint_every": "400", "max_steps": "600"},
     r"checkpoint_every must be <= max_steps // 2 \(300\) so that at least one merge round "
     r"runs, got 400"),
    ({"schedule": "wsd"}, r"decay_steps must be >= 1 for schedule 'wsd', got 0"),
    ({"schedule": "wsd", "decay_steps": "700", "max_steps": "600"},
     r"decay_steps must be <= max_steps - warmup_steps \(600\) for schedule 'wsd', got 700"),
    ({"revision": "step1"}, r"revision must be null when model is 'scratch', got 'step1'"),
    ({"scratch_hidden_size": "100", "scratch_num_heads": "3"},
     r"scratch_hidden_size \(100\) must be divisible by scratch_num_heads \(3\)"),
    ({"scratch_vocab_size": "100"}, r"scratch_vocab_size must be an integer >= 257"),
    ({"train_data": "builtin:wikipedia"}, r"train_data: unknown built-in text 'builtin:wikipedia'; "
                                          r"built-ins are builtin:shakespeare-train, "),
    ({"ood_data": "/no/such/corpus.txt"}, r"ood_data: /no/such/corpus.txt does not exist; expected "
                                          r"a .txt/.jsonl file or a folder"),
    ({"train_data": "hf:"}, r"train_data must look like hf:NAME\[:CONFIG\]\[@SPLIT\], got 'hf:'"),
    ({"heldout_data": "null", "heldout_fraction": "0"},
     r"heldout_fraction must be > 0 when heldout_data is null"),
])
def test_bad_values_are_rejected_naming_key_and_allowed(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_yaml_values_are_type_checked(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("max_steps: 10.5\n")
    with pytest.raises(ValueError, match=r"max_steps must be an integer, got 10.5"):
        load_config(p)
    p.write_text("revision: 142000\nmodel: EleutherAI/pythia-70m\n")
    with pytest.raises(ValueError, match=r"revision must be a string or null, got 142000"):
        load_config(p)
    p.write_text("lr: 1e-3\nbatch_size: 4\n")  # YAML reads 1e-3 as a string; it is a float here
    c = load_config(p)
    assert c.lr == 1e-3 and type(c.lr) is float and c.batch_size == 4
    with pytest.raises(ValueError, match=r"devices must be an integer, got True"):
        RecipeConfig(devices=True)


def test_overrides_are_typed_by_the_fields():
    c = load_config(ROOT / "recipes" / "configs" / "pythia-70m.yaml", {
        "lr": "3e-4", "max_steps": "2000", "max_train_chars": "1000", "heldout_data": "null",
        "progress_bar": "false", "gradient_clip_val": "none", "revision": "step143000",
        "merge_alpha": 0.25, "output_dir": "somewhere"})
    assert (c.lr, c.max_steps, c.max_train_chars) == (3e-4, 2000, 1000)
    assert type(c.lr) is float and type(c.max_steps) is int
    assert c.heldout_data is None and c.gradient_clip_val is None and c.progress_bar is False
    assert (c.revision, c.merge_alpha, c.output_dir) == ("step143000", 0.25, "somewhere")
    assert c.model == "EleutherAI/pythia-70m"  # untouched keys keep the file's values


# ----------------------------------------------------------------------------- hub loading path

def _fake_hub_cache(root: Path, repo: str, revisions: dict, tokenizer) -> Path:
    """A Hugging Face cache holding ``repo`` at several named revisions (offline resolution)."""
    folder = root / ("models--" + repo.replace("/", "--"))
    for i, (rev, model) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        snap = folder / "snapshots" / commit
        model.half().save_pretrained(snap)  # stored in fp16, as Pythia's are
        tokenizer.save_pretrained(snap)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / rev).write_text(commit)
    return root


def _first_weight(model):
    return model.get_input_embeddings().weight.detach()


def test_from_pretrained_honours_the_revision_offline(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    models = {f"step{i}": tiny_gpt_neox(300, seed=i, hidden_size=32, num_layers=2, num_heads=4,
                                        max_len=32) for i in (1, 2)}
    expected = {rev: _first_weight(m).half().float() for rev, m in models.items()}
    cache = _fake_hub_cache(tmp_path / "hub", "org/tiny-pythia", models, tiny_tokenizer)
    for rev in ("step1", "step2"):
        model, tok = recipe.load_model_and_tokenizer("org/tiny-pythia", revision=rev,
                                                     cache_dir=cache)
        assert model.dtype == torch.float32  # training weights in fp32 although stored in fp16
        assert torch.equal(_first_weight(model), expected[rev])
        assert tok.eos_token_id == 0 and tok.pad_token_id == 0
    with pytest.raises(OSError):
        recipe.load_model_and_tokenizer("org/tiny-pythia", revision="step3", cache_dir=cache)

    # a local folder: revision=None loads it; a revision is passed on and transformers ignores it
    folder = next((cache / "models--org--tiny-pythia" / "snapshots").iterdir())
    local, _ = recipe.load_model_and_tokenizer(folder, revision=None)
    with_rev, _ = recipe.load_model_and_tokenizer(folder, revision="step2")
    direct = AutoModelForCausalLM.from_pretrained(str(folder), revision="step2")
    assert torch.equal(_first_weight(with_rev), _first_weight(local))
    assert torch.equal(_first_weight(with_rev), _first_weight(direct).float())


# ----------------------------------------------------------------------------- data

def test_load_texts_reads_files_folders_and_fields(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third"}\n')
    assert recipe.load_texts(str(tmp_path)) == ["first document", "second", "third"]
    assert recipe.load_texts(str(tmp_path), max_chars=8) == ["first do"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.jsonl").write_text('{"content": "x y"}\n')
    (other / "d.txt").write_text("plain")
    assert recipe.load_texts(str(other), text_field="content") == ["x y", "plain"]
    with pytest.raises(ValueError, match=r"b.jsonl:1 has no string field 'content'"):
        recipe.load_texts(str(tmp_path), text_field="content")
    assert len(recipe.load_texts("builtin:python-stdlib", max_chars=500)[0]) == 500


def test_heldout_split_is_deterministic_and_disjoint(tmp_path, tiny_tokenizer):
    from conftest import TINY_TEXT

    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT * 40)
    config = load_config(None, {"train_data": str(text), "heldout_data": "null",
                                "heldout_fraction": "0.2", "ood_data": "null", "block_size": "8",
                                "batch_size": "2"})
    a = recipe.prepare_data(config, tiny_tokenizer)
    b = recipe.prepare_data(config, tiny_tokenizer)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout) and a.ood is None
    n = a.train.shape[0] + a.heldout.shape[0]
    assert a.heldout.shape[0] == round(0.2 * n)
    other = recipe.prepare_data(dataclasses.replace(config, split_seed=1), tiny_tokenizer)
    assert not torch.equal(other.heldout, a.heldout)
    with pytest.raises(ValueError, match=r"fewer than batch_size=100000"):
        recipe.prepare_data(dataclasses.replace(config, batch_size=100000), tiny_tokenizer)


# ----------------------------------------------------------------------------- OOD callback

def test_ood_callback_keeps_training_bitwise_and_scores_the_written_soup(tmp_path):
    import lightning as L

    from lightning_helpers import loaders, module, trainer
    from merge_callback import BayesMergeCallback

    def fit(root, *callbacks):
        L.seed_everything(0, verbose=False)
        train, _ = loaders(shuffle=True)
        m = module(dropout=0.1)
        trainer(root, *callbacks, max_steps=30).fit(m, train)
        return m

    _, heldout = loaders()
    ood = DataLoader(heldout.dataset, batch_size=4)
    merge = BayesMergeCallback(heldout=heldout, budget=3, soup_dir=tmp_path / "soups")
    cb = recipe.OutOfDomainCallback(merge, ood, tmp_path / "soups", max_batches=2)
    with_cb = fit(tmp_path / "a", merge, cb)
    without = fit(tmp_path / "b")
    for k, v in with_cb.state_dict().items():
        assert torch.equal(v, without.state_dict()[k]), k
    assert sorted(cb.records) == [h["step"] for h in merge.history] == [20, 30]
    ood_eval = HeldoutEvaluator(ood, resolve_metric("loss"), max_batches=2)
    soup = module()
    soup.load_state_dict(load_file(str(tmp_path / "soups" / "soup-step=30.safetensors")))
    assert ood_eval(soup) == pytest.approx(cb.records[30]["soup"], rel=1e-9)
    assert ood_eval(with_cb) == pytest.approx(cb.records[30]["latest"], rel=1e-9)
    assert cb.records[30]["soup"] != cb.records[30]["latest"]
    # the records travel in the checkpoint of the round's step
    state = torch.load(tmp_path / "a" / "ckpt" / "epoch=2-step=30.ckpt",
                       weights_only=True)["callbacks"][cb.state_key]
    fresh = recipe.OutOfDomainCallback(merge, ood, tmp_path / "soups")
    fresh.load_state_dict(state)
    assert fresh.records == cb.records
    with pytest.raises(ValueError, match=r"max_batches must be a positive integer or None, got 0"):
        recipe.OutOfDomainCallback(merge, ood, tmp_path, max_batches=0)


# ----------------------------------------------------------------------------- end to end

def _tiny_overrides(tmp_path) -> dict[str, str]:
    from conftest import TINY_TEXT

    from merge_callback.data import stdlib_text

    train = tmp_path / "corpus.txt"
    train.write_text(stdlib_text(120_000))
    ood = tmp_path / "ood.txt"
    ood.write_text(TINY_TEXT * 30)
    return {
        "train_data": str(train), "heldout_data": "null", "heldout_fraction": "0.1",
        "ood_data": str(ood), "scratch_vocab_size": "300", "scratch_hidden_size": "32",
        "scratch_num_layers": "2", "scratch_steps": "20", "scratch_warmup_steps": "5",
        "block_size": "32", "batch_size": "8", "max_steps": "40", "checkpoint_every": "10",
        "lr": "3e-3", "merge_budget": "4", "eval_batch_size": "16", "merge_max_batches": "2",
        "ood_max_batches": "2", "num_threads": "1", "logger": "csv", "progress_bar": "false",
        "output_dir": str(tmp_path / "run")}


def _tiny_run_config(tmp_path) -> RecipeConfig:
    # every checkpoint is kept here (the default keeps 2) so that all four can be checked
    return load_config(None, {**_tiny_overrides(tmp_path), "keep_checkpoints": "null"})


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_end_to_end_run_writes_checkpoints_soups_final_soup_and_report(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _tiny_run_config(tmp_path)
    run_dir = recipe.run(config)
    assert run_dir == tmp_path / "run"
    assert json.loads((run_dir / "base_model" / "pretraining.json").read_text())["steps"] == 20
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["step=10.ckpt", "step=20.ckpt", "step=30.ckpt", "step=40.ckpt"]
    soups = sorted(p.name for p in (run_dir / "soups").iterdir())
    assert soups == [f"soup-step={s}.{ext}" for s in (20, 30, 40)
                     for ext in ("json", "safetensors")]

    rounds = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["step"] for r in rounds] == [20, 30, 40]
    for r in rounds:
        side = json.loads((run_dir / "soups" / f"soup-step={r['step']}.json").read_text())
        assert side["lambda"] == r["lambda"] and side["value_soup"] == r["value_soup"]
        assert r["value_soup"] <= r["value_latest"] and {"ood_latest", "ood_soup"} <= set(r)
    last = rounds[-1]

    # final_soup/ is the last soup: lerp of the checkpoints at steps 30 and 40, bitwise
    final = AutoModelForCausalLM.from_pretrained(str(run_dir / "final_soup"))
    a = load_state_dict(run_dir / "checkpoints" / "step=30.ckpt")
    b = load_state_dict(run_dir / "checkpoints" / "step=40.ckpt")
    for k, v in final.state_dict().items():
        assert torch.equal(v, torch.lerp(a["model." + k], b["model." + k], last["lambda"])), k
    assert json.loads((run_dir / "final_soup" / "merge_info.json").read_text())["step"] == 40

    # ... and reproduces the soup's held-out loss through the from_pretrained path
    tok = AutoTokenizer.from_pretrained(str(run_dir / "final_soup"))
    data = recipe.prepare_data(config, tok)
    evaluator = HeldoutEvaluator(DataLoader(BlockDataset(data.heldout), batch_size=16),
                                 resolve_metric("loss"), max_batches=2)
    assert evaluator(CausalLMModule(final)) == pytest.approx(last["value_soup"], rel=1e-6)

    report = (run_dir / "report.md").read_text()
    assert "| step | λ | held-out latest | held-out soup | gain | OOD latest | OOD soup |" in report
    for r in rounds:
        assert f"| {r['step']} | {r['lambda']:.3f} | {r['value_latest']:.4f} |" in report
    for png in ("lambda.png", "heldout.png", "curve.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    assert load_config(run_dir / "config.yaml") == config
    metrics = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert {"train_loss", "merge/lambda", "merge/ood_soup"} <= set(metrics[0].split(","))

    # running again into the finished folder is refused before anything is written; with
    # resume=True nothing is retrained or rewritten (the run is finished), the rounds are kept
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    tree = _snapshot(run_dir)
    with pytest.raises(recipe.RecipeError, match=r"already holds a finished run \(checkpoints up "
                                                 r"to step 40, report.md\); pass --resume"):
        recipe.run(config)
    recipe.run(config, resume=True)
    assert json.loads((run_dir / "rounds.json").read_text())["rounds"] == rounds
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before
    assert _snapshot(run_dir) == tree
    assert (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines() == metrics


def test_run_keeps_the_newest_checkpoints_and_runs_without_ood_or_export(tmp_path):
    config = dataclasses.replace(_tiny_run_config(tmp_path), keep_checkpoints=2, ood_data=None,
                                 export_final_soup=False, logger="none", scratch_steps=5,
                                 max_steps=20, checkpoint_every=5, keep_soups=1)
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    def global_state():
        # (DeepSpeed sets its own logger's level when transformers first imports it)
        return ([logging.getLogger(n).level for n in ("lightning.pytorch", "lightning.fabric")],
                [list(logging.getLogger(n).filters) for n in ("DeepSpeed",)],
                list(warnings.filters), hf_logging.is_progress_bar_enabled())

    try:  # accelerate adds a warning filter when first imported (by transformers, if installed)
        import accelerate.scheduler  # noqa: F401
    except ImportError:
        pass
    before = global_state()
    run_dir = recipe.run(config)
    assert global_state() == before  # the recipe's silencing is scoped to its own calls
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == [
        "step=15.ckpt", "step=20.ckpt"]
    assert sorted(p.name for p in (run_dir / "soups").iterdir()) == [
        "soup-step=10.json", "soup-step=15.json", "soup-step=20.json", "soup-step=20.safetensors"]
    rounds = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["step"] for r in rounds] == [10, 15, 20]
    assert not any("ood_latest" in r for r in rounds)
    assert not (run_dir / "final_soup").exists() and not (run_dir / "logs").exists()
    report = (run_dir / "report.md").read_text()
    assert "| step | λ | held-out latest | held-out soup | gain |\n" in report


# ----------------------------------------------------------------------------- command line

def _cli(args, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "merge_callback.recipe", *args],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)


def test_the_command_twice_into_one_folder_then_resume_and_overwrite(tmp_path, capsys):
    from merge_callback.io import load_state_dict as load_ckpt

    over = {**_tiny_overrides(tmp_path), "max_steps": "20", "progress_bar": "true"}
    run_dir = Path(over["output_dir"])
    args = [a for k, v in over.items() for a in (f"--{k}", v)]
    first = _cli(args, tmp_path)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "[1/2] pretraining the base model from scratch: 20 steps at lr 0.003" in out
    assert "[2/2] continued pretraining: 20 steps at lr 0.003 (constant), a checkpoint and a " \
           "merge round every 10 steps" in out
    assert re.search(r"pretraining: 100%\|.*\| 20/20 steps \[", out)
    assert re.search(r"training: 100%\|.*\| 20/20 steps \[", out)
    assert re.search(r"  step 20: λ = \d\.\d{3}, held-out loss latest \d\.\d{4}, soup \d\.\d{4}; "
                     r"out-of-domain latest", out)
    for noise in ("Epoch 0/", "litlogger", "LeafSpec", "GPU available", "TPU available",
                  "anonymous", "Running in WANDB offline mode", "`Trainer.fit` stopped",
                  "Writing model shards", "Loading weights", "wandb:"):
        assert noise not in out + first.stderr, noise
    held = re.search(r"holds [\d.]+ MB \(([\d,]+) bytes\): checkpoints/ ", out)
    assert held and int(held.group(1).replace(",", "")) == sum(
        p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    assert "1 merge round: λ " in out and f"report: {run_dir / 'report.md'}" in out

    tree = _snapshot(run_dir)
    second = _cli(args, tmp_path)
    assert second.returncode == 2
    assert second.stderr == (
        f"merge-callback-recipe: error: output_dir {run_dir} already holds a finished run "
        "(checkpoints up to step 20, report.md); pass --resume with a larger --max_steps to train "
        "it further, --overwrite to delete its outputs and start again, or choose another "
        "--output_dir\n")
    assert _snapshot(run_dir) == tree

    # --resume with the same config: nothing to do; with another lr: refused; more steps: continues
    argv = args + ["--progress_bar", "false"]
    assert recipe.main(argv + ["--resume"]) == 0
    assert "already holds a finished run (step 20 of 20" in capsys.readouterr().out
    assert recipe.main(argv + ["--resume", "--lr", "1e-3"]) == 2
    assert re.search(r"error: --resume: the config differs from .*config.yaml in lr \(0.003 in the "
                     r"run, 0.001 now\); only max_steps, ", capsys.readouterr().err)
    assert _snapshot(run_dir) == tree
    assert recipe.main(args + ["--resume", "--max_steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "continued pretraining from step 20: 30 steps" in out
    assert re.search(r"training:  67%\|.*\| 20/30 steps", out)  # the bar starts at the resume
    assert re.search(r"training: 100%\|.*\| 30/30 steps", out) and " 0/30 steps" not in out
    rounds = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["step"] for r in rounds] == [20, 30]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step=20.ckpt", "step=30.ckpt"]  # keep_checkpoints: 2 (the default) across the resume
    assert load_ckpt(run_dir / "checkpoints" / "step=20.ckpt").keys() == \
        load_ckpt(run_dir / "checkpoints" / "step=30.ckpt").keys()

    # --overwrite deletes the recipe's outputs only and runs again
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "soups" / "soup-step=999.json").write_text("{}")
    assert recipe.main(argv + ["--overwrite"]) == 0
    assert "--overwrite: deleted config.yaml, base_model, checkpoints, soups" in \
        capsys.readouterr().out
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert not (run_dir / "soups" / "soup-step=999.json").exists()
    assert [r["step"] for r in json.loads((run_dir / "rounds.json").read_text())["rounds"]] == [20]


def test_cli_prints_config_and_reports_bad_values(capsys):
    assert recipe.main(["--config", str(ROOT / "recipes/configs/pythia-70m.yaml"),
                        "--lr", "2e-4", "--output_dir", "elsewhere", "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "\nlr: 0.0002\n" in out and "\noutput_dir: elsewhere\n" in out
    assert "# hub revision" in out
    assert recipe.main(["--schedule", "linear"]) == 2
    assert "error: schedule must be one of 'constant', 'wsd', 'cosine', got 'linear'" in \
        capsys.readouterr().err


def test_launcher_script_help_lists_every_key():
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for f in dataclasses.fields(RecipeConfig):
        assert f"--{f.name}" in proc.stdout
    assert "--config" in proc.stdout and "--print_config" in proc.stdout
