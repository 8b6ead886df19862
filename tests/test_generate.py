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


def test_token_routing_with_every_image_token_a_proxy_generates_what_full_does(tmp_path: Path) -> None:
    """With every image token a proxy (and [SEG] from layer 0), token routing is full: greedy generation on the
    same weights writes the same tokens, and the mask at the end is the same."""
    routed = ["model.routing.name=token_routing", "model.routing.insert_layer=0", "model.routing.route_start=0",
              "model.routing.proxy_ratio=1.0", "model.routing.proxy_rule=grid"]
    full, data = build_model(tiny_cfg(tmp_path, *ROUTINGS["full"]))
    model, _ = build_model(tiny_cfg(tmp_path, *routed))
    missing = model.load_state_dict(full.state_dict(), strict=False).missing_keys
    assert all(k.startswith("routing.") for k in missing)  # the projectors, which no token uses here
    batch = prompt_batch(data.tokenizer, scene(), "the red circle", data.cfg.data.prompt)
    out = [generate(m.eval(), batch, max_new_tokens=6, mask_at_end=True) for m in (full, model)]
    assert out[0][0] == out[1][0] and len(out[0][0]) == 6
    torch.testing.assert_close(out[1][1][-1], out[0][1][-1], atol=1e-4, rtol=1e-4)


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


def test_chat_answers_each_line_and_writes_its_masks(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``segrouter chat``: one generated answer per line, its [SEG] masks at the current image's size in the
    output folder; ``:image`` switches images; a bad line is one error line and the session goes on; ``:quit``
    ends it. A bad start (used output folder, missing image) is exit 2 before any model is built."""
    import io

    import segrouter.predict

    tiny = str(ROOT / "recipes" / "tiny.yaml")
    model, data = build_model(tiny_cfg(tmp_path))
    tok = data.tokenizer
    word, seg = tok.convert_tokens_to_ids(["it", "[SEG]"])

    class Cycling(Scripted):  # "it [SEG]" then end, every turn
        def forward(self, state: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(self.vocab)
            logits[self.script[self.step % len(self.script)]] = 1.0
            self.step += 1
            return logits

    model.llm.lm_head = Cycling([word, seg, tok.eos_token_id], len(tok))
    built = []
    monkeypatch.setattr(segrouter.predict, "load_model",
                        lambda *a: built.append(a) or (model.eval(), data))
    Image.fromarray(np.full((20, 30, 3), 90, dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((12, 8, 3), 200, dtype=np.uint8)).save(tmp_path / "b.png")
    lines = (f"the red circle\n:image {tmp_path / 'nope.png'}\n:zoom\n\n:image {tmp_path / 'b.png'}\nthe square\n"
             ":quit\nx\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    capsys.readouterr()
    out_dir = tmp_path / "chat"
    assert main(["chat", "--recipe", tiny, "--image", str(tmp_path / "a.png"), "--out-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("it [SEG]") == 2  # two turns: "x" after :quit is never read
    assert "error: image not found" in out and "unknown command ':zoom'" in out and "now " in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["1.png", "1_overlay.png", "2.png", "2_overlay.png"]
    assert Image.open(out_dir / "1.png").size == (30, 20) and Image.open(out_dir / "2.png").size == (8, 12)
    built.clear()
    assert main(["chat", "--recipe", tiny, "--image", str(tmp_path / "a.png"), "--out-dir", str(out_dir)]) == 2
    assert "already holds files" in capsys.readouterr().err
    argv = ["chat", "--recipe", tiny, "--image", str(tmp_path / "nope.png"), "--out-dir", str(tmp_path / "n")]
    assert main(argv) == 2
    assert "image not found" in capsys.readouterr().err and not built and not (tmp_path / "n").exists()
