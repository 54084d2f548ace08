"""Reconstruction metrics, linear probing and evaluation cards (mergevq.eval.recon / probe / card)."""

from __future__ import annotations

import hashlib
import json
import math
import threading

import numpy as np
import pytest
import torch
from helpers.models import load_group
from torch import nn

from mergevq.eval.probe import extract_probe_features, linear_probe
from mergevq.eval.recon import CodebookStats, ReconstructionEvaluator, psnr_per_image, ssim_per_image
from mergevq.models.factory import build_tokenizer
from mergevq.models.magvit2 import Magvit2Tokenizer
from mergevq.runs.card import (
    PACKAGES,
    UNTRAINED_FID,
    UNTRAINED_LPIPS,
    EvaluationCard,
    lpips_info,
    package_versions,
    sha256_file,
    write_card,
)

KEEPS = [36, 64]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (see conftest)


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return build_tokenizer(load_group("tokenizer", "tiny"), load_group("variant", "gr"), {"bits": 18}).eval()


@pytest.fixture(scope="module")
def images():
    """12 images [12, 3, 32, 32] in [-1, 1]: smooth fields plus noise, so codes vary."""
    g = torch.Generator().manual_seed(1)
    base = torch.nn.functional.interpolate(torch.rand(12, 3, 4, 4, generator=g), size=32, mode="bilinear")
    return (base + 0.1 * torch.randn(12, 3, 32, 32, generator=g)).clamp(0, 1) * 2 - 1


class FakeLPIPS(nn.Module):
    """Per-image mean absolute difference; 'pretrained' like LPIPSLoss (False: a random backbone)."""

    pretrained = False
    backbone_source = "random"

    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(1)


def pooled_features(x: torch.Tensor) -> np.ndarray:
    """[B, 3, 32, 32] -> [B, 48] (a stand-in for InceptionV3 pool3)."""
    return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1).numpy()


def make_evaluator(tokenizer):
    return ReconstructionEvaluator(tokenizer, KEEPS, lpips=FakeLPIPS(), feature_fn=pooled_features)


# ----------------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_is_per_image_not_batch_level():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    y = x.clone()
    y[1] = (x[1] + 0.2 * torch.randn(3, 8, 8, generator=g)).clamp(-1, 1)
    psnr = psnr_per_image(y, x)

    xs, ys = (x.double().numpy() + 1) / 2, (y.double().numpy() + 1) / 2
    mse = ((xs - ys) ** 2).reshape(2, -1).mean(1)
    assert psnr[0].item() == pytest.approx(100.0)  # identical image: MSE floored at 1e-10
    assert psnr[1].item() == pytest.approx(10 * math.log10(1 / mse[1]), rel=1e-9)
    batch_level = 10 * math.log10(1 / ((xs - ys) ** 2).mean())  # the official script's number
    assert abs(psnr.mean().item() - batch_level) > 10


def test_ssim_identical_is_one_and_noise_lowers_it():
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.allclose(ssim_per_image(x, x), torch.ones(3, dtype=torch.float64))
    noisy = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
    ssim = ssim_per_image(noisy, x)
    assert ssim.shape == (3,) and (ssim < 0.9).all()


# ------------------------------------------------------------------------------------------- codebook


def test_codebook_stats_by_hand():
    stats = CodebookStats(8)
    stats.update(torch.tensor([[0, 0, 1, 1]]))
    stats.update(torch.tensor([2, 3]))  # counts 2, 2, 1, 1 over 8 codes
    p = np.array([2, 2, 1, 1]) / 6
    nats = -(p * np.log(p)).sum()
    assert stats.usage() == pytest.approx(4 / 8)
    assert stats.entropy() == pytest.approx(nats)
    assert stats.entropy("bits") == pytest.approx(nats / math.log(2))
    assert stats.perplexity() == pytest.approx(math.exp(nats))

    uniform = CodebookStats(2**18)
    uniform.update(torch.arange(2**18))
    assert uniform.usage() == 1.0 and uniform.entropy("bits") == pytest.approx(18.0)
    assert uniform.counts.dtype == torch.int64

    other = CodebookStats(8)
    other.update(torch.tensor([7]))
    stats.merge(other)
    assert stats.usage() == pytest.approx(5 / 8) and stats.total == 7
    with pytest.raises(ValueError, match="outside"):
        stats.update(torch.tensor([8]))


# ------------------------------------------------------------------------------ reconstruction evaluator


class ThreadGroup:
    """Exchange tensors between threads: simulates the collectives of N processes."""

    def __init__(self, size: int):
        self.slots = [None] * size
        self.barrier = threading.Barrier(size)

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class ThreadAccelerator:
    """The two collectives ReconstructionEvaluator.reduce uses, with accelerate's semantics."""

    device = torch.device("cpu")

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank = group, rank

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        return torch.stack(self.group.exchange(self.rank, tensor)).sum(0)

    def gather(self, tensor):
        return torch.cat(self.group.exchange(self.rank, tensor))


def assert_same_results(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for keep in a:
        for name, value in a[keep].items():
            assert b[keep][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (keep, name)


def test_reconstruction_evaluator_one_pass_and_sharded(tokenizer, images):
    full = make_evaluator(tokenizer)
    for batch in images.split(4):  # 3 batches
        full.update(batch)
    results = full.results()
    assert list(results) == KEEPS
    for keep in KEEPS:
        r = results[keep]
        assert r["num_images"] == 12 and r["num_tokens"] == keep
        assert math.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1 and r["lpips"] > 0
        assert 0 < r["code_usage"] <= 12 * keep / 2**18
        assert 0 < r["code_entropy_bits"] <= math.log2(12 * keep)
        assert full.features(keep).shape == (12, 48)
    assert full.real_features().shape == (12, 48)
    np.testing.assert_allclose(full.real_features(), pooled_features(images), rtol=1e-6)

    # Two shards of unequal size, evaluated separately (as two processes would).
    shards = [make_evaluator(tokenizer), make_evaluator(tokenizer)]
    for batch in images[:8].split(4):
        shards[0].update(batch)
    for batch in images[8:].split(3):
        shards[1].update(batch)

    merged = make_evaluator(tokenizer)
    for shard in shards:
        merged.merge(shard)
    assert_same_results(results, merged.results())

    group = ThreadGroup(2)
    threads = [threading.Thread(target=s.reduce, args=(ThreadAccelerator(group, r),)) for r, s in enumerate(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for shard in shards:
        assert_same_results(results, shard.results())
        for keep in KEEPS:
            np.testing.assert_allclose(shard.features(keep), full.features(keep), rtol=1e-5, atol=1e-6)
            assert torch.equal(shard.acc[keep].codes.counts, full.acc[keep].codes.counts)
        np.testing.assert_allclose(shard.real_features(), full.real_features(), rtol=1e-6)
    with pytest.raises(RuntimeError):
        shards[0].update(images[:1])


def test_reconstruction_evaluator_magvit2_without_extras():
    torch.manual_seed(0)
    magvit = Magvit2Tokenizer(dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=10)).eval()
    evaluator = ReconstructionEvaluator(magvit, [None])
    evaluator.update(torch.rand(2, 3, 16, 16) * 2 - 1)
    r = evaluator.results()[None]
    assert r["num_images"] == 2 and r["num_tokens"] == 64 and r["lpips"] is None
    with pytest.raises(ValueError):
        evaluator.features(None)


# --------------------------------------------------------------------------------------------- probing


def test_extract_probe_features_shapes(tokenizer, images):
    loader = [{"image": images[:4], "label": torch.arange(4)}, (images[4:6], torch.tensor([4, 5]))]
    feats = extract_probe_features(tokenizer, loader, keep=36)
    assert set(feats) == {"cls", "mean"}
    width = tokenizer.encoder.width
    for kind in ("cls", "mean"):
        x, y = feats[kind]
        assert x.shape == (6, width) and x.dtype == np.float32
        np.testing.assert_array_equal(y, np.arange(6))

    # The features are those of the tokenizer's forward pass.
    feats = extract_probe_features(tokenizer, loader[:1], keep=36, kinds=("cls", "mean_latent"))
    with torch.no_grad():
        _, aux = tokenizer(images[:4], 36)
    np.testing.assert_allclose(feats["cls"][0], aux["cls"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats["mean_latent"][0], aux["z"].mean(1).numpy(), rtol=1e-5, atol=1e-5)

    magvit = Magvit2Tokenizer(dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=10)).eval()
    feats = extract_probe_features(magvit, [(torch.rand(3, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2]))])
    assert set(feats) == {"mean_latent"} and feats["mean_latent"][0].shape == (3, 10)


def gaussian_classes(num_classes: int, n: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (num_classes, dim)) * 3
    labels = rng.integers(0, num_classes, n)
    return (means[labels] + rng.normal(0, 1, (n, dim))).astype(np.float32), labels


def test_linear_probe_separable_and_random_labels():
    x, y = gaussian_classes(10, 2500, 32, seed=0)
    result = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], epochs=30)
    assert result["top1"] >= 0.95 and result["top5"] >= result["top1"] and result["train_top1"] >= 0.95
    assert linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], epochs=30) == result  # deterministic

    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, (2500, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 2500)
    chance = linear_probe(noise[:2000], labels[:2000], noise[2000:], labels[2000:], epochs=30)
    assert chance["top1"] < 0.2

    two = linear_probe(x[:200], y[:200] % 2, x[200:300], y[200:300] % 2, epochs=5)
    assert "top5" not in two


# ----------------------------------------------------------------------------------------------- cards


def full_card(tmp_path, trained: bool) -> dict:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    return EvaluationCard(
        metrics={36: {"psnr": 21.5, "ssim": 0.61, "rfid": 3.2}, 64: {"psnr": 23.0, "ssim": 0.70, "rfid": 2.1}},
        checkpoint=str(checkpoint),
        checkpoint_sha256=sha256_file(checkpoint),
        weights="ema",
        keeps=[36, 64],
        image_size=32,
        resize="bilinear 32",
        crop="center 32",
        num_images=12,
        reference_stats_sha256=None,
        feature_extractor={"name": "inception-v3-pool3", "weights_sha256": None, "trained": trained},
        seeds={"eval": 0},
        lpips=lpips_info(FakeLPIPS()),
    ).to_dict()


def test_write_card_files_and_warnings(tmp_path):
    card = full_card(tmp_path, trained=False)
    assert card["checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()
    versions = package_versions()
    assert set(versions) == set(PACKAGES) and versions["numpy"] == np.__version__
    json_path, md_path = write_card(tmp_path / "run", card)
    assert json_path.name == "eval_card.json" and md_path.name == "eval_card.md"
    data = json.loads(json_path.read_text())
    assert UNTRAINED_FID in data["warnings"] and UNTRAINED_LPIPS in data["warnings"]
    assert data["metrics"]["36"]["psnr"] == 21.5
    md = md_path.read_text()
    assert md.index(f"**WARNING: {UNTRAINED_FID}**") < md.index("## Metrics")
    assert "| K | psnr | ssim | rfid |" in md and "| 64 | 23.0000 | 0.7000 | 2.1000 |" in md
    assert not list((tmp_path / "run").glob("*.tmp*"))

    trained = full_card(tmp_path, trained=True)
    trained["lpips"] = {"name": "lpips-vgg", "pretrained": True}
    json_path, md_path = write_card(tmp_path / "ok", trained)
    assert json.loads(json_path.read_text())["warnings"] == [] and "WARNING" not in md_path.read_text()


def test_write_card_lists_missing_fields(tmp_path):
    card = full_card(tmp_path, trained=True)
    for key in ("checkpoint_sha256", "seeds"):
        del card[key]
    del card["feature_extractor"]["trained"]
    del card["package_versions"]["scipy"]
    card["reference_stats_sha256"] = None  # allowed
    with pytest.raises(ValueError) as info:
        write_card(tmp_path, card)
    message = str(info.value)
    for name in ("checkpoint_sha256", "seeds", "feature_extractor.trained", "package_versions.scipy"):
        assert name in message
    assert "reference_stats_sha256" not in message
    assert not (tmp_path / "eval_card.json").exists()
