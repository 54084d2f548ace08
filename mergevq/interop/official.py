"""Import official MergeVQ (ApexGen-X/MergeVQ) Lightning checkpoints into the project's tokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..models.decoder import MergeVQDecoder
from ..models.encoder import MergeVQEncoder
from ..models.lfq import LFQ
from ..models.tokenizer import MergeVQTokenizer
from ..runs.checkpoint import compare_states

# official key prefix -> project key prefix (everything else keeps its name)
_RENAMES = [
    (r"^encoder\.(conv_in|down)\.", r"encoder.stem.\1."),
    (r"^encoder\.attn\.", "encoder.transformer."),
    (r"^encoder\.dist_head\.", "encoder.align_head."),
    (r"^decoder\.attn\.", "decoder.transformer."),
]


def official_to_project_key(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _align_head_kind(dist_head: Any) -> str:
    if not dist_head:
        return "none"
    return "layer3" if dist_head == "layer3" else "layer2"


def tokenizer_kwargs_from_ddconfig(ddconfig: dict) -> dict:
    """Translate the official ``ddconfig`` into encoder/decoder kwargs and the nominal keep."""
    if ddconfig.get("num_rep_blocks", 0):
        raise ValueError("num_rep_blocks > 0 (extra representation blocks) is not supported")
    ch, ch_mult = ddconfig["ch"], list(ddconfig["ch_mult"])
    factor = 2 ** (len(ch_mult) - 1)
    isotropic = ddconfig.get("isotropic") or False
    patch_width = isotropic if isinstance(isotropic, int) and isotropic > 1 else ch * ch_mult[-1]
    common = dict(
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=ddconfig["num_res_blocks"],
        depth=ddconfig.get("num_att_blocks", 12),
        num_heads=ddconfig.get("num_heads", 8),
        head_dim=ddconfig.get("head_dim"),
        z_channels=ddconfig.get("z_channels", 18),
    )
    width = patch_width if isotropic else ch * ch_mult[-1]
    encoder = dict(
        common,
        stem="patch" if isotropic else "cnn",
        patch_size=factor,
        patch_width=patch_width,
        align_head=_align_head_kind(ddconfig.get("dist_head")),
        align_dim=ddconfig.get("num_classes") or width,
        drop_path=ddconfig.get("drop_path", 0.0) or 0.0,
    )
    decoder = dict(common, num_res_extra=ddconfig.get("num_res_extra", 1), out_channels=ddconfig.get("out_ch", 3))
    positions = (ddconfig["resolution"] // factor) ** 2
    keep = positions - (ddconfig.get("merge_num") or 0)
    return {"encoder": encoder, "decoder": decoder, "default_keep": keep}


def build_from_ddconfig(ddconfig: dict) -> MergeVQTokenizer:
    kwargs = tokenizer_kwargs_from_ddconfig(ddconfig)
    return MergeVQTokenizer(
        MergeVQEncoder(**kwargs["encoder"]),
        MergeVQDecoder(**kwargs["decoder"]),
        LFQ(bits=kwargs["encoder"]["z_channels"]),
        default_keep=kwargs["default_keep"],
    )


def _official_weights(state: dict[str, torch.Tensor], names: list[str], ema: bool) -> dict[str, torch.Tensor]:
    """Pick the official encoder/decoder tensors; EMA copies live under model_ema.<name without dots>."""
    if not ema:
        return {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
    ema_state = {k[len("model_ema.") :]: v for k, v in state.items() if k.startswith("model_ema.")}
    if not ema_state:
        raise KeyError("ema=True but the checkpoint has no model_ema.* weights")
    return {name: ema_state[name.replace(".", "")] for name in names if name.replace(".", "") in ema_state}


def load_official_tokenizer(ckpt_path: str | Path, ddconfig: dict, ema: bool = False) -> MergeVQTokenizer:
    """Build the tokenizer for an official ``ddconfig`` and load an official checkpoint strictly.

    Missing, unexpected or mis-shaped encoder/decoder keys raise a KeyError listing them; the
    discriminator, LPIPS and teacher weights in the checkpoint are ignored.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    tokenizer = build_from_ddconfig(ddconfig)
    expected = tokenizer.state_dict()
    official_names = [k for k in state if k.startswith(("encoder.", "decoder."))]
    if ema and not official_names:  # an EMA-only export: derive the names from our own modules
        inverse = {official_to_project_key(k): k for k in official_names}
        official_names = [inverse.get(k, k) for k in expected]
    weights = {official_to_project_key(k): v for k, v in _official_weights(state, official_names, ema).items()}
    missing, unexpected, mismatched = compare_states(expected, weights)
    if missing or unexpected or mismatched:
        raise KeyError(
            f"checkpoint {path} does not match the ddconfig: missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {mismatched}"
        )
    tokenizer.load_state_dict(weights, strict=True)
    return tokenizer.eval()
