"""RefCOCO / RefCOCO+ / RefCOCOg in the standard ``refer`` layout; COCO's polygon and RLE masks are decoded by
pycocotools, as the field's evaluation code does.

Layout (as distributed with LISA and the ``refer`` toolkit)::

    root/<dataset>/refs(<split_by>).p   pickle: list of refs {ref_id, ann_id, image_id, split, sentences[{sent}]}
    root/<dataset>/instances.json       COCO: images {id, file_name, height, width},
                                        annotations {id, segmentation: polygons or RLE[, category_id]},
                                        [categories {id, name}]  (the sample's "target", e.g. "person")
    image_dir/<file_name>               COCO train2014 images

One sample per (ref, sentence). ``refs(...).p`` is a pickle: loading it can run code, so it is read only
from the ``root`` the user put in the recipe, never from anywhere else.

Resizing follows LISA (:func:`segrouter.images.letterbox`): the longest side is scaled to ``image_size`` and
the image is zero-padded at the bottom/right to a square (LISA pads after normalising, so its padding is the
mean colour; ours is black in [0, 1]). The mask goes through the same scale (nearest) and padding, so it
stays aligned pixel for pixel. Skipping unreadable images is :class:`~segrouter.datasets.base.ReferringImageDataset`'s.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segrouter.datasets.base import ReferringImageDataset
from segrouter.errors import DataError
from segrouter.images import letterbox, open_image, polygons_to_mask
from segrouter.registry import register

log = logging.getLogger(__name__)

REFER_SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB", "test")


# ------------------------------------------------------------------------------------------ masks
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


# ---------------------------------------------------------------------------------------- RefCOCO
@register("dataset", "refcoco")
class RefCOCODataset(ReferringImageDataset):
    """RefCOCO/+/g from the ``refer`` layout. The data module asks for ``train``/``val``/``test``;
    ``val_split`` and ``test_split`` say which refer split those mean, so e.g.
    ``data.dataset.test_split=testA`` evaluates on testA (RefCOCO/+ have val/testA/testB, RefCOCOg-umd
    val/test). Samples whose image file is missing are dropped at construction (one summary warning,
    counted in ``missing``); corrupt images are skipped at load time (see :class:`ReferringImageDataset`)."""

    name = "refcoco"

    def __init__(
        self,
        split: str,
        /,
        *,
        root: str,
        image_dir: str,
        dataset: Literal["refcoco", "refcoco+", "refcocog"] = "refcoco",
        split_by: str = "unc",
        image_size: int = 1024,
        max_samples: int | None = None,
        val_split: str = "val",
        test_split: str = "test",
    ) -> None:
        super().__init__(split, image_size, max_samples)
        refer_split = {"train": "train", "val": val_split, "test": test_split}.get(split, split)
        if refer_split not in REFER_SPLITS:
            raise DataError(f"refcoco: unknown split '{refer_split}'", fix=f"valid splits: {', '.join(REFER_SPLITS)}")
        base = Path(root) / dataset
        refs_path = base / f"refs({split_by}).p"
        inst_path = base / "instances.json"
        for p in (refs_path, inst_path):
            if not p.is_file():
                raise DataError(f"refcoco: file not found: {p}",
                                fix="set data.dataset.root to the folder holding <dataset>/")
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(f"refcoco: image folder not found: {self.image_dir}",
                            fix="set data.dataset.image_dir (COCO train2014)")
        try:
            with open(refs_path, "rb") as f:
                refs = pickle.load(f)  # the user's own data file (see module docstring)
            with open(inst_path) as f:
                instances = json.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"refcoco: cannot read {refs_path.parent}: {type(exc).__name__}: {exc}",
                            fix="re-download the annotations") from None
        self.images = {int(im["id"]): im for im in instances["images"]}
        self.anns = {int(a["id"]): a for a in instances["annotations"]}
        self.categories = {int(c["id"]): str(c["name"]) for c in instances.get("categories", [])}
        self.refer_split = refer_split
        items: list[tuple[int, int, int, str]] = []  # (image_id, ann_id, ref_id, sentence) per sample
        found = {str(r.get("split")) for r in refs}
        for ref in refs:
            if ref["split"] != refer_split:
                continue
            for sent in ref["sentences"]:
                items.append((int(ref["image_id"]), int(ref["ann_id"]), int(ref["ref_id"]), str(sent["sent"])))
        if not items:
            raise DataError(
                f"refcoco: no refs in split '{refer_split}' of {refs_path}",
                fix=f"splits in this file: {', '.join(sorted(found))}",
            )
        exists = {i: os.path.isfile(self.image_dir / self.images[i]["file_name"]) for i in {it[0] for it in items}}
        self.items = [it for it in items if exists[it[0]]]
        self.missing = len(items) - len(self.items)
        if self.missing:
            log.warning("refcoco %s: dropped %d samples whose image is missing (%d images) under %s",
                        refer_split, self.missing, sum(not e for e in exists.values()), self.image_dir)
        self._limit()

    def sample_id(self, index: int) -> str:
        return f"{self.refer_split}-ref{self.items[index][2]}-{index}"

    def load(self, index: int) -> dict[str, Any]:
        image_id, ann_id, ref_id, sent = self.items[index]
        info = self.images[image_id]
        image = open_image(self.image_dir / info["file_name"])
        mask = segmentation_to_mask(self.anns[ann_id]["segmentation"], int(info["height"]), int(info["width"]))
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask {mask.shape} does not match image {image.height}×{image.width}")
        img, m = letterbox(image, mask, self.image_size)
        sample = {"image": img, "mask": m, "text": sent, "id": self.sample_id(index)}
        category = self.categories.get(int(self.anns[ann_id].get("category_id", -1)))
        if category is not None:  # names the target in answers with {target} (training only)
            sample["target"] = category
        return sample
