"""``compare`` over synthetic run folders (numbers, ratios, partial runs, formats, plot) and ``sweep``'s
orchestration with a fake ``fit`` process."""

from __future__ import annotations

import csv
import io
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from segrouter import compare as compare_command
from segrouter import interrupts
from segrouter import sweep as sweep_command
from segrouter.cli import build_parser
from segrouter.compare import compare
from segrouter.errors import RecipeError, SegrouterError
from segrouter.sweep import parse_grid

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")


def _write_run(folder: Path, name: str | None, routing: str = "full", rows: list[dict[str, Any]] | None = None) -> Path:
    """A run folder as fit writes it: recipe.yaml and a Lightning-style metrics.csv (sparse rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    if name is not None:
        recipe = {"name": name, "model": {"compressor": {"name": "mlp", "depth": 2}, "routing": {"name": routing}}}
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    if rows is not None:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("epoch", "step"), k))
        with open(folder / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    return folder


def _val(step: int, ciou: float, flops: float, tokens: float = 64.0, latency: float = 10.0) -> dict[str, Any]:
    return {"epoch": 0, "step": step, "val/ciou": ciou, "val/giou": ciou - 0.05, "val/llm_flops": flops,
            "val/visual_tokens": tokens, "val/latency_ms": latency, "val/loss": 1.0 - ciou}


@pytest.fixture()
def runs(tmp_path: Path) -> dict[str, Path]:
    full = tmp_path / "runs" / "full"
    _write_run(full / "version_0", "full", rows=[_val(9, 0.1, 9e9)])  # older version: must be ignored
    _write_run(full / "version_1", "full", rows=[
        {"epoch": 0, "step": 0, "train/loss": 2.0}, _val(199, 0.50, 2.0e9), _val(399, 0.60, 2.0e9, latency=12.0),
        _val(599, 0.55, 2.0e9), {"epoch": 0, "step": 599, "test/ciou": 0.58, "test/giou": 0.52},
    ])
    fastv = _write_run(tmp_path / "runs" / "fastv" / "version_0", "fastv", routing="fastv", rows=[
        _val(199, 0.40, 1.5e9, tokens=64.0), _val(399, 0.52, 1.6e9, tokens=64.0),
    ])
    no_metrics = _write_run(tmp_path / "runs" / "crashed" / "version_0", "crashed")
    no_ciou = _write_run(tmp_path / "runs" / "early" / "version_0", "early",
                         rows=[{"epoch": 0, "step": 0, "train/loss": 3.0}])
    return {"full": full, "fastv": fastv, "no_metrics": no_metrics, "no_ciou": no_ciou, "missing": tmp_path / "nope"}


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_numbers_ratios_and_best_step(runs: dict[str, Path]) -> None:
    rows = _csv(compare([runs["full"], runs["fastv"]], fmt="csv"))
    full, fastv = rows
    assert full["run"] == "full/version_1" and full["recipe"] == "full"  # a recipe folder → its newest version
    assert (full["compressor"], full["routing"], fastv["routing"]) == ("mlp", "full", "fastv")
    assert (full["best step"] == "399" and float(full["val cIoU"]) == 0.60
            and float(full["val gIoU"]) == pytest.approx(0.55))
    assert float(full["latency ms"]) == 12.0  # efficiency numbers from the best validation
    assert float(full["test cIoU"]) == 0.58 and float(full["test gIoU"]) == 0.52
    assert float(full["FLOPs ratio"]) == 1.0 and float(fastv["FLOPs ratio"]) == pytest.approx(0.8)
    assert float(fastv["LLM FLOPs"]) == 1.6e9 and fastv["best step"] == "399" and fastv["test cIoU"] == ""
    assert float(fastv["visual tokens"]) == 64.0


def test_metric_picks_the_best_step(runs: dict[str, Path]) -> None:
    rows = _csv(compare([runs["full"]], metric="val/loss", fmt="csv"))  # a loss: the minimum wins
    assert rows[0]["best step"] == "399"
    rows = _csv(compare([runs["full"]], metric="val/giou", fmt="csv"))
    assert rows[0]["best step"] == "399"


def test_partial_and_missing_runs_are_shown_not_fatal(runs: dict[str, Path]) -> None:
    text = compare([runs["full"], runs["no_metrics"], runs["no_ciou"], runs["missing"], runs["fastv"]])
    lines = text.splitlines()
    assert len(lines) == 2 + 5
    crashed, early, missing = lines[3], lines[4], lines[5]
    assert "crashed/version_0" in crashed and "missing metrics.csv" in crashed and "—" in crashed
    assert "early/version_0" in early and "no val/ciou logged" in early
    assert "nope" in missing and "run folder not found" in missing
    assert "0.800" in lines[6]  # ratios still computed against the first run
    rows = _csv(compare([runs["no_metrics"], runs["fastv"]], fmt="csv"))
    assert rows[0]["notes"] == "missing metrics.csv" and rows[1]["FLOPs ratio"] == ""  # no reference FLOPs


def test_markdown_and_table_formats(runs: dict[str, Path]) -> None:
    md = compare([runs["full"], runs["fastv"]], fmt="markdown").splitlines()
    assert len(md) == 4 and all(line.startswith("| ") and line.endswith(" |") for line in md)
    assert md[0].startswith("| run | recipe | compressor | routing | control | training-free | visual tokens "
                            "| LLM FLOPs | FLOPs ratio")
    assert "---:" in md[1] and "| 2G |" in md[2] and "| 0.800 |" in md[3] and "| 0.6000 |" in md[2]
    table = compare([runs["full"], runs["fastv"]]).splitlines()
    assert table[0].startswith("run") and set(table[1]) <= {"-", " "} and "1.6G" in table[3]
    with pytest.raises(SegrouterError, match="unknown format 'html'"):
        compare([runs["full"]], fmt="html")  # type: ignore[arg-type]


def test_a_training_free_evaluation_says_so(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _write_run(tmp_path / "runs" / "tr" / "version_0", "tr", routing="token_routing", rows=[_val(0, 0.3, 1e9)])
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    (run / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "metrics": {"training_free": True}}))
    rows = _csv(compare([runs["full"], run, runs["no_metrics"]], fmt="csv"))
    assert [r["training-free"] for r in rows] == ["", "yes", ""]


def test_plot_is_written(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "plots" / "pareto.png"
    compare([runs["full"], runs["fastv"], runs["no_metrics"]], plot=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compare([runs["no_metrics"]], plot=tmp_path / "empty.png")  # nothing to plot: still a file
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_compare_command_writes_file(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp" / "table.csv"
    args = build_parser().parse_args(["compare", str(runs["full"]), str(runs["fastv"]), "--format", "csv",
                                      "--out", str(out)])
    compare_command.run(args)
    assert _csv(out.read_text())[1]["routing"] == "fastv" and str(out) in capsys.readouterr().err


def test_parse_grid_keeps_lists_whole() -> None:
    assert parse_grid(["model.routing.keep=[1,0.5],[1,1]", "optim.lr=0.1"]) == [
        ("model.routing.keep", ["[1,0.5]", "[1,1]"]), ("optim.lr", ["0.1"])]
    with pytest.raises(SegrouterError, match="is not KEY=V1,V2"):
        parse_grid(["optim.lr"])


class _FakePopen:
    """``subprocess.Popen`` for sweep tests: ``wait`` says what the fit did."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd, self.env = cmd, env
        self.signals: list[int] = []

    def __enter__(self) -> _FakePopen:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)


def test_sweep_runs_each_grid_point_reports_failures_and_compares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[list[str], dict[str, str]]] = []

    class FakeFit(_FakePopen):
        def wait(self) -> int:
            calls.append((self.cmd, self.env))
            name = next(a.split("=", 1)[1] for a in self.cmd if a.startswith("name="))
            if name.endswith("lr=0.01"):
                return 143  # stopped by SIGTERM before writing anything
            _write_run(tmp_path / "sweep" / name / "version_0", name, rows=[_val(1, 0.3, 1e6)])
            return 0

    monkeypatch.setattr("segrouter.sweep.Popen", FakeFit)
    monkeypatch.setenv("SEGROUTER_RUN_VERSION", "7")
    args = build_parser().parse_args(["sweep", "--recipes", TINY, "trainer.max_steps=1",
                                      "--grid", "optim.lr=0.001,0.01", "--out", str(tmp_path / "sweep")])
    with pytest.raises(SegrouterError, match=r"1 of 2 sweep runs failed: tiny-lr=0.01"):
        sweep_command.run(args)
    assert [c[0][c[0].index("fit") + 1:][:2] for c in calls] == [["--recipe", TINY]] * 2
    first = calls[0][0]
    assert {"trainer.max_steps=1", "optim.lr=0.001", f"output_dir={tmp_path / 'sweep'}",
            "name=tiny-lr=0.001"} <= set(first)
    assert all("SEGROUTER_RUN_VERSION" not in env for _, env in calls)
    out, err = capsys.readouterr()
    assert "tiny-lr=0.001/version_0" in out and "tiny-lr=0.01 failed (exit code 143; no run folder)" in err


def test_a_signal_to_the_sweep_goes_to_the_running_fit_and_stops_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[_FakePopen] = []

    class SignalledFit(_FakePopen):
        def wait(self) -> int:
            started.append(self)
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. docker stop, to the sweep's process only
            return 143 if self.signals else 0  # the fit saved its checkpoint and exited

    monkeypatch.setattr("segrouter.sweep.Popen", SignalledFit)
    args = build_parser().parse_args(["sweep", "--recipes", TINY, "--grid", "optim.lr=0.001,0.01",
                                      "--out", str(tmp_path)])
    with interrupts.raising(), pytest.raises(interrupts.Interrupted,
                                             match="tiny-lr=0.001 stopped \\(exit code 143\\)") as exc:
        sweep_command.run(args)
    assert exc.value.exit_code == 143
    assert len(started) == 1 and started[0].signals == [signal.SIGTERM]  # the next run never started


def test_sweep_validates_everything_before_running(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("segrouter.sweep.Popen", lambda *a, **k: pytest.fail("a run started"))
    args = build_parser().parse_args(["sweep", "--recipes", TINY, "--grid", "optim.lrr=0.1", "--out", str(tmp_path)])
    with pytest.raises(RecipeError, match="did you mean 'lr'"):
        sweep_command.run(args)
    assert not os.listdir(tmp_path)
