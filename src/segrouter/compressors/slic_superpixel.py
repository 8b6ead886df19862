"""SSP pooling over plain SLIC clusters: the superpixel projector without semantic regions, as a baseline.

It isolates what *semantic* regions (SAM's masks, or the colour-merged SLIC stand-in) add over a regular
colour-and-position over-segmentation; everything else — mask-average pooling, SSPE, SSA — is the
``sam_superpixel`` projector's, so this is a variant of it (:func:`~segrouter.compressors.base.variant`), not a copy.
"""

from __future__ import annotations

from segrouter.compressors.base import variant
from segrouter.compressors.sam_superpixel import SAMSuperpixelProjector
from segrouter.registry import register


@register("compressor", "slic_superpixel")
class SLICSuperpixelProjector(SAMSuperpixelProjector):
    """``sam_superpixel`` with ``generator: slic`` and no colour merging fixed, exposing only the parameters
    plain SLIC uses (24 segments by default)."""

    __init__ = variant(SAMSuperpixelProjector, fixed={"generator": "slic", "colour_threshold": 0.0},
                       hidden=("sam_path", "points_per_side", "pred_iou_thresh", "stability_thresh",
                               "reuse_mask_encoder"),
                       defaults={"n_segments": 24})
