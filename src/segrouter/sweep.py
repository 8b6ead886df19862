"""``segrouter sweep``: fit several recipes (times a grid of overrides) one after another, then compare them.

Every run is a fresh ``python -m segrouter.cli fit`` process: runs cannot leak state (seeds, plugin
registrations, CUDA memory, the cached run version) into each other, and one crash does not end the sweep —
it is reported, and the next run starts. All recipes and grid points are validated before the first run,
so a typo fails in a second, not after hours of training. Grid points get their own run names
(``{name}-{key}={value}...``) so each lands in its own folder under ``--out``. A run that exits non-zero,
including one stopped by a signal (143, 130), is a failed run. SIGTERM or SIGINT to the sweep is passed on to
the running fit, which saves a resumable checkpoint and exits; then the sweep stops (it does not start the
next run) with that run's exit code.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

from segrouter.compare import compare
from segrouter.errors import SegrouterError
from segrouter.interrupts import Interrupted, deferred


@dataclass(frozen=True)
class Job:
    recipe: str
    overrides: tuple[str, ...]
    name: str


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``key=v1,v2`` → (key, [v1, v2]); commas inside [...] or {...} belong to the value (``keep=[1,0.5],[1,1]``)."""
    grid = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        values, depth, current = [], 0, ""
        for ch in text:
            if ch == "," and depth == 0:
                values.append(current)
                current = ""
                continue
            depth += (ch in "[{") - (ch in "]}")
            current += ch
        values.append(current)
        if not sep or not key or any(not v for v in values):
            raise SegrouterError(f"--grid '{spec}' is not KEY=V1,V2,...",
                                 fix="e.g. --grid model.routing.ratio=0.25,0.5")
        grid.append((key, values))
    return grid


_UNSAFE = re.compile(r"[^\w.,+=-]+")


def _suffix(point: tuple[str, ...]) -> str:
    """``("model.routing.ratio=0.25", "model.routing.keep=[1,0.5]")`` → ``-ratio=0.25-keep=1,0.5`` (folder-safe)."""
    parts = (p.split("=", 1) for p in point)
    return "".join(f"-{key.rsplit('.', 1)[-1]}={_UNSAFE.sub('_', value).strip('_')}" for key, value in parts)


def plan(recipes: list[str], grid: list[tuple[str, list[str]]], overrides: list[str], out: str) -> list[Job]:
    """Validate every (recipe, grid point) and name its run; raises before anything runs."""
    from segrouter.recipe import load_recipe

    points = list(itertools.product(*[[f"{key}={v}" for v in values] for key, values in grid]))
    jobs = []
    for recipe in recipes:
        for point in points:
            base = [*overrides, *point, f"output_dir={out}"]
            name = load_recipe(recipe, base).name + _suffix(point)
            jobs.append(Job(recipe, (*base, f"name={name}"), name))
    return jobs


def _versions(folder: Path) -> set[Path]:
    return {p for p in folder.glob("version_*") if re.fullmatch(r"version_\d+", p.name)}


def run_job(job: Job, out: Path, plugins: list[str]) -> tuple[int, Path | None]:
    """Fit one job in a fresh process; return its exit code and the run folder it created (if any)."""
    before = _versions(out / job.name)
    env = {k: v for k, v in os.environ.items() if k != "SEGROUTER_RUN_VERSION"}  # each run picks its own version
    plugin_args = [a for d in plugins for a in ("--plugins", d)]
    cmd = [sys.executable, "-m", "segrouter.cli", "fit", "--recipe", job.recipe, *plugin_args, *job.overrides]
    running: list[Popen[bytes]] = []
    with deferred(on_signal=lambda signum: [p.send_signal(signum) for p in running]) as notes:
        with Popen(cmd, env=env) as proc:
            running.append(proc)
            code = proc.wait()  # a signal to the sweep goes on to the fit, which saves a checkpoint and exits
    if notes.signum is not None:
        raise Interrupted(notes.signum,
                          f"sweep run {job.name} stopped (exit code {code}); the runs after it did not start")
    created = sorted(_versions(out / job.name) - before, key=lambda p: int(p.name.split("_")[1]))
    return code, (created[-1] if created else None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes", nargs="+", required=True, metavar="RECIPE",
                   help="recipe YAMLs; key=value overrides may follow")
    p.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2",
        help="values to sweep (repeatable; all combinations run)",
    )
    p.add_argument("--out", default="runs/sweep", metavar="DIR", help="output_dir of every run (default: runs/sweep)")
    p.add_argument("--metric", default="val/ciou", help="picks each run's best step in the comparison")
    p.add_argument("--plot", metavar="PNG", help="write a Pareto plot (cIoU vs LLM FLOPs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides applied to every run")


def run(args: argparse.Namespace) -> int:
    # --recipes takes every following word, so overrides written after the recipes land there: split them off
    recipes = [r for r in args.recipes if "=" not in r]
    overrides = [r for r in args.recipes if "=" in r] + list(args.overrides)
    if not recipes:
        raise SegrouterError("no recipe to sweep", fix="pass recipe files to --recipes")
    out = Path(args.out)
    jobs = plan(recipes, parse_grid(args.grid), overrides, str(out))
    runs: list[Path] = []
    failed: list[str] = []
    for i, job in enumerate(jobs, 1):
        print(f"segrouter: sweep run {i}/{len(jobs)}: {job.name} ({job.recipe})", file=sys.stderr, flush=True)
        code, run = run_job(job, out, args.plugins)
        if run is not None:
            runs.append(run)
        if code != 0:
            failed.append(job.name)
            where = f"partial logs in {run}" if run is not None else "no run folder"
            print(f"segrouter: sweep run {job.name} failed (exit code {code}; {where}); continuing",
                  file=sys.stderr, flush=True)
    if runs:
        print(compare(runs, metric=args.metric, plot=args.plot), end="")
    if failed:
        raise SegrouterError(f"{len(failed)} of {len(jobs)} sweep runs failed: {', '.join(failed)}",
                             fix="see their output above")
    return 0
