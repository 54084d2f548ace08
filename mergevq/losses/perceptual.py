"""VGG16 LPIPS perceptual loss with offline weights.

The linear calibration layers ship inside the ``lpips`` wheel (v0.1 ``vgg.pth``). The ImageNet VGG16
backbone is never downloaded: it is read from ``backbone_weights`` or from the torch hub cache.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lpips
import torch
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's file name for the ImageNet VGG16 weights


def hub_vgg16_path() -> Path:
    """Where torchvision caches its VGG16 weights: ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a plain state dict from a ``.safetensors`` file or a torch ``.pth``/``.pt`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_vgg_backbone(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy torchvision ``features.<i>.*`` tensors into lpips' ``slice<k>.<i>.*`` backbone.

    Extra keys (the classifier) are ignored; a missing feature tensor raises ValueError.
    """
    mapped, missing = {}, []
    for name in net.state_dict():
        _slice, idx, leaf = name.split(".")
        key = f"features.{idx}.{leaf}"
        if key in state:
            mapped[name] = state[key]
        else:
            missing.append(key)
    if missing:
        raise ValueError(
            f"not a torchvision vgg16 state dict: missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
        )
    net.load_state_dict(mapped)


class LPIPSLoss(nn.Module):
    """Frozen VGG16 LPIPS (v0.1 linear layers). forward(x, y) with x, y [B, 3, H, W] in [-1, 1] -> [B].

    Backbone weights:
      - ``pretrained=True``: read ``backbone_weights`` if given (a torchvision vgg16 state dict,
        .pth or .safetensors; only ``features.*`` is used), else the torch hub cache file
        (``hub_vgg16_path()``). Neither present -> FileNotFoundError listing the paths looked at.
      - ``pretrained=False``: random backbone (values are then *not* the published LPIPS);
        ``backbone_weights`` is ignored with a warning.

    ``self.pretrained`` records whether an ImageNet-style backbone file was loaded and
    ``self.backbone_source`` names it (or ``"random"``), so metrics can be labelled. The whole
    network stays in eval mode (its dropout off) with ``requires_grad=False``; gradients still
    flow to the inputs.
    """

    def __init__(self, pretrained: bool = True, backbone_weights: str | os.PathLike | None = None):
        super().__init__()
        path = None
        if pretrained:
            path = Path(backbone_weights) if backbone_weights is not None else hub_vgg16_path()
            if not path.is_file():
                raise FileNotFoundError(
                    f"LPIPS: VGG16 ImageNet backbone weights not found; looked at: {str(path)!r}. "
                    f"Set loss.perceptual.backbone_weights=/path/to/{VGG16_FILE} (a torchvision vgg16 "
                    f"state dict, .pth or .safetensors), put the file at {str(hub_vgg16_path())!r}, or set "
                    "loss.perceptual.pretrained=false for a random backbone (not the published LPIPS)."
                )
        elif backbone_weights is not None:
            warnings.warn("LPIPSLoss(pretrained=False) ignores backbone_weights", stacklevel=2)

        with warnings.catch_warnings():  # lpips calls torchvision's deprecated vgg16(pretrained=False)
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        if path is not None:
            _load_vgg_backbone(self.net.net, load_state_dict_file(path))
        self.pretrained = path is not None
        self.backbone_source = str(path) if path is not None else "random"
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> LPIPSLoss:
        """Always eval: the frozen LPIPS network never switches its dropout on."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y [B, 3, H, W] in [-1, 1] -> per-image LPIPS [B]."""
        return self.net(x, y, normalize=False).flatten()
