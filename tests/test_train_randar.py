"""generator=randar end to end, in-process: a few training steps on a tiny code cache (K 16 and 25
per image), the reloaded checkpoint, sampling through Source Recovery or the nearest-representative
fallback, and the parameter count of the paper preset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers.models import TINY_PHOTOS, write_tokenizer_run
from helpers.stage2 import checkpoint_steps, sample_config, train, train_rows

from mergevq.data.code_cache import CodeCacheWriter
from mergevq.entries.sampling import sample_images
from mergevq.models.randar import RandAR
from mergevq.runs.restore import load_trained_generator

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (see conftest)
RECOVERY = {"enabled": True, "width": 32, "depth": 1, "num_heads": 2}


def write_cache(out: Path, tokenizer_run: Path, items: int = 16) -> Path:
    """A code cache of contiguous-run groups (K = 16 or 25 per item) for the tiny 8 x 8 grid."""
    g = torch.Generator().manual_seed(0)
    meta = {"grid": [8, 8], "codebook_bits": 18, "codebook_size": 2**18, "keep": {"choices": [16, 25]},
            "tokenizer": {"checkpoint": str(tokenizer_run / "checkpoints" / "step_00000001"), "weights": "ema"}}
    with CodeCacheWriter(out, shard_size=10, meta=meta) as writer:
        for i in range(items):
            keep = 16 if i % 2 else 25
            cuts = torch.randperm(63, generator=g)[: keep - 1].sort().values + 1
            owner = torch.zeros(64, dtype=torch.long)
            owner[cuts] = 1
            groups = owner.cumsum(0)[None]
            codes = torch.randint(0, 2**18, (1, keep), generator=g)
            writer.add(codes, groups, torch.tensor([keep]), torch.tensor([i % 3]), torch.tensor([False]))
    return out


@pytest.fixture(scope="module")
def randar_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("randar")
    tokenizer_run = write_tokenizer_run(work / "tok", TINY_PHOTOS, recovery=RECOVERY)
    codes = write_cache(work / "codes", tokenizer_run)
    return train(work / "run", codes, "generator=randar", "ar.token_dropout=0.0")


def test_randar_training_and_reload(randar_run):
    assert checkpoint_steps(randar_run) == [4]
    rows = train_rows(randar_run)
    losses = [rows[s]["train/loss"] for s in range(1, 5)]
    assert all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - math.log(2**18)) < 0.1 and losses[-1] < losses[0]
    model, mergear, config, meta, _ = load_trained_generator(randar_run)
    assert isinstance(model, RandAR) and mergear is None and config["generator"]["kind"] == "randar"
    assert model.args.prefix_tokens == 1 and meta["keeps"] == [16, 25]


@pytest.mark.parametrize("recovery", ["auto", "nearest"])
def test_randar_sampling_through_recovery(randar_run, recovery):
    config = sample_config(f"ckpt={randar_run}", "per_class=2", "classes=[0,1]", "keep=25", f"recovery={recovery}")
    result = sample_images(config, torch.device("cpu"))
    settings, stats = result["settings"], result["stats"]
    assert result["images"].shape == (4, 32, 32, 3) and result["codes"].shape == (4, 64)
    assert settings["keep"] == 25 and settings["steps"] == 9 and settings["position_sampler"] == "bank"
    assert settings["recovery"] == "source_recovery" if recovery == "auto" else settings["recovery"].startswith("nearest")
    assert 0 < stats["peak_kv_cache_entries"] < 2 * 25  # parallel decoding: fewer than [C] + 2K - 1 entries
    assert all(len(set(row.tolist())) <= 25 for row in result["codes"])  # at most K distinct codes per image


def test_randar_preset_parameter_count():
    from mergevq.entries.summary import generator_params

    counts = {name: generator_params(f"ar_l_randar_{name}") for name in ("g", "gr")}
    # the 343.6M "B" GPT (spec 7.1) plus RandAR's one shared position-instruction vector (1024)
    assert counts["g"] == counts["gr"] == 343_570_432 + 1024
