"""SLIC superpixels (scikit-image): a cheap, weight-free stand-in for SAM's automatic masks.

SLIC clusters pixels in (Lab colour, position) space; it needs no model, runs in milliseconds on CPU and is
deterministic, so the projector can be trained and tested without SAM weights. Its regions follow colour
edges rather than objects, so it is a stand-in for experiments on the projector, not the paper's method.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.segmentation import slic

from segrouter.errors import SegrouterError
from segrouter.superpixels.regions import merge_regions


class SLICGenerator:
    """``n_segments`` SLIC clusters (``compactness`` trades colour adherence for square shapes), then the
    shared min-area / max-regions merging."""

    name = "slic"

    def __init__(self, *, n_segments: int, compactness: float, min_area: int, max_regions: int) -> None:
        self.n_segments, self.compactness = n_segments, compactness
        self.min_area, self.max_regions = min_area, max_regions

    def settings(self) -> dict[str, Any]:
        """Everything the output depends on besides the image (the cache key)."""
        return {
            "n_segments": self.n_segments,
            "compactness": self.compactness,
            "min_area": self.min_area,
            "max_regions": self.max_regions,
        }

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (H, W) int64 partition."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SegrouterError(f"SLIC needs an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
        labels = slic(image, n_segments=self.n_segments, compactness=self.compactness, start_label=0, channel_axis=-1)
        return merge_regions(labels, self.min_area, self.max_regions)
