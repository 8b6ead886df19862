"""SAM's image encoder (transformers ``SamVisionEncoder``) as the mask decoder's own vision path, as in LISA.

LISA feeds its SAM mask decoder with a frozen SAM ViT-H run on the image at 1024 px, while the LLM reads CLIP
tokens at 336 px. As ``model.mask_encoder`` this encoder plays that part: its 256-channel embedding goes to the
``sam`` mask decoder without a neck (``neck: false``). SAM's preprocessing is kept: the image's longest side at
``input_size`` (1024), padded bottom/right, normalised with SAM's pixel mean and std, and the padding then
zero (SAM pads after normalising). Datasets of real images give the encoder its own letterbox of the original
image at ``input_size`` (``mask_image`` in the batch, see :class:`~segrouter.datasets.base.ReferringImageDataset`);
for images that only exist at the model's size (the synthetic data) it resizes the model's input.

``path`` loads the vision encoder of a local HF ``SamModel`` directory (e.g. sam-vit-huge); without it a
randomly initialised encoder of the given size is built (tests, CPU runs). Frozen by default, as in LISA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import SamModel, SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionEncoder

from segrouter.errors import ParamError, check_min
from segrouter.registry import register
from segrouter.vision_encoders.base import VisionEncoder

# SAM's pixel mean and std (ImageNet's: 123.675, 116.28, 103.53 and 58.395, 57.12, 57.375 on 0..255), for
# images in [0, 1]; the superpixel generator's SAM pass normalises with them too
SAM_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM_PIXEL_STD = (0.229, 0.224, 0.225)


@register("vision_encoder", "sam_vit")
class SamViT(VisionEncoder):
    """SAM's ViT with its neck: images (B, 3, S, S) in [0, 1] → embedding (B, output_channels, S/16, S/16) at
    ``input_size``. ``global_attn_indexes`` (blocks with global attention, the others windowed) defaults to
    four evenly spaced blocks ending with the last, as in SAM's ViT-B/L/H."""

    def __init__(
        self,
        image_size: int,
        /,
        *,
        path: str | None = None,
        input_size: int = 1024,
        patch_size: int = 16,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        output_channels: int = 256,
        window_size: int = 14,
        global_attn_indexes: list[int] | None = None,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        self.check_params(path=path, input_size=input_size, patch_size=patch_size, hidden_size=hidden_size,
                          depth=depth, num_heads=num_heads, output_channels=output_channels,
                          window_size=window_size, global_attn_indexes=global_attn_indexes)
        if path:
            if not Path(path).is_dir():
                raise ParamError(f"SAM directory not found: {path}", param="path")
            self.encoder = SamModel.from_pretrained(path, local_files_only=True).vision_encoder
        else:
            self.encoder = SamVisionEncoder(SamVisionConfig(
                hidden_size=hidden_size, num_hidden_layers=depth, num_attention_heads=num_heads,
                image_size=input_size, patch_size=patch_size, output_channels=output_channels,
                window_size=window_size, global_attn_indexes=global_attn_indexes or default_global(depth),
            ))
        config = self.encoder.config
        self.input_size = int(config.image_size)
        self.out_dim = int(config.output_channels)
        side = self.input_size // int(config.patch_size)
        self.grid_size = (side, side)
        self.set_normalisation(SAM_PIXEL_MEAN, SAM_PIXEL_STD)
        if freeze:
            self.encoder.requires_grad_(False)

    @staticmethod
    def check_params(**p: Any) -> None:
        """Sizes of a randomly initialised encoder, checked when a recipe is validated (and here)."""
        if p["path"]:
            return  # the SAM directory's config fixes them
        check_min(input_size=p["input_size"], patch_size=p["patch_size"], hidden_size=p["hidden_size"],
                  depth=p["depth"], num_heads=p["num_heads"], output_channels=p["output_channels"],
                  window_size=p["window_size"])
        if p["input_size"] % p["patch_size"]:
            raise ParamError(f"input_size {p['input_size']} is not a multiple of patch_size {p['patch_size']}",
                             param="input_size", fix="choose an input size the patch size divides (SAM: 1024, 16)")
        if p["hidden_size"] % p["num_heads"]:
            raise ParamError(f"hidden_size {p['hidden_size']} is not divisible by num_heads {p['num_heads']}",
                             param="num_heads", fix="pick num_heads dividing hidden_size")
        wrong = [i for i in p["global_attn_indexes"] or [] if not 0 <= i < p["depth"]]
        if wrong:
            raise ParamError(f"global_attn_indexes {wrong} are not blocks of a {p['depth']}-block encoder",
                             param="global_attn_indexes", fix=f"use block indices 0..{p['depth'] - 1}")

    def forward(self, images: torch.Tensor, content_hw: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` letterboxed (black padding), resized to ``input_size`` if they are not at it; ``content_hw``
        (B, 2), the image's size inside the padding at ``input_size``, zeroes the padding after normalisation as
        SAM does (without it the padding is normalised like the image)."""
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        x = self.normalise(images)
        if content_hw is not None:  # SAM pads with zeros after normalising
            rows = torch.arange(self.input_size, device=x.device)
            inside = (rows[None, :, None] < content_hw[:, 0, None, None]) & \
                     (rows[None, None, :] < content_hw[:, 1, None, None])
            x = x * inside[:, None].to(x.dtype)
        return self.encoder(pixel_values=x).last_hidden_state


def default_global(depth: int) -> list[int]:
    """SAM's choice of global-attention blocks: the last of each quarter of the encoder (ViT-H: 7, 15, 23, 31)."""
    return sorted({max(0, (depth * (q + 1)) // 4 - 1) for q in range(4)})
