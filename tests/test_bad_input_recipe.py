"""Bad input to the recipe ends as ``merge-callback-recipe: error: ...`` with exit code 2, before
anything is written: each case checks the message and that no file was created or changed."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")
pytest.importorskip("matplotlib")

from merge_callback import recipe  # noqa: E402

PREFIX = r"^merge-callback-recipe: error: "


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, and for files size, mtime and a digest of the bytes."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = ("dir",)
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            digest = hashlib.sha256(Path(p).read_bytes()).hexdigest() if os.path.isfile(p) else ""
            out[os.path.relpath(p, root)] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


def _tiny_model_folder(path: Path, max_len: int = 32) -> Path:
    from merge_callback.data import tiny_gpt_neox

    tiny_gpt_neox(300, seed=0, hidden_size=16, num_layers=1, num_heads=2,
                  max_len=max_len).save_pretrained(path)
    return path


def _setup(tmp_path: Path, case: str) -> list[str]:
    """Write what the case needs into tmp_path and return the command-line arguments."""
    out = ["--output_dir", str(tmp_path / "out")]
    cfg = tmp_path / "bad.yaml"
    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 20)
    yaml_cases = {
        "yaml_syntax": "model: scratch\nlr: [0.001\nmax_steps: 10\n",
        "yaml_indent": "model: scratch\n  lr: 0.001\n",
        "yaml_tab": "model: scratch\n\tlr: 0.001\n",
        "duplicate_key": "lr: 1.0e-3\nmax_steps: 100\nlr: 2.0e-3\n",
        "unknown_key": "model: scratch\nlearning_rate: 0.001\n",
        "obsolete_resume_key": "resume: true\n",
        "not_a_mapping": "- model\n- lr\n",
        "int_gets_float": "max_steps: 10.5\n",
        "int_gets_exponent": "max_steps: 1e3\n",
        "float_gets_word": "batch_size: 4\nlr: fast\n",
        "str_gets_list": "model: [a, b]\n",
        "optional_str_gets_int": "model: EleutherAI/pythia-70m\nrevision: 142000\n",
        "bool_gets_int": "progress_bar: 1\n",
        "optional_int_gets_word": "keep_checkpoints: two\n",
        "optional_int_gets_zero": "keep_checkpoints: 0\n",
        "optional_float_gets_word": "gradient_clip_val: large\n",
        "choice_gets_other": "schedule: linear\n",
        "nan": "lr: .nan\n",
        "infinite": "lr: 1e400\n",
        "alpha_out_of_range": "merge_alpha: 1.0\n",
        "negative_steps": "max_steps: -5\n",
        "cross_field": "max_steps: 100\ncheckpoint_every: 80\n",
        "non_string_key": "1: model\n",
    }
    if case in yaml_cases:
        cfg.write_text(yaml_cases[case])
        return ["--config", str(cfg), *out]
    if case == "not_utf8":
        cfg.write_bytes(b"model: scratch\nrevision: \xff\xfe\n")
        return ["--config", str(cfg), *out]
    if case == "config_missing":
        return ["--config", str(tmp_path / "nope.yaml"), *out]
    if case == "config_is_folder":
        (tmp_path / "folder.yaml").mkdir()
        return ["--config", str(tmp_path / "folder.yaml"), *out]
    if case == "model_missing":
        return ["--model", str(tmp_path / "no" / "such-model"), *out]
    if case == "model_is_file":
        (tmp_path / "model.safetensors").write_bytes(b"x")
        return ["--model", str(tmp_path / "model.safetensors"), *out]
    if case == "model_without_config":
        (tmp_path / "empty-model").mkdir()
        return ["--model", str(tmp_path / "empty-model"), *out]
    if case == "tokenizer_missing":
        return ["--model", "EleutherAI/pythia-70m", "--tokenizer", "./no/such/tokenizer", *out]
    if case == "train_data_missing":
        return ["--train_data", str(tmp_path / "missing.txt"), *out]
    if case == "output_dir_below_file":
        (tmp_path / "afile").write_text("not a folder")
        return ["--output_dir", str(tmp_path / "afile" / "run")]
    if case == "output_dir_is_file":
        (tmp_path / "afile").write_text("not a folder")
        return ["--output_dir", str(tmp_path / "afile")]
    if case == "output_dir_unwritable":
        if os.geteuid() == 0:  # root writes through permissions; /sys takes no new entries
            if not Path("/sys").is_dir():
                pytest.skip("no folder here refuses root's writes")
            return ["--output_dir", "/sys/merge-callback-test/run"]
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return ["--output_dir", str(locked / "run")]
    if case == "hf_cache_below_file":
        (tmp_path / "afile").write_text("not a folder")
        return ["--hf_cache_dir", str(tmp_path / "afile" / "cache"), *out]
    if case == "block_size_over_context":
        model = _tiny_model_folder(tmp_path / "tiny-model", max_len=32)
        from merge_callback.data import train_tokenizer

        train_tokenizer([text.read_text()], vocab_size=300).save_pretrained(model)
        return ["--model", str(model), "--train_data", str(text), "--heldout_data", "null",
                "--ood_data", "null", "--block_size", "64", "--logger", "none", *out]
    if case == "too_little_text":
        return ["--train_data", str(text), "--heldout_data", "null", "--ood_data", "null",
                "--scratch_vocab_size", "300", "--batch_size", "10000", "--logger", "none", *out]
    raise AssertionError(case)


CASES = {
    "yaml_syntax": r"config .*bad.yaml, line 3, column 10: invalid YAML: expected ',' or '\]', "
                   r"but got ':' \(while parsing a flow sequence that starts on line 2\)$",
    "yaml_indent": r"config .*bad.yaml, line 2, column \d+: invalid YAML: mapping values are not "
                   r"allowed here",
    "yaml_tab": r"config .*bad.yaml, line 2, column 1: invalid YAML: found character '\\t' that "
                r"cannot start any token \(while scanning for the next token\)$",
    "duplicate_key": r"config .*bad.yaml, line 3, column 1: invalid YAML: duplicate key 'lr' on "
                     r"lines 1 and 3 \(a key may appear once\)",
    "unknown_key": r"unknown key 'learning_rate' in line 2 of .*bad.yaml; valid keys: model, "
                   r"revision, .*, lr, ",
    "obsolete_resume_key": r"unknown key 'resume' in line 1 of .*bad.yaml; valid keys: .* \(resume "
                           r"is no longer a config key: pass --resume on the command line",
    "not_a_mapping": r".*bad.yaml must hold a YAML mapping of keys to values, got list",
    "int_gets_float": r".*bad.yaml, line 1: max_steps must be an integer, got 10.5$",
    "int_gets_exponent": r".*bad.yaml, line 1: max_steps must be an integer, got '1e3'$",
    "float_gets_word": r".*bad.yaml, line 2: lr must be a number, got 'fast'$",
    "str_gets_list": r".*bad.yaml, line 1: model must be a string, got \['a', 'b'\]$",
    "optional_str_gets_int": r".*bad.yaml, line 2: revision must be a string or null, got 142000$",
    "bool_gets_int": r".*bad.yaml, line 1: progress_bar must be true or false, got 1$",
    "optional_int_gets_word": r".*bad.yaml, line 1: keep_checkpoints must be an integer or null, "
                              r"got 'two'$",
    "optional_int_gets_zero": r".*bad.yaml, line 1: keep_checkpoints must be null or an integer "
                              r">= 1, got 0$",
    "optional_float_gets_word": r".*bad.yaml, line 1: gradient_clip_val must be a number or null, "
                                r"got 'large'$",
    "choice_gets_other": r".*bad.yaml, line 1: schedule must be one of 'constant', 'wsd', "
                         r"'cosine', got 'linear'$",
    "nan": r".*bad.yaml, line 1: lr must be a finite number > 0, got nan$",
    "infinite": r".*bad.yaml, line 1: lr must be a finite number > 0, got inf$",
    "alpha_out_of_range": r".*bad.yaml, line 1: merge_alpha must be a number in \(0, 1\), got 1.0$",
    "negative_steps": r".*bad.yaml, line 1: max_steps must be an integer >= 1, got -5$",
    "cross_field": r".*bad.yaml, line 2: checkpoint_every must be <= max_steps // 2 \(50\) so that "
                   r"at least one merge round runs, got 80$",
    "non_string_key": r"unknown key 1 in line 1 of .*bad.yaml; valid keys: model, ",
    "not_utf8": r"config .*bad.yaml is not UTF-8 text \(byte 25\); expected a YAML file",
    "config_missing": r"config file not found: .*nope.yaml; expected a YAML file",
    "config_is_folder": r"config .*folder.yaml is a folder; expected a YAML file",
    "model_missing": r"model: .*/no/such-model does not exist; expected a local Hugging Face "
                     r"folder \(written by save_pretrained\), a hub name such as "
                     r"EleutherAI/pythia-70m, or 'scratch'$",
    "model_is_file": r"model: .*model.safetensors is a file; expected a local Hugging Face folder",
    "model_without_config": r"model: .*empty-model has no config.json; expected a local Hugging "
                            r"Face folder",
    "tokenizer_missing": r"tokenizer: ./no/such/tokenizer does not exist; expected a local "
                         r"Hugging Face folder \(written by save_pretrained\), a hub name such as "
                         r"EleutherAI/pythia-70m$",
    "train_data_missing": r"train_data: .*missing.txt does not exist; expected a .txt/.jsonl file "
                          r"or a folder of them",
    "output_dir_below_file": r"output_dir .*afile/run cannot be created: .*afile is a file, not a "
                             r"folder; choose a folder path$",
    "output_dir_is_file": r"output_dir .*afile exists and is not a folder; choose a folder path$",
    "output_dir_unwritable": (r"output_dir .*/run is not writable: no permission to create files "
                              r"in its parent .*locked; choose a folder you can write to$"
                              if os.geteuid() != 0 else
                              r"output_dir /sys/merge-callback-test/run is not writable: /sys "
                              r"refuses new entries \(Operation not permitted\); choose a folder "
                              r"you can write to$"),
    "hf_cache_below_file": r"hf_cache_dir .*afile/cache is below a file \(.*afile\); expected a "
                           r"folder$",
    "block_size_over_context": r"block_size must be <= the context length of .*tiny-model \(32\), "
                               r"got 64$",
    "too_little_text": r"train_data gives \d+ blocks of 64 tokens, fewer than batch_size=10000",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(case, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _setup(tmp_path, case)
    before = _snapshot(tmp_path)
    capsys.readouterr()  # what the setup printed
    code = recipe.main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, captured
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert re.search(PREFIX + CASES[case], err), err
    assert _snapshot(tmp_path) == before  # nothing created, changed or removed
    assert not (tmp_path / "out").exists()


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        recipe.main(["--resume", "--overwrite", "--output_dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert re.search(r"merge-callback-recipe: error: argument --overwrite: not allowed with "
                     r"argument --resume", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"--resume and --overwrite exclude each other"):
        recipe.run(recipe.RecipeConfig(output_dir=str(tmp_path / "out")), resume=True,
                   overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_the_console_command_exits_2_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 100\nlr: 0.001\nmax_steps: 200\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "merge_callback.recipe", "--config", str(bad),
                           "--output_dir", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"merge-callback-recipe: error: config {bad}, line 3, column 1: invalid "
                           "YAML: duplicate key 'max_steps' on lines 1 and 3 (a key may appear "
                           "once)\n")
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
