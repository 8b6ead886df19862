"""The command line end to end on the tiny recipe: list, plugins, fit, resume, validate/test, errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from segrouter.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("SEGROUTER_RUN_VERSION", None)
    return subprocess.run(
        [sys.executable, "-m", "segrouter.cli", *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_list_shows_builtins_with_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in ("vision_encoder", "compressor", "llm", "routing", "mask_decoder", "dataset"):
        assert f"\n{kind}\n" in f"\n{out}"
    assert "full" in out and "segrouter.routing.full" in out and "hidden_size: int = 128" in out


PLUGIN = '''
from segrouter.registry import register
from segrouter.routing.full import FullRouting


@register("routing", "dropped_in")
class DroppedIn(FullRouting):
    """Full routing that also counts its calls: proof that the recipe really used the plugin."""

    calls = 0

    def __init__(self, *, note: str = "hi") -> None:
        super().__init__()
        self.note = note

    def forward(self, llm, seq):
        type(self).calls += 1
        return super().forward(llm, seq)
'''


def test_plugin_file_is_listed_and_usable_from_a_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "dropped.py").write_text(PLUGIN)
    assert main(["list", "routing", "--plugins", str(plugins)]) == 0
    out = capsys.readouterr().out
    assert "dropped_in" in out and str(plugins / "dropped.py") in out and "note: str = 'hi'" in out
    rc = main(["fit", "--recipe", TINY, "--plugins", str(plugins), f"output_dir={tmp_path}/runs",
               "model.routing.name=dropped_in", "model.routing.note=x"])
    assert rc == 0
    from segrouter.registry import registry

    assert registry("routing").get("dropped_in").factory.calls >= 2
    saved = (tmp_path / "runs" / "tiny" / "version_0" / "recipe.yaml").read_text()
    assert "dropped_in" in saved


def test_fit_two_steps_then_resume_then_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = f"output_dir={tmp_path}"
    assert main(["fit", "--recipe", TINY, out_dir]) == 0
    run = tmp_path / "tiny" / "version_0"
    assert (run / "recipe.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    rows = _metrics(run)
    assert {"train/loss", "val/ciou", "val/giou", "val/llm_flops", "val/visual_tokens"} <= set(rows[0])
    assert max(int(r["step"]) for r in rows) == 1
    assert not list(run.glob("checkpoints/*.tmp"))

    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    assert main(["fit", "--recipe", TINY, out_dir, "--resume", "trainer.max_steps=4"]) == 0
    assert not (tmp_path / "tiny" / "version_1").exists()  # continued in the same run folder
    steps = [int(r["step"]) for r in _metrics(run) if r["step"]]
    assert max(steps) == 3 and min(steps) == 0  # the first attempt's rows are kept

    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    capsys.readouterr()
    assert main(["validate", "--recipe", TINY, out_dir]) == 0
    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    assert main(["test", "--recipe", TINY, out_dir, "--ckpt", str(run / "checkpoints" / "last.ckpt")]) == 0
    test_rows = _metrics(sorted((tmp_path / "tiny").glob("version_*"))[-1])
    assert any(r.get("test/ciou") for r in test_rows)


def test_print_recipe_prints_the_resolved_recipe_and_builds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("segrouter.build.build", lambda *a, **k: pytest.fail("--print-recipe built a model"))
    assert main(["fit", "--recipe", TINY, "--print-recipe", f"output_dir={tmp_path}", "trainer.max_steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == "tiny" and printed["trainer"]["max_steps"] == 7  # the override
    assert (printed["model"]["image_size"] == 32
            and printed["optim"]["scheduler"] == "cosine")  # tiny, its base, defaults
    # an evaluation needs no checkpoint to print its recipe, and shows what its flags set
    assert main(["test", "--recipe", TINY, "--print-recipe", "--control", "zero", f"output_dir={tmp_path}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["metrics"]["control"] == "zero"
    assert not list(tmp_path.iterdir())  # no run folder
    assert main(["fit", "--recipe", TINY, "--print-recipe", "trainer.max_stepz=3"]) == 2  # validated first
    out, err = capsys.readouterr()
    assert not out and "did you mean 'max_steps'" in err


def test_lr_monitor_and_early_stopping_from_the_recipe(tmp_path: Path) -> None:
    # a min_delta no change can beat: the first validation sets the best, the second does not improve on it → stop
    stop = ["enabled=true", "monitor=val/loss", "mode=min", "patience=1", "min_delta=1000"]
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}", "trainer.max_steps=6",
                 "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "trainer.lr_monitor=true",
                 *(f"trainer.early_stopping.{s}" for s in stop)]) == 0
    rows = _metrics(tmp_path / "tiny" / "version_0")
    assert [int(r["step"]) for r in rows if r.get("lr-AdamW")] == [0, 1]  # LearningRateMonitor: each step's rate
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [0, 1]  # stopped after 2 of the 6 steps


def test_torch_compile_from_the_recipe(tmp_path: Path) -> None:
    """trainer.compile: the model trains and evaluates under torch.compile (the eager backend: traced by dynamo,
    not compiled to code, so the test stays quick), and its checkpoint holds the plain module's keys."""
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    compiled = ["trainer.compile.enabled=true", "trainer.compile.backend=eager"]
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}", *compiled]) == 0
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0  # frames were traced: the forward ran compiled
    ckpt = tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    keys = torch.load(ckpt, weights_only=True)["state_dict"]
    assert keys and not any(k.startswith("_orig_mod") for k in keys)
    assert main(["test", "--recipe", TINY, f"output_dir={tmp_path}", "--ckpt", str(ckpt), *compiled]) == 0
    assert _metrics(tmp_path / "tiny" / "version_1")[-1]["test/ciou"]


def test_wandb_offline_logger_writes_under_the_run_folder(tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="the optional wandb extra (pip install -e '.[wandb]') is not installed")
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}", "logger.wandb.enabled=true"]) == 0
    run = tmp_path / "tiny" / "version_0"
    assert list((run / "wandb").glob("offline-run-*"))  # offline: nothing sent, synced later with `wandb sync`
    assert _metrics(run)  # the CSV log is kept beside it


def test_analyze_loads_like_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint that does not fit the recipe is one line and exit 2 here too, not a load_state_dict traceback."""
    import torch

    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"llm.no_such_layer.weight": torch.zeros(2)}}, ckpt)
    code = main(["analyze", "attention", "--recipe", TINY, "--ckpt", str(ckpt), f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not fit the recipe" in err[0]


def test_model_summary_prints_no_flops_it_did_not_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's summary counts FLOPs only from an example input this model does not have ("Total Flops: 0")."""
    lines: list[str] = []
    monkeypatch.setattr("lightning.pytorch.callbacks.model_summary.log.info", lines.append)
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}", "trainer.max_steps=1"]) == 0
    text = "\n".join(lines)
    assert "Total params" in text and "val/llm_flops" in text
    assert "Total Flops" not in text and "| FLOPs" not in text


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["fit", "--recipe", "recipes/nope.yaml"], "recipe file not found"),
        (["fit", "--recipe", TINY, "model.routing.name=ful"], "unknown routing 'ful' (did you mean 'full'?)"),
        (["fit", "--recipe", TINY, "trainer.max_stepz=3"], "did you mean 'max_steps'"),
        (["fit", "--recipe", TINY, "model.llm.num_heads=3"], "hidden_size 32 is not divisible by num_heads 3"),
        (["fit", "--recipe", TINY, "data.dataset.image_size=48"], "differs from model.image_size"),
        (["fit", "--recipe", TINY, "trainer.strategy=deepspeed_stage_9"],
         "trainer.strategy: unknown value 'deepspeed_stage_9'"),
        (["validate", "--recipe", TINY, "output_dir=/nonexistent/runs"], "no checkpoint found for recipe 'tiny'"),
        (["test", "--recipe", TINY, "--ckpt", "missing.ckpt"], "checkpoint not found: missing.ckpt"),
        (["fit", "--recipe", TINY, "--plugins", "/no/such/dir"], "plugin folder /no/such/dir does not exist"),
        (["fit", "--recipe", TINY, "--resume", "output_dir=/nonexistent"], "no last.ckpt to resume"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("segrouter: error:") and fragment in err[0], err


def test_error_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [" + TINY + "]\nmodel: {compressor: {name: mpl}}\n")
    proc = _run("fit", "--recipe", str(bad))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model.compressor.name: unknown compressor 'mpl' (did you mean 'mlp'?)" in proc.stderr


def test_ddp_with_two_cpu_processes(tmp_path: Path) -> None:
    proc = _run("fit", "--recipe", TINY, f"output_dir={tmp_path}", "trainer.strategy=ddp", "trainer.devices=2",
                "trainer.accelerator=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "tiny" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "tiny" / "version_1").exists()  # both ranks agreed on one run folder
    assert any(r.get("val/ciou") for r in _metrics(run))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_recipe_trains_on_cpu(tmp_path: Path, stage: int) -> None:
    proc = _run("fit", "--recipe", TINY, f"output_dir={tmp_path}", f"trainer.strategy=deepspeed_stage_{stage}",
                "trainer.accelerator=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "tiny" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_dir()  # DeepSpeed writes sharded checkpoint folders
    rows = _metrics(run)
    assert any(r.get("val/ciou") for r in rows) and all(r["train/loss"] != "nan" for r in rows if r.get("train/loss"))
