"""``merge-callback`` command line on tiny real checkpoints in every supported format.

Hugging Face folders are written with ``save_pretrained`` (GPT-NeoX: the file calls the output layer
``embed_out``, the module ``lm_head``); Lightning checkpoints come from a real ``Trainer`` with
``ModelCheckpoint``; plain safetensors files are the folders' ``model.safetensors`` or a module's
``state_dict()``.
"""

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from merge_callback import cli  # noqa: E402
from merge_callback.cli import CLIError, MergeSession, config_dict, dump_config, parse_args, run  # noqa: E402
from merge_callback.cli.plots import plot_heatmap, plot_sweep  # noqa: E402
from merge_callback.data import tiny_gpt_neox, tokenize_and_pack, train_tokenizer  # noqa: E402
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric  # noqa: E402
from merge_callback.io import load_state_dict  # noqa: E402
from merge_callback.merge import weighted_average  # noqa: E402

VOCAB = 300
T = 16
TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die: to sleep;\n"
    "No more; and by a sleep to say we end\n"
    "The heart-ache and the thousand natural shocks\n"
    "That flesh is heir to, 'tis a consummation\n"
)
EVAL = ["--block_size", str(T), "--batch_size", "4", "--quiet"]


def _digest(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _neox(seed, hidden=32):
    return tiny_gpt_neox(VOCAB, seed=0, hidden_size=hidden, num_layers=2, num_heads=4, max_len=64)


def _perturb(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Three HF checkpoint folders, held-out files, two Lightning checkpoints."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    tok = train_tokenizer([TEXT] * 4, vocab_size=VOCAB)
    model = _neox(0)
    hf = []
    for i in range(3):
        _perturb(model, i + 1)
        folder = root / f"checkpoint-{(i + 1) * 100}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        hf.append(folder)
    (root / "heldout.txt").write_text(TEXT * 3)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": TEXT}) + "\n" for _ in range(3)))
    blocks = tokenize_and_pack([TEXT * 3], tok, T)
    np.save(root / "tokens.npy", blocks.numpy())
    torch.save(blocks.reshape(-1), root / "tokens.pt")
    rows = [{"context": "To be, or not to", "choices": [" be", " sea"], "label": 0},
            {"context": "Whether 'tis nobler in the", "choices": [" mind", " sea"], "label": 0},
            {"context": "The slings and arrows of outrageous",
             "choices": [" fortune", " troubles", " them"], "label": 0}]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "hf": hf, "tok": tok, "blocks": blocks}


@pytest.fixture(scope="module")
def lightning_ckpts(ws):
    """Two checkpoints of a real Lightning run (CausalLMModule, keys 'model.<hf key>')."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset
    from merge_callback.lm import CausalLMModule

    root = ws["root"] / "lightning"
    module = CausalLMModule(_neox(0), lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(default_root_dir=root, max_steps=4, accelerator="cpu", devices=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ckpt], num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(BlockDataset(ws["blocks"]), batch_size=2))
    paths = sorted(root.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert [p.name for p in paths] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    return paths


def _loss(model, ws, n_blocks=None):
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset

    loader = DataLoader(BlockDataset(ws["blocks"]), batch_size=4)
    return HeldoutEvaluator(loader, resolve_metric("loss"))(model)


def _session_logits(argv, weights, x):
    session = MergeSession(parse_args(argv), need_eval=True)
    try:
        session.load(weights)
        with torch.no_grad():
            return session.model(x).logits
    finally:
        session.close()


# --------------------------------------------------------------------------- help


def test_help_of_every_command(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("merge", "sweep", "heatmap", "examples:"):
        assert word in text
    assert cli.main(["merge", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--heldout", "--budget", "--alpha", "--method", "--weights", "--out",
                 "--model", "--key_prefix", "--tokenizer", "--max_shard_size", "--config",
                 "--print_config", "cmaes", "greedy"):
        assert flag in text, flag
    assert re.search(r"--budget N .*?\(default:\s+10\)", text, re.DOTALL)
    assert re.search(r"--max_batches N .*?'all': the whole file.*?\(default:\s+20\)", text,
                     re.DOTALL)
    assert cli.main(["sweep", "--help"]) == 0
    assert "--points" in capsys.readouterr().out
    assert cli.main(["heatmap", "--help"]) == 0
    assert "--lam" in capsys.readouterr().out
    assert cli.main([]) == 2


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    eps = {e.name: e for e in entry_points(group="console_scripts")}
    if "merge-callback" not in eps:
        pytest.skip("package not installed")
    assert eps["merge-callback"].value == "merge_callback.cli:main"


# --------------------------------------------------------------------------- Hugging Face folders


def test_merge_two_hf_folders(ws, capsys):
    a, b = ws["hf"][:2]
    before = [_digest(a), _digest(b)]
    out = ws["root"] / "soup"
    argv = ["merge", str(a), str(b), "--heldout", str(ws["root"] / "heldout.txt"),
            "--budget", "4", "--alpha", "0.5", "--out", str(out), *EVAL]
    record = run(argv)
    printed = capsys.readouterr().out
    assert "weight of checkpoint-200" in printed and "merge.json" in printed

    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "merge.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    saved = json.loads((out / "merge.json").read_text())
    assert saved["weights"] == record["weights"]
    assert record["method"] == "bayes" and record["evaluations"] == 4
    lams = [o["lam"] for o in record["observations"]]
    assert lams[:2] == [0.5, 1.0] and len(set(lams)) == 4
    assert record["weights"] == [1.0 - record["lam"], record["lam"]]
    assert record["value"] == min(o["value"] for o in record["observations"])
    assert set(record["baselines"]) == {"uniform", "checkpoint-200"}

    # the soup on disk is what was evaluated: reload and compare
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert _loss(reloaded, ws) == record["value"]
    x = ws["blocks"][:3]
    with torch.no_grad():
        ondisk = reloaded(x).logits
    inmem = _session_logits(argv[:-len(EVAL)] + ["--out", str(ws["root"] / "unused"), *EVAL],
                            record["weights"], x)
    assert torch.equal(ondisk, inmem)
    # the renamed output layer is merged too (file: embed_out, module: lm_head)
    expected = weighted_average([load_state_dict(a), load_state_dict(b)], record["weights"])
    assert torch.equal(reloaded.state_dict()["lm_head.weight"], expected["embed_out.weight"])
    assert torch.equal(load_file(str(out / "model.safetensors"))["embed_out.weight"],
                       expected["embed_out.weight"])
    assert [_digest(a), _digest(b)] == before  # inputs untouched
    # readable like a save_pretrained folder (umask 022: 0755 / 0644)
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~mask}


def test_fixed_weights_sharded_output(ws):
    a, b = ws["hf"][:2]
    out = ws["root"] / "sharded"
    argv = ["merge", str(a), str(b), "--weights", "0.3,0.7", "--max_shard_size", "40KB",
            "--out", str(out), "--quiet"]
    record = run(argv)
    assert record["method"] == "fixed" and record["value"] is None and record["evaluations"] == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    expected = weighted_average([load_state_dict(a), load_state_dict(b)], [0.3, 0.7])
    got = load_state_dict(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    x = ws["blocks"][:2]
    eval_argv = ["merge", str(a), str(b), "--weights", "0.3,0.7", "--heldout",
                 str(ws["root"] / "heldout.txt"), "--out", str(ws["root"] / "unused"), *EVAL]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, _session_logits(eval_argv, [0.3, 0.7], x))
    # a sharded folder is a valid input too
    again = run(["merge", str(out), str(b), "--weights", "1,0", "--heldout",
                 str(ws["root"] / "heldout.txt"), "--out", str(ws["root"] / "from-shards"), *EVAL])
    assert again["value"] == _loss(reloaded, ws)


def test_three_checkpoints_cmaes_is_deterministic(ws):
    args = ["merge", *map(str, ws["hf"]), "--method", "cmaes", "--budget", "6", "--seed", "3",
            "--heldout", str(ws["root"] / "heldout.txt"), *EVAL]
    r1 = run(args + ["--out", str(ws["root"] / "cma1")])
    r2 = run(args + ["--out", str(ws["root"] / "cma2")])
    assert r1["observations"] == r2["observations"] and r1["weights"] == r2["weights"]
    assert [o["weights"] for o in r1["observations"][:4]] == [
        [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]]
    assert r1["evaluations"] == 6 and r1["popsize"] == 7
    assert abs(sum(r1["weights"]) - 1.0) < 1e-9 and min(r1["weights"]) >= 0
    assert r1["value"] == min(o["value"] for o in r1["observations"])
    assert set(r1["baselines"]) == {"uniform", "checkpoint-100", "checkpoint-200",
                                    "checkpoint-300"}
    reloaded = AutoModelForCausalLM.from_pretrained(ws["root"] / "cma1")
    assert _loss(reloaded, ws) == r1["value"]


def test_greedy_and_uniform_methods(ws):
    base = ["merge", *map(str, ws["hf"]), "--heldout", str(ws["root"] / "heldout.txt"), *EVAL]
    g = run(base + ["--method", "greedy", "--out", str(ws["root"] / "greedy")])
    assert 4 <= g["evaluations"] <= 5 and g["method"] == "greedy"
    u = run(base + ["--method", "uniform", "--out", str(ws["root"] / "uniform")])
    assert u["weights"] == [1 / 3] * 3 and u["evaluations"] == 1
    assert u["value"] == _loss(AutoModelForCausalLM.from_pretrained(ws["root"] / "uniform"), ws)
    singles = [g["baselines"][f"checkpoint-{s}"] for s in (100, 200, 300)]
    assert g["value"] <= min(singles)


def test_heldout_formats_and_weighted_macro_average(ws):
    a, b = ws["hf"][:2]
    r = ws["root"]
    base = ["merge", str(a), str(b), "--weights", "0.4,0.6", *EVAL]
    values = {}
    for name in ("heldout.txt", "tokens.npy", "tokens.pt", "docs.jsonl"):
        rec = run(base + ["--heldout", str(r / name), "--out", str(r / f"fmt-{name}")])
        values[name] = rec["value"]
    # the same tokens whichever way they are given
    assert values["heldout.txt"] == values["tokens.npy"] == values["tokens.pt"]
    assert values["docs.jsonl"] != values["heldout.txt"]  # three documents joined with eos

    multi = run(base + ["--heldout", f"text={r / 'heldout.txt'}",
                        "--heldout", f"docs={r / 'docs.jsonl'}:3", "--out", str(r / "multi")])
    v = multi["values"]
    assert v == {"text": values["heldout.txt"], "docs": values["docs.jsonl"]}
    assert multi["value"] == 0.25 * v["text"] + 0.75 * v["docs"]
    assert multi["fitness"] == {"name": "weighted_mean", "higher_is_better": False}

    mixed = run(base + ["--heldout", f"text={r / 'heldout.txt'}",
                        "--heldout", f"task={r / 'task.jsonl'}", "--out", str(r / "mixed")])
    v = mixed["values"]
    assert v["task"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert mixed["value"] == 0.5 * -v["text"] + 0.5 * v["task"]
    assert mixed["fitness"] == {"name": "signed_weighted_mean", "higher_is_better": True}
    assert [h["kind"] for h in mixed["heldout"]] == ["lm", "multiple_choice"]


def test_multiple_choice_task_drives_the_search(ws):
    a, b = ws["hf"][:2]
    rec = run(["merge", str(a), str(b), "--heldout", str(ws["root"] / "task.jsonl"),
               "--budget", "3", "--out", str(ws["root"] / "mc"), *EVAL])
    assert rec["fitness"] == {"name": "multiple_choice_accuracy", "higher_is_better": True}
    assert rec["value"] == max(o["value"] for o in rec["observations"])


# --------------------------------------------------------------------------- other formats


def test_lightning_ckpts_plain_merge_keeps_their_keys(ws, lightning_ckpts):
    before = [_digest(p) for p in lightning_ckpts]
    out = ws["root"] / "lit-fixed"
    run(["merge", *map(str, lightning_ckpts), "--weights", "0.25,0.75", "--out", str(out),
         "--quiet"])
    assert sorted(p.name for p in out.iterdir()) == ["merge.json", "model.safetensors"]
    got = load_file(str(out / "model.safetensors"))
    sds = [torch.load(p, weights_only=True)["state_dict"] for p in lightning_ckpts]
    expected = weighted_average(sds, [0.25, 0.75])
    assert set(got) == set(expected) and all(k.startswith("model.") for k in got)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert [_digest(p) for p in lightning_ckpts] == before


def test_cli_prints_only_its_own_lines(ws, lightning_ckpts, tmp_path):
    """A fresh process, as a user runs it: writing the Hugging Face folder imports DeepSpeed (through
    accelerate, when installed), whose accelerator notice is silenced; the CLI's own lines stay."""
    import subprocess
    import sys

    out = tmp_path / "soup"
    proc = subprocess.run(
        [sys.executable, "-m", "merge_callback.cli", "merge", *map(str, lightning_ckpts),
         "--weights", "0.25,0.75", "--model", str(ws["hf"][0]), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}: config.json" in proc.stdout
    for noise in ("Setting accelerator to", "Writing model shards", "[WARNING]", "[INFO]"):
        assert noise not in proc.stdout + proc.stderr, noise
    AutoModelForCausalLM.from_pretrained(out)


def test_lightning_ckpts_evaluation_needs_model(ws, lightning_ckpts):
    out = ws["root"] / "lit-nomodel"
    with pytest.raises(CLIError, match="evaluating torch checkpoints needs their architecture: "
                                       "pass --model"):
        run(["merge", *map(str, lightning_ckpts), "--heldout", str(ws["root"] / "heldout.txt"),
             "--out", str(out), *EVAL])
    assert not out.exists()


def test_lightning_ckpts_with_model(ws, lightning_ckpts):
    """.ckpt in, --model given: the soup is a Hugging Face folder that from_pretrained loads, with
    exactly the weighted average of the LightningModule's weights ('model.' prefix removed)."""
    from merge_callback.lm import CausalLMModule

    before = [_digest(p) for p in lightning_ckpts]
    out = ws["root"] / "lit-eval"
    rec = run(["merge", *map(str, lightning_ckpts), "--heldout", str(ws["root"] / "heldout.txt"),
               "--model", str(ws["hf"][0]), "--budget", "3", "--out", str(out), *EVAL])
    assert {"config.json", "model.safetensors", "tokenizer.json", "merge.json"} <= \
        {p.name for p in out.iterdir()}
    soup = AutoModelForCausalLM.from_pretrained(out)
    assert _loss(soup, ws) == rec["value"]
    sds = [torch.load(p, weights_only=True)["state_dict"] for p in lightning_ckpts]
    expected = weighted_average(sds, rec["weights"])
    module = CausalLMModule(_neox(0))
    module.load_state_dict(expected)
    got = soup.state_dict()
    assert set(got) == set(module.model.state_dict())
    assert all(torch.equal(got[k], module.model.state_dict()[k]) for k in got)
    # the latest checkpoint alone scores what Lightning's weights score
    latest = CausalLMModule(_neox(0))
    latest.load_state_dict(sds[-1])
    assert rec["baselines"]["epoch=0-step=4"] == _loss(latest, ws)
    # fixed weights, no held-out data: still a loadable folder
    out2 = ws["root"] / "lit-fixed-hf"
    run(["merge", *map(str, lightning_ckpts), "--weights", "0.25,0.75", "--model",
         str(ws["hf"][0]), "--out", str(out2), "--quiet"])
    soup2 = AutoModelForCausalLM.from_pretrained(out2)
    module.load_state_dict(weighted_average(sds, [0.25, 0.75]))
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in soup2.state_dict().items())
    assert [_digest(p) for p in lightning_ckpts] == before


def test_safetensors_files_with_model(ws):
    a, b = ws["hf"][:2]
    r = ws["root"]
    files = []
    for i, folder in enumerate((a, b)):  # HF key space (embed_out)
        files.append(r / f"hf-keys-{i}.safetensors")
        shutil.copy(folder / "model.safetensors", files[-1])
    common = ["--weights", "0.4,0.6", "--heldout", str(r / "heldout.txt"), *EVAL]
    via_files = run(["merge", *map(str, files), "--model", str(a), "--out", str(r / "st1"),
                     *common])
    via_folders = run(["merge", str(a), str(b), "--out", str(r / "st2"), *common])
    assert via_files["value"] == via_folders["value"]
    assert {"config.json", "merge.json", "model.safetensors"} <= \
        {p.name for p in (r / "st1").iterdir()}
    st1 = AutoModelForCausalLM.from_pretrained(r / "st1")
    assert _loss(st1, ws) == via_files["value"]
    # module key space (lm_head), e.g. save_file(model.state_dict())
    sd_files = []
    for i, folder in enumerate((a, b)):
        m = AutoModelForCausalLM.from_pretrained(folder)
        sd_files.append(r / f"module-keys-{i}.safetensors")
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(sd_files[-1]))
    via_sd = run(["merge", *map(str, sd_files), "--model", str(a), "--out", str(r / "st3"),
                  *common])
    assert via_sd["value"] == via_folders["value"]


def test_explicit_key_prefix(ws):
    a, b = ws["hf"][:2]
    r = ws["root"]
    files = []
    for i, folder in enumerate((a, b)):
        m = AutoModelForCausalLM.from_pretrained(folder)
        files.append(r / f"net-{i}.safetensors")
        save_file({f"net.{k}": v.contiguous() for k, v in m.state_dict().items()},
                  str(files[-1]))
    common = ["--weights", "0.4,0.6", "--heldout", str(r / "heldout.txt"), "--model", str(a),
              *EVAL]
    rec = run(["merge", *map(str, files), "--key_prefix", "net.", "--out", str(r / "net"),
               *common])
    ref = run(["merge", str(a), str(b), "--weights", "0.4,0.6", "--heldout",
               str(r / "heldout.txt"), "--out", str(r / "net-ref"), *EVAL])
    assert rec["value"] == ref["value"]
    assert not any(k.startswith("net.") for k in load_file(str(r / "net" / "model.safetensors")))
    got, ref_sd = (load_file(str(r / d / "model.safetensors")) for d in ("net", "net-ref"))
    assert set(got) == set(ref_sd) and all(torch.equal(got[k], ref_sd[k]) for k in got)
    with pytest.raises(CLIError, match="do not fit --model .*match no tensor .*prefix 'model.'"):
        run(["merge", *map(str, files), "--key_prefix", "model.", "--out", str(r / "never-net"),
             *common])
    assert not (r / "never-net").exists()
    # --key_prefix auto finds 'net.' (a prefix every file name has and no model name has)
    auto = run(["merge", *map(str, files), "--out", str(r / "net-auto"), *common])
    assert auto["value"] == ref["value"]
    got = load_file(str(r / "net-auto" / "model.safetensors"))
    assert all(torch.equal(got[k], ref_sd[k]) for k in ref_sd)


def test_detect_key_prefix():
    from merge_callback.io import detect_key_prefix

    own = ["gpt_neox.embed_in.weight", "lm_head.weight"]
    assert detect_key_prefix(["model." + k for k in own], own) == "model."
    assert detect_key_prefix(["net." + k for k in own], own) == "net."
    assert detect_key_prefix(own, own) == ""
    assert detect_key_prefix(["model.a", "other.b"], own) == ""
    assert detect_key_prefix(["gpt_neox.x", "gpt_neox.y"], own) == ""  # the model has it too
    assert detect_key_prefix([], own) == ""


def test_pytorch_model_bin_folders_with_legacy_buffers(ws):
    """Local Pythia revisions: pytorch_model.bin with buffers today's GPT-NeoX no longer has."""
    r = ws["root"]
    folders = []
    for i, src in enumerate(ws["hf"][:2]):
        folder = r / f"pythia-step{i}"
        folder.mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / name, folder / name)
        sd = load_file(str(src / "model.safetensors"))
        for layer in range(2):
            sd[f"gpt_neox.layers.{layer}.attention.bias"] = torch.ones(1, 1, 64, 64,
                                                                        dtype=torch.bool)
            sd[f"gpt_neox.layers.{layer}.attention.masked_bias"] = torch.tensor(-1e9)
        torch.save(sd, folder / "pytorch_model.bin")
        folders.append(folder)
    rec = run(["merge", *map(str, folders), "--weights", "0.4,0.6", "--heldout",
               str(r / "heldout.txt"), "--out", str(r / "pythia-soup"), *EVAL])
    ref = run(["merge", *map(str, ws["hf"][:2]), "--weights", "0.4,0.6", "--heldout",
               str(r / "heldout.txt"), "--out", str(r / "pythia-ref"), *EVAL])
    assert rec["value"] == ref["value"]
    out = load_file(str(r / "pythia-soup" / "model.safetensors"))
    assert out["gpt_neox.layers.1.attention.masked_bias"].item() == -1e9  # kept in the file
    reloaded = AutoModelForCausalLM.from_pretrained(r / "pythia-soup")
    assert _loss(reloaded, ws) == rec["value"]


def test_folders_without_tokenizer_get_the_given_one(ws):
    r = ws["root"]
    bare = []
    for i, src in enumerate(ws["hf"][:2]):
        folder = r / f"bare-{i}"
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(src / name, folder / name)
        bare.append(folder)
    with pytest.raises(CLIError, match="text held-out data needs a tokenizer"):
        run(["merge", *map(str, bare), "--heldout", str(r / "heldout.txt"), "--budget", "3",
             "--out", str(r / "never-bare"), *EVAL])
    run(["merge", *map(str, bare), "--heldout", str(r / "heldout.txt"), "--budget", "3",
         "--tokenizer", str(ws["hf"][0]), "--out", str(r / "bare-soup"), *EVAL])
    assert (r / "bare-soup" / "tokenizer.json").read_bytes() == \
        (ws["hf"][0] / "tokenizer.json").read_bytes()


def test_max_batches(ws):
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset

    a, b = ws["hf"][:2]
    rec = run(["merge", str(a), str(b), "--weights", "0.5,0.5", "--heldout",
               str(ws["root"] / "heldout.txt"), "--max_batches", "1",
               "--out", str(ws["root"] / "one-batch"), *EVAL])
    assert rec["heldout"][0]["batches"] == 1
    loader = DataLoader(BlockDataset(ws["blocks"]), batch_size=4)
    soup = AutoModelForCausalLM.from_pretrained(ws["root"] / "one-batch")
    assert rec["value"] == HeldoutEvaluator(loader, resolve_metric("loss"), max_batches=1)(soup)
    assert rec["value"] != _loss(soup, ws)


def test_default_batch_budget_and_estimate(ws, capsys):
    """Candidates are scored on at most --max_batches batches (default 20, stated in the log
    when it cuts a file); 'all' scores the whole file; the first evaluation gives an estimate."""
    a, b = map(str, ws["hf"][:2])
    n_blocks = ws["blocks"].shape[0]
    assert parse_args(["merge", a, b]).max_batches == cli.DEFAULT_MAX_BATCHES == 20
    assert parse_args(["merge", a, b, "--max_batches", "all"]).max_batches is None
    base = ["merge", a, b, "--heldout", str(ws["root"] / "heldout.txt"), "--block_size", str(T),
            "--batch_size", "1", "--budget", "3"]
    rec = run(base + ["--max_batches", "2", "--out", str(ws["root"] / "budget-2")])
    err = capsys.readouterr().err
    assert rec["heldout"][0]["batches"] == 2
    assert (f"scoring the first 2 of {n_blocks} batches of {ws['root'] / 'heldout.txt'} per "
            "candidate (--max_batches 2; --max_batches all scores the whole file)") in err
    assert re.search(r"evaluation 1 took \d+\.\d s \(2 batches\); the remaining 2 take about "
                     r"\d+ s", err)
    rec = run(base + ["--max_batches", "all", "--out", str(ws["root"] / "budget-all")])
    assert rec["heldout"][0]["batches"] == n_blocks
    assert "scoring the first" not in capsys.readouterr().err
    rec = run(base + ["--out", str(ws["root"] / "budget-default")])
    assert rec["heldout"][0]["batches"] == min(n_blocks, 20)


# --------------------------------------------------------------------------- pilot tools


def test_sweep_writes_curve(ws, capsys):
    a, b = ws["hf"][:2]
    out = ws["root"] / "sweep"
    rec = run(["sweep", str(a), str(b), "--points", "5", "--heldout",
               str(ws["root"] / "heldout.txt"), "--out", str(out), *EVAL])
    printed = capsys.readouterr().out
    assert "<- best" in printed
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0] == "lam,weight_a,weight_b,value,heldout:heldout"
    assert [float(x.split(",")[0]) for x in lines[1:]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert rec["points"][0]["value"] == _loss(AutoModelForCausalLM.from_pretrained(a), ws)
    assert rec["points"][-1]["value"] == _loss(AutoModelForCausalLM.from_pretrained(b), ws)
    assert rec["best"]["value"] == min(p["value"] for p in rec["points"])


def test_heatmap_writes_all_pairs(ws, capsys):
    out = ws["root"] / "heatmap"
    rec = run(["heatmap", *map(str, ws["hf"]), "--heldout", str(ws["root"] / "heldout.txt"),
               "--out", str(out), *EVAL])
    assert "checkpoint-300" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.csv", "heatmap.json", "heatmap.png"]
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pairs = {(p["i"], p["j"]): p for p in rec["pairs"]}
    assert sorted(pairs) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    for (i, j), p in pairs.items():
        best_parent = min(pairs[(i, i)]["value"], pairs[(j, j)]["value"])
        assert p["gain_vs_best_parent"] == best_parent - p["value"]
    assert pairs[(1, 1)]["value"] == _loss(AutoModelForCausalLM.from_pretrained(ws["hf"][1]), ws)
    assert len((out / "heatmap.csv").read_text().splitlines()) == 7


def test_sweep_plot_marks_alpha_and_names_the_metric(tmp_path):
    rows = [{"lam": lam, "value": 3.0 - lam, "heldout:wiki": 3.0 - 2 * lam,
             "heldout:piqa": 0.5 + lam / 4} for lam in (0.0, 0.5, 1.0)]
    fig = plot_sweep(tmp_path / "sweep.png", rows, labels=["ckpt-1", "ckpt-2"],
                     fitness_name="signed_weighted_mean", shard_names=["wiki", "piqa"], alpha=0.3)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    marker = "α = 0.3 (lower bound of the λ search)"
    assert list(lines) == ["signed_weighted_mean", "wiki", "piqa", marker]
    assert list(lines[marker].get_xdata()) == [0.3, 0.3]
    assert lines[marker].get_linestyle() == ":"
    assert list(lines["wiki"].get_ydata()) == [3.0, 2.0, 1.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)
    assert ax.get_ylabel() == "held-out signed_weighted_mean"
    assert ax.get_xlabel() == "λ  (weight of ckpt-2; 0 = ckpt-1)"

    fig = plot_sweep(tmp_path / "plain.png", rows, labels=["a", "b"], fitness_name="loss",
                     shard_names=["wiki"])
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["loss"]


def test_heatmap_plot_labels_the_colour_bar_and_the_diagonal(tmp_path):
    rows = [{"i": 0, "j": 0, "value": 3.0}, {"i": 1, "j": 1, "value": 2.5},
            {"i": 0, "j": 1, "value": 2.0}]
    fig = plot_heatmap(tmp_path / "heatmap.png", rows, labels=["c-100", "c-200"],
                       fitness_name="loss", higher_is_better=False, lam=0.25)
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax, colour_bar = fig.axes
    assert ax.get_title() == "held-out loss: 0.75·row + 0.25·column\ndiagonal: single checkpoints"
    assert colour_bar.get_ylabel() == "held-out loss"
    assert [t.get_text() for t in ax.texts] == ["3.0000", "2.5000", "2.0000"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c-100", "c-200"]
    assert ax.get_images()[0].get_cmap().name == "viridis_r"   # lower loss is brighter


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_inputs(ws):
    r = ws["root"] / "bad"
    r.mkdir()
    wide = r / "wide"
    _neox(0, hidden=64).save_pretrained(wide)
    ws["tok"].save_pretrained(wide)
    other_tok = r / "other-tokenizer"
    shutil.copytree(ws["hf"][1], other_tok)
    train_tokenizer(["completely different text about the python standard library"] * 8,
                    vocab_size=VOCAB, save_dir=other_tok)
    rope = r / "rope"
    shutil.copytree(ws["hf"][1], rope)
    cfg = json.loads((rope / "config.json").read_text())
    cfg["layer_norm_eps"] = 0.1
    (rope / "config.json").write_text(json.dumps(cfg))
    arrays = {"big.npy": np.full((2, T), VOCAB + 5, dtype=np.int64),
              "float.npy": np.zeros((2, T), dtype=np.float32),
              "negative.npy": np.full((2, T), -1, dtype=np.int64),
              "long.npy": np.zeros((2, 80), dtype=np.int64)}
    for name, arr in arrays.items():
        np.save(r / name, arr)
    torch.save(torch.arange(T - 1), r / "short.pt")
    torch.save({"tokens": torch.arange(T)}, r / "dict.pt")
    return {"wide": wide, "other_tok": other_tok, "rope": rope, "dir": r}


BAD_INPUTS = {
    # case: (argv after the command, expected message)
    "wide": (["merge", "A", "WIDE", "--heldout", "HELD"],
             "different architectures: tensor .* has shape"),
    "rope": (["merge", "A", "ROPE", "--heldout", "HELD"],
             "different architectures: config field 'layer_norm_eps'"),
    "other_tok": (["merge", "A", "OTHER_TOK", "--weights", "0.5,0.5"],
                  "checkpoints use different tokenizers .*vocabularies differ"),
    "missing": (["merge", "A", "MISSING", "--heldout", "HELD"], "checkpoint not found"),
    "sum": (["merge", "A", "B", "--weights", "0.4,0.5"], r"--weights must sum to 1, got sum 0.9"),
    "count": (["merge", "A", "B", "--weights", "0.2,0.3,0.5"],
              "--weights needs one weight per checkpoint: got 3 for 2"),
    "negative": (["merge", "A", "B", "--weights", "1.5,-0.5"], "--weights must be finite and >= 0"),
    "both": (["merge", "A", "B", "--weights", "0.5,0.5", "--method", "cmaes"],
             "either --weights .* or --method"),
    "one": (["merge", "A", "--heldout", "HELD"], "merge needs at least 2 checkpoints, got 1"),
    "no_heldout": (["merge", "A", "B"], "--heldout is required for --method bayes"),
    "heldout_missing": (["merge", "A", "B", "--heldout", "NOPE"], "--heldout file not found"),
    "heldout_weight": (["merge", "A", "B", "--heldout", "HELD:0"],
                       "WEIGHT must be a number > 0, got '0'"),
    "heldout_names": (["merge", "A", "B", "--heldout", "x=HELD", "--heldout", "x=HELD"],
                      "--heldout names must be unique"),
    "budget": (["merge", "A", "B", "C", "--method", "cmaes", "--budget", "3", "--heldout", "HELD"],
               r"--budget must be an integer >= 4 for method='cmaes' with 3 checkpoints"),
    "pair_budget": (["merge", "A", "B", "--budget", "2", "--heldout", "HELD"],
                    "--budget must be >= 3 for 2 checkpoints"),
    "mixed_formats": (["merge", "A", "CKPT", "--weights", "0.5,0.5"],
                      "all checkpoints must have one format"),
    "vocab": (["merge", "A", "B", "--heldout", "BAD/big.npy"],
              "token id 305, outside the model's vocabulary of 300"),
    "float_ids": (["merge", "A", "B", "--heldout", "BAD/float.npy"],
                  r"expected integer token ids of shape \[n, T\] or \[N\], got torch.float32"),
    "negative_ids": (["merge", "A", "B", "--heldout", "BAD/negative.npy"],
                     "token ids must be >= 0"),
    "long_rows": (["merge", "A", "B", "--heldout", "BAD/long.npy"],
                  "rows of 80 tokens, more than the model's context \\(64\\)"),
    "short": (["merge", "A", "B", "--heldout", "BAD/short.pt"], "has 15 tokens, fewer than"),
    "pt_dict": (["merge", "A", "B", "--heldout", "BAD/dict.pt"],
                "expected a tensor of token ids \\(or a dict with 'input_ids'\\), got dict"),
    "block": (["merge", "A", "B", "--heldout", "HELD", "--block_size", "128"],
              "--block_size 128 exceeds the model's context"),
    "out_inside": (["merge", "A", "B", "--weights", "0.5,0.5"], "overlaps an input"),
    "no_out": (["merge", "A", "B", "--weights", "0.5,0.5"], "--out is required"),
    "alpha": (["merge", "A", "B", "--heldout", "HELD", "--alpha", "1.0"],
              r"--alpha must be in \(0, 1\)"),
    "shard": (["merge", "A", "B", "--weights", "0.5,0.5", "--max_shard_size", "lots"],
              "--max_shard_size"),
    "model_with_hf": (["merge", "A", "B", "--weights", "0.5,0.5", "--model", "A"],
                      "--model is only for"),
    "same": (["merge", "A", "A", "--weights", "0.5,0.5"], "the same checkpoint is given twice"),
    "tokenizer": (["merge", "A", "B", "--heldout", "HELD", "--tokenizer", "NOPE"],
                  "--tokenizer not found"),
    "sweep_three": (["sweep", "A", "B", "C", "--heldout", "HELD"],
                    "sweep needs exactly 2 checkpoints"),
    "sweep_points": (["sweep", "A", "B", "--points", "1", "--heldout", "HELD"],
                     "--points must be >= 2"),
    "sweep_heldout": (["sweep", "A", "B"], "--heldout is required here"),
    "heatmap_one": (["heatmap", "A", "--heldout", "HELD"], "heatmap needs at least 2 checkpoints"),
    "heatmap_lam": (["heatmap", "A", "B", "--lam", "1.5", "--heldout", "HELD"],
                    r"--lam must be in \[0, 1\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_before_any_work(ws, bad_inputs, lightning_ckpts, case):
    argv, match = BAD_INPUTS[case]
    names = {"A": ws["hf"][0], "B": ws["hf"][1], "C": ws["hf"][2],
             "HELD": ws["root"] / "heldout.txt", "WIDE": bad_inputs["wide"],
             "ROPE": bad_inputs["rope"], "OTHER_TOK": bad_inputs["other_tok"],
             "MISSING": ws["root"] / "checkpoint-999", "NOPE": ws["root"] / "nope.txt",
             "CKPT": lightning_ckpts[0], "BAD": bad_inputs["dir"]}
    pattern = re.compile(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b")
    args = [pattern.sub(lambda m: str(names[m.group(1)]), a) for a in argv]
    out = ws["hf"][0] / "soup" if case == "out_inside" else ws["root"] / f"never-{case}"
    if case != "no_out":
        args += ["--out", str(out)]
    with pytest.raises((CLIError, ValueError, FileNotFoundError), match=match):
        run(args + ["--quiet"])
    assert not out.exists()


def test_existing_output_needs_overwrite(ws):
    a, b = map(str, ws["hf"][:2])
    out = ws["root"] / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CLIError, match="exists and is not empty; pass --overwrite"):
        run(["merge", a, b, "--weights", "0.5,0.5", "--out", str(out), "--quiet"])
    assert (out / "keep.txt").read_text() == "mine"
    run(["merge", a, b, "--weights", "0.5,0.5", "--out", str(out), "--quiet", "--overwrite"])
    assert not (out / "keep.txt").exists() and (out / "merge.json").exists()


def test_text_heldout_without_tokenizer(ws, lightning_ckpts):
    model_dir = ws["root"] / "config-only"
    model_dir.mkdir(exist_ok=True)
    shutil.copy(ws["hf"][0] / "config.json", model_dir / "config.json")
    argv = ["merge", *map(str, lightning_ckpts), "--model", str(model_dir), "--heldout",
            str(ws["root"] / "heldout.txt"), "--budget", "3", *EVAL]
    with pytest.raises(CLIError, match="text held-out data needs a tokenizer: pass --tokenizer"):
        run(argv + ["--out", str(ws["root"] / "never-tok")])
    # pre-tokenised data needs none; --tokenizer fixes the text case
    run([*argv[:5], "--heldout", str(ws["root"] / "tokens.npy"), *argv[7:],
         "--out", str(ws["root"] / "tok-npy")])
    run(argv + ["--tokenizer", str(ws["hf"][0]), "--out", str(ws["root"] / "tok-given")])


def test_main_reports_errors_with_exit_code_2(ws, capsys):
    a, b = map(str, ws["hf"][:2])
    code = cli.main(["merge", a, b, "--weights", "0.4,0.5", "--out", str(ws["root"] / "x")])
    assert code == 2
    assert capsys.readouterr().err.startswith("merge-callback: error: --weights must sum to 1")


def test_progress_lines_and_quiet(ws, capsys):
    a, b = map(str, ws["hf"][:2])
    base = ["merge", a, b, "--heldout", str(ws["root"] / "heldout.txt"), "--budget", "3",
            "--block_size", str(T)]
    run(base + ["--out", str(ws["root"] / "loud")])
    err = capsys.readouterr().err
    assert "[1/3] λ=0.5000  loss=" in err and "[3/3]" in err
    assert "\r" not in err  # no progress bar when stderr is not a terminal
    run(base + ["--out", str(ws["root"] / "quiet"), "--quiet"])
    assert capsys.readouterr().err == ""


def test_progress_bar_on_a_terminal(ws, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    a, b = map(str, ws["hf"][:2])
    run(["merge", a, b, "--heldout", str(ws["root"] / "heldout.txt"), "--budget", "3",
         "--block_size", str(T), "--batch_size", "2", "--out", str(ws["root"] / "bars")])
    err = capsys.readouterr().err
    per_eval = -(-ws["blocks"].shape[0] // 2)
    # one bar over the batches of all 3 evaluations, with elapsed<remaining time
    assert "eval 1/3" in err and "eval 3/3" in err and "\r" in err
    assert re.search(rf"eval 3/3: 100%.*\b{3 * per_eval}/{3 * per_eval} \[\d\d:\d\d<\d\d:\d\d", err)
    assert "[3/3] λ=" in err


# --------------------------------------------------------------------------- configs


def test_config_round_trip_and_overrides(ws, tmp_path, capsys):
    a, b = map(str, ws["hf"][:2])
    argv = ["merge", a, b, "--heldout", f"text={ws['root'] / 'heldout.txt'}:2",
            "--heldout", str(ws["root"] / "task.jsonl"), "--budget", "7", "--alpha", "0.6",
            "--weights", "0.3,0.7", "--block_size", "16", "--quiet", "--out", "somewhere"]
    ns = parse_args(argv)
    text = dump_config(ns)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    again = parse_args(["merge", "--config", str(cfg)])
    assert config_dict(again) == config_dict(ns)
    assert dump_config(again) == text
    # --print_config prints the same YAML
    assert run(["merge", "--config", str(cfg), "--print_config"]) is None
    assert capsys.readouterr().out == text
    # flags override the file; a repeated option replaces the file's list
    over = parse_args(["merge", "--config", str(cfg), "--budget", "9", "--heldout", "x.txt",
                       ws["hf"][2].as_posix(), str(ws["hf"][0])])
    assert over.budget == 9 and over.heldout == ["x.txt"]
    assert over.checkpoints == [ws["hf"][2].as_posix(), str(ws["hf"][0])]
    assert over.alpha == 0.6 and over.weights == [0.3, 0.7]


@pytest.mark.parametrize("content,match", [
    ("bugdet: 3\n", "unknown option 'bugdet' for 'merge'; allowed: .*budget"),
    ("budget: many\n", "budget: expected an integer"),
    ("budget: 2.5\n", "budget: expected"),
    ("method: evolve\n", "method must be one of bayes, cmaes, greedy, uniform"),
    ("quiet: maybe\n", "quiet must be true or false"),
    ("command: sweep\n", "is for 'sweep', not 'merge'"),
    ("- a\n- b\n", "must hold a mapping"),
    ("weights: [a, b]\n", "weights must be a list of numbers"),
])
def test_bad_config_files(tmp_path, content, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    with pytest.raises(CLIError, match=match):
        parse_args(["merge", "--config", str(cfg)])


def test_sweep_and_heatmap_configs_round_trip(tmp_path):
    for argv in (["sweep", "a", "b", "--points", "11", "--heldout", "h.txt", "--out", "o"],
                 ["heatmap", "a", "b", "c", "--lam", "0.3", "--heldout", "h.txt", "--out", "o"]):
        ns = parse_args(argv)
        cfg = tmp_path / f"{argv[0]}.yaml"
        cfg.write_text(dump_config(ns))
        assert config_dict(parse_args([argv[0], "--config", str(cfg)])) == config_dict(ns)


def test_lm_eval_tasks_choose_the_soup(ws):
    """--lm_eval: candidates are scored by lm-evaluation-harness on a shipped offline task; the
    recorded value equals lm-eval run directly on the written soup."""
    pytest.importorskip("lm_eval")
    from merge_callback.lmeval import LOCAL_PPL_TASK, run_lm_eval

    a, b = ws["hf"][:2]
    out = ws["root"] / "lm-eval-soup"
    rec = run(["merge", str(a), str(b), "--lm_eval", LOCAL_PPL_TASK, "--lm_eval_limit", "6",
               "--budget", "3", "--out", str(out), *EVAL])
    assert rec["fitness"]["higher_is_better"] is False
    assert rec["value"] == min(o["value"] for o in rec["observations"])
    soup = AutoModelForCausalLM.from_pretrained(out)
    direct = run_lm_eval(soup, [LOCAL_PPL_TASK], ws["tok"], limit=6, batch_size=4)
    assert rec["value"] == direct["results"][LOCAL_PPL_TASK]["word_perplexity,none"]
