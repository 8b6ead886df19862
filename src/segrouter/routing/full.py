"""Every token through every layer: the unrouted reference (numerically the stock HF forward)."""

from __future__ import annotations

import torch

from segrouter.llms.base import CausalLLM
from segrouter.registry import register
from segrouter.routing.base import LayerStats, RoutingStrategy, TokenSequence, attention_bias, run_layer


@register("routing", "full")
class FullRouting(RoutingStrategy):
    """The baseline all routing strategies are compared against."""

    def forward(self, llm: CausalLLM, seq: TokenSequence) -> torch.Tensor:
        h, pos, valid = seq.embeds, seq.positions, seq.valid
        bias = attention_bias(pos, valid, pos, valid, h.dtype)
        pe = llm.rotary(h, pos)
        self.stats = LayerStats()
        for layer in llm.layers:
            self.stats.record(valid, valid)
            h = run_layer(llm, layer, h, bias, pe, pos)
        return llm.norm(h)
