"""gRefCOCO (GRES, CVPR 2023): generalized referring expressions, which may name no object or several.

Layout (ReLA's, the dataset's reference code)::

    root/grefcoco/grefs(unc).json   refs {ref_id, image_id, ann_id: [ids] ([-1]: no target), split,
                                    sentences[{sent, raw}], no_target}  (a pickle ``grefs(unc).p`` is read
                                    instead when it is there, as ReLA's loader does)
    root/grefcoco/instances.json    COCO: images {id, file_name, height, width}, annotations, categories
    image_dir/<file_name>           COCO train2014 images (the file name comes from instances.json: some refs
                                    carry a suffixed one)

One sample per (ref, sentence); refs without sentences are skipped. The mask is the union of the ref's objects
(empty for a no-target ref). Splits: train, val, testA, testB.

**No-target samples** (``no_target`` in the batch): the training answer names the target's categories, or
``nothing``, and the mask loss trains an empty mask for them. At evaluation a sample counts as predicted
"no target" when its predicted mask is empty: N-acc is the share of no-target samples predicted empty, T-acc the
share of the others predicted non-empty (``val/n_acc``, ``val/t_acc``). gIoU and cIoU then follow ReLA's
evaluator exactly: a no-target sample predicted empty scores IoU 1 and adds nothing to the cumulative I and U;
predicted non-empty it scores 0 and adds its predicted area to U. ReLA decides "no target" with a separate
classifier and GSVA with a ``[REJ]`` token instead of an empty mask: N-acc here measures the mask itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segrouter.datasets.base import COCOReferDataset, read_refer
from segrouter.errors import DataError
from segrouter.images import segmentation_to_mask
from segrouter.registry import register

GREFCOCO_SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB")
NO_TARGET = "nothing"  # the answer's {target} for a no-target sample


@register("dataset", "grefcoco")
class GRefCOCODataset(COCOReferDataset):
    """gRefCOCO from ReLA's layout; ``val_split`` / ``test_split`` say which gRefCOCO split the data module's
    ``val`` / ``test`` mean. Missing images are dropped at construction, corrupt ones skipped at load time (as
    in :class:`~segrouter.datasets.refcoco.RefCOCODataset`)."""

    name = "grefcoco"

    def __init__(
        self,
        split: str,
        /,
        *,
        root: str,
        image_dir: str,
        image_size: int = 1024,
        max_samples: int | None = None,
        val_split: str = "val",
        test_split: str = "testA",
    ) -> None:
        super().__init__(split, image_size, max_samples)
        self.refer_split = self.source_split(val_split, test_split, GREFCOCO_SPLITS)
        base = Path(root) / "grefcoco"
        pickled = base / "grefs(unc).p"
        annotations = read_refer(pickled if pickled.is_file() else base / "grefs(unc).json",
                                 base / "instances.json", "grefcoco")
        self.image_dir = self._image_folder(image_dir)
        self.images, self.anns, self.categories = annotations.images, annotations.anns, annotations.categories
        items: list[tuple[int, tuple[int, ...], int, str]] = []  # (image_id, ann_ids, ref_id, sentence)
        for ref in annotations.refs:
            if ref.get("split") != self.refer_split:
                continue
            ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
            anns = () if bool(ref.get("no_target")) or ids == [-1] else tuple(int(i) for i in ids)
            unknown = [i for i in anns if i not in self.anns]
            if unknown or int(ref["image_id"]) not in self.images:
                raise DataError(f"grefcoco: ref {ref.get('ref_id')} names an image or object that instances.json "
                                f"does not have (annotation {unknown[0] if unknown else '-'})",
                                fix="use the grefs and instances.json of the same release")
            items += [(int(ref["image_id"]), anns, int(ref["ref_id"]), str(s["sent"])) for s in ref["sentences"]]
        if not items:
            found = sorted({str(r.get("split")) for r in annotations.refs})
            raise DataError(f"grefcoco: no refs in split '{self.refer_split}'",
                            fix=f"splits in this file: {', '.join(found)}")
        self._keep_images(items)

    def load(self, index: int) -> dict[str, Any]:
        image_id, anns, _, sent = self.items[index]
        image, h, w = self.read_image(image_id)
        mask = np.zeros((h, w), dtype=bool)
        for a in anns:
            mask |= segmentation_to_mask(self.anns[a]["segmentation"], h, w)
        names = [n for n in dict.fromkeys(self.categories.get(int(self.anns[a].get("category_id", -1))) for a in anns)
                 if n is not None]
        extra: dict[str, Any] = {"no_target": not anns}
        if names or not anns:  # names the targets in answers with {target} (training only)
            extra["target"] = " and ".join(names) if anns else NO_TARGET
        return self.sample(index, image, mask, sent, **extra)
