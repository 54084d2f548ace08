"""Learned Source Recovery: predict which kept token owns each of the L positions from the K codes.

Paper (Fig. 1b, Table A2): L learned queries cross-attend (2 layers, width 384, 8 heads, FFN 4x) to
the K quantized tokens; a shared linear head scores every (position, token) pair; trained with a
cross-entropy over K per position against the encoder's true groups.

Keys carry position information (``key_positions``, default on; the official skeleton has none): a
learned embedding of each token's representative position (its group's first raster position, which
the canonical order sorts by) is added to the key tokens, so the K tokens say where they sit. With
starts given, ``predict_groups`` returns a canonical partition (``positions.recovered_groups``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

from .positions import recovered_groups
from .transformer import init_transformer_weights


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + MLP, LayerScale 1e-5. q [B, L, C], kv [B, K, C] -> [B, L, C]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ls1 = LayerScale(dim, init_values=1e-5)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values=1e-5)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        batch, queries, dim = q.shape
        heads = self.num_heads
        query = self.q(self.norm1(q)).view(batch, queries, heads, -1).transpose(1, 2)
        key, value = self.kv(kv).view(batch, kv.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(batch, queries, dim)
        q = q + self.drop_path(self.ls1(self.proj(out)))
        return q + self.drop_path(self.ls2(self.mlp(self.norm2(q))))


class SourceRecovery(nn.Module):
    """z_q [B, K, z] -> logits [B, L, K] over the owner of each position."""

    def __init__(
        self,
        num_positions: int,
        z_channels: int = 18,
        width: int = 384,
        depth: int = 2,
        num_heads: int = 8,
        drop_path: float = 0.0,
        key_positions: bool = True,
    ):
        super().__init__()
        self.embed = nn.Linear(z_channels, width)
        self.key_pos = nn.Embedding(num_positions, width) if key_positions else None
        self.norm_in = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.zeros(1, num_positions, width))
        self.blocks = nn.ModuleList(CrossAttentionBlock(width, num_heads, drop_path=drop_path) for _ in range(depth))
        self.head = nn.Linear(width, width)
        init_transformer_weights(self)
        nn.init.normal_(self.queries, std=0.02)
        if self.key_pos is not None:
            nn.init.normal_(self.key_pos.weight, std=0.02)

    def forward(self, z_q: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """z_q [B, K, z] (canonical order), starts [B, K] first raster position of each group (needed
        with key_positions) -> logits [B, L, K]."""
        kv = self.norm_in(self.embed(z_q))
        if self.key_pos is not None:
            if starts is None:
                raise ValueError("this Source Recovery has position keys: pass the groups' starts")
            kv = kv + self.key_pos(starts.clamp_max(self.key_pos.num_embeddings - 1))
        q = self.queries.expand(z_q.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, kv)
        return self.head(q) @ self.head(kv).transpose(1, 2)

    def predict_groups(self, z_q: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K, z], starts [B, K] or None -> groups [B, L]: the argmax owner per position, constrained
        to a canonical partition when starts are given (``positions.recovered_groups``)."""
        logits = self.forward(z_q, starts)
        return logits.argmax(dim=-1) if starts is None else recovered_groups(logits, starts)


def recovery_loss(logits: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over K per position. logits [B, L, K], groups [B, L] -> scalar."""
    return F.cross_entropy(logits.flatten(0, 1), groups.flatten())


@torch.no_grad()
def recovery_targets(tokenizer: nn.Module, images: torch.Tensor, keep: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What Source Recovery learns from, by the (frozen) tokenizer: images [B, 3, H, W] at K ->
    (code vectors z_q [B, K, z] in canonical order, the groups' first positions [B, K], true groups [B, L])."""
    from .positions import group_starts

    tokens = tokenizer.encode(images, keep)
    z_q = tokenizer.quantizer.code_vectors(tokens.codes)
    return z_q, group_starts(tokens.groups, z_q.shape[1]), tokens.groups


def fit_recovery(tokenizer: nn.Module, images: torch.Tensor, keep: int, steps: int, lr: float = 1e-4,
                 weight_decay: float = 1e-2, betas: tuple[float, float] = (0.9, 0.95)) -> list[tuple[float, float]]:
    """Train only ``tokenizer.recovery`` on a frozen tokenizer's groups for images [B, 3, H, W] at K
    (Table A2's optimizer: AdamW (0.9, 0.95), wd 1e-2, lr 1e-4) -> [(loss, accuracy)] per step."""
    if tokenizer.recovery is None:
        raise ValueError("the tokenizer has no Source Recovery module (recovery.enabled=true)")
    z_q, starts, groups = recovery_targets(tokenizer, images, keep)
    module = tokenizer.recovery.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    history = []
    for _ in range(steps):
        logits = module(z_q, starts)
        loss = recovery_loss(logits, groups)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append((float(loss.detach()), float((logits.argmax(-1) == groups).float().mean())))
    module.eval()
    return history
