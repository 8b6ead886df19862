"""Layer indices from recipe values: the table pins what every shipped recipe and every default resolves to
at the depths the recipes and ``bench`` shapes use, so making the resolution one helper
(:func:`~segrouter.routing.base.resolve_layer`) moved no layer. Token routing floors a depth fraction,
PyramidDrop rounds it to the nearest layer; they differ where the product ends in .5 or more (22 layers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from segrouter.errors import RecipeError
from segrouter.registry import registry
from segrouter.routing.base import resolve_layer

DEPTHS = (2, 4, 22, 24, 32, 80)  # tiny; quickstart, visref, toy; tinyllama-1.1b; qwen2-0.5b; llama-7b; llama-70b
FLOOR = {  # token_routing insert_layer / route_start: 0.25 in the defaults and every recipe
    0.25: (0, 1, 5, 6, 8, 20),
    0.5: (1, 2, 11, 12, 16, 40),
}
NEAREST = {  # pdrop layers: (0.25, 0.5, 0.75) in the default and recipes/pdrop.yaml
    0.25: (1, 1, 6, 6, 8, 20),
    0.5: (1, 2, 11, 12, 16, 40),
    0.75: (2, 3, 17, 18, 24, 60),
}
TABLE = [(spec, n, "floor", i) for spec, row in FLOOR.items() for n, i in zip(DEPTHS, row, strict=True)] + [
    (spec, n, "nearest", i) for spec, row in NEAREST.items() for n, i in zip(DEPTHS, row, strict=True)
] + [(0, 4, "floor", 0), (3, 4, "floor", 3), (8, 32, "nearest", 8), (4, 4, "floor", 4), (1.0, 4, "floor", 4)]


@pytest.mark.parametrize(("spec", "num_layers", "rounding", "index"), TABLE)
def test_resolve_layer_table(spec: int | float, num_layers: int, rounding: str, index: int) -> None:
    assert resolve_layer(spec, num_layers, rounding=rounding) == index


@pytest.mark.parametrize("n", DEPTHS)
def test_token_routing_defaults_resolve_as_before(n: int) -> None:
    strategy = registry("routing").build({"name": "token_routing"})
    strategy.setup(SimpleNamespace(num_layers=n, hidden_size=8))
    start = FLOOR[0.25][DEPTHS.index(n)]
    assert strategy.insert_layer == start
    assert strategy.routed == [i >= start for i in range(n)]


@pytest.mark.parametrize("n", DEPTHS)
def test_pdrop_defaults_resolve_as_before(n: int) -> None:
    strategy = registry("routing").build({"name": "pdrop"})
    expected = [NEAREST[f][DEPTHS.index(n)] for f in (0.25, 0.5, 0.75)]
    if n == 2:  # three boundaries do not fit two layers
        with pytest.raises(RecipeError, match=r"resolve to layers \[1, 1, 2\]"):
            strategy.setup(SimpleNamespace(num_layers=n))
        return
    strategy.setup(SimpleNamespace(num_layers=n))
    assert list(strategy.boundaries) == expected
