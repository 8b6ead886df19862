"""LLaVA-1.5's projector: every patch becomes one visual token through a small MLP."""

from __future__ import annotations

import torch

from segrouter.compressors.base import Compressor, ImageContext, VisualTokens, projection
from segrouter.geometry import grid_coords
from segrouter.registry import register


@register("compressor", "mlp")
class MLPProjector(Compressor):
    """No compression: the baseline every token-saving method is measured against (``depth`` Linear
    layers with GELU between, as in LLaVA-1.5's ``mlp2x_gelu`` for depth 2)."""

    def __init__(self, in_dim: int, out_dim: int, grid_size: tuple[int, int], /, *, depth: int = 2) -> None:
        super().__init__()
        self.proj = projection(in_dim, out_dim, depth)
        self.register_buffer("coords", grid_coords(*grid_size), persistent=False)

    def forward(self, features: torch.Tensor, images: torch.Tensor,
                context: ImageContext | None = None) -> VisualTokens:
        b = features.shape[0]
        tokens = self.proj(features.flatten(2).transpose(1, 2))
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return VisualTokens(tokens, mask, self.coords.unsqueeze(0).expand(b, -1, -1))
