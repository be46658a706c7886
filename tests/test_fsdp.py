import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy,
                                          ModelParallelStrategy, SingleDeviceStrategy)
from safetensors.torch import load_file

from lightning_helpers import loaders, module
from merge_callback.engine import (ChosenSoup, RoundResult, ShardedSnapshot, Snapshot,
                                   capture_snapshot, is_sharded, pairwise_family)
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric
from merge_callback.fsdp import main
from merge_callback.lightning import UnsupportedStrategyError, check_strategy_supported
from merge_callback.io.soups import SHARDED_FORMAT, consolidate_sharded_soup, read_sharded_soup
from merge_callback.merge import lerp_state_dicts
from test_ddp import launch

SUPPORTED = r"Supported: single-device strategies, DDPStrategy, DeepSpeedStrategy \(ZeRO " \
            r"stages 1-3\), FSDPStrategy \(FSDP1, FULL_SHARD / SHARD_GRAD_OP / NO_SHARD\), and " \
            r"ModelParallelStrategy with tensor_parallel_size=1 and fully_shard \(FSDP2\)"


# ----------------------------------------------------------------------------- strategy check

def test_supported_strategies_of_real_trainers():
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert check_strategy_supported(single) == "single"
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_progress_bar=False)
    assert check_strategy_supported(ddp) == "ddp"
    fsdp2 = L.Trainer(accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                      strategy=ModelParallelStrategy(data_parallel_size=2,
                                                     tensor_parallel_size=1))
    assert check_strategy_supported(fsdp2) == "fsdp2"
    assert check_strategy_supported(SingleDeviceStrategy("cpu")) == "single"
    assert check_strategy_supported(DDPStrategy()) == "ddp"
    assert check_strategy_supported(FSDPStrategy()) == "fsdp1"
    assert check_strategy_supported(FSDPStrategy(sharding_strategy="NO_SHARD")) == "fsdp1"


def _deepspeed(zero: dict) -> DeepSpeedStrategy:
    # DeepSpeedStrategy() needs the deepspeed package and a GPU; the check reads only its config
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = {"zero_optimization": zero}
    return strategy


def test_deepspeed_stages_map_to_replicated_or_shard_local_merges():
    assert check_strategy_supported(_deepspeed({"stage": 1})) == "deepspeed"
    assert check_strategy_supported(_deepspeed({"stage": 2}), pairwise_only=False) == "deepspeed"
    assert check_strategy_supported(_deepspeed({"stage": 3})) == "zero3"
    assert check_strategy_supported(
        _deepspeed({"stage": 3, "offload_param": {"device": "cpu"}})) == "zero3"


@pytest.mark.parametrize("zero,match", [
    ({"stage": 3, "offload_param": {"device": "nvme"}},
     r"ZeRO-3 with offload_param\.device='nvme' keeps the parameter "
     r"partitions on NVMe, where they cannot be merged in place; HINT: offload_param\.device "
     r"'cpu' or 'none'\. " + SUPPORTED),
    ({"stage": 3, "zero_hpz_partition_size": 8},
     r"ZeRO\+\+ zero_hpz_partition_size=8 keeps secondary partitions .*HINT: "
     r"zero_hpz_partition_size=1\. " + SUPPORTED),
    ({"stage": 3, "mics_shard_size": 4},
     r"MiCS \(mics_shard_size=4\) partitions parameters over groups smaller than all ranks"),
])
def test_deepspeed_settings_without_local_views_are_refused(zero, match):
    with pytest.raises(UnsupportedStrategyError,
                       match=r"BayesMergeCallback does not support DeepSpeedStrategy: " + match):
        check_strategy_supported(_deepspeed(zero))


@pytest.mark.parametrize("sharding", ["HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"])
def test_fsdp1_hybrid_sharding_is_refused(sharding):
    with pytest.raises(UnsupportedStrategyError,
                       match=r"BayesMergeCallback does not support FSDPStrategy with "
                             rf"sharding_strategy={sharding}: parameters are sharded within "
                             r"groups smaller than all ranks\. HINT: use sharding_strategy="
                             r"'FULL_SHARD' or 'SHARD_GRAD_OP'\. " + SUPPORTED):
        check_strategy_supported(FSDPStrategy(sharding_strategy=sharding,
                                              auto_wrap_policy={torch.nn.Linear}))


@pytest.mark.parametrize("strategy,what", [
    (lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "FSDP2"),
    (lambda: FSDPStrategy(), "FSDP1"),
    (lambda: _deepspeed({"stage": 3}), "DeepSpeed ZeRO-3"),
])
def test_sharded_strategies_support_only_pairwise_merges(strategy, what):
    with pytest.raises(UnsupportedStrategyError,
                       match=r"BayesMergeCallback\(history > 2, ema_decays or snapshot_every\) "
                             rf"does not support \w+Strategy: with sharded \({what}\) weights "
                             r"only the pairwise merge .* HINT: use the defaults history=2"):
        check_strategy_supported(strategy(), pairwise_only=False)
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_progress_bar=False)
    assert check_strategy_supported(ddp, pairwise_only=False) == "ddp"


@pytest.mark.parametrize("tp", [2, "auto"])
def test_tensor_parallel_is_refused(tp):
    trainer = L.Trainer(accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                        strategy=ModelParallelStrategy(data_parallel_size=1,
                                                       tensor_parallel_size=tp))
    with pytest.raises(UnsupportedStrategyError,
                       match=r"does not support ModelParallelStrategy with "
                             r"tensor_parallel_size=2: held-out batches are split across "
                             r"data-parallel ranks only"):
        check_strategy_supported(trainer)


# ----------------------------------------------------------------------------- one process

class BalancedHeldoutEvaluator(HeldoutEvaluator):
    balanced = True


def write_any_soup(soup_dir, stem, previous, latest, result, *, is_global_zero=True):
    """The pairwise soup at ``result.lam`` written the way the snapshots call for."""
    soup = ChosenSoup(result, pairwise_family("previous", "latest", 0.5),
                      {"previous": previous, "latest": latest})
    return soup.write_files(soup_dir, stem, is_writer=is_global_zero)


def write_sharded_soup(soup_dir, stem, previous, latest, result):
    assert isinstance(latest, ShardedSnapshot)
    return write_any_soup(soup_dir, stem, previous, latest, result)


def _result(lam: float, step: int = 2) -> RoundResult:
    return RoundResult(step=step, previous_step=step - 1, lam=lam, value_soup=1.0,
                       value_latest=1.5, value_previous=2.0, observations=((lam, 1.0),),
                       metric="loss", higher_is_better=False, alpha=0.5, budget=3,
                       strategy="bayes", acq_func="gp_hedge", seconds=0.1)


def test_unsharded_module_uses_the_plain_snapshot_and_soup(tmp_path):
    m = module()
    assert not is_sharded(m)
    prev = capture_snapshot(m, 1)
    assert type(prev) is Snapshot
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    latest = capture_snapshot(m, 2)
    path = write_any_soup(tmp_path, "soup-step=2", prev, latest, _result(0.25),
                          is_global_zero=True)
    assert path == tmp_path / "soup-step=2.safetensors"
    expect = lerp_state_dicts(prev.tensors, latest.tensors, 0.25)
    got = load_file(str(path))
    assert all(torch.equal(got[k], expect[k]) for k in expect)
    assert write_any_soup(tmp_path / "other", "s", prev, latest, _result(0.25),
                          is_global_zero=False) is None
    assert not (tmp_path / "other").exists()


def test_sharded_soup_of_one_process_round_trips(tmp_path):
    # without a process group every tensor is one whole piece owned by rank 0
    m = module()
    prev = ShardedSnapshot.capture(m, 1)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.5)
    latest = ShardedSnapshot.capture(m, 2)
    assert all(lay.owner and lay.offset == (0,) * len(lay.shape)
               for lay in latest.layouts.values())
    folder = write_sharded_soup(tmp_path, "soup-step=2", prev, latest, _result(0.3))
    assert folder == tmp_path / "soup-step=2.sharded"
    assert sorted(p.name for p in folder.iterdir()) == ["index.json",
                                                        "shard-00000-of-00001.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup-step=2.json",
                                                          "soup-step=2.sharded"]
    index = json.loads((folder / "index.json").read_text())
    assert index["format"] == SHARDED_FORMAT and index["world_size"] == 1
    assert index["keys"] == list(m.state_dict())
    expect = lerp_state_dicts(prev.tensors, latest.tensors, 0.3)
    for src in (folder, folder / "index.json", tmp_path / "soup-step=2.json"):
        tensors, meta = read_sharded_soup(src)
        assert list(tensors) == list(expect) and meta["lambda"] == 0.3 and meta["step"] == 2
        assert all(torch.equal(tensors[k], expect[k]) for k in expect)
    out = consolidate_sharded_soup(folder, tmp_path / "soup.safetensors")
    got = load_file(str(out))
    assert all(torch.equal(got[k], expect[k]) for k in expect)
    assert main([str(tmp_path / "soup-step=2.json"), str(tmp_path / "cli.safetensors")]) == 0
    cli = load_file(str(tmp_path / "cli.safetensors"))
    assert all(torch.equal(cli[k], expect[k]) for k in expect)


def test_reading_a_broken_sharded_soup_names_the_problem(tmp_path):
    m = module()
    snap = ShardedSnapshot.capture(m, 1)
    folder = write_sharded_soup(tmp_path, "s", snap, snap, _result(1.0))
    with pytest.raises(ValueError, match=r"out must be a \.safetensors file when no model is "
                                         r"given, got .*soup\.bin"):
        consolidate_sharded_soup(folder, tmp_path / "soup.bin")
    index = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**index, "format": "other"}))
    with pytest.raises(ValueError, match=r"is not a sharded soup index: format is 'other'"):
        read_sharded_soup(folder)
    (folder / "index.json").write_text(json.dumps(index))
    (folder / "shard-00000-of-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"is missing 1 of 1 shard files "
                                                r"\(e\.g\. shard-00000-of-00001\.safetensors\)"):
        read_sharded_soup(folder)
    with pytest.raises(FileNotFoundError, match=r"sharded soup not found"):
        read_sharded_soup(tmp_path / "nope.sharded")


def test_balanced_evaluator_matches_the_plain_one_on_one_process():
    m = module()
    _, heldout = loaders()
    metric = resolve_metric("loss")
    assert BalancedHeldoutEvaluator(heldout, metric)(m) == HeldoutEvaluator(heldout, metric)(m)


def test_balanced_evaluator_pads_the_rank_with_fewer_batches():
    m = module()
    _, heldout = loaders()
    n = len(heldout)
    assert n % 2 == 1  # rank 1 of 2 gets one batch fewer than rank 0
    metric = resolve_metric("loss")
    calls = []
    m.register_forward_hook(lambda *_: calls.append(1))
    for cls, expected in ((HeldoutEvaluator, n // 2), (BalancedHeldoutEvaluator, n // 2 + 1)):
        calls.clear()
        ev = cls(heldout, metric, rank=1, world_size=2)
        _, _, batches = ev.totals(m)
        assert batches == n // 2  # the padding forward is not counted
        assert len(calls) == expected, cls.__name__


# ----------------------------------------------------------------------------- two ranks

def _ckpt(root: Path, step: int) -> dict:
    (path,) = root.glob(f"*step={step}.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


def test_fsdp2_two_ranks_build_soups_shard_locally(tmp_path):
    launch("fsdp_script.py", tmp_path, sys.executable)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["mode"] for r in ranks] == ["fsdp2", "fsdp2"]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["observations"] == ranks[1]["observations"]
    (entry,) = ranks[0]["history"]
    assert entry["step"] == 10 and entry["previous_step"] == 5
    # every rank holds exactly half of the weights (all dims divide by 2)
    for r in ranks:
        assert r["sharded_snapshot"] and r["snapshot_bytes"] * 2 == r["full_bytes"]
    # 3 held-out batches: rank 0 evaluated 2, rank 1 one (plus a discarded padding forward)
    assert ranks[0]["evaluated_batches"] == 3

    root = tmp_path / "merge" / "ckpt"
    soups = root / "soups"
    assert sorted(p.name for p in soups.iterdir()) == ["soup-step=10.json",
                                                       "soup-step=10.sharded"]
    assert sorted(p.name for p in (soups / "soup-step=10.sharded").iterdir()) == [
        "index.json", "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    ck5, ck10 = _ckpt(root, 5)["state_dict"], _ckpt(root, 10)["state_dict"]
    lam = entry["lambda"]
    soup, meta = read_sharded_soup(soups / "soup-step=10.json")
    assert meta["lambda"] == lam and list(soup) == list(ck10)
    expect = lerp_state_dicts(ck5, ck10, lam)
    assert all(torch.equal(soup[k], expect[k]) for k in expect)
    # a soup at lambda 0.7, written by both ranks, is the exact lerp of the full checkpoints
    fixed, _ = read_sharded_soup(tmp_path / "fixed" / "soup.sharded")
    expect = lerp_state_dicts(ck5, ck10, 0.7)
    assert all(torch.equal(fixed[k], expect[k]) for k in expect)

    # the values the ranks saw equal single-process evaluations of the full weights
    _, heldout = loaders()
    evaluate = HeldoutEvaluator(heldout, resolve_metric("loss"))
    m = module()
    m.load_state_dict(ck10)
    assert entry["value_latest"] == pytest.approx(evaluate(m), rel=1e-9)
    for obs_lam, value in ranks[0]["observations"]:
        m.load_state_dict(lerp_state_dicts(ck5, ck10, obs_lam))
        assert value == pytest.approx(evaluate(m), rel=1e-9), obs_lam

    # training with the callback equals training without it, bitwise (weights and optimizer)
    plain = _ckpt(tmp_path / "plain" / "ckpt", 10)
    merged = _ckpt(root, 10)
    assert all(torch.equal(merged["state_dict"][k], v) for k, v in plain["state_dict"].items())
    for a, b in zip(merged["optimizer_states"][0]["state"].values(),
                    plain["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)

    # consolidation into a Hugging Face folder loads back with from_pretrained
    from transformers import GPTNeoXForCausalLM

    hf_dir = consolidate_sharded_soup(soups / "soup-step=10.sharded", tmp_path / "hf",
                                      model=module().model)
    loaded = GPTNeoXForCausalLM.from_pretrained(hf_dir)
    m.load_state_dict(soup)
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, m(ids))
