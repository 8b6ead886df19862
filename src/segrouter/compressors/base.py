"""The contract every compressor meets, the token container it returns, what it may read besides the vision
features (:class:`ImageContext`), the projector shape several share (:func:`projection`), and :func:`variant`,
which makes a compressor that only fixes or re-defaults another's parameters a few lines long."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segrouter.errors import SegrouterError


@dataclass
class VisualTokens:
    """Visual tokens for the LLM, possibly a different count per sample.

    ``coords`` holds each token's (y, x) centre in [0, 1] image coordinates: routing strategies use it to
    pick spatially spread proxies whatever the compressor did to the grid.
    """

    embeds: torch.Tensor  # (B, N, D) in the LLM width
    mask: torch.Tensor  # (B, N) bool, True for real tokens
    coords: torch.Tensor  # (B, N, 2)

    @property
    def counts(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


@dataclass(frozen=True)
class ImageContext:
    """What the model knows of a batch's images besides its input pixels, for compressors that partition images.

    ``content_hw`` (B, 2): each input image's (h, w) inside its letterbox padding (None: no padding).
    ``center_crop``: the images are centre crops of the originals (CLIP's preprocessing), not letterboxes. ``sam_*``:
    only for a compressor that :attr:`~Compressor.reads_sam_embedding` — the embedding of the model's SAM mask
    encoder (B, C, e, e), that encoder's input (B, 3, S, S) in [0, 1] and each image's (h, w) inside its padding,
    so that the superpixels reuse the SAM pass the mask decoder needs anyway."""

    content_hw: torch.Tensor | None = None
    center_crop: bool = False
    sam_embedding: torch.Tensor | None = None
    sam_image: torch.Tensor | None = None
    sam_image_hw: torch.Tensor | None = None


class Compressor(nn.Module):
    """Maps vision features (B, C, h, w) (and the images, for region-based methods) to visual tokens.

    Context arguments: ``in_dim`` (vision channels), ``out_dim`` (LLM width), ``grid_size`` (h, w).
    ``reads_sam_embedding``: the compressor wants the model's SAM mask encoder's embedding in its
    :class:`ImageContext` (the model then checks the encoder with :meth:`attach_mask_encoder` at build).
    """

    reads_sam_embedding: bool = False

    def attach_mask_encoder(self, encoder: nn.Module | None) -> None:
        """Check (and keep what it needs of) the model's mask encoder; called at build when
        ``reads_sam_embedding``. Raise a :class:`~segrouter.errors.ParamError` if it cannot serve."""

    def forward(self, features: torch.Tensor, images: torch.Tensor,
                context: ImageContext | None = None) -> VisualTokens:  # pragma: no cover
        raise NotImplementedError


def projection(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """LLaVA-1.5's projector shape: ``depth`` Linear layers with GELU between (``mlp2x_gelu`` for 2)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def variant(base: type[Compressor], *, fixed: Mapping[str, Any], hidden: Iterable[str] = (),
            defaults: Mapping[str, Any] | None = None) -> Callable[..., None]:
    """An ``__init__`` for a subclass of ``base`` that only fixes some recipe parameters (``fixed``: passed with
    these values, not settable), hides others (``hidden``: ``base``'s default) and changes defaults
    (``defaults``) — timm's few-line variants, instead of re-declaring every parameter to pass it on.

    Its signature, which ``segrouter list`` shows and the registry checks recipes against, is ``base``'s
    without the fixed and hidden parameters and with the new defaults; calling it calls ``base.__init__`` with
    every remaining parameter bound (defaults applied) plus the fixed ones."""
    defaults = dict(defaults or {})
    dropped = set(fixed) | set(hidden)
    hints = typing.get_type_hints(base.__init__)
    signature = inspect.signature(base.__init__)
    unknown = (dropped | set(defaults)) - set(signature.parameters)
    if unknown:
        raise SegrouterError(f"variant of {base.__name__}: {sorted(unknown)} are not its parameters",
                             fix="fix, hide or re-default only parameters the base class takes")
    signature = signature.replace(parameters=[
        p.replace(default=defaults.get(p.name, p.default), annotation=hints.get(p.name, p.annotation))
        for p in signature.parameters.values() if p.name not in dropped
    ])

    def __init__(self: Compressor, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        base.__init__(*bound.args, **bound.kwargs, **fixed)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__annotations__ = {k: v for k, v in hints.items() if k not in dropped}
    return __init__
