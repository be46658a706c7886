"""Multiple-choice accuracy from a local JSONL task."""

import json

import pytest
import torch
import torch.nn.functional as F

from merge_callback.evaluate import HeldoutEvaluator, resolve_metric
from merge_callback.tasks import (
    MULTIPLE_CHOICE,
    MultipleChoiceExample,
    choice_scores,
    collate_multiple_choice,
    encode_multiple_choice,
    is_multiple_choice_file,
    multiple_choice_loader,
    multiple_choice_metric,
    read_multiple_choice,
)

QUESTIONS = [
    ("To be, or not to", [" be", " sea", " arms", " mind"]),
    ("Whether 'tis nobler in the", [" mind", " question"]),
    ("The slings and arrows of outrageous", [" fortune", " troubles", " them"]),
    ("Or to take arms against a sea of", [" troubles", " fortune"]),
    ("And by opposing end", [" them", " be", " nobler"]),
    ("", ["To be", "Whether"]),
    ("that is the ", ["question", "mind"]),
    ("suffer The slings and", [" arrows", " arms"]),
]
VOCAB = 300


@pytest.fixture
def model():
    from merge_callback.data import tiny_gpt_neox

    return tiny_gpt_neox(VOCAB, seed=3, hidden_size=32, num_layers=2, num_heads=4,
                         max_len=64).eval()


def brute_force_scores(model, tokenizer, context, choices):
    """Score each choice alone (no batching, no padding)."""
    ex = MultipleChoiceExample(context, tuple(choices), 0)
    enc = encode_multiple_choice(ex, tokenizer)
    out = []
    for ids, n in zip(enc["input_ids"], enc["n_context"]):
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = F.log_softmax(model(x).logits[0].float(), -1)
        out.append(sum(float(logp[t - 1, ids[t]]) for t in range(n, len(ids))))
    return out


def write_task(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scores_and_accuracy_match_unbatched_scoring(tmp_path, model, tiny_tokenizer):
    brute = [brute_force_scores(model, tiny_tokenizer, c, ch) for c, ch in QUESTIONS]
    best = [max(range(len(s)), key=s.__getitem__) for s in brute]
    # label the first five questions with the model's choice, the rest with another one
    labels = [b if i < 5 else (b + 1) % len(QUESTIONS[i][1]) for i, b in enumerate(best)]
    rows = [{"context": c, "choices": ch, "label": lab}
            for (c, ch), lab in zip(QUESTIONS, labels)]
    path = write_task(tmp_path / "task.jsonl", rows)
    loader = multiple_choice_loader(path, tiny_tokenizer, batch_size=3)

    got = []
    for batch in loader:
        with torch.no_grad():
            got += choice_scores(model, batch).tolist()
    flat = [s for scores in brute for s in scores]
    assert got == pytest.approx(flat, abs=1e-4)

    correct = count = 0
    for batch in loader:
        with torch.no_grad():
            c, n = multiple_choice_metric(model, batch)
        correct += float(c)
        count += float(n)
    assert (correct, count) == (5.0, 8.0)
    # the same through the evaluator the callbacks use, with either way of naming the metric
    assert HeldoutEvaluator(loader, MULTIPLE_CHOICE)(model) == 5 / 8
    metric = resolve_metric(multiple_choice_metric, higher_is_better=True)
    assert HeldoutEvaluator(loader, metric)(model) == 5 / 8
    assert multiple_choice_metric.higher_is_better is True


def test_lightning_module_forward_works(tmp_path, model, tiny_tokenizer):
    from merge_callback.lm import CausalLMModule

    rows = [{"context": c, "choices": ch, "label": 0} for c, ch in QUESTIONS]
    loader = multiple_choice_loader(write_task(tmp_path / "t.jsonl", rows), tiny_tokenizer)
    assert HeldoutEvaluator(loader, MULTIPLE_CHOICE)(CausalLMModule(model)) == \
        HeldoutEvaluator(loader, MULTIPLE_CHOICE)(model)


def test_encoding_moves_trailing_whitespace_and_fills_empty_context(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_multiple_choice(MultipleChoiceExample("that is the ", ("question",), 0), tok)
    ids, n = enc["input_ids"][0], enc["n_context"][0]
    assert ids[:n] == tok("that is the", add_special_tokens=False)["input_ids"]
    assert ids[n:] == tok(" question", add_special_tokens=False)["input_ids"]
    enc = encode_multiple_choice(MultipleChoiceExample("", ("To be", "Whether"), 1), tok)
    assert [row[0] for row in enc["input_ids"]] == [tok.bos_token_id] * 2
    assert enc["n_context"] == [1, 1] and enc["label"] == 1


def test_long_context_is_cut_from_the_left(tiny_tokenizer):
    ex = MultipleChoiceExample("To be, or not to be, that is the question:" * 3, (" Whether",), 0)
    full = encode_multiple_choice(ex, tiny_tokenizer)
    cut = encode_multiple_choice(ex, tiny_tokenizer, max_length=8)
    cont = full["input_ids"][0][full["n_context"][0]:]
    assert len(cut["input_ids"][0]) == 8
    assert cut["input_ids"][0] == full["input_ids"][0][-8:]
    assert cut["input_ids"][0][cut["n_context"][0]:] == cont
    with pytest.raises(ValueError, match="leaves no room for context in max_length=2"):
        encode_multiple_choice(MultipleChoiceExample("a", (" Whether 'tis nobler",), 0),
                               tiny_tokenizer, max_length=2)


def test_collate_layout():
    items = [{"input_ids": [[5, 6, 7], [5, 6]], "n_context": [2, 2], "label": 1},
             {"input_ids": [[9, 1], [9, 2], [9, 3, 4, 4]], "n_context": [1, 1, 1], "label": 2}]
    b = collate_multiple_choice(items, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [5, 6, 0, 0], [9, 1, 0, 0], [9, 2, 0, 0],
                                       [9, 3, 4, 4]]
    assert b["attention_mask"].sum(1).tolist() == [3, 2, 2, 2, 4]
    assert b["continuation_mask"].tolist()[0] == [False, False, True, False]
    assert b["continuation_mask"].tolist()[4] == [False, True, True, True]
    assert b["question"].tolist() == [0, 0, 1, 1, 1]
    assert b["choice"].tolist() == [0, 1, 0, 1, 2]
    assert b["label"].tolist() == [1, 2]


@pytest.mark.parametrize("line,match", [
    ("{not json", r"task.jsonl:2 is not valid JSON"),
    ('{"context": "a", "choices": ["x", "y"]}', r"task.jsonl:2: missing field\(s\) label"),
    ('{"context": "a", "choices": ["x", "y"], "label": 2}',
     r"'label' must be an integer index into choices \(0..1\), got 2"),
    ('{"context": "a", "choices": ["x"], "label": 0}', "at least 2 non-empty strings"),
    ('{"context": 3, "choices": ["x", "y"], "label": 0}', "'context' must be a string"),
    ('{"context": "a", "choices": ["x", "y"], "label": true}', "'label' must be an integer"),
    ('["a", "b"]', "expected an object"),
])
def test_bad_task_lines_are_named(tmp_path, line, match):
    path = tmp_path / "task.jsonl"
    path.write_text('{"context": "ok", "choices": ["x", "y"], "label": 0}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        read_multiple_choice(path)


def test_reading_and_detection(tmp_path):
    with pytest.raises(FileNotFoundError, match="multiple-choice task not found"):
        read_multiple_choice(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no questions"):
        read_multiple_choice(empty)
    task = write_task(tmp_path / "task.jsonl", [{"context": "a", "choices": ["x", "y"],
                                                  "label": 1}])
    text = write_task(tmp_path / "text.jsonl", [{"text": "hello"}])
    assert read_multiple_choice(task) == [MultipleChoiceExample("a", ("x", "y"), 1)]
    assert is_multiple_choice_file(task)
    assert not is_multiple_choice_file(text)
    assert not is_multiple_choice_file(empty)


def test_loader_validates_batch_size(tmp_path, tiny_tokenizer):
    task = write_task(tmp_path / "task.jsonl", [{"context": "a", "choices": ["x", "y"],
                                                  "label": 1}])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        multiple_choice_loader(task, tiny_tokenizer, batch_size=0)


def test_lightning_callback_scores_rounds_with_the_task(tmp_path, tiny_tokenizer):
    """BayesMergeCallback with metric=multiple_choice_metric on a real Trainer run."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from merge_callback.data import BlockDataset, tiny_gpt_neox, tokenize_and_pack
    from merge_callback.lightning import BayesMergeCallback
    from merge_callback.lm import CausalLMModule
    from conftest import TINY_TEXT

    blocks = tokenize_and_pack([TINY_TEXT] * 8, tiny_tokenizer, 16)
    train = DataLoader(BlockDataset(blocks), batch_size=4)
    rows = [{"context": c, "choices": ch, "label": 0} for c, ch in QUESTIONS]
    heldout = multiple_choice_loader(write_task(tmp_path / "t.jsonl", rows), tiny_tokenizer,
                                     batch_size=4)
    module = CausalLMModule(tiny_gpt_neox(VOCAB, seed=0, hidden_size=32, num_layers=2,
                                          num_heads=4, max_len=32), lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    callback = BayesMergeCallback(heldout=heldout, metric=multiple_choice_metric,
                                  higher_is_better=True, budget=3, on_error="raise")
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=8, accelerator="cpu", devices=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ckpt, callback], num_sanity_val_steps=0)
    trainer.fit(module, train)
    sidecars = sorted((tmp_path / "ckpt" / "soups").glob("*.json"))
    assert len(sidecars) == 1
    info = json.loads(sidecars[0].read_text())
    assert info["metric"] == "multiple_choice_metric" and info["higher_is_better"] is True
    # the round's score of the latest weights is the task accuracy of the step-8 checkpoint
    state = torch.load(sorted((tmp_path / "ckpt").glob("*step=8.ckpt"))[0],
                       weights_only=True)["state_dict"]
    module.load_state_dict(state)
    assert info["value_latest"] == HeldoutEvaluator(heldout, MULTIPLE_CHOICE)(module)
    assert all(v * 8 == round(v * 8) for _, v in info["observations"])  # fractions of 8
