"""``segrouter`` command line: fit, validate, test, predict, bench, analyze, compare, sweep, consolidate, list.

Every user-fixable problem ends as one line on stderr and exit code 2 (see :mod:`segrouter.errors`);
the recipe is loaded and fully validated before any model is built or any file is written. SIGTERM and
SIGINT end any command with one line and exit code 143/130 (see :mod:`segrouter.interrupts`); the heavy
imports (torch, Lightning) happen inside :func:`main`, so even Ctrl-C during start-up prints no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("--plugins", action="append", default=[], metavar="DIR", help="extra plugin folder (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. trainer.max_steps=100")


def build_parser() -> argparse.ArgumentParser:
    from segrouter import bench, compare, consolidate, predict, sweep
    from segrouter.analysis import attention
    from segrouter.recipe import CONTROLS

    parser = _Parser(prog="segrouter", description="Efficient segmentation with multimodal LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train a recipe")
    _common(fit)
    fit.add_argument("--resume", action="store_true", help="resume from --ckpt, or from this recipe's newest last.ckpt")
    fit.add_argument("--ckpt", help="checkpoint to resume from (with --resume)")
    fit.add_argument("--other-recipe", action="store_true",
                     help="with --resume --ckpt: continue a checkpoint saved by another recipe (name) as a new run of "
                          "this one (its architecture must still fit)")
    for name in ("validate", "test"):
        p = sub.add_parser(name, help=f"evaluate a checkpoint on the {'val' if name == 'validate' else 'test'} split")
        _common(p)
        p.add_argument("--ckpt", help="checkpoint (default: the newest run's best)")
        p.add_argument("--control", choices=CONTROLS,
                       help="evaluate with the LLM's visual tokens shuffled across the batch or zeroed "
                            "(sets metrics.control; metrics are logged under the usual names)")
        p.add_argument("--training-free", action="store_true",
                       help="apply this recipe's method to --ckpt, trained without it (e.g. a full model): "
                            "parameters the checkpoint lacks keep their initialisation (sets metrics.training_free)")
    bench.add_parser(sub)
    predict.add_parser(sub)
    consolidate.add_parser(sub)
    attention.add_parser(sub)
    compare.add_compare_parser(sub)
    sweep.add_sweep_parser(sub)
    ls = sub.add_parser("list", help="list registered components")
    ls.add_argument("kind", nargs="?", help="component kind (default: all)")
    ls.add_argument("--plugins", action="append", default=[], metavar="DIR")
    return parser


def _prepare(args: argparse.Namespace) -> Any:
    from segrouter.recipe import load_recipe
    from segrouter.registry import load_plugins

    load_plugins(args.plugins)
    return load_recipe(args.recipe, args.overrides)


def cmd_fit(args: argparse.Namespace) -> None:
    from segrouter.build import build
    from segrouter.checkpoints import check_resumable
    from segrouter.runs import check_output_dir, find_resume, next_version
    from segrouter.training.trainer import build_trainer

    cfg = _prepare(args)
    if cfg.metrics.training_free:
        raise SegrouterError("metrics.training_free describes an evaluation, not a training run",
                             fix="start a fine-tune from a checkpoint with init_from=PATH instead")
    if args.ckpt is not None and not args.resume:
        raise SegrouterError("--ckpt on fit needs --resume", fix="add --resume to continue training from that checkpoint")
    if args.other_recipe and not args.ckpt:
        raise SegrouterError("--other-recipe needs --resume --ckpt PATH", fix="name the checkpoint to continue")
    version, ckpt = find_resume(cfg, "last" if args.ckpt is None else args.ckpt) if args.resume else (None, None)
    check_output_dir(cfg)
    model, data = build(cfg, init_weights=not args.resume)
    if ckpt is not None:  # before anything is written: a checkpoint that cannot be resumed stops here, in one line
        check_resumable(model, ckpt, cfg.name, other_recipe=args.other_recipe)
    if version is None:
        version = next_version(cfg)
    trainer = build_trainer(cfg, version=version)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
    if trainer.is_global_zero:
        cb = trainer.checkpoint_callback
        best = getattr(cb, "best_model_score", None)
        metric = cfg.checkpoint.monitor
        score = f"{metric}={float(best):.4f}" if best is not None else "no monitored score"
        print(f"segrouter: fit done ({score}); run folder: {log_dir}; best: {getattr(cb, 'best_model_path', '')}")


def cmd_eval(args: argparse.Namespace) -> None:
    from segrouter.build import build
    from segrouter.checkpoints import load_weights
    from segrouter.runs import check_output_dir, find_eval_checkpoint, next_version
    from segrouter.training.trainer import build_trainer

    if args.control:
        args.overrides.append(f"metrics.control={args.control}")
    if args.training_free:
        args.overrides.append("metrics.training_free=true")
    cfg = _prepare(args)
    training_free = bool(cfg.metrics.training_free)
    if training_free and not args.ckpt:
        raise SegrouterError("--training-free needs --ckpt", fix="name the checkpoint trained without this recipe's "
                             "method, e.g. --ckpt runs/full/version_0/checkpoints/last.ckpt")
    ckpt = find_eval_checkpoint(cfg, args.ckpt)
    check_output_dir(cfg)  # evaluation logs into a new version folder
    model, data = build(cfg)
    sharded = Path(ckpt).is_dir()  # DeepSpeed's checkpoint folder: only its strategy can read it
    if not sharded or training_free:  # a checkpoint of another recipe fails here, in one line, before any run folder
        fresh = load_weights(model, ckpt, allow_missing=True)
        if fresh and not training_free:
            raise SegrouterError(
                f"checkpoint {ckpt} does not fit the recipe ({len(fresh)} of its model's tensors are not in it, "
                f"e.g. {fresh[0]})", fix="pass the recipe (and overrides) it was trained with, or add --training-free "
                "to evaluate this recipe's method on it with those tensors at their initialisation")
        if training_free:
            print(f"segrouter: training-free: {training_free_note(model, fresh, ckpt)}", file=sys.stderr)
    trainer = build_trainer(cfg, version=next_version(cfg))
    run = trainer.validate if args.command == "validate" else trainer.test
    run(model, datamodule=data, ckpt_path=ckpt if sharded else None)


def training_free_note(model: Any, fresh: list[str], ckpt: str) -> str:
    """One line: which of ``model``'s tensors are not in ``ckpt`` (by module, e.g. ``routing.projectors (8)``), and
    what they compute at their initialisation."""
    if not fresh:
        return f"every tensor comes from {ckpt} (routing '{model.cfg.model.routing.name}' adds none)"
    groups: dict[str, dict[str, int]] = {}  # top-level part -> module -> tensors
    for key in fresh:
        names = key.split(".")
        module = ".".join(names[:2]) if len(names) > 2 else names[0]
        groups.setdefault(names[0], {})[module] = groups.get(names[0], {}).get(module, 0) + 1
    said = [", ".join(f"{m} ({n})" for m, n in modules.items()) + ": "
            + (model.routing.initial_state() if part == "routing" else "as a fresh model builds them")
            for part, modules in groups.items()]
    return f"{len(fresh)} tensors are not in {ckpt} and keep their initialisation — {'; '.join(said)}"


def cmd_list(args: argparse.Namespace) -> None:
    from segrouter.registry import KINDS, load_plugins, registry

    load_plugins(args.plugins)
    kinds = [registry(args.kind).kind] if args.kind else list(KINDS)
    for kind in kinds:
        print(kind)
        for entry in registry(kind).entries():
            print(f"  {entry.name:<18} {entry.source}")
            params = entry.params().values()
            print("      " + (", ".join(p.describe() for p in params) if params else "(no parameters)"))


def commands() -> dict[str, Callable[[argparse.Namespace], None]]:
    from segrouter import bench, compare, consolidate, predict, sweep
    from segrouter.analysis import attention

    return {
        "fit": cmd_fit,
        "validate": cmd_eval,
        "test": cmd_eval,
        "list": cmd_list,
        "bench": bench.cmd_bench,
        "analyze": attention.cmd_analyze,
        "compare": compare.cmd_compare,
        "sweep": sweep.cmd_sweep,
        "predict": predict.cmd_predict,
        "consolidate": consolidate.cmd_consolidate,
    }


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
    try:
        commands()[args.command](args)
    except SegrouterError as exc:
        print(f"segrouter: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _teardown_distributed()
    return 0


def _teardown_distributed() -> None:
    """Destroy the process group before exit: gloo aborts the interpreter if it is torn down late."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
