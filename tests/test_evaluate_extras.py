"""HeldoutEvaluator.last_extras: loss, perplexity and accuracy from the metric's forward passes."""

import math
import sys

import pytest
import torch

from merge_callback.evaluate import HeldoutEvaluator, resolve_metric


def batches(n=3, b=4, t=12, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (b, t), generator=g)} for _ in range(n)]


def masked(data):
    """Every batch with its last 4 positions masked and its first label ignored."""
    out = []
    for batch in data:
        x = batch["input_ids"]
        mask = torch.ones_like(x)
        mask[:, -4:] = 0
        labels = x.clone()
        labels[:, 1] = -100
        out.append({"input_ids": x, "attention_mask": mask, "labels": labels})
    return out


class ForwardCounter:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1


@pytest.mark.parametrize("prepare", [lambda d: d, masked], ids=["plain", "masked"])
def test_side_values_equal_direct_evaluations(tiny_neox, prepare):
    data = prepare(batches())
    direct = {name: HeldoutEvaluator(data, resolve_metric(name))(tiny_neox)
              for name in ("loss", "accuracy")}
    for name in ("loss", "perplexity", "accuracy"):
        ev = HeldoutEvaluator(data, resolve_metric(name))
        value = ev(tiny_neox)
        # bitwise: the totals are the built-in metrics' own, from the same logits
        assert ev.last_extras["loss"] == direct["loss"]
        assert ev.last_extras["accuracy"] == direct["accuracy"]
        assert ev.last_extras["perplexity"] == math.exp(direct["loss"])
        assert value == ev.last_extras[name]
    # accuracy by hand
    with torch.no_grad():
        tiny_neox.eval()
        right = total = 0
        for batch in data:
            pred = tiny_neox(input_ids=batch["input_ids"],
                             attention_mask=batch.get("attention_mask")).logits[:, :-1].argmax(-1)
            target = batch.get("labels", batch["input_ids"])[:, 1:]
            valid = target != -100
            if "attention_mask" in batch:
                valid &= batch["attention_mask"][:, 1:] == 1
            right += ((pred == target) & valid).sum().item()
            total += valid.sum().item()
    assert direct["accuracy"] == right / total


def test_no_extra_forward_pass(tiny_neox):
    counter = ForwardCounter(tiny_neox)
    data = batches(n=5)
    ev = HeldoutEvaluator(data, resolve_metric("loss"), max_batches=4)
    ev(tiny_neox)
    assert counter.calls == 4 and set(ev.last_extras) == {"loss", "perplexity", "accuracy"}


def test_rank_shares_and_balanced_padding(tiny_neox):
    """Rank 1 of 2 evaluates batches 1 and 3 (side values of those only); a balanced rank with
    fewer batches pads with discarded forwards that change neither the value nor the side values."""
    data = batches(n=5)
    counter = ForwardCounter(tiny_neox)
    rank1 = HeldoutEvaluator(data, resolve_metric("loss"), rank=1, world_size=2)
    rank1(tiny_neox)
    assert counter.calls == 2
    assert rank1.last_extras == _extras([data[1], data[3]], tiny_neox)
    counter.calls = 0
    balanced = HeldoutEvaluator(data, resolve_metric("loss"), rank=1, world_size=2)
    balanced.balanced = True  # as the callbacks set it under FSDP
    assert balanced(tiny_neox) == rank1(tiny_neox)
    assert counter.calls == 3 + 2  # 3 (2 + one padding forward), then 2 for rank1 again
    assert balanced.last_extras == rank1.last_extras


def _extras(data, module):
    ev = HeldoutEvaluator(data, resolve_metric("accuracy"))
    ev(module)
    return ev.last_extras


def test_a_metric_that_owns_its_forward_gives_no_side_values(tiny_neox):
    def token_count(module, batch):
        return batch["input_ids"].numel(), 1

    ev = HeldoutEvaluator(batches(), resolve_metric(token_count, higher_is_better=True))
    assert ev(tiny_neox) == 48
    assert ev.last_extras == {}


def test_lm_eval_metric_without_lm_eval_says_how_to_install(monkeypatch):
    from merge_callback.lmeval import LOCAL_TASK, LmEvalMetric

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(ImportError, match=r"pip install 'merge_callback\[eval\]'"):
        LmEvalMetric([LOCAL_TASK], tokenizer="unused")


def test_a_loss_chosen_round_gives_the_soups_accuracy(tiny_neox):
    """A real run_round choosing λ on the loss: the side values read after each evaluation (the
    adapters' on_evaluation hook) hold, for the chosen λ, the accuracy of that soup evaluated
    directly."""
    import copy

    from merge_callback.engine import RoundConfig, Snapshot, pairwise_family, run_round
    from merge_callback.merge import lerp_state_dicts

    other = copy.deepcopy(tiny_neox)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    previous, latest = Snapshot.capture(other, 1), Snapshot.capture(tiny_neox, 2)
    data = batches(n=4)
    ev = HeldoutEvaluator(data, resolve_metric("loss"))
    seen = {}
    result = run_round(tiny_neox, {"previous": previous, "latest": latest},
                       [pairwise_family("previous", "latest", 0.5)], ev, RoundConfig(budget=4),
                       on_evaluation=lambda lam, value: seen.__setitem__(lam, dict(ev.last_extras)))
    assert set(seen) == {lam for lam, _ in result.observations} | {0.0}
    soup = copy.deepcopy(tiny_neox)
    soup.load_state_dict(lerp_state_dicts(previous.tensors, latest.tensors, result.lam))
    assert seen[result.lam]["accuracy"] == HeldoutEvaluator(data, resolve_metric("accuracy"))(soup)
    assert seen[result.lam]["loss"] == result.value_soup
    assert seen[1.0]["accuracy"] == HeldoutEvaluator(data, resolve_metric("accuracy"))(tiny_neox)
