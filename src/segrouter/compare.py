"""``segrouter compare``: finished runs side by side — accuracy, LLM FLOPs, tokens, latency — and a Pareto plot.

A run trained without visual tokens (``model.blind_llm``) or evaluated with them shuffled or zeroed
(``metrics.control``) says so in the ``control`` column, next to its ``name_acc`` (what the LLM read). An
evaluation of a method applied to a checkpoint trained without it (``metrics.training_free``, from
``segrouter test --training-free``) says "yes" in the ``training-free`` column, so it is never read as a
fine-tuned result.

Each run is read from its folder alone (``recipe.yaml`` and ``metrics.csv``, see :mod:`segrouter.runs`), so
runs from different machines, sweeps or plugin sets can be compared without rebuilding anything. A folder
with missing or partial logs still gets a row, with "—" cells and a note saying what is missing: a
comparison of ten runs must not die on the one that crashed.

A run folder holding a ``card.json`` (``segrouter card --run ...``) shows that card's FLOPs ratio and speedup
at each of its shapes (testbed, Qwen2-0.5B, LLaMA-7B) in the "card" columns: the cost of the very configuration
whose accuracy the row shows.

Which numbers: val metrics come from the row where ``metric`` is best (max, or min for a loss), the step
shown as "best step"; efficiency numbers (visual tokens, LLM FLOPs, latency) from that same validation, else
the newest logged; test metrics are the newest logged (test runs are separate evaluations).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from segrouter.arguments import output_file
from segrouter.errors import SegrouterError, did_you_mean
from segrouter.metric_names import EVAL, monitorable

Format = Literal["table", "markdown", "csv"]
FORMATS: tuple[str, ...] = ("table", "markdown", "csv")
MISSING = "—"
_EFFICIENCY = ("visual_tokens", "llm_flops", "latency_ms")
_QUALITY = ("val/giou", "val/ciou", "val/name_acc", "test/giou", "test/ciou", "test/name_acc")


@dataclass
class RunSummary:
    """One row of the comparison; ``None`` where the run did not log the value."""

    label: str
    recipe: str | None = None
    compressor: str | None = None
    routing: str | None = None
    control: str | None = None  # blind (trained without visual tokens), shuffle or zero (evaluated so)
    training_free: bool = False  # evaluated on a checkpoint trained without its method (metrics.training_free)
    values: dict[str, float | None] = field(default_factory=dict)
    best_step: int | None = None
    notes: list[str] = field(default_factory=list)
    # from the run folder's card.json (segrouter card): per shape, (shape, FLOPs ratio, speedup) vs the card's reference
    card: list[tuple[str, float, float]] = field(default_factory=list)


def resolve_run(path: Path) -> Path:
    """A version folder as given; a recipe folder (``{output_dir}/{name}``) → its newest ``version_k``."""
    if (path / "metrics.csv").exists() or (path / "recipe.yaml").exists():
        return path
    versions = [p for p in path.glob("version_*") if re.fullmatch(r"version_\d+", p.name)]
    return max(versions, key=lambda p: int(p.name.split("_")[1])) if versions else path


def _number(cell: str | None) -> float | None:
    try:
        return float(cell) if cell not in (None, "") else None
    except ValueError:
        return None


def _last(rows: list[dict[str, float | None]], key: str) -> float | None:
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def summarize(path: Path, metric: str = "val/ciou") -> RunSummary:
    """Read one run folder into a :class:`RunSummary`; never raises for missing or broken files."""
    run = resolve_run(path)
    summary = RunSummary(label=f"{run.parent.name}/{run.name}" if run.name.startswith("version_") else run.name)
    if not run.is_dir():
        summary.notes.append("run folder not found")
        return summary
    try:
        recipe = yaml.safe_load((run / "recipe.yaml").read_text()) or {}
        model = recipe.get("model") or {}
        summary.recipe = recipe.get("name")
        summary.compressor = (model.get("compressor") or {}).get("name")
        summary.routing = (model.get("routing") or {}).get("name")
        metrics = recipe.get("metrics") or {}
        summary.control = "blind" if model.get("blind_llm") else metrics.get("control")
        summary.training_free = bool(metrics.get("training_free"))
    except FileNotFoundError:
        summary.notes.append("missing recipe.yaml")
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        summary.notes.append(f"unreadable recipe.yaml ({type(exc).__name__})")
    summary.card = _card(run, summary.notes)
    try:
        with open(run / "metrics.csv", newline="") as f:
            rows = [{k: _number(v) for k, v in row.items() if k is not None} for row in csv.DictReader(f)]
    except FileNotFoundError:
        summary.notes.append("missing metrics.csv")
        return summary
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        summary.notes.append(f"unreadable metrics.csv ({type(exc).__name__})")
        return summary
    scored = [(value, i) for i, r in enumerate(rows) if (value := r.get(metric)) is not None]
    best: dict[str, float | None] | None = None
    if scored:
        best = rows[(min if "loss" in metric else max)(scored)[1]]  # ties: the earlier (min) or later (max) step
        step = best.get("step")
        summary.best_step = int(step) if step is not None else None
    else:
        summary.notes.append(f"no {metric} logged")

    def at_best(key: str) -> float | None:
        value = best.get(key) if best is not None else None
        return value if value is not None else _last(rows, key)

    for key in _EFFICIENCY:
        summary.values[key] = at_best(f"val/{key}")
        if summary.values[key] is None:
            summary.values[key] = _last(rows, f"test/{key}")
    for key in _QUALITY:
        summary.values[key] = at_best(key) if key.startswith("val/") else _last(rows, key)
    return summary


def _card(run: Path, notes: list[str]) -> list[tuple[str, float, float]]:
    """The efficiency card saved in the run folder by ``segrouter card``, if any."""
    from segrouter.card import CARD_FILE

    try:
        card = json.loads((run / CARD_FILE).read_text())
        return [(str(r["shape"]), float(r["flops_ratio"]), float(r["speedup"])) for r in card["shapes"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        notes.append(f"unreadable {CARD_FILE} ({type(exc).__name__})")
        return []


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


_COLUMNS: tuple[tuple[str, str], ...] = (  # (header, key); the key picks value and formatting
    ("run", "label"), ("recipe", "recipe"), ("compressor", "compressor"), ("routing", "routing"),
    ("control", "control"), ("training-free", "training_free"), ("visual tokens", "visual_tokens"),
    ("LLM FLOPs", "llm_flops"), ("FLOPs ratio", "ratio"), ("latency ms", "latency_ms"), ("val gIoU", "val/giou"),
    ("val cIoU", "val/ciou"), ("val name acc", "val/name_acc"), ("test gIoU", "test/giou"), ("test cIoU", "test/ciou"),
    ("test name acc", "test/name_acc"), ("card FLOPs ratio", "card_flops"), ("card speedup", "card_speedup"),
    ("best step", "best_step"), ("notes", "notes"),
)
_TEXT_KEYS = {"label", "recipe", "compressor", "routing", "control", "training_free", "card_flops", "card_speedup",
              "notes"}


def _raw(s: RunSummary, key: str, reference: float | None) -> str | float | int | None:
    if key in ("label", "recipe", "compressor", "routing", "control"):
        return getattr(s, key)
    if key == "notes":
        return "; ".join(s.notes) or None
    if key == "training_free":
        return "yes" if s.training_free else None
    if key == "best_step":
        return s.best_step
    if key == "card_flops":
        return ", ".join(f"{shape} {ratio:.3f}" for shape, ratio, _ in s.card) or None
    if key == "card_speedup":
        return ", ".join(f"{shape} {speedup:.2f}x" for shape, _, speedup in s.card) or None
    if key == "ratio":
        flops = s.values.get("llm_flops")
        return flops / reference if flops is not None and reference else None
    return s.values.get(key)


def _pretty(key: str, value: str | float | int | None) -> str:
    if value is None:
        return MISSING
    if isinstance(value, str) or key == "best_step":
        return str(value)
    if key == "llm_flops":
        return _si(value)
    if key == "ratio":
        return f"{value:.3f}"
    if key in ("visual_tokens", "latency_ms"):
        return f"{value:.1f}"
    return f"{value:.4f}"


def render(summaries: Sequence[RunSummary], fmt: Format = "table") -> str:
    """The comparison as an aligned text table, a Markdown table, or CSV (raw numbers, empty when missing).
    FLOPs ratios are relative to the first run."""
    reference = summaries[0].values.get("llm_flops") if summaries else None
    headers = [h for h, _ in _COLUMNS]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(headers)
        for s in summaries:
            writer.writerow(["" if (v := _raw(s, k, reference)) is None else v for _, k in _COLUMNS])
        return out.getvalue()
    cells = [[_pretty(k, _raw(s, k, reference)) for _, k in _COLUMNS] for s in summaries]
    if fmt == "markdown":
        align = ["---" if k in _TEXT_KEYS else "---:" for _, k in _COLUMNS]
        lines = [headers, align, *cells]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"
    widths = [max(len(r[i]) for r in [headers, *cells]) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if k in _TEXT_KEYS else c.rjust(w)
                         for c, w, (_, k) in zip(row, widths, _COLUMNS, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)]) + "\n"


def pareto_plot(summaries: Sequence[RunSummary], path: Path) -> None:
    """cIoU against LLM FLOPs, one point per run labelled by its recipe name, the Pareto front (fewer FLOPs,
    higher cIoU) dashed. Uses the val split when any run has val cIoU, else test. Drawn with the Agg backend directly,
    so no display and no global pyplot state are touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    split = "val" if any(s.values.get("val/ciou") is not None for s in summaries) else "test"
    names = [s.recipe or s.label for s in summaries]
    if len(set(names)) < len(names):  # the same recipe twice: tell the runs apart by folder
        names = [s.label for s in summaries]
    points = [
        (name, s.values["llm_flops"], s.values[f"{split}/ciou"])
        for name, s in zip(names, summaries, strict=True)
        if s.values.get("llm_flops") is not None and s.values.get(f"{split}/ciou") is not None
    ]
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, x, y in points:
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front: list[tuple[float, float]] = []
    for _, x, y in sorted(points, key=lambda p: (p[1], -p[2])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), linestyle="--", color="gray", linewidth=1, label="Pareto front")
        ax.legend(loc="lower right", fontsize=8)
    if not points:
        ax.text(0.5, 0.5, "no run has both LLM FLOPs and cIoU", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("LLM FLOPs per sample")
    ax.set_ylabel(f"{split} cIoU")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight" keeps labels that run past the axes


def compare(
    run_dirs: Sequence[str | Path], metric: str = "val/ciou", plot: str | Path | None = None, fmt: Format = "table"
) -> str:
    """One table over ``run_dirs`` (version folders, or recipe folders → their newest version); writes the
    Pareto plot to ``plot`` when given."""
    if fmt not in FORMATS:
        raise SegrouterError(f"unknown format '{fmt}'", fix=f"use one of: {', '.join(FORMATS)}")
    if not run_dirs:
        raise SegrouterError("no run folders to compare", fix="pass one or more run folders")
    summaries = [summarize(Path(d), metric) for d in run_dirs]
    if all("run folder not found" in s.notes for s in summaries):  # one missing among many is a row's note
        raise SegrouterError(f"no run folder found: {', '.join(map(str, run_dirs))}",
                             fix="pass run version folders or recipe folders, e.g. runs/quickstart")
    # a metric that no run logs and segrouter never logs is a typo; a known one that these runs lack (val/ciou
    # of evaluation-only runs) is a note in each row
    known = [*monitorable(), *(f"test/{m}" for m in EVAL)]
    if metric not in known and all(s.best_step is None for s in summaries):
        raise SegrouterError(f"no run logs {metric}{did_you_mean(metric, known)}",
                             fix="pick --metric among the metrics the runs log, e.g. val/ciou or test/ciou")
    if plot is not None:
        pareto_plot(summaries, Path(plot))
    return render(summaries, fmt)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="a run's version folder, or a recipe folder (newest version)")
    p.add_argument("--metric", default="val/ciou", help="picks each run's best step (max; min for a loss)")
    p.add_argument("--plot", metavar="PNG", help="write a Pareto plot (cIoU vs LLM FLOPs)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--out", metavar="FILE", help="write the table to FILE instead of stdout")


def run(args: argparse.Namespace) -> int:
    for path, flag in ((args.out, "--out"), (args.plot, "--plot")):
        if path:
            output_file(path, flag)
    text = compare(args.runs, metric=args.metric, plot=args.plot, fmt=args.format)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"segrouter: wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    if args.plot:
        print(f"segrouter: wrote plot {args.plot}", file=sys.stderr)
    return 0
