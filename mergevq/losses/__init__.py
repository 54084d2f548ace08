"""Stage-I losses: reconstruction, LPIPS, GAN (hinge / non-saturating / LeCam), DINOv2 alignment."""

from mergevq.losses.alignment import DinoTeacher, alignment_kl, load_dino_teacher, tiny_random_teacher
from mergevq.losses.gan import LeCam, frozen, hinge_d_loss, non_saturating_g_loss
from mergevq.losses.perceptual import LPIPSLoss, hub_vgg16_path
from mergevq.losses.reconstruction import reconstruction_loss

__all__ = [
    "DinoTeacher",
    "LPIPSLoss",
    "LeCam",
    "alignment_kl",
    "frozen",
    "hinge_d_loss",
    "hub_vgg16_path",
    "load_dino_teacher",
    "non_saturating_g_loss",
    "reconstruction_loss",
    "tiny_random_teacher",
]
