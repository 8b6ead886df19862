"""What every real referring-segmentation dataset shares: :class:`ReferringImageDataset`, which turns a
subclass's records into samples (:meth:`~ReferringImageDataset.sample`: LISA's resize, and the original mask
that evaluation scores against) and skips unreadable images (``refcoco``, ``grefcoco``, ``reasonseg``,
``hf_refer``)."""

from __future__ import annotations

import functools
import json
import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segrouter.errors import DataError
from segrouter.images import BAD_IMAGE_ERRORS, center_crop, letterbox, letterbox_input, letterbox_size, open_image

log = logging.getLogger(__name__)

# a sample's per-image tensors besides ``image``, which the data module and ``prompt_batch`` batch alike: the
# letterbox's content size, the mask encoder's own input and its content size, the vision encoder's centre crop
ENCODER_INPUTS = ("content_hw", "mask_image", "mask_image_hw", "vision_image")


class ReferringImageDataset(Dataset):
    """Samples ``{image, mask, text, id}`` from real images, skipping unreadable ones.

    A subclass fills ``self.items`` (its own records, one per sample) and implements :meth:`load`. When an
    image is missing or corrupt, ``__getitem__`` returns the next readable sample (deterministic: the same
    index always gives the same sample) and counts the bad one in :attr:`skipped`, so one broken file in
    120k never stops a training run. The first skip logs a warning; the count is per process (DataLoader
    workers each keep their own)."""

    items: list[Any]
    name = "dataset"
    mask_image_size: int | None = None  # set by the data module for a mask encoder with its own input (sam_vit)
    vision_crop: bool = False  # set by the data module for a vision encoder that reads a centre crop (hf_clip)

    def __init__(self, split: str, image_size: int, max_samples: int | None) -> None:
        if image_size < 16:
            raise DataError(f"image_size must be at least 16, got {image_size}", fix="raise data.dataset.image_size")
        if max_samples is not None and max_samples < 1:
            raise DataError(f"max_samples must be >= 1, got {max_samples}", fix="use null for all samples")
        self.split = split
        self.image_size = image_size
        self.max_samples = max_samples
        self.skipped_ids: set[str] = set()

    @property
    def skipped(self) -> int:
        """Number of distinct samples skipped so far because their image could not be read."""
        return len(self.skipped_ids)

    def source_split(self, val_split: str, test_split: str, valid: Sequence[str] | None = None) -> str:
        """The dataset's own name for the data module's split (``val`` and ``test`` are what the recipe's
        ``val_split`` / ``test_split`` say); with ``valid``, a name outside it is one error."""
        name = {"train": "train", "val": val_split, "test": test_split}.get(self.split, self.split)
        if valid is not None and name not in valid:
            raise DataError(f"{self.name}: unknown split '{name}'", fix=f"valid splits: {', '.join(valid)}")
        return name

    def _keep_readable(self, items: list[Any], path: Any, where: Path) -> None:
        """``self.items``: those of ``items`` whose image file (``path(item)``) exists; the others are counted in
        ``self.missing`` and named in one summary warning, so a partial image download still evaluates."""
        exists: dict[Path, bool] = {}
        self.items = [it for it in items if exists.setdefault(path(it), path(it).is_file())]
        self.missing = len(items) - len(self.items)
        if self.missing:
            log.warning("%s %s: dropped %d samples whose image is missing (%d images) under %s", self.name,
                        self.split, self.missing, sum(not e for e in exists.values()), where)

    def _limit(self) -> None:
        if not self.items:
            raise DataError(f"{self.name}: split '{self.split}' has no samples",
                            fix="check the split name and data files")
        if self.max_samples is not None:
            self.items = self.items[: self.max_samples]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> dict[str, Any]:  # pragma: no cover - interface
        """Sample ``index``; raises one of ``BAD_IMAGE_ERRORS`` when its image cannot be read."""
        raise NotImplementedError

    def sample_id(self, index: int) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def image_keys(self) -> set[str] | None:
        """The names of the image files this split's samples use, for the leak check between a training split and
        an evaluation split (:func:`shared_images`); None when the dataset has no stable image names."""
        return None

    def sample(self, index: int, image: Image.Image, mask: np.ndarray, text: str, ignore: np.ndarray | None = None,
               **extra: Any) -> dict[str, Any]:
        """Sample ``index`` from its original image and bool mask (H, W): both letterboxed to ``image_size``
        (:func:`~segrouter.images.letterbox`), plus ``extra`` keys. ``ignore`` (bool (H, W), ReasonSeg's "ignore"
        regions) marks pixels that scoring leaves out of both intersection and union (key ``ignore``). For a mask
        encoder that reads its own input (``mask_image_size``) the image is also letterboxed at that size
        (``mask_image``, ``mask_image_hw``); for a vision encoder that reads a centre crop (``vision_crop``), that
        crop of the original at ``image_size`` (``vision_image``). ``content_hw`` is the size of the image inside the
        padding (scoring at the original resolution crops it out; ``sam_superpixel`` partitions only it). Outside
        ``train`` the sample also keeps the original mask (and ignore mask), which ``metrics.resolution: original``
        scores against."""
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask {mask.shape} does not match image {image.height}×{image.width}")
        img, m = letterbox(image, mask, self.image_size)
        out = {"image": img, "mask": m, "text": text, "id": self.sample_id(index),
               "content_hw": torch.tensor(letterbox_size(image.height, image.width, self.image_size)), **extra}
        if ignore is not None:
            out["ignore"] = letterbox(image, ignore, self.image_size)[1] > 0.5
        if self.mask_image_size is not None:  # the mask encoder's own letterbox of the original (LISA's SAM input)
            out["mask_image"], out["mask_image_hw"] = letterbox_input(image, self.mask_image_size)
        if self.vision_crop:  # CLIP's own preprocessing, as LISA feeds its CLIP
            out["vision_image"] = center_crop(image, self.image_size)
        if self.split != "train":
            out["original_mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))
            if ignore is not None:
                out["original_ignore"] = torch.from_numpy(np.ascontiguousarray(ignore, dtype=bool))
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.items)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for step in range(n):
            i = (index + step) % n
            try:
                return self.load(i)
            except BAD_IMAGE_ERRORS as exc:
                sid = self.sample_id(i)
                if not self.skipped_ids:
                    log.warning("%s %s: skipping unreadable image (%s: %s); later ones are only counted in .skipped",
                                self.name, self.split, type(exc).__name__, exc)
                self.skipped_ids.add(sid)
        raise DataError(f"{self.name}: no readable image in split '{self.split}'", fix="check the image folder")


def image_keys(dataset: Dataset) -> set[str] | None:
    """A dataset's image names for the leak check (:meth:`ReferringImageDataset.image_keys`); None for datasets
    that have none (the synthetic one)."""
    return getattr(dataset, "image_keys", lambda: None)()


def shared_images(train: set[str], evaluated: set[str]) -> tuple[int, int, list[str]]:
    """The leak check on two datasets' image names (:func:`image_keys`): how many of the evaluated images are
    also training images, out of how many, and a few of them (sorted)."""
    both = train & evaluated
    return len(both), len(evaluated), sorted(both)[:3]


# ----------------------------------------------------------------------- COCO-based referring annotations
class COCOReferDataset(ReferringImageDataset):
    """What RefCOCO/+/g and gRefCOCO share: COCO images named by ``instances.json``, one sample per (ref,
    sentence) with records ``(image_id, objects, ref_id, sentence)``, and the split they were read for
    (``refer_split``)."""

    images: dict[int, dict[str, Any]]
    image_dir: Path
    refer_split: str

    def _image_folder(self, image_dir: str) -> Path:
        """``image_dir``, which must be a folder (COCO train2014)."""
        folder = Path(image_dir)
        if not folder.is_dir():
            raise DataError(f"{self.name}: image folder not found: {folder}",
                            fix="set data.dataset.image_dir (COCO train2014)")
        return folder

    def _keep_images(self, items: list[tuple[Any, ...]]) -> None:
        """Keep the records whose image file exists (see :meth:`_keep_readable`), then apply ``max_samples``."""
        self._keep_readable(items, lambda it: self.image_dir / self.images[it[0]]["file_name"], self.image_dir)
        self._limit()

    def image_keys(self) -> set[str]:
        return {str(self.images[it[0]]["file_name"]) for it in self.items}

    def sample_id(self, index: int) -> str:
        return f"{self.refer_split}-ref{self.items[index][2]}-{index}"

    def read_image(self, image_id: int) -> tuple[Image.Image, int, int]:
        """The image and its (height, width) as ``instances.json`` gives them (the masks' size)."""
        info = self.images[image_id]
        return open_image(self.image_dir / info["file_name"]), int(info["height"]), int(info["width"])


@dataclass(frozen=True)
class ReferAnnotations:
    """One ``refer``-layout annotation set (RefCOCO/+/g, gRefCOCO): its refs and the COCO ``instances.json``
    they point into, indexed by id."""

    refs: list[dict[str, Any]]
    images: dict[int, dict[str, Any]]
    anns: dict[int, dict[str, Any]]
    categories: dict[int, str]


def read_refer(refs_path: Path, instances_path: Path, what: str) -> ReferAnnotations:
    """Read a refs file (``.p``: pickle, the ``refer`` toolkit's; ``.json``: gRefCOCO's) and its
    ``instances.json``, once per process while the files are unchanged: an evaluation of several splits, or a
    training run and its validation, share one read. A pickle can run code when loaded: it is read only from
    the folder the user named in the recipe."""
    for p in (refs_path, instances_path):
        if not p.is_file():
            raise DataError(f"{what}: file not found: {p}",
                            fix="set data.dataset.root to the folder holding <dataset>/")
    stamps = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (refs_path, instances_path))
    return _read_refer(refs_path, instances_path, what, stamps)


@functools.lru_cache(maxsize=4)
def _read_refer(refs_path: Path, instances_path: Path, what: str, stamps: tuple[tuple[int, int], ...]
                ) -> ReferAnnotations:
    """:func:`read_refer`'s cached read (``stamps``: the files' modification times and sizes, part of the key)."""
    try:
        if refs_path.suffix == ".p":
            with open(refs_path, "rb") as f:
                refs = pickle.load(f)  # the user's own data file (see above)
        else:
            with open(refs_path) as f:
                refs = json.load(f)
        with open(instances_path) as f:
            instances = json.load(f)
        return ReferAnnotations(
            refs=list(refs),
            images={int(im["id"]): im for im in instances["images"]},
            anns={int(a["id"]): a for a in instances["annotations"]},
            categories={int(c["id"]): str(c["name"]) for c in instances.get("categories", [])},
        )
    except (OSError, pickle.UnpicklingError, EOFError, json.JSONDecodeError, UnicodeDecodeError, KeyError,
            TypeError) as exc:
        raise DataError(f"{what}: cannot read {refs_path.parent}: {type(exc).__name__}: {exc}",
                        fix="re-download the annotations") from None
