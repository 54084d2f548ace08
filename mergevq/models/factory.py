"""Build tokenizers from plain config mappings (the composed ``tokenizer``, ``variant``, ``quantizer``
and ``recovery`` groups). No Hydra here: entries pass ``OmegaConf.to_container(cfg)`` parts.
The generators: ``generator_factory``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .decoder import MergeVQDecoder
from .encoder import MergeVQEncoder, load_teacher_state, weight_selection_init
from .keep import KeepPolicy
from .lfq import LFQ, bits_for_codebook_size
from .magvit2 import Magvit2Tokenizer
from .recovery import SourceRecovery
from .tokenizer import MergeVQTokenizer


def layout(tokenizer: Mapping[str, Any], variant: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve size x variant into encoder/decoder kwargs, the grid and the keep counts."""
    ch_mult = [tokenizer["ch_mult"][0]] * variant.get("extra_levels", 0) + list(tokenizer["ch_mult"])
    factor = 2 ** (len(ch_mult) - 1)
    side = tokenizer["resolution"] // factor
    positions = side * side
    common = dict(
        ch=tokenizer["ch"],
        ch_mult=ch_mult,
        num_res_blocks=tokenizer["num_res_blocks"],
        depth=tokenizer["depth"],
        num_heads=tokenizer["num_heads"],
        head_dim=variant.get("head_dim"),
        z_channels=tokenizer["z_channels"],
    )
    encoder = dict(
        common,
        stem=variant["stem"],
        patch_size=factor,
        patch_width=tokenizer.get("patch_width", 768),
        align_head=variant.get("align_head", "none"),
        align_dim=tokenizer.get("align_dim", 768),
        drop_path=tokenizer.get("drop_path", 0.0),
    )
    decoder = dict(common, num_res_extra=tokenizer.get("num_res_extra", 1))
    policy = KeepPolicy.from_config(positions, tokenizer["depth"], variant)
    return {
        "encoder": encoder,
        "decoder": decoder,
        "grid": (side, side),
        "num_positions": positions,
        "keep": policy.nominal,
        "keep_candidates": list(policy.candidates),
        "keep_probs": list(policy.probs),
        "keep_policy": policy,
    }


def keep_policy(tokenizer: Mapping[str, Any], variant: Mapping[str, Any] | None) -> KeepPolicy:
    """The K policy of the tokenizer these config groups build (no model built): what
    ``build_tokenizer(...).keep_policy`` will be."""
    if tokenizer.get("kind", "mergevq") == "magvit2":
        return KeepPolicy.no_merging()
    return layout(tokenizer, variant)["keep_policy"]


def quantizer_bits(quantizer: Mapping[str, Any] | None, bits: int) -> int:
    """The LFQ's bits: from quantizer.codebook_size when set (a power of two), else quantizer.bits,
    else ``bits`` (tokenizer.z_channels); they must equal tokenizer.z_channels."""
    options = quantizer or {}
    size = options.get("codebook_size")
    if size is not None:
        try:
            found = bits_for_codebook_size(size)
        except ValueError as error:
            raise ValueError(f"quantizer.codebook_size={size}: {error}: use 2^bits "
                             f"(e.g. {2**bits} for tokenizer.z_channels={bits}) or null") from None
        if found != bits:
            raise ValueError(f"quantizer.codebook_size={size} = 2^{found} codes needs tokenizer.z_channels={found}, "
                             f"not {bits}: set tokenizer.z_channels={found} or quantizer.codebook_size={2**bits}")
        return found
    found = options.get("bits") or bits
    if found != bits:
        raise ValueError(f"quantizer.bits={found} must equal tokenizer.z_channels={bits}")
    return found


def build_quantizer(quantizer: Mapping[str, Any] | None, bits: int) -> LFQ:
    options = {k: v for k, v in (quantizer or {}).items() if k != "codebook_size"}
    options["bits"] = quantizer_bits(quantizer, bits)
    return LFQ(**options)


def build_recovery(recovery: Mapping[str, Any], num_positions: int, z_channels: int) -> SourceRecovery:
    """A fresh Source Recovery module from the ``recovery`` config (width, depth, num_heads, ...)."""
    return SourceRecovery(
        num_positions,
        z_channels=z_channels,
        width=recovery.get("width", 384),
        depth=recovery.get("depth", 2),
        num_heads=recovery.get("num_heads", 8),
        drop_path=recovery.get("drop_path", 0.0),
        key_positions=recovery.get("key_positions", True),
    )


def build_tokenizer(
    tokenizer: Mapping[str, Any],
    variant: Mapping[str, Any] | None = None,
    quantizer: Mapping[str, Any] | None = None,
    recovery: Mapping[str, Any] | None = None,
) -> nn.Module:
    """MergeVQTokenizer for kind 'mergevq' (size x variant), Magvit2Tokenizer for kind 'magvit2'; either
    carries its ``keep_policy`` (``mergevq.models.keep.KeepPolicy``)."""
    lfq = build_quantizer(quantizer, tokenizer["z_channels"])
    if tokenizer.get("kind", "mergevq") == "magvit2":
        modules = {k: tokenizer[k] for k in ("ch", "ch_mult", "num_res_blocks", "z_channels")}
        tok = Magvit2Tokenizer(encoder=modules, decoder=modules, quantizer=lfq)
        tok.keep_policy = KeepPolicy.no_merging()
        return tok
    if variant is None:
        raise ValueError("a MergeVQ tokenizer needs a variant (variant=g|gr|r)")
    spec = layout(tokenizer, variant)
    encoder = MergeVQEncoder(**spec["encoder"])
    if tokenizer.get("encoder_init"):
        weight_selection_init(encoder.transformer, load_teacher_state(tokenizer["encoder_init"]))
    source_recovery = None
    if recovery and recovery.get("enabled"):
        source_recovery = build_recovery(recovery, spec["num_positions"], tokenizer["z_channels"])
    tok = MergeVQTokenizer(
        encoder,
        MergeVQDecoder(**spec["decoder"]),
        lfq,
        recovery=source_recovery,
        default_keep=spec["keep"],
        align_merge=tokenizer.get("align_merge", "official"),
        recovery_detach=bool((recovery or {}).get("detach_input", False)),
    )
    tok.keep_policy = spec["keep_policy"]  # K: nominal, candidates, reachable range, the per-step draw
    return tok
