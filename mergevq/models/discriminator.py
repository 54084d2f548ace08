"""Pix2Pix PatchGAN discriminator (``NLayerDiscriminator``) used by the stage-I tokenizer GAN.

The layers sit in one ``nn.Sequential`` called ``main`` in the taming order, so the parameter names
(``main.0.weight``, ``main.2.weight``, ``main.3.weight`` ...) match released taming/MergeVQ checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchGANDiscriminator(nn.Module):
    """Conv s2 -> LReLU -> [conv s2 -> BN -> LReLU] x (n_layers-1) -> conv s1 -> BN -> LReLU -> conv s1.

    All convs have kernel 4 and padding 1; convs followed by BatchNorm have no bias. Widths are
    ndf * min(2^n, 8). With the defaults (ndf 64, 3 layers) a [B, 3, 256, 256] input gives
    [B, 1, 30, 30] logits and the network has 2,765,633 parameters.

    Init (taming ``weights_init``): conv weights N(0, 0.02), conv biases left at PyTorch's default;
    BN weight N(1, 0.02), BN bias 0.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), act()]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                act(),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> patch logits [B, 1, H', W'] (30x30 for 256x256 and 3 layers)."""
        return self.main(x)
