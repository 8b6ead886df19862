"""A Hugging Face CLIP vision tower (transformers ``CLIPVisionModel``), read the way LLaVA and LISA read it.

LISA's LLM sees CLIP ViT-L/14-336 patch features from the second-to-last layer, CLS token dropped (LLaVA's
``mm_vision_select_layer: -2``, ``mm_vision_select_feature: patch``). This encoder loads that tower from a
local HF directory in its own key names (``openai/clip-vit-large-patch14-336``, or the vision tower kept in a
LISA checkpoint, see ``segrouter import lisa``), so no conversion to timm names is needed; without ``path`` a
randomly initialised tower of the given size is built (tests, CPU runs). Frozen by default, as in LISA.

``preprocess: center_crop`` (default) gives the tower what CLIP's own processor gives it, and LISA's: the
original image's shortest side at the tower's size, centre-cropped (datasets of real images provide it as
``vision_image``); ``letterbox`` gives it the model's letterboxed input instead (the whole image, padded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from segrouter.errors import ParamError, check_min
from segrouter.registry import register
from segrouter.vision_encoders.base import VisionEncoder

_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation
_STD = (0.26862954, 0.26130258, 0.27577711)


@register("vision_encoder", "hf_clip")
class HFCLIP(VisionEncoder):
    """Patch features of layer ``select_layer`` (negative: from the end, LLaVA's -2) as a map (B, D, h, w)."""

    def __init__(
        self,
        image_size: int,
        /,
        *,
        path: str | None = None,
        patch_size: int = 14,
        hidden_size: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        intermediate_size: int = 4096,
        select_layer: int = -2,
        preprocess: Literal["center_crop", "letterbox"] = "center_crop",
        freeze: bool = True,
    ) -> None:
        super().__init__()
        self.check_params(path=path, patch_size=patch_size, hidden_size=hidden_size, depth=depth,
                          num_heads=num_heads, intermediate_size=intermediate_size)
        if not path and image_size % patch_size:
            raise ParamError(f"image size {image_size} is not a multiple of patch_size {patch_size}",
                             param="patch_size", fix="choose a patch size that divides the image size")
        if path:
            if not Path(path).is_dir():
                raise ParamError(f"CLIP directory not found: {path}", param="path")
            self.clip = CLIPVisionModel.from_pretrained(path, local_files_only=True)
        else:
            self.clip = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=hidden_size, num_hidden_layers=depth, num_attention_heads=num_heads,
                intermediate_size=intermediate_size, image_size=image_size, patch_size=patch_size,
            ))
        config = self.clip.config
        if int(config.image_size) != image_size:
            raise ParamError(f"the CLIP tower takes {config.image_size}-px images, the model {image_size}",
                             param="path", fix=f"set model.image_size: {config.image_size}")
        layers = int(config.num_hidden_layers)
        if not -layers <= select_layer <= layers:
            raise ParamError(f"select_layer {select_layer} is not a layer of a {layers}-layer tower",
                             param="select_layer", fix="use -2 (LLaVA's) or a layer index")
        self.select_layer = select_layer
        self.center_crop = preprocess == "center_crop"
        self.out_dim = int(config.hidden_size)
        side = image_size // int(config.patch_size)
        self.grid_size = (side, side)
        self.set_normalisation(_MEAN, _STD)
        if freeze:
            self.clip.requires_grad_(False)

    @staticmethod
    def check_params(**p: Any) -> None:
        """Sizes of a randomly initialised tower, checked when a recipe is validated (and here)."""
        if p["path"]:
            return
        check_min(patch_size=p["patch_size"], hidden_size=p["hidden_size"], depth=p["depth"],
                  num_heads=p["num_heads"], intermediate_size=p["intermediate_size"])
        if p["hidden_size"] % p["num_heads"]:
            raise ParamError(f"hidden_size {p['hidden_size']} is not divisible by num_heads {p['num_heads']}",
                             param="num_heads", fix="pick num_heads dividing hidden_size")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.clip(pixel_values=self.normalise(images), output_hidden_states=True)
        # hidden_states[0] is the embedding output, so index -2 is the second-to-last layer's output, as LLaVA's
        x = out.hidden_states[self.select_layer][:, 1:]
        h, w = self.grid_size
        return x.transpose(1, 2).reshape(x.shape[0], self.out_dim, h, w)
