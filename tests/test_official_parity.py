"""Parity with the official MergeVQ modules (ApexGen-X/MergeVQ @ 5267198).

official_tiny_g.* is the shared fixture (see fixtures/README.md); official_extra_*.pt hold other
configurations (12 blocks on a 16x16 grid; the patch stem with head_dim; several K each), made the
same way: the official modules with seeded random weights (stored in fp16), their outputs per K.
"""

import json

import pytest
import torch
from helpers import FIXTURES

from mergevq.interop import load_official_tokenizer
from mergevq.interop.official import official_to_project_key
from mergevq.models.merge import canonical_order


def _canonical(expected_groups, keep, *per_token):
    """Relabel the official (ToMe-order) outputs into the project's canonical token order."""
    order, groups = canonical_order(expected_groups, keep)
    return groups, [t.gather(1, order if t.dim() == 2 else order[..., None].expand(-1, -1, t.shape[-1])) for t in per_token]


def test_shared_fixture_reproduced():
    ddconfig = json.loads((FIXTURES / "official_tiny_g.ddconfig.json").read_text())
    tok = load_official_tokenizer(FIXTURES / "official_tiny_g.ckpt", ddconfig)
    expected = torch.load(FIXTURES / "official_tiny_g.expected.pt", weights_only=True)
    keep = expected["codes"].shape[1]
    with torch.no_grad():
        xrec, aux = tok(expected["x"], keep=keep)
        cls_head = tok.align_logits(expected["x"], keep=keep)
        tokens = tok.encode(expected["x"], keep=keep)
    groups, (codes, z) = _canonical(expected["groups"], keep, expected["codes"], expected["z"])
    assert torch.equal(aux["codes"], codes)
    assert torch.equal(aux["groups"], groups)
    assert torch.equal(tokens.codes, codes) and torch.equal(tokens.groups, groups)
    torch.testing.assert_close(aux["z"], z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xrec, expected["xrec"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cls_head, expected["cls_head"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tok.decode(tokens), expected["xrec"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [pytest.param("cnn12", marks=pytest.mark.slow), "patch6"])
def test_other_configurations(name, tmp_path):
    fixture = torch.load(FIXTURES / f"official_extra_{name}.pt", weights_only=True)
    ckpt = tmp_path / "official.ckpt"
    torch.save({"state_dict": {k: v.float() for k, v in fixture["state_dict"].items()}}, ckpt)
    tok = load_official_tokenizer(ckpt, fixture["ddconfig"])
    x = fixture["x"]
    for keep in fixture["keeps"]:
        expected = fixture[f"k{keep}"]
        with torch.no_grad():
            xrec, aux = tok(x, keep=keep)
            cls_head = tok.align_logits(x, keep=keep)
        groups, (codes,) = _canonical(expected["groups"], keep, expected["codes"])
        assert torch.equal(aux["codes"], codes), f"codes differ at K={keep}"
        assert torch.equal(aux["groups"], groups), f"groups differ at K={keep}"
        torch.testing.assert_close(xrec, expected["xrec"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cls_head, expected["cls_head"], atol=1e-4, rtol=1e-4)


def test_ema_weights_are_read_from_model_ema(tmp_path):
    ddconfig = json.loads((FIXTURES / "official_tiny_g.ddconfig.json").read_text())
    state = torch.load(FIXTURES / "official_tiny_g.ckpt", weights_only=True)["state_dict"]
    ema = {"model_ema." + k.replace(".", ""): v * 0.5 for k, v in state.items()}
    ckpt = tmp_path / "ema.ckpt"
    torch.save({"state_dict": {**state, **ema, "model_ema.num_updates": torch.tensor(3)}}, ckpt)
    raw = load_official_tokenizer(ckpt, ddconfig).state_dict()
    averaged = load_official_tokenizer(ckpt, ddconfig, ema=True).state_dict()
    key = official_to_project_key("encoder.attn.blocks.0.attn.qkv.weight")
    torch.testing.assert_close(averaged[key], raw[key] * 0.5)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    ddconfig = json.loads((FIXTURES / "official_tiny_g.ddconfig.json").read_text())
    state = torch.load(FIXTURES / "official_tiny_g.ckpt", weights_only=True)["state_dict"]
    del state["decoder.conv_out.bias"]
    state["encoder.extra.weight"] = torch.zeros(1)
    ckpt = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(KeyError) as info:
        load_official_tokenizer(ckpt, ddconfig)
    assert "decoder.conv_out.bias" in str(info.value) and "encoder.extra.weight" in str(info.value)
    with pytest.raises(KeyError, match="shape"):
        bad = dict(ddconfig, num_classes=40)  # alignment head width differs from the checkpoint
        state = torch.load(FIXTURES / "official_tiny_g.ckpt", weights_only=True)["state_dict"]
        torch.save({"state_dict": state}, ckpt)
        load_official_tokenizer(ckpt, bad)
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        load_official_tokenizer(tmp_path / "nothing.ckpt", ddconfig)
