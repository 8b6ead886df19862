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

import logging
from pathlib import Path
from typing import Any, Literal

from segrouter.datasets.base import COCOReferDataset, read_refer
from segrouter.errors import DataError
from segrouter.images import segmentation_to_mask
from segrouter.registry import register

log = logging.getLogger(__name__)

REFER_SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB", "test")


# ---------------------------------------------------------------------------------------- RefCOCO
@register("dataset", "refcoco")
class RefCOCODataset(COCOReferDataset):
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
        refer_split = self.source_split(val_split, test_split, REFER_SPLITS)
        base = Path(root) / dataset
        refs_path = base / f"refs({split_by}).p"
        annotations = read_refer(refs_path, base / "instances.json", "refcoco")
        self.image_dir = self._image_folder(image_dir)
        refs = annotations.refs
        self.images, self.anns, self.categories = annotations.images, annotations.anns, annotations.categories
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
        self._keep_images(items)

    def load(self, index: int) -> dict[str, Any]:
        image_id, ann_id, _, sent = self.items[index]
        image, h, w = self.read_image(image_id)
        mask = segmentation_to_mask(self.anns[ann_id]["segmentation"], h, w)
        category = self.categories.get(int(self.anns[ann_id].get("category_id", -1)))
        # the category names the target in answers with {target} (training only)
        return self.sample(index, image, mask, sent, **({"target": category} if category is not None else {}))
