"""Efficiency baselines: FastV (plugin), PyramidDrop and Mixture-of-Depths routing; avgpool, resampler and ToMe
compressors. FLOPs really drop as configured, degenerate settings equal ``full``, recipes build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import RECIPES, tiny_cfg

from segrouter.build import build
from segrouter.compressors.tome import bipartite_merge
from segrouter.errors import RecipeError
from segrouter.flops import count_flops
from segrouter.recipe import component, load_recipe
from segrouter.registry import load_plugins, registry
from segrouter.routing.base import Kind, TokenSequence, attention_bias, last_instruction_token, received_attention
from segrouter.text import build_tokenizer

load_plugins()  # the repository's plugins/ folder: fastv


def _llm(node: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    return registry("llm").build({"name": "hf_causal", **node}, build_tokenizer(None, ["a"], 1)).eval()


def _seq(d: int, n_image: list[int], n_text: int = 6) -> TokenSequence:
    """Like a synthetic prompt: [BOS] image tokens, text, [SEG], [EOS]; right-padded when counts differ."""
    rows = [[Kind.TEXT] + [Kind.IMAGE] * n + [Kind.TEXT] * n_text + [Kind.MASK, Kind.TEXT] for n in n_image]
    length = max(len(r) for r in rows)
    kinds = torch.tensor([[int(k) for k in r] + [int(Kind.PAD)] * (length - len(r)) for r in rows])
    positions = torch.where(kinds != Kind.PAD, torch.arange(length)[None], 0)
    torch.manual_seed(1)
    return TokenSequence(torch.randn(len(rows), length, d), kinds, positions, torch.zeros(len(rows), length, 2))


def _routing(node: dict[str, Any], llm: torch.nn.Module) -> torch.nn.Module:
    strategy = registry("routing").build(node)
    strategy.setup(llm)
    return strategy


@pytest.fixture(scope="module")
def quickstart_llm() -> torch.nn.Module:
    return _llm({k: v for k, v in component(load_recipe(RECIPES / "quickstart.yaml"), "model.llm").items()
                 if k != "name"})


@pytest.fixture(scope="module")
def gqa_llm() -> torch.nn.Module:
    """Small, LLaMA with grouped key/value heads and eager attention: exercises RoPE/GQA in the ranking."""
    return _llm({"family": "llama", "hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                 "attn_implementation": "eager"})


# Tokens per layer for the quickstart shape (4 layers, 64 image + 9 other tokens), from each configuration.
N, T = 73, 9
CASES = [
    ({"name": "fastv"}, [N, N, T + 32, T + 32]),  # k=2, ratio=0.5
    ({"name": "fastv", "rank_by": "last_instruction"}, [N, N, T + 32, T + 32]),
    ({"name": "fastv", "k": 1, "ratio": 0.75}, [N, T + 16, T + 16, T + 16]),
    ({"name": "pdrop"}, [N, T + 32, T + 16, T + 8]),  # boundaries 1, 2, 3; keep 1/2, 1/4, 1/8
    ({"name": "mod"}, [N, T + 32, N, T + 32]),  # layers 1 and 3 routed, capacity 0.5
    ({"name": "mod", "route_layers": "all", "capacity": 0.25}, [T + 16] * 4),
    ({"name": "random"}, [N, N, T + 32, T + 32]),  # k=2, keep=0.5: FastV's count, no ranking work
    ({"name": "random", "k": 0, "keep": 0.25}, [T + 16] * 4),
]


@pytest.mark.parametrize(("node", "tokens"), CASES, ids=lambda v: json.dumps(v) if isinstance(v, dict) else "")
def test_flops_drop_as_configured(quickstart_llm: torch.nn.Module, node: dict[str, Any], tokens: list[int]) -> None:
    llm, d = quickstart_llm, quickstart_llm.hidden_size
    seq = _seq(d, [64, 64])
    full = registry("routing").build({"name": "full"})
    strategy = _routing(node, llm)
    with torch.no_grad():
        _, full_flops = count_flops(lambda: full(llm, seq))
        out, flops = count_flops(lambda: strategy(llm, seq))
        # one layer's cost at each token count, measured with the same counter on a plain sequence
        per_layer = {n: count_flops(lambda n=n: full(llm, _seq(d, [n - T, n - T])))[1] / len(llm.layers)
                     for n in set(tokens)}
    assert out.shape == seq.embeds.shape
    assert strategy.stats.as_lists()["attn_tokens"] == [float(n) for n in tokens]
    expected = sum(per_layer[n] for n in tokens) / full_flops
    measured = flops / full_flops
    # ranking attention / routers cost a little on top: at most 5% of the full model
    assert expected - 1e-6 <= measured <= expected + 0.05, (measured, expected)


@pytest.mark.parametrize(
    "node",
    [
        {"name": "fastv", "ratio": 0.0},
        {"name": "fastv", "ratio": 0.0, "rank_by": "last_instruction"},
        {"name": "pdrop", "keep": [1.0, 1.0, 1.0]},
        {"name": "mod", "capacity": 1.0, "alpha": 0.0, "route_layers": "all"},
        {"name": "random", "k": 0, "keep": 1.0},
    ],
    ids=lambda v: json.dumps(v),
)
def test_degenerate_settings_equal_full(gqa_llm: torch.nn.Module, node: dict[str, Any]) -> None:
    seq = _seq(gqa_llm.hidden_size, [12, 5, 9])  # padded batch, different image counts
    with torch.no_grad():
        ref = registry("routing").build({"name": "full"})(gqa_llm, seq)
        out = _routing(node, gqa_llm)(gqa_llm, seq)
    assert out.shape == ref.shape
    torch.testing.assert_close(out[seq.valid], ref[seq.valid], rtol=1e-5, atol=1e-5)


def test_received_attention_matches_eager_weights(gqa_llm: torch.nn.Module) -> None:
    """Recomputing attention from q/k (RoPE, GQA, causal + padding) gives the eager kernel's weights."""
    seq = _seq(gqa_llm.hidden_size, [7, 3])
    layer, pos, valid = gqa_llm.layers[0], seq.positions, seq.valid
    pe = gqa_llm.rotary(seq.embeds, pos)
    with torch.no_grad():
        _, weights = layer.self_attn(layer.input_layernorm(seq.embeds), pe,
                                     attention_bias(pos, valid, pos, valid, torch.float32))
        ours = received_attention(layer, seq.embeds, pe, pos, valid, valid)
        last = received_attention(layer, seq.embeds, pe, pos, valid, last_instruction_token(seq.kinds))
    per_query = weights.mean(dim=1) * valid[:, :, None]
    torch.testing.assert_close(ours, per_query.sum(1) / valid.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
    q = last_instruction_token(seq.kinds).float().argmax(1)
    assert q.tolist() == [1 + 7 + 5, 1 + 3 + 5]  # the text token right before [SEG]
    torch.testing.assert_close(last, per_query[torch.arange(2), q], rtol=1e-5, atol=1e-6)


def test_fastv_dropped_tokens_keep_their_layer_k_state(gqa_llm: torch.nn.Module) -> None:
    seq = _seq(gqa_llm.hidden_size, [12, 8])
    captured: list[torch.Tensor] = []
    hook = gqa_llm.layers[1].register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        ref = registry("routing").build({"name": "full"})(gqa_llm, seq)
        hook.remove()
        out = _routing({"name": "fastv", "k": 2, "ratio": 0.5}, gqa_llm)(gqa_llm, seq)
    after_k = gqa_llm.norm(captured[0])
    image = seq.is_kind(Kind.IMAGE)
    frozen = ((out - after_k).abs().amax(-1) < 1e-5) & image
    assert frozen.sum(1).tolist() == [6, 4]  # exactly the dropped half of each sample's image tokens
    torch.testing.assert_close(out[:, 0], ref[:, 0])  # [BOS] precedes every image token: unaffected


def test_random_drop_reproduces_at_evaluation_and_varies_in_training(gqa_llm: torch.nn.Module) -> None:
    seq = _seq(gqa_llm.hidden_size, [12, 8])
    captured: list[torch.Tensor] = []
    hook = gqa_llm.layers[0].register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        registry("routing").build({"name": "full"})(gqa_llm, seq)
    hook.remove()
    after_k = gqa_llm.norm(captured[0])  # every token's state after layer k = 1: what a dropped token keeps
    image = seq.is_kind(Kind.IMAGE)
    strategy = _routing({"name": "random", "k": 1, "keep": 0.5, "seed": 3}, gqa_llm)

    def kept() -> torch.Tensor:
        with torch.no_grad():
            return image & ((strategy(gqa_llm, seq) - after_k).abs().amax(-1) > 1e-5)

    strategy.eval()
    first = kept()
    assert first.sum(1).tolist() == [6, 4]  # ceil(keep·N) of each sample's image tokens
    assert not torch.equal(kept(), first)  # the next batch of the same evaluation pass draws anew
    strategy.eval()  # entering eval mode again restarts the evaluation draws: the same subsets
    assert torch.equal(kept(), first)
    strategy.train()
    torch.manual_seed(0)
    trained = kept()
    torch.manual_seed(0)
    assert torch.equal(kept(), trained) and not torch.equal(trained, first)  # training: the global generator


def test_mod_router_gets_gradient_and_starts_as_unit_gate(gqa_llm: torch.nn.Module) -> None:
    strategy = _routing({"name": "mod", "capacity": 0.5, "alpha": 0.2}, gqa_llm)
    assert sorted(strategy.routers) == ["1", "3"]
    assert all(bool((r.weight == 0).all()) for r in strategy.routers.values())
    seq = _seq(gqa_llm.hidden_size, [12, 8])
    strategy(gqa_llm, seq).pow(2).sum().backward()
    for router in strategy.routers.values():
        assert router.weight.grad is not None and float(router.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    ("kind", "node", "fragment"),
    [
        ("routing", {"name": "fastv", "ratio": 1.0}, "ratio 1.0 is outside [0, 1)"),
        ("routing", {"name": "fastv", "k": 4}, "use 1 <= k <= 3"),
        ("routing", {"name": "fastv", "rank_by": "first"}, "model.routing.rank_by: wrong type"),
        ("routing", {"name": "pdrop", "keep": [0.25, 0.5, 0.125]}, "never increase"),
        ("routing", {"name": "pdrop", "layers": [3, 2, 1]}, "strictly increasing layers in [1, 3]"),
        ("routing", {"name": "pdrop", "layers": [1.5, 2, 3]}, "neither a layer index (int) nor a depth fraction"),
        ("routing", {"name": "mod", "capacity": 0.0}, "capacity 0.0 is outside (0, 1]"),
        ("routing", {"name": "mod", "route_layers": [1, 7]}, "distinct indices in [0, 3]"),
        ("routing", {"name": "random", "keep": 0.0}, "keep 0.0 is outside (0, 1]"),
        ("routing", {"name": "random", "k": 4}, "use 0 <= k <= 3"),
        ("compressor", {"name": "avgpool", "k": 3}, "use one of [1, 2, 4, 8]"),
        ("compressor", {"name": "tome", "r": 20, "steps": 4}, "24 tokens remain and one step merges 1 to 12"),
        ("compressor", {"name": "resampler", "num_heads": 5}, "not divisible by num_heads=5"),
    ],
)
def test_bad_parameters_fail_with_one_line(gqa_llm: torch.nn.Module, kind: str, node: dict[str, Any],
                                           fragment: str) -> None:
    with pytest.raises(RecipeError) as err:
        if kind == "routing":
            registry(kind).build(node, where="model.routing").setup(gqa_llm)
        else:
            registry(kind).build(node, 16, 32, (8, 8), where="model.compressor")
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("node", "count"),
    [
        ({"name": "avgpool", "k": 2}, 16),
        ({"name": "avgpool", "k": 4}, 4),
        ({"name": "resampler", "num_queries": 7, "depth": 2}, 7),
        ({"name": "tome", "r": 8, "steps": 6}, 16),
        ({"name": "tome", "r": 32, "steps": 1}, 32),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_compressor_token_count_coords_and_gradients(node: dict[str, Any], count: int) -> None:
    torch.manual_seed(0)
    compressor = registry("compressor").build(node, 16, 32, (8, 8))
    features = torch.randn(2, 16, 8, 8, requires_grad=True)
    tokens = compressor(features, torch.zeros(2, 3, 64, 64))
    assert tokens.embeds.shape == (2, count, 32) and bool(tokens.mask.all()) and tokens.coords.shape == (2, count, 2)
    assert float(tokens.coords.min()) > 0 and float(tokens.coords.max()) < 1
    tokens.embeds.square().sum().backward()
    assert float(features.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in compressor.parameters())


def test_avgpool_coords_are_pooled_cell_centres() -> None:
    tokens = registry("compressor").build({"name": "avgpool", "k": 4}, 16, 32, (8, 8))(torch.randn(1, 16, 8, 8), None)
    assert tokens.coords[0].tolist() == [[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]]


def test_tome_merges_are_size_weighted() -> None:
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # A = rows 0, 2; B = rows 1, 3
    coords = torch.tensor([[[0.1, 0.1], [0.3, 0.1], [0.1, 0.9], [0.9, 0.9]]])
    size, first = torch.ones(1, 4, 1), torch.arange(4)[None, :, None]
    x, size, coords, first = bipartite_merge(x, size, coords, first, r=1)  # row 0 joins row 1 (cosine 1)
    assert x[0].tolist() == [[0.0, 1.0], [1.5, 0.0], [1.0, 1.0]] and size[0, :, 0].tolist() == [1, 2, 1]
    assert first[0, :, 0].tolist() == [2, 0, 3]
    torch.testing.assert_close(coords[0, 1], torch.tensor([0.2, 0.1]))
    x, size, coords, _ = bipartite_merge(x, size, coords, first, r=1)  # row 3 joins the 2-patch token
    torch.testing.assert_close(x[0, 1], torch.tensor([4 / 3, 1 / 3]))
    torch.testing.assert_close(coords[0, 1], torch.tensor([(2 * 0.2 + 0.9) / 3, (2 * 0.1 + 0.9) / 3]))


@pytest.mark.parametrize("recipe", ["fastv", "pdrop", "mod", "random", "avgpool", "resampler", "tome"])
def test_recipe_validates_and_builds(tmp_path: Path, recipe: str) -> None:
    cfg = load_recipe(RECIPES / f"{recipe}.yaml")
    assert cfg.name == recipe
    # its compressor and routing on the tiny model, deepened to 4 layers and an 8×8 grid so defaults fit
    nodes = {key: component(cfg, f"model.{key}") for key in ("compressor", "routing")}
    overrides = [f"model.{key}.{k}={json.dumps(v)}" for key, node in nodes.items() for k, v in node.items()]
    model, data = build(tiny_cfg(tmp_path, "model.llm.num_layers=4", "model.image_size=64", *overrides))
    assert model.routing.__class__ is registry("routing").get(nodes["routing"]["name"]).factory
    batch = data.collate([data.dataset("val")[i] for i in range(2)])
    with torch.no_grad():
        out = model(batch, flops=True)
    assert out["masks"].shape == (2, 64, 64) and out["llm_flops"] > 0
    expected_tokens = 64 if nodes["compressor"]["name"] == "mlp" else 16  # the baselines compress 8×8 to 16
    assert out["visual_tokens"].tolist() == [expected_tokens] * 2


def test_slic_superpixel_variant_lists_and_checks_only_its_parameters() -> None:
    entry = registry("compressor").get("slic_superpixel")
    assert entry.context() == ["in_dim", "out_dim", "grid_size"]
    assert [p.describe() for p in entry.params().values()] == [
        "n_segments: int = 24", "compactness: float = 20.0", "min_area: int = 16", "max_regions: int = 64",
        "cache_dir: str | None = None", "positional_embedding: bool = True", "aggregator: bool = True",
        "aggregator_heads: int = 4", "context_tokens: int = 4", "depth: int = 2"]
    with pytest.raises(RecipeError, match="'generator' is not a parameter of compressor 'slic_superpixel'"):
        registry("compressor").validate({"name": "slic_superpixel", "generator": "sam"}, "model.compressor")
    with pytest.raises(RecipeError, match=r"^model.compressor.n_segments: n_segments must be at least 1, got 0$"):
        registry("compressor").validate({"name": "slic_superpixel", "n_segments": 0}, "model.compressor")
    projector = registry("compressor").build({"name": "slic_superpixel", "min_area": 4}, 16, 32, (4, 4))
    assert type(projector).__name__ == "SLICSuperpixelProjector"
    assert projector.generator.settings() == {"n_segments": 24, "compactness": 20.0, "colour_threshold": 0.0,
                                              "min_area": 4, "max_regions": 64}


def test_slic_superpixel_is_the_ssp_projector_with_slic_regions(tmp_path) -> None:
    from conftest import build_model, tiny_cfg

    from segrouter.superpixels import SLICGenerator

    cfg = tiny_cfg(tmp_path, "model.compressor.name=slic_superpixel", "model.compressor.n_segments=6",
                   "model.compressor.min_area=4")
    model, data = build_model(cfg)
    assert isinstance(model.compressor.generator, SLICGenerator)
    batch = data.collate([data.dataset("train")[i] for i in range(2)])
    out = model(batch)
    assert 1 <= int(out["visual_tokens"].max()) <= 16
