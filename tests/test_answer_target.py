"""The training-only ``{target}`` in the answer template: where it appears, where it does not, and that it
cannot reach the mask (it follows the mask tokens, and attention is causal)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segrouter.text import render_answer
from tests.conftest import build_model, tiny_cfg

ANSWER = "data.answer=it is {mask_tokens} {target}"


def test_render_answer_names_the_target_only_when_given() -> None:
    assert render_answer("it is {mask_tokens} {target}", "[SEG]", "red circle") == "it is [SEG] red circle"
    assert render_answer("it is {mask_tokens} {target}", "[SEG]", None) == "it is [SEG]"
    assert render_answer("it is {mask_tokens}", "[SEG]", "red circle") == "it is [SEG]"


def test_training_batches_name_the_target_and_evaluation_batches_do_not(tmp_path: Path) -> None:
    model, data = build_model(tiny_cfg(tmp_path, ANSWER))
    tok = data.tokenizer
    train = next(iter(data.train_dataloader()))
    val = next(iter(data.val_dataloader()))
    sample = data.dataset("train")[int(train["id"][0].split("-")[1])]
    words = tok.convert_ids_to_tokens(train["input_ids"][0][train["text_mask"][0]].tolist())
    labelled = tok.convert_ids_to_tokens([i for i in train["labels"][0].tolist() if i != -100])
    colour, shape = sample["target"].split()
    assert words[-4:] == ["[SEG]", colour, shape, "[EOS]"]
    assert labelled[-3:] == [colour, shape, "[EOS]"]  # the LM loss is asked to name the target
    for ids, mask in zip(val["input_ids"], val["text_mask"], strict=True):
        assert tok.convert_ids_to_tokens(ids[mask].tolist())[-2:] == ["[SEG]", "[EOS]"]


@pytest.mark.parametrize("routing", ["full", "token_routing"])
def test_the_target_name_cannot_change_the_mask(tmp_path: Path, routing: str) -> None:
    model, data = build_model(tiny_cfg(tmp_path, ANSWER, f"model.routing.name={routing}"))
    model.eval()
    samples = [data.dataset("val")[i] for i in range(4)]
    with torch.no_grad():
        plain = model(data.collate(samples))["masks"]
        named = model(data.collate(samples, train=True))["masks"]
        wrong = model(data.collate([{**s, "target": "green triangle"} for s in samples], train=True))["masks"]
    assert torch.allclose(plain, named, atol=1e-5) and torch.allclose(plain, wrong, atol=1e-5)
