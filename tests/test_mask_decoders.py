"""Mask decoders: output shape, prompt dependence, and loading SAM's decoder from a local directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import SamConfig, SamModel

from segrouter.errors import SegrouterError
from segrouter.registry import registry


@pytest.mark.parametrize(
    "node",
    [
        {"name": "sam", "embed_dim": 32, "num_heads": 4, "mlp_dim": 64},
        {"name": "conv", "embed_dim": 16},
        {"name": "conv", "embed_dim": 16, "conditioning": "film"},
    ],
)
def test_decoders_map_prompts_to_upscaled_masks(node: dict) -> None:
    torch.manual_seed(0)
    dec = registry("mask_decoder").build(node, 24, (4, 4))
    feats = torch.randn(2, 24, 4, 4)
    p = torch.randn(2, 1, dec.prompt_dim)
    out = dec(feats, p)
    assert out.shape == (2, 16, 16)
    if node["name"] == "conv":
        torch.nn.init.normal_(dec.prompt_mlp[-1].weight)  # the FiLM head starts prompt-independent-ish
    assert not torch.allclose(dec(feats, p), dec(feats, p.flip(0)))


def test_sam_decoder_loads_from_a_local_sam_directory(tmp_path: Path) -> None:
    cfg = SamConfig()
    cfg.vision_config.update({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                              "output_channels": 32, "global_attn_indexes": [0], "mlp_dim": 64, "image_size": 64,
                              "num_pos_feats": 16})
    cfg.prompt_encoder_config.update({"hidden_size": 32, "image_size": 64, "image_embedding_size": 4})
    cfg.mask_decoder_config.update({"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2,
                                    "iou_head_hidden_dim": 32})
    SamModel(cfg).save_pretrained(tmp_path / "sam")
    dec = registry("mask_decoder").build({"name": "sam", "path": str(tmp_path / "sam")}, 24, (4, 4))
    assert dec.prompt_dim == 32
    assert dec(torch.randn(1, 24, 4, 4), torch.randn(1, 1, 32)).shape == (1, 16, 16)
    with pytest.raises(SegrouterError, match="SAM directory not found"):
        registry("mask_decoder").build({"name": "sam", "path": str(tmp_path / "nope")}, 24, (4, 4))
