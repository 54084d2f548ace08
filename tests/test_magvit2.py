"""Open-MAGVIT2 baseline tokenizer: shapes, the Tokens contract, and the official parameter layout."""

import pytest
import torch

from mergevq.models.lfq import LFQ
from mergevq.models.magvit2 import Magvit2Decoder, Magvit2Encoder, Magvit2Tokenizer
from mergevq.models.tokens import Tokens

TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=18)

# State-dict keys of the official Open-MAGVIT2 modules (SEED-Voken improved_model.py Encoder/Decoder)
# for the TINY config, read off their constructors (checked by instantiating them).
OFFICIAL_ENCODER_KEYS = [
    "conv_in.weight",
    *[f"down.0.block.0.{n}" for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")],
    "down.0.block.0.conv1.weight", "down.0.block.0.conv2.weight",
    "down.0.downsample.weight", "down.0.downsample.bias",
    *[f"down.1.block.0.{n}" for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")],
    "down.1.block.0.conv1.weight", "down.1.block.0.conv2.weight", "down.1.block.0.nin_shortcut.weight",
    *[f"mid_block.0.{n}" for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")],
    "mid_block.0.conv1.weight", "mid_block.0.conv2.weight",
    "norm_out.weight", "norm_out.bias", "conv_out.weight", "conv_out.bias",
]  # fmt: skip
OFFICIAL_DECODER_KEYS = [
    "conv_in.weight", "conv_in.bias",
    *[f"mid_block.0.{n}" for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")],
    "mid_block.0.conv1.weight", "mid_block.0.conv2.weight",
    *[f"up.0.block.0.{n}" for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")],
    "up.0.block.0.conv1.weight", "up.0.block.0.conv2.weight", "up.0.block.0.nin_shortcut.weight",
    *[f"up.1.block.0.{n}" for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")],
    "up.1.block.0.conv1.weight", "up.1.block.0.conv2.weight",
    "up.1.upsample.conv1.weight", "up.1.upsample.conv1.bias",
    *[f"adaptive.{i}.{n}.{p}" for i in (0, 1) for n in ("gamma", "beta") for p in ("weight", "bias")],
    "norm_out.weight", "norm_out.bias", "conv_out.weight", "conv_out.bias",
]  # fmt: skip


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tokenizer() -> Magvit2Tokenizer:
    torch.manual_seed(0)
    return Magvit2Tokenizer(TINY).eval()


def test_state_dict_keys_match_official_layout():
    enc = Magvit2Encoder(**TINY)
    dec = Magvit2Decoder(**TINY)
    # Same names; only the order inside a ResBlock differs (official: norm1, norm2, conv1, conv2).
    assert sorted(enc.state_dict()) == sorted(OFFICIAL_ENCODER_KEYS)
    assert sorted(dec.state_dict()) == sorted(OFFICIAL_DECODER_KEYS)
    # Parameter counts of the official modules for TINY (so the shapes agree too).
    assert (_count(enc), _count(dec)) == (161_490, 341_795)


def test_full_256_config_parameter_count():
    """ch 128, ch_mult [1,1,2,2,4], 4 res blocks, z 18 (imagenet_lfqgan_256_L.yaml), on the meta device.

    Official counts (SEED-Voken Encoder/Decoder built with this ddconfig, and the same numbers from
    the closed-form sum over their layers): 49,751,442 + 65,376,387 = 115,127,829.
    """
    with torch.device("meta"):
        enc = Magvit2Encoder(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=4, z_channels=18)
        dec = Magvit2Decoder(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=4, z_channels=18)
    assert (_count(enc), _count(dec)) == (49_751_442, 65_376_387)
    assert enc.grid_size(256, 256) == (16, 16)


def test_encoder_decoder_shapes():
    enc, dec = Magvit2Encoder(**TINY), Magvit2Decoder(**TINY)
    z = enc(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 18, 16, 16)
    assert dec(z.sign()).shape == (2, 3, 32, 32)
    # Odd sizes: each stride-2 conv rounds up, as grid_size says.
    enc3 = Magvit2Encoder(ch=32, ch_mult=[1, 1, 2], num_res_blocks=[1, 1, 2])
    assert enc3(torch.randn(1, 3, 30, 34)).shape[-2:] == enc3.grid_size(30, 34) == (8, 9)


def test_encode_decode_round_trip(tokenizer):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = tokenizer.encode(x)
        assert isinstance(tokens, Tokens)
        assert tokens.codes.shape == (2, 256) and tokens.codes.dtype == torch.int64
        assert tokens.codes.min() >= 0 and tokens.codes.max() < 2**18
        assert tokens.groups.tolist() == [list(range(256))] * 2
        assert tokens.cls is None and tokens.grid == (16, 16)
        assert tokens.keep == tokens.num_positions == 256
        assert torch.equal(tokenizer.encode(x, keep=256).codes, tokens.codes)
        image = tokenizer.decode(tokens)
        assert image.shape == (2, 3, 32, 32)
        assert torch.equal(tokenizer.decode_grid(tokens.code_grid()), image)
        # Codes are the raster-order LFQ indices of the encoder output (bit d = channel d > 0).
        z = tokenizer.encoder(x).flatten(2).transpose(1, 2)
        bits = (tokens.codes[..., None] >> torch.arange(18)) & 1
        assert torch.equal(bits.bool(), z > 0)


def test_keep_other_than_L_raises(tokenizer):
    x = torch.randn(1, 3, 32, 32)
    for keep in (0, 64, 255, 257):
        with pytest.raises(ValueError, match="256"):
            tokenizer.encode(x, keep=keep)


def test_forward_matches_decode_and_trains():
    torch.manual_seed(0)
    model = Magvit2Tokenizer(TINY, quantizer=LFQ(bits=18))
    x = torch.randn(2, 3, 32, 32)
    xrec, aux = model(x)
    assert xrec.shape == x.shape and aux["codes"].shape == (2, 256)
    assert {"commit", "entropy", "loss"} <= set(aux["losses"])
    ((xrec - x).pow(2).mean() + aux["losses"]["loss"]).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    model.eval()
    with torch.no_grad():
        xrec_eval, aux_eval = model(x)
        torch.testing.assert_close(model.decode_grid(aux_eval["codes"]), xrec_eval)


def test_quantizer_bits_must_match_z_channels():
    with pytest.raises(ValueError, match="bits"):
        Magvit2Tokenizer(TINY, quantizer=LFQ(bits=16))
