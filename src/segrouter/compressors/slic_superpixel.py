"""SSP pooling over plain SLIC clusters: the superpixel projector without semantic regions, as a baseline.

It isolates what *semantic* regions (SAM's masks, or the colour-merged SLIC stand-in) add over a regular
colour-and-position over-segmentation; everything else — mask-average pooling, SSPE, SSA — is the
``sam_superpixel`` projector's.
"""

from __future__ import annotations

from segrouter.compressors.sam_superpixel import SAMSuperpixelProjector
from segrouter.registry import register


@register("compressor", "slic_superpixel")
class SLICSuperpixelProjector(SAMSuperpixelProjector):
    """``sam_superpixel`` with ``generator: slic`` and no colour merging fixed, exposing only the parameters
    plain SLIC uses."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid_size: tuple[int, int],
        /,
        *,
        n_segments: int = 24,
        compactness: float = 20.0,
        min_area: int = 16,
        max_regions: int = 64,
        cache_dir: str | None = None,
        positional_embedding: bool = True,
        aggregator: bool = True,
        aggregator_heads: int = 4,
        context_tokens: int = 4,
        depth: int = 2,
    ) -> None:
        super().__init__(
            in_dim, out_dim, grid_size, generator="slic", n_segments=n_segments, compactness=compactness,
            colour_threshold=0.0, min_area=min_area, max_regions=max_regions, cache_dir=cache_dir,
            positional_embedding=positional_embedding, aggregator=aggregator, aggregator_heads=aggregator_heads,
            context_tokens=context_tokens, depth=depth,
        )
