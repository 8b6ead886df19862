"""Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023) as a compressor.

The patches are projected by LLaVA's MLP, then ``steps`` rounds of ToMe's bipartite soft matching each
merge ``r`` tokens: tokens alternate into sets A and B, every A token finds its most similar B token
(cosine similarity), and the ``r`` A tokens with the best matches are averaged into their partners. Merges
are size-weighted averages (a token standing for 3 patches weighs 3), and so are the ``coords``. Unlike ToMe
in a ViT, similarity uses the projected tokens themselves (there are no attention keys here) and the LLM gets
no proportional-attention correction. The output keeps raster order of each group's first patch, so the
LLM's position ids still run top-left to bottom-right. ``(h·w) − r·steps`` tokens come out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segrouter.compressors.base import Compressor, ImageContext, VisualTokens
from segrouter.compressors.mlp import MLPProjector
from segrouter.errors import ParamError
from segrouter.registry import register


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def bipartite_merge(
    x: torch.Tensor, size: torch.Tensor, coords: torch.Tensor, first: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step on (B, N, ·) tokens: merge the ``r`` best-matched A tokens into B; N → N − r.

    ``size`` (B, N, 1) counts the patches behind each token; ``first`` (B, N, 1) is its first patch index.
    """
    with torch.no_grad():
        sim = F.normalize(x[:, ::2], dim=-1) @ F.normalize(x[:, 1::2], dim=-1).transpose(1, 2)
        best, partner = sim.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src, stay = order[:, :r], order[:, r:]
        dst = partner.gather(1, src)

    def combine(t: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        a, b = t[:, ::2], t[:, 1::2]
        b = b.scatter_reduce(1, dst[..., None].expand(-1, -1, t.shape[-1]), _take(a, src), reduce=reduce)
        return torch.cat([_take(a, stay), b], dim=1)

    new_size = combine(size)
    return combine(x * size) / new_size, new_size, combine(coords * size) / new_size, combine(first, "amin")


@register("compressor", "tome")
class ToMeProjector(Compressor):
    """MLP projector then ``steps`` ToMe merges of ``r`` tokens each (each step merges at most half)."""

    def __init__(
        self, in_dim: int, out_dim: int, grid_size: tuple[int, int], /, *, r: int = 8, steps: int = 6, depth: int = 2
    ) -> None:
        super().__init__()
        n = grid_size[0] * grid_size[1]
        for step in range(steps):
            if not 1 <= r <= n // 2:
                raise ParamError(
                    f"r={r} at step {step + 1} of {steps}: {n} tokens remain and one step merges 1 to {n // 2}",
                    param="r",
                    fix=f"lower r or steps (the {grid_size[0]}×{grid_size[1]} grid has "
                        f"{grid_size[0] * grid_size[1]} tokens)",
                )
            n -= r
        self.r, self.steps = r, steps
        self.project = MLPProjector(in_dim, out_dim, grid_size, depth=depth)

    def forward(self, features: torch.Tensor, images: torch.Tensor,
                context: ImageContext | None = None) -> VisualTokens:
        tokens = self.project(features, images)
        x, coords = tokens.embeds, tokens.coords
        size = x.new_ones(*x.shape[:2], 1)
        first = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)[..., None]
        for _ in range(self.steps):
            x, size, coords, first = bipartite_merge(x, size, coords, first, self.r)
        order = first[..., 0].argsort(dim=1)
        x, coords = _take(x, order), _take(coords, order)
        return VisualTokens(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), coords)
