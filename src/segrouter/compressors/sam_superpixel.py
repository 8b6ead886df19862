"""SAM superpixel visual projector (arXiv 2509.13676, Yang & Gong, "Re-purposing SAM into Efficient
Visual Projectors for MLLM-Based RIS"): one visual token per semantic superpixel instead of one per patch.

Only the abstract of the paper could be read, so the layers below are our design (docs/methods/
sam_superpixel.md gives every choice and its reason):

* **visual words**: each region's soft occupancy of every patch cell (fraction of the cell's pixels in
  the region) is normalised per region and pools the vision feature map; this equals averaging the
  nearest-upsampled feature map over the region's pixels, so regions smaller than a patch still get the
  (weighted) features of the cells they touch;
* **SSA** (aggregator): one cross-attention from each word to all patch features, biased by
  ``log(occupancy + 1/(h·w))`` (inside cells dominate, the whole outside weighs at most one inside cell
  before learning), plus ``context_tokens`` tokens attention-pooled from the whole image by learned
  queries; residual with a zero-initialised output projection, so it starts as the identity;
* **projection**: ``depth`` Linear layers with GELU to the LLM width, as the ``mlp`` projector;
* **SSPE**: an MLP of each region's geometry (normalised bbox, centroid, area fraction, 4×4 occupancy of
  its bbox) added to its token.

Tokens are ordered by centroid raster order (patch row of the centroid, then x) and padded to the batch
maximum; ``coords`` are the centroids (y, x).

Only the image inside its letterbox padding is partitioned (``content_hw`` of the :class:`ImageContext`): the
padding is no region and makes no token, so a dark object touching it cannot merge with it. With
``reuse_mask_encoder`` (the paper's setting) SAM's masks come from the embedding the model's SAM mask encoder
(``sam_vit``, LISA's frozen SAM) computes for the mask decoder anyway, on that encoder's own input; only SAM's
prompt encoder and mask decoder run again, over the point grid, and the partition is mapped onto the LLM-side
image (resized into its letterbox, or resized and cropped as CLIP's centre crop is: ``ImageContext.center_crop``).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.ndimage import find_objects
from torch import nn

from segrouter.compressors.base import Compressor, ImageContext, VisualTokens, projection
from segrouter.errors import ParamError, SegrouterError
from segrouter.images import crop_box
from segrouter.registry import register
from segrouter.superpixels import PartitionCache, SAMAutomaticMaskGenerator, SLICGenerator, relabel

SHAPE_SIDE = 4  # the SSPE shape descriptor is the region's occupancy of a SHAPE_SIDE² grid over its bbox
GEOMETRY_DIM = 4 + 2 + 1 + SHAPE_SIDE * SHAPE_SIDE  # bbox, centroid, area fraction, shape


@dataclass(frozen=True)
class RegionStats:
    """Per-region statistics of a partition, in token order (centroid raster order)."""

    occupancy: np.ndarray  # (K, h*w) fraction of each patch cell's pixels inside the region
    geometry: np.ndarray  # (K, GEOMETRY_DIM) SSPE input, all in [0, 1]
    centroids: np.ndarray  # (K, 2) (y, x) in [0, 1]


def region_stats(labels: np.ndarray, grid_size: tuple[int, int]) -> RegionStats:
    """Occupancy, geometry and centroids of every region of ``labels`` (H, W) over an (h, w) patch grid.
    Label -1 marks pixels of no region (the letterbox padding): they make no token and count in no region.

    A pixel belongs to the cell ``(y·h // H, x·w // W)``, so image sizes that are not multiples of the
    grid are handled too (cells then differ by at most one pixel row/column).
    """
    height, width = labels.shape
    h, w = grid_size
    k = int(labels.max()) + 1
    cell = ((np.arange(height) * h) // height)[:, None] * w + ((np.arange(width) * w) // width)[None, :]
    cell_pixels = np.bincount(cell.ravel(), minlength=h * w)
    inside = labels >= 0
    region, cell = labels[inside], cell[inside]
    occupancy = np.bincount(region * (h * w) + cell, minlength=k * h * w).reshape(k, h * w) / cell_pixels

    area = np.bincount(region, minlength=k).astype(np.float64)
    ys = np.broadcast_to(((np.arange(height) + 0.5) / height)[:, None], labels.shape)[inside]
    xs = np.broadcast_to(((np.arange(width) + 0.5) / width)[None, :], labels.shape)[inside]
    centroids = np.stack([np.bincount(region, ys, k) / area, np.bincount(region, xs, k) / area], 1)
    geometry = np.zeros((k, GEOMETRY_DIM))
    for i, (sy, sx) in enumerate(find_objects(labels + 1)):
        bbox = [sy.start / height, sx.start / width, sy.stop / height, sx.stop / width]
        geometry[i] = [*bbox, *centroids[i], area[i] / labels.size, *_shape_descriptor(labels[sy, sx] == i)]
    order = np.lexsort((centroids[:, 0], centroids[:, 1], np.floor(centroids[:, 0] * h)))
    return RegionStats(occupancy[order], geometry[order], centroids[order])


def _shape_descriptor(crop: np.ndarray) -> np.ndarray:
    """Occupancy of a SHAPE_SIDE² grid over a region's bbox crop; crops thinner than the grid are first
    repeated so that every sub-cell holds at least one pixel."""
    crop = np.repeat(crop, math.ceil(SHAPE_SIDE / crop.shape[0]), 0)
    crop = np.repeat(crop, math.ceil(SHAPE_SIDE / crop.shape[1]), 1)
    ch, cw = crop.shape
    sub = ((np.arange(ch) * SHAPE_SIDE) // ch)[:, None] * SHAPE_SIDE + ((np.arange(cw) * SHAPE_SIDE) // cw)[None, :]
    n = SHAPE_SIDE * SHAPE_SIDE
    return np.bincount(sub.ravel(), crop.ravel().astype(np.float64), n) / np.bincount(sub.ravel(), minlength=n)


class SuperpixelAggregator(nn.Module):
    """SSA: each visual word attends to all patch features (biased to its own region) and to a few
    global context tokens; residual, starting as the identity (zero-initialised output projection)."""

    def __init__(self, dim: int, heads: int, context_tokens: int) -> None:
        super().__init__()
        self.heads, self.context_tokens = heads, context_tokens
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if context_tokens:
            self.context_queries = nn.Parameter(torch.randn(context_tokens, dim) * dim**-0.5)
            self.context_pool = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, words: torch.Tensor, patches: torch.Tensor, occupancy: torch.Tensor) -> torch.Tensor:
        """words (B, K, C), patches (B, n, C), occupancy (B, K, n) → words (B, K, C)."""
        b, k, _ = words.shape
        kv = self.norm_kv(patches)
        bias = torch.log(occupancy + 1.0 / patches.shape[1])
        if self.context_tokens:
            context, _ = self.context_pool(self.context_queries.expand(b, -1, -1), kv, kv, need_weights=False)
            kv = torch.cat([kv, context], 1)
            bias = torch.cat([bias, bias.new_zeros(b, k, self.context_tokens)], 2)
        out, _ = self.attn(
            self.norm_q(words), kv, kv, attn_mask=bias.repeat_interleave(self.heads, 0), need_weights=False
        )
        return words + out


_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "points_per_side": (lambda v: v >= 1, "must be at least 1"),
    "pred_iou_thresh": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "stability_thresh": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "n_segments": (lambda v: v >= 1, "must be at least 1"),
    "compactness": (lambda v: v > 0, "must be positive"),
    "colour_threshold": (lambda v: v >= 0, "must be non-negative (0 turns colour merging off)"),
    "min_area": (lambda v: v >= 0, "must be non-negative"),
    "max_regions": (lambda v: v >= 1, "must be at least 1"),
    "context_tokens": (lambda v: v >= 0, "must be non-negative"),
    "depth": (lambda v: v >= 1, "must be at least 1"),
}


SLIC_NOTE = ("generator: slic runs the SLIC fallback: superpixels from colour and position, not SAM's masks "
             "(set generator: sam and sam_path for the paper's)")


@register("compressor", "sam_superpixel")
class SAMSuperpixelProjector(Compressor):
    """One token per superpixel: SAM automatic masks (``generator: sam``) or SLIC (``generator: slic``,
    the weight-free CPU default) partition the image; each region's features are pooled (+ SSA), projected
    to the LLM width (+ SSPE). ``positional_embedding`` / ``aggregator`` false remove SSPE / SSA entirely.

    Generator settings: ``points_per_side``, ``pred_iou_thresh``, ``stability_thresh`` (SAM; thresholds
    of the first author's "ssa" presets in HAL-42/TUSS), ``n_segments``, ``compactness``,
    ``colour_threshold`` (SLIC), and for both ``min_area`` (pixels) / ``max_regions``. ``cache_dir``
    stores partitions on disk (null: memory), keyed by the image, the settings and (SAM) a hash of the weights.
    ``reuse_mask_encoder`` (``generator: sam``): SAM's masks come from the model's ``sam_vit`` mask encoder's
    embedding, with ``sam_path``'s prompt encoder and mask decoder (the SAM that encoder comes from).
    """

    note = SLIC_NOTE  # `segrouter list` prints it: no run named sam_superpixel uses SLIC unsaid

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid_size: tuple[int, int],
        /,
        *,
        generator: Literal["sam", "slic"] = "slic",
        sam_path: str | None = None,
        points_per_side: int = 16,
        pred_iou_thresh: float = 0.86,
        stability_thresh: float = 0.92,
        n_segments: int = 48,
        compactness: float = 20.0,
        colour_threshold: float = 20.0,
        min_area: int = 16,
        max_regions: int = 64,
        cache_dir: str | None = None,
        reuse_mask_encoder: bool = False,
        positional_embedding: bool = True,
        aggregator: bool = True,
        aggregator_heads: int = 4,
        context_tokens: int = 4,
        depth: int = 2,
    ) -> None:
        super().__init__()
        self.check_params(**{k: v for k, v in locals().items()
                             if k not in ("self", "in_dim", "out_dim", "grid_size", "__class__")})
        if aggregator:  # check_params has ensured aggregator_heads >= 1
            _check(
                in_dim % aggregator_heads == 0,
                "aggregator_heads",
                f"must divide the vision width {in_dim}, got {aggregator_heads}",
            )
        self.generator: SAMAutomaticMaskGenerator | SLICGenerator
        if generator == "sam":
            if sam_path is None:
                warnings.warn(
                    "sam_superpixel: no sam_path, using a random tiny SAM whose superpixels are meaningless "
                    "(fine for tests; set sam_path or use generator: slic for experiments)",
                    stacklevel=2,
                )
            self.generator = SAMAutomaticMaskGenerator(
                sam_path,
                points_per_side=points_per_side,
                pred_iou_thresh=pred_iou_thresh,
                stability_thresh=stability_thresh,
                min_area=min_area,
                max_regions=max_regions,
            )
        else:
            if "note" in vars(type(self)):  # sam_superpixel itself, not a variant fixed to SLIC by design
                print(f"segrouter: sam_superpixel: {SLIC_NOTE}", file=sys.stderr)
            self.generator = SLICGenerator(
                n_segments=n_segments, compactness=compactness, colour_threshold=colour_threshold,
                min_area=min_area, max_regions=max_regions,
            )
        self.cache = PartitionCache(cache_dir)
        self.reads_sam_embedding = reuse_mask_encoder
        self.grid_size = tuple(grid_size)
        self.aggregator = SuperpixelAggregator(in_dim, aggregator_heads, context_tokens) if aggregator else None
        self.proj = projection(in_dim, out_dim, depth)
        self.sspe = (
            nn.Sequential(nn.Linear(GEOMETRY_DIM, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
            if positional_embedding
            else None
        )

    @staticmethod
    def check_params(**p: Any) -> None:
        """Ranges checked at recipe validation (subclasses may expose a subset of the parameters); the head
        count is checked against the vision width at build."""
        for key, (ok, message) in _RANGES.items():
            if key in p:
                _check(ok(p[key]), key, f"{message}, got {p[key]}")
        if p.get("aggregator", False):
            _check(p["aggregator_heads"] >= 1, "aggregator_heads", f"must be at least 1, got {p['aggregator_heads']}")
        _check(p.get("generator") == "sam" or p.get("sam_path") is None, "sam_path", "is only used by generator: sam")
        _check(p.get("generator") == "sam" or not p.get("reuse_mask_encoder"), "reuse_mask_encoder",
               "is only used by generator: sam")

    def attach_mask_encoder(self, encoder: nn.Module | None) -> None:
        """``reuse_mask_encoder``: the model's mask encoder must be a SAM image encoder whose embedding this
        SAM's mask decoder reads (see :meth:`SAMAutomaticMaskGenerator.reuse_encoder`)."""
        if encoder is None:
            raise ParamError("reuse_mask_encoder needs the model's SAM mask encoder, and the model has none",
                             param="reuse_mask_encoder",
                             fix="set model.mask_encoder: {name: sam_vit, path: ...} (as LISA), "
                                 "or reuse_mask_encoder: false")
        assert isinstance(self.generator, SAMAutomaticMaskGenerator)  # check_params: reuse needs generator: sam
        self.generator.reuse_encoder(encoder)

    def partition(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (H, W) int64 superpixel labels, through the cache."""
        return self.cache.get(image, self.generator)

    def partitions(self, images: torch.Tensor, context: ImageContext | None) -> list[np.ndarray]:
        """(B, 3, S, S) images → one (S, S) partition each, label -1 on the letterbox padding: the generator
        runs on each image's content (``context.content_hw``), or on the mask encoder's input and embedding
        (``reuse_mask_encoder``), its partition then resized to the content's size here."""
        b, size = images.shape[0], tuple(images.shape[-2:])
        content = ([tuple(hw) for hw in context.content_hw.tolist()] if context is not None
                   and context.content_hw is not None else [size] * b)
        if not self.reads_sam_embedding:
            if isinstance(self.generator, SAMAutomaticMaskGenerator):
                self.generator.to(images.device)
            return [_place(self.partition(p[:h, :w]), (h, w), size) for p, (h, w) in zip(_uint8(images), content,
                                                                                          strict=True)]
        if context is None or context.sam_embedding is None or context.sam_image is None:
            raise SegrouterError("sam_superpixel with reuse_mask_encoder got no SAM embedding",
                                 fix="call it through the model (SegmentationMLLM passes its mask encoder's embedding)")
        generator = self.generator
        assert isinstance(generator, SAMAutomaticMaskGenerator)
        generator.to(context.sam_embedding.device)
        # without its own input (sam_image_hw), the mask encoder read the model's input, padding included: SAM then
        # partitions the whole input (the embedding's frame) and the content is cropped out of its partition
        sam_hw = ([tuple(hw) for hw in context.sam_image_hw.tolist()] if context.sam_image_hw is not None
                  else [tuple(context.sam_image.shape[-2:])] * b)
        out = []
        for i, (image, (sh, sw), (h, w)) in enumerate(zip(_uint8(context.sam_image), sam_hw, content, strict=True)):
            embedding = context.sam_embedding[i : i + 1]
            labels = self.cache.get(image[:sh, :sw], generator, lambda crop, e=embedding: generator(crop, e))
            if context.sam_image_hw is None:
                labels = labels[:h, :w]
            # the LLM-side image is a centre crop of the original (CLIP's preprocessing) or its letterbox
            out.append(_crop(labels, size[0]) if context.center_crop else _place(labels, (h, w), size))
        return out

    def forward(self, features: torch.Tensor, images: torch.Tensor,
                context: ImageContext | None = None) -> VisualTokens:
        if images.dim() != 4 or images.shape[1] != 3:
            raise SegrouterError(
                f"sam_superpixel needs RGB images (B, 3, H, W), got shape {tuple(images.shape)}",
                fix="convert grey or RGBA images to 3 channels in the dataset",
            )
        h, w = features.shape[-2:]
        if (h, w) != self.grid_size:
            raise SegrouterError(f"sam_superpixel expects a {self.grid_size} feature grid, got {(h, w)}")
        stats = [region_stats(labels, (h, w)) for labels in self.partitions(images, context)]
        occupancy, geometry, coords = (torch.from_numpy(a).to(features) for a in _pad(stats))
        mask = torch.from_numpy(np.stack([np.arange(occupancy.shape[1]) < len(s.centroids) for s in stats]))
        mask = mask.to(features.device)
        patches = features.flatten(2).transpose(1, 2)
        words = (occupancy / occupancy.sum(2, keepdim=True).clamp(min=1e-12)) @ patches
        if self.aggregator is not None:
            words = self.aggregator(words, patches, occupancy)
        tokens = self.proj(words)
        if self.sspe is not None:
            tokens = tokens + self.sspe(geometry)
        return VisualTokens(tokens * mask[..., None], mask, coords)


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] → (B, H, W, 3) uint8, what the generators and the cache read."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _resize(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A label map resized to ``hw`` (nearest, by pixel centres)."""
    rows = ((np.arange(hw[0]) + 0.5) * labels.shape[0] / hw[0]).astype(np.int64)
    cols = ((np.arange(hw[1]) + 0.5) * labels.shape[1] / hw[1]).astype(np.int64)
    return labels[rows[:, None], cols[None, :]]


def _place(labels: np.ndarray, content: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A partition of an image's content resized to ``content`` (h, w) and placed at the top left of a ``size``
    map whose padding is -1 (a letterbox); regions the resize loses are dropped (labels stay 0..K-1)."""
    h, w = content
    out = np.full(size, -1, dtype=np.int64)
    out[:h, :w] = relabel(_resize(labels, content))
    return out


def _crop(labels: np.ndarray, size: int) -> np.ndarray:
    """A partition of a whole image mapped onto its centre crop (:func:`~segrouter.images.center_crop`): resized as
    the image is, then cropped; regions outside the crop are dropped."""
    top, left, h, w = crop_box(*labels.shape, size)
    return relabel(_resize(labels, (h, w))[top : top + size, left : left + size])


def _pad(stats: list[RegionStats]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack per-image occupancy, geometry and centroids, zero-padded to the largest region count."""
    b, k = len(stats), max(len(s.centroids) for s in stats)
    occupancy = np.zeros((b, k, stats[0].occupancy.shape[1]))
    geometry = np.zeros((b, k, GEOMETRY_DIM))
    coords = np.zeros((b, k, 2))
    for i, s in enumerate(stats):
        n = len(s.centroids)
        occupancy[i, :n], geometry[i, :n], coords[i, :n] = s.occupancy, s.geometry, s.centroids
    return occupancy, geometry, coords


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ParamError(f"{param} {message}", param=param)
