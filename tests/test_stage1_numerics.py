"""Stage-I numerics that follow the official code: the EMA cadence under gradient accumulation and the
loss=paper adversarial weight (the LFQ entropy formula is tested in test_lfq.py)."""

from __future__ import annotations

import pytest
import torch
from helpers.runs import compose_run, step_dir, train
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from mergevq.engine.ema import EMA, updates_per_step
from mergevq.entries.config_check import ConfigError, check_tokenizer_run
from mergevq.models.factory import build_tokenizer


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_repeats_equal_per_micro_batch_updates(warmup):
    """The official cadence: under accumulation a the EMA sees the same weights a times per optimizer
    step; update(repeats=a) equals a single updates, so the horizon is decay^a per optimizer step."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    once, repeated = EMA(model, decay=0.9, warmup=warmup), EMA(model, decay=0.9, warmup=warmup)
    start = {k: v.clone() for k, v in once.state_dict().items()}
    for _ in range(3):  # optimizer steps
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        for _ in range(2):
            once.update(model)
        repeated.update(model, repeats=2)
    assert repeated.num_updates == once.num_updates == 6
    _assert_close = torch.testing.assert_close
    for name in once.state_dict():
        _assert_close(repeated.state_dict()[name], once.state_dict()[name], rtol=1e-12, atol=1e-12)
    if not warmup:  # one step from the start with no later change: exactly decay^2 of the gap left
        fresh = EMA(model, decay=0.9)
        fresh.load_state_dict(start)
        fresh.update(model, repeats=2)
        for name, param in model.named_parameters():
            _assert_close(fresh.state_dict()[name], param + (start[name] - param) * 0.81, rtol=1e-12, atol=1e-12)
    assert updates_per_step("micro_batch", 2) == 2 and updates_per_step("optimizer_step", 2) == 1
    with pytest.raises(ValueError, match="train.ema.cadence"):
        updates_per_step("epoch", 2)


@pytest.mark.parametrize("cadence,power", [("micro_batch", 2), ("optimizer_step", 1)])
def test_ema_cadence_under_accumulation(tmp_path, cadence, power):
    """One optimizer step of two micro-batches: the EMA moves from the initial weights towards the
    step's weights by 1 - decay^2 (official: once per micro-batch) or 1 - decay (once per step)."""
    overrides = ("variant=g", "train.grad_accum=2", "train.max_steps=1", "train.val_keeps=[64]",
                 "loss.perceptual_weight=0", "train.ema.decay=0.5", f"train.ema.cadence={cadence}")
    ckpt = step_dir(train(tmp_path / "run", *overrides), 1)
    config = OmegaConf.to_container(compose_run(tmp_path / "run", *overrides), resolve=True)
    torch.manual_seed(config["seed"])  # Stage1Trainer seeds, then builds the tokenizer first
    init = build_tokenizer(config["tokenizer"], config["variant"], config["quantizer"], config["recovery"]).state_dict()
    raw, ema = load_file(str(ckpt / "tokenizer.safetensors")), load_file(str(ckpt / "tokenizer_ema.safetensors"))
    moved = [k for k, v in raw.items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert moved
    for key in moved:
        expected = raw[key] + (init[key] - raw[key]) * 0.5**power
        torch.testing.assert_close(ema[key], expected, rtol=1e-5, atol=1e-6)


def test_paper_loss_keeps_the_official_fixed_adversarial_weight(tmp_path):
    """Table A1's 0.8 is the official adaptive-weight factor (disc_weight), unused by the official
    loss; the weight it trained with is the fixed gen_loss_weight 0.1."""
    loss = OmegaConf.to_container(compose_run(tmp_path, "loss=paper"), resolve=True)["loss"]
    assert (loss["reconstruction"], loss["perceptual_weight"], loss["adversarial_weight"]) == ("l2", 0.7, 0.1)


def test_ema_cadence_is_checked(tmp_path):
    config = OmegaConf.to_container(compose_run(tmp_path, "train.ema.cadence=epoch"), resolve=True)
    with pytest.raises(ConfigError, match="train.ema.cadence"):
        check_tokenizer_run(config)
