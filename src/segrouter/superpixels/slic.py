"""SLIC superpixels (scikit-image): a cheap, weight-free stand-in for SAM's automatic masks.

SLIC clusters pixels in (Lab colour, position) space; it needs no model, runs in milliseconds on CPU and is
deterministic, so the projector can be trained and tested without SAM weights. Its clusters are a regular
over-segmentation; merging adjacent clusters of similar mean colour (``colour_threshold``) then gives
object-like regions on scenes where objects differ in colour. Objects of one colour that touch stay merged,
and a multi-coloured object stays split, so this is a stand-in for SAM's semantic masks, not the paper's
method.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.segmentation import slic

from segrouter.errors import SegrouterError
from segrouter.superpixels.regions import merge_regions, merge_similar_colours


class SLICGenerator:
    """``n_segments`` SLIC clusters (``compactness`` trades colour adherence for square shapes), merged
    while adjacent mean colours are closer than ``colour_threshold`` (ΔE in CIELAB; 0 keeps the clusters),
    then the shared min-area / max-regions merging."""

    name = "slic"

    def __init__(
        self, *, n_segments: int, compactness: float, colour_threshold: float, min_area: int, max_regions: int
    ) -> None:
        self.n_segments, self.compactness, self.colour_threshold = n_segments, compactness, colour_threshold
        self.min_area, self.max_regions = min_area, max_regions

    def settings(self) -> dict[str, Any]:
        """Everything the output depends on besides the image (the cache key)."""
        return {
            "n_segments": self.n_segments,
            "compactness": self.compactness,
            "colour_threshold": self.colour_threshold,
            "min_area": self.min_area,
            "max_regions": self.max_regions,
        }

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (H, W) int64 partition."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SegrouterError(f"SLIC needs an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
        labels = slic(image, n_segments=self.n_segments, compactness=self.compactness, start_label=0, channel_axis=-1)
        if self.colour_threshold > 0:
            labels = merge_similar_colours(labels, image, self.colour_threshold)
        return merge_regions(labels, self.min_area, self.max_regions)
