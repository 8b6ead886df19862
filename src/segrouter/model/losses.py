"""LISA's mask losses: per-pixel BCE and Dice, each averaged over masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel BCE averaged within each mask, then over masks (B, H, W)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice per mask, averaged. ``eps`` smooths empty masks (both empty → loss 0)."""
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()
