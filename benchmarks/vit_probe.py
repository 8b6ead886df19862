"""How readable a vision encoder makes objects' shape and colour (issue 12, docs/results.md): a linear probe.

The testbed's LLM must name the target ("red circle") from its visual tokens; with a frozen ViT it can only
read what the ViT encodes. This probe takes the visref scenes' objects, pools a frozen ViT's features over
each object's grid cells (weighted by how much of the cell the object covers), and fits a linear classifier
of its shape and of its colour on three quarters of them; the figure is the accuracy on the other quarter.

    python benchmarks/vit_probe.py probe CKPT [CKPT ...]   # the ViT of each checkpoint (e.g. stage 1's last.ckpt)
    python benchmarks/vit_probe.py heads [--steps 600]     # the ViT trained alone under each semantic-head design

``heads`` compares designs of ``model.loss.semantic_weight``'s head by training the visref ViT on the per-pixel
labels alone (no LLM, AdamW at 1e-3, batch 16, seed 0) and probing it: one head per attribute or one over
colour-shape pairs, predicting per grid cell or on a 2×2 finer grid (the framework's choice).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from segrouter.checkpoints import load_state_dict  # noqa: E402
from segrouter.recipe import component, load_recipe  # noqa: E402
from segrouter.registry import registry  # noqa: E402
from segrouter.vision_encoders.base import VisionEncoder  # noqa: E402

RECIPE = ROOT / "recipes" / "visref.yaml"
HEADS = {  # label: (one head per attribute, cells per grid cell along each side)
    "per attribute, 2x2 finer grid (framework)": (True, 2),
    "per attribute, per cell": (True, 1),
    "colour-shape pairs, 2x2 finer grid": (False, 2),
    "colour-shape pairs, per cell": (False, 1),
}


@functools.cache
def _recipe() -> Any:
    return load_recipe(RECIPE, [])


def _vit() -> VisionEncoder:
    cfg = _recipe()
    return registry("vision_encoder").build(component(cfg, "model.vision_encoder"), int(cfg.model.image_size))


def _dataset(split: str) -> Any:
    return registry("dataset").build(component(_recipe(), "data.dataset"), split)


def probe(vit: VisionEncoder, scenes: int = 1500) -> dict[str, float]:
    """Held-out accuracy of a linear classifier of each object's shape and colour from the pooled features."""
    ds = _dataset("val")
    picked = [ds.scene(i) for i in range(min(scenes, len(ds)))]
    images = torch.from_numpy(np.stack([s.image for s in picked]))
    vit.eval()
    with torch.no_grad():
        feats = torch.cat([vit(images[i:i + 256]) for i in range(0, len(images), 256)])  # (N, C, h, w)
    grid = feats.shape[-2:]
    pooled, labels = [], {"shape": [], "colour": []}
    for scene, f in zip(picked, feats, strict=True):
        for o in scene.objects:
            w = F.adaptive_avg_pool2d(torch.from_numpy(o.mask.astype(np.float32))[None, None], grid)[0, 0]
            pooled.append((f * w).sum((1, 2)) / w.sum())
            labels["shape"].append(ds.shapes.index(o.shape))
            labels["colour"].append(ds.colours.index(o.colour))
    x = torch.stack(pooled)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = int(0.75 * len(x))
    out = {}
    for attribute, y in labels.items():
        y = torch.tensor(y)
        torch.manual_seed(0)
        head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(500):
            opt.zero_grad()
            F.cross_entropy(head(x[:n]), y[:n]).backward()
            opt.step()
        with torch.no_grad():
            out[attribute] = float((head(x[n:]).argmax(1) == y[n:]).float().mean())
    out["objects"] = len(x)
    return out


def train_alone(per_attribute: bool, cells: int, steps: int) -> VisionEncoder:
    """The visref ViT trained on the per-pixel labels alone, with the given head design."""
    torch.manual_seed(0)
    ds = _dataset("train")
    sizes = [len(c) + 1 for c in ds.semantic_classes.values()]
    pairs = (sizes[0] - 1) * (sizes[1] - 1) + 1  # colours x shapes, + background
    vit = _vit()
    head = torch.nn.Conv2d(vit.out_dim, (sum(sizes) if per_attribute else pairs) * cells ** 2, 1)
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        items = [ds[int(i)] for i in rng.integers(0, len(ds), 16)]
        images = torch.stack([it["image"] for it in items])
        semantic = torch.stack([it["semantic"] for it in items])  # (B, 2, H, W): colour, shape
        logits = F.interpolate(F.pixel_shuffle(head(vit(images)), cells), size=semantic.shape[-2:],
                               mode="bilinear", align_corners=False)
        if per_attribute:
            loss = sum(F.cross_entropy(part, semantic[:, a]) for a, part in enumerate(logits.split(sizes, dim=1)))
        else:  # 0 background, else 1 + colour * shapes + shape
            joint = torch.where(semantic[:, 0] == 0, 0, 1 + (semantic[:, 0] - 1) * (sizes[1] - 1) + semantic[:, 1] - 1)
            loss = F.cross_entropy(logits, joint)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="probe the ViT of each checkpoint")
    p.add_argument("checkpoints", nargs="+", type=Path)
    h = sub.add_parser("heads", help="train the ViT alone under each semantic-head design, then probe it")
    h.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| ViT | shape | colour | objects |\n|---|---:|---:|---:|")
    if args.command == "probe":
        for ckpt in args.checkpoints:
            if not ckpt.is_file():
                print(f"vit_probe.py: error: no checkpoint at {ckpt}", file=sys.stderr)
                sys.exit(2)
            vit = _vit()
            vit.load_state_dict({k[len("vision."):]: v for k, v in load_state_dict(ckpt).items()
                                 if k.startswith("vision.")})
            r = probe(vit)
            print(f"| {ckpt} | {r['shape']:.3f} | {r['colour']:.3f} | {r['objects']} |", flush=True)
    else:
        for label, (per_attribute, cells) in HEADS.items():
            t0 = time.perf_counter()
            r = probe(train_alone(per_attribute, cells, args.steps))
            print(f"| {label}, {args.steps} steps ({time.perf_counter() - t0:.0f} s) | {r['shape']:.3f} | "
                  f"{r['colour']:.3f} | {r['objects']} |", flush=True)


if __name__ == "__main__":
    main()
