"""ReasonSeg (LISA, CVPR 2024): segmentation from queries that need reasoning ("the food with most vitamin C").

Layout (LISA's release)::

    root/<split>/<name>.jpg     split: train (239 images), val (200), test (779)
    root/<split>/<name>.json    {"text": [query, ...], "is_sentence": bool,
                                 "shapes": [{"label": "target" | "ignore" | "flag" | ..., "points": [[x, y], ...]}]}

The mask follows LISA's ``get_mask_from_json``: the polygons are filled largest first (so a smaller one drawn
later wins where they overlap), a label containing "ignore" marks ignored pixels, "flag" shapes are skipped,
any other label is target. Ignored pixels are background for training (LISA trains on ``mask == 1``) and count
in neither intersection nor union at evaluation (LISA's ``intersectionAndUnionGPU`` with ignore index 255).
Polygons are rasterised by pycocotools, LISA's by OpenCV's ``fillPoly`` plus a one-pixel outline, so a mask
edge can differ by a pixel.

Samples: in ``train`` one per (image, query); in ``val`` and ``test`` one per image with its first query, as
LISA's ``ValDataset`` evaluates. ``queries`` keeps only ``short`` queries (``is_sentence: false``, phrases) or
``long`` ones (sentences) — the split behind the paper's short/long columns, which LISA's code does not ship.
A JSON file that cannot be read is one error naming it (a benchmark silently missing a sample is not the
benchmark); a missing or corrupt image is counted and skipped like every referring dataset's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segrouter.datasets.base import ReferringImageDataset
from segrouter.errors import DataError
from segrouter.images import open_image, polygons_to_mask
from segrouter.registry import register

REASONSEG_SPLITS: tuple[str, ...] = ("train", "val", "test")
QUERIES: dict[str, tuple[bool, ...]] = {"all": (False, True), "short": (False,), "long": (True,)}  # is_sentence


def read_annotation(path: Path) -> dict[str, Any]:
    """One ReasonSeg JSON (UTF-8, or Windows-1252 as some of LISA's files are, as LISA reads them)."""
    try:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = path.read_text(encoding="cp1252")
        ann = json.loads(text)
        queries = [str(q) for q in ann["text"]]
        shapes = [(str(s["label"]), [float(v) for xy in s["points"] for v in xy]) for s in ann.get("shapes", [])]
        if not queries:
            raise ValueError("no query in 'text'")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"reasonseg: cannot read {path}: {type(exc).__name__}: {exc}",
                        fix="re-download ReasonSeg (LISA's release) or remove the file with its image") from None
    return {"text": queries, "is_sentence": bool(ann.get("is_sentence", False)), "shapes": shapes}


def reasonseg_masks(shapes: list[tuple[str, list[float]]], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(target, ignore) bool masks (H, W) from ``(label, flat polygon)`` shapes, filled largest first."""
    filled = [(label, polygons_to_mask([points], height, width)) for label, points in shapes if "flag" not in label]
    value = np.zeros((height, width), dtype=np.uint8)  # 0 background, 1 target, 2 ignore
    for label, region in sorted(filled, key=lambda f: -int(f[1].sum())):
        value[region] = 2 if "ignore" in label else 1
    return value == 1, value == 2


@register("dataset", "reasonseg")
class ReasonSegDataset(ReferringImageDataset):
    """ReasonSeg from LISA's release; the data module's ``val``/``test`` are ReasonSeg's val and test unless
    ``val_split``/``test_split`` say otherwise."""

    name = "reasonseg"

    def __init__(
        self,
        split: str,
        /,
        *,
        root: str,
        image_size: int = 1024,
        max_samples: int | None = None,
        queries: Literal["all", "short", "long"] = "all",
        val_split: str = "val",
        test_split: str = "test",
    ) -> None:
        super().__init__(split, image_size, max_samples)
        self.reason_split = self.source_split(val_split, test_split, REASONSEG_SPLITS)
        folder = Path(root) / self.reason_split
        if not folder.is_dir():
            raise DataError(f"reasonseg: folder not found: {folder}",
                            fix="set data.dataset.root to the folder holding train/, val/ and test/")
        kept = QUERIES[queries]
        items: list[tuple[Path, str, tuple[tuple[str, list[float]], ...]]] = []  # (image, query, shapes)
        for path in sorted(folder.glob("*.json")):
            ann = read_annotation(path)
            if ann["is_sentence"] not in kept:
                continue
            texts = ann["text"] if self.reason_split == "train" else ann["text"][:1]
            items += [(path.with_suffix(".jpg"), t, tuple(ann["shapes"])) for t in texts]
        if not items:
            raise DataError(f"reasonseg: no {'' if queries == 'all' else queries + ' '}queries in {folder}",
                            fix="check data.dataset.root and data.dataset.queries")
        self._keep_readable(items, lambda it: it[0], folder)
        self._limit()

    def image_keys(self) -> set[str]:
        return {it[0].name for it in self.items}

    def sample_id(self, index: int) -> str:
        return f"{self.reason_split}-{self.items[index][0].stem}-{index}"

    def load(self, index: int) -> dict[str, Any]:
        path, text, shapes = self.items[index]
        image = open_image(path)
        mask, ignore = reasonseg_masks(list(shapes), image.height, image.width)
        return self.sample(index, image, mask, text, ignore=ignore)
