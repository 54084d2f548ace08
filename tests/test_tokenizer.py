"""Tokenizer API at tiny size for every variant, and the full configurations' parameter counts."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT
from helpers.models import load_group

from mergevq.entries.summary import summarize
from mergevq.losses import alignment_kl, tiny_random_teacher
from mergevq.models.factory import build_tokenizer, layout
from mergevq.models.positions import group_starts

TINY = load_group("tokenizer", "tiny")
QUANTIZER = {"bits": 18}


def tiny(variant: str, **recovery):
    torch.manual_seed(0)
    return build_tokenizer(TINY, load_group("variant", variant), QUANTIZER, recovery or None)


@pytest.mark.parametrize("variant", ["g", "gr", "r"])
def test_encode_decode_shapes_for_every_keep(variant):
    tok = tiny(variant).eval()
    spec = layout(TINY, load_group("variant", variant))
    positions = spec["num_positions"]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for keep in spec["keep_candidates"]:
        tokens = tok.encode(x, keep=keep)
        assert tokens.codes.shape == (2, keep) and tokens.codes.dtype == torch.int64
        assert tokens.groups.shape == (2, positions)
        assert tokens.cls.shape == (2, tok.encoder.width)
        assert 0 <= tokens.codes.min() and tokens.codes.max() < 2**18
        for b in range(2):  # every position owned by exactly one kept token, every kept token owns some
            assert torch.equal(tokens.groups[b].unique(), torch.arange(keep))
        first = torch.stack([(tokens.groups[b][:, None] == torch.arange(keep)).float().argmax(0) for b in range(2)])
        assert torch.all(first[:, 1:] > first[:, :-1]), "kept tokens are not in canonical order"
        image = tok.decode(tokens)
        assert image.shape == x.shape
        torch.testing.assert_close(tok.decode_grid(tokens.code_grid()), image)
    assert tok.encode(x).keep == spec["keep"]  # keep=None -> nominal K


def test_keep_is_an_argument_not_state():
    tok = tiny("gr").eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    first = tok.encode(x, keep=36)
    tok.encode(x, keep=64)
    assert torch.equal(tok.encode(x, keep=36).codes, first.codes)


def test_unreachable_keep_names_the_range():
    tok = tiny("gr")
    with pytest.raises(ValueError, match=r"reachable keeps are \d+\.\.64"):
        tok.encode(torch.zeros(1, 3, 32, 32), keep=2)
    with pytest.raises(ValueError, match=r"\[1, 64\].*reachable keeps are \d+\.\.64"):
        tok.encode(torch.zeros(1, 3, 32, 32), keep=65)


def test_one_training_step_reaches_every_parameter():
    tok = tiny("gr", enabled=True, width=32, num_heads=2).train()
    teacher = tiny_random_teacher(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    tok.encoder.align_head[-1] = torch.nn.Linear(tok.encoder.align_head[-1].in_features, 32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    view = torch.rand(2, 3, 28, 28) * 2 - 1
    xrec, aux = tok(x, keep=36)
    loss = (xrec - x).abs().mean() + aux["losses"]["loss"] + aux["losses"]["recovery"]
    loss = loss + alignment_kl(tok.align_logits(view, keep=36, num_positions=64), teacher(view))
    loss.backward()
    missing = [n for n, p in tok.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reached: {missing}"


@pytest.mark.parametrize("detach", [False, True])
def test_recovery_detach_stops_its_gradient_at_the_quantized_tokens(detach):
    tok = tiny("gr", enabled=True, width=32, num_heads=2, detach_input=detach).train()
    _, aux = tok(torch.rand(2, 3, 32, 32) * 2 - 1, keep=36)
    aux["losses"]["recovery"].backward()
    reached = lambda module: any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())  # noqa: E731
    assert reached(tok.recovery) and reached(tok.encoder) != detach


def test_source_recovery_predicts_groups_for_decoding():
    tok = tiny("gr", enabled=True, width=32, num_heads=2).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = tok.encode(x, keep=36)
    starts = group_starts(tokens.groups, 36)
    image = tok.decode_recovered(tokens.codes, tokens.grid, starts)
    assert image.shape == x.shape
    assert torch.equal(group_starts(tok.recover_groups(tokens.codes, starts), 36), starts)  # canonical partition
    with pytest.raises(ValueError, match="Source Recovery"):
        tiny("gr").decode_recovered(tokens.codes, tokens.grid)


def test_open_magvit2_tiny_builds_through_the_factory():
    tok = build_tokenizer(dict(load_group("tokenizer", "open_magvit2"), ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32), None, QUANTIZER)
    tokens = tok.encode(torch.zeros(1, 3, 32, 32))
    assert tokens.codes.shape == (1, 256) and tok.decode(tokens).shape == (1, 3, 32, 32)


# official module counts (spec section 1.2, measured on the official code)
OFFICIAL_COUNTS = {
    ("d64", "g"): (64_962_066, 82_847_171),
    ("d32", "g"): (39_995_634, 51_434_051),
    ("d32", "gr"): (42_686_258, 51_954_115),
    ("d64", "gr"): (69_487_186, 83_367_235),
    ("d96", "gr"): (155_071_986, 187_194_339),
    ("d64", "r"): (99_843_858, 83_367_235),
}


@pytest.mark.parametrize(("size", "variant"), list(OFFICIAL_COUNTS))
def test_full_configurations_match_official_parameter_counts(size, variant):
    result = summarize(load_group("tokenizer", size), load_group("variant", variant))
    assert (result["encoder_params"], result["decoder_params"]) == OFFICIAL_COUNTS[size, variant]
    assert result["keep"] == {"g": 256, "gr": 144, "r": 64}[variant]
    assert result["encoder_gmacs"] > 0 and result["decoder_gmacs"] > 0


@pytest.mark.slow
def test_summary_cli_prints_json():
    out = subprocess.run(
        [sys.executable, "-m", "mergevq.entries.summary", "tokenizer=d64", "variant=gr", "format=json"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["encoder_params"] == 69_487_186 and result["decoder_params"] == 83_367_235
