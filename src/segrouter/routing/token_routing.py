"""Token routing for MLLM segmentation (AAAI 2026, "Efficient Segmentation with Multimodal Large Language
Model via Token Routing", DOI 10.1609/aaai.v40i13.38032).

The paper's two rules, from its abstract:

* **Late mask-token insertion.** Mask tokens barely attend to image tokens in early layers, so they (and,
  with ``late_text``, the text after the first of them) are absent from layers ``< insert_layer`` and enter
  the sequence there with their input embedding. Causal attention means no earlier token ever sees them,
  so nothing else changes.
* **Proxy image tokens.** In routed layers every token still takes part in attention (image tokens matter
  in all layers for dense prediction), but only a few image tokens — the *proxies* — go through the FFN.
  Every other image token receives its proxies' FFN update (the difference between the proxy's FFN output
  and input, i.e. its residual update), mapped by a lightweight per-layer projector.

Choices the abstract leaves open (see docs/methods/token_routing.md for the reasoning and measurements):

* the projector is ``u ↦ u + W₂·GELU(W₁·u)`` with ``W₂`` zero-initialised: at initialisation a routed token
  gets its proxy's update unchanged (a training-free approximation), and training learns the correction.
  With ``projector_input: delta_token`` the hidden layer also sees the token's own normalised state.
* proxies are picked by ``proxy_rule``: ``grid`` (image tokens nearest a uniform grid over the image, the
  default — it works for any compressor because it uses token coordinates), ``score`` (a learned linear
  score per routed layer on top of the grid prior; the proxies' updates are scaled by
  ``1 + score_alpha·tanh(score)`` so the scorer gets gradient, as in p-MoD) or ``attention`` (the image
  tokens receiving most attention from the text and mask tokens in that layer);
* ``assignment``: ``nearest`` proxy, or ``weighted`` — a softmax over the ``neighbours`` nearest proxies by
  squared distance in units of the proxy spacing.

Two negative controls (off by default), which must do measurably worse if the method works for the reason
the paper gives: ``assignment: random`` (each routed token takes a uniformly random proxy's update of its own
sample, drawn anew per batch; evaluation draws restart from seed 0 on ``eval()``, see
:class:`~segrouter.routing.base.SeededStrategy`) and ``projector: zero`` (routed tokens get no FFN update at
all, only attention's; no projector is built, so the FLOPs drop by the projectors' share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from segrouter.errors import ParamError
from segrouter.llms.base import CausalLLM
from segrouter.registry import register
from segrouter.routing.base import (
    Kind,
    LayerStats,
    SeededStrategy,
    TokenSequence,
    attention_bias,
    attention_residual,
    cache_kwargs,
    ffn_update,
    gather,
    received_attention,
    resolve_layer,
    run_layer,
    scatter,
    select,
    up_to_first_mask,
)


@dataclass
class _Plan:
    """A routed layer's packing: the FFN tokens (``f_idx``), the routed tokens (``r_idx``; None when none is
    routed) and where each routed token's update comes from in the FFN pack: ``source`` (B, R) rows for the
    nearest (or random) proxy, or for ``weighted`` the proxies' rows (B, P) mixed by ``mix`` (B, R, P)."""

    ffn_active: torch.Tensor
    f_idx: torch.Tensor
    f_ok: torch.Tensor
    weight: torch.Tensor | None  # score rule: per-token scale of the FFN update
    f_full: bool = False  # no padding in the FFN pack (every f_ok true): its write-back skips the mask
    attention: tuple | None = None  # routed: layer — (bias, rotary, positions) of the FFN pack, which alone attends
    r_idx: torch.Tensor | None = None
    r_ok: torch.Tensor | None = None
    r_full: bool = False  # no padding in the routed pack
    source: torch.Tensor | None = None
    mix: torch.Tensor | None = None


class ProxyProjector(nn.Module):
    """Maps the (assigned) proxy update to a routed token's update; identity at initialisation."""

    def __init__(self, dim: int, hidden: int, with_token: bool) -> None:
        super().__init__()
        self.with_token = with_token
        self.up = nn.Linear(dim * (2 if with_token else 1), hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, update: torch.Tensor, token: torch.Tensor | None) -> torch.Tensor:
        x = update if token is None else torch.cat([update, token], dim=-1)
        return update + self.down(self.act(self.up(x)))


def spread_points(count: int, device: torch.device | None = None) -> torch.Tensor:
    """(count, 2) (y, x) points in [0, 1] spread evenly over the image for any count: round(sqrt(count)) rows
    whose lengths differ by at most one, each spread evenly across (a square count is the regular grid)."""
    rows = max(1, round(math.sqrt(count)))
    base, extra = divmod(count, rows)
    points = []
    for r in range(rows):
        n = base + (1 if r * extra // rows != (r + 1) * extra // rows else 0)  # the extra points spread over rows
        points += [((r + 0.5) / rows, (c + 0.5) / n) for c in range(n)]
    return torch.tensor(points, dtype=torch.float32, device=device)


def _layer_index(value: int | float, num_layers: int, name: str) -> int:
    """An absolute layer index from an int, or a fraction of the depth (floored) from a float in [0, 1]."""
    idx = resolve_layer(value, num_layers)
    if not 0 <= idx <= num_layers:
        raise ParamError(
            f"{name}={value} is outside the LLM's {num_layers} layers",
            param=name,
            fix=f"use 0..{num_layers} or a fraction in [0, 1]",
        )
    return idx


@register("routing", "token_routing")
class TokenRouting(SeededStrategy):
    """Late mask-token insertion + proxy FFN routing for image tokens (see module docstring)."""

    def __init__(
        self,
        *,
        insert_layer: int | float = 0.25,
        late_text: bool = True,
        route_layers: list[int] | None = None,
        route_start: int | float = 0.25,
        num_proxies: int | None = None,
        proxy_ratio: float = 0.0625,
        proxy_rule: Literal["grid", "score", "attention"] = "grid",
        assignment: Literal["nearest", "weighted", "random"] = "nearest",
        neighbours: int = 4,
        projector_ratio: float = 0.25,
        projector_input: Literal["delta", "delta_token"] = "delta",
        projector: Literal["mlp", "zero"] = "mlp",
        score_alpha: float = 0.2,
        routed: Literal["ffn", "layer"] = "ffn",
    ) -> None:
        super().__init__(seed=0)
        self.check_params(proxy_ratio=proxy_ratio, num_proxies=num_proxies, neighbours=neighbours, routed=routed,
                          proxy_rule=proxy_rule)
        self.cfg_insert, self.cfg_route_start, self.cfg_route_layers = insert_layer, route_start, route_layers
        self.late_text = late_text
        self.num_proxies, self.proxy_ratio = num_proxies, proxy_ratio
        self.proxy_rule, self.assignment, self.neighbours = proxy_rule, assignment, neighbours
        self.projector_ratio, self.projector_input, self.score_alpha = projector_ratio, projector_input, score_alpha
        self.zero_update = projector == "zero"
        self.whole_layer = routed == "layer"
        self.insert_layer = 0
        self.routed: list[bool] = []
        self.projectors = nn.ModuleDict()
        self.scorers = nn.ModuleDict()

    @staticmethod
    def check_params(**params: Any) -> None:
        """Ranges that need no LLM; layer indices are checked against the depth in :meth:`setup`."""
        if not 0.0 < params["proxy_ratio"] <= 1.0:
            raise ParamError(f"proxy_ratio={params['proxy_ratio']} must be in (0, 1]", param="proxy_ratio")
        if params["num_proxies"] is not None and params["num_proxies"] < 1:
            raise ParamError(f"num_proxies={params['num_proxies']} must be >= 1", param="num_proxies")
        if params["neighbours"] < 1:
            raise ParamError(f"neighbours={params['neighbours']} must be >= 1", param="neighbours")
        if params["routed"] == "layer" and params["proxy_rule"] == "attention":
            raise ParamError("routed: layer takes the routed tokens out of attention, so the attention rule cannot "
                             "rank them", param="proxy_rule", fix="use proxy_rule: grid or score")

    def setup(self, llm: CausalLLM) -> None:
        n = llm.num_layers
        self.insert_layer = _layer_index(self.cfg_insert, n, "insert_layer")
        if self.cfg_route_layers is not None:
            bad = [i for i in self.cfg_route_layers if not 0 <= i < n]
            if bad:
                raise ParamError(f"route_layers {bad} outside 0..{n - 1}", param="route_layers")
            layers = set(self.cfg_route_layers)
        else:
            layers = set(range(_layer_index(self.cfg_route_start, n, "route_start"), n))
        self.routed = [i in layers for i in range(n)]
        d = llm.hidden_size
        hidden = max(8, int(d * self.projector_ratio))
        for i in sorted(layers):
            if not self.zero_update:
                self.projectors[str(i)] = ProxyProjector(d, hidden, self.projector_input == "delta_token")
            if self.proxy_rule == "score":
                self.scorers[str(i)] = nn.Linear(d, 1)
                nn.init.zeros_(self.scorers[str(i)].weight)
                nn.init.zeros_(self.scorers[str(i)].bias)

    def initial_state(self) -> str:
        what = "whole-layer update" if self.whole_layer else "FFN update"
        if self.zero_update:
            routed = f"no projectors (projector: zero): routed image tokens get no {what}"
        else:
            source = {"nearest": "its nearest proxy's", "weighted": "its nearest proxies' weighted",
                      "random": "a random proxy's"}[self.assignment]
            routed = f"the projectors' output layers are zero: each routed image token takes {source} {what} unchanged"
        if self.proxy_rule == "score":
            routed += "; the scorers are zero: the proxies are the grid's, their updates unscaled"
        return routed

    # ------------------------------------------------------------------------------------ proxies
    def _proxy_count(self, n_image: torch.Tensor) -> torch.Tensor:
        if self.num_proxies is None:
            return torch.clamp((n_image.float() * self.proxy_ratio).ceil().long(), min=1).minimum(n_image)
        return torch.full_like(n_image, self.num_proxies).minimum(n_image)

    def _grid_prior(self, seq: TokenSequence, is_image: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: per sample, exactly ``counts[b]`` distinct image tokens spread over the image — for each
        point of :func:`spread_points`, in order, the nearest image token not taken yet (a patch grid and a
        square count give the regular grid; superpixel centres or a non-square count still give that many).

        Samples with the same proxy count (all of them, for a fixed patch grid) are handled in one batch.
        """
        prior = torch.zeros_like(is_image)
        for p in counts.unique().tolist():
            rows = (counts == p).nonzero()[:, 0]
            if p == 0:
                continue
            pts = spread_points(p, device=seq.coords.device)
            d = torch.cdist(pts.expand(len(rows), -1, -1), seq.coords[rows])  # (n, p, L)
            d = d.masked_fill(~is_image[rows, None, :], float("inf"))
            taken = torch.zeros_like(is_image[rows])
            for j in range(p):
                nearest = d[:, j].masked_fill(taken, float("inf")).argmin(dim=-1)
                taken[torch.arange(len(rows), device=taken.device), nearest] = True
            prior[rows] = taken
        return prior

    def _plan(self, seq: TokenSequence, active: torch.Tensor, is_image: torch.Tensor, proxies: torch.Tensor,
              weight: torch.Tensor | None, spacing: torch.Tensor) -> _Plan:
        """Pack the FFN tokens and the routed tokens of a layer, and find each routed token's proxy (or
        proxies) by its place in the FFN pack, so its update is a gather of the proxies' FFN updates."""
        ffn_active = active & ~(is_image & ~proxies)
        f_idx, f_ok = select(ffn_active)
        full = {"f_full": bool(f_ok.all())}
        routed = active & is_image & ~proxies
        if self.zero_update or not bool(routed.any()):  # projector: zero — routed tokens get no update to gather
            return _Plan(ffn_active, f_idx, f_ok, weight, **full)
        r_idx, r_ok = select(routed)
        full["r_full"] = bool(r_ok.all())
        p_idx, p_ok = select(proxies)
        slot = torch.zeros_like(is_image, dtype=torch.long).scatter(
            1, f_idx, torch.arange(f_idx.shape[1], device=f_idx.device).expand_as(f_idx))
        p_slot = gather(slot, p_idx)  # each proxy's row in the FFN pack (proxies always run the FFN)
        if self.assignment == "random":  # control: any proxy of the sample, wherever it lies
            draw = self.rand(*r_idx.shape, p_idx.shape[1], device=r_idx.device).masked_fill(~p_ok[:, None, :], -1.0)
            return _Plan(ffn_active, f_idx, f_ok, weight, r_idx=r_idx, r_ok=r_ok,
                         source=gather(p_slot, draw.argmax(dim=-1)), **full)
        d2 = torch.cdist(gather(seq.coords, r_idx), gather(seq.coords, p_idx)).square()
        d2 = d2.masked_fill(~p_ok[:, None, :], float("inf"))
        if self.assignment == "nearest":
            nearest = gather(p_slot, d2.argmin(dim=-1))
            return _Plan(ffn_active, f_idx, f_ok, weight, r_idx=r_idx, r_ok=r_ok, source=nearest, **full)
        k = min(self.neighbours, d2.shape[-1])
        kth = d2.topk(k, dim=-1, largest=False).values[..., -1:]
        logits = (-d2 / spacing[:, None, None].square()).masked_fill(d2 > kth, float("-inf"))
        return _Plan(ffn_active, f_idx, f_ok, weight, r_idx=r_idx, r_ok=r_ok, source=p_slot,
                     mix=logits.softmax(dim=-1).to(seq.embeds.dtype), **full)

    def _choose(self, i: int, layer: nn.Module, h: torch.Tensor, layer_input: torch.Tensor, active: torch.Tensor,
                is_image: torch.Tensor, rankers: torch.Tensor, counts: torch.Tensor, prior: torch.Tensor,
                packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Proxy mask (B, L) for layer ``i`` and, for the score rule, the per-token update weights. ``rankers``
        are the tokens whose attention the attention rule counts."""
        if self.proxy_rule == "grid":
            return prior, None
        weight = None
        if self.proxy_rule == "score":
            s = self.scorers[str(i)](layer.post_attention_layernorm(h)).squeeze(-1)
            ranking = s + prior.to(s.dtype)  # the grid prior wins while the zero-initialised scores are small
            weight = torch.where(is_image, 1 + self.score_alpha * torch.tanh(s), torch.ones_like(s))
        else:  # attention received from the text and mask tokens (up to the first mask token) in this layer
            idx, ok, p_a, pe = packed
            received = received_attention(layer, gather(layer_input, idx), pe, p_a, ok, gather(active & rankers, idx))
            ranking = scatter(torch.zeros_like(h[..., :1]), idx, ok, received.unsqueeze(-1)).squeeze(-1)
        ranking = ranking.masked_fill(~is_image, float("-inf"))
        top = ranking.topk(int(counts.max()), dim=1).indices
        keep = torch.arange(top.shape[1], device=h.device)[None] < counts[:, None]
        chosen = torch.zeros_like(is_image)
        chosen.scatter_(1, top, keep)
        return chosen & is_image, weight

    # ------------------------------------------------------------------------------------ forward
    def _routed_layer(self, i: int, llm: CausalLLM, layer: nn.Module, phase: tuple, plan: _Plan | None,
                      seq: TokenSequence, is_image: torch.Tensor, rankers: torch.Tensor, counts: torch.Tensor,
                      prior: torch.Tensor, spacing: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, _Plan]:
        """One routed layer: every active token through attention, the proxies (and text) through the FFN,
        the other image tokens updated from their proxies' FFN updates. ``plan`` is the phase's packing when
        the proxies are fixed (grid rule); otherwise it is made here, from this layer's states."""
        if self.whole_layer:
            return self._whole_routed_layer(i, llm, layer, phase, plan, seq, is_image, counts, prior, spacing, h)
        active, idx, ok, p_a, bias, pe, dense = phase
        layer_input = h
        if dense:  # every token attends: no packing
            h = attention_residual(layer, h, bias, pe)
        else:
            h = scatter(h, idx, ok, attention_residual(layer, gather(h, idx), bias, pe))
        if plan is None:
            proxies, weight = self._choose(i, layer, h, layer_input, active, is_image, rankers, counts, prior,
                                           (idx, ok, p_a, pe))
            plan = self._plan(seq, active, is_image, proxies, weight, spacing)
        h_f = gather(h, plan.f_idx)
        delta_f = ffn_update(layer, h_f)
        if plan.weight is not None:
            delta_f = delta_f * gather(plan.weight, plan.f_idx).unsqueeze(-1)
        h = scatter(h, plan.f_idx, None if plan.f_full else plan.f_ok, h_f + delta_f)
        if plan.r_idx is None:
            return h, plan
        update = gather(delta_f, plan.source)  # nearest: each routed token's proxy update; weighted: the proxies'
        if plan.mix is not None:
            update = plan.mix @ update
        h_r = gather(h, plan.r_idx)
        projector = self.projectors[str(i)]
        token = layer.post_attention_layernorm(h_r) if projector.with_token else None  # computed only when used
        return scatter(h, plan.r_idx, None if plan.r_full else plan.r_ok, h_r + projector(update, token)), plan

    def _whole_routed_layer(self, i: int, llm: CausalLLM, layer: nn.Module, phase: tuple, plan: _Plan | None,
                            seq: TokenSequence, is_image: torch.Tensor, counts: torch.Tensor, prior: torch.Tensor,
                            spacing: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, _Plan]:
        """``routed: layer`` (ours, beyond the paper; ProxyV/MoD-like): the routed image tokens sit the whole
        layer out — attention included, as queries and as keys — and receive their proxies' whole-layer update
        (attention + FFN) through the projector."""
        active, idx, ok, p_a, bias, pe, _ = phase
        if plan is None:
            proxies, weight = self._choose(i, layer, h, h, active, is_image, torch.zeros_like(active), counts, prior,
                                           (idx, ok, p_a, pe))
            plan = self._plan(seq, active, is_image, proxies, weight, spacing)
            positions = gather(seq.positions, plan.f_idx)
            plan.attention = (attention_bias(positions, plan.f_ok, positions, plan.f_ok, h.dtype),
                              llm.rotary(h, positions), positions)
        k_bias, k_pe, k_pos = plan.attention
        h_k = gather(h, plan.f_idx)
        delta = layer(h_k, attention_mask=k_bias, position_embeddings=k_pe, position_ids=k_pos,
                      **cache_kwargs(layer)) - h_k
        if plan.weight is not None:
            delta = delta * gather(plan.weight, plan.f_idx).unsqueeze(-1)
        h = scatter(h, plan.f_idx, None if plan.f_full else plan.f_ok, h_k + delta)
        if plan.r_idx is None:
            return h, plan
        update = gather(delta, plan.source)
        if plan.mix is not None:
            update = plan.mix @ update
        h_r = gather(h, plan.r_idx)
        projector = self.projectors[str(i)]
        token = layer.input_layernorm(h_r) if projector.with_token else None
        return scatter(h, plan.r_idx, None if plan.r_full else plan.r_ok, h_r + projector(update, token)), plan

    def decode_layers(self, num_layers: int, kind: Kind, after_mask: bool) -> range:
        """A generated mask token (and, with ``late_text``, text after the first one) enters at ``insert_layer``,
        as in the teacher-forced forward; earlier layers' caches never see it."""
        late = kind == Kind.MASK or (self.late_text and after_mask)
        return range(self.insert_layer if late else 0, num_layers)

    def forward(self, llm: CausalLLM, seq: TokenSequence) -> torch.Tensor:
        h, pos, valid = seq.embeds, seq.positions, seq.valid
        is_image = seq.is_kind(Kind.IMAGE)
        is_mask = seq.is_kind(Kind.MASK)
        late = is_mask
        if self.late_text:
            after_first_mask = is_mask.long().cumsum(dim=1) > 0
            late = late | (after_first_mask & seq.is_kind(Kind.TEXT))
        rankers = up_to_first_mask(seq.kinds) & ~is_image  # text and mask queries, never the answer after [SEG]
        counts = self._proxy_count(is_image.sum(dim=1))
        prior = self._grid_prior(seq, is_image, counts)
        spacing = 1.0 / counts.clamp(min=1).float().sqrt()
        self.stats = LayerStats()
        phases: dict[bool, tuple] = {}
        fixed: dict[bool, _Plan] = {}  # grid proxies are the same in every routed layer of a phase: pack once
        for i, layer in enumerate(llm.layers):
            early = i < self.insert_layer
            if early not in phases:
                active = valid & ~late if early else valid
                idx, ok = select(active)
                p_a = gather(pos, idx)
                bias = attention_bias(p_a, ok, p_a, ok, h.dtype)
                dense = idx.shape[1] == h.shape[1] and bool(ok.all())  # every token active: idx is the identity
                phases[early] = (active, idx, ok, p_a, bias, llm.rotary(h, p_a), dense)
            phase = phases[early]
            active, idx, ok, p_a, bias, pe, dense = phase
            if not self.routed[i]:
                self.stats.record(active, active)
                h = run_layer(llm, layer, h, bias, pe, p_a) if dense else \
                    scatter(h, idx, ok, run_layer(llm, layer, gather(h, idx), bias, pe, p_a))
                continue
            body = partial(self._routed_layer, i, llm, layer, phase, fixed.get(early),
                           seq, is_image, rankers, counts, prior, spacing)
            if getattr(llm, "gradient_checkpointing", False) and torch.is_grad_enabled():
                h, plan = checkpoint(body, h, use_reentrant=False)  # recomputed in backward, as run_layer does
            else:
                h, plan = body(h)
            if self.proxy_rule == "grid":
                fixed[early] = plan
            self.stats.record(plan.ffn_active if self.whole_layer else active, plan.ffn_active)
        return llm.norm(h)
