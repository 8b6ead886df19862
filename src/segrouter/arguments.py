"""Command-line values shared by the subcommands, checked before anything is built or written: a bad count is
refused by argparse itself (one line naming the flag, exit code 2), a device or an output path by
:class:`~segrouter.errors.SegrouterError` (one line, exit code 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from segrouter.errors import SegrouterError

if TYPE_CHECKING:
    import torch


def at_least(minimum: int) -> Callable[[str], int]:
    """A whole number >= ``minimum`` (``type=at_least(1)`` for counts, ``at_least(0)`` for optional ones)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"whole number >= {minimum}"  # argparse names the type in some messages
    return parse


def checked_device(name: str) -> torch.device:
    """``--device``: a name torch knows, of a device this machine has (cpu, cuda, cuda:N)."""
    import torch  # not at import: the CLI parses its arguments before the seconds-long torch import

    fix = "use cpu, cuda or cuda:N"
    try:
        found = torch.device(name)
    except RuntimeError:
        raise SegrouterError(f"unknown --device '{name}'", fix=fix) from None
    if found.type not in ("cpu", "cuda"):
        raise SegrouterError(f"--device {name}: segrouter runs on cpu or cuda", fix=fix)
    if found.type == "cuda" and not torch.cuda.is_available():
        raise SegrouterError(f"--device {name}: this machine has no CUDA device", fix="use --device cpu")
    if found.type == "cuda" and found.index is not None and found.index >= torch.cuda.device_count():
        raise SegrouterError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices", fix=fix)
    return found


def output_file(path: str | Path, what: str) -> Path:
    """A file a command will write (``what`` names it in the error, e.g. ``--out``): not a folder, and no file
    standing where a folder of its path must be."""
    out = Path(path)
    if out.is_dir():
        raise SegrouterError(f"{what} {out} is a folder", fix="name a file to write")
    blocked = file_in_the_way(out.parent)
    if blocked is not None:
        raise SegrouterError(f"{what} {out} cannot be written: {blocked} is a file", fix="name a file under a folder")
    return out


def file_in_the_way(folder: Path) -> Path | None:
    """The file that stands at ``folder`` or at one of its parents, where a folder must be (None: none does)."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
