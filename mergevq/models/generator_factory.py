"""Build the stage-II generators (raster GPT, MergeAR, RandAR) from a run config and a code cache's
index. Apart from ``factory`` so that a generator loads without the tokenizer's modules (timm)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .gpt import GPT, gpt_args
from .mergear import MergeARConfig
from .randar import build_randar


def build_generator(cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    """A run config's generator (``ar``, ``generator``, ``num_classes``) for a code cache -> (GPT or RandAR,
    MergeARConfig or None). The GPT is sized for the cache's grid and codebook; MergeAR adds the [M]
    token over its keep options.

    meta: the code cache's index plus ``keeps`` (see ``mergevq.data.code_cache.cache_contents``)."""
    ar = dict(cfg["ar"])
    size = ar.pop("size")
    bits = int(meta["codebook_bits"])
    factorized = ar.pop("factorized_bits", None)
    vocab = {"factorized_bits": tuple(factorized)} if factorized else {"vocab_size": 2**bits}
    if factorized and sum(factorized) != bits:
        raise ValueError(f"ar.factorized_bits={factorized} must sum to the tokenizer's {bits} bits")
    args = gpt_args(size, grid=tuple(meta["grid"]), num_classes=int(cfg["num_classes"]), **vocab, **ar)
    generator = cfg["generator"]
    if generator["kind"] == "raster":
        return GPT(args), None
    if generator["kind"] == "randar":
        return build_randar(args, generator), None
    if generator["kind"] != "mergear":
        raise ValueError(f"generator.kind={generator['kind']!r}: use raster, mergear or randar")
    keep_options = generator.get("keep_options") or meta.get("keep", {}).get("choices") or meta["keeps"]
    # keys a stored config lacks keep MergeARConfig's defaults: those of the runs made before them
    options = {k: generator[k] for k in ("duplicate_rule", "mask_groups", "copy_head") if generator.get(k) is not None}
    mergear = MergeARConfig(window=generator["window"], keep_options=tuple(keep_options), **options)
    return GPT(mergear.model_args(args)), mergear
