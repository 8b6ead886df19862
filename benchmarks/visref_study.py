"""The method study on the vision-dependent testbed (issue 13): every routing strategy and compressor at two
matched budgets, token routing's two negative controls, two arms that take token routing's two rules apart
(late ``[SEG]`` insertion alone, routing alone, the latter with its own controls), and ``full`` itself, each
started from the same trained testbed checkpoint of each seed and measured twice:

* *training-free*: ``segrouter test --training-free`` on that checkpoint (new parameters keep their
  initialisation: token routing's projector passes the proxy's FFN update through, MoD's routers are zero).
  A compressor replaces the testbed's projector with a new one, which has no trained weights to start from:
  it has no training-free figure;
* *fine-tuned*: ``segrouter fit`` from that checkpoint for the same number of steps for every arm, ``full``
  included (every part of the checkpoint; a compressor arm starts its new compressor from its
  initialisation), then ``segrouter test`` of its best checkpoint and, for a routing strategy, ``segrouter
  analyze tokens`` of it (per LLM layer, the share of the image tokens that ran the FFN which lie inside the
  target's mask).

Budgets: about half and about a quarter of ``full``'s LLM FLOPs for the routing strategies, half and a quarter
of the 64 visual tokens for the compressors (their LLM FLOPs are counted beside them); each arm's knobs were
chosen by counting FLOPs on the testbed's validation batches. Every figure of a row comes from that row's
knobs: the testbed's counted FLOPs (on the test batches), the count at the LLaMA-7B shape (``segrouter bench
--flops-only --random-init llama-7b``, the same overrides; a compressor's tokens scaled to 576 in proportion),
and the accuracies (mean ± std over seeds). Differences to ``full`` (and between token routing and its
controls) are paired by seed; one *exceeds the spread* when its mean is more than two standard errors
(2·std/√seeds) from zero. The tables, the Pareto plot and the token-placement table go into docs/results.md
between the "visref-study" markers (the plot beside it, ``visref_study.png``).

    python benchmarks/visref_study.py --runs runs/visref --seeds 0 1 2 [--jobs 3] [--steps 400] [--table-only]
        [--arms ARM ...] [key=value ...]

``--runs`` is the output folder of benchmarks/visref.py (its ``visref_sS/version_0`` are the testbeds). An arm
whose runs for a seed are complete in ``--out`` is not rerun, so a study cut off goes on where it stopped; an
arm's rows appear in the table once it is complete for every seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from visref import best_checkpoint, mean_std, run, run_script, write_section  # noqa: E402

from segrouter.compare import summarize  # noqa: E402
from segrouter.errors import SegrouterError  # noqa: E402

BEGIN, END = "<!-- visref-study:begin -->", "<!-- visref-study:end -->"
FREE_BEGIN, FREE_END = "<!-- visref-study-tf:begin -->", "<!-- visref-study-tf:end -->"  # --training-free-only
RECIPE = "recipes/visref.yaml"
TESTBED_TOKENS, SHAPE, SHAPE_TOKENS = 64, "llama-7b", 576
# the testbed's parts a compressor arm loads from the testbed checkpoint (all but the compressor)
CARRIED = ("vision", "llm", "mask_encoder", "mask_decoder", "text_proj")


NAMED = ("name", "assignment", "projector", "routed", "projector_input")  # knobs an arm's name says


@dataclass(frozen=True)
class Arm:
    """One row of the study: its budget (the share of ``full``'s LLM FLOPs, or of its visual tokens for a
    compressor), its recipe overrides, and whether it replaces the testbed's compressor."""

    budget: str
    knobs: tuple[str, ...]

    @property
    def compressor(self) -> bool:
        return any(k.startswith("model.compressor.") for k in self.knobs)

    def label(self, name: str) -> str:
        """``name (knob=value, ...)``: the knobs that set the budget (the controls' switches are in the name)."""
        shown = [k.split(".", 2)[2] for k in self.knobs if k.split("=")[0].rsplit(".", 1)[1] not in NAMED]
        return f"{name} ({', '.join(shown)})" if shown else name


# the parameters of recipes/lisa7b_token_routing.yaml (depth fractions carry over to LLaMA-7B)
TOKEN_ROUTING = ("model.routing.name=token_routing", "model.routing.route_start=0", "model.routing.proxy_ratio=0.125")
HALF, QUARTER = "½ FLOPs", "¼ FLOPs"
HALF_TOKENS, QUARTER_TOKENS = "½ tokens", "¼ tokens"
ARMS: dict[str, Arm] = {
    "full": Arm("1", ("model.routing.name=full",)),
    # about half of full's LLM FLOPs (0.48–0.51 counted)
    "token_routing": Arm(HALF, TOKEN_ROUTING),
    "token_routing, random assignment": Arm(HALF, (*TOKEN_ROUTING, "model.routing.assignment=random")),
    "token_routing, zero projector": Arm(HALF, (*TOKEN_ROUTING, "model.routing.projector=zero")),
    # what the late [SEG] insertion alone costs: the same parameters with no layer routed (not a budget: a
    # diagnostic, 0.99 of full's FLOPs)
    "token_routing, no routed layer": Arm("diagnostic", (*TOKEN_ROUTING, "model.routing.route_layers=[]")),
    # and what the routing alone costs: [SEG] (and the text after it) in every layer, the same proxies
    "token_routing, insert at 0": Arm(HALF, (*TOKEN_ROUTING, "model.routing.insert_layer=0")),
    "token_routing, insert at 0, random assignment": Arm(HALF, (*TOKEN_ROUTING, "model.routing.insert_layer=0",
                                                              "model.routing.assignment=random")),
    "token_routing, insert at 0, zero projector": Arm(HALF, (*TOKEN_ROUTING, "model.routing.insert_layer=0",
                                                           "model.routing.projector=zero")),
    # issue 14: the projector reading the routed token's own normalised state beside the proxy's update
    "token_routing, delta_token": Arm(HALF, (*TOKEN_ROUTING, "model.routing.projector_input=delta_token")),
    "fastv": Arm(HALF, ("model.routing.name=fastv", "model.routing.k=1", "model.routing.ratio=0.85")),
    "random": Arm(HALF, ("model.routing.name=random", "model.routing.k=1", "model.routing.keep=0.2")),
    "pdrop": Arm(HALF, ("model.routing.name=pdrop", "model.routing.keep=[0.25,0.125,0.0625]")),
    "mod": Arm(HALF, ("model.routing.name=mod", "model.routing.route_layers=all", "model.routing.capacity=0.4")),
    # about a quarter (0.25–0.27): FastV and PyramidDrop keep layer 0 dense, and token routing's FFN-only
    # routing keeps attention for every token, so neither reaches it on 4 layers (token routing: 0.455 at
    # 2 proxies); its whole-layer variant (routed: layer, beyond the paper) does
    "random, ¼": Arm(QUARTER, ("model.routing.name=random", "model.routing.k=0", "model.routing.keep=0.1")),
    "mod, ¼": Arm(QUARTER, ("model.routing.name=mod", "model.routing.route_layers=all",
                            "model.routing.capacity=0.1")),
    "token_routing, whole layer, ¼": Arm(QUARTER, (*TOKEN_ROUTING, "model.routing.routed=layer")),
    "token_routing, whole layer, insert at 0, ¼": Arm(QUARTER, (*TOKEN_ROUTING, "model.routing.routed=layer",
                                                               "model.routing.insert_layer=0")),
    # compressors at half (32) and a quarter (16) of the 64 visual tokens; superpixels from SLIC (no SAM
    # weights here), their count varies per image around the asked one
    "resampler": Arm(HALF_TOKENS, ("model.compressor.name=resampler", "model.compressor.num_queries=32")),
    "tome": Arm(HALF_TOKENS, ("model.compressor.name=tome", "model.compressor.r=8", "model.compressor.steps=4")),
    "superpixels": Arm(HALF_TOKENS, ("model.compressor.name=slic_superpixel", "model.compressor.n_segments=32")),
    "avgpool, ¼": Arm(QUARTER_TOKENS, ("model.compressor.name=avgpool", "model.compressor.k=2")),
    "resampler, ¼": Arm(QUARTER_TOKENS, ("model.compressor.name=resampler", "model.compressor.num_queries=16")),
    "tome, ¼": Arm(QUARTER_TOKENS, ("model.compressor.name=tome", "model.compressor.r=8", "model.compressor.steps=6")),
    "superpixels, ¼": Arm(QUARTER_TOKENS, ("model.compressor.name=slic_superpixel",
                                           "model.compressor.n_segments=16")),
}
# token routing's negative controls: each (control, the arm it is paired with)
CONTROLS = [(f"{arm}, {control}", arm) for arm in ("token_routing", "token_routing, insert at 0")
            for control in ("random assignment", "zero projector")]


def _slug(arm: str) -> str:
    return arm.replace(", ", "-").replace(" ", "_").replace("¼", "q")


def _folder(out: Path, prefix: str, arm: str, seed: int) -> Path:
    """One arm's folder for one seed: ``tf_…`` holds its training-free test (version_0); ``ft_…`` its
    fine-tune (version_0), then the tuned model's test (version_1) and ``tokens/`` (analyze tokens)."""
    return out / f"{prefix}_{_slug(arm)}_s{seed}"


def _test_run(out: Path, prefix: str, arm: str, seed: int) -> Path:
    """The run folder of an arm's test (``prefix`` ``tf`` or ``ft``): where its scores are logged."""
    return _folder(out, prefix, arm, seed) / ("version_0" if prefix == "tf" else "version_1")


def _placement(out: Path, arm: str, seed: int) -> Path:
    """``analyze tokens``' JSON of an arm's fine-tuned model."""
    return _folder(out, "ft", arm, seed) / "tokens" / "tokens.json"


def _scores(out: Path, prefix: str, arm: str, seed: int) -> dict[str, float]:
    return summarize(_test_run(out, prefix, arm, seed)).values


def _tested(run_dir: Path) -> bool:
    return summarize(run_dir).values.get("test/ciou") is not None


def _to_run(run_dir: Path, done: bool) -> bool:
    """Whether a step whose output is ``run_dir`` still has to run: not when ``done``; a folder left by a step
    that was cut off is refused (the run's versions would no longer be where the table reads them)."""
    if done:
        return False
    if run_dir.exists():
        raise SegrouterError(f"{run_dir} holds an incomplete run", fix="delete that folder to rerun its arm")
    return True


def evaluate(runs: Path, out: Path, seed: int, arms: list[str], steps: int, lr: float, overrides: list[str],
             tune: bool = True, threads: int | None = None) -> None:
    """Both measurements of every arm for one seed's testbed (the training-free one only, without ``tune``);
    the steps already complete in ``out`` are kept."""
    ckpt = str(best_checkpoint(runs / f"visref_s{seed}" / "version_0"))
    common = ("--recipe", RECIPE, f"output_dir={out}", f"seed={seed}", "trainer.enable_progress_bar=false")
    for name in arms:
        arm = ARMS[name]
        free = _test_run(out, "tf", name, seed)
        if not arm.compressor and _to_run(free.parent, _tested(free)):
            run("test", *common, f"name={free.parent.name}", "--ckpt", ckpt, "--training-free", *arm.knobs,
                *overrides, threads=threads)
        if not tune:
            continue
        tuned, tested = _folder(out, "ft", name, seed), _test_run(out, "ft", name, seed)
        if _to_run(tuned, (tuned / "version_0" / "checkpoints").is_dir()):
            carried = f"init_modules=[{','.join(CARRIED)}]" if arm.compressor else "init_modules=[]"
            run("fit", *common, f"name={tuned.name}", f"init_from={ckpt}", carried, f"trainer.max_steps={steps}",
                f"trainer.val_check_interval={steps}", f"optim.lr={lr}", "optim.warmup_steps=20", *arm.knobs,
                *overrides, threads=threads)
        best = str(best_checkpoint(tuned / "version_0"))
        if _to_run(tested, _tested(tested)):
            run("test", *common, f"name={tuned.name}", "--ckpt", best, *arm.knobs, *overrides, threads=threads)
        placement = _placement(out, name, seed)
        if not arm.compressor and not placement.is_file():
            run("analyze", "tokens", "--recipe", RECIPE, "--ckpt", best, "--out", str(placement.parent),
                f"seed={seed}", *arm.knobs, *overrides, threads=threads)


def shape_ratio(out: Path, name: str, visual_tokens: float, overrides: list[str]) -> float:
    """The arm's LLM FLOPs relative to ``full`` at the LLaMA-7B shape (counted on meta tensors, cached in
    ``out``); a compressor's visual tokens are scaled from the testbed's 64 to the shape's 576."""
    cached = out / f"{SHAPE}_{_slug(name)}.json"
    if not cached.exists():
        tokens = max(1, round(SHAPE_TOKENS * visual_tokens / TESTBED_TOKENS))
        run("bench", "--recipe", RECIPE, "--vs", RECIPE, "--random-init", SHAPE, "--flops-only", "--image-tokens",
            str(SHAPE_TOKENS), "--candidate-image-tokens", str(tokens), "--out", str(cached), *ARMS[name].knobs,
            *overrides)
    return float(json.loads(cached.read_text())["flops_ratio"])


def _paired(values: list[float]) -> str:
    """``mean ± std`` of paired differences in cIoU points, starred when they exceed the spread."""
    text = mean_std(values, 1)
    return f"{text} *" if exceeds_spread(values) else text


def exceeds_spread(values: list[float]) -> bool:
    """Whether the mean of paired differences is more than two standard errors from zero (and not zero up to
    rounding: arms that compute the same thing differ by float noise)."""
    if len(values) < 2:
        return False
    return abs(statistics.mean(values)) > max(2 * statistics.stdev(values) / math.sqrt(len(values)), 1e-6)


def complete(out: Path, seeds: list[int], arms: list[str], tune: bool = True) -> list[str]:
    """The arms with every seed's runs in ``out`` (``full`` first: every difference is to it)."""
    def done(name: str, seed: int) -> bool:
        free = ARMS[name].compressor or _tested(_test_run(out, "tf", name, seed))
        analysed = ARMS[name].compressor or _placement(out, name, seed).is_file()
        return free and (not tune or (_tested(_test_run(out, "ft", name, seed)) and analysed))

    ready = [a for a in arms if all(done(a, s) for s in seeds)]
    if "full" not in ready:
        raise SegrouterError(f"the full arm is not complete in {out} for seeds {seeds}",
                             fix="run the study without --table-only first")
    return ready


def training_free_table(out: Path, seeds: list[int], arms: list[str], command: str, overrides: list[str]) -> str:
    """The training-free half alone: each routing arm applied to the trained testbed, against the testbed."""
    rows = ["| arm (knobs) | budget | LLM FLOPs / full | at LLaMA-7B | training-free cIoU | training-free name_acc "
            "| − full (cIoU points, paired by seed) |", "|---|---|---:|---:|---:|---:|---:|"]
    full = {s: _scores(out, "tf", "full", s) for s in seeds}
    for arm in (a for a in complete(out, seeds, arms, tune=False) if not ARMS[a].compressor):
        free = {s: _scores(out, "tf", arm, s) for s in seeds}
        ratio = statistics.mean(free[s]["llm_flops"] / full[s]["llm_flops"] for s in seeds)
        diff = [100 * (free[s]["test/ciou"] - full[s]["test/ciou"]) for s in seeds]
        rows.append(f"| {ARMS[arm].label(arm)} | {ARMS[arm].budget} | {ratio:.3f} | "
                    f"{shape_ratio(out, arm, TESTBED_TOKENS, overrides):.3f} | "
                    f"{mean_std([free[s]['test/ciou'] for s in seeds])} | "
                    f"{mean_std([free[s]['test/name_acc'] for s in seeds])} | "
                    f"{'—' if arm == 'full' else _paired(diff)} |")
    return f"Regenerate with `{command}`.\n\n" + "\n".join(rows)


@dataclass
class Row:
    """One arm's figures over seeds."""

    name: str
    flops: float  # testbed LLM FLOPs / full's, mean over seeds
    shape_flops: float  # the same at the LLaMA-7B shape
    tokens: float  # visual tokens per sample
    free: list[float]  # training-free test cIoU per seed (empty for a compressor)
    tuned: dict[str, list[float]]  # fine-tuned test metrics per seed
    diff: list[float]  # fine-tuned cIoU − fine-tuned full's, in points, per seed
    placement: list[dict[str, Any]]  # analyze tokens' result per seed (none for a compressor: all its tokens run)


def collect(out: Path, seeds: list[int], arms: list[str], overrides: list[str]) -> dict[str, Row]:
    full = {s: _scores(out, "ft", "full", s) for s in seeds}
    rows: dict[str, Row] = {}
    for arm in complete(out, seeds, arms):
        tuned = {s: _scores(out, "ft", arm, s) for s in seeds}
        tokens = statistics.mean(tuned[s]["visual_tokens"] for s in seeds)
        rows[arm] = Row(
            name=arm,
            flops=statistics.mean(tuned[s]["llm_flops"] / full[s]["llm_flops"] for s in seeds),
            shape_flops=shape_ratio(out, arm, tokens, overrides),
            tokens=tokens,
            free=[] if ARMS[arm].compressor else [_scores(out, "tf", arm, s)["test/ciou"] for s in seeds],
            tuned={m: [tuned[s][f"test/{m}"] for s in seeds] for m in ("ciou", "giou", "name_acc")},
            diff=[100 * (tuned[s]["test/ciou"] - full[s]["test/ciou"]) for s in seeds],
            placement=[] if ARMS[arm].compressor else [json.loads(_placement(out, arm, s).read_text())
                                                        for s in seeds],
        )
    return rows


def table(rows: dict[str, Row], seeds: list[int], command: str, plot: Path) -> str:
    header = ("| arm (knobs) | budget | LLM FLOPs / full | at LLaMA-7B | visual tokens | training-free cIoU "
              "| fine-tuned cIoU | fine-tuned gIoU | fine-tuned name_acc | fine-tuned − full (cIoU points) |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        lines.append(f"| {ARMS[r.name].label(r.name)} | {ARMS[r.name].budget} | {r.flops:.3f} | {r.shape_flops:.3f} | "
                     f"{r.tokens:.1f} | {mean_std(r.free) if r.free else '— (new compressor)'} | "
                     f"{mean_std(r.tuned['ciou'])} | {mean_std(r.tuned['giou'])} | {mean_std(r.tuned['name_acc'])} | "
                     f"{'—' if r.name == 'full' else _paired(r.diff)} |")
    controls = [f"- {c} − {arm}, fine-tuned: {_paired(_minus(rows[c].diff, rows[arm].diff))} cIoU points"
                for c, arm in CONTROLS if c in rows and arm in rows]
    parts = [f"Regenerate with `{command}`.", "\n".join(lines),
             f"Seeds {', '.join(map(str, seeds))}; mean ± std over them. A difference marked * exceeds the spread "
             "(its mean is more than two standard errors from zero, paired by seed).",
             *(["Token routing's negative controls, paired by seed:\n\n" + "\n".join(controls)] if controls else []),
             placement_table(rows), f"![Pareto: fine-tuned test cIoU vs LLM FLOPs]({plot.name})"]
    return "\n\n".join(parts)


def placement_table(rows: dict[str, Row]) -> str:
    """Per arm and LLM layer, the share of the image tokens that ran the FFN which lie inside the target's
    mask (``inside``), beside ``chance`` (the share of all its image tokens inside), means over seeds."""
    routed = [r for r in rows.values() if r.placement]
    layers = len(routed[0].placement[0]["layers"]["inside"])
    lines = ["Where the image tokens that ran each layer's FFN lie (`segrouter analyze tokens` on each fine-tuned "
             "model, 4 validation batches): the share inside the target's mask per layer, and chance (the share "
             "of all its image tokens inside), means over seeds. A compressor's arm runs every token it makes "
             "through every layer: it has no row.", "",
             "| arm | " + " | ".join(f"layer {i}" for i in range(layers)) + " | chance |",
             "|---|" + "---:|" * (layers + 1)]
    for r in routed:
        inside = [statistics.mean(p["layers"]["inside"][i] for p in r.placement) for i in range(layers)]
        chance = statistics.mean(p["chance"] for p in r.placement)
        lines.append(f"| {r.name} | " + " | ".join(f"{v:.3f}" for v in inside) + f" | {chance:.3f} |")
    return "\n".join(lines)


def pareto_plot(rows: dict[str, Row], path: Path) -> None:
    """Fine-tuned test cIoU (mean, error bar ± std over seeds) against LLM FLOPs / full, one colour per arm
    named in the legend (circles: routing, squares: compressors); hollow markers: training-free."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = colormaps["tab20"]
    for i, r in enumerate(rows.values()):
        style = {"fmt": "s" if ARMS[r.name].compressor else ("o" if i < 20 else "D"), "color": colours(i % 20),
                 "capsize": 3}
        ax.errorbar([r.flops], [statistics.mean(r.tuned["ciou"])], yerr=[_std(r.tuned["ciou"])], label=r.name,
                    **style)
        if r.free:
            ax.errorbar([r.flops], [statistics.mean(r.free)], yerr=[_std(r.free)], mfc="none", alpha=0.6, **style)
    ax.set_xlabel("LLM FLOPs / full (testbed)")
    ax.set_ylabel("test cIoU (filled: fine-tuned, hollow: training-free; ± std over seeds)")
    ax.set_title("Method study on the vision-dependent testbed", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _minus(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/visref", help="benchmarks/visref.py's output folder")
    parser.add_argument("--out", default="runs/visref_study", help="folder for the evaluations and fine-tunes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), metavar="ARM",
                        help=f"a subset of the arms, run in this order (full first): {', '.join(map(repr, ARMS))}")
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps, the same for every arm")
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate (cosine, 20 warm-up steps)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run side by side, each on an equal share of the cores")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from --out")
    parser.add_argument("--training-free-only", action="store_true",
                        help="only the training-free evaluations (no fine-tunes): a table of those alone, between "
                             "the doc's visref-study-tf markers")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every command")
    args = parser.parse_args(argv)
    doc = Path(args.doc)
    begin, end = (FREE_BEGIN, FREE_END) if args.training_free_only else (BEGIN, END)
    if not doc.is_file() or begin not in doc.read_text() or end not in doc.read_text():
        print(f"visref_study.py: error: {doc} has no {begin} … {end} markers — pass --doc a markdown file with them",
              file=sys.stderr)
        return 2
    for flag, value in (("--steps", args.steps), ("--jobs", args.jobs)):
        if value < 1:
            print(f"visref_study.py: error: {flag} {value} must be at least 1", file=sys.stderr)
            return 2
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        print(f"visref_study.py: error: unknown arm {unknown[0]!r} — choose from {', '.join(map(repr, ARMS))}",
              file=sys.stderr)
        return 2
    arms = ["full", *(a for a in dict.fromkeys(args.arms) if a != "full")]
    out = Path(args.out).resolve()
    if not args.table_only:
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
        with ThreadPoolExecutor(args.jobs) as pool:
            for done in [pool.submit(evaluate, Path(args.runs).resolve(), out, seed, arms, args.steps, args.lr,
                                     args.overrides, not args.training_free_only, threads) for seed in args.seeds]:
                done.result()
    chosen = [] if set(arms) == set(ARMS) else ["--arms", *arms]
    tuning = ["--training-free-only"] if args.training_free_only else ["--steps", str(args.steps), "--lr", str(args.lr)]
    jobs = ["--jobs", str(args.jobs)] if args.jobs > 1 else []  # threads per run: part of how the runs were made
    command = shlex.join(["python", "benchmarks/visref_study.py", "--runs", args.runs, "--seeds",
                          *map(str, args.seeds), *jobs, *chosen, *tuning, *args.overrides])
    if args.training_free_only:
        text = training_free_table(out, args.seeds, arms, command, args.overrides)
    else:
        rows = collect(out, args.seeds, arms, args.overrides)
        plot = doc.parent / "visref_study.png"
        pareto_plot(rows, plot)
        text = table(rows, args.seeds, command, plot)
    print(text)
    write_section(text, doc, begin, end)
    return 0


if __name__ == "__main__":
    run_script(main, "visref_study.py")
