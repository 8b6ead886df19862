"""The synthetic dataset is deterministic, well-formed, and every label names exactly one object."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import segrouter.datasets  # noqa: F401  (registers built-ins)
from segrouter.datasets.synthetic import (
    POSITION_MODIFIERS,
    SHAPES,
    SceneObject,
    SyntheticReferringDataset,
    describe_matches,
    parse_expression,
    vocabulary,
)
from segrouter.errors import DataError, RecipeError
from segrouter.registry import registry

N = 200


@pytest.fixture(scope="module")
def train() -> SyntheticReferringDataset:
    return SyntheticReferringDataset("train", num_samples=N)


def _object(shape: str, colour: str, cx: float, cy: float, radius: float = 4.0, size: int = 64) -> SceneObject:
    centres = np.arange(size) + 0.5
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    mask = SHAPES[shape](xs - cx, ys - cy, radius)
    return SceneObject(shape, colour, cx, cy, radius, mask, int(mask.sum()))


def test_registered_and_buildable_from_a_recipe_node() -> None:
    entry = registry("dataset").get("synthetic")
    assert entry.factory is SyntheticReferringDataset
    assert entry.context() == ["split"]
    node = {"name": "synthetic", "image_size": 32, "num_samples": 8, "shapes": ["circle", "ring"]}
    ds = registry("dataset").build(node, "val")
    assert len(ds) == 2 and ds[0]["image"].shape == (3, 32, 32)


def test_unknown_split_raises_one_line_data_error() -> None:
    with pytest.raises(DataError, match="train, val, test") as info:
        SyntheticReferringDataset("training")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "params",
    [{"min_objects": 3, "max_objects": 2}, {"colours": ("red", "pink")}, {"shapes": ()}, {"image_size": 8}],
)
def test_bad_parameters_raise_recipe_error(params: dict) -> None:
    with pytest.raises(RecipeError):
        SyntheticReferringDataset("train", **params)


def test_lengths() -> None:
    assert len(SyntheticReferringDataset("train", num_samples=40)) == 40
    assert len(SyntheticReferringDataset("val", num_samples=40)) == 10
    assert len(SyntheticReferringDataset("test", num_samples=3)) == 1
    with pytest.raises(IndexError):
        SyntheticReferringDataset("test", num_samples=3)[1]


def test_items_have_documented_shapes_dtypes_and_ranges(train: SyntheticReferringDataset) -> None:
    for i in range(0, N, 10):
        item = train[i]
        assert set(item) == {"image", "mask", "text", "id", "target", "semantic"}
        assert item["semantic"].dtype == torch.int64 and item["semantic"].shape == (2, 64, 64)
        image, mask = item["image"], item["mask"]
        assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert mask.dtype == torch.float32 and mask.shape == (64, 64)
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert item["id"] == f"train-{i:06d}"
        assert isinstance(item["text"], str) and item["text"].startswith("the ")
        scene = train.scene(i)
        target = scene.objects[scene.target]
        assert item["target"] == f"{target.colour} {target.shape}"


def test_same_seed_gives_identical_data_in_any_order() -> None:
    a = SyntheticReferringDataset("train", num_samples=20, seed=3)
    b = SyntheticReferringDataset("train", num_samples=20, seed=3)
    reversed_items = [a[i] for i in reversed(range(20))][::-1]
    for x, y in zip(reversed_items, (b[i] for i in range(20)), strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]) and x["text"] == y["text"]
    assert torch.equal(a[-1]["image"], a[19]["image"])


@pytest.mark.parametrize("other", [{"split": "val"}, {"seed": 1}])
def test_different_split_or_seed_gives_different_data(other: dict) -> None:
    base = SyntheticReferringDataset("train", num_samples=40)
    changed = SyntheticReferringDataset(other.get("split", "train"), num_samples=40, seed=other.get("seed", 0))
    assert all(not torch.equal(base[i]["image"], changed[i]["image"]) for i in range(len(changed)))


def test_every_expression_word_is_in_the_vocabulary(train: SyntheticReferringDataset) -> None:
    vocab = set(vocabulary())
    assert SyntheticReferringDataset.vocabulary() == vocabulary()
    assert all(re.fullmatch(r"[a-z]+", w) for w in vocab)
    for i in range(N):
        text = train[i]["text"]
        assert text == " ".join(text.split())
        assert set(text.split()) <= vocab, text


def test_every_expression_names_exactly_the_masked_object(train: SyntheticReferringDataset) -> None:
    for i in range(N):
        scene = train.scene(i)
        assert describe_matches(scene.objects, scene.expression.text) == [scene.target], scene.expression.text
        assert parse_expression(scene.expression.text) == scene.expression
        coverage = sum(o.mask.astype(int) for o in scene.objects)
        assert coverage.max() == 1, "object masks overlap"
        assert np.array_equal(train[i]["mask"].numpy().astype(bool), scene.objects[scene.target].mask)


def test_all_forms_appear_and_forms_can_be_restricted(train: SyntheticReferringDataset) -> None:
    modifiers = {train.scene(i).expression.target.modifier for i in range(N)}
    assert {None, "leftmost", "larger"} <= modifiers
    assert any(train.scene(i).expression.relation for i in range(N))
    plain = SyntheticReferringDataset("train", num_samples=N, forms=("attribute", "position", "size"))
    assert not any(plain.scene(i).expression.relation for i in range(N))
    attribute = SyntheticReferringDataset("train", num_samples=N, forms=("attribute",))
    assert all(attribute.scene(i).expression.target.modifier is None for i in range(N))
    assert not any(attribute.scene(i).expression.relation for i in range(N))


def test_describe_matches_semantics() -> None:
    objects = [
        _object("circle", "red", 10, 30),
        _object("circle", "blue", 50, 30, radius=8),
        _object("square", "blue", 30, 55),
    ]
    assert describe_matches(objects, "the circle") == [0, 1]
    assert describe_matches(objects, "the red shape") == [0]
    assert describe_matches(objects, "the blue square") == [2]
    assert describe_matches(objects, "the leftmost circle") == [0]
    assert describe_matches(objects, "the bottommost shape") == [2]
    assert describe_matches(objects, "the larger circle") == [1]
    assert describe_matches(objects, "the largest shape") == [1]
    assert describe_matches(objects, "the larger shape") == []  # a comparative needs exactly two
    assert describe_matches(objects, "the circle left of the blue circle") == [0]
    assert describe_matches(objects, "the shape right of the red circle") == [1]  # the square is mostly below
    assert describe_matches(objects, "the shape above the square") == [0, 1]
    assert describe_matches(objects, "the circle right of the blue shape") == []  # anchor is not unique
    for bad in ["red circle", "the circle near the square", "the leftmost circle left of the square", "the"]:
        with pytest.raises(ValueError):
            parse_expression(bad)


VISION_ONLY = {"distinct": "colours", "target_attributes": "none", "forms": ("position", "size", "relation"),
               "min_objects": 3, "max_objects": 4, "colours": ("red", "green", "blue", "yellow", "purple", "cyan")}


@pytest.mark.parametrize("distinct", ["colours", "pairs"])
def test_vision_dependent_expressions_never_name_the_target(distinct: str) -> None:
    ds = SyntheticReferringDataset("train", num_samples=N, **{**VISION_ONLY, "distinct": distinct})
    forms = set()
    for i in range(N):
        scene = ds.scene(i)
        target, expr = scene.objects[scene.target], scene.expression
        assert expr.target.colour is None and expr.target.shape is None, expr.text  # always "the ... shape"
        assert describe_matches(scene.objects, expr.text) == [scene.target], expr.text
        keys = [o.colour if distinct == "colours" else (o.colour, o.shape) for o in scene.objects]
        assert len(set(keys)) == len(keys), "two objects share what distinct keeps apart"
        names = [f"{o.colour} {o.shape}" for o in scene.objects]
        assert names.count(ds[i]["target"]) == 1 and ds[i]["target"] == f"{target.colour} {target.shape}"
        forms.add("relation" if expr.relation else "position" if expr.target.modifier in POSITION_MODIFIERS else "size")
    assert forms == {"position", "size", "relation"}


def test_one_attribute_leaves_the_other_to_the_image() -> None:
    ds = SyntheticReferringDataset("train", num_samples=N, forms=("attribute",), distinct="colours",
                                   target_attributes="one", min_objects=3, max_objects=4)
    kinds = set()
    for i in range(N):
        scene = ds.scene(i)
        phrase, target = scene.expression.target, scene.objects[scene.target]
        assert (phrase.colour is None) != (phrase.shape is None), scene.expression.text  # exactly one named
        assert phrase.colour in (None, target.colour) and phrase.shape in (None, target.shape)
        kinds.add("colour" if phrase.colour else "shape")
    assert kinds == {"colour", "shape"}


def test_naming_share_calls_that_share_of_training_targets_by_colour_only() -> None:
    """A naming exercise in the training split only: "the red shape" (its colour unique in the scene), whose
    shape the answer names; with a share of 0 the stream is the one without the option, sample for sample."""
    plain = SyntheticReferringDataset("train", num_samples=N, **VISION_ONLY)
    assert [plain.scene(i).expression.text for i in range(20)] == [
        SyntheticReferringDataset("train", num_samples=N, naming_share=0.0, **VISION_ONLY).scene(i).expression.text
        for i in range(20)]
    mixed = SyntheticReferringDataset("train", num_samples=N, naming_share=0.5, **VISION_ONLY)
    named = 0
    for i in range(N):
        scene = mixed.scene(i)
        phrase, target = scene.expression.target, scene.objects[scene.target]
        if phrase.colour is not None:  # the exercise: the colour alone, unique in the scene
            assert phrase.shape is None and phrase.modifier is None and scene.expression.relation is None
            assert phrase.colour == target.colour
            assert describe_matches(scene.objects, scene.expression.text) == [scene.target]
            named += 1
    assert 0.35 < named / N < 0.65
    for split in ("val", "test"):  # evaluation never sees it
        a = SyntheticReferringDataset(split, num_samples=N, naming_share=0.5, **VISION_ONLY)
        b = SyntheticReferringDataset(split, num_samples=N, **VISION_ONLY)
        assert len(a) == len(b)
        assert [a.scene(i).expression.text for i in range(len(a))] == [b.scene(i).expression.text
                                                                    for i in range(len(b))]


def test_one_object_scenes_are_just_the_shape() -> None:
    ds = SyntheticReferringDataset("train", num_samples=20, min_objects=1, max_objects=1, forms=("attribute",),
                                   target_attributes="none")
    assert {ds[i]["text"] for i in range(20)} == {"the shape"}
    assert len({ds[i]["target"] for i in range(20)}) > 3


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"distinct": "colors"}, "distinct must be one of none, pairs, colours"),
        ({"distinct": "colours", "colours": ("red", "blue"), "max_objects": 3}, "needs at least max_objects=3 colours"),
        ({"distinct": "pairs", "colours": ("red",), "shapes": ("circle", "square"), "max_objects": 3},
         "needs at least max_objects=3 pairs"),
        ({"target_attributes": "none", "forms": ("attribute",)}, "add position, size or relation"),
        ({"target_attributes": False}, "target_attributes must be one of any, one, none"),
        ({"naming_share": 1.5}, "naming_share must be in [0, 1], got 1.5"),
    ],
)
def test_vision_dependent_settings_are_checked(params: dict, fragment: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        SyntheticReferringDataset.check_params(**{**_defaults(), **params})


def _defaults() -> dict:
    from segrouter.registry import registry

    return {n: p.default for n, p in registry("dataset").get("synthetic").params().items()}
