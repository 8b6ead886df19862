"""A small CNN with a bounded receptive field: local features that cannot encode where an object is.

Used as the mask decoder's own vision path (``model.mask_encoder``) on the vision-dependent benchmark.
A decoder that reads a ViT's features can answer "the leftmost shape" by itself, because global attention
and position embeddings let every patch know whether it belongs to the leftmost object; then a model whose
LLM ignores its visual tokens still scores well, and no control can tell. These features are
translation-equivariant (no position embedding; ``replicate`` padding, so image borders look like more
image), and each one sees only ``receptive_field`` pixels: they say what is at a pixel (colour, local
shape), never how it relates to the rest of the scene. Which object to segment must then come from the
prompt, that is, from the LLM.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from segrouter.errors import RecipeError
from segrouter.registry import register
from segrouter.vision_encoders.base import VisionEncoder


class _PixelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@register("vision_encoder", "conv_stem")
class ConvStem(VisionEncoder):
    """``depth`` 3×3 convolutions, each followed by a per-pixel LayerNorm over the channels and GELU; the first
    log2(``stride``) of them have stride 2, so the feature map is ``image_size / stride`` on a side. Images
    are taken in [0, 1] and centred. No operation pools over the image (a GroupNorm or BatchNorm would mix
    in statistics of the whole image), so each feature is a function of its receptive field alone.
    ``out_dim`` adds a 1×1 projection to that many channels (e.g. the width of the encoder a mask decoder
    was trained on before, so the decoder's weights fit)."""

    def __init__(
        self,
        image_size: int,
        /,
        *,
        channels: int = 32,
        depth: int = 3,
        stride: int = 4,
        padding_mode: Literal["replicate", "zeros"] = "replicate",
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.check_params(channels=channels, depth=depth, stride=stride, padding_mode=padding_mode, out_dim=out_dim)
        if image_size % stride:
            raise RecipeError(f"conv_stem: image size {image_size} is not a multiple of stride {stride}",
                              fix="choose a power of two dividing the image size")
        downs = stride.bit_length() - 1
        layers: list[nn.Module] = []
        in_ch = 3
        for i in range(depth):
            conv = nn.Conv2d(in_ch, channels, 3, stride=2 if i < downs else 1, padding=1, padding_mode=padding_mode)
            layers += [conv, _PixelNorm(channels), nn.GELU()]
            in_ch = channels
        if out_dim is not None:
            layers.append(nn.Conv2d(channels, out_dim, 1))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim or channels
        self.grid_size = (image_size // stride, image_size // stride)
        rf, jump = 1, 1
        for i in range(depth):
            rf, jump = rf + 2 * jump, jump * (2 if i < downs else 1)
        self.receptive_field = rf  # pixels of the image one feature sees

    @staticmethod
    def check_params(**p: Any) -> None:
        """Value ranges, checked when a recipe is validated (and again here at construction)."""
        channels, depth, stride, padding_mode = p["channels"], p["depth"], p["stride"], p["padding_mode"]
        if channels < 1 or depth < 1 or (p["out_dim"] is not None and p["out_dim"] < 1):
            raise RecipeError(f"conv_stem: channels, depth and out_dim must be >= 1, got {channels}, {depth} and "
                              f"{p['out_dim']}")
        if stride < 1 or stride & (stride - 1) or 2 ** depth < stride:
            raise RecipeError(f"conv_stem: stride must be a power of two reachable with depth={depth} stride-2 layers, "
                              f"got {stride}", fix="use 1, 2, 4, ... up to 2**depth")
        if padding_mode not in ("replicate", "zeros"):
            raise RecipeError(f"conv_stem: padding_mode must be replicate or zeros, got {padding_mode!r}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2.0 - 1.0)
