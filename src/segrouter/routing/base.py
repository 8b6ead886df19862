"""The routing contract and the token bookkeeping every strategy shares.

A routing strategy owns the loop over the LLM's decoder layers and decides, per layer, which tokens take
part in attention and which go through the FFN. To save real compute (not just mask it), tokens that sit
a layer out are physically removed from that layer's tensors: :func:`select` packs the active tokens of
each sample to the front, the layer runs on the packed tensor, and :func:`scatter` writes the results
back. Every token keeps its original position id, so RoPE and the causal order do not change when
tokens are skipped (removing tokens must not shift positions — see GAP/PAYN in docs/methods).

Strategies count the tokens of every layer in a :class:`LayerStats`; inside :func:`recording_tokens` it also
keeps *which* tokens ran each layer's FFN (``segrouter analyze tokens`` asks where the kept image tokens lie).
That record is off by default, so training and evaluation pay nothing for it, and it needs no code in a
strategy: every strategy already hands its per-layer masks to :meth:`LayerStats.record`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from segrouter.llms.base import CausalLLM


class Kind(IntEnum):
    """What each position of the LLM sequence holds."""

    PAD = 0
    TEXT = 1
    IMAGE = 2
    MASK = 3


@dataclass
class TokenSequence:
    """The multimodal LLM input: text, visual and mask tokens in one right-padded batch."""

    embeds: torch.Tensor  # (B, L, D)
    kinds: torch.Tensor  # (B, L) long, Kind values
    positions: torch.Tensor  # (B, L) long position ids (0.. per sample)
    coords: torch.Tensor  # (B, L, 2) image-token centres in [0, 1] (zeros elsewhere)

    @property
    def valid(self) -> torch.Tensor:
        return self.kinds != Kind.PAD

    def is_kind(self, kind: Kind) -> torch.Tensor:
        return self.kinds == kind


_RECORDING_TOKENS: ContextVar[bool] = ContextVar("segrouter_recording_tokens", default=False)
_FILLING_CACHE: ContextVar[Any] = ContextVar("segrouter_filling_cache", default=None)


@contextmanager
def filling_cache(cache: Any) -> Iterator[None]:
    """Inside this block every decoder layer a strategy runs (:func:`run_layer`, :func:`attention_residual`)
    appends the keys and values it computes to ``cache`` (an HF ``Cache``): the prefill of generation
    (:mod:`segrouter.generate`). What each layer's cache holds is what the strategy let that layer's attention
    see — pruned tokens are not in it — so the decode steps attend to exactly the prefill the strategy made.
    Batches of one sample only: the cache keeps no padding mask."""
    token = _FILLING_CACHE.set(cache)
    try:
        yield
    finally:
        _FILLING_CACHE.reset(token)


def cache_kwargs(attention: nn.Module, cache: Any = None) -> dict[str, Any]:
    """The keyword that hands ``cache`` (default: the one :func:`filling_cache` set, if any) to an HF attention
    module or decoder layer: ``cache`` in current transformers, ``past_key_values`` before it."""
    cache = _FILLING_CACHE.get() if cache is None else cache
    if cache is None:
        return {}
    forward = inspect.signature(type(attention).forward).parameters
    return {"cache" if "cache" in forward else "past_key_values": cache}


@contextmanager
def recording_tokens() -> Iterator[None]:
    """Every :class:`LayerStats` made inside this block keeps each layer's FFN mask in ``ffn_masks``."""
    token = _RECORDING_TOKENS.set(True)
    try:
        yield
    finally:
        _RECORDING_TOKENS.reset(token)


@dataclass
class LayerStats:
    """Tokens per sample that entered each layer's attention (as queries) and FFN; inside
    :func:`recording_tokens` also ``ffn_masks``, per layer the (B, L) mask of the tokens that ran its FFN
    (None otherwise). :meth:`record` takes masks over the sequence's positions, in sequence order."""

    attn: list[torch.Tensor] = field(default_factory=list)
    ffn: list[torch.Tensor] = field(default_factory=list)
    ffn_masks: list[torch.Tensor] | None = field(default_factory=lambda: [] if _RECORDING_TOKENS.get() else None)

    def record(self, attn_active: torch.Tensor, ffn_active: torch.Tensor) -> None:
        self.attn.append(attn_active.sum().detach() / attn_active.shape[0])
        self.ffn.append(ffn_active.sum().detach() / ffn_active.shape[0])
        if self.ffn_masks is not None:
            self.ffn_masks.append(ffn_active.detach())

    def as_lists(self) -> dict[str, list[float]]:
        return {"attn_tokens": [float(t) for t in self.attn], "ffn_tokens": [float(t) for t in self.ffn]}


class RoutingStrategy(nn.Module):
    """Runs the LLM's decoder layers over a :class:`TokenSequence`.

    Subclasses implement :meth:`forward`, returning the final-norm hidden states for *every* position
    (a token that skipped layers carries the state it last had). :meth:`setup` is called once with the
    LLM, so strategies can create per-layer parameters of the right width.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats = LayerStats()

    def setup(self, llm: CausalLLM) -> None:
        """Create parameters that depend on the LLM shape (none by default)."""

    def forward(self, llm: CausalLLM, seq: TokenSequence) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode_layers(self, num_layers: int, kind: Kind, after_mask: bool) -> range:
        """The layers a token generated after the prefill runs (:mod:`segrouter.generate`): every layer, over the
        keys and values the prefill left in each layer's cache. A strategy whose teacher-forced forward keeps a
        kind of token out of some layers says so here (token routing's late ``[SEG]``)."""
        return range(num_layers)

    def initial_state(self) -> str:
        """What this strategy computes while its own parameters keep their initialisation, as when it is applied
        to a checkpoint trained without them (``segrouter test --training-free``); asked only when it has some."""
        return ""


class SeededStrategy(RoutingStrategy):
    """A strategy that draws random numbers (random token dropping, token routing's random-assignment control).

    Training draws from torch's global generator (seeded by the recipe's ``seed``), so every step sees new
    draws. Evaluation draws from a generator of its own, reset to ``seed`` each time the strategy enters eval
    mode: every evaluation pass over the same (unshuffled) batches draws the same numbers batch by batch, so
    a validate/test result reproduces.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.eval_generator = torch.Generator().manual_seed(seed)

    def train(self, mode: bool = True) -> SeededStrategy:
        if not mode:
            self.eval_generator.manual_seed(self.seed)
        return super().train(mode)

    def rand(self, *shape: int, device: torch.device) -> torch.Tensor:
        """Uniform [0, 1) numbers: the global generator while training, the evaluation generator otherwise."""
        if self.training:
            return torch.rand(shape, device=device)
        return torch.rand(shape, generator=self.eval_generator).to(device)


def resolve_layer(spec: int | float, num_layers: int, *, rounding: Literal["floor", "nearest"] = "floor") -> int:
    """The layer index a recipe value names: an int is the index itself, a float the fraction ``spec`` of the
    depth, ``spec · num_layers`` rounded down (``"floor"``: the first layer at or past that fraction) or half
    up to the nearest layer (``"nearest"``). Range checks stay with the caller, which knows what the index means.

    Token routing floors its ``insert_layer`` / ``route_start``; PyramidDrop rounds its stage boundaries to the
    nearest layer (its default 0.25/0.5/0.75 is the paper's 8/16/24 of 32). The two agree unless the product
    has a fractional part of at least one half (0.25 of 22 layers: 5 floored, 6 nearest); each method keeps
    the rounding its measured results were made with (tests/test_routing_layers.py pins both)."""
    if isinstance(spec, float):
        scaled = spec * num_layers
        return math.floor(scaled + 0.5) if rounding == "nearest" else math.floor(scaled)
    return int(spec)


def up_to_first_mask(kinds: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the non-padding tokens up to and including each sample's first MASK token (all of them
    when there is none). A rule that ranks tokens by the attention of these queries cannot let anything after
    the mask token (a teacher-forced answer naming the target) change the mask token's state."""
    is_mask = kinds == Kind.MASK
    after = (is_mask.int().cumsum(dim=1) - is_mask.int()) > 0
    return (kinds != Kind.PAD) & ~after


def attention_bias(
    q_pos: torch.Tensor, q_valid: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Additive causal mask (B, 1, Lq, Lk) by position ids, so any token subset keeps causal order.

    Padding queries may look at every key: their output is discarded, and this avoids all-masked rows
    (NaN softmax).
    """
    allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    allowed = allowed | ~q_valid[:, :, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


def select(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, M) of the active tokens packed to the front in original order, and their validity."""
    counts = active.sum(dim=1)
    m = int(counts.max()) if active.numel() else 0
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :m]
    ok = torch.arange(m, device=active.device)[None, :] < counts[:, None]
    return order, ok


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, m]] for (B, L, ...) tensors."""
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx[..., None].expand(*idx.shape, *x.shape[2:]))


def scatter(x: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """Write ``values`` back to positions ``idx`` of ``x`` where ``ok`` (out of place, autograd-safe); ``ok`` None:
    every slot is valid (a pack without padding), which saves re-reading ``x`` at ``idx``."""
    if ok is not None:
        values = torch.where(ok[..., None], values, gather(x, idx))
    return x.scatter(1, idx[..., None].expand_as(values), values)


def last_instruction_token(kinds: torch.Tensor) -> torch.Tensor:
    """One-hot (B, L): the last TEXT token before the first MASK token (the last TEXT token if none)."""
    length = kinds.shape[1]
    ar = torch.arange(length, device=kinds.device)
    is_mask = kinds == Kind.MASK
    first_mask = torch.where(is_mask.any(dim=1), is_mask.int().argmax(dim=1), length)
    candidates = (kinds == Kind.TEXT) & (ar[None] < first_mask[:, None])
    last = torch.where(candidates, ar[None], -1).amax(dim=1)
    return ar[None] == last[:, None]


def top_image_tokens(scores: torch.Tensor, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mask (B, L) of the ``keep[b]`` highest-scoring ``image`` tokens of each sample (ties: earlier first)."""
    ranked = scores.detach().masked_fill(~image, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order,
                                            torch.arange(order.shape[1], device=order.device).expand_as(order))
    return image & (rank < keep[:, None])


def run_dense(llm: CausalLLM, seq: TokenSequence, k: int, stats: LayerStats
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Layers ``[0, k)`` on every valid token: the dense layers before a pruning strategy acts. Returns the
    stream (not normed), the input of layer ``k - 1`` (what a ranking by that layer's attention recomputes
    from) and the sequence's rotary ``(cos, sin)``."""
    pos, valid = seq.positions, seq.valid
    pe = llm.rotary(seq.embeds, pos)
    h = layer_input = seq.embeds
    bias = attention_bias(pos, valid, pos, valid, h.dtype)
    for layer in llm.layers[:k]:
        layer_input = h
        stats.record(valid, valid)
        h = run_layer(llm, layer, h, bias, pe, pos)
    return h, layer_input, pe


def run_pruned(llm: CausalLLM, seq: TokenSequence, k: int, h: torch.Tensor,
               pe: tuple[torch.Tensor, torch.Tensor], scores: torch.Tensor, keep: torch.Tensor,
               stats: LayerStats) -> torch.Tensor:
    """Layers ``[k, n)`` on the text and mask tokens and each sample's ``keep[b]`` highest-``scores`` image
    tokens, packed (so they really cost less) with their original positions and RoPE: the pack-run-scatter of
    :func:`select`, :func:`gather`, :func:`attention_bias`, :func:`run_layer` and :func:`scatter`. A dropped
    token keeps its state in ``h``. Returns the final-norm hidden states of every position."""
    image = seq.is_kind(Kind.IMAGE)
    active = seq.valid & (~image | top_image_tokens(scores, image, keep))
    idx, ok = select(active)
    hp, pp = gather(h, idx), gather(seq.positions, idx)
    pe = (gather(pe[0], idx), gather(pe[1], idx))
    bias = attention_bias(pp, ok, pp, ok, h.dtype)
    for layer in llm.layers[k:]:
        stats.record(active, active)
        hp = run_layer(llm, layer, hp, bias, pe, pp)
    return llm.norm(scatter(h, idx, ok, hp))


def run_layer(
    llm: CausalLLM,
    layer: nn.Module,
    hidden: torch.Tensor,
    bias: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    positions: torch.Tensor,
) -> torch.Tensor:
    """One whole decoder layer (attention + FFN), with activation checkpointing when the LLM asks."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        return layer(h, attention_mask=bias, position_embeddings=position_embeddings, position_ids=positions,
                     **cache_kwargs(layer))

    if getattr(llm, "gradient_checkpointing", False) and torch.is_grad_enabled():
        return checkpoint(fn, hidden, use_reentrant=False)
    return fn(hidden)


def attention_residual(
    layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """``h + Attn(norm(h))``: the first half of a pre-norm decoder layer."""
    out, _ = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=position_embeddings,
                             attention_mask=bias, **cache_kwargs(layer.self_attn))
    return hidden + out


def ffn_update(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``FFN(norm(h))``: the residual update of the second half of a pre-norm decoder layer."""
    return layer.mlp(layer.post_attention_layernorm(hidden))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the LLaMA/Qwen2 rotate-half convention; x (B, H, L, hd), cos/sin (B, L, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


@torch.no_grad()
def received_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    positions: torch.Tensor,
    valid: torch.Tensor,
    queries: torch.Tensor,
) -> torch.Tensor:
    """Attention each token receives in ``layer`` (B, L): softmax weights from the ``queries`` tokens,
    averaged over heads and over those queries. ``hidden`` is the layer's input.

    Recomputed from the layer's q/k projections because fused kernels (sdpa, flash) never materialise
    the weights; only the query rows asked for are computed, so one query costs one row. Used to rank
    tokens (FastV, PyramidDrop, token routing's attention rule) and by ``segrouter analyze attention``.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    qi, qok = select(queries & valid)
    xq, qpos = gather(x, qi), gather(positions, qi)
    cos, sin = position_embeddings
    b, hd = x.shape[0], attn.head_dim
    q = _rope(attn.q_proj(xq).view(b, xq.shape[1], -1, hd).transpose(1, 2), gather(cos, qi), gather(sin, qi))
    k = _rope(attn.k_proj(x).view(b, x.shape[1], -1, hd).transpose(1, 2), cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    logits = (q @ k.transpose(-1, -2)) * attn.scaling + attention_bias(qpos, qok, positions, valid, q.dtype)
    probs = logits.softmax(dim=-1).mean(dim=1) * qok[..., None]  # (B, M, L); padding query rows zeroed
    return probs.sum(dim=1) / qok.sum(dim=1, keepdim=True).clamp(min=1)
