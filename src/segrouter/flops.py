"""FLOP counting with ``torch.utils.flop_counter`` (matmuls, convolutions and attention kernels)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

T = TypeVar("T")
_aten = torch.ops.aten


# torch ships formulas for the CUDA attention kernels only; without these, SDPA on CPU counts as 0 FLOPs
# and every routing saving outside the attention would look larger than it is.
@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_sdpa_backward_flop(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                            out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn`` once under a FLOP counter; return its result and the FLOPs it executed.

    Counts what actually ran, so tokens a routing strategy removed from a layer are not counted — a
    strategy that only masks tokens shows no saving, as it should.
    """
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())
