"""``segrouter analyze tokens``: where the kept (or proxy) image tokens lie relative to the target's mask, on
hand-made cases at tiny size — ``full`` at chance, a rule that keeps exactly the target's tokens at 1.0, each
strategy's kept share — and the command's files and its one-line errors with nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import RECIPES, build_model, tiny_cfg

from segrouter.analysis.tokens import inside_mask, token_placement
from segrouter.cli import main
from segrouter.errors import SegrouterError
from segrouter.llms.base import CausalLLM
from segrouter.routing.base import Kind, LayerStats, RoutingStrategy, TokenSequence, run_dense, run_pruned

TINY = str(RECIPES / "tiny.yaml")


def _model_and_batch(tmp_path: Path, *overrides: str) -> tuple[Any, dict[str, Any]]:
    model, data = build_model(tiny_cfg(tmp_path, *overrides))
    return model.eval(), data.collate([data.dataset("val")[i] for i in range(8)])


class _KeepOnTarget(RoutingStrategy):
    """From layer 1 on, exactly the image tokens ``on_target`` (the test's answer key), through run_pruned."""

    def __init__(self, on_target: torch.Tensor) -> None:
        super().__init__()
        self.on_target = on_target

    def forward(self, llm: CausalLLM, seq: TokenSequence) -> torch.Tensor:
        self.stats = LayerStats()
        h, _, pe = run_dense(llm, seq, 1, self.stats)
        return run_pruned(llm, seq, 1, h, pe, self.on_target.float(), self.on_target.sum(dim=1), self.stats)


def test_inside_mask_reads_the_pixel_of_each_centre() -> None:
    mask = torch.zeros(1, 4, 8)
    mask[0, 2:, 4:] = 1  # the bottom-right quarter
    coords = torch.tensor([[[0.6, 0.6], [0.4, 0.6], [0.6, 0.4], [1.0, 1.0], [0.5, 0.5]]])
    assert inside_mask(coords, mask).tolist() == [[True, False, False, True, True]]


def test_full_is_at_chance_and_keeping_the_target_is_one(tmp_path: Path) -> None:
    model, batch = _model_and_batch(tmp_path)
    full = token_placement(model, [batch])
    assert full["samples"] > 0 and full["samples"] + full["skipped"] == 8 and 0 < full["chance"] < 1
    assert full["layers"]["kept"] == [1.0, 1.0] and full["layers"]["recall"] == [1.0, 1.0]
    assert full["layers"]["inside"] == pytest.approx([full["chance"]] * 2)

    with torch.no_grad():
        seq = model.encode(batch).seq
        model.routing(model.llm, seq)
    assert model.routing.stats.ffn_masks is None  # off outside token_placement's recording_tokens()
    model.routing = _KeepOnTarget(seq.is_kind(Kind.IMAGE) & inside_mask(seq.coords, batch["mask"]))
    keep = token_placement(model, [batch])
    assert keep["layers"]["inside"] == pytest.approx([full["chance"], 1.0])
    assert keep["layers"]["recall"] == [1.0, 1.0]
    assert keep["layers"]["kept"] == pytest.approx([1.0, full["chance"]])


class _RecordsOnce(RoutingStrategy):
    """Keeps the LayerStats it was built with (made outside recording_tokens()): it records no masks."""

    def forward(self, llm: CausalLLM, seq: TokenSequence) -> torch.Tensor:
        for _ in llm.layers:
            self.stats.record(seq.valid, seq.valid)
        return seq.embeds


def test_a_strategy_that_records_no_masks_is_one_line(tmp_path: Path) -> None:
    model, batch = _model_and_batch(tmp_path)
    model.routing = _RecordsOnce()
    with pytest.raises(SegrouterError, match=r"routing 'full' recorded nothing for a 2-layer LLM.*LayerStats\(\)"):
        token_placement(model, [batch])


@pytest.mark.parametrize(
    ("overrides", "kept"),
    [
        (["model.routing.name=random", "model.routing.k=1", "model.routing.keep=0.5"], [1.0, 0.5]),
        (["model.routing.name=fastv", "model.routing.k=1", "model.routing.ratio=0.75"], [1.0, 0.25]),
        (["model.routing.name=pdrop", "model.routing.layers=[1]", "model.routing.keep=[0.25]"], [1.0, 0.25]),
        (["model.routing.name=mod", "model.routing.route_layers=all", "model.routing.capacity=0.5"], [0.5, 0.5]),
        (["model.routing.name=token_routing", "model.routing.route_start=1", "model.routing.proxy_ratio=0.25"],
         [1.0, 0.25]),
    ],
    ids=["random", "fastv", "pdrop", "mod", "token_routing"],
)
def test_each_strategy_records_its_kept_tokens(tmp_path: Path, overrides: list[str], kept: list[float]) -> None:
    """4×4 = 16 image tokens per sample: the kept share follows each strategy's parameters, with no strategy
    code for the record; the kept tokens' placement lies between the extremes."""
    model, batch = _model_and_batch(tmp_path, *overrides)
    placement = token_placement(model, [batch])
    assert placement["layers"]["kept"] == pytest.approx(kept)
    assert all(0.0 <= v <= 1.0 for values in placement["layers"].values() for v in values)
    for layer, share in enumerate(kept):
        if share == 1.0:  # a layer that computes every image token is at chance and keeps every target token
            assert placement["layers"]["inside"][layer] == pytest.approx(placement["chance"])
            assert placement["layers"]["recall"][layer] == 1.0


def test_cli_prints_the_table_and_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = build_model(tiny_cfg(tmp_path))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    out = tmp_path / "analysis"
    code = main(["analyze", "tokens", "--recipe", TINY, "--ckpt", str(ckpt), "--out", str(out), "--batches", "1",
                 f"output_dir={tmp_path}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "layer    kept  inside  chance  recall" in printed and "segrouter: wrote" in printed
    info = json.loads((out / "tokens.json").read_text())
    assert info["routing"] == "full" and info["ckpt"] == str(ckpt) and len(info["layers"]["inside"]) == 2
    assert (out / "tokens.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--batches", "0"], "argument --batches: expected a whole number >= 1, got '0'"),
        (["--batches", "two"], "expected a whole number >= 1, got 'two'"),
        (["model.blind_llm=true"], "the LLM sequences hold no image tokens"),
        (["--out", "FILE/sub"], "is a file"),
        (["model.llm.num_layers=3"], "does not fit the recipe"),
    ],
    ids=["zero-batches", "word-batches", "blind", "out-under-a-file", "other-model"],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         args: list[str], fragment: str) -> None:
    model, _ = build_model(tiny_cfg(tmp_path))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    (tmp_path / "FILE").write_text("")
    args = [str(tmp_path / a) if a.startswith("FILE") else a for a in args]
    out = tmp_path / "analysis"
    before = sorted(tmp_path.rglob("*"))
    code = main(["analyze", "tokens", "--recipe", TINY, "--ckpt", str(ckpt), "--out", str(out), "--batches", "1",
                 f"output_dir={tmp_path}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert sorted(tmp_path.rglob("*")) == before
