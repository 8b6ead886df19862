"""Average pooling + MLP projector: the simplest fixed-ratio compressor (LLaVA-style grid pooling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segrouter.compressors.base import Compressor, ImageContext, VisualTokens
from segrouter.compressors.mlp import MLPProjector
from segrouter.errors import ParamError
from segrouter.registry import register


@register("compressor", "avgpool")
class AvgPoolProjector(Compressor):
    """k×k average pooling of the patch grid, then LLaVA's MLP projector: (h/k)·(w/k) tokens, each at
    its pooled cell's centre. Pooling before projecting keeps the projector k² times cheaper."""

    def __init__(self, in_dim: int, out_dim: int, grid_size: tuple[int, int], /, *, k: int = 2, depth: int = 2) -> None:
        super().__init__()
        h, w = grid_size
        if k < 1 or h % k or w % k:
            sizes = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
            raise ParamError(
                f"pool size k={k} does not divide the {h}×{w} patch grid",
                param="k",
                fix=f"use one of {sizes}",
            )
        self.k = k
        self.project = MLPProjector(in_dim, out_dim, (h // k, w // k), depth=depth)

    def forward(self, features: torch.Tensor, images: torch.Tensor,
                context: ImageContext | None = None) -> VisualTokens:
        return self.project(F.avg_pool2d(features, self.k), images)
