"""Partitions: an int64 label map (H, W) with labels 0..K-1 covering every pixel exactly once.

Both generators end with :func:`merge_regions`, so token counts are bounded the same way whatever made
the regions: a region below ``min_area`` pixels, or the smallest one while there are more than
``max_regions``, is merged into the neighbour it shares the longest border with.
"""

from __future__ import annotations

import heapq

import numpy as np

from segrouter.errors import SegrouterError


def relabel(labels: np.ndarray) -> np.ndarray:
    """Map arbitrary non-negative labels to 0..K-1, keeping their order (int64)."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64)


def border_lengths(labels: np.ndarray) -> dict[int, dict[int, int]]:
    """Symmetric region adjacency: ``adj[a][b]`` = number of 4-connected pixel pairs between a and b."""
    k = int(labels.max()) + 1
    pairs = [
        (labels[:, :-1].ravel(), labels[:, 1:].ravel()),
        (labels[:-1, :].ravel(), labels[1:, :].ravel()),
    ]
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    keep = a != b
    lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    codes, counts = np.unique(lo * k + hi, return_counts=True)
    adj: dict[int, dict[int, int]] = {i: {} for i in range(k)}
    for code, n in zip(codes.tolist(), counts.tolist()):
        x, y = divmod(code, k)
        adj[x][y] = adj[y][x] = n
    return adj


def merge_regions(labels: np.ndarray, min_area: int, max_regions: int) -> np.ndarray:
    """Merge the smallest region into its longest-border neighbour while it is below ``min_area`` pixels
    or there are more than ``max_regions`` regions; return a relabelled partition.

    Smallest-first keeps large (semantic) regions intact and lets tiny fragments (noise, slivers left by
    overlapping masks) vanish first. Ties go to the neighbour with the larger area, then the lower label,
    so the result is deterministic. A single region has no neighbour and is kept whatever its size.
    """
    labels = relabel(labels)
    areas = np.bincount(labels.ravel()).tolist()
    adj = border_lengths(labels)
    parent = list(range(len(areas)))
    heap = [(a, i) for i, a in enumerate(areas)]
    heapq.heapify(heap)
    alive = len(areas)
    while heap:
        area, r = heap[0]
        if parent[r] != r or area != areas[r]:
            heapq.heappop(heap)  # stale entry: merged away or grown since it was pushed
            continue
        if (area >= min_area and alive <= max_regions) or not adj[r]:
            break
        heapq.heappop(heap)
        t = max(adj[r], key=lambda n: (adj[r][n], areas[n], -n))
        for n, length in adj.pop(r).items():
            del adj[n][r]
            if n != t:
                adj[t][n] = adj[n][t] = adj[t].get(n, 0) + length
        areas[t] += area
        parent[r] = t
        alive -= 1
        heapq.heappush(heap, (areas[t], t))
    root = np.array(parent)
    while True:  # resolve merge chains r -> t -> ...
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return relabel(root[labels])


def check_partition(labels: np.ndarray, shape: tuple[int, int]) -> None:
    """Raise unless ``labels`` is a partition of an image of ``shape`` (labels exactly 0..K-1)."""
    if labels.shape != shape or labels.dtype != np.int64:
        raise SegrouterError(
            f"partition must be int64 of shape {shape}, got {labels.dtype} {labels.shape}",
            fix="generators must return relabel()-ed maps",
        )
    present = np.bincount(labels.ravel()) if labels.size and labels.min() >= 0 else np.zeros(0)
    if not present.size or not present.all():
        raise SegrouterError("partition labels are not exactly 0..K-1", fix="pass the map through relabel()")
