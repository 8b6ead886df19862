"""Partitions: an int64 label map (H, W) with labels 0..K-1 covering every pixel exactly once.

Both generators end with :func:`merge_regions`, so token counts are bounded the same way whatever made
the regions: a region below ``min_area`` pixels, or the smallest one while there are more than
``max_regions``, is merged into the neighbour it shares the longest border with. SLIC's over-segmentation
is first made object-like by :func:`merge_similar_colours`.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
from skimage import graph
from skimage.color import rgb2lab

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
    for code, n in zip(codes.tolist(), counts.tolist(), strict=True):
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


def merge_similar_colours(labels: np.ndarray, image: np.ndarray, threshold: float) -> np.ndarray:
    """Merge adjacent regions whose mean CIELAB colours are less than ``threshold`` apart (ΔE 1976),
    the closest pair first, with means updated after each merge; return a relabelled partition.

    This turns a colour over-segmentation into object-like regions: a flat object split into several
    superpixels becomes one, while neighbours of clearly different colour stay apart. The merging is
    scikit-image's ``merge_hierarchical``; the region graph is built here from :func:`border_lengths` and
    ``bincount``, because ``rag_mean_color`` filters every pixel in Python and took ~5x the time of SLIC.
    """
    labels = relabel(labels)
    lab = rgb2lab(image).reshape(-1, 3)
    flat = labels.ravel()
    k = int(flat.max()) + 1
    counts = np.bincount(flat, minlength=k).astype(np.float64)
    totals = np.stack([np.bincount(flat, weights=lab[:, c], minlength=k) for c in range(3)], axis=1)
    rag = graph.RAG()
    for n in range(k):  # merge_hierarchical reads "labels"; the colour sums are kept for _pool_colours
        attributes = {"pixel count": counts[n], "total color": totals[n], "mean color": totals[n] / counts[n]}
        rag.add_node(n, labels=[n], **attributes)
    for a, neighbours in border_lengths(labels).items():
        for b in neighbours:
            if a < b:
                rag.add_edge(a, b, weight=_colour_distance(rag, a, b))
    merged = graph.merge_hierarchical(
        labels, rag, thresh=threshold, rag_copy=False, in_place_merge=True,
        merge_func=_pool_colours, weight_func=lambda g, src, dst, n: {"weight": _colour_distance(g, dst, n)},
    )
    return relabel(merged)


def _colour_distance(rag: Any, a: int, b: int) -> float:
    return float(np.linalg.norm(rag.nodes[a]["mean color"] - rag.nodes[b]["mean color"]))


def _pool_colours(rag: Any, src: int, dst: int) -> None:
    """``merge_hierarchical`` hook: ``dst`` absorbs ``src``'s pixels, so its mean colour is recomputed."""
    node, other = rag.nodes[dst], rag.nodes[src]
    node["total color"] = node["total color"] + other["total color"]
    node["pixel count"] += other["pixel count"]
    node["mean color"] = node["total color"] / node["pixel count"]


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
