"""gIoU / cIoU against hand computation, and exact reduction across shards (as DDP does)."""

from __future__ import annotations

import pytest
import torch

from segrouter.metrics import CIoU, GIoU
from segrouter.model.losses import bce_loss, dice_loss


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    target = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[0, :2, :2] = True  # 4 px
    target[0, :2, :3] = True  # 6 px, I=4, U=6
    pred[1, 0, 0] = True  # I=0, U=1+8=9
    target[1, 2:, :] = True
    # sample 2: both empty -> IoU 1 by convention, contributes nothing to cIoU
    return pred, target


def test_giou_hand_computed() -> None:
    pred, target = _masks()
    m = GIoU()
    m.update(pred, target)
    assert m.compute().item() == pytest.approx((4 / 6 + 0 / 9 + 1.0) / 3)


def test_ciou_hand_computed() -> None:
    pred, target = _masks()
    m = CIoU()
    m.update(pred, target)
    assert m.compute().item() == pytest.approx((4 + 0 + 0) / (6 + 9 + 0))


@pytest.mark.parametrize("metric_cls", [GIoU, CIoU])
def test_sharded_states_reduce_to_the_whole(metric_cls: type) -> None:
    """Two 'ranks' with uneven shards, merged by the same sum reduction DDP applies, equal one pass."""
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(7, 8, 8, generator=g) > 0.5
    target = torch.rand(7, 8, 8, generator=g) > 0.6
    whole = metric_cls()
    whole.update(pred, target)
    a, b = metric_cls(), metric_cls()
    a.update(pred[:2], target[:2])
    b.update(pred[2:], target[2:])
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(whole.compute().item())
    halves = metric_cls()
    halves.update(pred[:2], target[:2])
    halves.update(pred[2:], target[2:])
    mean_of_parts = (metric_cls(), metric_cls())
    mean_of_parts[0].update(pred[:2], target[:2])
    mean_of_parts[1].update(pred[2:], target[2:])
    naive = (mean_of_parts[0].compute() + mean_of_parts[1].compute()) / 2
    assert halves.compute().item() == pytest.approx(whole.compute().item())
    assert naive.item() != pytest.approx(whole.compute().item())  # why states are sums, not means


def test_mask_losses() -> None:
    target = torch.zeros(2, 4, 4)
    target[0, :2] = 1
    perfect = (target * 2 - 1) * 50
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert bce_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    zeros = torch.zeros(2, 4, 4)
    # p = 0.5 everywhere: Dice of sample 0 = (2*4+1)/(8+8+1), of the empty sample 1 = 1/(8+1)
    expected = 1 - ((2 * 4 + 1) / (8 + 8 + 1) + 1 / 9) / 2
    assert dice_loss(zeros, target).item() == pytest.approx(expected)
    assert bce_loss(zeros, target).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
