"""Parameter counts and GFLOPs of a tokenizer configuration, built on the meta device (no allocation).

    python -m mergevq.entries.summary tokenizer=d64 variant=gr [format=json] [keep=144] [ar_experiment=ar_l_randar_gr]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.factory import build_tokenizer, layout


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _gmacs(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2e9


def summarize(tokenizer: Mapping[str, Any], variant: Mapping[str, Any] | None, keep: int | None = None) -> dict:
    """Counts for one configuration. encoder_params includes the alignment head (as the official
    module counts it); GMACs are multiply-accumulates of one 1-image forward at the nominal K."""
    with torch.device("meta"):
        tok = build_tokenizer(tokenizer, variant)
        res = tokenizer["resolution"]
        x = torch.empty(1, 3, res, res)
        if tokenizer.get("kind", "mergevq") == "magvit2":
            keep, positions = None, None
            z = tok.encoder(x)
            enc_macs = _gmacs(lambda: tok.encoder(x))
            dec_macs = _gmacs(lambda: tok.decoder(z))
        else:
            spec = layout(tokenizer, variant)
            positions, keep = spec["num_positions"], keep or spec["keep"]
            schedule = tok.schedule(positions, keep)
            enc_macs = _gmacs(lambda: tok.encoder(x, schedule))
            z_l = torch.empty(1, tokenizer["z_channels"], *spec["grid"])
            dec_macs = _gmacs(lambda: tok.decoder(z_l))
    align = getattr(tok.encoder, "align_head", None)
    return {
        "tokenizer": tokenizer["name"],
        "variant": None if variant is None or tokenizer.get("kind") == "magvit2" else variant["name"],
        "resolution": tokenizer["resolution"],
        "positions": positions,
        "keep": keep,
        "encoder_params": _count(tok.encoder),
        "align_head_params": _count(align),
        "decoder_params": _count(tok.decoder),
        "quantizer_bits": tok.quantizer.bits,
        "encoder_gmacs": round(enc_macs, 2),
        "decoder_gmacs": round(dec_macs, 2),
    }


def generator_params(experiment: str, grid: tuple[int, int] = (16, 16), bits: int = 18) -> int:
    """Parameters of a stage-II experiment preset's generator (e.g. ar_l_randar_g), built on the meta
    device for a grid of the given size and a 2^bits codebook (no code cache needed)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from ..models.generator_factory import build_generator
    from .cli import CONF_DIR

    overrides = [f"experiment={experiment}", "codes=unused", "run_dir=unused"]
    if GlobalHydra.instance().is_initialized():
        cfg = compose("train_ar", overrides=overrides)
    else:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train_ar", overrides=overrides)
    config = OmegaConf.to_container(cfg, resolve=False)
    with torch.device("meta"):
        model, _ = build_generator(config, {"codebook_bits": bits, "grid": list(grid), "keeps": [grid[0] * grid[1]]})
    return _count(model)


def format_table(summary: Mapping[str, Any]) -> str:
    width = max(map(len, summary))
    rows = []
    for key, value in summary.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        rows.append(f"{key:<{width}}  {shown:>14}")
    return "\n".join(rows)


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    from .cli import CONF_DIR

    @hydra.main(config_path=str(CONF_DIR), config_name="summary", version_base="1.3")
    def run(cfg) -> None:
        config = OmegaConf.to_container(cfg, resolve=True)
        result = summarize(config["tokenizer"], config.get("variant"), config.get("keep"))
        if config.get("ar_experiment"):
            result["generator"] = config["ar_experiment"]
            result["generator_params"] = generator_params(config["ar_experiment"])
        if config["format"] == "json":
            print(json.dumps(result))
        elif config["format"] == "table":
            print(format_table(result))
        else:
            raise ValueError(f"format={config['format']!r}: use table or json")

    run()


if __name__ == "__main__":
    main()
