"""FLOP counting with ``torch.utils.flop_counter`` (matmuls, convolutions and attention kernels).

:func:`count_flops` counts a run on real tensors. :func:`count_meta_flops` counts a run whose weights and
hidden states live on the ``meta`` device (shapes, no storage), so a 7B or 70B shape is counted at full
depth in seconds and without memory. Routing strategies are not shape-only programs, though: they compute
indices from token kinds and positions (kept as real CPU tensors) and rank tokens by scores computed from
the hidden states (meta, so without values). :class:`MetaValues` runs such a mixed program: the large
tensors stay on meta, and an op that turns meta values into something the program reads (indices, masks, a
Python number, a per-token score mixed with known values) runs on the CPU with the meta inputs filled in
(zeros, or seeded noise). A top-k of a fixed size then selects *some* tokens instead of the ones real
weights would pick — the same count, so the same FLOPs. A rule whose *count* depends on the values (a
threshold on a score) would not give the same FLOPs for two fills: :func:`count_meta_flops` counts with two
and refuses when they disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from segrouter.errors import SegrouterError

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


META = torch.device("meta")


def _on_meta(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _to_meta(x: Any) -> Any:
    """A real tensor moved to meta; CPU scalars (0-dim) mix with meta tensors as they are."""
    return x.to(META) if isinstance(x, torch.Tensor) and not _on_meta(x) and x.dim() > 0 else x


def _storage(t: torch.Tensor) -> int:
    """Elements a tensor really holds: an ``expand``-ed index (stride 0) counts once, not per broadcast copy."""
    return 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True) if n > 0) if t.numel() else 0


class MetaValues(TorchDispatchMode):
    """Runs a program mixing meta tensors (weights, hidden states) with real CPU tensors (token bookkeeping).

    For an op with a meta input: a result the program can read — an integer or boolean tensor, a Python
    number (``.item()``), or a floating tensor no larger than a real CPU input it mixes in (a per-token score
    combined with a token mask) — is computed on the CPU from the meta inputs filled in with ``fill``;
    anything else (the hidden stream, a gather of it by real indices) stays on meta, and so does every
    weight it meets.
    """

    def __init__(self, fill: Literal["zeros", "noise"] = "zeros") -> None:
        super().__init__()
        self.fill = fill
        self._generator = torch.Generator().manual_seed(0)

    def _real(self, x: Any) -> Any:
        if not _on_meta(x):
            return x
        if self.fill == "noise" and x.dtype.is_floating_point:
            return torch.randn(x.shape, generator=self._generator).to(x.dtype)
        return torch.zeros(x.shape, dtype=x.dtype)

    def _on_cpu(self, func: Any, args: tuple, kwargs: dict) -> Any:
        return func(*tree_map(self._real, args), **tree_map(self._real, kwargs))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        if not any(_on_meta(t) for t in tensors):
            return func(*args, **kwargs)
        known = [_storage(t) for t in tensors if not _on_meta(t) and t.dim() > 0]
        writes_real = func._schema.is_mutable and isinstance(args[0], torch.Tensor) and not _on_meta(args[0])
        if func is torch.ops.aten._local_scalar_dense.default or writes_real:
            return self._on_cpu(func, args, kwargs)  # a value read, or a real tensor written in place
        try:
            out = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
        except (NotImplementedError, RuntimeError):  # a data-dependent shape (nonzero, unique) has no meta kernel
            return self._on_cpu(func, args, kwargs)
        outs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        readable = any(not x.dtype.is_floating_point for x in outs)
        if readable or (known and max(map(_storage, outs), default=0) <= max(known)):
            return self._on_cpu(func, args, kwargs)
        return out


_REAL = "count it on real tensors: bench without --flops-only (--num-layers N for a depth that fits memory)"


def count_meta_flops(fn: Callable[[], Any], what: str) -> int:
    """FLOPs of ``fn`` run under :class:`MetaValues` (see the module docstring), counted with two fills of the
    meta values; ``what`` names the program in the one-line error raised when it cannot be counted this way."""
    counts = []
    for fill in ("zeros", "noise"):
        try:
            with MetaValues(fill), FlopCounterMode(display=False) as counter:  # the counter sees each op once
                fn()
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SegrouterError(f"{what} cannot be counted on meta tensors ({type(exc).__name__}: {reason})",
                                 fix=_REAL) from exc
        counts.append(int(counter.get_total_flops()))
    if counts[0] != counts[1]:
        raise SegrouterError(f"{what} cannot be counted on meta tensors: its FLOPs depend on values computed from the "
                             f"weights ({counts[0]} and {counts[1]} for two fills)", fix=_REAL)
    return counts[0]
