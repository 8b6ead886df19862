"""Vision encoders (registry kind ``vision_encoder``): image → patch feature map (B, C, h, w)."""

from segrouter.vision_encoders import conv_stem, hf_clip, sam_vit, timm_vit  # noqa: F401  (registers built-ins)
from segrouter.vision_encoders.base import VisionEncoder

__all__ = ["VisionEncoder"]
