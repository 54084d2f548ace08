"""Lookup-Free Quantization (LFQ, MAGVIT-v2 style) as used by MergeVQ (spec section 3).

Each latent channel is quantized to its sign, so a D-channel token maps to one of 2^D implicit codes
c in {-1, +1}^D. Index convention (little-endian, as in the official code whatever its docstring says):
index = sum_d 1[z_d > 0] * 2^d, i.e. bit d is channel d.

The entropy regulariser is computed without materialising the [N, 2^D] code distribution: the
per-token distribution factorises over bits, and the batch-average distribution is assembled from
two half-codebooks with one matmul. The batch term follows the official formula
-sum p log(p + eps) (eps = 1e-5 there; ``entropy_eps=0`` gives the exact entropy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_BITS = 30
OFFICIAL_ENTROPY_EPS = 1e-5  # taming/modules/vqvae/lookup_free_quantize.py: entropy_loss(eps=1e-5)


def _bit_weights(num_bits: int, device: torch.device | None = None) -> Tensor:
    """[num_bits] int64: 2^d for d = 0 .. num_bits - 1."""
    return torch.ones(num_bits, dtype=torch.int64, device=device) << torch.arange(num_bits, device=device)


def bits_to_indices(bits: Tensor) -> Tensor:
    """bits [..., D] bool or {0, 1} -> indices [...] int64, index = sum_d bit_d * 2^d."""
    return (bits.to(torch.int64) * _bit_weights(bits.shape[-1], bits.device)).sum(-1)


def indices_to_bits(idx: Tensor, num_bits: int) -> Tensor:
    """indices [...] int64 -> bits [..., num_bits] bool (bit d = (idx >> d) & 1)."""
    return (idx.unsqueeze(-1) & _bit_weights(num_bits, idx.device)) != 0


def codes_to_vectors(idx: Tensor, num_bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """indices [...] int64 -> code vectors [..., num_bits] with entries +1 (bit set) / -1."""
    return indices_to_bits(idx, num_bits).to(dtype) * 2 - 1


def sign_quantize(z: Tensor) -> Tensor:
    """z [..., D] -> q [..., D] in {-1, +1} (ties go to -1), with a straight-through gradient."""
    q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
    return z + (q - z).detach()


def _entropy(p: Tensor, eps: float = 0.0) -> Tensor:
    """-sum p log(p + eps) of a distribution p [...] (all dims summed): the official batch entropy
    for eps > 0, the exact entropy (0 log 0 = 0) for eps = 0.

    With eps = 0 the clamp only guards log(0); entr/xlogy would give inf/nan gradients at p == 0,
    which a batch distribution over 2^18 codes always has (underflowed entries).
    """
    if eps > 0:
        return -(p * (p + eps).log()).sum()
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum()


def _check_eps(eps: float) -> None:
    if not eps >= 0:
        raise ValueError(f"entropy_eps must be >= 0 (official 1e-5, 0 for the exact entropy), got {eps}")


def _work_dtype(z: Tensor) -> torch.dtype:
    """Entropy terms are computed in at least float32 (float64 inputs stay float64)."""
    return torch.promote_types(z.dtype, torch.float32)


def _bit_log_probs(z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """z [N, D] -> (log P(bit=+1), log P(bit=-1)), each [N, D].

    softmax(2 <z, c> / t) over c in {-1,+1}^D is a product over bits of softmax over c_d = +-1 of
    2 z_d c_d / t, i.e. P(c_d = +1) = sigmoid(4 z_d / t).
    """
    x = 4 * z / temperature
    return F.logsigmoid(x), F.logsigmoid(-x)


def _subcode_log_probs(log_pos: Tensor, log_neg: Tensor) -> Tensor:
    """Per-bit log-probs [N, k] -> log-probs of all 2^k sub-codes [N, 2^k] (sub-code j = its bits)."""
    k = log_pos.shape[-1]
    bits = indices_to_bits(torch.arange(2**k, device=log_pos.device), k).to(log_pos.dtype)  # [2^k, k]
    return log_pos @ bits.T + log_neg @ (1 - bits).T


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _mean_code_probs(log_pos: Tensor, log_neg: Tensor) -> Tensor:
    """Per-bit log-probs [N, D] -> mean_n p_n [2^D] in index order.

    p_n(c) = p_n^lo(c_lo) * p_n^hi(c_hi) with c_lo the low D//2 bits, so mean_n p_n = P_hi^T @ P_lo / N,
    a [2^hi, 2^lo] matrix whose row-major flattening is the little-endian index c_hi * 2^lo + c_lo.
    """
    lo = log_pos.shape[-1] // 2
    p_lo = _subcode_log_probs(log_pos[:, :lo], log_neg[:, :lo]).exp()  # [N, 2^lo]
    p_hi = _subcode_log_probs(log_pos[:, lo:], log_neg[:, lo:]).exp()  # [N, 2^hi]
    return (p_hi.T @ p_lo).flatten() / log_pos.shape[0]


def mean_code_probs(z: Tensor, temperature: float = 0.01) -> Tensor:
    """z [N, D] -> mean_n p_n [2^D] (index order), p_n = softmax_c(2 <z_n, c> / temperature).

    Exact, in O(N * 2^(D/2)) memory; computed in float32 or wider, outside autocast.
    """
    _check_temperature(temperature)
    with torch.autocast(z.device.type, enabled=False):
        return _mean_code_probs(*_bit_log_probs(z.to(_work_dtype(z)), temperature))


def _all_reduce_mean(t: Tensor) -> Tensor:
    """Average t over all processes if torch.distributed is initialised (differentiable), else t."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t) / torch.distributed.get_world_size()


def entropy_terms(
    z: Tensor, temperature: float = 0.01, *, sync_batch: bool = False, eps: float = OFFICIAL_ENTROPY_EPS
) -> tuple[Tensor, Tensor]:
    """z [N, D] -> (sample_entropy, batch_entropy), both differentiable scalars (nats).

    With p_n = softmax_c(2 <z_n, c> / temperature) over all 2^D codes c in {-1,+1}^D:
    sample_entropy = mean_n H(p_n) (exact, per bit: H(p_n) = sum_d H_bernoulli(sigmoid(4 z_nd / t)));
    the official log_softmax(logits / t + eps) adds a constant to every logit, which the softmax
    ignores, so its sample term is this exact one.
    batch_entropy = -sum_c pbar_c log(pbar_c + eps), pbar = mean_n p_n (see _mean_code_probs): the
    official formula for eps = 1e-5, the exact H(pbar) for eps = 0. With sync_batch, pbar is
    averaged over all processes first; the official code does not do this (per-GPU statistic).
    """
    _check_temperature(temperature)
    _check_eps(eps)
    with torch.autocast(z.device.type, enabled=False):
        log_pos, log_neg = _bit_log_probs(z.to(_work_dtype(z)), temperature)
        bit_entropy = -(log_pos.exp() * log_pos + log_neg.exp() * log_neg)  # [N, D]
        sample_entropy = bit_entropy.sum(-1).mean()
        avg_probs = _mean_code_probs(log_pos, log_neg)
        if sync_batch:
            avg_probs = _all_reduce_mean(avg_probs)
        return sample_entropy, _entropy(avg_probs, eps)


def entropy_terms_bruteforce(
    z: Tensor, temperature: float = 0.01, eps: float = OFFICIAL_ENTROPY_EPS
) -> tuple[Tensor, Tensor]:
    """The official entropy_loss written out over the full [N, 2^D] logits (reference and benchmark):
    probs = softmax(logits / t), log_probs = log_softmax(logits / t + eps), sample = mean_n of
    -sum probs * log_probs, batch = -sum pbar log(pbar + eps) with pbar = mean_n probs."""
    _check_temperature(temperature)
    _check_eps(eps)
    codebook = codes_to_vectors(torch.arange(2 ** z.shape[-1], device=z.device), z.shape[-1], z.dtype)
    logits = 2 * (z @ codebook.T)  # [N, 2^D]
    probs = torch.softmax(logits / temperature, dim=-1)
    log_probs = torch.log_softmax(logits / temperature + eps, dim=-1)
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy, _entropy(probs.mean(0), eps)


def validate_bits(bits: int) -> int:
    """Return bits if it is an int in [1, MAX_BITS], else raise ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"LFQ bits must be a positive int <= {MAX_BITS}, got {bits!r}")
    return bits


def bits_for_codebook_size(n: int) -> int:
    """Codebook size 2^D -> D; raises ValueError unless n is a power of two with 1 <= D <= MAX_BITS."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n & (n - 1):
        raise ValueError(f"codebook size {n} is not a power of two >= 2 (LFQ codebooks have 2^bits codes)")
    return validate_bits(n.bit_length() - 1)


def _check_parts(factorized_bits: Sequence[int], num_bits: int | None) -> None:
    if not factorized_bits or any(
        isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in factorized_bits
    ):
        raise ValueError(f"factorized_bits must be positive ints, got {tuple(factorized_bits)}")
    if num_bits is not None and sum(factorized_bits) != num_bits:
        raise ValueError(
            f"factorized_bits {tuple(factorized_bits)} sum to {sum(factorized_bits)}, not {num_bits}"
        )
    validate_bits(sum(factorized_bits))


def split_codes(
    idx: Tensor, factorized_bits: Sequence[int] = (6, 12), num_bits: int | None = None
) -> tuple[Tensor, ...]:
    """indices [...] int64 -> one int64 [...] per part; part i holds the next factorized_bits[i] bits,
    starting at bit 0 (for (6, 12): idx & 63 and idx >> 6). num_bits, if given, must equal the sum."""
    _check_parts(factorized_bits, num_bits)
    parts, shift = [], 0
    for b in factorized_bits:
        parts.append((idx >> shift) & (2**b - 1))
        shift += b
    return tuple(parts)


def join_codes(parts: Sequence[Tensor], factorized_bits: Sequence[int] = (6, 12)) -> Tensor:
    """Inverse of split_codes: parts (int64 [...] each) -> indices [...] int64."""
    _check_parts(factorized_bits, None)
    if len(parts) != len(factorized_bits):
        raise ValueError(f"got {len(parts)} parts for factorized_bits {tuple(factorized_bits)}")
    idx, shift = torch.zeros_like(parts[0]), 0
    for part, b in zip(parts, factorized_bits):
        idx = idx | (part << shift)
        shift += b
    return idx


class LFQ(nn.Module):
    """Sign quantizer over the last dimension with commitment and entropy losses (no parameters).

    forward(z [..., bits]) -> (z_q [..., bits] straight-through, codes [...] int64, losses) with raw
    losses "commit", "sample_entropy", "batch_entropy", "entropy" (= sample_weight * sample -
    batch_weight * batch) and the weighted total "loss" (= commit_weight * commit + entropy_weight *
    entropy). Entropy terms are computed in training mode only (zeros in eval mode).

    codebook_size, if given, takes precedence over bits and must be a power of two.
    sync_batch_entropy averages the batch code distribution over processes before its entropy; the
    official code does not (per-GPU batch entropy), so it is off by default. entropy_eps is the eps
    of the batch term -sum p log(p + eps): 1e-5 as in the official code, 0 for the exact entropy.
    """

    def __init__(
        self,
        bits: int = 18,
        commit_weight: float = 0.25,
        entropy_weight: float = 0.1,
        sample_weight: float = 1.0,
        batch_weight: float = 1.0,
        temperature: float = 0.01,
        sync_batch_entropy: bool = False,
        codebook_size: int | None = None,
        entropy_eps: float = OFFICIAL_ENTROPY_EPS,
    ):
        super().__init__()
        self.bits = (
            bits_for_codebook_size(codebook_size) if codebook_size is not None else validate_bits(bits)
        )
        _check_temperature(temperature)
        _check_eps(entropy_eps)
        self.entropy_eps = float(entropy_eps)
        self.commit_weight = commit_weight
        self.entropy_weight = entropy_weight
        self.sample_weight = sample_weight
        self.batch_weight = batch_weight
        self.temperature = temperature
        self.sync_batch_entropy = sync_batch_entropy

    @property
    def codebook_size(self) -> int:
        return 2**self.bits

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, temperature={self.temperature}, entropy_eps={self.entropy_eps}, "
            f"sync_batch_entropy={self.sync_batch_entropy}"
        )

    def code_vectors(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """codes [...] int64 -> quantized vectors [..., bits] in {-1, +1}."""
        return codes_to_vectors(codes, self.bits, dtype)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if z.shape[-1] != self.bits:
            raise ValueError(f"LFQ expects {self.bits} channels in the last dim, got shape {tuple(z.shape)}")
        z_q = sign_quantize(z)
        codes = bits_to_indices(z > 0)
        commit = (z - z_q.detach()).pow(2).mean()
        if self.training:
            sample, batch = entropy_terms(
                z.reshape(-1, self.bits), self.temperature, sync_batch=self.sync_batch_entropy,
                eps=self.entropy_eps,
            )
        else:
            sample = batch = commit.new_zeros(())
        entropy = self.sample_weight * sample - self.batch_weight * batch
        losses = {
            "commit": commit,
            "sample_entropy": sample,
            "batch_entropy": batch,
            "entropy": entropy,
            "loss": self.commit_weight * commit + self.entropy_weight * entropy,
        }
        return z_q, codes, losses
