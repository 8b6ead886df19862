"""``segrouter chat``: talk to a trained checkpoint about one image at a time, as LISA's ``chat.py`` does.

Each line typed is a request about the current image; the LLM writes its answer (greedy, with the KV cache its
routing strategy filled, exactly as ``predict --generate``: :mod:`segrouter.generate`), which is printed, and
every ``[SEG]`` in it becomes a mask written to ``--out-dir`` as ``<turn>.png`` (``<turn>_2.png``, ... for
more) with the first one's overlay ``<turn>_overlay.png``. Lines starting with ``:`` are commands:
``:image PATH`` switches the image, ``:quit`` (or the end of the input) ends the session. Each turn is a new
conversation of one request and its answer (LISA's chat resets it each turn too).

A bad start (recipe, checkpoint, first image, an ``--out-dir`` that already holds files) is one line and exit
code 2 before the model is built; within the session a bad line (an unreadable image, an unknown command) is
one line and the session goes on. Masks never overwrite files: the output folder must start empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segrouter.arguments import at_least, checked_device, file_in_the_way
from segrouter.errors import SegrouterError

COMMANDS_HELP = ":image PATH switches the image, :quit ends"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="the recipe the checkpoint was trained with")
    p.add_argument("--ckpt", help="checkpoint (default: the newest run's best)")
    p.add_argument("--image", required=True, help="the image to talk about first")
    p.add_argument("--out-dir", required=True, help="an empty or new folder for the masks of every turn")
    p.add_argument("--max-new-tokens", type=at_least(1), default=32, help="answer length limit")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda where there is one)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")


def _out_dir(path: str) -> Path:
    out = Path(path)
    blocked = file_in_the_way(out)
    if blocked is not None:
        raise SegrouterError(f"--out-dir {out} cannot be a folder: {blocked} is a file", fix="name a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise SegrouterError(f"--out-dir {out} already holds files, which the session's masks could overwrite",
                             fix="name a new or empty folder")
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from segrouter.predict import generate_masks, load_model, read_image, write_generated

    out = _out_dir(args.out_dir)
    image_path = Path(args.image)
    image = read_image(image_path)  # before the (slow) build: a typo is one line, exit 2
    device = checked_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, data = load_model(args.recipe, args.overrides, args.ckpt, device)
    interactive = sys.stdin.isatty()
    print(f"segrouter chat: {image_path} ({COMMANDS_HELP})", flush=True)
    turn = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith(":"):
            command, _, rest = text.partition(" ")
            if command == ":quit":
                return 0
            if command != ":image" or not rest.strip():
                print(f"segrouter: error: unknown command {text!r} — {COMMANDS_HELP}", flush=True)
                continue
            try:
                image, image_path = read_image(Path(rest.strip())), Path(rest.strip())
            except SegrouterError as exc:
                print(f"segrouter: error: {exc}", flush=True)
                continue
            print(f"segrouter chat: now {image_path}", flush=True)
            continue
        turn += 1
        answer, masks = generate_masks(model, data, image, text, device, args.max_new_tokens)
        out.mkdir(parents=True, exist_ok=True)
        wrote = write_generated(image, masks, out / f"{turn}.png", out / f"{turn}_overlay.png")
        print(f"{answer}\n  → {wrote}", flush=True)
