"""A Perceiver/Q-Former-style resampler: a fixed number of learned queries read the patch features.

``num_queries`` learned query vectors cross-attend to the projected patch features (plus a learned
position embedding of the patch grid, so queries can specialise by place) through ``depth`` pre-norm
blocks of cross-attention and MLP. There is no self-attention among the queries (Q-Former has it; it adds
cost and no spatial information). Each output token's ``coords`` is the centre of mass of its last
cross-attention map (mean over heads) over the patch centres: the place the token summarises. A query
that attends everywhere lands near the image centre, which is the honest answer for a global token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segrouter.compressors.base import Compressor, ImageContext, VisualTokens
from segrouter.errors import ParamError
from segrouter.geometry import grid_coords
from segrouter.registry import register


class _CrossBlock(nn.Module):
    """queries += CrossAttn(LN(queries), LN(patches)); queries += MLP(LN(queries))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.norm_kv(patches)
        out, weights = self.attn(self.norm_q(queries), kv, kv, need_weights=True, average_attn_weights=True)
        queries = queries + out
        return queries + self.mlp(self.norm_mlp(queries)), weights


@register("compressor", "resampler")
class Resampler(Compressor):
    """``num_queries`` visual tokens whatever the grid size, read by ``depth`` cross-attention blocks."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid_size: tuple[int, int],
        /,
        *,
        num_queries: int = 16,
        depth: int = 2,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        self.check_params(num_queries=num_queries, depth=depth)
        if out_dim % num_heads:
            raise ParamError(
                f"the LLM width {out_dim} is not divisible by num_heads={num_heads}",
                param="num_heads",
                fix="pick num_heads dividing the LLM hidden size",
            )
        h, w = grid_size
        self.input = nn.Linear(in_dim, out_dim)
        self.pos = nn.Parameter(torch.randn(h * w, out_dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.blocks = nn.ModuleList(_CrossBlock(out_dim, num_heads) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(out_dim), nn.Linear(out_dim, out_dim))
        self.register_buffer("centres", grid_coords(h, w), persistent=False)

    @staticmethod
    def check_params(**p: Any) -> None:
        """Ranges checked at recipe validation; ``num_heads`` must divide the LLM width, checked at build."""
        if p["num_queries"] < 1 or p["depth"] < 1:
            raise ParamError(
                f"num_queries={p['num_queries']} and depth={p['depth']} must both be >= 1",
            )

    def forward(self, features: torch.Tensor, images: torch.Tensor,
                context: ImageContext | None = None) -> VisualTokens:
        patches = self.input(features.flatten(2).transpose(1, 2)) + self.pos
        queries = self.queries.expand(patches.shape[0], -1, -1)
        for block in self.blocks:
            queries, weights = block(queries, patches)
        coords = weights.detach() @ self.centres  # where each query looked; metadata, not a learning signal
        tokens = self.out(queries)
        return VisualTokens(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device), coords)
