"""The stage-I objective in one place: ``Stage1Criterion`` weighs the reconstruction, perceptual,
quantizer (commitment + entropy, from the LFQ), adversarial, alignment and Source Recovery terms from
the ``loss`` config; ``build_teacher`` gives the alignment teacher of the ``teacher`` config."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .alignment import alignment_kl, load_dino_teacher, tiny_random_teacher
from .gan import LeCam, frozen, hinge_d_loss, non_saturating_g_loss
from .perceptual import LPIPSLoss
from .reconstruction import reconstruction_loss

log = logging.getLogger(__name__)


class Stage1Criterion(nn.Module):
    """Generator and discriminator objectives (spec 6.2, 6.3) from the ``loss`` config."""

    def __init__(self, loss: Mapping[str, Any], has_teacher: bool, has_recovery: bool):
        super().__init__()
        self.cfg = dict(loss)
        self.lpips = None
        if self.cfg["perceptual_weight"] > 0:
            perceptual = self.cfg.get("perceptual", {})
            self.lpips = LPIPSLoss(perceptual.get("pretrained", True), perceptual.get("backbone_weights"))
        self.lecam = LeCam(self.cfg.get("lecam_decay", 0.999))
        self.has_teacher, self.has_recovery = has_teacher, has_recovery

    def generator(self, x, xrec, aux, discriminator: nn.Module | None, teacher_logits=None):
        """-> (weighted total, {name: detached value})."""
        c = self.cfg
        terms = {"rec": reconstruction_loss(x, xrec, c["reconstruction"])}
        total = c["reconstruction_weight"] * terms["rec"]
        if self.lpips is not None:
            terms["lpips"] = self.lpips(x, xrec).mean()
            total = total + c["perceptual_weight"] * terms["lpips"]
        quantizer = aux["losses"]
        total = total + quantizer["loss"]
        terms.update({k: quantizer[k] for k in ("commit", "entropy", "sample_entropy", "batch_entropy")})
        if discriminator is not None:
            with frozen(discriminator):
                terms["g_adv"] = non_saturating_g_loss(discriminator(xrec))
            total = total + c["adversarial_weight"] * terms["g_adv"]
        if teacher_logits is not None:
            terms["align"] = alignment_kl(aux["align_logits"], teacher_logits, c.get("align_tau", 4.0))
            total = total + c["align_weight"] * terms["align"]
        if self.has_recovery:
            terms["recovery"] = quantizer["recovery"]
            terms["recovery_acc"] = quantizer["recovery_accuracy"]
            total = total + c["recovery_weight"] * terms["recovery"]
        terms["total"] = total
        return total, {k: v.detach() for k, v in terms.items()}  # tensors: no host sync mid-step

    def discriminator(self, discriminator: nn.Module, x, xrec, reduce=None):
        """Hinge + LeCam on detached reconstructions. reduce averages the logit means over ranks so the
        LeCam EMAs stay identical on every process."""
        real, fake = discriminator(x), discriminator(xrec.detach())
        hinge = hinge_d_loss(real, fake)
        means = torch.stack([real.detach().mean(), fake.detach().mean()])
        if reduce is not None:
            means = reduce(means)
        self.lecam.update(means[0], means[1])
        lecam = self.lecam.penalty(real, fake)
        total = hinge + self.cfg["lecam_weight"] * lecam
        return total, {"d_hinge": hinge.detach(), "d_lecam": lecam.detach(), "d_real": means[0], "d_fake": means[1]}


def build_teacher(teacher: Mapping[str, Any], align_dim: int, align_size: int):
    kind = teacher.get("kind", "none")
    if kind == "none":
        return None
    if kind == "tiny_random":
        log.warning("alignment teacher is a tiny RANDOM DINOv2 (tests only): alignment metrics are not meaningful")
        return tiny_random_teacher(hidden_size=align_dim, num_hidden_layers=1, num_attention_heads=2, image_size=align_size)
    if kind == "dinov2":
        model = load_dino_teacher(teacher["path"])
        width = model.model.config.hidden_size
        if width != align_dim:
            raise ValueError(f"teacher width {width} != tokenizer.align_dim {align_dim}: set tokenizer.align_dim={width}")
        return model
    raise ValueError(f"teacher.kind={kind!r}: use none, dinov2 or tiny_random")
