"""Streaming merges from checkpoint files: readers, fp32 accumulation, sharded output, binding."""

import hashlib
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_callback.io import load_state_dict
from merge_callback.merge import weighted_average
from merge_callback.stream import (
    INDEX_NAME,
    SINGLE_NAME,
    ModuleBinding,
    TensorReader,
    check_readers_compatible,
    checkpoint_format,
    iter_merged,
    parse_size,
    plan_shards,
    validate_weights,
    write_merged,
)


def _state(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g).to(dtype),
        "layer.0.weight": torch.randn(8, 8, generator=g).to(dtype),
        "layer.0.bias": torch.randn(8, generator=g).to(dtype),
        "head.weight": torch.randn(16, 8, generator=g).to(dtype),
        "step": torch.tensor([100 + seed], dtype=torch.int64),
    }


def _digest(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def three_files(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"c{i}.safetensors"
        save_file(_state(i), str(p))
        paths.append(p)
    return paths


def test_iter_merged_is_bitwise_weighted_average(three_files):
    weights = [0.2, 0.3, 0.5]
    readers = [TensorReader(p) for p in three_files]
    merged = dict(iter_merged(readers, weights))
    expected = weighted_average([load_file(str(p)) for p in three_files], weights)
    assert set(merged) == set(expected)
    for k, v in expected.items():
        assert merged[k].dtype == v.dtype
        assert torch.equal(merged[k], v), k
    # non-floating tensors come from the last checkpoint
    assert merged["step"].item() == 102


def test_one_hot_weights_return_the_checkpoint_exactly(three_files):
    readers = [TensorReader(p) for p in three_files]
    merged = dict(iter_merged(readers, [0.0, 1.0, 0.0]))
    original = load_file(str(three_files[1]))
    for k in ("embed.weight", "layer.0.bias", "head.weight"):
        assert torch.equal(merged[k], original[k])


def test_bf16_inputs_accumulate_in_fp32(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"b{i}.safetensors"
        save_file(_state(i, torch.bfloat16), str(p))
        paths.append(p)
    w = [0.3, 0.3, 0.4]
    merged = dict(iter_merged([TensorReader(p) for p in paths], w))
    sds = [load_file(str(p)) for p in paths]
    key = "embed.weight"
    fp32 = torch.zeros(sds[0][key].shape, dtype=torch.float32)
    for sd, wi in zip(sds, w):
        fp32.add_(sd[key].float(), alpha=wi)
    assert merged[key].dtype == torch.bfloat16
    assert torch.equal(merged[key], fp32.to(torch.bfloat16))
    naive = torch.zeros_like(sds[0][key])
    for sd, wi in zip(sds, w):
        naive.add_(sd[key], alpha=wi)
    assert not torch.equal(naive, merged[key])  # bf16 accumulation would round differently
    expected = weighted_average(sds, w)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


class _CountingReader(TensorReader):
    """A real reader that records how many tensors it has handed out and not yet freed."""

    live = 0
    peak = 0

    def get(self, key):
        t = super().get(key)
        cls = type(self)
        cls.live += 1
        cls.peak = max(cls.peak, cls.live)

        def _freed(c=cls):
            c.live -= 1

        weakref.finalize(t, _freed)
        return t


def test_streaming_holds_at_most_one_tensor_per_input(three_files):
    _CountingReader.live = _CountingReader.peak = 0
    readers = [_CountingReader(p) for p in three_files]
    for _ in iter_merged(readers, [0.2, 0.3, 0.5]):
        pass
    assert 1 <= _CountingReader.peak <= len(readers)
    assert _CountingReader.peak < len(readers[0].keys) * len(readers)


def test_write_merged_single_file(three_files, tmp_path):
    before = [_digest(p) for p in three_files]
    out = tmp_path / "soup"
    files = write_merged([TensorReader(p) for p in three_files], [0.2, 0.3, 0.5], out,
                         metadata={"note": "x"})
    assert files == [SINGLE_NAME]
    got = load_file(str(out / SINGLE_NAME))
    expected = weighted_average([load_file(str(p)) for p in three_files], [0.2, 0.3, 0.5])
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    from safetensors import safe_open

    with safe_open(str(out / SINGLE_NAME), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    assert [_digest(p) for p in three_files] == before  # inputs untouched


def test_write_merged_shards_with_hf_index(three_files, tmp_path):
    out = tmp_path / "sharded"
    # embed 512 B, layer.0.weight 256 B, bias 32 B, head 512 B, step 8 B (float32 / int64)
    files = write_merged([TensorReader(p) for p in three_files], [0.2, 0.3, 0.5], out,
                         max_shard_size=600)
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", INDEX_NAME]
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 512 + 256 + 32 + 512 + 8
    assert set(index["weight_map"].values()) == set(files[:3])
    expected = weighted_average([load_file(str(p)) for p in three_files], [0.2, 0.3, 0.5])
    got = load_state_dict(out)  # the package's own reader of sharded folders
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # a sharded folder is itself a readable checkpoint
    r = TensorReader(out)
    assert r.format == "hf" and set(r.keys) == set(expected)
    assert torch.equal(r.get("head.weight"), expected["head.weight"])


def test_plan_shards_gives_an_oversized_tensor_its_own_shard():
    from merge_callback.stream import TensorSpec

    specs = {"a": TensorSpec((10,), torch.float32), "big": TensorSpec((100,), torch.float32),
             "c": TensorSpec((10,), torch.float32)}
    assert plan_shards(specs, 100) == [["a"], ["big"], ["c"]]
    assert plan_shards(specs, "1KB") == [["a", "big", "c"]]


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6),
                                           ("2GiB", 2 * 2**30), ("1.5kb", 1500), (4096, 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "5 parsecs", "-1GB", 0, True])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="size must be"):
        parse_size(bad)


def test_validate_weights_errors():
    assert validate_weights([0.25, 0.75], 2) == (0.25, 0.75)
    with pytest.raises(ValueError, match="must sum to 1, got sum 0.9"):
        validate_weights([0.4, 0.5], 2)
    with pytest.raises(ValueError, match=">= 0"):
        validate_weights([1.5, -0.5], 2)
    with pytest.raises(ValueError, match="got 3 for 2 checkpoints"):
        validate_weights([0.2, 0.3, 0.5], 2)
    with pytest.raises(ValueError, match="must be numbers"):
        validate_weights(["a", "b"], 2)


def test_incompatible_checkpoints_are_named(tmp_path):
    a = _state(0)
    b = _state(1)
    b["head.weight"] = torch.zeros(12, 8)
    c = _state(2)
    del c["layer.0.bias"]
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in _state(3).items()}
    paths = {}
    for name, sd in {"a": a, "b": b, "c": c, "d": d}.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(sd, str(paths[name]))
    r = {k: TensorReader(p) for k, p in paths.items()}
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(16, 8\) in .*a.safetensors "
                                         r"but \(12, 8\)"):
        check_readers_compatible([r["a"], r["b"]])
    with pytest.raises(ValueError, match=r"different architectures: .*1 tensor\(s\) of .* are "
                                         r"missing \(e.g. 'layer.0.bias'\)"):
        check_readers_compatible([r["a"], r["c"]])
    with pytest.raises(ValueError, match="dtype torch.float32 in .* but torch.float64"):
        check_readers_compatible([r["a"], r["d"]])


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        TensorReader(tmp_path / "missing.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint .*weights.npz"):
        TensorReader(tmp_path / "weights.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint"):
        checkpoint_format(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002."
                                                                      "safetensors"}}))
    with pytest.raises(FileNotFoundError, match="names shard model-00001-of-00002.safetensors"):
        TensorReader(broken)


def test_lightning_layout_torch_file(tmp_path):
    sd = {f"model.{k}": v for k, v in _state(0).items()}
    path = tmp_path / "epoch=0-step=10.ckpt"
    torch.save({"state_dict": sd, "epoch": 0, "global_step": 10,
                "optimizer_states": [{"state": {}}]}, path)
    r = TensorReader(path)
    assert r.format == "torch"
    assert r.keys == list(sd)
    assert r.spec("model.embed.weight").shape == (16, 8)
    assert torch.equal(r.get("model.head.weight"), sd["model.head.weight"])
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"a": torch.ones(1), "b": 3}}, bad)
    with pytest.raises(ValueError, match="entry 'b' is not a tensor"):
        TensorReader(bad)


# --------------------------------------------------------------------------- module binding


@pytest.fixture
def neox_folders(tmp_path, tiny_neox):
    """Two GPT-NeoX checkpoints saved with save_pretrained (file names differ from state_dict's)."""
    folders = []
    for i in range(2):
        with torch.no_grad():
            for p in tiny_neox.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
        folder = tmp_path / f"ckpt{i}"
        tiny_neox.save_pretrained(folder)
        folders.append(folder)
    return folders


def test_binding_follows_the_loaders_renaming(neox_folders):
    from transformers import AutoModelForCausalLM

    readers = [TensorReader(f) for f in neox_folders]
    assert "embed_out.weight" in readers[0].keys  # file name
    model = AutoModelForCausalLM.from_pretrained(neox_folders[0])
    assert "lm_head.weight" in model.state_dict()  # module name
    binding = ModuleBinding.build(model, readers[0], by_content=True)
    assert ("embed_out.weight", "lm_head.weight") in binding.pairs
    assert len(binding.pairs) == len(readers[0].keys)

    binding.load(readers, [0.25, 0.75])
    expected = weighted_average([load_state_dict(f) for f in neox_folders], [0.25, 0.75])
    live = model.state_dict()
    assert torch.equal(live["lm_head.weight"], expected["embed_out.weight"])
    for fk, mk in binding.pairs:
        assert torch.equal(live[mk], expected[fk]), fk

    # the same result as from_pretrained of the written soup
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ours = model(x).logits
    write_merged(readers, [0.25, 0.75], neox_folders[0].parent / "soup")
    (neox_folders[0].parent / "soup" / "config.json").write_bytes(
        (neox_folders[0] / "config.json").read_bytes())
    reloaded = AutoModelForCausalLM.from_pretrained(neox_folders[0].parent / "soup")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, ours)


def test_binding_by_name_with_prefix_and_mismatch(tmp_path, tiny_neox):
    from merge_callback.data import tiny_gpt_neox

    sd = {f"model.{k}": v.clone() for k, v in tiny_neox.state_dict().items()}
    path = tmp_path / "lit.ckpt"
    torch.save({"state_dict": sd}, path)
    target = tiny_gpt_neox(64, seed=5, hidden_size=32, num_layers=2, num_heads=4, max_len=32)
    binding = ModuleBinding.build(target, TensorReader(path), prefix="model.")
    binding.load([TensorReader(path)], [1.0])
    for k, v in tiny_neox.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)
    with pytest.raises(ValueError, match="match no tensor of the evaluation model by its name"):
        ModuleBinding.build(target, TensorReader(path), prefix="")
    wider = tiny_gpt_neox(64, seed=0, hidden_size=64, num_layers=2, num_heads=4, max_len=32)
    with pytest.raises(ValueError, match="has shape .* but the model's .* has"):
        ModuleBinding.build(wider, TensorReader(path), prefix="model.")
    deeper = tiny_gpt_neox(64, seed=0, hidden_size=32, num_layers=3, num_heads=4, max_len=32)
    with pytest.raises(ValueError, match=r"parameter\(s\) of the evaluation model get no tensor"):
        ModuleBinding.build(deeper, TensorReader(path), prefix="model.")
