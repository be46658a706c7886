import math
import warnings

import lightning
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from merge_callback.data import BlockDataset, tiny_gpt_neox
from merge_callback.lm import CausalLMModule


# ----------------------------------------------------------------- schedules


def test_lr_schedule_constant_with_warmup():
    m = CausalLMModule(nn.Linear(2, 2), warmup_steps=4)
    assert [m.lr_factor(s) for s in (0, 1, 3, 4, 1000)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert CausalLMModule(nn.Linear(2, 2)).lr_factor(0) == 1.0


def test_lr_schedule_wsd():
    m = CausalLMModule(nn.Linear(2, 2), schedule="wsd", warmup_steps=10, decay_steps=20, total_steps=100)
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 79: 1.0, 80: 1.0, 90: 0.55, 95: 0.325, 100: 0.1, 150: 0.1}
    for step, value in expected.items():
        assert m.lr_factor(step) == pytest.approx(value, abs=1e-12), step


def test_lr_schedule_cosine():
    m = CausalLMModule(nn.Linear(2, 2), schedule="cosine", warmup_steps=10, total_steps=110)
    expected = {
        0: 0.1,
        9: 1.0,
        10: 1.0,
        35: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)),  # 0.868198...
        60: 0.55,
        110: 0.1,
        500: 0.1,
    }
    for step, value in expected.items():
        assert m.lr_factor(step) == pytest.approx(value, abs=1e-12), step
    assert m.lr_factor(35) == pytest.approx(0.8681980515339464, abs=1e-12)


def test_configure_optimizers_drives_lr_per_step():
    model = nn.Linear(3, 3)
    m = CausalLMModule(model, lr=2e-3, weight_decay=0.1, betas=(0.8, 0.9), schedule="wsd",
                       warmup_steps=2, decay_steps=2, total_steps=6)
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert cfg["lr_scheduler"]["interval"] == "step"
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.8, 0.9)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [(3, 3)] and [p.shape for p in no_decay["params"]] == [(3,)]
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3, 2e-3, 2e-3, 2e-3, 2e-3, 1.1e-3, 2e-4])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=1.5), "warmup_steps"),
        (dict(schedule="linear"), r"schedule must be one of \('constant', 'wsd', 'cosine'\)"),
        (dict(decay_steps=-1), "decay_steps"),
        (dict(total_steps=0), "total_steps"),
        (dict(betas=(0.9,)), "betas"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(schedule="wsd", decay_steps=5), "total_steps"),
        (dict(schedule="wsd", total_steps=10), "decay_steps"),
        (dict(schedule="wsd", total_steps=10, warmup_steps=6, decay_steps=5), "decay_steps"),
        (dict(schedule="cosine"), "total_steps"),
        (dict(schedule="cosine", total_steps=10, warmup_steps=10), "total_steps"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalLMModule(nn.Linear(2, 2), **kwargs)


def test_model_must_be_module():
    with pytest.raises(TypeError, match="model"):
        CausalLMModule("gpt2")


# ----------------------------------------------------------------- loss


def test_state_dict_keys_and_forward(tiny_neox):
    module = CausalLMModule(tiny_neox)
    keys = list(module.state_dict())
    assert keys == [f"model.{k}" for k in tiny_neox.state_dict()]
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = module(ids)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 7, 64)
    assert torch.equal(logits, tiny_neox(input_ids=ids).logits)


def test_loss_matches_hand_computation(tiny_neox):
    module = CausalLMModule(tiny_neox).eval()
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = tiny_neox(input_ids=ids).logits
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        assert module.compute_loss({"input_ids": ids}) == pytest.approx(expected.item(), rel=1e-6)
        assert module.compute_loss(ids) == pytest.approx(expected.item(), rel=1e-6)

        # labels with -100 and a padded tail: only the listed targets count
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        labels = ids.clone()
        labels[0, 3] = -100
        labels[2, 1] = -100
        masked_logits = tiny_neox(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(masked_logits.float(), dim=-1)
        terms = []
        for b in range(3):
            for t in range(1, 9):
                if labels[b, t] != -100 and mask[b, t] == 1:
                    terms.append(-logp[b, t - 1, labels[b, t]])
        assert len(terms) == 3 * 8 - 2 - 3
        hand = torch.stack(terms).mean()
        got = module.compute_loss({"input_ids": ids, "attention_mask": mask, "labels": labels})
        assert got == pytest.approx(hand.item(), rel=1e-5)
        assert abs(got.item() - expected.item()) > 1e-4  # the masking changed the value


# ----------------------------------------------------------------- trainer


def test_lightning_fit_five_steps(tiny_neox, tmp_path):
    blocks = torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(2))
    train = DataLoader(BlockDataset(blocks[:20]), batch_size=4, shuffle=False)
    val = DataLoader(BlockDataset(blocks[20:]), batch_size=4)
    module = CausalLMModule(tiny_neox, lr=1e-2, schedule="wsd", decay_steps=2, total_steps=5)
    before = {k: v.clone() for k, v in tiny_neox.state_dict().items()}
    trainer = lightning.Trainer(
        accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        trainer.fit(module, train, val)
    assert trainer.global_step == 5
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train_loss"]) and torch.isfinite(metrics["val_loss"])
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 5
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)  # 0.1 * lr at total_steps
    after = tiny_neox.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # checkpoint round trip: hyperparameters are saved, the network is passed again
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fresh = tiny_gpt_neox(64, seed=5, hidden_size=32, num_layers=2, num_heads=4, max_len=32)
    restored = CausalLMModule.load_from_checkpoint(tmp_path / "last.ckpt", model=fresh)
    assert restored.hparams.schedule == "wsd" and restored.total_steps == 5 and restored.lr == 1e-2
    assert all(torch.equal(after[k], fresh.state_dict()[k]) for k in after)
