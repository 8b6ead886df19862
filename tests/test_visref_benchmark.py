"""benchmarks/visref.py, the vision-dependent benchmark's driver, end to end at toy size (2 steps per stage),
so that it cannot rot: every stage and control runs, the table and the acceptance checks are written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
       "trainer.limit_test_batches=1", "data.dataset.num_samples=64", "data.eval_batch_size=8",
       "model.llm.hidden_size=32", "model.llm.num_layers=4", "model.llm.num_heads=2", "model.llm.intermediate_size=64"]


def _driver(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "benchmarks/visref.py", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


def test_the_driver_runs_every_stage_and_writes_the_section(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nkept text\n\n<!-- visref-tf:begin -->\n<!-- visref-tf:end -->\n")
    proc = _driver("--out", str(tmp_path / "runs"), "--seeds", "0", "1", "--doc", str(doc), *TOY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("# Results\n\nkept text\n") and text.count("<!-- visref:begin -->") == 1
    for row in ("testbed (reads its visual tokens) | — | 0", "testbed, tokens shuffled | shuffle | 1",
                "testbed, tokens zeroed | zero | 0", "trained blind (no visual tokens) | blind | 1", "mean ± std | 2"):
        assert row in text, row
    assert "| acceptance check (issue 12) | met |" in text and "best text-only guess of the name" in text
    assert "| testbed pipeline (pretraining, positions, testbed, its evaluations) ≤ 30 min per seed (longest: " in text
    assert "seed 1: load average at start " in text and ", testbed evaluations " in text and ", blind " in text
    assert ", positions " in text and ", blind positions " in text
    runs = tmp_path / "runs"
    assert (runs / "visref_pretrain_s1" / "version_0" / "checkpoints" / "last.ckpt").exists()
    assert "control: shuffle" in (runs / "visref_s0" / "version_2" / "recipe.yaml").read_text()
    # each stage 3 starts from its own stage 2 (position forms only), the blind one blind throughout
    for name, blind in (("visref", False), ("visref_blind", True)):
        first = runs / f"{name.replace('visref', 'visref_positions')}_s0" / "version_0"
        stage2 = (first / "recipe.yaml").read_text()
        stage3 = (runs / f"{name}_s0" / "version_0" / "recipe.yaml").read_text()
        assert "- position\n" in stage2 and "- relation\n" not in stage2 and "- relation\n" in stage3
        assert f"init_from: {first / 'checkpoints' / 'last.ckpt'}" in stage3
        assert ("blind_llm: true" in stage2) == ("blind_llm: true" in stage3) == blind

    rebuilt = _driver("--out", str(runs), "--seeds", "0", "1", "--doc", str(doc), "--table-only", *TOY)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert doc.read_text().count("<!-- visref:begin -->") == 1

    # the method study on the toy testbeds (benchmarks/visref_study.py): training-free and fine-tuned arms, a
    # routing strategy and a compressor, two seeds side by side
    doc.write_text(doc.read_text() + "\n<!-- visref-study:begin -->\n<!-- visref-study:end -->\n"
                   "<!-- visref-study-tf:begin -->\n<!-- visref-study-tf:end -->\n")
    study = subprocess.run([sys.executable, "benchmarks/visref_study.py", "--runs", str(runs), "--out",
                            str(tmp_path / "study"), "--seeds", "0", "1", "--jobs", "2", "--arms", "token_routing",
                            "avgpool, ¼", "--steps", "2", "--doc", str(doc), *TOY[1:]],
                           capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert study.returncode == 0, study.stderr[-3000:]
    text = doc.read_text()
    assert "| full | 1 | 1.000 | 1.000 | 64.0 | " in text
    assert "| token_routing (route_start=0, proxy_ratio=0.125) | ½ FLOPs | 0." in text
    assert "| 0.497 | 64.0 | " in text  # the recipe's knobs at the LLaMA-7B shape
    assert "| avgpool, ¼ (k=2) | ¼ tokens | 0." in text and "| 16.0 | — (new compressor) | " in text
    assert "--arms full token_routing 'avgpool, ¼' --steps 2" in text and "![Pareto" in text
    assert "| token_routing | " in text.split("Where the image tokens")[1]  # the placement table
    assert (tmp_path / "visref_study.png").stat().st_size > 0
    tuned = (tmp_path / "study" / "ft_token_routing_s1" / "version_0" / "recipe.yaml").read_text()
    assert "init_modules: []" in tuned and "max_steps: 2" in tuned and "name: token_routing" in tuned
    pooled = (tmp_path / "study" / "ft_avgpool-q_s0" / "version_0" / "recipe.yaml").read_text()
    assert "- llm\n" in pooled and "- compressor\n" not in pooled  # a new compressor: not from the testbed
    assert not (tmp_path / "study" / "tf_avgpool-q_s0").exists()
    assert "training_free: true" in (tmp_path / "study" / "tf_full_s0" / "version_0" / "recipe.yaml").read_text()
    assert (tmp_path / "study" / "ft_token_routing_s0" / "tokens" / "tokens.json").is_file()
    free = subprocess.run([sys.executable, "benchmarks/visref_study.py", "--runs", str(runs), "--out",
                           str(tmp_path / "study_tf"), "--seeds", "0", "1", "--arms", "token_routing",
                           "--training-free-only", "--doc", str(doc), *TOY[1:]],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert free.returncode == 0, free.stderr[-3000:]
    section = doc.read_text().split("<!-- visref-study-tf:begin -->")[1]
    assert "| training-free cIoU | training-free name_acc |" in section and "--training-free-only" in section
    assert "| token_routing (route_start=0, proxy_ratio=0.125) | ½ FLOPs | 0." in section
    assert not list((tmp_path / "study_tf").glob("ft_*"))  # no fine-tune ran
    # a study cut off goes on where it stopped: every run is complete, so nothing is rerun
    again = subprocess.run([sys.executable, "benchmarks/visref_study.py", "--runs", str(runs), "--out",
                            str(tmp_path / "study"), "--seeds", "0", "1", "--arms", "token_routing", "avgpool, ¼",
                            "--steps", "2", "--doc", str(doc), *TOY[1:]],
                           capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert again.returncode == 0 and "$ segrouter" not in again.stdout, again.stderr[-3000:]


def test_the_study_refuses_an_unknown_arm_in_one_line(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("<!-- visref-study:begin -->\n<!-- visref-study:end -->\n")
    proc = subprocess.run([sys.executable, "benchmarks/visref_study.py", "--runs", str(tmp_path), "--doc", str(doc),
                           "--arms", "fastvv"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("visref_study.py: error: unknown arm 'fastvv' — choose from 'full', ")


def test_the_study_refuses_no_parallel_job_in_one_line(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("<!-- visref-study:begin -->\n<!-- visref-study:end -->\n")
    proc = subprocess.run([sys.executable, "benchmarks/visref_study.py", "--runs", str(tmp_path), "--doc", str(doc),
                           "--jobs", "0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "visref_study.py: error: --jobs 0 must be at least 1"]


def test_one_seed_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = _driver("--out", str(tmp_path), "--seeds", "0")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "visref.py: error: the seed spread needs at least 2 seeds — pass e.g. --seeds 0 1"]


def test_a_missing_doc_is_refused_before_any_training(tmp_path: Path) -> None:
    proc = _driver("--out", str(tmp_path / "runs"), "--seeds", "0", "1", "--doc", str(tmp_path / "none.md"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"visref.py: error: no such file: {tmp_path / 'none.md'} — pass --doc an existing markdown file"]
    assert not (tmp_path / "runs").exists()
