"""Reliability: same seed → same metrics; a non-finite loss or update stops the run with a clear message and
keeps the last good checkpoint (never one with non-finite weights); checkpoints load with weights_only;
SIGKILL, SIGTERM and SIGINT leave a run that resumes (the signals: one line, exit code 143/130)."""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from segrouter.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if "latency" not in k} for r in csv.DictReader(f)]


def test_same_seed_gives_identical_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = []
    for name in ("a", "b"):
        monkeypatch.delenv("SEGROUTER_RUN_VERSION", raising=False)
        assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}", f"name={name}", "trainer.max_steps=4"]) == 0
        runs.append(_rows(tmp_path / name / "version_0"))
    assert runs[0] == runs[1] and any(r.get("val/ciou") for r in runs[0])
    monkeypatch.delenv("SEGROUTER_RUN_VERSION", raising=False)
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}", "name=c", "seed=1", "trainer.max_steps=4"]) == 0
    assert _rows(tmp_path / "c" / "version_0") != runs[0]


POISON = """
import torch
from segrouter.registry import register
from segrouter.routing.full import FullRouting


@register("routing", "poison_after")
class PoisonAfter(FullRouting):
    \"\"\"Full routing whose output turns NaN from the second training call on (a simulated blow-up).\"\"\"

    calls = 0

    def forward(self, llm, seq):
        out = super().forward(llm, seq)
        if self.training:
            type(self).calls += 1
            if type(self).calls >= 2:
                return out * float("nan")
        return out
"""


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "poison.py").write_text(POISON)
    out = f"output_dir={tmp_path}"
    assert main(["fit", "--recipe", TINY, out]) == 0
    last = tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    capsys.readouterr()
    rc = main(["fit", "--recipe", TINY, out, "--plugins", str(plugins), "--resume", "trainer.max_steps=6",
               "model.routing.name=poison_after"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "non-finite loss (nan) at global step 3" in err[0]
    assert last.read_bytes() == before  # the last good checkpoint is untouched
    assert torch.load(last, weights_only=True)["global_step"] == 2


POISON_GRAD = """
import os

import torch
from segrouter.registry import register
from segrouter.routing.full import FullRouting


@register("routing", "poison_grad_at")
class PoisonGradAt(FullRouting):
    \"\"\"Full routing whose gradient turns NaN at the N-th training forward (N from $POISON_GRAD_AT_CALL): the
    loss of that step is finite, the update it makes is not.\"\"\"

    def forward(self, llm, seq):
        out = super().forward(llm, seq)
        if self.training:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == int(os.environ.get("POISON_GRAD_AT_CALL", "0")):
                out.register_hook(lambda g: g * float("nan"))
        return out
"""


def _all_finite(ckpt: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_a_blown_up_update_is_never_saved_as_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the case: lr=1e4 makes an update non-finite; the loss sees it one step later, after a save
    out = f"output_dir={tmp_path}"
    assert main(["fit", "--recipe", TINY, out, "name=lr1e4", "trainer.max_steps=30", "trainer.val_check_interval=30",
                 "checkpoint.every_n_train_steps=1", "optim.lr=1e4"]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segrouter:")]
    assert len(ours) == 1 and "non-finite weights after global step" in ours[0], ours
    assert _all_finite(torch.load(tmp_path / "lr1e4" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True))

    # the update of step 3 is NaN (its loss is not): last.ckpt stays at step 2, and a resume finishes the run
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "poison_grad.py").write_text(POISON_GRAD)
    fit = ["fit", "--recipe", TINY, out, "--plugins", str(plugins), "model.routing.name=poison_grad_at",
           "trainer.max_steps=6", "checkpoint.every_n_train_steps=1"]
    monkeypatch.setenv("POISON_GRAD_AT_CALL", "3")
    assert main(fit) == 2
    assert "non-finite weights after global step 3" in capsys.readouterr().err
    last = tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2 and _all_finite(ckpt)
    monkeypatch.setenv("POISON_GRAD_AT_CALL", "0")
    monkeypatch.delenv("SEGROUTER_RUN_VERSION", raising=False)
    assert main([*fit, "--resume", "optim.lr=5e-4"]) == 0
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 6 and _all_finite(ckpt)
    # the resumed run trained with the lower rate the command gave, not the one saved with the optimiser
    assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 5e-4
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [5e-4]


def _files(root: Path) -> dict[Path, bytes]:
    return {f: f.read_bytes() for f in root.rglob("*") if f.is_file()}


def test_resume_checks_the_checkpoint_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = f"output_dir={tmp_path}"
    for name in ("a", "b"):
        monkeypatch.delenv("SEGROUTER_RUN_VERSION", raising=False)
        assert main(["fit", "--recipe", TINY, out, f"name={name}"]) == 0
    empty = tmp_path / "empty" / "version_0" / "checkpoints" / "last.ckpt"
    empty.parent.mkdir(parents=True)
    empty.touch()
    before = _files(tmp_path)
    a_last = str(tmp_path / "a" / "version_0" / "checkpoints" / "last.ckpt")
    for extra, fragment in [
        (["name=b", "--ckpt", a_last], "was saved by a run of recipe 'a', not 'b'"),
        (["name=a", "--ckpt", a_last, "model.llm.hidden_size=48"], "does not fit the recipe"),
        (["name=empty"], "cannot read weights"),
    ]:
        monkeypatch.delenv("SEGROUTER_RUN_VERSION", raising=False)
        capsys.readouterr()
        assert main(["fit", "--recipe", TINY, out, "--resume", *extra]) == 2
        ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segrouter:")]
        assert len(ours) == 1 and fragment in ours[0], (extra, ours)
        assert _files(tmp_path) == before, extra  # no run was written to, none created

    # on request, another recipe's checkpoint continues as a new run of this one; the runs there are untouched
    monkeypatch.delenv("SEGROUTER_RUN_VERSION", raising=False)
    assert main(["fit", "--recipe", TINY, out, "name=b", "--resume", "--ckpt", a_last, "--other-recipe",
                 "trainer.max_steps=4"]) == 0
    assert torch.load(tmp_path / "b" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert {f: b for f, b in _files(tmp_path).items() if "version_1" not in f.parts} == before


def test_a_fresh_run_never_reuses_a_run_folder_and_an_empty_ckpt_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segrouter.errors import SegrouterError
    from segrouter.recipe import load_recipe
    from segrouter.runs import find_eval_checkpoint, find_resume, next_version

    cfg = load_recipe(TINY, [f"output_dir={tmp_path}"])
    ckpts = tmp_path / "tiny" / "version_0" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").touch()
    (ckpts / "best-2.ckpt").touch()
    monkeypatch.setenv("SEGROUTER_RUN_VERSION", "0")  # left over in the shell, e.g. from a DDP launch
    assert next_version(cfg) == 1
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank started by the launching process takes its number
    assert next_version(cfg) == 1 and os.environ["SEGROUTER_RUN_VERSION"] == "1"
    for find in (find_eval_checkpoint, find_resume):  # '--ckpt "$UNSET"' must not mean "the default checkpoint"
        with pytest.raises(SegrouterError, match="--ckpt is empty"):
            find(cfg, "")


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}"]) == 0
    ckpt = torch.load(tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "state_dict" in ckpt and ckpt["hyper_parameters"]["recipe"]["name"] == "tiny"


KILLER = """
import os
import signal

from segrouter.registry import register
from segrouter.routing.full import FullRouting


@register("routing", "kill_at")
class KillAt(FullRouting):
    \"\"\"Full routing that SIGKILLs its own process at the N-th training forward (N from $KILL_AT_CALL), or at
    the N-th evaluation forward (N from $KILL_AT_EVAL_CALL).\"\"\"

    calls = {True: 0, False: 0}

    def forward(self, llm, seq):
        type(self).calls[self.training] += 1
        at = os.environ.get("KILL_AT_CALL" if self.training else "KILL_AT_EVAL_CALL", "0")
        if type(self).calls[self.training] == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(llm, seq)
"""


def _fit(tmp_path: Path, name: str, *extra: str, kill_at: int = 0,
         kill_at_eval: int = 0) -> subprocess.CompletedProcess[str]:
    """``segrouter fit`` in a child process (SIGKILL must not take the test down with it)."""
    env = {**os.environ, "KILL_AT_CALL": str(kill_at), "KILL_AT_EVAL_CALL": str(kill_at_eval)}
    env.pop("SEGROUTER_RUN_VERSION", None)
    cmd = [sys.executable, "-m", "segrouter.cli", "fit", "--recipe", TINY, "--plugins", str(tmp_path / "plugins"),
           f"output_dir={tmp_path}", f"name={name}", "model.routing.name=kill_at",
           # 8 batches per epoch, 14 steps: the kill and the resume fall in the second epoch, mid-epoch
           "trainer.max_steps=14", "trainer.val_check_interval=7", "checkpoint.every_n_train_steps=3", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "killer.py").write_text(KILLER)
    assert _fit(tmp_path, "whole").returncode == 0

    killed = _fit(tmp_path, "resumed", kill_at=11)  # dies inside step 11; last.ckpt is from step 9
    assert killed.returncode == -signal.SIGKILL
    ckpt_dir = tmp_path / "resumed" / "version_0" / "checkpoints"
    assert not list(ckpt_dir.glob("*.tmp"))  # no half-written checkpoint
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 9
    resumed = _fit(tmp_path, "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    final = {}
    for name in ("whole", "resumed"):
        ckpt = torch.load(tmp_path / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 14
        val = [r for r in _rows(tmp_path / name / "version_0") if r.get("val/ciou")]
        final[name] = (ckpt["state_dict"], val[-1])
    (w_whole, m_whole), (w_res, m_res) = final["whole"], final["resumed"]
    assert w_whole.keys() == w_res.keys()
    assert all(torch.equal(w_whole[k], w_res[k]) for k in w_whole), "resumed weights differ"
    assert m_whole == m_res



def test_checkpoint_writes_stay_in_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save writes its temporary file beside the checkpoint, never in $TMPDIR (where a run killed mid-save
    left a checkpoint-sized file forever), and a training run removes the partial files that a killed save
    left in its checkpoint folder."""
    temps: list[Path] = []
    mkstemp = tempfile.mkstemp

    def recording(*args: object, **kwargs: object) -> tuple[int, str]:
        fd, name = mkstemp(*args, **kwargs)  # type: ignore[call-overload]
        temps.append(Path(name))
        return fd, name

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", recording)
    monkeypatch.delenv("SEGROUTER_RUN_VERSION", raising=False)
    fit = ["fit", "--recipe", TINY, f"output_dir={tmp_path}", "name=run", "checkpoint.every_n_train_steps=2"]
    assert main([*fit, "trainer.max_steps=4"]) == 0
    ckpts = tmp_path / "run" / "version_0" / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert [p for p in temps if not p.is_relative_to(tmp_path / "run")] == []
    assert list((tmp_path / "tmp").iterdir()) == []

    (ckpts / "last.ckpt.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")  # what a SIGKILL mid-save leaves
    assert main([*fit, "--resume", "trainer.max_steps=6"]) == 0
    assert not list(ckpts.glob("*.tmp"))
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 6



def test_a_kill_during_the_validation_of_a_checkpointed_step_keeps_that_validation(tmp_path: Path) -> None:
    """The step checkpoint of a step that validates is written after that validation: a run killed during it
    resumes from the step before and validates again, so it keeps the validations and the best checkpoint of
    the run not killed (written before, the checkpoint skipped that validation on resume for good)."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "killer.py").write_text(KILLER)
    # one validation batch every 3 steps, two evaluation forwards each (the mask, then the name probe), and a
    # step checkpoint at each of them
    fit = ("trainer.val_check_interval=3", "checkpoint.every_n_train_steps=3", "trainer.limit_val_batches=1")
    assert _fit(tmp_path, "whole", *fit).returncode == 0
    killed = _fit(tmp_path, "resumed", *fit, kill_at_eval=3)  # inside the validation at step 6
    assert killed.returncode == -signal.SIGKILL
    ckpts = tmp_path / "resumed" / "version_0" / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 3  # after its validation
    resumed = _fit(tmp_path, "resumed", "--resume", *fit)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def validations(name: str) -> list[tuple[str, str]]:
        return [(r["step"], r["val/ciou"]) for r in _rows(tmp_path / name / "version_0") if r.get("val/ciou")]

    assert validations("resumed") == validations("whole")
    assert "5" in [step for step, _ in validations("whole")]  # the validation at global step 6 (logged 0-based)
    best = {name: sorted(p.name for p in (tmp_path / name / "version_0" / "checkpoints").glob("best-*.ckpt"))
            for name in ("whole", "resumed")}
    assert best["resumed"] == best["whole"]


MARKER = """
import os
import time
from pathlib import Path

from segrouter.registry import register
from segrouter.routing.full import FullRouting

MARKS = Path(os.environ["MARK_DIR"])
(MARKS / "imported").touch()  # start-up: the plugins load before the recipe is validated and the model built


@register("routing", "mark_phase")
class MarkPhase(FullRouting):
    \"\"\"Full routing that leaves $MARK_DIR/training at each training forward, and $MARK_DIR/validating at the
    first validation forward, which then waits a second (time for the signal to arrive mid-validation).\"\"\"

    def forward(self, llm, seq):
        if self.training:
            (MARKS / "training").touch()
        elif not (MARKS / "validating").exists():
            (MARKS / "validating").touch()
            time.sleep(1)
        return super().forward(llm, seq)
"""


def _signalled_fit(tmp_path: Path, mark: str, signum: int, *extra: str) -> tuple[int, str]:
    """``segrouter fit`` in a child process, sent ``signum`` once $MARK_DIR/``mark`` exists: (exit code, stderr)."""
    marks, plugins = tmp_path / "marks", tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "marker.py").write_text(MARKER)
    marks.mkdir(exist_ok=True)
    for old in marks.iterdir():
        old.unlink()
    env = {**os.environ, "MARK_DIR": str(marks)}
    env.pop("SEGROUTER_RUN_VERSION", None)
    cmd = [sys.executable, "-m", "segrouter.cli", "fit", "--recipe", TINY, "--plugins", str(plugins),
           f"output_dir={tmp_path}", "model.routing.name=mark_phase", *extra]
    with open(tmp_path / "stderr.txt", "w") as err, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                                       stderr=err) as proc:
        deadline = time.monotonic() + 300
        while not (marks / mark).exists():
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {mark} mark after 300 s"
            time.sleep(0.05)
        proc.send_signal(signum)
        try:
            code = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return code, (tmp_path / "stderr.txt").read_text()


def _one_line(stderr: str) -> str:
    ours = [line for line in stderr.splitlines() if line.startswith("segrouter:")]
    assert len(ours) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return ours[0]


@pytest.mark.parametrize(("signum", "code", "phase"), [
    (signal.SIGTERM, 143, "training"), (signal.SIGINT, 130, "training"), (signal.SIGTERM, 143, "validating")])
def test_a_signal_during_fit_saves_a_resumable_checkpoint_and_exits_non_zero(
    tmp_path: Path, signum: int, code: int, phase: str
) -> None:
    # no validation before step 1000 while training; one at step 3 (in which the signal comes) otherwise.
    # every_n_train_steps: the resumed run, too short to validate, writes last.ckpt at its final step
    vci = 1000 if phase == "training" else 3
    fit = ["trainer.max_steps=1000", f"trainer.val_check_interval={vci}", "checkpoint.every_n_train_steps=1000"]
    rc, stderr = _signalled_fit(tmp_path, phase, signum, *fit)
    line = _one_line(stderr)
    assert rc == code and f"interrupted by {signal.Signals(signum).name}; stopped after global step" in line, line
    run = tmp_path / "tiny" / "version_0"
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step >= 1 and f"global step {step};" in line
    if phase == "validating":  # the validation the signal came in finished: its row and best checkpoint are kept
        assert step == 3 and (run / "checkpoints" / "best-3.ckpt").exists()
        assert any(r.get("val/ciou") for r in _rows(run))
    if signum == signal.SIGTERM:
        env = {**os.environ, "MARK_DIR": str(tmp_path / "marks")}
        env.pop("SEGROUTER_RUN_VERSION", None)
        resumed = subprocess.run([sys.executable, "-m", "segrouter.cli", "fit", "--recipe", TINY, "--resume",
                                  "--plugins", str(tmp_path / "plugins"), f"output_dir={tmp_path}",
                                  "model.routing.name=mark_phase", *fit, f"trainer.max_steps={step + 1}"],
                                 env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step + 1


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path: Path) -> None:
    rc, stderr = _signalled_fit(tmp_path, "imported", signal.SIGINT)
    assert rc == 130 and _one_line(stderr) == "segrouter: interrupted by SIGINT", stderr[-3000:]
    # the seconds-long imports (torch, Lightning) run inside main(), under its handlers, not before it
    probe = "import sys, segrouter.cli; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout == "[]\n"


def test_lightning_banner_is_logged_when_the_run_starts(tmp_path: Path) -> None:
    """The lines Lightning logs while the Trainer is built (accelerators found, a tip) come when the run starts:
    an error between building the trainer and the run is its one line, without them."""
    from segrouter.build import build
    from segrouter.recipe import load_recipe
    from segrouter.training.trainer import build_trainer

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        cfg = load_recipe(TINY, [f"output_dir={tmp_path}"])
        trainer = build_trainer(cfg, version=0)
        assert not any("GPU available" in line for line in seen), seen
        model, data = build(cfg)
        trainer.validate(model, datamodule=data)
        assert any(line.startswith("GPU available") for line in seen), seen
        assert len([line for line in seen if line.startswith("GPU available")]) == 1
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
