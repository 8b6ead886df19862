"""Splicing visual tokens into the text sequence.

Each text sample holds exactly one ``<image>`` placeholder; it is replaced by that sample's visual tokens
(their count may differ per sample, e.g. one per superpixel). The result is a right-padded
:class:`~segrouter.routing.base.TokenSequence` with per-token kinds, positions and image coordinates, plus
the LM labels re-aligned to it and the positions of the mask tokens.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from segrouter.compressors.base import VisualTokens
from segrouter.errors import SegrouterError
from segrouter.routing.base import Kind, TokenSequence


def build_sequence(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    text_mask: torch.Tensor,
    labels: torch.Tensor,
    visual: VisualTokens,
    image_token_id: int,
    mask_token_ids: list[int],
    *,
    prompt_only: bool = False,
) -> tuple[TokenSequence, torch.Tensor, torch.Tensor]:
    """Return (sequence, labels (B, L), mask-token positions (B, K)). ``prompt_only``: the sequence holds no
    answer yet (generation's prefill), so no mask token is expected and the positions are (B, 0)."""
    b, t, d = text_embeds.shape
    device = text_embeds.device
    is_mask = torch.isin(input_ids, torch.tensor(mask_token_ids, device=device))
    embeds, kinds, coords, labs = [], [], [], []
    for i in range(b):
        n_text = int(text_mask[i].sum())
        img_at = (input_ids[i, :n_text] == image_token_id).nonzero()
        if img_at.numel() != 1:
            raise SegrouterError(
                f"sample {i} has {img_at.numel()} <image> placeholders, expected exactly 1",
                fix="the prompt template must contain the image exactly once",
            )
        p = int(img_at[0, 0])
        n_vis = int(visual.mask[i].sum())
        vis = visual.embeds[i, visual.mask[i]]
        text_kind = torch.where(is_mask[i, :n_text], int(Kind.MASK), int(Kind.TEXT))
        embeds.append(torch.cat([text_embeds[i, :p], vis, text_embeds[i, p + 1 : n_text]]))
        kinds.append(
            torch.cat([text_kind[:p], torch.full((n_vis,), int(Kind.IMAGE), device=device), text_kind[p + 1 :]])
        )
        zeros = torch.zeros(n_text - 1, 2, device=device)
        coords.append(torch.cat([zeros[:p], visual.coords[i, visual.mask[i]], zeros[p:]]))
        labs.append(torch.cat([labels[i, :p], torch.full((n_vis,), -100, device=device), labels[i, p + 1 : n_text]]))
    kinds_t = pad_sequence(kinds, batch_first=True, padding_value=int(Kind.PAD))
    positions = torch.arange(kinds_t.shape[1], device=device)[None].expand(b, -1)
    positions = torch.where(kinds_t != Kind.PAD, positions, torch.zeros_like(positions))
    seq = TokenSequence(
        embeds=pad_sequence(embeds, batch_first=True),
        kinds=kinds_t,
        positions=positions,
        coords=pad_sequence(coords, batch_first=True),
    )
    mask_positions = _mask_positions(kinds_t, 0 if prompt_only else len(mask_token_ids))
    return seq, pad_sequence(labs, batch_first=True, padding_value=-100), mask_positions


def _mask_positions(kinds: torch.Tensor, k: int) -> torch.Tensor:
    is_mask = kinds == Kind.MASK
    counts = is_mask.sum(1)
    if not bool((counts == k).all()):
        raise SegrouterError(
            f"expected {k} mask tokens per sample, found {counts.tolist()}",
            fix="the answer template must contain {mask_tokens} once",
        )
    order = torch.argsort((~is_mask).to(torch.int8), dim=1, stable=True)
    return order[:, :k]
