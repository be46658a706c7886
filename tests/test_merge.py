import pytest
import torch

from merge_callback.merge import (check_compatible, lerp_state_dicts, lerp_tensors_,
                                  unique_tensors, weighted_average)


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g, dtype=torch.float64),
         "h": torch.randn(4, generator=g).to(torch.bfloat16), "n": torch.tensor(3),
         "mask": torch.tensor([True, False])}
    b = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g, dtype=torch.float64),
         "h": torch.randn(4, generator=g).to(torch.bfloat16), "n": torch.tensor(7),
         "mask": torch.tensor([False, True])}
    return a, b


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.87, 1.0])
def test_lerp_state_dicts_is_torch_lerp_bitwise(lam):
    a, b = _pair()
    out = lerp_state_dicts(a, b, lam)
    for k in ("w", "b", "h"):
        assert torch.equal(out[k], torch.lerp(a[k], b[k], lam))
        assert out[k].dtype == a[k].dtype
    # integer and bool tensors come from the latest checkpoint
    assert out["n"].item() == 7 and out["mask"].tolist() == [False, True]
    assert list(out) == list(b)


def test_lerp_endpoints_are_exact():
    a, b = _pair()
    assert torch.equal(lerp_state_dicts(a, b, 1.0)["w"], b["w"])
    assert torch.equal(lerp_state_dicts(a, b, 0.0)["w"], a["w"])


def test_lerp_formula_matches_definition():
    a = {"w": torch.tensor([0.0, 1.0, 2.0])}
    b = {"w": torch.tensor([4.0, 5.0, 6.0])}
    assert lerp_state_dicts(a, b, 0.25)["w"].tolist() == [1.0, 2.0, 3.0]  # 0.25*b + 0.75*a


def test_mismatches_name_the_tensor():
    a, b = _pair()
    with pytest.raises(ValueError, match=r"tensor 'w' has shape \(5, 3\) in previous but \(3, 5\)"):
        lerp_state_dicts(a, {**b, "w": torch.zeros(3, 5)}, 0.5)
    with pytest.raises(ValueError, match=r"tensor 'b' has dtype torch.float64 in previous but "
                                         r"torch.float32"):
        lerp_state_dicts(a, {**b, "b": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match=r"key\(s\) only in latest \(e.g. 'extra'\)"):
        check_compatible(a, {**b, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\], got 1.5"):
        lerp_state_dicts(a, b, 1.5)


def test_lerp_tensors_in_place_equals_torch_lerp():
    a, b = _pair()
    keys = ["w", "b", "h"]
    out = [torch.empty_like(a[k]) for k in keys]
    for lam in (0.0, 0.61, 1.0):
        lerp_tensors_(out, [a[k] for k in keys], [b[k] for k in keys], lam)
        for o, k in zip(out, keys):
            assert torch.equal(o, torch.lerp(a[k], b[k], lam))


def test_weighted_average_exact_and_validated():
    sds = [{"w": torch.full((2,), float(i)), "n": torch.tensor(i)} for i in range(3)]
    out = weighted_average(sds, [0.5, 0.25, 0.25])
    assert out["w"].tolist() == [0.75, 0.75] and out["n"].item() == 2
    bf = [{"w": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)}, {"w": torch.tensor([2.0, 5.0], dtype=torch.bfloat16)}]
    assert weighted_average(bf, [0.5, 0.5])["w"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="weights must sum to 1, got sum 0.9"):
        weighted_average(sds, [0.5, 0.2, 0.2])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        weighted_average(sds, [1.5, -0.25, -0.25])
    with pytest.raises(ValueError, match="got 2 weights for 3 state dicts"):
        weighted_average(sds, [0.5, 0.5])


def test_unique_tensors_drops_tied_weights():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    sd = model.state_dict()
    assert list(sd) == ["emb.weight", "head.weight"]
    assert list(unique_tensors(sd)) == ["emb.weight"]
