"""Train a tiny transformers ``SamModel`` on the synthetic scenes, so the ``generator: sam`` path of the
superpixel projector can be measured with trained weights where no SAM checkpoint may be downloaded.

SAM's promptable task, at toy scale: for a random point inside one region of a scene (an object or the
background), predict that region's mask. As in SAM's training, the model makes 3 masks per point, only
the best of them (lowest loss) is trained to match, and the IoU head learns the real IoU of all 3, which
is what the automatic mask generator's ``pred_iou_thresh`` filter relies on. Loss per mask: binary cross-
entropy + dice. The result is a ``save_pretrained`` folder that ``sam_path`` (and
``benchmarks/superpixel_tokens.py --generator sam --sam-path``) loads like a real SAM::

    python benchmarks/train_tiny_sam.py --out runs/tiny_sam          # ~10 minutes on 2 CPU cores
    python benchmarks/superpixel_tokens.py --generator sam --sam-path runs/tiny_sam --synthetic 200

Trained on synthetic shapes only, it says nothing about natural images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import SamModel

from segrouter.datasets.synthetic import SyntheticReferringDataset
from segrouter.superpixels.sam_amg import normalise_for_sam, tiny_sam_config


def regions(scene_masks: list[np.ndarray]) -> list[np.ndarray]:
    """The scene's objects plus the background (what no object covers): every region a point can hit."""
    background = ~np.any(scene_masks, axis=0)
    return [*scene_masks, background] if background.any() else list(scene_masks)


def make_batch(ds: SyntheticReferringDataset, indices: np.ndarray, points: int, rng: np.random.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 3, S, S) normalised for SAM, one point per prompt (B, P, 1, 2) as (x, y) pixel centres,
    and the target masks (B, P, S, S)."""
    images, coords, targets = [], [], []
    for i in indices:
        scene = ds.scene(int(i))
        images.append(scene.image)
        parts = regions([o.mask for o in scene.objects])
        chosen = [parts[j] for j in rng.integers(len(parts), size=points)]
        for mask in chosen:
            ys, xs = np.nonzero(mask)
            k = rng.integers(len(ys))
            coords.append((xs[k] + 0.5, ys[k] + 0.5))
        targets.append(np.stack(chosen))
    pixels = torch.from_numpy((np.stack(images).clip(0, 1) * 255).round())
    point_tensor = torch.tensor(coords, dtype=torch.float32).view(len(indices), points, 1, 2)
    return normalise_for_sam(pixels), point_tensor, torch.from_numpy(np.stack(targets)).float()


def predict(model: SamModel, images: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits upsampled to the input size (B, P, 3, S, S) and predicted IoUs (B, P, 3), one
    foreground point per prompt, 3 masks each (SAM's multimask output)."""
    size = model.config.vision_config.image_size
    out = model(pixel_values=images, input_points=points,
                input_labels=torch.ones(points.shape[:3], dtype=torch.int), multimask_output=True)
    logits = F.interpolate(out.pred_masks.flatten(0, 2)[:, None], size=(size, size), mode="bilinear",
                           align_corners=False)
    return logits.view(*out.pred_masks.shape[:3], size, size), out.iou_scores


def losses(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-of-3 mask loss (BCE + dice) and the IoU head's MSE on all 3 masks. logits (B, P, 3, S, S)."""
    target = target[:, :, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((-1, -2))
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum((-1, -2)) + 1) / (prob.sum((-1, -2)) + target.sum((-1, -2)) + 1)
    mask_loss = (bce + dice).min(dim=2).values.mean()
    hard = (logits > 0).float()
    iou = ((hard * target).sum((-1, -2)) / ((hard + target).clamp(max=1).sum((-1, -2))).clamp(min=1)).detach()
    return mask_loss, F.mse_loss(iou_pred, iou)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for save_pretrained")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--points", type=int, default=8, help="prompts per image")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--num-samples", type=int, default=4000, help="synthetic train scenes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    ds = SyntheticReferringDataset("train", image_size=64, num_samples=args.num_samples, seed=args.seed)
    val = SyntheticReferringDataset("val", image_size=64, num_samples=256, seed=args.seed)
    model = SamModel(tiny_sam_config(width=args.width, depth=args.depth))
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=args.steps)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, points, targets = make_batch(ds, rng.integers(len(ds), size=args.batch), args.points, rng)
        logits, iou_pred = predict(model, images, points)
        mask_loss, iou_loss = losses(logits, iou_pred, targets)
        optim.zero_grad()
        (mask_loss + iou_loss).backward()
        optim.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}: mask loss {mask_loss.item():.4f}  iou loss {iou_loss.item():.4f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    model.eval()
    with torch.no_grad():
        images, points, targets = make_batch(val, np.arange(len(val)), 4, np.random.default_rng(1))
        logits, iou_pred = predict(model, images, points)
        best = iou_pred.argmax(-1)  # the mask SAM itself would pick
        index = best[..., None, None, None].expand(-1, -1, 1, *logits.shape[-2:])
        chosen = logits.gather(2, index)[:, :, 0] > 0
        inter = (chosen & targets.bool()).sum((-1, -2))
        union = (chosen | targets.bool()).sum((-1, -2))
        miou = float((inter / union.clamp(min=1)).mean())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    report = {"val_point_miou": miou, "seconds": time.perf_counter() - start, **vars(args)}
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=2))
    print(f"val mIoU of the top-scored mask per point: {miou:.3f}; saved to {args.out}")


if __name__ == "__main__":
    main()
