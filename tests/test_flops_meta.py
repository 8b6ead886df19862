"""FLOPs counted on meta tensors (``bench --flops-only``) equal the counts on real tensors for every routing
strategy, no weight gets storage, and a program whose FLOPs depend on computed values is refused in one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import RECIPES

from segrouter import bench
from segrouter.errors import SegrouterError
from segrouter.flops import META, count_flops, count_meta_flops
from segrouter.registry import load_plugins, registry
from segrouter.routing.base import Kind

load_plugins()  # the repository's plugins/: fastv

ROUTINGS: dict[str, dict[str, Any]] = {
    "full": {"name": "full"},
    "token_routing": {"name": "token_routing", "insert_layer": 2, "route_start": 1, "num_proxies": 9},
    "token_routing_score_weighted": {"name": "token_routing", "insert_layer": 1, "route_start": 1, "num_proxies": 10,
                                     "proxy_rule": "score", "assignment": "weighted",
                                     "projector_input": "delta_token"},
    "token_routing_attention": {"name": "token_routing", "insert_layer": 1, "route_start": 2, "num_proxies": 7,
                                "proxy_rule": "attention"},
    "token_routing_layer": {"name": "token_routing", "insert_layer": 2, "route_start": 1, "num_proxies": 16,
                            "routed": "layer"},
    "fastv": {"name": "fastv"},
    "pdrop": {"name": "pdrop"},
    "mod": {"name": "mod"},
}


def _count(node: dict[str, Any], device: torch.device) -> tuple[int, dict[str, list[float]]]:
    """FLOPs of one forward of a toy-shape LLM (ragged batch of 2) under ``node``, on real or meta tensors."""
    llm, _ = bench.random_llm("toy", num_mask_tokens=2, device=device, dtype=torch.float32)
    seq = bench.lisa_sequence(llm.hidden_size, 64, 8, 2, 2, torch.device("cpu"), torch.float32)
    seq.kinds[-1, -1], seq.positions[-1, -1] = int(Kind.PAD), 0
    seq = dataclasses.replace(seq, embeds=seq.embeds.to(device))
    with torch.device(device):
        strategy = registry("routing").build(dict(node))
        strategy.setup(llm)
    strategy.eval()
    with torch.no_grad():
        if device == META:
            assert all(p.is_meta for p in [*llm.parameters(), *strategy.parameters()])
            flops = count_meta_flops(lambda: strategy(llm, seq), node["name"])
        else:
            _, flops = count_flops(lambda: strategy(llm, seq))
    return flops, strategy.stats.as_lists()


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_meta_count_equals_the_real_count(name: str) -> None:
    real, real_tokens = _count(ROUTINGS[name], torch.device("cpu"))
    meta, meta_tokens = _count(ROUTINGS[name], META)
    assert meta == real > 0
    assert meta_tokens == real_tokens  # the same tokens packed per layer


def _args(tmp_path: Path, flops_only: bool) -> argparse.Namespace:
    return argparse.Namespace(
        recipe=str(RECIPES / "token_routing.yaml"), vs=str(RECIPES / "quickstart.yaml"),
        overrides=["model.routing.num_proxies=9", "model.routing.routed=layer"], random_init="toy", num_layers=None,
        image_tokens=64, text_tokens=8, num_mask_tokens=2, batch=1, warmup=0, repeats=1, device="cpu",
        dtype="float32", out=str(tmp_path / "b.json"), candidate_image_tokens=None, flops_only=flops_only,
        decode_steps=None,
    )


def test_flops_only_bench_allocates_no_weights_and_matches_the_timed_bench(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[torch.nn.Module] = []
    random_llm = bench.random_llm

    def spy(*args: Any, **kwargs: Any) -> Any:
        llm, shape = random_llm(*args, **kwargs)
        built.append(llm)
        return llm, shape

    monkeypatch.setattr(bench, "random_llm", spy)
    r = bench.run_bench(_args(tmp_path, flops_only=True))
    assert len(built) == 1 and all(p.is_meta for p in built[0].parameters())
    assert json.loads((tmp_path / "b.json").read_text())["flops_ratio"] == r["flops_ratio"] < 1
    assert "median_s" not in r["A"] and r["setup"]["flops_only"] and "not timed" in bench.format_table(r)
    timed = bench.run_bench(_args(tmp_path, flops_only=False))
    assert (r["A"]["flops"], r["B"]["flops"]) == (timed["A"]["flops"], timed["B"]["flops"])
    assert r["A"]["ffn_tokens"] == timed["A"]["ffn_tokens"]


def test_flops_only_needs_a_named_shape(tmp_path: Path) -> None:
    args = _args(tmp_path, flops_only=True)
    args.random_init = None
    with pytest.raises(SegrouterError, match="needs --random-init"):
        bench.run_bench(args)


def test_value_dependent_flops_are_refused_in_one_line() -> None:
    w = torch.empty(16, 16, device=META)
    x = torch.empty(32, 16, device=META)

    def threshold() -> torch.Tensor:  # tokens whose score is positive go on: the count depends on the weights
        keep = (x @ w).sum(dim=-1) > 0
        return x[keep] @ w

    with pytest.raises(SegrouterError, match="its FLOPs depend on values") as exc:
        count_meta_flops(threshold, "threshold")
    assert "\n" not in str(exc.value)

    def to_numpy() -> Any:
        return (x @ w).numpy()

    with pytest.raises(SegrouterError, match="to_numpy cannot be counted on meta tensors") as exc:
        count_meta_flops(to_numpy, "to_numpy")
    assert "\n" not in str(exc.value)
