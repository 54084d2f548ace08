"""Global alignment of the student CLS head to a frozen DINOv2 teacher (spec 5).

``transformers`` is imported lazily, inside the loaders, so importing this module stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def alignment_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 4.0
) -> torch.Tensor:
    """tau^2 * KL(softmax(t / tau) || softmax(s / tau)), summed over classes, averaged over the batch.

    student_logits, teacher_logits [B, C] (C = 768 for DINOv2-B features used as pseudo-class logits)
    -> scalar. The teacher side is detached (it is a target). Equals
    ``tau**2 * F.kl_div(log_softmax(s/tau), log_softmax(t/tau), reduction='batchmean', log_target=True)``.
    """
    log_p_t = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return tau**2 * kl.mean()


class DinoTeacher(nn.Module):
    """Frozen DINOv2 wrapper: forward(x [B, 3, 224, 224], ImageNet mean/std) -> pooler_output [B, hidden].

    ``pooler_output`` is the final-LayerNorm CLS token (768-d for dinov2-base). The wrapped
    ``transformers.Dinov2Model`` never trains: its parameters have ``requires_grad=False``, the forward
    runs under ``torch.no_grad()``, and ``train()`` keeps it in eval mode whatever the parent does.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.hidden_size = int(model.config.hidden_size)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> DinoTeacher:
        """Always eval (no dropout / drop-path), even when a parent module calls ``.train()``."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).pooler_output

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> DinoTeacher:
        return load_dino_teacher(path)


def load_dino_teacher(path: str | os.PathLike) -> DinoTeacher:
    """Load a local DINOv2 directory (``save_pretrained`` layout: config.json + weights) as a teacher.

    Never touches the network (``local_files_only=True``). A missing directory raises
    FileNotFoundError naming it and the config key to set.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"DINOv2 teacher not found: no config.json in {str(path)!r}. Set teacher.path=/path/to/dinov2-base "
            "(a local directory written by Dinov2Model.save_pretrained or a downloaded facebook/dinov2-base "
            "snapshot)."
        )
    from transformers import Dinov2Model

    return DinoTeacher(Dinov2Model.from_pretrained(str(path), local_files_only=True))


def tiny_random_teacher(
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    image_size: int = 224,
    patch_size: int = 14,
    seed: int = 0,
) -> DinoTeacher:
    """A tiny, randomly initialised DINOv2 teacher for tests and smoke runs (NOT pretrained)."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config)
    return DinoTeacher(model)
