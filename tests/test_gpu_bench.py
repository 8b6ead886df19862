"""benchmarks/gpu: the prepared device script runs end to end at toy shapes on CPU (so it cannot rot between
device loans), writes every section's figures, and turns bad arguments into one line and exit code 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

GPU_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
_spec = importlib.util.spec_from_file_location("gpu_bench", GPU_DIR / "gpu_bench.py")
assert _spec is not None and _spec.loader is not None
gpu_bench: Any = importlib.util.module_from_spec(_spec)
sys.modules["gpu_bench"] = gpu_bench  # dataclasses look their module up while the class is made
_spec.loader.exec_module(gpu_bench)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Toy shapes gain nothing from threads, and on a busy CI machine thread hand-offs cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dry_run_writes_every_section(tmp_path: Path, one_thread: None) -> None:
    assert gpu_bench.main([str(tmp_path), "--device", "cpu", "--tiny"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    sections = r["sections"]
    assert list(sections) == list(gpu_bench.SECTIONS)
    assert not [n for n, body in sections.items() if "error" in body or "skipped" in body]
    assert r["env"]["dtype"] == "float32" and r["env"]["versions"]["torch"]

    prefill = sections["prefill"]
    assert list(prefill) == ["batch_1", "batch_2"]
    for part in prefill.values():
        rows = part["rows"]
        assert list(rows) == ["full", "token_routing", "token_routing_16", "fastv", "pdrop", "mod"]
        assert rows["full"]["flops_ratio"] == 1.0
        for row in rows.values():
            assert row["gflops"] > 0 and row["ms"]["median"] > 0 and row["ms"]["n"] == 2
            assert row["speedup"] > 0 and 0 < row["flops_ratio"] <= 1 and row["memory"] is None
        assert (rows["token_routing"]["flops_ratio"] < 1
                and rows["token_routing"]["ffn_tokens_mean"] < rows["full"]["ffn_tokens_mean"])
    assert [p["image_tokens"] for p in sections["scaling"].values()] == [64, 128, 256]
    assert all(p["rows"]["token_routing"]["flops_ratio"] < 1 for p in sections["scaling"].values())

    profile = sections["profile"]
    assert profile["token_routing"]["host_syncs"] > profile["full"]["host_syncs"] == 0  # routing reads counts
    assert "top 15 CPU-side ops" in (tmp_path / profile["file"]).read_text()

    train = sections["train"]["rows"]
    assert train["token_routing"]["flops_ratio"] < 1 and train["full"]["tokens_per_s"] > 0
    assert train["full"]["mfu"] is None  # no peak FLOP/s on CPU

    e2e = sections["e2e"]["rows"]
    assert list(e2e) == list(gpu_bench.E2E_RECIPES)
    ssp = e2e["sam_superpixel"]["superpixels"]
    assert ssp["cache_hits"] == 0 and ssp["cache_misses"] == ssp["images"] > 0 and ssp["ms_per_image"] > 0
    assert e2e["sam_superpixel"]["visual_tokens"] < e2e["quickstart"]["visual_tokens"] == 64

    md = (tmp_path / "results.md").read_text()
    assert all(f"## {name}" in md for name in gpu_bench.SECTIONS) and "| token_routing |" in md


def test_failed_and_late_sections_are_recorded_and_the_rest_runs(tmp_path: Path, one_thread: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(ctx: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_bench.SECTION_FNS, "scaling", boom)
    assert gpu_bench.main([str(tmp_path), "--device", "cpu", "--tiny", "--sections", "scaling,profile"]) == 1
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert sections["scaling"]["error"] == "RuntimeError: boom" and "kernel_ms" in sections["profile"]["full"]
    assert "**failed**: RuntimeError: boom" in (tmp_path / "results.md").read_text()

    assert gpu_bench.main([str(tmp_path), "--device", "cpu", "--tiny", "--sections", "e2e", "--deadline-s", "0"]) == 1
    assert "deadline" in json.loads((tmp_path / "results.json").read_text())["sections"]["e2e"]["skipped"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: out"),
        (["OUT", "--device", "cpu", "--tiny", "--sections", "prefil"],
         "unknown section 'prefil' (did you mean 'prefill'?)"),
        (["OUT", "--device", "cpu"], "the 7B shapes need a GPU"),
        (["OUT", "--device", "gpu0", "--tiny"], "unknown device 'gpu0'"),
        (["OUT", "--device", "cpu", "--tiny", "--deadline-s", "soon"], "invalid float value: 'soon'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert gpu_bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_bench: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_run_sh_without_an_output_folder_is_one_line_and_exit_2() -> None:
    done = subprocess.run(["bash", str(GPU_DIR / "run.sh")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.strip().startswith("run.sh: error: missing output folder")
    assert len(done.stderr.strip().splitlines()) == 1
