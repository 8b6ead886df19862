"""``segrouter consolidate``: a DeepSpeed (ZeRO-2/3) checkpoint folder → one fp32 ``.ckpt`` file.

DeepSpeed saves ``last.ckpt/`` as a folder of per-rank shards; ``validate``/``test`` under the same
DeepSpeed strategy read it directly, but ``predict``, other strategies and other tools need one file.
Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` gathers the shards (on CPU, no GPU needed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segrouter.errors import SegrouterError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="DeepSpeed checkpoint folder (e.g. checkpoints/last.ckpt/)")
    p.add_argument("--out", required=True, help="output file, e.g. model.ckpt")


def run(args: argparse.Namespace) -> int:
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    src, out = Path(args.ckpt), Path(args.out)
    if not src.is_dir() or not (src / "latest").is_file():
        raise SegrouterError(f"{src} is not a DeepSpeed checkpoint folder (no 'latest' file)",
                             fix="pass the .ckpt folder a DeepSpeed run saved")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        convert_zero_checkpoint_to_fp32_state_dict(str(src), str(out))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SegrouterError(f"cannot consolidate {src}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}",
                             fix="check the folder is complete (one shard per rank)") from None
    print(f"segrouter: consolidated {src} → {out}")
    return 0
