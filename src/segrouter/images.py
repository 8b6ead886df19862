"""Image input shared by the datasets and ``segrouter predict``: decoding (with the errors a broken file
raises), LISA's resize (longest side to the model size, zero padding bottom/right to a square) and its
inverse for predicted masks (crop the padding off, resize to the original image: how the field scores and how
``predict`` writes masks), and COCO polygon rasterisation (by pycocotools, the field's decoder). One home, so
a prediction sees an image exactly as training did, and no dataset imports another's file.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from segrouter.errors import DataError

BAD_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)  # what PIL raises on broken files


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Union of COCO polygons ``[x0, y0, x1, y1, ...]`` as a bool (H, W) mask, rasterised by pycocotools
    (``frPyObjects`` + ``merge`` + ``decode``), so masks are pixel for pixel those of the field's evaluation code.
    Polygons of fewer than three points are skipped. pycocotools is imported here, not at module import: only
    the datasets that read COCO annotations need it."""
    from pycocotools import mask as coco_mask

    polys = [[float(v) for v in poly] for poly in polygons if len(poly) >= 6]
    if not polys:
        return np.zeros((height, width), dtype=bool)
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polys, height, width))).astype(bool)


def letterbox_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to ``size`` (LISA's ``ResizeLongestSide``)."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def letterbox(image: Image.Image, mask: np.ndarray | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Longest side to ``size``, pad bottom/right to a square: image (3, S, S) in [0, 1], mask (S, S) {0, 1}."""
    h, w = letterbox_size(image.height, image.width, size)
    rgb = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    img = torch.zeros(3, size, size)
    img[:, :h, :w] = torch.from_numpy(rgb).permute(2, 0, 1)
    if mask is None:
        return img, None
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    out = torch.zeros(size, size)
    out[:h, :w] = torch.from_numpy(small.astype(np.float32))
    return img, out


def letterbox_input(image: Image.Image, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder's own input: ``image`` letterboxed at ``size`` (3, size, size) and its (h, w) inside the padding,
    as a tensor (a mask encoder that reads its own resolution, e.g. SAM's 1024)."""
    return letterbox(image, None, size)[0], torch.tensor(letterbox_size(image.height, image.width, size))


def center_crop(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP's preprocessing (transformers' ``CLIPImageProcessor``, which LISA and LLaVA-1.0 feed their CLIP): the
    shortest side resized to ``size`` (bicubic), then the centre ``size``×``size`` crop; (3, size, size) in [0, 1].
    The LLM then sees the middle of a wide or tall image, not its letterbox (see :func:`crop_box`)."""
    top, left, h, w = crop_box(image.height, image.width, size)
    rgb = image.convert("RGB").resize((w, h), Image.BICUBIC)
    crop = np.asarray(rgb, dtype=np.float32)[top : top + size, left : left + size] / 255.0
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)


def crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, resized height, resized width) of :func:`center_crop`: the image resized so that its shortest
    side is ``size`` (the long side truncated, as transformers does), and where the centre crop starts."""
    short, long = (height, width) if height <= width else (width, height)
    other = int(size * long / short)
    h, w = (size, other) if height <= width else (other, size)
    return (h - size) // 2, (w - size) // 2, h, w


def letterbox_to_crop(masks: torch.Tensor, content_hw: torch.Tensor) -> torch.Tensor:
    """Letterboxed masks (B, S, S) on the frame of :func:`center_crop` at the same size: each mask's content
    (``content_hw`` (B, 2)) resized as the crop resizes the image (nearest), then centre-cropped."""
    size = masks.shape[-1]
    out = []
    for mask, (h, w) in zip(masks, content_hw.tolist(), strict=True):
        top, left, rh, rw = crop_box(h, w, size)
        resized = F.interpolate(mask[None, None, :h, :w].float(), size=(rh, rw), mode="nearest")[0, 0]
        out.append(resized[top : top + size, left : left + size])
    return torch.stack(out).to(masks.dtype)


def unletterbox(logits: torch.Tensor, content_hw: tuple[int, int], original_hw: tuple[int, int]) -> torch.Tensor:
    """Mask logits (S, S) of a letterboxed image back on the original image's pixels (H, W): the padding cropped
    off (``content_hw``, from :func:`letterbox_size`), then a bilinear resize (LISA's ``postprocess_masks``)."""
    h, w = content_hw
    return F.interpolate(logits[None, None, :h, :w].float(), size=tuple(original_hw), mode="bilinear",
                         align_corners=False)[0, 0]


def open_image(source: Any) -> Image.Image:
    """A fully decoded PIL image from a path, bytes, an HF image dict or a PIL image (errors: ``BAD_IMAGE_ERRORS``)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    if source is None:
        raise ValueError("no image data")
    with Image.open(source) as im:
        im.load()  # decode now, so a truncated file fails here and not later
        return im.copy()


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE ``{size: [h, w], counts: list | str}`` (uncompressed or compressed) as a bool (H, W) mask,
    decoded by pycocotools. pycocotools does not check that the runs cover the image (a short string leaves
    pixels undefined), so uncompressed counts must sum to h·w, and a compressed string's decoded pixels must be
    0/1 and as many as its runs say (``area``)."""
    from pycocotools import mask as coco_mask

    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):
            if sum(counts) != h * w:
                raise DataError(f"RLE covers {sum(counts)} pixels, expected {h}×{w}={h * w}",
                                fix="check the annotation file")
            coded = coco_mask.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
        else:
            coded = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else bytes(counts)}
        mask = coco_mask.decode(coded)
        if mask.shape != (h, w) or mask.max(initial=0) > 1 or int(mask.sum()) != int(coco_mask.area(coded)):
            raise ValueError("its runs do not cover the image")
        return mask.astype(bool)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"unreadable RLE segmentation ({type(exc).__name__}: {exc})",
                        fix="check the annotation file") from None


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` field (polygon list, or RLE dict) as a bool mask."""
    if isinstance(seg, dict):
        return rle_to_mask(seg)
    return polygons_to_mask(seg, height, width)
