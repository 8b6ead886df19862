"""``segrouter list``: the registered components of each kind (plugins included), with their recipe parameters.

What it prints is what a recipe may name and set: each component's name, where it comes from (a built-in
module or a plugin file), its keyword-only parameters with their types and defaults, and its ``note`` where it
has one (e.g. that ``sam_superpixel`` runs a SLIC fallback by default).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", nargs="?", help="component kind (default: all)")


def run(args: argparse.Namespace) -> int:
    from segrouter.registry import KINDS, registry

    kinds = [registry(args.kind).kind] if args.kind else list(KINDS)
    for kind in kinds:
        print(kind)
        for entry in registry(kind).entries():
            print(f"  {entry.name:<18} {entry.source}")
            params = entry.params().values()
            print("      " + (", ".join(p.describe() for p in params) if params else "(no parameters)"))
            note = vars(entry.factory).get("note")  # its own (not a base class's): what to know before naming it
            if note:
                print(f"      note: {note}")
    return 0
