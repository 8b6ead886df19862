"""A cache of partitions: superpixels depend only on the image and the generator settings, so each image
is segmented once per setting, not once per epoch (SAM's point grid costs far more than a training step).

Key: sha256 over the image bytes (with shape and dtype), the generator name and its settings as sorted
JSON. An in-memory LRU serves repeated images within a process; with ``cache_dir`` partitions are also
stored as compressed ``.npz`` files shared across runs and processes. Files are written to a temporary
name in the same folder and ``os.replace``-d, so a reader (another DDP rank, a crashed run) never sees a
partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from segrouter.errors import ParamError
from segrouter.superpixels.regions import check_partition


class Generator(Protocol):
    """What the cache needs from a superpixel generator."""

    name: str

    def settings(self) -> dict[str, Any]: ...

    def __call__(self, image: np.ndarray) -> np.ndarray: ...


class PartitionCache:
    """``get(image, generator)`` returns the partition, computing it only on a miss.

    ``hits``/``misses`` count lookups (a disk read is a hit); ``memory_items`` bounds the in-memory LRU.
    """

    def __init__(self, cache_dir: str | Path | None = None, *, memory_items: int = 8192) -> None:
        self.dir = Path(cache_dir) if cache_dir is not None else None
        if self.dir is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ParamError(
                    f"cannot create the superpixel cache folder {self.dir}: {exc.strerror}",
                    param="cache_dir",
                    fix="choose a writable folder, or null for an in-memory cache",
                ) from exc
        self.memory_items = memory_items
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image: np.ndarray, generator: Generator) -> str:
        h = hashlib.sha256()
        h.update(f"{image.dtype}{image.shape}".encode())
        h.update(np.ascontiguousarray(image).tobytes())
        h.update(generator.name.encode())
        h.update(json.dumps(generator.settings(), sort_keys=True).encode())
        return h.hexdigest()

    def path(self, key: str, generator: Generator) -> Path | None:
        return None if self.dir is None else self.dir / generator.name / key[:2] / f"{key}.npz"

    def get(self, image: np.ndarray, generator: Generator,
            compute: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The (H, W) int64 partition of ``image`` (H, W, 3) uint8 by ``generator``; on a miss it is
        ``compute(image)`` where given (the generator run with inputs it was handed, e.g. an embedding that
        the key's settings already identify), else ``generator(image)``."""
        key = self.key(image, generator)
        labels = self._memory.get(key)
        if labels is not None:
            self._memory.move_to_end(key)
            self.hits += 1
            return labels.astype(np.int64)
        path = self.path(key, generator)
        if path is not None and path.is_file():
            with np.load(path) as data:
                labels = data["labels"]
            self.hits += 1
        else:
            labels = (compute or generator)(image)
            check_partition(labels, image.shape[:2])
            self.misses += 1
            if path is not None:
                _atomic_save(path, labels)
        self._remember(key, labels)
        return labels.astype(np.int64)

    def _remember(self, key: str, labels: np.ndarray) -> None:
        # the smallest integer type keeps ~4 k 64×64 partitions in a few MB
        self._memory[key] = labels.astype(np.min_scalar_type(int(labels.max())))
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)


def _atomic_save(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, labels=labels.astype(np.min_scalar_type(int(labels.max()))))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
