"""A timm Vision Transformer as the vision encoder (random init, or local weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer

from segrouter.errors import ParamError, SegrouterError, check_min
from segrouter.registry import register
from segrouter.vision_encoders.base import VisionEncoder

_IN_CHECKPOINT = "vision.vit."  # where a segrouter checkpoint keeps this encoder's timm weights
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@register("vision_encoder", "timm_vit")
class TimmViT(VisionEncoder):
    """ViT patch features as a map. ``model_name`` picks a timm architecture (e.g. ``vit_base_patch16_224``);
    without it a small ViT is built from ``patch_size/embed_dim/depth/num_heads``. ``weights`` loads a local
    safetensors / torch state dict (nothing is downloaded), or the vision encoder of a segrouter checkpoint
    (a vision-pretraining run); ``freeze`` keeps it fixed, as LISA does with CLIP.
    ``pos_embed: sincos`` replaces the learned position embedding of a small ViT by a fixed 2D sin-cos table
    (as in MAE): a model trained from scratch then knows each patch's row and column from the first step.
    """

    def __init__(
        self,
        image_size: int,
        /,
        *,
        model_name: str | None = None,
        patch_size: int = 8,
        embed_dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        weights: str | None = None,
        freeze: bool = False,
        pos_embed: Literal["learned", "sincos"] = "learned",
    ) -> None:
        super().__init__()
        self.check_params(model_name=model_name, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                          num_heads=num_heads)
        if image_size % patch_size:
            raise ParamError(
                f"image size {image_size} is not a multiple of patch_size {patch_size}",
                param="patch_size",
                fix="choose a patch size that divides the image size",
            )
        if model_name:
            self.vit = timm.create_model(model_name, pretrained=False, img_size=image_size, num_classes=0,
                                         global_pool="")
        else:
            self.vit = VisionTransformer(
                img_size=image_size,
                patch_size=patch_size,
                embed_dim=embed_dim,
                depth=depth,
                num_heads=num_heads,
                num_classes=0,
                global_pool="",
                class_token=False,
                dynamic_img_size=False,
            )
        if pos_embed == "sincos":
            if model_name:
                raise SegrouterError("pos_embed: sincos is for the small ViT built from patch_size/embed_dim/...",
                                     fix="drop model_name, or keep pos_embed: learned")
            grid = list(self.vit.patch_embed.grid_size)
            table = build_sincos2d_pos_embed(grid, self.vit.embed_dim).unsqueeze(0)
            self.vit.pos_embed = torch.nn.Parameter(table, requires_grad=False)
        if weights:
            self._load(Path(weights))
        self.out_dim = int(self.vit.embed_dim)
        self.grid_size = tuple(self.vit.patch_embed.grid_size)  # type: ignore[assignment]
        self.num_prefix = int(self.vit.num_prefix_tokens)
        self.set_normalisation(_MEAN, _STD)
        if freeze:
            self.vit.requires_grad_(False)

    def _load(self, path: Path) -> None:
        from segrouter.checkpoints import load_state_dict

        state = load_state_dict(path)
        ours = {k.removeprefix(_IN_CHECKPOINT): v for k, v in state.items() if k.startswith(_IN_CHECKPOINT)}
        state = ours or state  # a segrouter checkpoint: its vision encoder's weights
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("head")]
        if missing:
            raise ParamError(
                f"vision weights {path} do not fit the ViT: {len(missing)} missing keys (e.g. {missing[0]})",
                param="weights",
                fix="check model_name / patch_size / embed_dim against the checkpoint",
            )

    @staticmethod
    def check_params(**p: Any) -> None:
        """The small ViT's shape, checked when a recipe is validated (and here at construction)."""
        if p["model_name"]:
            return  # the timm architecture fixes the shape
        check_min(patch_size=p["patch_size"], embed_dim=p["embed_dim"], depth=p["depth"],
                  num_heads=p["num_heads"])
        if p["embed_dim"] % p["num_heads"]:
            raise ParamError(f"embed_dim {p['embed_dim']} is not divisible by num_heads {p['num_heads']}",
                             param="num_heads", fix="pick num_heads dividing embed_dim")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit.forward_features(self.normalise(images))
        x = x[:, self.num_prefix :]
        h, w = self.grid_size
        return x.transpose(1, 2).reshape(x.shape[0], self.out_dim, h, w)
