"""Where runs live: ``{output_dir}/{name}/version_{k}/`` with ``recipe.yaml``, ``metrics.csv`` and
``checkpoints/`` (``last.ckpt`` and ``best-step=N.ckpt``)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from segrouter.errors import SegrouterError

_VERSION_ENV = "SEGROUTER_RUN_VERSION"  # shared with DDP child processes so all ranks agree on the folder


def versions(cfg: DictConfig) -> list[Path]:
    root = Path(cfg.output_dir) / cfg.name
    found = [p for p in root.glob("version_*") if re.fullmatch(r"version_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def next_version(cfg: DictConfig) -> int:
    """A fresh version number, fixed once per launch so DDP ranks write to the same folder: the processes
    Lightning starts for local ranks > 0 take it from the launching process's environment; the launching
    process always picks a new one (a stale ``SEGROUTER_RUN_VERSION`` must not send a fresh run into an
    existing folder)."""
    if _VERSION_ENV in os.environ and int(os.environ.get("LOCAL_RANK") or 0) > 0:
        return int(os.environ[_VERSION_ENV])
    existing = versions(cfg)
    v = int(existing[-1].name.split("_")[1]) + 1 if existing else 0
    os.environ[_VERSION_ENV] = str(v)
    return v


def _not_empty(ckpt: str) -> None:
    """``--ckpt ""`` (an unset shell variable) is an error, not a request for the default checkpoint."""
    if not ckpt.strip():
        raise SegrouterError("--ckpt is empty", fix="pass a checkpoint path, or leave --ckpt out for the default")


def find_resume(cfg: DictConfig, ckpt: str) -> tuple[int | None, str]:
    """(version to continue logging in, checkpoint path) for ``--resume [CKPT]``. A checkpoint from this recipe's
    own run folder (``{output_dir}/{name}/version_N/checkpoints/``) continues that run; from anywhere else
    (another run, a copy) there is no version to continue (None: a fresh one), so nothing of another run is
    written to."""
    _not_empty(ckpt)
    if ckpt != "last":
        path = Path(ckpt)
        if not path.exists():
            raise SegrouterError(f"checkpoint not found: {ckpt}", fix="pass an existing .ckpt to --resume")
        run = path.resolve().parent.parent
        own = run.parent == (Path(cfg.output_dir) / cfg.name).resolve() and re.fullmatch(r"version_\d+", run.name)
        return (int(run.name.split("_")[1]) if own else None), str(path)
    for v in reversed(versions(cfg)):
        last = v / "checkpoints" / "last.ckpt"
        if last.exists():
            os.environ[_VERSION_ENV] = v.name.split("_")[1]
            return int(v.name.split("_")[1]), str(last)
    raise SegrouterError(
        f"no last.ckpt to resume under {Path(cfg.output_dir) / cfg.name}",
        fix="run 'segrouter fit' first, or pass a checkpoint path to --resume",
    )


def find_eval_checkpoint(cfg: DictConfig, ckpt: str | None) -> str:
    """``--ckpt`` if given, else the newest run's best checkpoint (or its last)."""
    if ckpt is not None:
        _not_empty(ckpt)
        if not Path(ckpt).exists():
            raise SegrouterError(f"checkpoint not found: {ckpt}", fix="pass an existing .ckpt to --ckpt")
        return ckpt
    for v in reversed(versions(cfg)):
        ckpts = sorted((v / "checkpoints").glob("best-*.ckpt"), key=os.path.getmtime)
        if ckpts:
            return str(ckpts[-1])
        if (v / "checkpoints" / "last.ckpt").exists():
            return str(v / "checkpoints" / "last.ckpt")
    raise SegrouterError(
        f"no checkpoint found for recipe '{cfg.name}' under {cfg.output_dir}",
        fix="pass --ckpt PATH or run 'segrouter fit' first",
    )


def check_output_dir(cfg: DictConfig) -> None:
    """Fail in one line, before anything is built, when the run folder ``{output_dir}/{name}`` cannot be
    created: a file stands on its path, or the nearest existing folder above it is not writable (asked by
    creating and removing an empty probe folder there: permission bits say nothing for root or read-only
    mounts)."""
    target = Path(cfg.output_dir) / cfg.name
    existing = next(p for p in (target, *target.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise SegrouterError(f"{existing} is a file, so the run folder {target} cannot be created",
                             where="output_dir", fix="set output_dir=DIR to a folder (or move the file)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".segrouter-probe-", dir=existing))
    except OSError as exc:
        raise SegrouterError(f"cannot create the run folder {target}: {existing} is not writable "
                             f"({exc.strerror or type(exc).__name__})",
                             where="output_dir", fix="set output_dir=DIR to a folder you can write") from None
