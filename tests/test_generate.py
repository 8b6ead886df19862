"""Generation with a KV cache (issue 15): the prefill by the routing strategy fills each layer's cache, decode
steps attend to it, and a generated [SEG] gives the same mask as the teacher-forced forward over the same
tokens; pruning strategies leave shorter caches; ``predict --generate`` prints the answer and writes masks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segrouter.cli import main
from segrouter.generate import generate, prompt_batch
from segrouter.text import encode_prompt
from tests.conftest import build_model, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
ROUTINGS = {
    "full": ["model.routing.name=full"],
    "token_routing": ["model.routing.name=token_routing", "model.routing.insert_layer=1", "model.routing.route_start=0",
                      "model.routing.proxy_ratio=0.25", "model.routing.proxy_rule=grid"],
}


class Scripted(nn.Module):
    """An LM head that writes a fixed answer, whatever the states: generation's mechanics without training."""

    def __init__(self, script: list[int], vocab: int) -> None:
        super().__init__()
        self.script, self.vocab, self.step = script, vocab, 0

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(self.vocab)
        logits[self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return logits


def scene() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 32, 32)


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_generated_seg_gives_the_teacher_forced_mask(tmp_path: Path, routing: str) -> None:
    cfg = tiny_cfg(tmp_path, *ROUTINGS[routing])
    model, data = build_model(cfg)
    model.eval()
    tok = data.tokenizer
    word, seg = tok.convert_tokens_to_ids(["it", "[SEG]"])
    batch = prompt_batch(tok, scene(), "the red circle", cfg.data.prompt)
    model.llm.lm_head = Scripted([word, seg, tok.eos_token_id], len(tok))
    tokens, masks = generate(model, batch, eos_token_id=tok.eos_token_id)
    assert tokens == [word, seg] and len(masks) == 1 and masks[0].shape == (32, 32)
    # the same tokens teacher-forced, through the strategy's own full forward
    ids = torch.cat([batch["input_ids"], torch.tensor([[word, seg]])], dim=1)
    forced = {**batch, "input_ids": ids, "labels": torch.full_like(ids, -100), "text_mask": torch.ones_like(ids).bool()}
    with torch.no_grad():
        expected = model(forced)["masks"][0]
    assert torch.allclose(masks[0], expected, atol=1e-4), (masks[0] - expected).abs().max()


def test_pruned_tokens_are_not_in_later_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import DynamicCache

    caches: list[DynamicCache] = []
    monkeypatch.setattr(DynamicCache, "__init__", _recording(DynamicCache.__init__, caches))
    cfg = tiny_cfg(tmp_path, "model.routing.name=random", "model.routing.k=1", "model.routing.keep=0.25")
    model, data = build_model(cfg)
    model.eval()
    tok = data.tokenizer
    batch = prompt_batch(tok, scene(), "the red circle", cfg.data.prompt)
    model.llm.lm_head = Scripted([tok.eos_token_id], len(tok))
    assert generate(model, batch, eos_token_id=tok.eos_token_id) == ([], [])
    # BOS, the prompt's tokens with the one <image> placeholder replaced by the 4x4 grid's 16 visual tokens
    prompt_len = 1 + len(encode_prompt(tok, "the red circle", cfg.data.prompt)) - 1 + 16
    assert caches[0].get_seq_length(0) == prompt_len  # layer 0 runs before the pruning layer k=1
    assert caches[0].get_seq_length(1) == prompt_len - 16 + 4  # a quarter of the 16 image tokens kept


def _recording(init: Callable[..., None], caches: list[Any]) -> Callable[..., None]:
    """A spy around ``DynamicCache.__init__`` that keeps every cache made."""
    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        caches.append(self)
    return spy


def test_predict_generate_prints_the_answer_and_writes_masks(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    cfg = ["--recipe", str(ROOT / "recipes" / "tiny.yaml"), f"output_dir={tmp_path}/runs"]
    assert main(["fit", *cfg]) == 0
    Image.fromarray(np.full((20, 30, 3), 90, dtype=np.uint8)).save(tmp_path / "in.png")
    ckpt = str(tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    assert main(["predict", *cfg, "--ckpt", ckpt, "--image", str(tmp_path / "in.png"), "--text", "the red circle",
                 "--out", str(tmp_path / "m.png"), "--generate", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "answer '" in out  # the generated text, whatever a 2-step model writes
    written = sorted(tmp_path.glob("m*.png"))
    assert out.count(" px)") == len(written) and all(Image.open(p).size == (30, 20) for p in written)


def test_bench_end_to_end_times_prefill_decode_and_decoder(tmp_path: Path) -> None:
    import argparse

    from segrouter.bench import add_arguments, run_bench

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    tiny = str(ROOT / "recipes" / "tiny.yaml")
    args = parser.parse_args(["--recipe", tiny, "--vs", tiny, "--decode-steps", "3", "--warmup", "0", "--repeats",
                              "2", *ROUTINGS["token_routing"]])
    r = run_bench(args)
    assert r["setup"]["scope"].startswith("end to end: prefill + 3 decode steps + mask decoder")
    assert len(r["A"]["times_s"]) == 2 and 0 < r["flops_ratio"] < 1  # routing saves prefill FFN work
    refused = parser.parse_args(["--recipe", tiny, "--vs", tiny, "--decode-steps", "3", "--random-init", "qwen2-0.5b"])
    with pytest.raises(Exception, match="--decode-steps times whole models"):
        run_bench(refused)
