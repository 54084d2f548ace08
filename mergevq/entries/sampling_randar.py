"""Sampling a RandAR checkpoint (spec 7.5): choose K representative positions per image, generate the
K codes in a random order with parallel decoding, predict the groups with the tokenizer's Source
Recovery (or the labelled nearest-representative fallback) and return per-position codes [B, L], so
``sampling.sample_images`` decodes them like the other generators' output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..models.positions import (
    POSITION_SAMPLERS,
    PositionBank,
    default_steps,
    nearest_groups,
    sort_by_position,
    uniform_positions,
)
from ..models.randar import RandAR, generate_randar

RECOVERY_MODES = ("auto", "source_recovery", "nearest")
FALLBACK_LABEL = "nearest_representative (fallback: each position owned by the nearest representative position)"


class RandARRoute:
    """The sampling settings of one run (sample keys override the generator's stored defaults)."""

    def __init__(self, cfg: Mapping[str, Any], model: RandAR, tokenizer: nn.Module, run_cfg: Mapping[str, Any],
                 meta: Mapping[str, Any]):
        generator = run_cfg["generator"]
        self.model, self.tokenizer, self.grid = model, tokenizer, tuple(meta["grid"])
        self.keep = int(cfg.get("keep") or max(meta["keeps"]))
        if not 1 <= self.keep <= model.args.seq_len:
            raise ValueError(f"keep={self.keep} must be in [1, L={model.args.seq_len}]")
        self.steps = int(cfg.get("steps") or generator.get("steps") or default_steps(self.keep))
        if not 1 <= self.steps <= self.keep:
            raise ValueError(f"steps={self.steps} must be in [1, keep={self.keep}]")
        self.sampler = cfg.get("position_sampler") or generator.get("position_sampler", "bank")
        if self.sampler not in POSITION_SAMPLERS:
            raise ValueError(f"position_sampler={self.sampler!r}: use one of {POSITION_SAMPLERS}")
        mode = cfg.get("recovery") or generator.get("recovery", "auto")
        if mode not in RECOVERY_MODES:
            raise ValueError(f"recovery={mode!r}: use one of {RECOVERY_MODES}")
        has_recovery = getattr(tokenizer, "recovery", None) is not None
        if mode == "source_recovery" and not has_recovery:
            raise ValueError("recovery=source_recovery but the tokenizer has no Source Recovery module: "
                             "use recovery=nearest or a tokenizer trained with recovery.enabled=true")
        self.recovery = "source_recovery" if mode == "source_recovery" or (mode == "auto" and has_recovery) else "nearest"
        self.bank = None
        if self.sampler == "bank":
            from ..data.code_cache import CodeCache

            self.bank = PositionBank.from_cache(CodeCache(run_cfg["codes"]), self.keep)

    def settings(self) -> dict[str, Any]:
        return {"keep": self.keep, "steps": self.steps, "position_sampler": self.sampler,
                "recovery": "source_recovery" if self.recovery == "source_recovery" else FALLBACK_LABEL}

    def positions(self, batch: int, generator: torch.Generator) -> Tensor:
        """[B, K] representative positions in a random generation order (position 0 always included)."""
        if self.bank is not None:
            starts = self.bank.draw(batch, self.keep, generator)
        else:
            starts = uniform_positions(batch, self.keep, self.model.args.seq_len, generator)
        order = torch.rand(batch, self.keep, generator=generator).argsort(1)
        return starts.gather(1, order)

    @torch.no_grad()
    def generate(self, labels: Tensor, seed: int, **sampling) -> tuple[Tensor, dict]:
        """labels [B] -> (per-position codes [B, L], stats of ``generate_randar`` plus groups [B, L],
        codes [B, K] and positions [B, K] in canonical order)."""
        positions = self.positions(len(labels), torch.Generator().manual_seed(seed)).to(labels.device)
        codes, stats = generate_randar(self.model, labels, positions, self.steps, seed=seed, **sampling)
        codes, starts = sort_by_position(codes, positions)
        if self.recovery == "source_recovery":
            groups = self.tokenizer.recover_groups(codes, starts)
        else:
            groups = nearest_groups(starts, self.grid)
        stats.update(groups=groups, codes=codes, positions=starts)
        return codes.gather(1, groups), stats
