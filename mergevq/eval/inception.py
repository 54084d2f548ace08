"""Inception Score and sFID through torch-fidelity's InceptionV3 read from a local weights file.

torch-fidelity ships the TF-FID InceptionV3 (graph 2015-12-05) converted to PyTorch, with its 1008-way
classifier. `FidelityInception` runs it once per batch and returns three feature blocks side by side,
so the platform's extraction, gathering and caching (`features.extract_features`, `FeatureCache`) work
unchanged:

- pool3 [2048];
- the classifier logits without bias [1008] (torch-fidelity's `logits_unbiased`, the TF IS code's and
  the ADM evaluator's convention) for the Inception Score;
- ADM's sFID features: `mixed_6/conv` (= `Mixed_6d.branch1x1` after its ReLU, [192, 17, 17]), its first
  7 channels, flattened channels-last as the ADM evaluator does [17 * 17 * 7 = 2023].

The weights file is torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`; any other file (for
example `save_untrained_inception`'s random one, used by the tests) is labelled untrained.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

from ..runs.card import sha256_file
from .features import to_unit_range

FIDELITY_PACKAGE = "torch-fidelity==0.4.0"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the file name carries the sha256 prefix
POOL_DIM, LOGITS_DIM, SPATIAL_CHANNELS, SPATIAL_SIZE = 2048, 1008, 7, 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE
BLOCKS = {"pool": (0, POOL_DIM), "logits": (POOL_DIM, POOL_DIM + LOGITS_DIM),
          "spatial": (POOL_DIM + LOGITS_DIM, POOL_DIM + LOGITS_DIM + SPATIAL_DIM)}
CONFIG_KEY = "eval.inception_weights"


def _fidelity_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ImportError(f"IS / sFID need torch-fidelity: pip install {FIDELITY_PACKAGE}") from None
    return FeatureExtractorInceptionV3


def check_weights_file(path: str | Path | None) -> Path:
    """The weights path as a Path, or one-line FileNotFoundError naming the path and the expected file."""
    if path in (None, ""):
        raise FileNotFoundError(f"{CONFIG_KEY} is not set: set {CONFIG_KEY}=<path to torch-fidelity's {WEIGHTS_FILE}>")
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{CONFIG_KEY}={path}: no such file; expected torch-fidelity's InceptionV3 weights {WEIGHTS_FILE}"
        )
    return path


class FidelityInception(nn.Module):
    """forward: uint8 [B,3,H,W] in [0,255] or float [B,3,H,W] in [0,1] -> float32 [B, 2048 + 1008 + 2023]
    (pool3 | logits without bias | sFID spatial features; cut with `split_blocks`).

    Float images are rounded to uint8 first (torch-fidelity's input); it resizes to 299 with TF1's
    bilinear rule. The file is checked with a weights-only load before torch-fidelity loads it.
    """

    num_features = BLOCKS["spatial"][1]
    name = "torch-fidelity-inception-v3-2015-12-05"
    provides_logits = False  # the logits are one block of the output: see split_blocks

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = check_weights_file(path)
        torch.load(self.path, map_location="cpu", weights_only=True)  # refuses anything but tensors
        self.net = _fidelity_class()("inception-v3-compat", ["2048", "logits_unbiased"],
                                     feature_extractor_weights_path=str(self.path))
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self.weights_sha256 = sha256_file(self.path)
        self.trained = self.weights_sha256.startswith(WEIGHTS_SHA256_PREFIX)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # NHWC, as ADM

    def train(self, mode: bool = True) -> FidelityInception:
        return super().train(False)  # always in eval mode (frozen batch-norm statistics)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.shape[1] != 3:
            images = (to_unit_range(images) * 255).round().to(torch.uint8)
        pool, logits = self.net(images)
        spatial, self._spatial = self._spatial, None
        return torch.cat([pool, logits, spatial.float()], dim=1)


def split_blocks(features: np.ndarray) -> dict[str, np.ndarray]:
    """[N, 5079] FidelityInception features -> {"pool": [N, 2048], "logits": [N, 1008], "spatial": [N, 2023]}."""
    return {name: features[:, lo:hi] for name, (lo, hi) in BLOCKS.items()}


def inception_score_torch_fidelity(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) IS of logits [N, 1008] with torch-fidelity's implementation, consecutive splits (as ADM)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(torch.as_tensor(np.asarray(logits)), splits=min(splits, len(logits)), shuffle=False)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def save_untrained_inception(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised network of torch-fidelity's InceptionV3 architecture (UNTRAINED:
    tests and smoke runs) as a state-dict file that FidelityInception loads. He-normal convolutions and a
    small random classifier keep the activations in range through the 94 layers."""
    cls = _fidelity_class()
    with mock.patch.object(cls, "load_state_dict", lambda self, state: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", lambda *a, **k: {}):
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path="untrained")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=gen) * 0.05)
        net.fc.bias.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
