"""PyramidDrop (Xing et al., arXiv 2410.17247): drop image tokens stage by stage, ranked by attention.

The LLM is cut into stages at the layers ``layers``; at the start of stage ``s`` only the ``keep[s]`` fraction
(of the *original* image-token count) of image tokens stays: those that received the most attention from
the last instruction token in the last layer of the previous stage. Dropped tokens are physically removed
from all later layers and keep the hidden state they had when dropped.

"Last instruction token": the sequence carries no prompt/answer boundary, only token kinds, so it is the
last TEXT token before the first MASK token (with teacher-forced answers, the token right before the mask
token is emitted — the state the mask token conditions on). Without a MASK token it is the last TEXT token.

The ranking helpers (:func:`~segrouter.routing.base.last_instruction_token`,
:func:`~segrouter.routing.base.top_image_tokens`, :func:`~segrouter.routing.base.received_attention`) live in
``routing/base.py``, shared with FastV (``plugins/fastv.py``), Mixture-of-Depths and random dropping.
"""

from __future__ import annotations

from typing import Any

import torch

from segrouter.errors import ParamError
from segrouter.llms.base import CausalLLM
from segrouter.registry import register
from segrouter.routing.base import (
    Kind,
    LayerStats,
    RoutingStrategy,
    TokenSequence,
    attention_bias,
    gather,
    last_instruction_token,
    received_attention,
    resolve_layer,
    run_layer,
    scatter,
    select,
    top_image_tokens,
)


@register("routing", "pdrop")
class PyramidDrop(RoutingStrategy):
    """Stage boundaries ``layers``: an int is a layer index, a float in (0, 1) a fraction of the depth
    (rounded to the nearest layer; the default is the paper's [8, 16, 24] of 32 at any depth). ``keep[s]``
    is the fraction of the original image tokens kept from boundary ``s`` on (the paper's λ = 0.5 per stage)."""

    def __init__(
        self, *, layers: tuple[float, ...] = (0.25, 0.5, 0.75), keep: tuple[float, ...] = (0.5, 0.25, 0.125)
    ) -> None:
        super().__init__()
        self.check_params(layers=layers, keep=keep)
        self.layers, self.keep = tuple(layers), tuple(keep)
        self.boundaries: dict[int, float] = {}

    @staticmethod
    def check_params(**params: Any) -> None:
        """Ranges that need no LLM; the boundaries are checked against the depth in :meth:`setup`."""
        layers, keep = params["layers"], params["keep"]
        if not layers or len(layers) != len(keep):
            raise ParamError(
                f"got {len(layers)} stage boundaries and {len(keep)} keep ratios",
                fix="give one keep ratio per boundary in 'layers'",
            )
        if any(not 0.0 < r <= 1.0 for r in keep) or any(a < b for a, b in zip(keep, keep[1:], strict=False)):
            raise ParamError(
                f"keep ratios {list(keep)} must lie in (0, 1] and never increase",
                param="keep",
                fix="e.g. [0.5, 0.25, 0.125]: a dropped token cannot come back",
            )
        bad = [v for v in layers if not isinstance(v, int) and not 0.0 < v < 1.0]
        if bad:
            raise ParamError(
                f"stage boundary {bad[0]!r} is neither a layer index (int) nor a depth fraction in (0, 1)",
                param="layers",
                fix="write layer indices as ints (e.g. [8, 16, 24]) or fractions (e.g. [0.25, 0.5, 0.75])",
            )

    def setup(self, llm: CausalLLM) -> None:
        n = llm.num_layers
        resolved = [resolve_layer(v, n, rounding="nearest") for v in self.layers]
        if any(b < 1 or b >= n for b in resolved) or any(a >= b for a, b in zip(resolved, resolved[1:], strict=False)):
            raise ParamError(
                f"stage boundaries resolve to layers {resolved} of a {n}-layer LLM",
                param="layers",
                fix=f"use strictly increasing layers in [1, {n - 1}]",
            )
        self.boundaries = dict(zip(resolved, self.keep, strict=True))

    def forward(self, llm: CausalLLM, seq: TokenSequence) -> torch.Tensor:
        h = seq.embeds
        cos, sin = llm.rotary(h, seq.positions)
        n_image = seq.is_kind(Kind.IMAGE).sum(dim=1)
        idx, ok = select(seq.valid)  # packed view: idx maps packed slots to sequence positions
        hp, pos, kinds = gather(h, idx), gather(seq.positions, idx), gather(seq.kinds, idx)
        pe = (gather(cos, idx), gather(sin, idx))
        bias = attention_bias(pos, ok, pos, ok, h.dtype)
        present = seq.valid
        self.stats = LayerStats()
        layer_input = hp  # the previous layer's input, which ranks tokens at a stage boundary
        for i, layer in enumerate(llm.layers):
            if i in self.boundaries:
                scores = received_attention(llm.layers[i - 1], layer_input, pe, pos, ok, last_instruction_token(kinds))
                quota = torch.ceil(n_image * self.boundaries[i]).long()
                image = (kinds == Kind.IMAGE) & ok
                sub, new_ok = select(ok & (~image | top_image_tokens(scores, image, quota)))
                h = scatter(h, idx, ok, hp)  # dropped tokens keep the state they have now
                idx, ok = gather(idx, sub), new_ok
                hp, pos, kinds = gather(hp, sub), gather(pos, sub), gather(kinds, sub)
                pe = (gather(pe[0], sub), gather(pe[1], sub))
                bias = attention_bias(pos, ok, pos, ok, h.dtype)
                present = torch.zeros_like(seq.valid).scatter(1, idx, ok)  # the packed tokens, in sequence order
            layer_input = hp
            self.stats.record(present, present)
            hp = run_layer(llm, layer, hp, bias, pe, pos)
        return llm.norm(scatter(h, idx, ok, hp))
