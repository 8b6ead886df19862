"""How many visual tokens the ``sam_superpixel`` projector emits, and whether they can describe the objects.

Prints, per image set, the median / mean / max superpixels (= tokens) per image, their ratio to the patch
tokens of the ``mlp`` projector, and the *oracle IoU*: each region is given to an object when more than half
of its pixels lie in it, and the union is compared with the object mask (1.0 = the regions can describe
every object exactly; the same score for the patch grid is printed as the reference). Image sets:

* ``synthetic``: the framework's synthetic val images (64×64, patch 8 → 64 patches);
* ``shapes224``: seeded natural-looking scenes at 224×224 (patch 16 → 196 patches): a smooth two-colour
  gradient with low-frequency texture and 8–16 overlapping textured ellipses / rectangles / triangles;
* ``skimage224``: scikit-image's bundled photographs (astronaut, coffee, chelsea, rocket, cat,
  immunohistochemistry), centre-cropped and resized to 224×224 (no masks: no oracle IoU).

Generator settings default to the compressor's defaults; override them on the command line, e.g.
``python benchmarks/superpixel_tokens.py --colour-threshold 0 --n-segments 24`` (plain SLIC) or
``--generator sam --sam-path /models/sam``; ``--sets synthetic64`` measures one set only (e.g. for the tiny
SAM of ``benchmarks/train_tiny_sam.py``, which has only seen synthetic scenes).
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable

import numpy as np
import skimage.data
from skimage.draw import ellipse, polygon, rectangle
from skimage.transform import resize

from segrouter.compressors.sam_superpixel import SAMSuperpixelProjector
from segrouter.datasets.synthetic import SyntheticReferringDataset
from segrouter.superpixels import SAMAutomaticMaskGenerator, SLICGenerator

SKIMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")
Sample = tuple[np.ndarray, list[np.ndarray]]  # (H, W, 3) uint8 image, object masks


def synthetic(n: int) -> list[Sample]:
    ds = SyntheticReferringDataset("val", image_size=64, num_samples=4 * n)
    out = []
    for i in range(n):
        scene = ds.scene(i)
        out.append((_to_uint8(scene.image.transpose(1, 2, 0)), [o.mask for o in scene.objects]))
    return out


def shapes224(n: int, size: int = 224) -> list[Sample]:
    out = []
    for i in range(n):
        rng = np.random.default_rng([7, i])
        yy, xx = np.mgrid[0:size, 0:size] / size
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
        image = (1 - t) * rng.uniform(0, 1, 3) + t * rng.uniform(0, 1, 3)
        for _ in range(3):  # low-frequency texture
            f, phase = rng.uniform(2, 8, 2), rng.uniform(0, 2 * np.pi)
            image += 0.05 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + phase)[..., None]
        owner = np.full((size, size), -1)
        count = int(rng.integers(8, 17))
        for k in range(count):
            r, c = rng.uniform(0.1, 0.9, 2) * size
            half = rng.uniform(0.04, 0.2, 2) * size
            kind = rng.integers(3)
            if kind == 0:
                rr, cc = ellipse(r, c, half[0], half[1], shape=(size, size), rotation=rng.uniform(0, np.pi))
            elif kind == 1:
                rr, cc = rectangle((r - half[0], c - half[1]), (r + half[0], c + half[1]), shape=(size, size))
                rr, cc = rr.astype(int).ravel(), cc.astype(int).ravel()
            else:
                rr, cc = polygon(r + rng.uniform(-1, 1, 3) * half[0] * 1.5, c + rng.uniform(-1, 1, 3) * half[1] * 1.5,
                                 shape=(size, size))
            base = rng.uniform(0, 1, 3)
            stripes = 0.08 * np.sin(2 * np.pi * rng.uniform(4, 20) * (xx[rr, cc] if k % 2 else yy[rr, cc]))
            image[rr, cc] = base + stripes[:, None]
            owner[rr, cc] = k
        image += rng.normal(0, 0.02, image.shape)
        masks = [owner == k for k in range(count) if (owner == k).sum() >= 16]
        out.append((_to_uint8(image), masks))
    return out


def skimage224(size: int = 224) -> list[Sample]:
    out = []
    for name in SKIMAGE_NAMES:
        image = getattr(skimage.data, name)()[..., :3]
        h, w = image.shape[:2]
        s = min(h, w)
        crop = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        out.append((_to_uint8(resize(crop, (size, size), anti_aliasing=True)), []))
    return out


def oracle_iou(labels: np.ndarray, masks: list[np.ndarray]) -> float:
    """Mean over objects of the IoU between the object and the union of regions that are mostly inside it."""
    k = int(labels.max()) + 1
    total = np.bincount(labels.ravel(), minlength=k)
    ious = []
    for m in masks:
        chosen = (2 * np.bincount(labels[m], minlength=k) > total)[labels]
        ious.append((chosen & m).sum() / (chosen | m).sum())
    return float(np.mean(ious)) if ious else float("nan")


def patch_grid(shape: tuple[int, int], patch: int) -> np.ndarray:
    h, w = shape
    return (np.arange(h)[:, None] // patch) * (w // patch) + np.arange(w)[None, :] // patch


def report(name: str, samples: list[Sample], patch: int, partition: Callable[[np.ndarray], np.ndarray]) -> None:
    t0 = time.perf_counter()
    labels = [partition(image) for image, _ in samples]
    ms = 1000 * (time.perf_counter() - t0) / len(samples)
    counts = np.array([int(lab.max()) + 1 for lab in labels])
    patches = (samples[0][0].shape[0] // patch) * (samples[0][0].shape[1] // patch)
    ious = [oracle_iou(lab, masks) for lab, (_, masks) in zip(labels, samples, strict=True) if masks]
    grid_ious = [oracle_iou(patch_grid(img.shape[:2], patch), masks) for img, masks in samples if masks]
    iou = f"{np.mean(ious):.3f}" if ious else "n/a"
    grid_iou = f"{np.mean(grid_ious):.3f}" if grid_ious else "n/a"
    print(
        f"| {name} | {len(samples)} | {patches} | {np.median(counts):.1f} | {counts.mean():.1f} | {counts.max()} "
        f"| {np.median(counts) / patches:.1%} | {counts.max() / patches:.1%} | {iou} | {grid_iou} | {ms:.0f} |"
    )
    if name == "skimage224":
        print("|  | per image: " + ", ".join(f"{n} {c}" for n, c in zip(SKIMAGE_NAMES, counts, strict=True)) + " |")


def main() -> None:
    defaults = {
        p.name: p.default
        for p in inspect.signature(SAMSuperpixelProjector.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", choices=("slic", "sam"), default=defaults["generator"])
    ap.add_argument("--sam-path", default=defaults["sam_path"])
    for key in ("points_per_side", "n_segments", "min_area", "max_regions"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=defaults[key])
    for key in ("pred_iou_thresh", "stability_thresh", "compactness", "colour_threshold"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=float, default=defaults[key])
    ap.add_argument("--sets", nargs="+", choices=("synthetic64", "shapes224", "skimage224"),
                    default=["synthetic64", "shapes224", "skimage224"], help="image sets to measure")
    ap.add_argument("--synthetic", type=int, default=200, help="number of synthetic val images")
    ap.add_argument("--shapes", type=int, default=20, help="number of shapes224 images")
    args = ap.parse_args()
    if args.generator == "sam":
        gen: Callable[[np.ndarray], np.ndarray] = SAMAutomaticMaskGenerator(
            args.sam_path, points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
            stability_thresh=args.stability_thresh, min_area=args.min_area, max_regions=args.max_regions,
        )
    else:
        gen = SLICGenerator(n_segments=args.n_segments, compactness=args.compactness,
                            colour_threshold=args.colour_threshold, min_area=args.min_area,
                            max_regions=args.max_regions)
    print(f"generator settings: {gen.settings()}")  # type: ignore[attr-defined]
    print("| images | n | patch tokens | median tokens | mean | max | median/patches | max/patches "
          "| oracle IoU | patch-grid oracle IoU | ms/image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    sets = {
        "synthetic64": lambda: (synthetic(args.synthetic), 8),
        "shapes224": lambda: (shapes224(args.shapes), 16),
        "skimage224": lambda: (skimage224(), 16),
    }
    for name in args.sets:
        samples, patch = sets[name]()
        report(name, samples, patch, gen)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


if __name__ == "__main__":
    main()
