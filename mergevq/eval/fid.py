"""Distribution metrics on image features: FID statistics and distance, Inception Score, and the improved
precision/recall of Kynkaanniemi et al. (2019).

All inputs are feature arrays `[N, D]` (numpy or torch); statistics are float64. Whether a number is a
real FID depends on the extractor: with an untrained one (`extractor.trained is False`) it must be
reported as a "random-feature Frechet distance", never as FID.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from scipy.special import rel_entr, softmax

from mergevq.eval.features import extract_features

# ---------------------------------------------------------------------------------------------- FID


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mu [D], sigma [D, D]) in float64 (unbiased covariance, N - 1)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, /, **meta) -> Path:
    """Write `mu`, `sigma` and scalar/string metadata (e.g. `extractor_meta(...)`, `num_images`) to .npz."""
    reserved = {"mu", "sigma"} & set(meta)
    if reserved:
        raise ValueError(f"metadata keys clash with {sorted(reserved)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v) for k, v in meta.items()}
    for k, v in arrays.items():
        if v.dtype == object:
            raise TypeError(f"metadata {k!r} must be a number, string or plain array, got {type(meta[k])}")
    with open(path, "wb") as fh:  # a file handle: np.savez would otherwise append ".npz"
        np.savez(fh, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **arrays)
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """.npz -> (mu [D], sigma [D, D], meta), meta values as Python scalars/strings where 0-d."""
    with np.load(path, allow_pickle=False) as data:
        mu, sigma = data["mu"], data["sigma"]
        meta = {k: (data[k].item() if data[k].ndim == 0 else data[k]) for k in data.files
                if k not in ("mu", "sigma")}
    return mu, sigma, meta


def _sqrtm_residual(root: np.ndarray, mat: np.ndarray) -> float:
    return float(np.linalg.norm(root @ root - mat) / max(np.linalg.norm(mat), 1e-300))


def _trace_sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float, imag_tol: float) -> float:
    """Tr(sqrtm(sigma1 @ sigma2)) with scipy.linalg.sqrtm (the pytorch-fid / TF-FID formula)."""
    prod = sigma1 @ sigma2
    covmean = scipy.linalg.sqrtm(prod)
    if not np.isfinite(covmean).all() or _sqrtm_residual(covmean, prod) > 1e-4:
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("matrix square root is not finite even with eps on the diagonal")
    if np.iscomplexobj(covmean):
        worst = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if worst > imag_tol:
            raise ValueError(f"matrix square root has a non-negligible imaginary part ({worst:.3g})")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrtm_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Same trace via symmetric eigendecompositions: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2)."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root @ sigma2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, imag_tol: float = 1e-3,
                     method: str = "sqrtm") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 @ sigma2)).

    mu: [D]; sigma: [D, D]. method="sqrtm" (default, the reference formula): when the product is
    (near) singular and `scipy.linalg.sqrtm` fails or is inaccurate, `eps * I` is added to both
    covariances; imaginary parts of the root are dropped when negligible (max |imag| on the diagonal
    <= imag_tol), else ValueError. method="eigh": the same trace from two symmetric
    eigendecompositions, about 2.5x faster at D=2048 on CPU and free of complex parts (agrees with
    "sqrtm" to ~1e-9 relative on well-conditioned covariances).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")

    if method == "sqrtm":
        tr_covmean = _trace_sqrtm_product(sigma1, sigma2, eps, imag_tol)
    elif method == "eigh":
        tr_covmean = _trace_sqrtm_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features1, features2, method: str = "sqrtm") -> float:
    """Frechet distance between the Gaussian fits of two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2), method=method)


# ---------------------------------------------------------------------------------- Inception Score


def inception_score(logits_or_probs, splits: int = 10, from_logits: bool | None = None) -> tuple[float, float]:
    """Inception Score from class predictions [N, C] -> (mean, std) over `splits` consecutive chunks.

    IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean prediction of the chunk. `from_logits=None`
    treats the input as probabilities when it is non-negative with rows summing to 1, else applies a
    softmax. The paper protocol needs the 1008-way logits of the TF Inception graph; the TF-FID
    TorchScript used for FID stops at pool3, so the platform's IS comes from torch-fidelity's
    InceptionV3 (`mergevq.eval.inception`), whose implementation this one equals.
    """
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected predictions [N, C], got shape {x.shape}")
    if not 1 <= splits <= x.shape[0]:
        raise ValueError(f"splits must be in [1, N={x.shape[0]}], got {splits}")
    if from_logits is None:
        from_logits = not ((x >= 0).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-4))
    probs = softmax(x, axis=1) if from_logits else x
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        scores.append(np.exp(rel_entr(part, marginal).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_of(extractor, images_iterable, device=None, accelerator=None, splits: int = 10,
                       **extract_kwargs) -> tuple[float, float]:
    """IS of images through a classifier that outputs logits ([B, C]; `extractor.provides_logits`)."""
    if not getattr(extractor, "provides_logits", False):
        raise ValueError(
            f"extractor {getattr(extractor, 'name', type(extractor).__name__)!r} gives features, not class "
            "logits: the Inception Score needs a logits extractor (the TF-FID TorchScript ends at pool3)"
        )
    logits = extract_features(extractor, images_iterable, device, accelerator, **extract_kwargs)
    return inception_score(logits, splits=splits, from_logits=True)


# ------------------------------------------------------------------------------- precision / recall


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, D], [m, D] -> squared Euclidean distances [n, m] (clamped at 0)."""
    return (a.square().sum(1, keepdim=True) + b.square().sum(1)[None] - 2.0 * a @ b.T).clamp_min_(0.0)


def _knn_sq_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance of each row of x [N, D] to its k-th nearest other row -> [N]."""
    radii = []
    for i in range(0, x.shape[0], batch_size):
        rows = x[i: i + batch_size]
        best = None  # running k+1 smallest (self included, at distance 0)
        for j in range(0, x.shape[0], batch_size):
            d2 = _sq_dists(rows, x[j: j + batch_size])
            cand = d2 if best is None else torch.cat([best, d2], dim=1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def _covered(queries: torch.Tensor, refs: torch.Tensor, ref_sq_radii: torch.Tensor,
             batch_size: int) -> torch.Tensor:
    """For each query row: inside the k-NN ball of at least one reference row? -> bool [n]."""
    out = []
    for i in range(0, queries.shape[0], batch_size):
        q = queries[i: i + batch_size]
        hit = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
        for j in range(0, refs.shape[0], batch_size):
            hit |= (_sq_dists(q, refs[j: j + batch_size]) <= ref_sq_radii[None, j: j + batch_size]).any(1)
        out.append(hit)
    return torch.cat(out)


def precision_recall(real, fake, k: int = 3, batch_size: int = 4096, device=None,
                     dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) of features real [N, D], fake [M, D].

    precision: fraction of fake samples inside the k-NN ball of some real sample;
    recall: fraction of real samples inside the k-NN ball of some fake sample.
    Distances are computed in blocks of `batch_size` x `batch_size` (memory O(batch_size^2)), on
    `device` (default CPU) in `dtype`, after centering on the real mean (better rounding).
    """
    real_t = torch.as_tensor(np.asarray(real), dtype=dtype, device=device)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=dtype, device=device)
    if real_t.ndim != 2 or fake_t.ndim != 2 or real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D], got {tuple(real_t.shape)} and {tuple(fake_t.shape)}")
    if min(real_t.shape[0], fake_t.shape[0]) <= k:
        raise ValueError(f"need more than k={k} samples in each set")
    center = real_t.mean(0)
    real_t, fake_t = real_t - center, fake_t - center
    real_r = _knn_sq_radii(real_t, k, batch_size)
    fake_r = _knn_sq_radii(fake_t, k, batch_size)
    precision = _covered(fake_t, real_t, real_r, batch_size).double().mean().item()
    recall = _covered(real_t, fake_t, fake_r, batch_size).double().mean().item()
    return precision, recall
