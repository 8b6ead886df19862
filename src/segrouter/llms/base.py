"""The contract every LLM meets.

The model never calls the LLM's own ``forward``: a routing strategy runs the decoder layers itself, so it
can decide which tokens each layer computes. An LLM therefore exposes its parts: the token embedding, the
list of decoder layers (each with ``input_layernorm``, ``self_attn``, ``post_attention_layernorm`` and
``mlp``, as in the LLaMA/Qwen2/Mistral families), the final norm, the LM head and the rotary embedding.
"""

from __future__ import annotations

import torch
from torch import nn


class CausalLLM(nn.Module):
    hidden_size: int
    num_layers: int
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for the given per-token positions (B, L)."""
        raise NotImplementedError  # pragma: no cover - interface
