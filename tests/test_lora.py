"""LoRA on the LLM and a frozen vision tower: what trains, how much, and that LoRA starts as a no-op."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_model, tiny_cfg

from segrouter.errors import SegrouterError

LORA = ("model.lora.enabled=true", "model.lora.r=4", "model.freeze_vision=true")


def _batch(data) -> dict:
    ds = data.dataset("train")
    return data.collate([ds[i] for i in range(2)])


def test_only_lora_embeddings_head_and_new_modules_train(tmp_path: Path) -> None:
    model, _ = build_model(tiny_cfg(tmp_path, *LORA))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert ("lora_" in name or "embed_tokens" in name or "lm_head" in name
                or name.startswith(("compressor.", "mask_decoder.", "text_proj."))), name
    assert not any(n.startswith("vision.") for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("lm_head" in n for n in trainable)
    # LoRA adds r·(in + out) per target Linear: q_proj and v_proj (32→32) in 2 layers
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_params == 4 * (32 + 32) * 2 * 2
    frozen = [n for n, p in model.named_parameters() if n.startswith("llm.") and not p.requires_grad]
    assert any("q_proj.base_layer.weight" in n for n in frozen) and any("mlp" in n for n in frozen)


def test_lora_starts_as_identity_and_routing_calls_it(tmp_path: Path) -> None:
    plain, data = build_model(tiny_cfg(tmp_path))
    lora, _ = build_model(tiny_cfg(tmp_path, *LORA))
    batch = _batch(data)
    plain.eval(), lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(batch)["masks"], plain(batch)["masks"])
        # the routing loop reaches the adapters: a nonzero B changes the output
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
        assert not torch.allclose(lora(batch)["masks"], plain(batch)["masks"])


def test_training_step_moves_lora_not_frozen_weights(tmp_path: Path) -> None:
    model, data = build_model(tiny_cfg(tmp_path, *LORA))
    batch = _batch(data)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model.losses(model(batch), batch["mask"])["loss"].backward()
    opt.step()
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    for n, p in after.items():
        if not p.requires_grad:
            assert torch.equal(before[n], p), n


def test_unknown_lora_target_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(SegrouterError, match="model.lora.targets") as e:
        build_model(tiny_cfg(tmp_path, *LORA, "model.lora.targets=[nope_proj]"))
    assert "\n" not in str(e.value)
