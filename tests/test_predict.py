"""``segrouter predict`` (single, jsonl, folder; errors) and ``consolidate`` from a 2-step tiny fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segrouter.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    assert main(["fit", "--recipe", TINY, f"output_dir={out}"]) == 0
    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    return out / "tiny" / "version_0" / "checkpoints" / "last.ckpt"


def _image(path: Path, h: int = 24, w: int = 40) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_single_image_writes_mask_and_overlay_at_original_size(ckpt: Path, tmp_path: Path) -> None:
    img = _image(tmp_path / "in.png")
    rc = main(["predict", "--recipe", TINY, "--ckpt", str(ckpt), "--image", str(img), "--text", "the red circle",
               "--out", str(tmp_path / "m.png"), "--overlay", str(tmp_path / "o.png")])
    assert rc == 0
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert mask.shape == (24, 40) and set(np.unique(mask)) <= {0, 255}
    ov = Image.open(tmp_path / "o.png")
    assert ov.size == (40, 24) and ov.mode == "RGB"


def test_jsonl_and_folder_modes(ckpt: Path, tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.jpg", 30, 20)
    lines = [{"image": "a.png", "text": "the blue square", "out": "out/a.png"},
             {"image": "b.jpg", "text": "the green shape", "out": "out/b.png", "overlay": "out/b_ov.png"}]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert main(["predict", "--recipe", TINY, "--ckpt", str(ckpt), "--jsonl", str(tmp_path / "jobs.jsonl")]) == 0
    assert np.asarray(Image.open(tmp_path / "out" / "b.png")).shape == (30, 20)
    assert (tmp_path / "out" / "a.png").exists() and (tmp_path / "out" / "b_ov.png").exists()
    rc = main(["predict", "--recipe", TINY, "--ckpt", str(ckpt), "--folder", str(tmp_path), "--text", "the shape",
               "--out-dir", str(tmp_path / "f")])
    assert rc == 0 and {p.name for p in (tmp_path / "f").iterdir()} == {
        "a_mask.png", "a_overlay.png", "b_mask.png", "b_overlay.png",
    }


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_bad_image_is_one_line_exit_2(ckpt: Path, tmp_path: Path, kind: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "x.jpg"
    if kind == "corrupt":
        img.write_bytes(b"not an image")
    rc = main(["predict", "--recipe", TINY, "--ckpt", str(ckpt), "--image", str(img), "--text", "a",
               "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(img) in err[0], err
    assert not (tmp_path / "m.png").exists()


def test_an_output_that_is_an_input_image_is_refused(ckpt: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    img = _image(tmp_path / "in.png")
    before = img.read_bytes()
    for out in (["--out", str(tmp_path / "sub" / ".." / "in.png")],
                ["--out", str(tmp_path / "m.png"), "--overlay", str(img)]):
        rc = main(["predict", "--recipe", TINY, "--ckpt", str(ckpt), "--image", str(img), "--text", "a", *out])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "is an input image" in err[0], err
    assert img.read_bytes() == before and not (tmp_path / "m.png").exists()


def test_deepspeed_checkpoint_consolidates_and_predicts(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("SEGROUTER_RUN_VERSION", None)
    proc = subprocess.run([sys.executable, "-m", "segrouter.cli", "fit", "--recipe", TINY, f"output_dir={tmp_path}",
                           "trainer.strategy=deepspeed_stage_2", "trainer.accelerator=cpu"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert shards.is_dir()
    assert main(["consolidate", "--ckpt", str(shards), "--out", str(tmp_path / "model.ckpt")]) == 0
    img = _image(tmp_path / "in.png")
    assert main(["predict", "--recipe", TINY, "--ckpt", str(tmp_path / "model.ckpt"), "--image", str(img),
                 "--text", "the shape", "--out", str(tmp_path / "m.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "m.png")).shape == (24, 40)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--device", "gpu0"], "unknown --device 'gpu0' — use cpu, cuda or cuda:N"),
        (["--device", "cuda:99"], "--device cuda:99: this machine has"),
        (["--device", "meta"], "--device meta: segrouter runs on cpu or cuda"),
        (["--out", "OUTDIR"], "is a folder — name a file to write"),
        (["--out", "AFILE/m.png"], "cannot be written: "),
        (["--overlay", "AFILE/sub/o.png"], "cannot be written: "),
    ],
)
def test_bad_device_or_output_path_is_one_line_before_the_model(ckpt: Path, tmp_path: Path, extra: list[str],
                                                                fragment: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    img = _image(tmp_path / "in.png")
    (tmp_path / "OUTDIR").mkdir()
    (tmp_path / "AFILE").write_text("a file where a folder would go")
    extra = [str(tmp_path / e) if e.startswith(("OUTDIR", "AFILE")) else e for e in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "m.png")]
    rc = main(["predict", "--recipe", TINY, "--ckpt", str(ckpt), "--image", str(img), "--text", "a", *out, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and fragment in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "m.png").exists()
