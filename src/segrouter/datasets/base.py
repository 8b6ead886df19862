"""What every real referring-segmentation dataset shares: :class:`ReferringImageDataset`, which turns a
subclass's records into samples and skips unreadable images (``refcoco``, ``hf_refer``)."""

from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import Dataset

from segrouter.errors import DataError
from segrouter.images import BAD_IMAGE_ERRORS

log = logging.getLogger(__name__)


class ReferringImageDataset(Dataset):
    """Samples ``{image, mask, text, id}`` from real images, skipping unreadable ones.

    A subclass fills ``self.items`` (its own records, one per sample) and implements :meth:`load`. When an
    image is missing or corrupt, ``__getitem__`` returns the next readable sample (deterministic: the same
    index always gives the same sample) and counts the bad one in :attr:`skipped`, so one broken file in
    120k never stops a training run. The first skip logs a warning; the count is per process (DataLoader
    workers each keep their own)."""

    items: list[Any]
    name = "dataset"

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
