"""``segrouter card``: one configuration's FLOPs and speed at the testbed and named shapes, its runs' accuracy,
and the card in ``compare``'s rows — on the tiny recipe and the toy LLM shape."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import RECIPES

from segrouter.cli import main

TINY = str(RECIPES / "tiny.yaml")
RANDOM = ["model.routing.name=random", "model.routing.k=1", "model.routing.keep=0.25"]
QUICK = ["--shapes", "toy", "--warmup", "0", "--repeats", "2", "--image-tokens", "64"]


def _fit(tmp_path: Path, name: str, *overrides: str) -> Path:
    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}", f"name={name}", *overrides]) == 0
    return tmp_path / name / "version_0"


def test_a_card_measures_the_configuration_its_runs_trained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _fit(tmp_path, "random", *RANDOM)
    capsys.readouterr()
    out = tmp_path / "cards" / "random.json"
    assert main(["card", "--recipe", TINY, "--vs", TINY, "--run", str(run), *QUICK, "--out", str(out), *RANDOM]) == 0
    printed = capsys.readouterr().out
    card = json.loads(out.read_text())
    assert json.loads((run / "card.json").read_text()) == card
    assert card["routing"] == {"name": "random", "k": 1, "keep": 0.25}
    testbed, toy = card["shapes"]
    assert testbed["shape"] == "testbed" and toy["shape"] == "toy" and toy["layers"] == toy["layers_timed"] == 4
    assert testbed["image_tokens"] == [16, 16] and toy["image_tokens"] == [64, 64]  # same compressor: no scaling
    for row in (testbed, toy):  # a quarter of the image tokens from layer 1 on: fewer FLOPs than full, counted
        assert 0.2 < row["flops_ratio"] < 1.0 and row["speedup"] > 0
        assert row["flops_ratio_timed"] == pytest.approx(row["flops_ratio"])
    acc = card["accuracy"]
    assert acc["split"] == "val" and acc["runs"] == [str(run)] and acc["ciou"]["n"] == 1 and acc["ciou"]["std"] is None
    assert "testbed" in printed and "toy" in printed and "accuracy (val, 1 runs): ciou" in printed

    full = _fit(tmp_path, "full")
    capsys.readouterr()
    assert main(["compare", str(run), str(full), "--format", "markdown"]) == 0
    header, _, with_card, without = capsys.readouterr().out.splitlines()
    assert "| card FLOPs ratio | card speedup |" in header
    assert f"| testbed {testbed['flops_ratio']:.3f}, toy {toy['flops_ratio']:.3f} | testbed " in with_card
    assert "| — | — |" in without  # a run without a card


def test_a_compressors_saving_carries_over_as_a_fraction_of_the_patch_grid(tmp_path: Path) -> None:
    out = tmp_path / "card.json"
    assert main(["card", "--recipe", TINY, "--vs", TINY, *QUICK, "--out", str(out),
                 "model.compressor.name=avgpool"]) == 0
    testbed, toy = json.loads(out.read_text())["shapes"]
    assert testbed["image_tokens"] == [4, 16] and toy["image_tokens"] == [16, 64]  # a 2x2 pool: a quarter
    assert json.loads(out.read_text())["accuracy"] is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--shapes", "qwen3"], "--shapes: unknown shape qwen3"),
        (["--run", "{tmp}/nowhere"], "--run: no run folder"),
        (["--run", "{run}"], "ran model.routing {'name': 'full'}, not the card's {'name': 'random'"),
        (["--out", "{tmp}"], "is a folder"),
        (["--wall-layers", "0"], "--wall-layers: expected a whole number >= 1"),
    ],
)
def test_bad_card_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                         fragment: str) -> None:
    run = _fit(tmp_path, "full") if "{run}" in args else None
    capsys.readouterr()
    filled = [a.format(tmp=tmp_path, run=run) for a in args]
    assert main(["card", "--recipe", TINY, "--vs", TINY, *QUICK, *filled, *RANDOM]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert run is None or not (run / "card.json").exists()
