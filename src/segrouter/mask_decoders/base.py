"""The contract every mask decoder meets."""

from __future__ import annotations

import torch
from torch import nn


class MaskDecoder(nn.Module):
    """Reads the full-resolution vision features (never the compressed LLM tokens, so compression cannot
    cost mask detail) and the projected mask-token states, and returns low-resolution mask logits.

    Context arguments: ``vision_dim`` (feature channels) and ``grid_size``. ``prompt_dim`` is the width the
    model projects the mask-token hidden states to.
    """

    prompt_dim: int

    def forward(self, features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """features (B, C, h, w), prompts (B, K, prompt_dim) → logits (B, H', W')."""
        raise NotImplementedError
