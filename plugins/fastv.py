"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): the worked example of a routing plugin (docs/plugins.md).

segrouter imports every ``*.py`` in ``plugins/`` at start-up; ``@register`` makes ``fastv`` a recipe name. The first
``k`` layers (counted from 1, as in the paper) see every token; then the ``ratio`` of image tokens that received the
least attention in layer ``k`` leave all later layers, physically, keeping their layer-``k`` state. ``rank_by``: the
attention of every query up to the mask token (``all``, the paper's) or of the last text token before it (FastV's).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from segrouter.errors import ParamError
from segrouter.llms.base import CausalLLM
from segrouter.registry import register
from segrouter.routing.base import (
    Kind,
    LayerStats,
    RoutingStrategy,
    TokenSequence,
    last_instruction_token,
    received_attention,
    run_dense,
    run_pruned,
    up_to_first_mask,
)


@register("routing", "fastv")
class FastV(RoutingStrategy):
    """Drop the ``ratio`` least-attended image tokens after layer ``k`` (1 <= k < number of LLM layers)."""

    def __init__(self, *, k: int = 2, ratio: float = 0.5, rank_by: Literal["all", "last_instruction"] = "all") -> None:
        super().__init__()
        self.check_params(k=k, ratio=ratio)
        self.k, self.ratio, self.rank_by = k, ratio, rank_by

    @staticmethod  # the registry calls it when a recipe is validated, before any model is built
    def check_params(**params: Any) -> None:
        if not 0.0 <= params["ratio"] < 1.0:
            raise ParamError(f"ratio {params['ratio']} is outside [0, 1)", param="ratio",
                             fix="set the fraction of image tokens to drop, e.g. 0.5")
        if params["k"] < 1:
            raise ParamError(f"k={params['k']}: FastV ranks tokens by the attention of layer k, which must be >= 1",
                             param="k")

    def setup(self, llm: CausalLLM) -> None:  # called once the LLM is built: checks against its depth go here
        if self.k >= llm.num_layers:
            raise ParamError(f"k={self.k} leaves no layer to prune in a {llm.num_layers}-layer LLM", param="k",
                             fix=f"use 1 <= k <= {llm.num_layers - 1}")

    def forward(self, llm: CausalLLM, seq: TokenSequence) -> torch.Tensor:
        self.stats = LayerStats()
        h, layer_input, pe = run_dense(llm, seq, self.k, self.stats)
        queries = up_to_first_mask(seq.kinds) if self.rank_by == "all" else last_instruction_token(seq.kinds)
        scores = received_attention(llm.layers[self.k - 1], layer_input, pe, seq.positions, seq.valid, queries)
        n_image = seq.is_kind(Kind.IMAGE).sum(dim=1)
        return run_pruned(llm, seq, self.k, h, pe, scores, n_image - (n_image * self.ratio).long(), self.stats)
