"""Every bad input to ``merge-callback`` ends as one line ``merge-callback: error: ...`` with exit
code 2, before any evaluation, and leaves the file tree exactly as it was (names, sizes, mtimes and
contents of every file and folder under the workspace).

Inputs are real files: Hugging Face folders from ``save_pretrained``, safetensors and ``torch.save``
files, a truncated copy, random bytes, a pickle payload that would create a file if it were ever
unpickled, and so on.
"""

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from merge_callback import cli  # noqa: E402
from merge_callback.data import tiny_gpt_neox, tokenize_and_pack, train_tokenizer  # noqa: E402

VOCAB, T, CONTEXT = 300, 16, 64
TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n")


class _Payload:
    """Unpickling this would run ``touch <path>``; the tree snapshot would then show the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _model(hidden=32):
    return tiny_gpt_neox(VOCAB, seed=0, hidden_size=hidden, num_layers=2, num_heads=4,
                         max_len=CONTEXT)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad")
    tok = train_tokenizer([TEXT] * 4, vocab_size=VOCAB)
    files = {}
    model = _model()
    for name, seed in (("A", 1), ("B", 2)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        files[name] = root / name
        shutil.copy(root / name / "model.safetensors", root / f"st_{name}.safetensors")
        files[f"ST_{name}"] = root / f"st_{name}.safetensors"
        torch.save({"state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()},
                    "global_step": seed}, root / f"ckpt_{name}.ckpt")
        files[f"CKPT_{name}"] = root / f"ckpt_{name}.ckpt"
    wide = root / "wide"
    _model(hidden=64).save_pretrained(wide)
    files["WIDE"] = wide
    data = (root / "st_A.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "random.ckpt").write_bytes(random.Random(0).randbytes(4096))
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _Payload(root / "PWNED")},
               root / "payload.ckpt")
    (root / "pickled.ckpt").write_bytes(pickle.dumps(_Payload(root / "PWNED2")))
    (root / "held.txt").write_text(TEXT * 3)
    blocks = tokenize_and_pack([TEXT * 3], tok, T)
    np.save(root / "zero_rows.npy", np.zeros((0, T), dtype=np.int64))
    np.save(root / "float.npy", blocks.numpy().astype(np.float32))
    np.save(root / "big_ids.npy", np.full((2, T), VOCAB + 5, dtype=np.int64))
    np.save(root / "negative.npy", np.full((2, T), -1, dtype=np.int64))
    np.save(root / "long_rows.npy", np.zeros((2, CONTEXT + 16), dtype=np.int64))
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    torch.save(torch.arange(T - 1), root / "short.pt")
    (root / "random.pt").write_bytes(random.Random(1).randbytes(512))
    (root / "latin1.txt").write_bytes("café, naïve résumé".encode("latin-1") * 20)
    (root / "empty.txt").write_text("")
    (root / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (root / "table.csv").write_text("a,b\n1,2\n")
    (root / "afile").write_text("a regular file\n")
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "not_a_checkpoint").mkdir()
    (root / "not_a_checkpoint" / "README").write_text("nothing here\n")
    (root / "taken").mkdir()
    (root / "taken" / "old.txt").write_text("keep me\n")
    (root / "empty_tokenizer").mkdir()
    (root / "bad.yaml").write_text("budget: [1, 2\n")
    (root / "unknown.yaml").write_text("budgett: 3\n")
    (root / "alien").mkdir()
    (root / "alien" / "config.json").write_text(json.dumps({"model_type": "no-such-model",
                                                            "vocab_size": VOCAB}))
    (root / "typeless.json").write_text(json.dumps({"vocab_size": VOCAB}))
    (root / "mc_bad.jsonl").write_text(json.dumps({"context": "To be", "choices": [" or"],
                                                   "label": 3}) + "\n")
    ro = root / "readonly"
    ro.mkdir()
    locked = False
    if os.geteuid() == 0:
        locked = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
    else:
        ro.chmod(0o500)
        locked = True
    files.update({"RO": ro, "ROOT": root})
    yield {"root": root, "files": files, "locked": locked}
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
    else:
        ro.chmod(0o700)


def _snapshot(root):
    """Every file and folder under root: (kind, size, mtime_ns, sha256)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = None
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    st = os.lstat(root)
    out["."] = (st.st_mode, st.st_size, st.st_mtime_ns, None)
    return out


HELD = "--heldout=ROOT/held.txt"
EVAL = ["--block_size", str(T), "--batch_size", "2"]
FIXED = ["--weights", "0.5,0.5"]

CASES = {
    # name: (argv with placeholders, regex the message must match)
    # damaged and hostile checkpoints
    "truncated_safetensors": (["merge", "ROOT/truncated.safetensors", "ST_B", *FIXED],
                              r"cannot read checkpoint \S*truncated\.safetensors: it is damaged or "
                              r"not a checkpoint \(\w+: .*\); expected a Hugging Face folder"),
    "random_bytes_ckpt": (["merge", "ROOT/random.ckpt", "CKPT_B", *FIXED],
                          r"cannot read checkpoint \S*random\.ckpt: it is damaged or not a "
                          r"checkpoint"),
    "pickle_payload_zip": (["merge", "ROOT/payload.ckpt", "CKPT_B", *FIXED],
                           r"cannot read checkpoint \S*payload\.ckpt: it holds pickled Python "
                           r"objects other than tensors \(posix\.system\), which are not loaded"),
    "pickle_payload_raw": (["merge", "ROOT/pickled.ckpt", "CKPT_B", *FIXED],
                           r"cannot read checkpoint \S*pickled\.ckpt: it is damaged or not a "
                           r"checkpoint \(UnpicklingError: Unsupported operand \d+\)"),
    "not_a_checkpoint_folder": (["merge", "ROOT/not_a_checkpoint", "B", *FIXED],
                                r"folder \S*not_a_checkpoint is not a Hugging Face checkpoint: it "
                                r"holds none of model\.safetensors"),
    "unsupported_suffix": (["merge", "ROOT/notes.txt", "ST_B", *FIXED],
                           r"unsupported checkpoint \S*notes\.txt: expected a Hugging Face folder"),
    "missing_checkpoint": (["merge", "A", "ROOT/checkpoint-999", *FIXED],
                           r"checkpoint not found: \S*checkpoint-999$"),
    "mixed_formats": (["merge", "A", "CKPT_B", *FIXED], r"all checkpoints must have one format"),
    # --model that does not fit
    "wide_model_safetensors": (["merge", "ST_A", "ST_B", "--model", "WIDE", HELD, "--tokenizer",
                                "A", *EVAL],
                               r"the checkpoints do not fit --model \S*wide: .*shape"),
    "wide_model_fixed_weights": (["merge", "ST_A", "ST_B", "--model", "WIDE", *FIXED],
                                 r"the checkpoints do not fit --model \S*wide"),
    "wide_model_ckpt": (["merge", "CKPT_A", "CKPT_B", "--model", "WIDE", *FIXED],
                        r"the checkpoints do not fit --model \S*wide: checkpoint tensor "
                        r"'model\.gpt_neox\.embed_in\.weight' has shape \(300, 32\) but the "
                        r"model's 'gpt_neox\.embed_in\.weight' has \(300, 64\)"),
    "unknown_model_type": (["merge", "CKPT_A", "CKPT_B", "--model", "ROOT/alien", *FIXED],
                           r"--model \S*alien: cannot build a causal language model from its "
                           r"config\.json"),
    "model_without_type": (["merge", "CKPT_A", "CKPT_B", "--model", "ROOT/typeless.json", *FIXED],
                           r"--model \S*typeless\.json: config\.json has no 'model_type'"),
    # held-out data
    "zero_row_npy": (["merge", "A", "B", "--heldout", "ROOT/zero_rows.npy", *EVAL],
                     r"--heldout \S*zero_rows\.npy holds no tokens \(shape \(0, 16\)\)"),
    "float_ids": (["merge", "A", "B", "--heldout", "ROOT/float.npy", *EVAL],
                  r"expected integer token ids of shape \[n, T\] or \[N\], got torch\.float32"),
    "ids_outside_vocab": (["merge", "A", "B", "--heldout", "ROOT/big_ids.npy", *EVAL],
                          r"--heldout \S*big_ids\.npy batch 0 holds token id 305, outside the "
                          r"model's vocabulary of 300"),
    "negative_ids": (["merge", "A", "B", "--heldout", "ROOT/negative.npy", *EVAL],
                     r"token ids must be >= 0"),
    "rows_longer_than_context": (["merge", "A", "B", "--heldout", "ROOT/long_rows.npy", *EVAL],
                                 r"rows of 80 tokens, more than the model's context \(64\)"),
    "object_npy": (["merge", "A", "B", "--heldout", "ROOT/objects.npy", *EVAL],
                   r"--heldout \S*objects\.npy: not a numeric \.npy array"),
    "short_token_file": (["merge", "A", "B", "--heldout", "ROOT/short.pt", *EVAL],
                         r"has 15 tokens, fewer than --block_size=16"),
    "random_pt_heldout": (["merge", "A", "B", "--heldout", "ROOT/random.pt", *EVAL],
                          r"--heldout \S*random\.pt: it is damaged or not a token file "
                          r"\(UnpicklingError: Unsupported operand \d+\)"),
    "latin1_text": (["merge", "A", "B", "--heldout", "ROOT/latin1.txt", *EVAL],
                    r"--heldout \S*latin1\.txt: cannot read it \(UnicodeDecodeError"),
    "empty_text": (["merge", "A", "B", "--heldout", "ROOT/empty.txt", *EVAL],
                   r"--heldout \S*empty\.txt has fewer than --block_size=16 tokens"),
    "broken_jsonl": (["merge", "A", "B", "--heldout", "ROOT/broken.jsonl", *EVAL],
                     r"--heldout \S*broken\.jsonl: cannot read it \(ValueError: .*broken\.jsonl:2 "
                     r"is not valid JSON"),
    "unsupported_heldout": (["merge", "A", "B", "--heldout", "ROOT/table.csv", *EVAL],
                            r"--heldout \S*table\.csv: unsupported file; expected \.txt, \.jsonl"),
    "bad_multiple_choice": (["merge", "A", "B", "--heldout", "ROOT/mc_bad.jsonl", *EVAL],
                            r"--heldout \S*mc_bad\.jsonl: cannot read it \(ValueError: .*:1: "
                            r"'choices' must be a list of at least 2"),
    "missing_heldout": (["merge", "A", "B", "--heldout", "ROOT/nope.txt"],
                        r"--heldout file not found: \S*nope\.txt"),
    "empty_tokenizer": (["merge", "A", "B", HELD, "--tokenizer", "ROOT/empty_tokenizer", *EVAL],
                        r"--tokenizer \S*empty_tokenizer: cannot load a tokenizer"),
    # output locations (checked before anything else)
    "out_below_regular_file": (["merge", "A", "B", HELD, "--out", "ROOT/afile/soup"],
                               r"--out \S*afile/soup cannot be created: \S*afile is a file, not a "
                               r"folder"),
    "out_is_a_file": (["merge", "A", "B", HELD, "--out", "ROOT/afile"],
                      r"--out \S*afile exists and is not a folder"),
    "out_checked_first": (["merge", "ROOT/checkpoint-999", "B", "--out", "ROOT/afile/soup"],
                          r"--out \S*afile/soup cannot be created"),
    "out_not_empty": (["merge", "A", "B", *FIXED, "--out", "ROOT/taken"],
                      r"--out \S*taken exists and is not empty; pass --overwrite"),
    "out_unwritable": (["merge", "A", "B", *FIXED, "--out", "RO/soup"],
                       r"--out \S*readonly/soup is not writable: no permission to create files "
                       r"in its parent"),
    "out_inside_input": (["merge", "A", "B", *FIXED, "--out", "A/soup"],
                         r"overlaps an input"),
    "sweep_out_below_file": (["sweep", "A", "B", HELD, "--out", "ROOT/afile/sweep"],
                             r"--out \S*afile/sweep cannot be created"),
    "heatmap_out_unwritable": (["heatmap", "A", "B", HELD, "--out", "RO/heat"],
                               r"--out \S*readonly/heat is not writable"),
    # options
    "max_batches_zero": (["merge", "A", "B", HELD, "--max_batches", "0"],
                         r"argument --max_batches: expected an integer >= 1 or 'all', got '0' "
                         r"\(see 'merge-callback merge --help'\)"),
    "unknown_option": (["merge", "A", "B", "--bogus"], r"unrecognized arguments: --bogus"),
    "bad_method": (["merge", "A", "B", "--method", "magic"],
                   r"argument --method: invalid choice: 'magic'"),
    "unknown_command": (["blend", "A", "B"], r"argument COMMAND: invalid choice: 'blend'"),
    "weights_sum": (["merge", "A", "B", "--weights", "0.4,0.5"],
                    r"--weights must sum to 1, got sum 0\.9"),
    "config_not_yaml": (["merge", "A", "B", "--config", "ROOT/bad.yaml"],
                        r"--config \S*bad\.yaml is not valid YAML"),
    "config_unknown_key": (["merge", "A", "B", "--config", "ROOT/unknown.yaml"],
                           r"unknown option 'budgett' for 'merge'"),
}
NEEDS_LOCK = {"out_unwritable", "heatmap_out_unwritable"}


def _argv(template, ws, case):
    files = ws["files"]
    pattern = re.compile(r"\b(" + "|".join(sorted(files, key=len, reverse=True)) + r")\b")
    argv = [pattern.sub(lambda m: str(files[m.group(1)]), a) for a in template]
    if "--out" not in argv:
        argv += ["--out", str(ws["root"] / f"out-{case}")]
    return argv


def test_enough_distinct_cases():
    assert len(CASES) >= 25
    assert len({tuple(a) for a, _ in CASES.values()}) == len(CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(ws, case, capsys):
    if case in NEEDS_LOCK and not ws["locked"]:
        pytest.skip("cannot make a folder unwritable here")
    template, match = CASES[case]
    argv = _argv(template, ws, case)
    before = _snapshot(ws["root"])
    code = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("merge-callback: error: "), err
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
    assert captured.out == ""
    assert _snapshot(ws["root"]) == before
    assert not (ws["root"] / "PWNED").exists() and not (ws["root"] / "PWNED2").exists()
