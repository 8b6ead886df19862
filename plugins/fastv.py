"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764).

The worked example of a routing plugin (walkthrough: docs/plugins.md). segrouter imports every ``*.py`` in
the repository's ``plugins/`` folder at start-up; the ``@register`` decorator below is all it takes to make
``fastv`` usable from a recipe (``model.routing: {name: fastv, k: 2, ratio: 0.5}``) and visible in
``segrouter list routing``. It imports only public segrouter API.

The method: the first ``k`` layers see every token. The attention each image token received in layer ``k``
(counted from 1 as in the paper, so ``k = 2`` means "after layer 2") ranks the image tokens, and the
fraction ``ratio`` that received the least is removed from all later layers — physically, so the FLOPs drop.
A removed token keeps its hidden state from layer ``k`` in the output. Position ids are kept, so RoPE and
causal order are unchanged for the survivors.

``rank_by`` picks whose attention counts: ``"all"`` averages over every query token up to the mask token
(the paper's description of the prefill; tokens after the mask token — a teacher-forced answer — must not
choose what the mask token sees; the causal mask lets later image tokens be seen by fewer queries), ``"last_instruction"``
uses one query, the last text token before the mask token (FastV's released code ranks by the last token's
attention; cheaper, one attention row instead of L).
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
    run_all,
    run_kept,
    top_image_tokens,
    up_to_first_mask,
)


@register("routing", "fastv")
class FastV(RoutingStrategy):
    """Drop the ``ratio`` least-attended image tokens after layer ``k`` (1 <= k < number of LLM layers)."""

    def __init__(self, *, k: int = 2, ratio: float = 0.5, rank_by: Literal["all", "last_instruction"] = "all") -> None:
        super().__init__()
        self.check_params(k=k, ratio=ratio)
        self.k, self.ratio, self.rank_by = k, ratio, rank_by

    @staticmethod
    def check_params(**params: Any) -> None:
        """Called by the registry when a recipe is validated (before any model is built), and by __init__."""
        k, ratio = params["k"], params["ratio"]
        if not 0.0 <= ratio < 1.0:
            raise ParamError(
                f"ratio {ratio} is outside [0, 1)",
                param="ratio",
                fix="set the fraction of image tokens to drop, e.g. 0.5",
            )
        if k < 1:
            raise ParamError(
                f"k={k}: FastV ranks tokens by the attention of layer k, which must be >= 1",
                param="k",
            )

    def setup(self, llm: CausalLLM) -> None:
        """Check ``k`` against the depth, which is only known once the LLM is built."""
        if self.k >= llm.num_layers:
            raise ParamError(
                f"k={self.k} leaves no layer to prune in a {llm.num_layers}-layer LLM",
                param="k",
                fix=f"use 1 <= k <= {llm.num_layers - 1}",
            )

    def forward(self, llm: CausalLLM, seq: TokenSequence) -> torch.Tensor:
        pos, valid = seq.positions, seq.valid
        cos, sin = llm.rotary(seq.embeds, pos)
        self.stats = LayerStats()
        h, layer_input = run_all(llm, llm.layers[: self.k], seq.embeds, pos, valid, (cos, sin), self.stats)

        queries = up_to_first_mask(seq.kinds) if self.rank_by == "all" else last_instruction_token(seq.kinds)
        scores = received_attention(llm.layers[self.k - 1], layer_input, (cos, sin), pos, valid, queries)
        image = seq.is_kind(Kind.IMAGE)
        n_image = image.sum(dim=1)
        kept = top_image_tokens(scores, image, n_image - (n_image * self.ratio).long())
        active = valid & (~image | kept)
        # the survivors, packed, run the later layers; dropped tokens keep their layer-k state
        return llm.norm(run_kept(llm, llm.layers[self.k :], h, pos, (cos, sin), active, self.stats))
