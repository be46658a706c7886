"""Shared test configuration: single-threaded torch, offline Hugging Face and W&B."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    torch.set_num_threads(1)
    yield


# ---------------------------------------------------------------------------
# Tiny language-model fixtures (merge_callback.data / merge_callback.lm)
# ---------------------------------------------------------------------------

TINY_VOCAB = 64
TINY_TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them.\n"
)


@pytest.fixture
def tiny_neox():
    """A fresh GPT-NeoX with vocab 64, hidden 32, 2 layers, 4 heads, context 32."""
    pytest.importorskip("transformers")
    from merge_callback.data import tiny_gpt_neox

    return tiny_gpt_neox(TINY_VOCAB, seed=0, hidden_size=32, num_layers=2, num_heads=4, max_len=32)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 300) trained on a few lines of Hamlet."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from merge_callback.data import train_tokenizer

    return train_tokenizer([TINY_TEXT] * 4, vocab_size=300)


# --- end of tiny language-model fixtures -------------------------------------
