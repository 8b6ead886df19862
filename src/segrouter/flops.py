"""FLOP counting with ``torch.utils.flop_counter`` (matmuls, convolutions and attention kernels)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn`` once under a FLOP counter; return its result and the FLOPs it executed.

    Counts what actually ran, so tokens a routing strategy removed from a layer are not counted — a
    strategy that only masks tokens shows no saving, as it should.
    """
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())
