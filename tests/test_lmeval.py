"""lm-evaluation-harness as the metric that chooses λ (needs the ``eval`` extra: lm-eval)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lightning as L  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

import lmeval_helpers as H  # noqa: E402
from lightning_helpers import trainer as lightning_trainer  # noqa: E402
from merge_callback import BayesMergeCallback, BayesMergeTrainerCallback  # noqa: E402
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric  # noqa: E402
from merge_callback.lm import CausalLMModule  # noqa: E402
from merge_callback.lmeval import (LOCAL_PPL_TASK, LOCAL_TASK, LmEvalMetric,  # noqa: E402
                                   next_line_examples, run_lm_eval, write_next_line_task)

HERE = Path(__file__).parent
LIMIT = 24


def metric(**kw):
    kw.setdefault("limit", LIMIT)
    return LmEvalMetric([LOCAL_TASK], tokenizer=H.tokenizer(), **kw)


def direct_lm_eval(model, limit=LIMIT, task=LOCAL_TASK, **kw):
    """lm-eval run directly (simple_evaluate) on a loaded model."""
    return run_lm_eval(model, [task], H.tokenizer(), limit=limit, **kw)["results"][task]


# ------------------------------------------------------------------------- the metric alone
def test_metric_equals_lm_eval_run_directly_and_restores_the_module():
    model = H.model()
    model.train()
    ev = HeldoutEvaluator([], metric())
    value = ev(model)
    assert model.training  # training flags restored (HFLM puts the model in eval mode)
    assert value == direct_lm_eval(model)["acc,none"]
    assert ev.last_extras == {f"{LOCAL_TASK}/acc": value}
    # acc_norm, and all 128 examples
    ev_norm = HeldoutEvaluator([], metric(metrics="acc_norm", limit=None))
    assert ev_norm(model) == direct_lm_eval(model, limit=None)["acc_norm,none"]


def test_ranks_score_their_share_and_the_sums_equal_one_process():
    """Rank r scores examples r, r + 3, ...; adding the three ranks' totals gives the full value."""
    model = H.model()
    m = metric(limit=23)  # 23 examples: shares of 8, 8 and 7
    assert [len(m.indices(LOCAL_TASK, r, 3)) for r in range(3)] == [8, 8, 7]
    with torch.inference_mode():
        model.eval()
        parts = [m.task_totals(model, r, 3) for r in range(3)]
    total = sum(parts)
    assert total[0, 1].item() == 23
    assert m.value_from_totals(total)[0] == direct_lm_eval(model, limit=23)["acc,none"]
    assert [p[0, 1].item() for p in parts] == [8, 8, 7]


def test_weights_and_direction(tmp_path):
    rows = next_line_examples(H.task_text(), 20, seed=1)
    write_next_line_task(tmp_path, "other_next_line", rows)
    model = H.model()
    m = LmEvalMetric([LOCAL_TASK, "other_next_line"], tokenizer=H.tokenizer(), limit=20,
                     include_path=tmp_path, weights={LOCAL_TASK: 3, "other_next_line": 1})
    assert m.higher_is_better is True
    assert m.name == f"lmeval:{LOCAL_TASK}/acc,other_next_line/acc"
    value = HeldoutEvaluator([], m)(model)
    a = direct_lm_eval(model, limit=20)["acc,none"]
    b = direct_lm_eval(model, limit=20, task="other_next_line", include_path=[tmp_path])["acc,none"]
    assert value == pytest.approx(0.75 * a + 0.25 * b, abs=1e-12)
    assert resolve_metric(m) is m
    with pytest.raises(ValueError, match="contradicts metric"):
        resolve_metric(m, higher_is_better=False)


def test_a_json_task_with_local_data_files_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    yaml = write_next_line_task(tmp_path / "tasks", "json_next_line", H.task_rows()[:12])
    assert "dataset_path: json" in yaml.read_text()
    model = H.model()
    m = LmEvalMetric("json_next_line", tokenizer=H.tokenizer(), include_path=tmp_path / "tasks")
    # the same rows as the shipped task's first 12: the same accuracy
    assert HeldoutEvaluator([], m)(model) == direct_lm_eval(model, limit=12)["acc,none"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=[]), r"tasks must be a non-empty list of task names, got \[\]"),
    (dict(tasks=[LOCAL_TASK, LOCAL_TASK]), "tasks must be distinct"),
    (dict(limit=0), r"limit must be a positive integer or None \(all examples\), got 0"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(tokenizer=None), "tokenizer is required"),
    (dict(weights=[1, 2]), r"weights must have one entry per task \(1\), got 2"),
    (dict(weights=[-1]), "weights must be finite non-negative numbers with a positive sum"),
    (dict(weights={"x": 1}), r"weights must have one entry per task .*unknown \['x'\]"),
    (dict(metrics="f1"), r"task 'merge_callback_next_line' has no metric 'f1'; it has "
                         r"\['acc', 'acc_norm'\]"),
    (dict(metrics={"x": "acc"}), r"metrics names tasks that are not scored: \['x'\]"),
    (dict(tasks=["no_such_task_anywhere"], include_defaults=False),
     r"unknown lm-eval task\(s\) \['no_such_task_anywhere'\]"),
    (dict(include_path="/no/such/folder"), "include_path '/no/such/folder' is not a folder"),
])
def test_bad_arguments(kwargs, match):
    args = dict(tasks=[LOCAL_TASK], tokenizer=H.tokenizer())
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LmEvalMetric(args.pop("tasks"), **args)


def test_batch_loop_use_is_refused():
    m = metric()
    with pytest.raises(TypeError, match="scores the whole module"):
        HeldoutEvaluator([], m).totals(H.model())
    with pytest.raises(TypeError, match="scores a whole module"):
        m.fn(H.model(), {})


# ------------------------------------------------------------------------- both adapters
def ppl_metric():
    return LmEvalMetric([LOCAL_PPL_TASK], tokenizer=H.tokenizer(), limit=LIMIT)


def direct_ppl(model):
    return direct_lm_eval(model, task=LOCAL_PPL_TASK)["word_perplexity,none"]


def check_round(rec, info):
    assert info["metric"] == f"lmeval:{LOCAL_PPL_TASK}/word_perplexity"
    assert info["higher_is_better"] is False
    values = [v for _, v in info["observations"]]
    assert info["value_soup"] == rec["value_soup"] == min(values)
    assert 0.5 <= rec["lambda"] < 1.0  # the soup is a real mix, not the latest weights
    assert len(set(values)) == len(values)  # a continuous score: every λ scores differently


def test_lightning_round_chooses_lambda_on_lm_eval(tmp_path):
    L.seed_everything(0, verbose=False)
    train = DataLoader(H.dataset(80), batch_size=8)
    cb = BayesMergeCallback(metric=ppl_metric(), budget=4)  # lm-eval reads no held-out batches
    tr = lightning_trainer(tmp_path, cb, max_steps=20, every=10)
    tr.fit(CausalLMModule(H.model(), lr=3e-2), train)
    (rec,) = cb.history
    assert rec["step"] == 20
    soups = tmp_path / "ckpt" / "soups"
    check_round(rec, json.loads((soups / "soup-step=20.json").read_text()))
    soup = CausalLMModule(H.model())
    soup.load_state_dict(load_file(str(soups / "soup-step=20.safetensors")))
    # exact: the same tensors, the same lm-eval requests and batches, float32 on the CPU, and
    # the per-example log-likelihoods summed in the same order as lm-eval's aggregation
    assert rec["value_soup"] == direct_ppl(soup.model.eval())


def test_hf_round_chooses_lambda_on_lm_eval(tmp_path):
    def collate(items):
        ids = torch.stack([it["input_ids"] for it in items])
        return {"input_ids": ids, "labels": ids.clone()}

    cb = BayesMergeTrainerCallback(metric=ppl_metric(), budget=4)  # no held-out batches needed
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, save_steps=10,
                             per_device_train_batch_size=8, learning_rate=3e-2,
                             lr_scheduler_type="constant", report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0)
    Trainer(model=H.model(), args=args, train_dataset=H.dataset(80), data_collator=collate,
            callbacks=[cb]).train()
    (rec,) = cb.history
    folder = tmp_path / "soups" / "soup-20"
    check_round(rec, json.loads((folder / "merge.json").read_text()))
    soup = AutoModelForCausalLM.from_pretrained(str(folder))
    assert rec["value_soup"] == direct_ppl(soup.eval())


def test_lightning_ddp_ranks_share_the_examples(tmp_path):
    """Two gloo ranks score 12 + 11 of 23 speeches; the round's value equals lm-eval run in
    one process on the written soup; the loss evaluator's side values equal a direct evaluation."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, str(HERE / "lmeval_ddp_script.py"), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["share"] == 12 and ranks[1]["share"] == 11
    (rec,) = ranks[0]["history"]
    soup = CausalLMModule(H.model())
    soup.load_state_dict(load_file(str(tmp_path / "ckpt" / "soups" / "soup-step=10.safetensors")))
    assert 0.5 <= rec["lambda"] < 1.0
    direct = direct_lm_eval(soup.model.eval(), limit=23,
                            task=LOCAL_PPL_TASK)["word_perplexity,none"]
    # the ranks' log-likelihood sums are added in another order than lm-eval's: float tolerance
    assert rec["value_soup"] == pytest.approx(direct, rel=1e-12)
    # side values of a loss evaluation under DDP (rank shares of the held-out batches, summed)
    heldout = DataLoader(H.dataset(40, offset=200), batch_size=8)
    acc = HeldoutEvaluator(heldout, resolve_metric("accuracy"))(soup)
    loss = HeldoutEvaluator(heldout, resolve_metric("loss"))(soup)
    for rank in ranks:
        assert rank["extras"]["accuracy"] == acc
        assert rank["extras"]["loss"] == pytest.approx(loss, rel=1e-12)
        assert rank["extras"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-12)


def test_example_runs_offline_on_a_text_file(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lmeval_metric",
                                                  HERE.parent / "examples" / "lmeval_metric.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    text = tmp_path / "train.txt"
    text.write_text(H.answer_text(), encoding="utf-8")
    history = example.main(["--output_dir", str(tmp_path / "run"), "--train_text", str(text),
                            "--steps", "20", "--save_every", "10", "--batch_size", "8",
                            "--block_size", "32", "--hidden_size", "32", "--budget", "3",
                            "--limit", "8"])
    assert [r["step"] for r in history] == [20]
    out = capsys.readouterr().out
    # the value the round recorded is what lm-eval gives for the soup read back from disk
    assert (f"lm-eval on the written soup of step 20: {LOCAL_PPL_TASK} word_perplexity "
            f"{history[0]['value_soup']:.4f}") in out


def test_find_lm_takes_the_network_inside_a_lightning_module():
    from merge_callback.lmeval import find_lm

    net = H.model()
    assert find_lm(net) is net and find_lm(CausalLMModule(net)) is net
    with pytest.raises(TypeError, match=r"Sequential must be a transformers PreTrainedModel or "
                                        r"hold exactly one .* found \['0', '1'\]"):
        find_lm(torch.nn.Sequential(H.model(), H.model()))
    with pytest.raises(TypeError, match="found none"):
        find_lm(torch.nn.Linear(2, 2))


def test_fsdp2_ranks_score_every_example_and_agree(tmp_path):
    """Under FSDP2 every forward is a collective: both ranks score all 9 speeches; the value equals
    lm-eval run in one process on the consolidated soup."""
    from merge_callback.io.soups import consolidate_sharded_soup

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, str(HERE / "lmeval_fsdp_script.py"), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["history"] == ranks[1]["history"]
    (rec,) = ranks[0]["history"]
    folder = consolidate_sharded_soup(tmp_path / "ckpt" / "soups" / "soup-step=10.sharded",
                                      tmp_path / "hf", model=H.model())
    soup = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    direct = direct_lm_eval(soup, limit=9, task=LOCAL_PPL_TASK)["word_perplexity,none"]
    assert rec["value_soup"] == pytest.approx(direct, rel=1e-9)


def test_few_shot_prompts_are_the_same_for_every_candidate():
    """The few-shot draws restart from the seed at every evaluation: the same value twice, equal
    to lm-eval's simple_evaluate with the same count (its default few-shot seed)."""
    model = H.model()
    ev = HeldoutEvaluator([], LmEvalMetric([LOCAL_PPL_TASK], tokenizer=H.tokenizer(), limit=6,
                                           num_fewshot=1))
    first = ev(model)
    assert ev(model) == first
    direct = run_lm_eval(model, [LOCAL_PPL_TASK], H.tokenizer(), limit=6, num_fewshot=1)
    assert first == direct["results"][LOCAL_PPL_TASK]["word_perplexity,none"]
    zero_shot = HeldoutEvaluator([], LmEvalMetric([LOCAL_PPL_TASK], tokenizer=H.tokenizer(),
                                                  limit=6))(model)
    assert zero_shot == direct_lm_eval(model, limit=6, task=LOCAL_PPL_TASK)["word_perplexity,none"]


def test_scores_under_the_evaluators_precision_context():
    """bf16 autocast (what Lightning's bf16-mixed plugin enters) changes the score, and it is the
    score lm-eval gives with its own bf16 autocast (HFLM's mixed_precision_dtype)."""
    model = H.model()
    m = LmEvalMetric([LOCAL_PPL_TASK], tokenizer=H.tokenizer(), limit=6)
    fp32 = HeldoutEvaluator([], m)(model)
    bf16 = HeldoutEvaluator([], m, context=lambda: torch.autocast("cpu",
                                                                  dtype=torch.bfloat16))(model)
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)
    direct = direct_lm_eval(model, limit=6, task=LOCAL_PPL_TASK,
                        mixed_precision_dtype="bfloat16")["word_perplexity,none"]
    assert bf16 == direct
    assert HeldoutEvaluator([], m)(model) == fp32  # the next fp32 call is fp32 again
