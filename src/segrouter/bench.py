"""``segrouter bench``: the LLM part of two recipes, side by side, on the same inputs, in one run.

For each recipe it reports the FLOPs counted by ``torch.utils.flop_counter`` (what really ran), the median
wall time of repeated forwards after warm-up (the two recipes interleaved, so drift hits both alike), the
tokens each layer's attention and FFN computed, and the achieved speedup as a fraction of the FLOP-ideal
one, with the spread of the per-round speedups and the machine's load average before and after; a warning
line says when either makes the ratio unreliable. ``--random-init SHAPE`` benchmarks a named real LLM shape
with random weights and a LISA-like sequence (576 image tokens by default), so speed claims can be checked
without checkpoints, on CPU or GPU;
``--candidate-image-tokens N`` gives recipe A a compressor's token count (e.g. superpixels) instead.

``--flops-only`` (with ``--random-init``) only counts, on meta tensors (:func:`segrouter.flops.count_meta_flops`):
the weights and hidden states have shapes but no storage, so the full depth of a 7B or 70B shape is counted in
seconds without the tens of GB its weights would take, while the token bookkeeping (kinds, positions,
coordinates) stays real on the CPU, so every strategy packs the tokens it would pack with real weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from segrouter.arguments import at_least, checked_device, output_file
from segrouter.errors import SegrouterError
from segrouter.flops import META, count_flops, count_meta_flops
from segrouter.geometry import grid_coords
from segrouter.llms.base import CausalLLM
from segrouter.routing.base import Kind, RoutingStrategy, TokenSequence

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2-0.5B: the CPU-sized shape.
    "qwen2-0.5b": {"family": "qwen2", "hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2,
                   "intermediate_size": 4864},
    # LLaMA-2-7B / Vicuna-7B (LLaVA, LISA-7B): the paper-scale shape.
    "llama-7b": {"family": "llama", "hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32,
                 "intermediate_size": 11008},
    # LLaMA-2-70B (GQA, 8 KV heads): a shape to count with --flops-only (its fp32 weights need 280 GB).
    "llama-70b": {"family": "llama", "hidden_size": 8192, "num_layers": 80, "num_heads": 64, "num_kv_heads": 8,
                  "intermediate_size": 28672},
    # TinyLlama-1.1B: a LLaMA shape small enough to train with AdamW on one GPU in seconds per step.
    "tinyllama-1.1b": {"family": "llama", "hidden_size": 2048, "num_layers": 22, "num_heads": 32, "num_kv_heads": 4,
                       "intermediate_size": 5632},
    # A toy shape for tests.
    "toy": {"family": "qwen2", "hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
            "intermediate_size": 256},
}


@dataclass
class Measured:
    flops: int
    times: list[float]
    tokens: dict[str, list[float]]
    visual_tokens: float

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def lisa_sequence(hidden: int, image_tokens: int, text_tokens: int, num_mask_tokens: int, batch: int,
                  device: torch.device, dtype: torch.dtype) -> TokenSequence:
    """A LISA-shaped input: a short prompt prefix, the image tokens, the expression and the answer with its
    mask tokens (``[SEG]``) and a last text token. A square count is a patch grid; any other count (e.g.
    superpixels) is spread evenly over the cells of the smallest square grid that holds it, in raster order."""
    if image_tokens < 1:
        raise SegrouterError(f"image token count must be positive, got {image_tokens}", fix="use e.g. 576 (24×24)")
    side = math.isqrt(image_tokens - 1) + 1
    cells = torch.linspace(0, side * side - 1, image_tokens).round().long()
    prefix, tail = 4, 1
    kinds = ([Kind.TEXT] * prefix + [Kind.IMAGE] * image_tokens + [Kind.TEXT] * text_tokens
             + [Kind.MASK] * num_mask_tokens + [Kind.TEXT] * tail)
    length = len(kinds)
    k = torch.tensor([int(x) for x in kinds], device=device)[None].repeat(batch, 1)
    coords = torch.zeros(batch, length, 2, device=device)
    coords[:, prefix : prefix + image_tokens] = grid_coords(side, side, device=device)[cells.to(device)]
    g = torch.Generator(device="cpu").manual_seed(0)
    embeds = (torch.randn(batch, length, hidden, generator=g) * 0.02).to(device=device, dtype=dtype)
    pos = torch.arange(length, device=device)[None].repeat(batch, 1)
    return TokenSequence(embeds, k, pos, coords)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes: between CUDA events recorded around it on a GPU (the queue is
    drained first, so earlier work is not counted), wall clock otherwise."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(runs: dict[str, Callable[[], Any]], strategies: dict[str, RoutingStrategy], visual: dict[str, float],
            device: torch.device, warmup: int, repeats: int, *, grad: bool = False) -> dict[str, Measured]:
    """Count FLOPs once per run, then time them interleaved: warm-up rounds, then ``repeats`` rounds.
    Without ``grad`` the runs are inference (no autograd graph); with it they may train (backward included)."""
    out: dict[str, Measured] = {}
    with torch.set_grad_enabled(grad):
        for name, fn in runs.items():
            _, flops = count_flops(fn)
            out[name] = Measured(flops, [], strategies[name].stats.as_lists(), visual[name])
        for r in range(warmup + repeats):
            for name, fn in runs.items():
                t = _timed(fn, device)
                if r >= warmup:
                    out[name].times.append(t)
    return out


def count_only(runs: dict[str, Callable[[], Any]], strategies: dict[str, RoutingStrategy], visual: dict[str, float],
               routings: dict[str, str]) -> dict[str, Measured]:
    """Count each run's FLOPs on meta tensors (no timing); ``routings`` names each run's strategy for errors."""
    out: dict[str, Measured] = {}
    with torch.no_grad():
        for name, fn in runs.items():
            flops = count_meta_flops(fn, f"{name}: routing '{routings[name]}'")
            out[name] = Measured(flops, [], strategies[name].stats.as_lists(), visual[name])
    return out


def random_llm(name: str, *, num_mask_tokens: int, device: torch.device, dtype: torch.dtype,
               num_layers: int | None = None) -> tuple[CausalLLM, dict[str, Any]]:
    """A randomly initialised LLM of the named shape (and its shape), in eval mode.

    Its weights are created and initialised directly on ``device`` in ``dtype``: a 7B model built in fp32 on
    the host and moved would need 28 GB of host memory and minutes of CPU initialisation. On the ``meta``
    device it has shapes only (for counting FLOPs).
    """
    from segrouter.registry import registry
    from segrouter.text import build_tokenizer

    if name not in SHAPES:
        raise SegrouterError(f"unknown shape '{name}'", fix=f"shapes: {', '.join(SHAPES)}")
    shape = dict(SHAPES[name])
    if num_layers:
        shape["num_layers"] = num_layers
    tok = build_tokenizer(None, [], num_mask_tokens)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm = registry("llm").build({"name": "hf_causal", **shape}, tok)
    finally:
        torch.set_default_dtype(default_dtype)
    return llm.eval(), shape


def _random_init(args: argparse.Namespace, nodes: dict[str, dict[str, Any]], device: torch.device,
                 dtype: torch.dtype) -> tuple[dict[str, Callable[[], Any]], dict[str, RoutingStrategy],
                                              dict[str, float], dict[str, Any]]:
    from segrouter.errors import recipe_path
    from segrouter.registry import registry

    weights = META if args.flops_only else device  # flops-only: weights and hidden states without storage
    llm, shape = random_llm(args.random_init, num_mask_tokens=args.num_mask_tokens, device=weights, dtype=dtype,
                            num_layers=args.num_layers)
    candidate = args.image_tokens if args.candidate_image_tokens is None else args.candidate_image_tokens
    visual = {"A": candidate, "B": args.image_tokens}
    runs, strategies = {}, {}
    for name, node in nodes.items():
        seq = lisa_sequence(llm.hidden_size, visual[name], args.text_tokens, args.num_mask_tokens, args.batch,
                            device, dtype)
        seq = dataclasses.replace(seq, embeds=seq.embeds.to(weights))
        with torch.device(weights):
            strat = registry("routing").build(node, where=f"{name}: model.routing")
            with recipe_path(f"{name}: model.routing"):
                strat.setup(llm)
        strat.to(device=weights, dtype=dtype).eval()
        strategies[name] = strat
        runs[name] = (lambda s=strat, q=seq: s(llm, q))
    info = {"shape": args.random_init, **shape, "image_tokens": visual, "text_tokens": args.text_tokens}
    return runs, strategies, {n: float(v) for n, v in visual.items()}, info


def _from_recipes(args: argparse.Namespace, cfgs: dict[str, Any], device: torch.device,
                  dtype: torch.dtype) -> tuple[dict[str, Callable[[], Any]], dict[str, RoutingStrategy],
                                               dict[str, float], dict[str, Any]]:
    from segrouter.build import build
    from segrouter.datasets.base import ENCODER_INPUTS
    from segrouter.generate import generate, prompt_batch

    runs, strategies, visual = {}, {}, {}
    for name, cfg in cfgs.items():
        model, data = build(cfg)
        model = model.to(device=device, dtype=dtype).eval()
        samples = [data.dataset("val")[i] for i in range(args.batch)]
        if args.decode_steps:  # end to end: the whole model on one prompt, prefill + decode steps + mask decoder
            inputs = {k: samples[0][k] for k in ENCODER_INPUTS if k in samples[0]}
            batch = prompt_batch(data.tokenizer, samples[0]["image"], samples[0]["text"], cfg.data.prompt, inputs)
        else:
            batch = data.collate(samples)
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        batch["image"] = batch["image"].to(dtype)
        with torch.no_grad():
            enc = model.encode(batch, prompt_only=bool(args.decode_steps))
        strategies[name] = model.routing
        visual[name] = float(enc.visual.counts.float().mean())
        if args.decode_steps:
            runs[name] = (lambda m=model, b=batch: generate(m, b, max_new_tokens=args.decode_steps, mask_at_end=True))
        else:
            runs[name] = (lambda m=model, s=enc.seq: m.routing(m.llm, s))
    scope = {"scope": f"end to end: prefill + {args.decode_steps} decode steps + mask decoder, 1 sample"} \
        if args.decode_steps else {"batch": args.batch}
    return runs, strategies, visual, {"shape": "recipes", **scope}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from segrouter.recipe import component, load_recipe

    if args.flops_only and not args.random_init:
        raise SegrouterError("--flops-only counts a named LLM shape on meta tensors, so it needs --random-init",
                             fix=f"add --random-init SHAPE ({', '.join(SHAPES)})")
    if args.decode_steps and (args.random_init or args.flops_only):
        raise SegrouterError("--decode-steps times whole models built from the recipes",
                             fix="drop --random-init / --flops-only, or drop --decode-steps")
    if args.out:
        output_file(args.out, "--out")
    # flops-only: the token bookkeeping's device
    device = torch.device("cpu") if args.flops_only else checked_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.candidate_image_tokens is not None and not args.random_init:
        raise SegrouterError("--candidate-image-tokens only applies with --random-init",
                             fix="recipes bring their own visual tokens; drop the flag or add --random-init SHAPE")
    cfgs = {"A": load_recipe(args.recipe, args.overrides), "B": load_recipe(args.vs)}
    names = {"A": cfgs["A"].name, "B": cfgs["B"].name}
    if args.random_init:
        nodes = {k: component(c, "model.routing") for k, c in cfgs.items()}  # plain lists, as the registry expects
        runs, strategies, visual, info = _random_init(args, nodes, device, dtype)
    else:
        runs, strategies, visual, info = _from_recipes(args, cfgs, device, dtype)
    if args.flops_only:
        routings = {k: str(c.model.routing.name) for k, c in cfgs.items()}
        return _flops_result(args, names, count_only(runs, strategies, visual, routings), info)
    load_before = os.getloadavg()[0]
    m = measure(runs, strategies, visual, device, args.warmup, args.repeats)
    load_after = os.getloadavg()[0]
    a, b = m["A"], m["B"]
    flops_ratio = a.flops / b.flops
    speedup = b.median / a.median
    spread = round_spread([tb / ta for ta, tb in zip(a.times, b.times, strict=True)])
    warnings = disturbance(spread, (load_before, load_after), torch.get_num_threads(), device)
    result = {
        "A": {"recipe": str(args.recipe), "name": names["A"], "flops": a.flops, "median_s": a.median,
              "times_s": a.times, "visual_tokens": a.visual_tokens, **a.tokens},
        "B": {"recipe": str(args.vs), "name": names["B"], "flops": b.flops, "median_s": b.median, "times_s": b.times,
              "visual_tokens": b.visual_tokens, **b.tokens},
        "flops_ratio": flops_ratio,
        "speedup": speedup,
        "ideal_speedup": 1.0 / flops_ratio,
        "fraction_of_ideal": speedup * flops_ratio,
        "speedup_per_round": spread,
        "load_average": {"before": load_before, "after": load_after, "cpus": os.cpu_count()},
        "warnings": warnings,
        "setup": {**info, "device": _device_name(device), "dtype": args.dtype, "warmup": args.warmup,
                  "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    _write(args.out, result)
    return result


def _flops_result(args: argparse.Namespace, names: dict[str, str], m: dict[str, Measured],
                  info: dict[str, Any]) -> dict[str, Any]:
    """The ``--flops-only`` result: counted FLOPs and token counts of A and B, and their ratio."""
    result: dict[str, Any] = {
        key: {"recipe": str(recipe), "name": names[key], "flops": m[key].flops, "visual_tokens": m[key].visual_tokens,
              **m[key].tokens}
        for key, recipe in (("A", args.recipe), ("B", args.vs))
    }
    result["flops_ratio"] = m["A"].flops / m["B"].flops
    result["ideal_speedup"] = 1.0 / result["flops_ratio"]
    result["setup"] = {**info, "flops_only": True, "device": "meta (token bookkeeping on cpu)", "dtype": args.dtype,
                       "torch": torch.__version__}
    _write(args.out, result)
    return result


def _write(out: str | None, result: dict[str, Any]) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))


def round_spread(speedups: list[float]) -> dict[str, float]:
    """Median, quartiles and range of the per-round speedups (each round times A and B back to back)."""
    qs = statistics.quantiles(speedups, n=4, method="inclusive") if len(speedups) > 1 else speedups * 3
    return {"median": statistics.median(speedups), "q1": qs[0], "q3": qs[2], "min": min(speedups),
            "max": max(speedups)}


def disturbance(spread: dict[str, float], loads: tuple[float, float], threads: int, device: torch.device,
                cpus: int | None = None) -> list[str]:
    """Why the measured ratio may not be the machine's: rounds that disagree by more than 10 % (interquartile
    range relative to the median), or other work on the CPU (1-minute load average above what the bench's own
    threads explain) — a loaded 2-core machine can halve a ratio."""
    out = []
    rel = (spread["q3"] - spread["q1"]) / spread["median"]
    if rel > 0.10:
        out.append(f"the per-round speedups spread by {100 * rel:.0f}% of their median (IQR): "
                   "the ratio is unreliable; rerun with more --repeats on a quieter machine")
    cpus = cpus or os.cpu_count() or 1
    busy = max(loads) - (threads if device.type == "cpu" else 1)
    if busy > 0.5 and max(loads) > 0.75 * cpus:
        out.append(f"load average {loads[0]:.1f} before and {loads[1]:.1f} after on {cpus} CPUs: other work shared "
                   "the machine, so the speed ratio is likely understated")
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def format_table(r: dict[str, Any]) -> str:
    a, b = r["A"], r["B"]
    if r["setup"].get("flops_only"):
        return "\n".join([
            f"{'':<22}{'A: ' + a['name']:>24}{'B: ' + b['name']:>24}",
            f"{'LLM GFLOPs (counted)':<22}{a['flops'] / 1e9:>24.3f}{b['flops'] / 1e9:>24.3f}",
            f"{'visual tokens':<22}{a['visual_tokens']:>24.1f}{b['visual_tokens']:>24.1f}",
            f"{'attn tokens/layer':<22}{_short(a['attn_tokens']):>24}{_short(b['attn_tokens']):>24}",
            f"{'ffn tokens/layer':<22}{_short(a['ffn_tokens']):>24}{_short(b['ffn_tokens']):>24}",
            f"FLOPs A/B = {r['flops_ratio']:.4f}   FLOP-ideal speedup = {r['ideal_speedup']:.2f}×   "
            + "(counted on meta tensors, not timed)",
            f"setup: {r['setup']}",
        ])
    sp, load = r["speedup_per_round"], r["load_average"]
    what = "GFLOPs, all" if "scope" in r["setup"] else "LLM GFLOPs"  # --decode-steps: the whole model, end to end
    lines = [
        f"{'':<22}{'A: ' + a['name']:>24}{'B: ' + b['name']:>24}",
        f"{what:<22}{a['flops'] / 1e9:>24.3f}{b['flops'] / 1e9:>24.3f}",
        f"{'median time (ms)':<22}{a['median_s'] * 1e3:>24.2f}{b['median_s'] * 1e3:>24.2f}",
        f"{'visual tokens':<22}{a['visual_tokens']:>24.1f}{b['visual_tokens']:>24.1f}",
        f"{'attn tokens/layer':<22}{_short(a['attn_tokens']):>24}{_short(b['attn_tokens']):>24}",
        f"{'ffn tokens/layer':<22}{_short(a['ffn_tokens']):>24}{_short(b['ffn_tokens']):>24}",
        f"FLOPs A/B = {r['flops_ratio']:.3f}   speedup B/A = {r['speedup']:.2f}×   "
        f"FLOP-ideal = {r['ideal_speedup']:.2f}×   achieved = {100 * r['fraction_of_ideal']:.0f}% of ideal",
        f"per-round speedup: median {sp['median']:.2f}×, IQR {sp['q1']:.2f}–{sp['q3']:.2f}×, "
        f"range {sp['min']:.2f}–{sp['max']:.2f}×   load average {load['before']:.1f} → {load['after']:.1f} "
        f"on {load['cpus']} CPUs",
        *(f"warning: {w}" for w in r["warnings"]),
        f"setup: {r['setup']}",
    ]
    return "\n".join(lines)


def _short(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{xs[0]:.0f}…{xs[-1]:.0f} (mean {sum(xs) / len(xs):.0f})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe A (the candidate)")
    p.add_argument("--vs", required=True, help="recipe B (the reference)")
    p.add_argument("--random-init", metavar="SHAPE", help=f"bench a random LLM of a named shape: {', '.join(SHAPES)}")
    p.add_argument("--num-layers", type=at_least(1), help="override the shape's depth (e.g. to fit CPU memory)")
    p.add_argument("--image-tokens", type=at_least(1), default=576, help="--random-init: image tokens of each sequence")
    p.add_argument("--candidate-image-tokens", type=at_least(1), metavar="N",
                   help="--random-init: recipe A gets N image tokens instead (a compressor, e.g. 40 superpixels)")
    p.add_argument("--text-tokens", type=at_least(0), default=32)
    p.add_argument("--num-mask-tokens", type=at_least(1), default=1)
    p.add_argument("--batch", type=at_least(1), default=1)
    p.add_argument("--warmup", type=at_least(0), default=2)
    p.add_argument("--repeats", type=at_least(1), default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--flops-only", action="store_true",
                   help="--random-init: only count FLOPs, on meta tensors (no weights allocated, no timing), so "
                        "full-depth 7B/70B shapes fit anywhere")
    p.add_argument("--decode-steps", type=at_least(1), metavar="N",
                   help="end to end (recipes only): time and count the whole model on one prompt — vision, "
                        "prefill by the routing strategy, N greedy decode steps with the KV cache, mask decoder")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of recipe A (the candidate)")


def run(args: argparse.Namespace) -> int:
    print(format_table(run_bench(args)))
    return 0
