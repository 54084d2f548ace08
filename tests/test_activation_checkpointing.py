"""Activation checkpointing (train.activation_checkpointing): same values and gradients, fewer saved
activations; and backend.compile compiles only the fixed-shape parts, in place."""

from __future__ import annotations

import pytest
import torch

from mergevq.benchmarks import common
from mergevq.models.blocks import Recomputable, set_activation_checkpointing
from mergevq.models.factory import build_tokenizer
from mergevq.models.gpt import GPT, gpt_args


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """fn() -> (its output, bytes of the tensors autograd saved for backward while running it)."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def tokenizer_grads(checkpointing: bool):
    torch.manual_seed(0)
    tokenizer = build_tokenizer(*common.model_configs("tiny", "gr")).train()
    assert set_activation_checkpointing(tokenizer, checkpointing) > 0
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    (xrec, aux), saved = saved_bytes(lambda: tokenizer(x, keep=36))
    loss = (xrec - x).abs().mean() + aux["z"].pow(2).mean() + sum(aux["losses"].values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in tokenizer.named_parameters() if p.grad is not None}, saved


def test_tokenizer_checkpointing_same_gradients_less_saved():
    loss, grads, saved = tokenizer_grads(False)
    loss_ckpt, grads_ckpt, saved_ckpt = tokenizer_grads(True)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert saved_ckpt < 0.5 * saved, (saved_ckpt, saved)


def test_gpt_checkpointing_same_gradients_and_cache_path_untouched():
    args = gpt_args("tiny", grid=(4, 4), num_classes=3, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    codes = torch.randint(0, 2**18, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(args).train()
        set_activation_checkpointing(model, checkpointing)
        out, saved = saved_bytes(lambda m=model: m.loss(codes, labels))
        loss = out["loss"] if isinstance(out, dict) else out[0]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], saved))
    (loss, grads, saved), (loss_ckpt, grads_ckpt, saved_ckpt) = results
    assert torch.equal(loss, loss_ckpt)
    for g, g_ckpt in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-7)
    assert saved_ckpt < saved
    assert all(isinstance(layer, Recomputable) and layer.activation_checkpointing for layer in model.layers)


@pytest.mark.slow
def test_compile_setting_compiles_fixed_shape_parts_in_place():
    from mergevq.engine.runner import compile_in_place

    tokenizer = build_tokenizer(*common.model_configs("tiny", "gr"))
    names = list(tokenizer.state_dict())
    assert compile_in_place([tokenizer.decoder], False) == 0 and tokenizer.decoder._compiled_call_impl is None
    assert compile_in_place([tokenizer.encoder.stem, tokenizer.decoder], "eager") == 2
    assert tokenizer.decoder._compiled_call_impl is not None and tokenizer.encoder.transformer._compiled_call_impl is None
    assert list(tokenizer.state_dict()) == names  # checkpoints keep their names
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out, _ = tokenizer(x, keep=36)
    assert out.shape == x.shape
