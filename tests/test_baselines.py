"""Baseline merges: uniform soup, greedy soup, Fisher-weighted averaging, RegMean."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from merge_callback.baselines import (
    diagonal_fisher,
    fisher_merge,
    fisher_weighted_average,
    gram_matrices,
    greedy_soup,
    main,
    regmean,
    regmean_merge,
    state_dict_scorer,
    uniform_soup,
)
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric
from merge_callback.merge import weighted_average


class ToyLM(nn.Module):
    """Embedding followed by one linear output layer: logits = W·E[x] + b."""

    def __init__(self, vocab: int = 11, dim: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=g))
            self.head.weight.copy_(torch.randn(vocab, dim, generator=g) * 0.5)
            self.head.bias.copy_(torch.randn(vocab, generator=g) * 0.1)
        self.register_buffer("steps", torch.tensor(seed, dtype=torch.long))

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.emb(input_ids))


def _sd(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _batches(vocab: int = 11, n: int = 3, seed: int = 1, with_mask: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {"input_ids": torch.randint(0, vocab, (2, 6), generator=g)}
        if with_mask:
            mask = torch.ones(2, 6, dtype=torch.long)
            mask[1, 4:] = 0
            b["attention_mask"] = mask
        out.append(b)
    return out


# --------------------------------------------------------------------------- uniform


def test_uniform_soup_is_the_plain_average_and_keeps_integers_from_the_last():
    a = {"w": torch.tensor([0.0, 2.0, -1.0]), "step": torch.tensor(3)}
    b = {"w": torch.tensor([1.0, 4.0, 1.0]), "step": torch.tensor(7)}
    out = uniform_soup([a, b])
    assert out["w"].tolist() == [0.5, 3.0, 0.0]
    assert out["step"].item() == 7
    sds = [_sd(ToyLM(seed=s)) for s in range(3)]
    ref = weighted_average(sds, [1 / 3] * 3)
    for k in ref:
        assert torch.equal(uniform_soup(sds)[k], ref[k])
    assert a["w"].tolist() == [0.0, 2.0, -1.0]  # inputs untouched


def test_uniform_soup_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one state dict"):
        uniform_soup([])
    with pytest.raises(ValueError, match="must be a list of state dicts"):
        uniform_soup({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="tensor 'w' has shape"):
        uniform_soup([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])


# --------------------------------------------------------------------------- greedy


def test_greedy_soup_follows_the_rank_order():
    # score = |w - 1.5|: ranks B (0.5), C (1.0), A (1.5). B+C -> 1.75 (0.25, kept);
    # B+C+A -> 1.1667 (0.333, rejected). Taking A first instead would give A+C = 1.25.
    sds = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([2.5])}]
    calls = []

    def score(sd):
        calls.append(float(sd["w"]))
        return abs(float(sd["w"]) - 1.5)

    res = greedy_soup(sds, score)
    assert res.members == (1, 2)
    assert res.state_dict["w"].item() == 1.75
    assert res.soup_score == 0.25
    assert res.scores == (1.5, 0.5, 1.0)
    assert [i for i, _ in res.tried] == [2, 0]
    assert res.tried[1][1] == pytest.approx(abs(3.5 / 3 - 1.5))
    assert len(calls) == 3 + 2

    # the same preference expressed as "higher is better" gives the same soup
    res_hi = greedy_soup(sds, lambda sd: -score(sd), higher_is_better=True)
    assert res_hi.members == (1, 2)
    assert res_hi.state_dict["w"].item() == 1.75
    # the rank, not the input order, decides: the same checkpoints listed as C, A, B
    res_perm = greedy_soup([sds[2], sds[0], sds[1]], score)
    assert res_perm.members == (2, 0) and res_perm.state_dict["w"].item() == 1.75
    # ties rank the later checkpoint first
    assert greedy_soup(sds[:2], lambda sd: 1.0).members[0] == 1


def test_greedy_soup_keeps_the_best_single_when_no_average_helps():
    sds = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}]
    res = greedy_soup(sds, lambda sd: abs(float(sd["w"]) - 1.0))
    assert res.members == (1,)
    assert res.state_dict["w"].item() == 1.0
    with pytest.raises(ValueError, match="score must be a callable"):
        greedy_soup(sds, 3.0)
    with pytest.raises(FloatingPointError, match="NaN"):
        greedy_soup(sds, lambda sd: float("nan"))


def test_greedy_soup_with_a_heldout_evaluator_on_a_real_model(tiny_neox):
    m1 = copy.deepcopy(tiny_neox)
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sds = [_sd(tiny_neox), _sd(m1)]
    batches = [{"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    evaluator = HeldoutEvaluator(batches, resolve_metric("loss"))
    scratch = copy.deepcopy(tiny_neox)
    before = _sd(scratch)
    res = greedy_soup(sds, state_dict_scorer(scratch, evaluator))
    for k, v in scratch.state_dict().items():  # the scratch module's weights are restored
        assert torch.equal(v, before[k])
    best = min(range(2), key=lambda i: res.scores[i])
    assert res.members[0] == best
    scratch.load_state_dict(res.state_dict)
    assert evaluator(scratch) == res.soup_score
    assert res.soup_score <= res.scores[best]


# --------------------------------------------------------------------------- Fisher


def test_diagonal_fisher_is_the_mean_squared_gradient_of_the_summed_log_likelihood():
    model = ToyLM()
    other = ToyLM(seed=3)
    sd = _sd(other)
    batches = _batches(with_mask=True)
    before = _sd(model)
    model.head.weight.requires_grad_(False)
    fisher = diagonal_fisher(model, sd, batches)

    ref = ToyLM()
    ref.load_state_dict(sd)
    expected = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in ref.named_parameters()}
    for b in batches:
        ref.zero_grad()
        logits = ref(b["input_ids"])[:, :-1]
        targets = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)[:, 1:]
        loglik = -F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100,
                                  reduction="sum")
        loglik.backward()
        for k, p in ref.named_parameters():
            expected[k] += p.grad ** 2
    assert set(fisher) == set(expected)
    for k in expected:
        torch.testing.assert_close(fisher[k], expected[k] / len(batches), rtol=1e-6, atol=0)
    # masked targets do not contribute: the head bias of a token seen only there gets no signal
    # from it, so the Fisher differs from the unmasked one
    unmasked = diagonal_fisher(model, sd, [{"input_ids": b["input_ids"]} for b in batches])
    assert not torch.equal(unmasked["head.bias"], fisher["head.bias"])
    # the module is left as it was: weights, requires_grad flags, no gradients
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert model.head.weight.requires_grad is False and model.emb.weight.requires_grad is True
    assert all(p.grad is None for p in model.parameters())
    assert model.training is True


def test_fisher_merge_with_equal_fishers_is_the_uniform_soup_bitwise():
    for n in (2, 4):
        sds = [_sd(ToyLM(seed=s)) for s in range(n)]
        fisher = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(0))
                  for k, v in sds[0].items() if v.is_floating_point()}
        out = fisher_merge(sds, [fisher] * n)
        ref = uniform_soup(sds)
        for k in ref:
            assert torch.equal(out[k], ref[k]), k


def test_fisher_merge_weights_each_entry_by_its_fisher():
    a = {"w": torch.tensor([0.0, 0.0, 8.0]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([4.0, 4.0, 0.0]), "n": torch.tensor(2)}
    fa = {"w": torch.tensor([1.0, 0.0, 0.0])}
    fb = {"w": torch.tensor([3.0, 0.0, 2.0])}
    out = fisher_merge([a, b], [fa, fb], eps=1e-12)
    # entry 0: (1*0 + 3*4)/4 = 3; entry 1: both zero -> uniform 2; entry 2: only b counts -> 0
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 2.0, 0.0]), rtol=0, atol=1e-6)
    assert out["n"].item() == 2
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        fisher_merge([a, b], [fa, fb], eps=0.0)
    with pytest.raises(ValueError, match="got 1 Fishers for 2 state dicts"):
        fisher_merge([a, b], [fa])
    with pytest.raises(ValueError, match="negative entries"):
        fisher_merge([a, b], [fa, {"w": torch.tensor([-1.0, 0.0, 0.0])}])
    with pytest.raises(ValueError, match=r"Fisher of checkpoint 1 for 'w' has shape \(2,\)"):
        fisher_merge([a, b], [fa, {"w": torch.zeros(2)}])


def test_fisher_weighted_average_is_an_entrywise_convex_combination(tiny_neox):
    m1 = copy.deepcopy(tiny_neox)
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sds = [_sd(tiny_neox), _sd(m1)]
    batches = [{"input_ids": torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
    out = fisher_weighted_average(sds, copy.deepcopy(tiny_neox), batches, max_batches=2)
    assert list(out) == list(sds[1])
    moved = 0
    for k, v in out.items():
        if not v.is_floating_point():
            continue
        lo, hi = torch.minimum(sds[0][k], sds[1][k]), torch.maximum(sds[0][k], sds[1][k])
        assert bool(((v >= lo - 1e-6) & (v <= hi + 1e-6)).all()), k
        mid = 0.5 * (sds[0][k] + sds[1][k])
        moved += int((v - mid).abs().gt(1e-4).sum())
    assert moved > 0  # not simply the uniform average
    with pytest.raises(ValueError, match="max_batches must be None or an int >= 1"):
        fisher_weighted_average(sds, tiny_neox, batches, max_batches=0)
    with pytest.raises(ValueError, match="batches yielded no batch"):
        diagonal_fisher(tiny_neox, sds[0], [])


# --------------------------------------------------------------------------- RegMean


def _closed_form_regmean(models, batches, alpha):
    """numpy float64: W* = (Σ G̃_i)^-1 Σ G̃_i W_iᵀ for the head of each ToyLM."""
    total_g, total_gw = 0.0, 0.0
    for m in models:
        xs = []
        for b in batches:
            e = m.emb.weight.detach().double().numpy()[b["input_ids"].numpy()]
            mask = b.get("attention_mask")
            e = e[mask.numpy().astype(bool)] if mask is not None else e.reshape(-1, e.shape[-1])
            xs.append(e.reshape(-1, e.shape[-1]))
        x = np.concatenate(xs)
        g = x.T @ x / x.shape[0]
        g_tilde = alpha * g + (1 - alpha) * np.diag(np.diag(g))
        total_g = total_g + g_tilde
        total_gw = total_gw + g_tilde @ m.head.weight.detach().double().numpy().T
    return np.linalg.solve(total_g, total_gw).T


@pytest.mark.parametrize("alpha", [0.9, 1.0, 0.0])
def test_regmean_of_one_linear_layer_is_the_closed_form(alpha):
    models = [ToyLM(seed=0), ToyLM(seed=1), ToyLM(seed=2)]
    sds = [_sd(m) for m in models]
    batches = _batches(with_mask=True)
    scratch = ToyLM(seed=9)
    before = _sd(scratch)
    out = regmean(sds, scratch, batches, alpha=alpha)
    expected = _closed_form_regmean(models, batches, alpha)
    torch.testing.assert_close(out["head.weight"].double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)
    # everything else is the uniform average
    ref = uniform_soup(sds)
    assert torch.equal(out["head.bias"], ref["head.bias"])
    assert torch.equal(out["emb.weight"], ref["emb.weight"])
    assert out["steps"].item() == 2
    for k, v in scratch.state_dict().items():
        assert torch.equal(v, before[k])


def test_gram_matrices_leave_out_masked_positions_and_regmean_of_equal_weights_is_identity():
    model = ToyLM()
    sd = _sd(model)
    masked = _batches(with_mask=True)
    grams = gram_matrices(model, sd, masked)
    e = model.emb.weight.detach().double()
    rows = torch.cat([e[b["input_ids"][b["attention_mask"].bool()]] for b in masked])
    torch.testing.assert_close(grams["head"], rows.T @ rows / rows.shape[0], rtol=1e-12, atol=1e-12)
    # merging a checkpoint with itself returns its weights
    out = regmean_merge([sd, sd], [grams, grams], alpha=0.9)
    torch.testing.assert_close(out["head.weight"], sd["head.weight"], rtol=1e-6, atol=1e-6)


def test_regmean_on_gpt_neox_touches_every_linear_weight(tiny_neox):
    m1 = copy.deepcopy(tiny_neox)
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sds = [_sd(tiny_neox), _sd(m1)]
    batches = [{"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)),
                "attention_mask": torch.ones(2, 16, dtype=torch.long)} for i in range(2)]
    grams = [gram_matrices(tiny_neox, sd, batches) for sd in sds]
    linears = [n for n, m in tiny_neox.named_modules() if isinstance(m, nn.Linear)]
    assert set(grams[0]) == set(linears) and len(linears) == 9
    out = regmean_merge(sds, grams)
    ref = uniform_soup(sds)
    for k in ref:
        is_linear_weight = k.endswith(".weight") and k[: -len(".weight")] in linears
        assert torch.equal(out[k], ref[k]) != is_linear_weight, k


def test_regmean_rejects_bad_arguments():
    sds = [_sd(ToyLM(seed=0)), _sd(ToyLM(seed=1))]
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        regmean(sds, ToyLM(), _batches(), alpha=1.5)
    with pytest.raises(ValueError, match="batches yielded no batch"):
        gram_matrices(ToyLM(), sds[0], [])
    with pytest.raises(ValueError, match="got 1 Gram dicts for 2 state dicts"):
        regmean_merge(sds, [{"head": torch.eye(5)}])
    with pytest.raises(ValueError, match=r"Gram matrix of 'head' in checkpoint 1 has shape \(4, 4\)"):
        regmean_merge(sds, [{"head": torch.eye(5)}, {"head": torch.eye(4)}])
    with pytest.raises(ValueError, match="has no 'nope.weight'"):
        regmean_merge(sds, [{"nope": torch.eye(5)}, {"nope": torch.eye(5)}])
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        gram_matrices(nn.Embedding(3, 2), {"weight": torch.zeros(3, 2)}, _batches())


def test_regmean_falls_back_to_the_pseudo_inverse_on_a_singular_gram():
    sds = [_sd(ToyLM(seed=0)), _sd(ToyLM(seed=1))]
    g = torch.zeros(5, 5, dtype=torch.float64)
    g[0, 0] = 1.0
    with pytest.warns(RuntimeWarning, match="singular"):
        out = regmean_merge(sds, [{"head": g}, {"head": g}])
    # only input feature 0 is observed: its column is the average, the rest are zero (min-norm)
    torch.testing.assert_close(out["head.weight"][:, 0], ref := uniform_soup(sds)["head.weight"][:, 0])
    assert torch.equal(out["head.weight"][:, 1:], torch.zeros_like(ref)[:, None].expand(-1, 4))


# --------------------------------------------------------------------------- command line


def test_command_line_writes_uniform_and_regmean_soups(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from merge_callback.data import tiny_gpt_neox

    folders = []
    models = []
    for seed in (0, 1):
        m = tiny_gpt_neox(len(tiny_tokenizer), seed=seed, hidden_size=32, num_layers=1, num_heads=4,
                          max_len=32)
        d = tmp_path / f"ckpt{seed}"
        m.save_pretrained(str(d))
        tiny_tokenizer.save_pretrained(str(d))
        folders.append(str(d))
        models.append(m)
    sds = [_sd(m) for m in models]
    assert main(["uniform", *folders, "--out", str(tmp_path / "uni")]) == 0
    uni = AutoModelForCausalLM.from_pretrained(str(tmp_path / "uni")).state_dict()
    ref = uniform_soup(sds)
    for k in ref:
        assert torch.equal(uni[k], ref[k]), k

    text = tmp_path / "heldout.txt"
    text.write_text("Whether 'tis nobler in the mind to suffer the slings and arrows. " * 20)
    assert main(["regmean", *folders, "--out", str(tmp_path / "rm"), "--heldout", str(text),
                 "--block-size", "16", "--batch-size", "4", "--max-blocks", "8"]) == 0
    rm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "rm")).state_dict()
    lin = "gpt_neox.layers.0.mlp.dense_h_to_4h"
    assert not torch.equal(rm[f"{lin}.weight"], ref[f"{lin}.weight"])
    assert torch.equal(rm[f"{lin}.bias"], ref[f"{lin}.bias"])
    with pytest.raises(SystemExit):
        main(["fisher", *folders, "--out", str(tmp_path / "f")])  # --heldout is required
