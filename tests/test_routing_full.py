"""The ``full`` strategy reproduces the stock HF forward; token bookkeeping helpers are exact."""

from __future__ import annotations

import pytest
import torch

from segrouter.compressors.base import VisualTokens
from segrouter.model.sequence import build_sequence
from segrouter.registry import registry
from segrouter.routing.base import Kind, TokenSequence, gather, scatter, select
from segrouter.text import build_tokenizer


def _llm(family: str, attn: str) -> torch.nn.Module:
    tok = build_tokenizer(None, ["a", "b", "c"], 1)
    torch.manual_seed(0)
    llm = registry("llm").build(
        {"name": "hf_causal", "family": family, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
         "attn_implementation": attn},
        tok,
    )
    return llm.eval()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_routing_equals_hf_forward(family: str, attn: str) -> None:
    llm = _llm(family, attn)
    b, L, d = 3, 11, llm.hidden_size
    lengths = torch.tensor([11, 7, 4])
    valid = torch.arange(L)[None] < lengths[:, None]
    embeds = torch.randn(b, L, d)
    kinds = torch.where(valid, int(Kind.TEXT), int(Kind.PAD))
    positions = torch.where(valid, torch.arange(L)[None], 0)
    seq = TokenSequence(embeds, kinds, positions, torch.zeros(b, L, 2))
    ours = registry("routing").build({"name": "full"})(llm, seq)
    ref = llm.hf_hidden_states(embeds, valid.long())
    torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_select_gather_scatter_round_trip() -> None:
    x = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)
    active = torch.tensor([[True, False, True, False, False], [False, True, True, True, False]])
    idx, ok = select(active)
    assert idx.shape == (2, 3) and ok.tolist() == [[True, True, False], [True, True, True]]
    assert gather(x, idx)[0, :2, 0].tolist() == [0.0, 2.0] and gather(x, idx)[1, :, 0].tolist() == [6.0, 7.0, 8.0]
    y = scatter(x, idx, ok, gather(x, idx) * 0 - 1)
    assert y[..., 0].tolist() == [[-1, 1, -1, 3, 4], [5, -1, -1, -1, 9]]


def test_build_sequence_splices_variable_visual_tokens() -> None:
    ids = torch.tensor([[1, 9, 5, 6, 7, 0], [1, 5, 9, 7, 0, 0]])  # 9 = <image>, 7 = [SEG], 0 = pad
    text_mask = ids != 0
    labels = torch.where(ids == 7, 7, -100)
    emb = torch.randn(2, 6, 4)
    vis = VisualTokens(torch.randn(2, 3, 4), torch.tensor([[True, True, True], [True, False, False]]),
                       torch.rand(2, 3, 2))
    seq, lab, mpos = build_sequence(emb, ids, text_mask, labels, vis, image_token_id=9, mask_token_ids=[7])
    K = Kind
    assert seq.kinds[0].tolist() == [K.TEXT, K.IMAGE, K.IMAGE, K.IMAGE, K.TEXT, K.TEXT, K.MASK]
    assert seq.kinds[1].tolist() == [K.TEXT, K.TEXT, K.IMAGE, K.MASK, K.PAD, K.PAD, K.PAD]
    assert seq.positions[1].tolist() == [0, 1, 2, 3, 0, 0, 0]
    torch.testing.assert_close(seq.embeds[0, 1:4], vis.embeds[0])
    torch.testing.assert_close(seq.embeds[1, 2], vis.embeds[1, 0])
    torch.testing.assert_close(seq.coords[1, 2], vis.coords[1, 0])
    assert mpos.tolist() == [[6], [3]] and lab[0, 6].item() == 7 and lab[1, 3].item() == 7
