"""The contract every compressor meets, and the token container it returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisualTokens:
    """Visual tokens for the LLM, possibly a different count per sample.

    ``coords`` holds each token's (y, x) centre in [0, 1] image coordinates: routing strategies use it to
    pick spatially spread proxies whatever the compressor did to the grid.
    """

    embeds: torch.Tensor  # (B, N, D) in the LLM width
    mask: torch.Tensor  # (B, N) bool, True for real tokens
    coords: torch.Tensor  # (B, N, 2)

    @property
    def counts(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


class Compressor(nn.Module):
    """Maps vision features (B, C, h, w) (and the images, for region-based methods) to visual tokens.

    Context arguments: ``in_dim`` (vision channels), ``out_dim`` (LLM width), ``grid_size`` (h, w).
    """

    def forward(self, features: torch.Tensor, images: torch.Tensor) -> VisualTokens:  # pragma: no cover
        raise NotImplementedError

