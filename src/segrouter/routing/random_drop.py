"""Random token dropping: FastV's schedule with a random ranking, the control every ranking rule must beat.

Recent pruning benchmarks find random pruning a strong baseline, so a ranking rule (FastV's attention,
PyramidDrop's, MoD's learned router) only earns its cost if it beats keeping a random subset of the same
size. The first ``k`` layers see every token; from layer ``k`` on only ``ceil(keep·N)`` of each sample's
``N`` image tokens, drawn uniformly at random, take part (physically removed, as in FastV, so the FLOPs
drop; ``keep = 1 − ratio`` of FastV's gives FastV's count, without its ranking work). A dropped token keeps
the hidden state it had after layer ``k`` (its input embedding when ``k = 0``).

Draws: new ones each training step; at evaluation a generator reset to ``seed`` whenever the model enters
eval mode (:class:`~segrouter.routing.base.SeededStrategy`), so the same checkpoint evaluates the same.
"""

from __future__ import annotations

from typing import Any

import torch

from segrouter.errors import ParamError
from segrouter.llms.base import CausalLLM
from segrouter.registry import register
from segrouter.routing.base import Kind, LayerStats, SeededStrategy, TokenSequence, run_dense, run_pruned


@register("routing", "random")
class RandomDrop(SeededStrategy):
    """After layer ``k`` (0 <= k < number of LLM layers) keep a random ``keep`` fraction of the image tokens."""

    def __init__(self, *, k: int = 2, keep: float = 0.5, seed: int = 0) -> None:
        super().__init__(seed)
        self.check_params(k=k, keep=keep)
        self.k, self.keep = k, keep

    @staticmethod
    def check_params(**params: Any) -> None:
        """Ranges that need no LLM; ``k`` is checked against the depth in :meth:`setup`."""
        if not 0.0 < params["keep"] <= 1.0:
            raise ParamError(f"keep {params['keep']} is outside (0, 1]", param="keep",
                             fix="set the fraction of image tokens kept, e.g. 0.5")
        if params["k"] < 0:
            raise ParamError(f"k={params['k']} must be >= 0 (the number of layers that see every token)",
                             param="k")

    def setup(self, llm: CausalLLM) -> None:
        if self.k >= llm.num_layers:
            raise ParamError(f"k={self.k} leaves no layer to prune in a {llm.num_layers}-layer LLM",
                             param="k", fix=f"use 0 <= k <= {llm.num_layers - 1}")

    def forward(self, llm: CausalLLM, seq: TokenSequence) -> torch.Tensor:
        self.stats = LayerStats()
        h, _, pe = run_dense(llm, seq, self.k, self.stats)
        quota = torch.ceil(seq.is_kind(Kind.IMAGE).sum(dim=1) * self.keep).long()
        return run_pruned(llm, seq, self.k, h, pe, self.rand(*seq.kinds.shape, device=h.device), quota, self.stats)
