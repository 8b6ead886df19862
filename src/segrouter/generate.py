"""Generation: the LLM writes its answer ("Sure, it is [SEG].") with a KV cache, and every generated mask token
becomes a mask, as LISA takes ``[SEG]`` from its generated sequence (``segrouter predict --generate``).

**Prefill** is the recipe's routing strategy over the prompt (image tokens included), run once inside
:func:`~segrouter.routing.base.filling_cache`: each decoder layer's cache receives the keys and values that
layer computed, so a strategy's savings shape what decoding attends to. **Decode** steps run one new token
through the layers :meth:`~segrouter.routing.base.RoutingStrategy.decode_layers` names, each attending to its
layer's cache plus itself, greedily (argmax), until the end-of-sequence token or ``max_new_tokens``. What each
strategy does at decode:

- ``full``: every token, every layer, over every prompt token's keys.
- ``token_routing``: the prompt's image tokens were all attended in every layer (``routed: ffn``, the paper's)
  — the proxies only change how their states were updated — so the cache holds every token; with
  ``routed: layer`` the routed image tokens sat the routed layers out and are not in those layers' caches. A
  generated ``[SEG]`` (and, with ``late_text``, the text after it) enters at ``insert_layer``, as in training.
- ``fastv``, ``pdrop``, ``random``: pruned image tokens are absent from the caches of the layers they were
  dropped from; decode attends to the kept ones.
- ``mod``: tokens the router skipped in a layer are absent from that layer's cache.

Decode itself is dense for the one new token: its cost is the cache length per layer, which the strategies
shortened (pruning) or not (token routing's FFN routing saves prefill FFN work only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from segrouter.datasets.base import ENCODER_INPUTS
from segrouter.errors import SegrouterError
from segrouter.routing.base import Kind, cache_kwargs, filling_cache


def prompt_batch(tokenizer: Any, image: torch.Tensor, expression: str, prompt: str,
                 inputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """A one-sample batch of the prompt alone (no answer): ``image`` (3, S, S) letterboxed; ``inputs``, the sample's
    other per-image tensors (:data:`ENCODER_INPUTS`: the letterbox's content size, the mask encoder's own input,
    the vision encoder's centre crop), each batched here."""
    from segrouter.text import encode_prompt

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = torch.tensor([bos + encode_prompt(tokenizer, expression, prompt)])
    batch: dict[str, Any] = {"image": image[None], "input_ids": ids, "labels": torch.full_like(ids, -100),
                             "text_mask": torch.ones_like(ids, dtype=torch.bool)}
    for key, value in (inputs or {}).items():
        if key not in ENCODER_INPUTS:
            raise SegrouterError(f"prompt_batch got an unknown input {key!r}", fix=f"pass only {ENCODER_INPUTS}")
        batch[key] = value[None]
    return batch


@torch.no_grad()
def generate(model: Any, batch: dict[str, Any], *, max_new_tokens: int = 32, eos_token_id: int | None = None,
             mask_at_end: bool = False) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation for a one-sample prompt batch: (generated token ids, mask-logit maps (S, S), one per
    generated mask token). ``model`` is a :class:`~segrouter.model.module.SegmentationMLLM` in eval mode.
    ``mask_at_end`` decodes one more mask from the last state when no mask token was generated (the bench's
    end-to-end mode, which must pay for the mask decoder whatever a random model writes)."""
    from transformers import DynamicCache

    if batch["input_ids"].shape[0] != 1:
        raise SegrouterError("generation takes one sample at a time", fix="split the batch")
    if len(model.mask_token_ids) != 1:
        raise SegrouterError(f"generation makes one mask per [SEG] token; this model has {len(model.mask_token_ids)}"
                             " mask tokens per answer", fix="use a recipe with model.num_mask_tokens: 1 (LISA's)")
    llm = model.llm
    enc = model.encode(batch, prompt_only=True)
    seq = enc.seq
    cache = DynamicCache()
    with filling_cache(cache):
        hidden = model.routing(llm, seq)
    length = int(seq.valid[0].sum())
    state, position = hidden[0, length - 1], int(seq.positions[0, :length].max()) + 1
    features = model.decoder_features(batch, enc.features, enc.mask_features)
    size = batch["image"].shape[-2:]
    tokens: list[int] = []
    masks: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        token = int(llm.lm_head(state).argmax())
        if token == eos_token_id:
            break
        tokens.append(token)
        kind = Kind.MASK if token in model.mask_token_ids else Kind.TEXT
        h = llm.embed(torch.tensor([[token]], device=state.device))
        ids = torch.tensor([[position]], device=state.device)
        pe = llm.rotary(h, ids)
        for i in model.routing.decode_layers(len(llm.layers), kind, bool(masks)):
            layer = llm.layers[i]
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=ids, **cache_kwargs(layer, cache))
        state = llm.norm(h)[0, 0]
        if kind == Kind.MASK:
            masks.append(model.decode_masks(features, state[None, None], size)[0])
        position += 1
    if mask_at_end and not masks:
        masks.append(model.decode_masks(features, state[None, None], size)[0])
    return tokens, masks
