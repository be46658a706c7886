import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from merge_callback.evaluate import EmptyHeldoutError, HeldoutEvaluator, resolve_metric


def batches(n=3, b=4, t=12, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (b, t), generator=g)} for _ in range(n)]


def manual_loss(model, data):
    tot, cnt = 0.0, 0
    for batch in data:
        x = batch["input_ids"]
        logits = model(input_ids=x).logits[:, :-1]
        tot += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                               reduction="sum").item()
        cnt += x[:, 1:].numel()
    return tot / cnt


def test_loss_equals_token_mean_cross_entropy(tiny_neox):
    data = batches()
    value = HeldoutEvaluator(data, resolve_metric("loss"))(tiny_neox)
    with torch.no_grad():
        tiny_neox.eval()
        assert value == pytest.approx(manual_loss(tiny_neox, data), rel=1e-6)
        # equals Hugging Face's own loss for one batch
        hf = tiny_neox(input_ids=data[0]["input_ids"], labels=data[0]["input_ids"]).loss.item()
    assert HeldoutEvaluator(data[:1], resolve_metric("loss"))(tiny_neox) == pytest.approx(hf, rel=1e-5)


def test_perplexity_and_accuracy(tiny_neox):
    data = batches()
    loss = HeldoutEvaluator(data, resolve_metric("loss"))(tiny_neox)
    ppl = HeldoutEvaluator(data, resolve_metric("perplexity"))(tiny_neox)
    assert ppl == pytest.approx(math.exp(loss), rel=1e-12)
    acc = HeldoutEvaluator(data, resolve_metric("accuracy"))(tiny_neox)
    with torch.no_grad():
        correct = sum((tiny_neox(input_ids=b["input_ids"]).logits[:, :-1].argmax(-1)
                       == b["input_ids"][:, 1:]).sum().item() for b in data)
    assert acc == correct / sum(b["input_ids"][:, 1:].numel() for b in data)


def test_labels_and_attention_mask_exclude_positions(tiny_neox):
    x = batches(1)[0]["input_ids"]
    mask = torch.ones_like(x)
    mask[:, 8:] = 0
    labels = x.clone()
    labels[:, 8:] = -100
    with_mask = HeldoutEvaluator([{"input_ids": x, "attention_mask": mask}], resolve_metric("loss"))
    with_labels = HeldoutEvaluator([{"input_ids": x, "labels": labels}], resolve_metric("loss"))
    short = HeldoutEvaluator([{"input_ids": x[:, :8]}], resolve_metric("loss"))
    assert with_mask.totals(tiny_neox)[1] == 4 * 7
    assert with_labels(tiny_neox) == pytest.approx(short(tiny_neox), rel=1e-5)


def test_restores_modes_and_random_states(tiny_neox):
    tiny_neox.train()
    tiny_neox.gpt_neox.layers[0].eval()  # a mixed-mode module must come back mixed
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    loader = torch.utils.data.DataLoader(batches(4, b=1)[0]["input_ids"], batch_size=2, shuffle=True)
    ev = HeldoutEvaluator(loader, resolve_metric("loss"))
    assert ev(tiny_neox) == ev(tiny_neox)  # a shuffling loader is iterated the same way each time
    assert tiny_neox.training and not tiny_neox.gpt_neox.layers[0].training
    assert torch.equal(states[0], torch.get_rng_state())
    assert states[1] == random.getstate() and np.array_equal(states[2], np.random.get_state()[1])


def test_max_batches_and_manual_sharding_add_up(tiny_neox):
    data = batches(5)
    full = HeldoutEvaluator(data[:4], resolve_metric("loss")).totals(tiny_neox)
    assert HeldoutEvaluator(data, resolve_metric("loss"), max_batches=4).totals(tiny_neox) == full
    parts = [HeldoutEvaluator(data, resolve_metric("loss"), max_batches=4, rank=r, world_size=2)
             .totals(tiny_neox) for r in (0, 1)]
    assert parts[0][2] == parts[1][2] == 2
    assert parts[0][0] + parts[1][0] == pytest.approx(full[0], rel=1e-12)


def test_callable_metric_and_errors(tiny_neox):
    def token_count(module, batch):
        return batch["input_ids"].numel(), 1

    m = resolve_metric(token_count, higher_is_better=True)
    assert m.higher_is_better and m.name == "token_count"
    assert HeldoutEvaluator(batches(2), m)(tiny_neox) == 48
    with pytest.raises(ValueError, match="a callable metric needs higher_is_better=True or False"):
        resolve_metric(token_count)
    with pytest.raises(ValueError, match=r"metric must be one of 'loss', 'perplexity', 'accuracy'"):
        resolve_metric("bleu")
    with pytest.raises(ValueError, match="contradicts metric 'loss'"):
        resolve_metric("loss", higher_is_better=True)
    with pytest.raises(EmptyHeldoutError, match="the held-out data yielded no batches"):
        HeldoutEvaluator([], resolve_metric("loss"))(tiny_neox)
    with pytest.raises(TypeError, match="held-out batches must be a dict with 'input_ids'"):
        HeldoutEvaluator([{"text": "hello"}], resolve_metric("loss"))(tiny_neox)


def test_plain_logits_module_and_tensor_batches():
    class Bigram(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 10)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    m = Bigram()
    x = torch.randint(0, 10, (3, 6))
    with torch.no_grad():
        want = F.cross_entropy(m(x)[:, :-1].reshape(-1, 10), x[:, 1:].reshape(-1)).item()
    assert HeldoutEvaluator([x], resolve_metric("loss"))(m) == pytest.approx(want, rel=1e-6)
