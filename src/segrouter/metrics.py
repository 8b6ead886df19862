"""Referring-segmentation metrics as torchmetrics ``Metric``s, so DDP reduction is exact.

Both follow LISA's evaluation: a prediction is ``logit > 0``; per mask, I and U count foreground pixels.
gIoU is the mean of per-mask IoU (a mask whose union is empty — nothing predicted, nothing there — counts
as IoU 1). cIoU is the cumulative intersection over the cumulative union of the whole split, so large
objects weigh more. States are sums, reduced with ``sum`` across processes, then divided once.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def intersection_union(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample foreground intersection and union of boolean masks (B, H, W)."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (pred & target).sum(dim=1).to(torch.float64)
    union = (pred | target).sum(dim=1).to(torch.float64)
    return inter, union


class GIoU(Metric):
    """Mean of per-sample IoU."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        inter, union = intersection_union(pred, target)
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
        self.iou_sum += iou.sum()
        self.count += iou.numel()

    def compute(self) -> torch.Tensor:
        return (self.iou_sum / self.count.clamp_min(1)).float()


class CIoU(Metric):
    """Cumulative intersection over cumulative union."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("inter", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("union", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        inter, union = intersection_union(pred, target)
        self.inter += inter.sum()
        self.union += union.sum()

    def compute(self) -> torch.Tensor:
        return (self.inter / self.union.clamp_min(1)).float()
