"""The merge callbacks under DeepSpeed ZeRO-2/3 and FSDP1, shard-local (two real CPU processes).

Each two-process run trains a tiny GPT-NeoX with the real callback (Lightning's
``BayesMergeCallback`` or the Hugging Face ``BayesMergeTrainerCallback``), again without it, and
(for some) resumes the first run from its first checkpoint with a fresh callback. The checks: the
soups (the round's, and one at a fixed λ = 0.7 written the same way) are bitwise the lerp of the
consolidated previous and latest weights, also after consolidating the sharded folder; the values
the ranks agreed on equal single-process evaluations of those lerps; training is bitwise
unchanged; a resumed run redoes the same round and writes the same soup.

The first DeepSpeed run JIT-builds DeepSpeed's ``deepspeed_shm_comm_op`` extension (about 40 s
here, cached in ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_helpers import loaders, module
from merge_callback.engine import is_sharded, local_state_dict
from merge_callback.engine.zero import (FlatShardLayout, ReplicatedLayout, evaluation_context,
                                        grad_free_context, is_fsdp1, is_zero3,
                                        local_state_dict_any, local_state_dict_fsdp1,
                                        without_inference_mode,
                                        zero_config_problem)
from merge_callback.evaluate import HeldoutEvaluator, resolve_metric
from merge_callback.io.soups import consolidate_sharded_soup, place_piece, read_sharded_soup
from merge_callback.merge import lerp_state_dicts
from test_ddp import DIST_VARS

HERE = Path(__file__).parent


def _run(cmd: list[str], timeout: int = 600) -> float:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE),
                                           env.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return time.perf_counter() - t0


def _records(path: Path) -> list[dict]:
    return [json.loads((path / f"rank{r}.json").read_text()) for r in (0, 1)]


def _read_soup(path: Path) -> dict[str, torch.Tensor]:
    """A soup as full tensors: a sharded folder (via its sidecar), a safetensors file, or a
    Hugging Face folder (loaded with ``from_pretrained``: the file may rename keys)."""
    if path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path).state_dict()
    if path.suffix == ".sharded":
        return read_sharded_soup(path.with_suffix(".json"))[0]
    return load_file(str(path))


def _assert_lerp(got: dict, previous: dict, latest: dict, lam: float) -> None:
    expect = lerp_state_dicts(previous, latest, lam)
    assert sorted(got) == sorted(expect)
    bad = [k for k in expect if not torch.equal(got[k], expect[k])]
    assert not bad, f"{len(bad)} tensors differ from the lerp at {lam}, e.g. {bad[0]}"


def _check_run(tmp_path: Path, *, mode: str, sharded: bool, step: int, prev_step: int,
               soup: str, fixed: str, plain, resume: bool) -> None:
    """The checks every two-process run shares (see the module docstring)."""
    ranks = _records(tmp_path)
    for r in ranks:
        assert r["world_size"] == 2 and r["mode"] == mode and r["balanced"] == sharded
        assert r["losses_equal"] and r["final_keys_equal"] and r["final_bitwise"]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["observations"] == ranks[1]["observations"]
    (entry,) = ranks[0]["history"]
    assert entry["step"] == step and entry["previous_step"] == prev_step
    lam = entry["lambda"]
    merge = tmp_path / "merge"
    previous = torch.load(merge / f"full-{prev_step}.pt", weights_only=True)
    latest = torch.load(merge / f"full-{step}.pt", weights_only=True)
    assert any(not torch.equal(previous[k], latest[k]) for k in latest)
    # the round's soup and the fixed-λ soup are bitwise lerps of the consolidated weights
    soup_path, fixed_path = merge / "soups" / soup, merge / "fixed" / fixed
    assert soup_path.exists() and fixed_path.exists()
    assert (soup_path.suffix == ".sharded") == sharded
    assert (fixed_path.suffix == ".sharded") == sharded
    _assert_lerp(_read_soup(soup_path), previous, latest, lam)
    _assert_lerp(_read_soup(fixed_path), previous, latest, 0.7)
    if sharded:  # two shard files, one per rank; consolidation gives the same tensors
        assert sorted(p.name for p in fixed_path.iterdir()) == [
            "index.json", "shard-00000-of-00002.safetensors",
            "shard-00001-of-00002.safetensors"]
        out = consolidate_sharded_soup(fixed_path, tmp_path / "fixed.safetensors")
        _assert_lerp(load_file(str(out)), previous, latest, 0.7)
    # the values the ranks agreed on are single-process evaluations of the lerped weights
    evaluate = HeldoutEvaluator(loaders()[1], resolve_metric("loss"))
    plain.load_state_dict(latest)
    assert entry["value_latest"] == pytest.approx(evaluate(plain), rel=1e-9)
    (observations,) = ranks[0]["observations"]
    assert len(observations) == 3
    for obs_lam, value in observations:
        plain.load_state_dict(lerp_state_dicts(previous, latest, obs_lam))
        assert value == pytest.approx(evaluate(plain), rel=1e-9), obs_lam
    if resume:  # a fresh callback resumed from the first save redoes the same round
        for r in ranks:
            assert r["resume_losses_equal"] and r["resume_final_bitwise"]
            assert r["resume_history"] == r["history"]
            assert r["resume_observations"] == r["observations"]
        again = tmp_path / "resume"
        for name, sub in ((soup, "soups"), (fixed, "fixed")):
            a, b = _read_soup(merge / sub / name), _read_soup(again / sub / name)
            assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
@pytest.mark.parametrize("kind,resume", [("zero2", False), ("zero3", True), ("fsdp1", True),
                                         ("fsdp1_flat", False)])
def test_lightning_callback_shard_local(tmp_path, kind, resume):
    if kind.startswith("zero"):
        pytest.importorskip("deepspeed")
    seconds = _run([sys.executable, str(HERE / "zero_callback_script.py"), str(tmp_path), kind,
                    *(["resume"] if resume else [])])
    mode = {"zero2": "deepspeed", "zero3": "zero3"}.get(kind, "fsdp1")
    sharded = kind != "zero2"
    suffix = ".sharded" if sharded else ".safetensors"
    _check_run(tmp_path, mode=mode, sharded=sharded, step=10, prev_step=5,
               soup=f"soup-step=10{suffix}", fixed=f"soup-step=10{suffix}", plain=module(),
               resume=resume)
    ranks = _records(tmp_path)
    for r in ranks:
        assert r["sharded_snapshot"] == ("ShardedSnapshot" if sharded else "Snapshot")
    if kind.startswith("fsdp1"):  # parameters wholly in the other rank's shard: empty pieces
        assert sum(r["empty_pieces"] for r in ranks) > 0
    print(f"{kind}: {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_hf_trainer_callback_under_deepspeed(tmp_path, kind):
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    seconds = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", str(HERE / "hf_zero_script.py"), str(tmp_path),
                    kind])
    from hf_zero_script import tiny_model

    sharded = kind == "zero3"
    # ZeRO-2: a Hugging Face folder; ZeRO-3: a sharded soup folder (written by both ranks)
    soup = "soup-8.sharded" if sharded else "soup-8"
    _check_run(tmp_path, mode="zero3" if sharded else "replicated", sharded=sharded, step=8,
               prev_step=4, soup=soup, fixed="soup-8.sharded" if sharded else "soup-8.safetensors",
               plain=tiny_model(), resume=True)
    ranks = _records(tmp_path)
    assert [r["zero_stage"] for r in ranks] == [int(kind[-1])] * 2
    for r in ranks:  # history=3: full weights needed; ZeRO-2 has them, ZeRO-3 refuses
        if sharded:
            assert r["refusal"] == (
                "BayesMergeTrainerCallback(history > 2, ema_decays or snapshot_every) does not "
                "support sharded weights (zero3): only the pairwise merge of the last two "
                "checkpoint saves is built shard-locally. HINT: use the defaults history=2, "
                "ema_decays=(), snapshot_every=None (or DeepSpeed ZeRO stage 1 or 2, or DDP)")
        else:
            assert r["refusal"] is None
    if sharded:  # the sharded soup becomes a Hugging Face folder with the checkpoint's config
        from transformers import AutoModelForCausalLM

        from merge_callback.fsdp import main

        folder = tmp_path / "merge" / "soups" / "soup-8.sharded"
        assert main([str(folder), str(tmp_path / "hf"),
                     "--hf-config", str(tmp_path / "merge" / "checkpoint-8")]) == 0
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        soup = _read_soup(folder)
        assert all(torch.equal(loaded.state_dict()[k], soup[k]) for k in soup)
    print(f"{kind}: {seconds:.1f} s")


# ----------------------------------------------------------------------------- one process


def test_place_piece_flat_and_block():
    full = torch.zeros(2, 3)
    assert place_piece(full, torch.tensor([1.0, 2.0]), {"shape": [2, 3], "flat_offset": 2}) == 2
    assert place_piece(full, torch.tensor([[7.0]]), {"shape": [2, 3], "offset": [1, 2]}) == 1
    assert torch.equal(full, torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 7.0]]))
    with pytest.raises(ValueError, match=r"piece of 'w': shape \(3,\) at flat offset 4 does not "
                                         r"fit a tensor of 6 elements"):
        place_piece(full, torch.ones(3), {"shape": [2, 3], "flat_offset": 4}, "w")
    with pytest.raises(ValueError, match=r"piece of 'w': shape \(1, 2\) at offset \[1, 2\] does "
                                         r"not fit shape \(2, 3\)"):
        place_piece(full, torch.ones(1, 2), {"shape": [2, 3], "offset": [1, 2]}, "w")
    with pytest.raises(ValueError, match=r"layout of 'w' has neither 'offset' nor 'flat_offset'"):
        place_piece(full, torch.ones(1), {"shape": [2, 3]}, "w")


def test_read_pieces_assembles_flat_and_replicated(tmp_path):
    from merge_callback.io.soups import read_pieces

    w = torch.arange(10.0).reshape(2, 5)
    b = torch.tensor([3.0, 4.0])
    lay0 = {"w": FlatShardLayout((2, 5), 0, True).to_json(),
            "b": ReplicatedLayout((2,), True).to_json()}
    lay1 = {"w": FlatShardLayout((2, 5), 6, True).to_json()}
    save_file({"w": w.reshape(-1)[:6].clone(), "b": b}, str(tmp_path / "0.safetensors"),
              {"layout": json.dumps(lay0)})
    save_file({"w": w.reshape(-1)[6:].clone()}, str(tmp_path / "1.safetensors"),
              {"layout": json.dumps(lay1)})
    files = [tmp_path / "0.safetensors", tmp_path / "1.safetensors"]
    out = read_pieces(files, ["w", "b"])
    assert list(out) == ["w", "b"] and torch.equal(out["w"], w) and torch.equal(out["b"], b)
    with pytest.raises(ValueError, match=r"the pieces of 'w' cover 6 of 10 elements"):
        read_pieces(files[:1])
    with pytest.raises(ValueError, match=r"no piece of tensor 'v'"):
        read_pieces(files, ["w", "v"])


def test_plain_module_view_is_its_state_dict():
    m = torch.nn.Linear(3, 2)
    assert not is_zero3(m) and not is_fsdp1(m) and evaluation_context(m) is None
    tensors, layouts = local_state_dict_any(m)
    assert layouts is None and list(tensors) == ["weight", "bias"]
    assert tensors["weight"].data_ptr() == m.weight.data_ptr()
    with pytest.raises(ValueError, match=r"local_state_dict_fsdp1 needs the root "
                                         r"FullyShardedDataParallel module, got Linear; HINT"):
        local_state_dict_fsdp1(m)


def test_grad_free_context_leaves_inference_mode():
    with torch.inference_mode():
        with grad_free_context():
            t = torch.ones(2)
            assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    assert not t.is_inference()


def test_without_inference_mode_enters_the_framework_context_inside():
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(torch.is_inference_mode_enabled())

        def __exit__(self, *exc):
            return False

    with torch.inference_mode():
        with without_inference_mode(Ctx)():
            assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
        with without_inference_mode()():
            assert not torch.is_inference_mode_enabled()
    assert entered == [False]


def test_zero_config_problem_names_the_setting_and_the_fix():
    assert zero_config_problem(None) is None
    assert zero_config_problem({"stage": 2, "offload_param": {"device": "nvme"}}) is None
    assert zero_config_problem({"stage": 3, "offload_param": {"device": "cpu"},
                                "mics_shard_size": -1, "zero_hpz_partition_size": 1}) is None
    assert zero_config_problem({"stage": 3, "offload_param": {"device": "nvme"}}) == (
        "ZeRO-3 with offload_param.device='nvme' keeps the parameter partitions on NVMe, where "
        "they cannot be merged in place; HINT: offload_param.device 'cpu' or 'none'")
    assert "ZeRO++ zero_hpz_partition_size=2 keeps secondary partitions" in \
        zero_config_problem({"stage": 3, "zero_hpz_partition_size": 2})
    assert "MiCS (mics_shard_size=4)" in zero_config_problem({"stage": 3, "mics_shard_size": 4})


def test_engine_views_of_a_plain_module_are_whole_and_owned():
    m = torch.nn.Linear(3, 2)
    assert not is_sharded(m)
    tensors, layouts = local_state_dict(m)
    assert tensors["weight"].data_ptr() == m.weight.data_ptr()
    assert layouts["weight"].offset == (0, 0) and layouts["weight"].owner
