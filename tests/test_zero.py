"""Shard-local merges under DeepSpeed ZeRO-2/3 and FSDP1 (two real CPU processes each).

Each run trains a tiny GPT-NeoX twice in the same two processes (with and without the probe of
tests/zero_probe.py) and checks: the soup built in place from the local views scores exactly
what a plain model loaded with the consolidated lerp scores (same logits, bitwise); the restore
is exact and training is bitwise unchanged; the shard-locally written soup reassembles bitwise
to the consolidated lerp; each rank's view holds 1 / world of the weights.

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
from safetensors.torch import save_file

from merge_callback.zero import (FlatShardLayout, ReplicatedLayout, evaluation_context,
                                 grad_free_context, is_fsdp1, is_zero3, local_state_dict_any,
                                 local_state_dict_fsdp1, place_piece, read_pieces)
from test_ddp import DIST_VARS, launch

HERE = Path(__file__).parent
SHARDED = {"zero3", "zero3_persist", "fsdp1", "fsdp1_flat"}


def _records(path: Path) -> list[dict]:
    return [json.loads((path / f"rank{r}.json").read_text()) for r in (0, 1)]


def _check(ranks: list[dict], kind: str) -> None:
    for r in ranks:
        assert r["world_size"] == 2
        assert r["restored_bitwise"] and r["logits_after_restore_equal"]
        assert r["losses_equal"] and r["final_keys_equal"] and r["final_bitwise"]
        if kind in SHARDED:  # each rank holds half of every weight: 1 / world of the model
            assert r["layout_kinds"] == ["FlatShardLayout"]
            assert r["replicated_numel"] == 0 and 2 * r["local_numel"] == r["full_numel"]
        else:
            assert r["layout_kinds"] == ["ReplicatedLayout"]
    assert ranks[0]["value_soup"] == ranks[1]["value_soup"] != ranks[0]["value_latest"]
    zero = ranks[0]
    assert zero["latest_logits_equal"] and zero["soup_logits_equal"]
    assert zero["value_soup"] == pytest.approx(zero["value_soup_plain"], rel=1e-12)
    assert zero["soup_keys_equal"] and zero["soup_file_bitwise"]
    assert zero["gathered_bitwise"]  # the rank-zero gather of the soup pieces
    assert [r["gathered_on_this_rank"] for r in ranks] == [True, False]
    assert zero["soup_differs_from_latest"]


@pytest.mark.parametrize("kind", ["zero2", "zero3", "zero3_persist", "fsdp1", "fsdp1_flat"])
def test_lightning_shard_local_merge(tmp_path, kind):
    if kind.startswith("zero"):
        pytest.importorskip("deepspeed")
    t0 = time.perf_counter()
    launch("zero_lightning_script.py", tmp_path, sys.executable, args=(kind,))
    _check(_records(tmp_path), kind)
    print(f"{kind}: {time.perf_counter() - t0:.1f} s")


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_hf_trainer_deepspeed_shard_local_merge(tmp_path, kind):
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE),
                                           env.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(HERE / "hf_zero_script.py"),
                        str(tmp_path), kind], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ranks = _records(tmp_path)
    _check(ranks, kind)  # the probe ran in on_save, after DeepSpeed wrote checkpoints 4 and 8
    assert ranks[0]["is_deepspeed_enabled"] and ranks[0]["zero_stage"] == int(kind[-1])
    for r in ranks:  # resumed from checkpoint-4: on_train_begin sees the step-4 view
        assert r["resume_step"] == 4 and r["resume_view_equal"]
        assert r["resume_losses_equal"] and r["resume_final_bitwise"]


@pytest.mark.parametrize("kind", ["zero2", "zero3", "fsdp1", "fsdp1_flat"])
def test_lightning_resume_continues_bitwise_with_the_same_view(tmp_path, kind):
    if kind.startswith("zero"):
        pytest.importorskip("deepspeed")
    launch("zero_resume_script.py", tmp_path, sys.executable, args=(kind,))
    for r in _records(tmp_path):
        assert r["is_dir"]  # DeepSpeed and sharded FSDP1 checkpoints are folders
        assert r["losses_equal"] and r["final_bitwise"]
        assert r["callback_state_loaded"] == {"steps_seen": 5} and r["start_step"] == 5
        # what a merge callback captures in on_train_start after resuming is the step-5 view
        assert r["start_view_equals_step5_view"]


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
