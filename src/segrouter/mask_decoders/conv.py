"""A light dynamic-filter decoder: the prompt becomes a per-pixel classifier over upsampled features."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from segrouter.errors import check_min
from segrouter.mask_decoders.base import MaskDecoder
from segrouter.registry import register


@register("mask_decoder", "conv")
class ConvDecoder(MaskDecoder):
    """Much cheaper than SAM's decoder, for quick CPU runs and ablations: features are lifted to
    ``embed_dim`` and upsampled ×``upscale`` by transposed convolutions, and the mean of the mask-token
    prompts (through a small MLP) is dotted with every pixel embedding, as in CondInst/Mask2Former heads."""

    def __init__(
        self,
        vision_dim: int,
        grid_size: tuple[int, int],
        /,
        *,
        embed_dim: int = 64,
        upscale: int = 4,
        conditioning: Literal["dot", "film"] = "dot",
    ) -> None:
        super().__init__()
        self.check_params(embed_dim=embed_dim, upscale=upscale, conditioning=conditioning)
        self.prompt_dim = embed_dim
        self.conditioning = conditioning
        layers: list[nn.Module] = [nn.Conv2d(vision_dim, embed_dim, 3, padding=1), nn.GELU()]
        s = 1
        while s < upscale:
            layers += [nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2), nn.GroupNorm(1, embed_dim), nn.GELU()]
            s *= 2
        self.pixels = nn.Sequential(*layers)
        out = 2 * embed_dim if conditioning == "film" else embed_dim
        self.prompt_mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, out))
        self.head = (nn.Sequential(nn.Conv2d(embed_dim, embed_dim, 3, padding=1), nn.GELU(), nn.Conv2d(embed_dim, 1, 1))
                     if conditioning == "film" else None)
        self.bias = nn.Parameter(torch.zeros(1))

    @staticmethod
    def check_params(**p: Any) -> None:
        """Sizes, checked when a recipe is validated (and here at construction)."""
        check_min(embed_dim=p["embed_dim"], upscale=p["upscale"])

    def forward(self, features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        pix = self.pixels(features)
        q = self.prompt_mlp(prompts.mean(dim=1))
        if self.head is not None:
            gamma, beta = q[..., None, None].chunk(2, dim=1)
            return self.head(torch.nn.functional.gelu(pix * (1 + gamma) + beta))[:, 0]
        return torch.einsum("bchw,bc->bhw", pix, q) / pix.shape[1] ** 0.5 + self.bias
