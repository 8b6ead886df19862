"""Compressors / visual projectors (registry kind ``compressor``): feature map → LLM visual tokens."""

from segrouter.compressors import mlp, sam_superpixel, slic_superpixel  # noqa: F401  (registers built-ins)

# isort: split
from segrouter.compressors import avgpool, resampler, tome  # noqa: F401  (efficiency baselines)
from segrouter.compressors.base import Compressor, ImageContext, VisualTokens

__all__ = ["Compressor", "ImageContext", "VisualTokens"]
