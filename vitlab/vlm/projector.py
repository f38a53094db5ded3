"""The vision-to-language projector: maps each visual token into the LM's embedding space.

LLaVA (Liu et al. 2023) used one linear layer; LLaVA-1.5 a 2-layer MLP with GELU (``mlp2x_gelu``):
    linear: x W + b               mlp: GELU(x W1 + b1) W2 + b2       (vision_dim -> lm_dim -> lm_dim)
Initialised as LLaVA's builder leaves it: PyTorch's default ``nn.Linear`` init (not the ViT's std 0.02, which made
visual tokens ~30x smaller than the LM's position embeddings and measurably slowed the first steps of training).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vitlab.checks import check_choice, check_int

__all__ = ["VisionProjector"]


class VisionProjector(nn.Module):
    """[B, N, vision_dim] -> [B, N, lm_dim]."""

    def __init__(self, vision_dim: int, lm_dim: int, kind: str = "mlp"):
        super().__init__()
        self.vision_dim = check_int(vision_dim, "vision_dim", "VisionProjector")
        self.lm_dim = check_int(lm_dim, "lm_dim", "VisionProjector")
        self.kind = check_choice(kind, ("mlp", "linear"), "kind", "VisionProjector")
        if kind == "linear":
            self.proj = nn.Linear(vision_dim, lm_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 3 or x.shape[-1] != self.vision_dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"VisionProjector: x must be visual tokens [B, N, {self.vision_dim}], got {shape}")
        return self.proj(x)

    def extra_repr(self) -> str:
        return f"{self.kind}: {self.vision_dim} -> {self.lm_dim}"
