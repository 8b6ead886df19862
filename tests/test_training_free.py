"""Training-free evaluation: a routing method applied to a checkpoint trained with ``full``
(``segrouter validate|test --training-free``), end to end on the tiny recipe."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import RECIPES, build_model, tiny_cfg

from segrouter.cli import main
from segrouter.compare import compare

TINY = str(RECIPES / "tiny.yaml")


def _newest(root: Path) -> Path:
    return sorted(root.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]


def _eval(*args: str) -> int:
    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    return main(["test", "--recipe", TINY, *args])


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full")
    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    assert main(["fit", "--recipe", TINY, f"output_dir={root}", "name=full"]) == 0
    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    return root / "full" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    ("routing", "note"),
    [
        (["model.routing.name=token_routing"],
         "routing.projectors (8): the projectors' output layers are zero: each routed image token takes its "
         "nearest proxy's FFN update unchanged"),
        (["model.routing.name=mod"], "routing.routers (2): routers are zero, so every image token scores the same"),
        (["model.routing.name=random", "model.routing.k=1"], "every tensor comes from"),
    ],
    ids=["token_routing", "mod", "random"],
)
def test_a_method_on_a_full_checkpoint(full_ckpt: Path, tmp_path: Path, routing: list[str], note: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    args = [f"output_dir={tmp_path}", "--ckpt", str(full_ckpt), *routing]
    if routing[0] != "model.routing.name=random":  # new parameters: refused without the flag, which it names
        assert _eval(*args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "does not fit the recipe" in err[0] and "add --training-free" in err[0], err
        assert not (tmp_path / "tiny").exists()  # nothing written before the weights fit
    assert _eval(*args, "--training-free") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segrouter: training-free:")]
    assert len(err) == 1 and note in err[0], err
    run = _newest(tmp_path / "tiny")
    assert yaml.safe_load((run / "recipe.yaml").read_text())["metrics"]["training_free"] is True
    with open(run / "metrics.csv") as f:
        assert any(r.get("test/ciou") for r in csv.DictReader(f))
    rows = list(csv.DictReader(compare([run], fmt="csv").splitlines()))
    assert rows[0]["training-free"] == "yes" and rows[0]["routing"] == routing[0].split("=")[1]


def test_the_dense_weights_are_loaded_and_the_new_ones_start_at_their_initialisation(full_ckpt: Path,
                                                                                    tmp_path: Path) -> None:
    from segrouter.checkpoints import load_weights

    model, _ = build_model(tiny_cfg(tmp_path, "model.routing.name=token_routing"))
    fresh = load_weights(model, full_ckpt, allow_missing=True)
    state = torch.load(full_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert sorted(fresh) == sorted(f"routing.{k}" for k in model.routing.state_dict())
    assert all(not p.any() for name, p in model.routing.named_parameters() if ".down." in name)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["test", "--training-free"], "--training-free needs --ckpt"),
        (["validate", "metrics.training_free=true"], "--training-free needs --ckpt"),
        (["fit", "metrics.training_free=true"], "metrics.training_free describes an evaluation"),
    ],
)
def test_bad_use_is_one_line(tmp_path: Path, args: list[str], fragment: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main([args[0], "--recipe", TINY, f"output_dir={tmp_path}", *args[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not list(tmp_path.iterdir())
