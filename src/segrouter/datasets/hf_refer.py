"""Referring segmentation from a local Hugging Face ``datasets`` folder (``DatasetDict.save_to_disk``).

Each row holds an image (``datasets.Image``, raw bytes, or a path), an expression, and the target as
either a mask (array or image, nonzero = object) or a COCO-style polygon (``[x0, y0, ...]`` or a list of
them). Column names are parameters, so most hub datasets work after a ``load_dataset(...).save_to_disk``.
Nothing is downloaded at run time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from segrouter.datasets.base import ReferringImageDataset
from segrouter.errors import DataError
from segrouter.images import open_image, polygons_to_mask
from segrouter.registry import register


@register("dataset", "hf_refer")
class HFReferDataset(ReferringImageDataset):
    """Reads split ``train``, ``val_split`` or ``test_split`` of ``datasets.load_from_disk(path)``.
    Set exactly one of ``mask_column`` / ``polygon_column``. Images are resized like :mod:`refcoco`
    (longest side + pad, :mod:`segrouter.images`); unreadable ones are skipped and counted."""

    name = "hf_refer"

    def __init__(
        self,
        split: str,
        /,
        *,
        path: str,
        image_size: int = 1024,
        max_samples: int | None = None,
        image_column: str = "image",
        text_column: str = "expression",
        mask_column: str | None = "mask",
        polygon_column: str | None = None,
        val_split: str = "validation",
        test_split: str = "test",
    ) -> None:
        import datasets

        super().__init__(split, image_size, max_samples)
        if (mask_column is None) == (polygon_column is None):
            raise DataError("hf_refer: set exactly one of mask_column and polygon_column",
                            fix="e.g. polygon_column: polygon, mask_column: null")
        try:
            dd = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise DataError(f"hf_refer: cannot load dataset folder {path}: {type(exc).__name__}",
                            fix="point data.dataset.path at a save_to_disk folder") from None
        name = self.source_split(val_split, test_split)  # checked against the folder's splits below
        if not isinstance(dd, datasets.DatasetDict) or name not in dd:
            have = list(dd) if isinstance(dd, datasets.DatasetDict) else ["(a single Dataset, no splits)"]
            raise DataError(f"hf_refer: split '{name}' not in {path}",
                            fix=f"available: {', '.join(have)}; set val_split/test_split")
        ds = dd[name]
        target = mask_column or polygon_column
        missing = [c for c in (image_column, text_column, target) if c not in ds.column_names]
        if missing:
            raise DataError(f"hf_refer: columns {missing} not in {path}",
                            fix=f"columns are: {', '.join(ds.column_names)}")
        if image_column in ds.features and isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # decode ourselves: bad files are skipped
        self.data = ds
        self.columns = (image_column, text_column, mask_column, polygon_column)
        self.hf_split = name
        self.items = list(range(len(ds)))
        self._limit()

    def sample_id(self, index: int) -> str:
        return f"{self.hf_split}-{index:06d}"

    def load(self, index: int) -> dict[str, Any]:
        image_col, text_col, mask_col, poly_col = self.columns
        row = self.data[self.items[index]]
        image = open_image(row[image_col])
        if mask_col is not None:
            raw = row[mask_col]
            mask = np.asarray(open_image(raw).convert("L") if isinstance(raw, (dict, bytes, Image.Image)) else raw) > 0
        else:
            poly = row[poly_col]
            polygons = poly if poly and isinstance(poly[0], (list, tuple)) else [poly]
            mask = polygons_to_mask(polygons, image.height, image.width)
        return self.sample(index, image, mask, str(row[text_col]))
