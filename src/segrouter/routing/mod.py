"""Mixture-of-Depths on image tokens (Raposo et al., arXiv 2404.02258; p-MoD, Zhang et al., arXiv 2412.04449).

In every routed layer a linear router scores the image tokens; the top ``capacity`` fraction of each
sample's image tokens, together with all text and mask tokens, run the layer (attention and FFN) on a packed
sequence; the other image tokens skip it through the residual — they are neither queries nor keys there.

Choices:

* Only image tokens are routed (p-MoD): text and mask tokens carry the instruction and the segmentation
  prompt, and are few.
* p-MoD's tanh-normalised gate ``w = 1 + alpha * tanh(score)`` scales the layer update of each selected
  image token. It is what gives the router a gradient (top-k itself is not differentiable), and with the
  router's weights initialised to zero ``w = 1``: training starts as ``full`` restricted to the kept tokens.
  p-MoD's STRing (also rescaling the skipped tokens) is left out, so a skipped token is exactly unchanged.
* One constant ``capacity`` for all routed layers (MoD) instead of p-MoD's decaying schedule, so the FLOPs
  saving follows from two numbers. ``route_layers="alternate"`` routes every other layer from layer 1 (MoD's
  best setting; layer 0 always sees every token), ``"all"`` every layer, or give explicit layer indices.
* Top-k looks at the whole sequence, as in MoD training; that is exact here because segmentation runs one
  forward pass over the full prompt (no token-by-token decoding that would need MoD's causal predictor).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

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
    run_layer,
    scatter,
    select,
    top_image_tokens,
)


@register("routing", "mod")
class MixtureOfDepths(RoutingStrategy):
    """Learned per-layer top-k routing of image tokens (``capacity`` = fraction of them computed)."""

    def __init__(
        self,
        *,
        capacity: float = 0.5,
        route_layers: Literal["alternate", "all"] | tuple[int, ...] = "alternate",
        alpha: float = 0.2,
    ) -> None:
        super().__init__()
        self.check_params(capacity=capacity, alpha=alpha)
        self.capacity, self.route_layers, self.alpha = capacity, route_layers, alpha
        self.routers = nn.ModuleDict()

    @staticmethod
    def check_params(**params: Any) -> None:
        """Ranges that need no LLM; explicit route_layers are checked against the depth in :meth:`setup`."""
        capacity, alpha = params["capacity"], params["alpha"]
        if not 0.0 < capacity <= 1.0:
            raise ParamError(
                f"capacity {capacity} is outside (0, 1]",
                param="capacity",
                fix="set the fraction of image tokens each routed layer computes, e.g. 0.5",
            )
        if not 0.0 <= alpha <= 1.0:
            raise ParamError(
                f"alpha {alpha} is outside [0, 1]",
                param="alpha",
                fix="keep the gate 1 + alpha*tanh(score) positive: 0 <= alpha <= 1",
            )

    def setup(self, llm: CausalLLM) -> None:
        n = llm.num_layers
        if self.route_layers == "alternate":
            layers = list(range(1, n, 2))
        elif self.route_layers == "all":
            layers = list(range(n))
        else:
            layers = list(self.route_layers)
            if any(not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
                raise ParamError(
                    f"route_layers {layers} are not distinct layers of a {n}-layer LLM",
                    param="route_layers",
                    fix=f"use distinct indices in [0, {n - 1}], 'alternate' or 'all'",
                )
        for i in layers:
            router = nn.Linear(llm.hidden_size, 1)
            nn.init.zeros_(router.weight)
            nn.init.zeros_(router.bias)
            self.routers[str(i)] = router

    def initial_state(self) -> str:
        return ("routers are zero, so every image token scores the same: each routed layer computes the first "
                f"ceil({self.capacity}·N) image tokens in sequence order (ties go to the earlier token), gate 1")

    def forward(self, llm: CausalLLM, seq: TokenSequence) -> torch.Tensor:
        h, pos, valid = seq.embeds, seq.positions, seq.valid
        image = seq.is_kind(Kind.IMAGE)
        quota = torch.ceil(image.sum(dim=1) * self.capacity).long()
        cos, sin = llm.rotary(h, pos)
        bias = attention_bias(pos, valid, pos, valid, h.dtype)
        self.stats = LayerStats()
        for i, layer in enumerate(llm.layers):
            if str(i) not in self.routers:
                self.stats.record(valid, valid)
                h = run_layer(llm, layer, h, bias, (cos, sin), pos)
                continue
            score = self.routers[str(i)](h).squeeze(-1)
            active = valid & (~image | top_image_tokens(score, image, quota))
            idx, ok = select(active)
            hp, pp = gather(h, idx), gather(pos, idx)
            out = run_layer(llm, layer, hp, attention_bias(pp, ok, pp, ok, h.dtype),
                            (gather(cos, idx), gather(sin, idx)), pp)
            # out + (w - 1)(out - hp) = hp + w·update, with w = 1 + alpha·tanh(score) on image tokens, 1 elsewhere
            excess = torch.where(gather(image, idx), self.alpha * torch.tanh(gather(score, idx)), 0.0)
            self.stats.record(active, active)
            h = scatter(h, idx, ok, out + excess[..., None].to(h.dtype) * (out - hp))
        return llm.norm(h)
