"""Token routing: equivalence with ``full`` at the degenerate setting, real compute savings, masking of
late tokens, gradient to the projector, and the bench / attention-analysis tools on toy shapes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, build_model, tiny_cfg

from segrouter.bench import disturbance, format_table, lisa_sequence, round_spread, run_bench
from segrouter.errors import RecipeError, SegrouterError
from segrouter.flops import count_flops
from segrouter.registry import registry
from segrouter.routing.base import Kind
from segrouter.text import build_tokenizer


def _llm(layers: int = 4, d: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    tok = build_tokenizer(None, ["a"], 1)
    return registry("llm").build(
        {"name": "hf_causal", "hidden_size": d, "num_layers": layers, "num_heads": 4, "num_kv_heads": 2}, tok
    ).eval()


def _strategy(llm: torch.nn.Module, **params: object) -> torch.nn.Module:
    s = registry("routing").build({"name": "token_routing", **params})
    s.setup(llm)
    return s


def _seq(llm: torch.nn.Module, batch: int = 2):  # 4 text, 64 image (8×8), 32 text, [SEG], 1 text
    seq = lisa_sequence(llm.hidden_size, 64, 32, 1, batch, torch.device("cpu"), torch.float32)
    seq.embeds = torch.randn_like(seq.embeds)
    if batch > 1:  # ragged batch: the last sample is one token shorter
        seq.kinds[-1, -1] = int(Kind.PAD)
        seq.positions[-1, -1] = 0
    return seq


@pytest.mark.parametrize("rule", ["grid", "score", "attention"])
@pytest.mark.parametrize("assignment", ["nearest", "weighted"])
def test_all_proxies_and_no_late_insertion_equals_full(rule: str, assignment: str) -> None:
    llm = _llm()
    seq = _seq(llm)
    full = registry("routing").build({"name": "full"})(llm, seq)
    ours = _strategy(llm, insert_layer=0, route_start=0, proxy_ratio=1.0, proxy_rule=rule,
                     assignment=assignment)(llm, seq)
    valid = seq.valid
    torch.testing.assert_close(ours[valid], full[valid], rtol=1e-5, atol=1e-5)


def test_flops_drop_as_configured() -> None:
    llm = _llm(layers=4, d=64)
    seq = _seq(llm, batch=1)
    with torch.no_grad():
        _, f_full = count_flops(lambda: registry("routing").build({"name": "full"})(llm, seq))
        ratios = {}
        for ratio in (1.0, 0.25, 0.0625):
            s = _strategy(llm, insert_layer=2, route_start=1, proxy_ratio=ratio)
            _, f = count_flops(lambda s=s: s(llm, seq))
            ratios[ratio] = f / f_full
            ffn = s.stats.as_lists()["ffn_tokens"]
            n_proxies = max(1, round(64 * ratio))
            # layer 0 unrouted without the 2 late tokens; layers 1..3 routed: 36 text + proxies (+2 late from layer 2)
            assert ffn == [100.0, 36.0 + n_proxies, 38.0 + n_proxies, 38.0 + n_proxies]
    assert ratios[1.0] < 1.0  # late insertion alone saves a little
    assert ratios[0.0625] < ratios[0.25] < ratios[1.0]
    # exact accounting, 4 proxies vs all 64: 60 image tokens skip the FFN (3 matmuls 64×256) in 3 routed
    # layers, and pay the projector (64→16→64); their proxy's update is gathered, not multiplied
    d, dff, routed, layers = 64, 256, 60, 3
    saved = routed * layers * 2 * 3 * d * dff
    paid = routed * layers * 2 * d * 16 * 2
    assert (ratios[1.0] - ratios[0.0625]) * f_full == pytest.approx(saved - paid, rel=1e-9)


def test_negative_controls_move_the_routed_updates_and_keep_the_ffn_work() -> None:
    """Only the last layer routed, so every variant reaches it with the same states: text, mask tokens and
    proxies come out the same, and a routed token's pre-norm state minus the ``projector: zero`` one is the
    update it received — its nearest proxy's (default), a random proxy's (``assignment: random``)."""
    llm = _llm(layers=4, d=64)
    seq = _seq(llm)
    common = {"insert_layer": 0, "route_layers": [3], "num_proxies": 4}
    pre_norm: list[torch.Tensor] = []
    hook = llm.norm.register_forward_hook(lambda m, args, out: pre_norm.append(args[0]))
    flops, states = {}, {}
    with torch.no_grad():
        for name, params in {"default": {}, "random": {"assignment": "random"}, "zero": {"projector": "zero"}}.items():
            s = _strategy(llm, **common, **params).eval()
            _, flops[name] = count_flops(lambda s=s: s(llm, seq))
            states[name] = pre_norm[-1]
            if name == "random":
                s.eval()  # evaluation draws restart: the same assignment again
                s(llm, seq)
                torch.testing.assert_close(pre_norm[-1], states["random"], rtol=0, atol=0)
            if name == "zero":
                assert len(s.projectors) == 0
    hook.remove()
    ffn = s.stats.as_lists()["ffn_tokens"]
    assert ffn[3] == 37.5 + 4  # the text and mask tokens (38, 37 in the shorter sample) and 4 proxies
    image = seq.is_kind(Kind.IMAGE) & seq.valid
    received = {k: (v - states["zero"]) for k, v in states.items()}
    moved = received["default"].abs().amax(-1) > 1e-6
    routed = image & moved
    assert routed.sum(1).tolist() == [60, 60] and not bool((moved & ~image).any())  # only routed tokens differ

    def distinct(rows: torch.Tensor) -> torch.Tensor:  # rows equal up to rounding count once
        near = (rows[:, None] - rows[None]).abs().amax(-1) < 1e-5
        return rows[near.int().argmax(dim=1) == torch.arange(len(rows))]

    proxy_updates = [distinct(received["default"][b, routed[b]]) for b in range(2)]
    assert [len(u) for u in proxy_updates] == [4, 4]  # the nearest proxy's update, unchanged (zero-init projector)
    for b in range(2):  # a random proxy's update: one of the sample's 4, not the nearest one for most tokens
        got = received["random"][b, routed[b]]
        match = (got[:, None] - proxy_updates[b][None]).abs().amax(-1) < 1e-5
        assert bool((match.sum(-1) == 1).all())
        same = (got - received["default"][b, routed[b]]).abs().amax(-1) < 1e-5
        assert 0 < int(same.sum()) < 40
    # the FFN work is the default's; random assignment skips the distances; zero skips the projector (64→16→64)
    assert flops["random"] == pytest.approx(flops["default"], rel=1e-3)
    assert flops["default"] - flops["zero"] == pytest.approx(2 * 60 * 2 * 64 * 16 * 2, rel=1e-3)


def test_late_tokens_are_absent_from_early_layers() -> None:
    llm = _llm()
    seq = _seq(llm, batch=1)
    s = _strategy(llm, insert_layer=3, route_start=4, proxy_ratio=1.0)
    s(llm, seq)
    attn = s.stats.as_lists()["attn_tokens"]
    assert attn == [100.0, 100.0, 100.0, 102.0]  # [SEG] and the text after it join at layer 3
    # and with late insertion, the other tokens' states are unchanged (causality): compare with full
    full = registry("routing").build({"name": "full"})(llm, seq)
    out = _strategy(llm, insert_layer=3, route_start=4)(llm, seq)
    early = seq.kinds[0] != int(Kind.MASK)
    early[-1] = False
    torch.testing.assert_close(out[0, early], full[0, early], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0, ~early], full[0, ~early])


def test_gradient_reaches_projector_and_scorer() -> None:
    llm = _llm()
    seq = _seq(llm)
    s = _strategy(llm, proxy_rule="score", projector_input="delta_token").train()
    s(llm, seq).sum().backward()
    for name, p in s.named_parameters():
        if name.endswith("down.weight") or name.startswith("scorers"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_parameters_are_recipe_errors() -> None:
    llm = _llm(layers=4)
    with pytest.raises(RecipeError, match="insert_layer=9 is outside the LLM's 4 layers"):
        _strategy(llm, insert_layer=9)
    with pytest.raises(RecipeError, match="route_layers"):
        _strategy(llm, route_layers=[1, 7])
    with pytest.raises(RecipeError, match="proxy_ratio"):
        registry("routing").build({"name": "token_routing", "proxy_ratio": 0.0})


def test_token_routing_recipe_trains(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, "model.routing.name=token_routing", "model.routing.proxy_ratio=0.5")
    model, data = build_model(cfg)
    batch = data.collate([data.dataset("train")[i] for i in range(4)])
    out = model(batch, flops=True)
    model.losses(out, batch["mask"])["loss"].backward()
    assert out["masks"].shape == (4, 32, 32) and out["llm_flops"] > 0


def test_bench_random_init_toy_shape(tmp_path: Path) -> None:
    args = argparse.Namespace(
        recipe=str(RECIPES / "token_routing.yaml"), vs=str(RECIPES / "quickstart.yaml"), overrides=[],
        random_init="toy", num_layers=None, image_tokens=64, text_tokens=8, num_mask_tokens=1, batch=1,
        warmup=1, repeats=2, device="cpu", dtype="float32", out=str(tmp_path / "b.json"), candidate_image_tokens=None,
        flops_only=False, decode_steps=None,
    )
    r = run_bench(args)
    assert 0 < r["flops_ratio"] < 1 and len(r["A"]["times_s"]) == 2
    assert r["A"]["ffn_tokens"][-1] < r["B"]["ffn_tokens"][-1]
    assert json.loads((tmp_path / "b.json").read_text())["flops_ratio"] == r["flops_ratio"]
    sp = r["speedup_per_round"]
    assert sp["min"] <= sp["q1"] <= sp["median"] <= sp["q3"] <= sp["max"]
    assert set(r["load_average"]) == {"before", "after", "cpus"} and isinstance(r["warnings"], list)
    assert "per-round speedup: median" in format_table(r)


def test_bench_random_init_takes_list_parameters() -> None:
    """pdrop's stage boundaries are a list in its recipe: the routing node reaches the registry as plain data."""
    args = argparse.Namespace(
        recipe=str(RECIPES / "pdrop.yaml"), vs=str(RECIPES / "quickstart.yaml"), overrides=[], random_init="toy",
        num_layers=None, image_tokens=64, text_tokens=8, num_mask_tokens=1, batch=1, warmup=0, repeats=1,
        device="cpu", dtype="float32", out=None, candidate_image_tokens=None, flops_only=False, decode_steps=None,
    )
    assert run_bench(args)["flops_ratio"] < 1


def test_bench_warns_when_rounds_disagree_or_the_machine_is_loaded() -> None:
    cpu = torch.device("cpu")
    steady = round_spread([1.50, 1.52, 1.49, 1.51])
    assert disturbance(steady, (2.0, 2.1), threads=2, device=cpu, cpus=2) == []  # the bench's own 2 threads
    noisy = round_spread([1.0, 1.6, 1.2, 1.9])
    assert "spread by" in disturbance(noisy, (0.1, 0.1), threads=2, device=cpu, cpus=2)[0]
    loaded = disturbance(steady, (3.9, 4.2), threads=2, device=cpu, cpus=2)
    assert len(loaded) == 1 and "load average 3.9 before and 4.2 after" in loaded[0]


def test_bench_from_recipes(tmp_path: Path) -> None:
    args = argparse.Namespace(
        recipe=str(RECIPES / "tiny.yaml"), vs=str(RECIPES / "tiny.yaml"),
        overrides=["model.routing.name=token_routing"],
        random_init=None, num_layers=None, batch=2, warmup=0, repeats=1, device="cpu", dtype="float32", out=None,
        image_tokens=576, text_tokens=32, num_mask_tokens=1, candidate_image_tokens=None, flops_only=False,
        decode_steps=None,
    )
    r = run_bench(args)
    assert r["A"]["visual_tokens"] == 16 and r["flops_ratio"] < 1
    args.candidate_image_tokens = 40
    with pytest.raises(SegrouterError, match="only applies with --random-init"):
        run_bench(args)


def test_bench_random_init_with_a_compressors_token_count() -> None:
    """Superpixel counts need not be squares: 40 tokens against a 64-patch grid, same routing."""
    args = argparse.Namespace(
        recipe=str(RECIPES / "quickstart.yaml"), vs=str(RECIPES / "quickstart.yaml"), overrides=[],
        random_init="toy", num_layers=None, image_tokens=64, text_tokens=8, num_mask_tokens=1, batch=1,
        warmup=0, repeats=1, device="cpu", dtype="float32", out=None, candidate_image_tokens=40, flops_only=False,
        decode_steps=None,
    )
    r = run_bench(args)
    assert (r["A"]["visual_tokens"], r["B"]["visual_tokens"]) == (40, 64)
    assert r["A"]["ffn_tokens"][0] == 40 + 8 + 1 + 5 and r["B"]["ffn_tokens"][0] == 64 + 8 + 1 + 5
    assert 0.5 < r["flops_ratio"] < 0.8
    seq = lisa_sequence(8, 40, 2, 1, 1, torch.device("cpu"), torch.float32)
    coords = seq.coords[0, 4:44]
    assert len(torch.unique(coords, dim=0)) == 40 and coords.min() > 0 and coords.max() < 1
    assert coords[0, 0] < 0.2 and coords[-1, 0] > 0.8  # spread over the whole image, top to bottom
    args.candidate_image_tokens = 0
    with pytest.raises(SegrouterError, match="image token count must be positive, got 0"):
        run_bench(args)


def test_analyze_attention(tmp_path: Path) -> None:
    from segrouter.analysis.attention import attention_profile

    cfg = tiny_cfg(tmp_path)
    model, data = build_model(cfg)
    batch = data.collate([data.dataset("val")[i] for i in range(3)])
    prof = attention_profile(model.eval(), [batch])
    assert set(prof) == {"mask", "text", "image"} and len(prof["mask"]) == 2
    assert all(0.0 <= v <= 1.0 for vs in prof.values() for v in vs)


def test_composes_with_superpixel_tokens(tmp_path: Path) -> None:
    """sam_superpixel gives a different token count per image; proxies come from region centroids."""
    cfg = tiny_cfg(tmp_path, "model.compressor.name=sam_superpixel", "model.compressor.n_segments=12",
                   "model.compressor.min_area=4", "model.routing.name=token_routing", "model.routing.proxy_ratio=0.25")
    model, data = build_model(cfg)
    batch = data.collate([data.dataset("train")[i] for i in range(4)])
    out = model(batch, flops=True)
    counts = out["visual_tokens"]
    assert len(set(counts.tolist())) > 1  # ragged batch
    ffn = model.routing.stats.as_lists()["ffn_tokens"]
    assert ffn[-1] < model.routing.stats.as_lists()["attn_tokens"][-1]
    model.losses(out, batch["mask"])["loss"].backward()


def _analytic_flops(llm: torch.nn.Module, n_text: int, n_image: int, n_late: int, insert: int, route_start: int,
                    proxies: int, projector_hidden: int) -> int:
    """FLOPs of token routing on one sample, from the method's definition: per layer the q/k/v/o projections
    and SDPA over the tokens present, the FFN over the tokens that run it, and the projector per routed token.
    (The FLOP counter counts matmuls and SDPA; norms, gathers and scatters are free.)"""
    d, cfg = llm.hidden_size, llm.model.config
    kv, dff = d * cfg.num_key_value_heads // cfg.num_attention_heads, cfg.intermediate_size
    total = 0
    for i in range(llm.num_layers):
        tokens = n_text + n_image + (n_late if i >= insert else 0)
        ffn_tokens = tokens - (n_image - proxies if i >= route_start else 0)
        total += 2 * tokens * d * (2 * d + 2 * kv) + 4 * tokens * tokens * d + 2 * ffn_tokens * 3 * d * dff
        if i >= route_start:
            total += (n_image - proxies) * 2 * (d * projector_hidden + projector_hidden * d)
    return total


@pytest.mark.parametrize(("insert", "route_start", "ratio"), [(2, 1, 0.0625), (0, 0, 0.25), (3, 2, 1.0)])
def test_counted_flops_match_the_analytic_count(insert: int, route_start: int, ratio: float) -> None:
    llm = _llm(layers=4, d=64)
    seq = _seq(llm, batch=1)  # 4 + 64 image + 32 text, then [SEG] and 1 text (the late tokens)
    s = _strategy(llm, insert_layer=insert, route_start=route_start, proxy_ratio=ratio, projector_ratio=0.25)
    with torch.no_grad():
        _, counted = count_flops(lambda: s(llm, seq))
    proxies = max(1, round(64 * ratio))
    assert counted == _analytic_flops(llm, 36, 64, 2, insert, route_start, proxies, 16)


@pytest.mark.parametrize("count", [1, 3, 10, 17, 36, 64])
def test_exactly_the_requested_proxies_spread_over_the_image(count: int) -> None:
    llm = _llm()
    seq = _seq(llm, batch=1)
    s = _strategy(llm, num_proxies=count)
    is_image = seq.kinds == int(Kind.IMAGE)
    prior = s._grid_prior(seq, is_image, torch.tensor([count]))
    assert int(prior.sum()) == count and bool((prior <= is_image).all())
    if count >= 9:  # every third of the image, in both directions, holds a proxy
        yx = seq.coords[prior]
        for axis in (0, 1):
            assert {int(v * 3) for v in yx[:, axis].tolist()} == {0, 1, 2}


def test_superpixel_coordinates_still_give_every_requested_proxy() -> None:
    llm = _llm()
    seq = _seq(llm, batch=2)
    g = torch.Generator().manual_seed(0)
    image = seq.kinds == int(Kind.IMAGE)
    clustered = torch.rand(2, int(image[0].sum()), 2, generator=g) * 0.3  # irregular centres, crowded in a corner
    seq.coords[image] = clustered.reshape(-1, 2)
    s = _strategy(llm, num_proxies=12)
    prior = s._grid_prior(seq, image, torch.tensor([12, 12]))
    assert prior.sum(dim=1).tolist() == [12, 12]


def test_gradient_checkpointing_recomputes_routed_layers() -> None:
    calls = {"mlp": 0}
    llm = _llm(layers=4)
    for layer in llm.layers:
        # a pre-hook: checkpoint's recomputation stops once it has what backward needs, before the FFN returns
        layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))
    seq = _seq(llm, batch=2)
    s = _strategy(llm, insert_layer=1, route_start=1, proxy_ratio=0.25)
    counted = {}
    for on in (False, True):
        llm.gradient_checkpointing = on
        calls["mlp"] = 0
        embeds = seq.embeds.clone().requires_grad_(True)
        s(llm, type(seq)(embeds, seq.kinds, seq.positions, seq.coords)).sum().backward()
        counted[on] = calls["mlp"]
        assert embeds.grad is not None and bool(embeds.grad.abs().sum() > 0)
    assert counted == {False: 4, True: 8}  # every layer's FFN, routed ones included, runs again in backward


@pytest.mark.parametrize("rule", ["grid", "score"])
def test_whole_layer_routing_with_every_token_a_proxy_equals_full(rule: str) -> None:
    llm = _llm()
    seq = _seq(llm)
    with torch.no_grad():
        full = registry("routing").build({"name": "full"})(llm, seq)
        ours = _strategy(llm, insert_layer=0, route_start=0, proxy_ratio=1.0, proxy_rule=rule, routed="layer")(llm, seq)
    torch.testing.assert_close(ours[seq.valid], full[seq.valid], rtol=1e-5, atol=1e-5)


def test_whole_layer_routing_takes_routed_tokens_out_of_attention_too() -> None:
    llm = _llm()
    seq = _seq(llm, batch=1)
    ffn_only, whole = (_strategy(llm, insert_layer=2, route_start=1, proxy_ratio=0.25, routed=r)
                       for r in ("ffn", "layer"))
    with torch.no_grad():
        flops = {name: count_flops(lambda s=s: s(llm, seq))[1] for name, s in (("ffn", ffn_only), ("layer", whole))}
    assert flops["layer"] < flops["ffn"]
    a, b = ffn_only.stats.as_lists(), whole.stats.as_lists()
    assert a["ffn_tokens"] == b["ffn_tokens"] == b["attn_tokens"]  # in routed layers, only the FFN pack attends
    assert a["attn_tokens"][1] == 100.0 and b["attn_tokens"][1] == 36.0 + 16
    embeds = seq.embeds.clone().requires_grad_(True)
    whole.train()
    whole(llm, type(seq)(embeds, seq.kinds, seq.positions, seq.coords)).sum().backward()
    assert embeds.grad is not None and all(p.grad is not None for p in whole.projectors.parameters())
    with pytest.raises(RecipeError, match="attention rule cannot rank them"):
        _strategy(llm, routed="layer", proxy_rule="attention")
