"""``segrouter`` command line: fit, validate, test, predict, chat, bench, card, analyze, compare, sweep,
consolidate, import, list.

Every user-fixable problem ends as one line on stderr and exit code 2 (see :mod:`segrouter.errors`);
the recipe is loaded and fully validated before any model is built or any file is written. SIGTERM and
SIGINT end any command with one line and exit code 143/130 (see :mod:`segrouter.interrupts`); the heavy
imports (torch, Lightning) happen inside :func:`main`, so even Ctrl-C during start-up prints no traceback.

Every subcommand has its own module with the same two functions, ``add_arguments(parser)`` and
``run(args) -> int`` (LitGPT's one table): :data:`COMMANDS` names them all, with their help lines and the
options they share (declared once, e.g. ``--plugins``), so adding a command is one module and one table row.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
import warnings
from typing import NamedTuple

from segrouter import interrupts
from segrouter.errors import SegrouterError

_QUIET = (
    r".*does not have many workers.*",
    r".*The number of training batches.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*torch.utils._pytree.*",
    r".*when logging on epoch level in distributed setting.*",  # our eval metrics are torchmetrics-synced
    r".*isinstance\(treespec, LeafSpec\).*",
)


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is a :class:`SegrouterError` (one line, exit code 2)."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        raise SegrouterError(message, fix=f"see '{self.prog} --help'")


class Command(NamedTuple):
    """A subcommand: the module that implements it and its one-line help."""

    module: str  # exposes add_arguments(parser: ArgumentParser) -> None and run(args: Namespace) -> int
    help: str
    shared: tuple[str, ...] = ()  # options declared once for several commands, see _shared_options


COMMANDS: dict[str, Command] = {  # in the order of `segrouter --help`
    "fit": Command("segrouter.fit", "train a recipe", ("recipe", "plugins")),
    "validate": Command("segrouter.evaluate", "evaluate a checkpoint on the val split", ("recipe", "plugins")),
    "test": Command("segrouter.evaluate", "evaluate a checkpoint on the test split", ("recipe", "plugins")),
    "bench": Command("segrouter.bench", "LLM FLOPs and wall time of recipe A vs recipe B, side by side", ("plugins",)),
    "card": Command("segrouter.card", "efficiency card: a recipe's FLOPs and speed at the testbed and real LLM "
                    "shapes, beside its runs' accuracy", ("plugins",)),
    "predict": Command("segrouter.predict", "segment your own images from a checkpoint", ("plugins",)),
    "chat": Command("segrouter.chat", "talk to a checkpoint about an image: generated answers and their masks",
                    ("plugins",)),
    "consolidate": Command("segrouter.consolidate", "merge a DeepSpeed checkpoint folder into one .ckpt file"),
    "import": Command("segrouter.importer", "turn a published model's checkpoint (lisa) into a recipe and checkpoint",
                      ("plugins",)),
    "analyze": Command("segrouter.analysis.attention", "analyses of a trained model", ("plugins",)),
    "compare": Command("segrouter.compare", "compare finished runs (accuracy vs efficiency)"),
    "sweep": Command("segrouter.sweep", "fit several recipes / a grid of overrides, then compare the runs",
                     ("plugins",)),
    "list": Command("segrouter.listing", "list registered components", ("plugins",)),
}


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """Parent parsers for the options several commands take alike. The CLI loads ``--plugins`` folders itself,
    once, before a command runs."""
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
    recipe.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides, e.g. trainer.max_steps=100")
    recipe.add_argument("--print-recipe", action="store_true",
                        help="print the resolved, validated recipe (YAML) and exit, building and writing nothing")
    plugins = argparse.ArgumentParser(add_help=False)
    plugins.add_argument("--plugins", action="append", default=[], metavar="DIR",
                         help="extra plugin folder (repeatable)")
    return {"recipe": recipe, "plugins": plugins}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segrouter", description="Efficient segmentation with multimodal LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    shared = _shared_options()
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, parents=[shared[s] for s in command.shared])
        importlib.import_module(command.module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    with interrupts.raising():
        try:
            return _main(argv)
        except interrupts.Interrupted as exc:
            print(f"segrouter: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:  # off the main thread, where the handlers of interrupts.raising cannot be set
            print("segrouter: interrupted by SIGINT", file=sys.stderr)
            return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)  # overrides may follow options: fit --recipe R --resume a=1
        if extra:
            if any(x.startswith("-") for x in extra) or not hasattr(args, "overrides"):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides += extra
    except SegrouterError as exc:
        print(f"segrouter: error: {exc}", file=sys.stderr)
        return 2
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = COMMANDS[args.command]
    try:
        if "plugins" in command.shared:
            from segrouter.registry import load_plugins

            load_plugins(args.plugins)
        return importlib.import_module(command.module).run(args)
    except SegrouterError as exc:
        print(f"segrouter: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _teardown_distributed()


def _teardown_distributed() -> None:
    """Destroy the process group before exit: gloo aborts the interpreter if it is torn down late."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
