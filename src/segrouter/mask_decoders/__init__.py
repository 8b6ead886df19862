"""Mask decoders (registry kind ``mask_decoder``): vision features + mask-token prompts → mask logits."""

from segrouter.mask_decoders import conv, sam  # noqa: F401  (registers built-ins)
from segrouter.mask_decoders.base import MaskDecoder

__all__ = ["MaskDecoder"]
