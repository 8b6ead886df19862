"""Image-plane geometry that several kinds share: token centres as (y, x) in [0, 1] image coordinates.

Compressors place their visual tokens on the image with it (``VisualTokens.coords``), and ``bench`` builds
synthetic sequences whose image tokens sit where a patch grid's would, so routing strategies that read
coordinates see the same layout; neither kind imports the other's files for it.
"""

from __future__ import annotations

import torch


def grid_coords(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h*w, 2) cell centres of an h×w grid in [0, 1], row-major like the flattened patch tokens."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
