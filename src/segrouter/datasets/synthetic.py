"""Synthetic referring segmentation: coloured shapes and expressions that name exactly one of them.

This is the framework's default dataset, so that every recipe runs, and learns, without a download. The
design choices serve that purpose:

* **Generated from (seed, split, index).** Each item has its own ``numpy.random.Generator`` seeded with
  ``(seed, split_index, index)``: items are identical in any DataLoader worker order, splits never share
  an item, and nothing is stored on disk.
* **Clean and unambiguous.** Shapes are drawn as exact masks and placed by rejection sampling with a gap
  between bounding boxes, so masks are disjoint and a mask is exactly the visible pixels of its object.
  Colours are far apart in RGB. Every expression is checked against the scene and kept only when it
  matches exactly one object, with a margin (positions differ by at least 15% of the image, sizes by
  1.5x, a relation holds well inside its direction cone and clearly fails for the distractors), so a label
  is never a judgement call.
* **A small grammar.** Expressions are lowercase words from :func:`vocabulary` (no punctuation), so a
  word-level tokenizer covers them::

      expr     := np [relation anchor]
      np       := "the" [modifier] [colour] (shape | "shape")
      anchor   := "the" [colour] (shape | "shape")          (must name one object)
      modifier := leftmost | rightmost | topmost | bottommost | larger | smaller | largest | smallest
      relation := "left of" | "right of" | "above" | "below"

  :func:`parse_expression` and :func:`describe_matches` evaluate an expression on a scene, so the
  uniqueness of every label can be verified independently of the generator.
* **Varied forms.** A modifier or relation is only used when the plain noun phrase is ambiguous (it then
  carries information). The form (attribute, position, size, relation) is drawn uniformly among those
  that can describe the target, then one description of that form, so no single form dominates.
* **Vision-dependent configurations.** With ``target_attributes: none`` the target is only ever called
  "the shape" ("the leftmost shape", "the shape left of the red circle"), so its colour and shape are
  never in the text, and with ``distinct`` no two objects share a colour (or a colour and shape): the
  target's name is then unique in its scene and can only be read from the image. ``one`` names at most
  one of the two ("the red shape", "the circle"): the other must be read off the object the text picks
  out. This is the benchmark on which a token-reduction method can lose accuracy (``recipes/visref.yaml``,
  docs/results.md). ``naming_share`` mixes a naming exercise into the training split only: that share of
  its samples calls the target by its colour alone ("the red shape"), when no other object has that
  colour, so its shape must be read from the image; the validation and test splits are unchanged.

Generation takes about 0.6 ms per 64x64 sample on one CPU core (measured), far below a training step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from segrouter.errors import DataError, ParamError, RecipeError
from segrouter.registry import register

SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Base RGB of each colour name, far apart so that colour words are never ambiguous.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.15, 0.72, 0.22),
    "blue": (0.15, 0.30, 0.92),
    "yellow": (0.95, 0.85, 0.12),
    "purple": (0.60, 0.22, 0.80),
    "cyan": (0.10, 0.80, 0.85),
}

#: Shape name -> inside test on offsets (dx, dy) from the centre for radius r; all fit the box +-r.
SHAPES: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "circle": lambda dx, dy, r: dx * dx + dy * dy <= r * r,
    "square": lambda dx, dy, r: (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r),
    "triangle": lambda dx, dy, r: (dy <= r) & (2.0 * np.abs(dx) <= dy + r),
    "diamond": lambda dx, dy, r: np.abs(dx) + np.abs(dy) <= r,
    "ring": lambda dx, dy, r: (dx * dx + dy * dy <= r * r) & (dx * dx + dy * dy >= (0.55 * r) ** 2),
}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
DISTINCT: tuple[str, ...] = ("none", "pairs", "colours")  # what no two objects of a scene may share
TARGET_ATTRIBUTES: tuple[str, ...] = ("any", "one", "none")  # how many of colour and shape the target's phrase names
FORMS: tuple[str, ...] = ("attribute", "position", "size", "relation")  # kinds of referring expression
POSITION_MODIFIERS: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost")
SIZE_MODIFIERS: tuple[str, ...] = ("larger", "smaller", "largest", "smallest")
_COMPARATIVES = ("larger", "smaller")  # only between exactly two objects

#: Modifier -> key where lower is more extreme: pixels for positions, log-area for sizes (ratios become gaps).
_MODIFIER_KEYS: dict[str, Callable[[SceneObject], float]] = {
    "leftmost": lambda o: o.cx,
    "rightmost": lambda o: -o.cx,
    "topmost": lambda o: o.cy,
    "bottommost": lambda o: -o.cy,
    "larger": lambda o: -math.log(o.area),
    "largest": lambda o: -math.log(o.area),
    "smaller": lambda o: math.log(o.area),
    "smallest": lambda o: math.log(o.area),
}

_POSITION_MARGIN = 0.15  # of the image side: the least gap that makes "leftmost" or "left of" clear
_SIZE_RATIO = 1.5  # the least area ratio that makes "larger" clear
_CONE = 1.5  # a relation is clear when the main offset is this many times the cross offset
_GAP_PX = 2.0  # empty pixels kept between object bounding boxes
_MIN_RADIUS_PX = 2.5
_MIN_AREA_PX = 4
_PLACEMENT_TRIES = 50
_SCENE_TRIES = 200


def vocabulary() -> list[str]:
    """Every word that can appear in an expression, for any configuration (sorted, lowercase)."""
    words = {"the", "shape", *COLOURS, *SHAPES, *POSITION_MODIFIERS, *SIZE_MODIFIERS}
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One drawn object; ``mask`` is exactly its visible pixels (objects never overlap)."""

    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    mask: np.ndarray  # (H, W) bool
    area: int  # pixels in mask


@dataclass(frozen=True)
class NounPhrase:
    """``the [modifier] [colour] (shape | "shape")``; ``None`` attributes match anything."""

    colour: str | None = None
    shape: str | None = None
    modifier: str | None = None

    def words(self) -> list[str]:
        return ["the", *filter(None, (self.modifier, self.colour)), self.shape or "shape"]


@dataclass(frozen=True)
class Expression:
    """A referring expression: a noun phrase, optionally related to a uniquely named anchor."""

    target: NounPhrase
    relation: str | None = None
    anchor: NounPhrase | None = None

    @property
    def text(self) -> str:
        words = self.target.words()
        if self.relation is not None and self.anchor is not None:
            words += [self.relation, *self.anchor.words()]
        return " ".join(words)


@dataclass(frozen=True, eq=False)
class Scene:
    """A generated sample before conversion to tensors; ``objects[target]`` is the referred object."""

    image: np.ndarray  # (3, H, W) float32 in [0, 1]
    objects: tuple[SceneObject, ...]
    target: int
    expression: Expression


def parse_expression(text: str) -> Expression:
    """Parse an expression of the grammar in the module docstring; raise ValueError otherwise."""
    words = text.split()
    target, rest = _parse_noun_phrase(words, text, allow_modifier=True)
    if not rest:
        return Expression(target)
    relation = next((r for r in RELATIONS if rest[: len(r.split())] == r.split()), None)
    if relation is None or target.modifier is not None:
        raise ValueError(f"cannot parse expression {text!r}")
    anchor, rest = _parse_noun_phrase(rest[len(relation.split()) :], text, allow_modifier=False)
    if rest:
        raise ValueError(f"cannot parse expression {text!r}: trailing words {' '.join(rest)!r}")
    return Expression(target, relation, anchor)


def describe_matches(objects: Sequence[SceneObject], expression: str | Expression) -> list[int]:
    """Indices of the objects an expression refers to (a valid label gives exactly one)."""
    expr = parse_expression(expression) if isinstance(expression, str) else expression
    targets = _noun_phrase_matches(expr.target, objects)
    if expr.relation is None or expr.anchor is None:
        return targets
    anchors = _noun_phrase_matches(expr.anchor, objects)
    if len(anchors) != 1:
        return []
    a = anchors[0]
    return [i for i in targets if i != a and _relation_holds(objects[i], objects[a], expr.relation, 1.0)]


@register("dataset", "synthetic")
class SyntheticReferringDataset(Dataset):
    """Coloured shapes on a noisy background, each sample with an expression naming exactly one shape.

    ``train`` has ``num_samples`` items; ``val`` and ``test`` have ``max(1, num_samples // 4)``, the usual
    ratio of evaluation to training data, so evaluation stays cheap. Items are
    ``{"image": (3,H,W) float32 in [0,1], "mask": (H,W) float32 in {0,1}, "text": str, "id": "train-000123",
    "target": "red circle", "semantic": (2,H,W) int64}`` (``target`` names the referred object, for answer
    templates with ``{target}``; ``semantic`` gives every pixel its object's colour and shape, index + 1 into
    :attr:`semantic_classes`, 0 for background, for ``model.loss.semantic_weight``).
    Sizes are diameters as a fraction of ``image_size``; ``noise`` is the std of the pixel noise.
    ``distinct`` keeps objects of one scene apart: ``pairs``, no two share both colour and shape;
    ``colours``, no two share a colour. ``target_attributes`` says how many of the target's colour and shape
    its noun phrase may name: ``any``, ``one`` or ``none`` ("the shape" with a position, size or relation, so
    the expression alone cannot identify it).
    """

    vocabulary = staticmethod(vocabulary)

    def __init__(
        self,
        split: str,
        /,
        *,
        image_size: int = 64,
        num_samples: int = 2000,
        seed: int = 0,
        min_objects: int = 2,
        max_objects: int = 3,
        forms: tuple[str, ...] = FORMS,
        shapes: tuple[str, ...] = ("circle", "square", "triangle"),
        colours: tuple[str, ...] = ("red", "green", "blue", "yellow"),
        min_size: float = 0.15,
        max_size: float = 0.35,
        noise: float = 0.03,
        distinct: Literal["none", "pairs", "colours"] = "none",
        target_attributes: Literal["any", "one", "none"] = "any",
        naming_share: float = 0.0,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'", fix=f"valid splits: {', '.join(SPLITS)}")
        self.check_params(**{k: v for k, v in locals().items() if k not in ("self", "split", "__class__")})
        self.split = split
        self.image_size = image_size
        self.seed = seed
        self.min_objects, self.max_objects = min_objects, max_objects
        self.forms = tuple(forms)
        self.shapes, self.colours = tuple(shapes), tuple(colours)
        self.min_size, self.max_size = min_size, max_size
        self.noise = noise
        self.distinct, self.target_attributes = distinct, target_attributes
        self.naming_share = naming_share if split == "train" else 0.0  # evaluation splits stay as they are
        self._length = num_samples if split == "train" else max(1, num_samples // 4)
        # the per-pixel labels of a sample's "semantic" maps, one map per attribute (class i is i + 1; 0 background)
        self.semantic_classes = {"colour": list(self.colours), "shape": list(self.shapes)}
        centres = np.arange(image_size, dtype=np.float32) + 0.5  # pixel centres
        self._ys, self._xs = np.meshgrid(centres, centres, indexing="ij")
        self.scene(0)  # fail at build time, not mid-training, when the settings admit no scene

    @staticmethod
    def check_params(**p: Any) -> None:
        """Every parameter range, checked when a recipe is validated (and again here at construction)."""
        image_size, num_samples, seed, noise = p["image_size"], p["num_samples"], p["seed"], p["noise"]
        min_objects, max_objects, min_size, max_size = p["min_objects"], p["max_objects"], p["min_size"], p["max_size"]
        shapes, colours, forms = p["shapes"], p["colours"], p["forms"]
        _check(image_size >= 16, f"image_size must be at least 16, got {image_size}")
        _check(num_samples >= 1, f"num_samples must be at least 1, got {num_samples}")
        _check(seed >= 0, f"seed must be non-negative, got {seed}")
        _check(
            1 <= min_objects <= max_objects,
            f"need 1 <= min_objects <= max_objects, got min_objects={min_objects}, max_objects={max_objects}",
        )
        _check(0.0 < min_size <= max_size <= 0.8, f"need 0 < min_size <= max_size <= 0.8, got {min_size}, {max_size}")
        _check(0.0 <= noise <= 0.5, f"noise must be in [0, 0.5], got {noise}")
        _check(0.0 <= p["naming_share"] <= 1.0, f"naming_share must be in [0, 1], got {p['naming_share']}")
        for name, chosen, known in (("shapes", shapes, SHAPES), ("colours", colours, COLOURS), ("forms", forms, FORMS)):
            unknown = [c for c in chosen if c not in known]
            _check(bool(chosen) and not unknown, f"{name} must be a non-empty subset of {', '.join(known)}")
        distinct, target_attributes = p["distinct"], p["target_attributes"]
        _check(distinct in DISTINCT, f"distinct must be one of {', '.join(DISTINCT)}, got {distinct!r}")
        kinds = {"none": None, "pairs": len(colours) * len(shapes), "colours": len(colours)}[distinct]
        _check(kinds is None or max_objects <= kinds,
               f"distinct={distinct} needs at least max_objects={max_objects} {distinct}, the settings give {kinds}")
        _check(target_attributes in TARGET_ATTRIBUTES,
               f"target_attributes must be one of {', '.join(TARGET_ATTRIBUTES)}, got {target_attributes!r}")
        if target_attributes == "none":  # the attribute form can then only say "the shape", of a lone object
            _check(set(forms) != {"attribute"} or max_objects == 1,
                   "target_attributes=none leaves the attribute form only 'the shape' for a lone object: add "
                   "position, size or relation, or set max_objects: 1")

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        scene = self.scene(index)
        index = index % self._length
        semantic = np.zeros((len(self.semantic_classes), self.image_size, self.image_size), dtype=np.int64)
        for o in scene.objects:
            for a, (attribute, classes) in enumerate(self.semantic_classes.items()):
                semantic[a, o.mask] = 1 + classes.index(getattr(o, attribute))
        return {
            "image": torch.from_numpy(scene.image),
            "mask": torch.from_numpy(scene.objects[scene.target].mask.astype(np.float32)),
            "semantic": torch.from_numpy(semantic),
            "text": scene.expression.text,
            "target": f"{scene.objects[scene.target].colour} {scene.objects[scene.target].shape}",
            "id": f"{self.split}-{index:06d}",
        }

    def scene(self, index: int) -> Scene:
        """The sample at ``index`` with its objects and parsed expression (for inspection and tests)."""
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for {self.split} split of {self._length} samples")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index % self._length])
        for _ in range(_SCENE_TRIES):
            objects = self._place_objects(rng)
            if objects is None:
                continue
            if self.naming_share and rng.random() < self.naming_share:  # "the red shape": its shape is read
                for target in rng.permutation(len(objects)):
                    phrase = NounPhrase(objects[target].colour)
                    if _attribute_matches(phrase, objects) == [target]:
                        return Scene(self._render(objects, rng), objects, int(target), Expression(phrase))
            for target in rng.permutation(len(objects)):
                described = _descriptions(
                    objects, int(target), "relation" in self.forms, self.image_size, self.target_attributes
                )
                forms = [f for name, f in zip(FORMS, described, strict=True) if f and name in self.forms]
                if forms:
                    choices = forms[rng.integers(len(forms))]
                    expression = choices[rng.integers(len(choices))]
                    return Scene(self._render(objects, rng), objects, int(target), expression)
        raise RecipeError(
            f"synthetic dataset cannot make a scene with {self.max_objects} objects of size up to "
            f"{self.max_size} in {self.image_size}px that some expression describes uniquely",
            fix="lower max_objects or max_size, raise image_size, or allow more shapes, colours or forms",
        )

    def _place_objects(self, rng: np.random.Generator) -> tuple[SceneObject, ...] | None:
        """Rejection-sample non-overlapping objects; ``None`` when the scene does not fit."""
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        objects: list[SceneObject] = []
        for _ in range(n):
            for _ in range(_PLACEMENT_TRIES):
                radius = max(_MIN_RADIUS_PX, 0.5 * self.image_size * rng.uniform(self.min_size, self.max_size))
                low, high = radius + 1.0, self.image_size - radius - 1.0
                if low >= high:
                    return None
                cx, cy = rng.uniform(low, high, size=2)
                if all(
                    max(abs(cx - o.cx), abs(cy - o.cy)) >= radius + o.radius + _GAP_PX for o in objects
                ):  # disjoint boxes, hence disjoint masks
                    shape = self._pick(rng, self.shapes, objects, "shape")
                    mask = SHAPES[shape](self._xs - cx, self._ys - cy, radius)
                    area = int(mask.sum())
                    if area >= _MIN_AREA_PX:
                        colour = self._pick(rng, self.colours, objects, "colour", shape)
                        objects.append(SceneObject(shape, colour, float(cx), float(cy), float(radius), mask, area))
                        break
            else:
                return None
        return tuple(objects)

    def _pick(self, rng: np.random.Generator, choices: tuple[str, ...], objects: Sequence[SceneObject],
              attribute: str, shape: str | None = None) -> str:
        """A uniform draw of a shape or colour, among those ``distinct`` leaves free (one draw for ``none``,
        so that setting reproduces the scenes it always gave)."""
        if self.distinct == "colours" and attribute == "colour":
            choices = tuple(c for c in choices if all(o.colour != c for o in objects))
        elif self.distinct == "pairs" and attribute == "colour":
            choices = tuple(c for c in choices if all((o.colour, o.shape) != (c, shape) for o in objects))
        elif self.distinct == "pairs":  # a shape whose every colour is taken would leave no colour to draw
            choices = tuple(s for s in choices if sum(o.shape == s for o in objects) < len(self.colours))
        return choices[rng.integers(len(choices))]

    def _render(self, objects: Sequence[SceneObject], rng: np.random.Generator) -> np.ndarray:
        """Grey background with a faint tint and gradient, flat jittered colours, light pixel noise."""
        size = self.image_size
        grey = rng.uniform(0.1, 0.45) + rng.uniform(-0.04, 0.04, size=(3, 1, 1))
        angle, amplitude = rng.uniform(0.0, 2.0 * math.pi), rng.uniform(0.0, 0.1)
        along = (self._xs - size / 2) * math.cos(angle) + (self._ys - size / 2) * math.sin(angle)
        gradient = amplitude * along / size
        image = (grey + gradient).astype(np.float32)
        for o in objects:
            colour = np.asarray(COLOURS[o.colour]) + rng.uniform(-0.05, 0.05, size=3)
            image[:, o.mask] = colour[:, None]
        image += rng.normal(0.0, self.noise, size=image.shape).astype(np.float32)
        return np.clip(image, 0.0, 1.0, out=image)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ParamError(f"synthetic dataset: {message}", fix="change the dataset parameters in the recipe")


def _parse_noun_phrase(words: list[str], text: str, *, allow_modifier: bool) -> tuple[NounPhrase, list[str]]:
    """Parse ``the [modifier] [colour] noun`` at the start of ``words``; return it and the rest."""
    if not words or words[0] != "the":
        raise ValueError(f"cannot parse expression {text!r}: expected 'the'")
    i, modifier, colour = 1, None, None
    if allow_modifier and i < len(words) and words[i] in (*POSITION_MODIFIERS, *SIZE_MODIFIERS):
        modifier, i = words[i], i + 1
    if i < len(words) and words[i] in COLOURS:
        colour, i = words[i], i + 1
    if i >= len(words) or (words[i] not in SHAPES and words[i] != "shape"):
        raise ValueError(f"cannot parse expression {text!r}: expected a shape word")
    shape = None if words[i] == "shape" else words[i]
    return NounPhrase(colour, shape, modifier), words[i + 1 :]


def _attribute_matches(phrase: NounPhrase, objects: Sequence[SceneObject]) -> list[int]:
    return [
        i
        for i, o in enumerate(objects)
        if phrase.colour in (None, o.colour) and phrase.shape in (None, o.shape)
    ]


def _noun_phrase_matches(phrase: NounPhrase, objects: Sequence[SceneObject]) -> list[int]:
    members = _attribute_matches(phrase, objects)
    modifier = phrase.modifier
    if modifier is None:
        return members
    if len(members) < 2 or (modifier in SIZE_MODIFIERS and (modifier in _COMPARATIVES) != (len(members) == 2)):
        return []  # positions compare at least two, "larger" exactly two, "largest" at least three
    key = _MODIFIER_KEYS[modifier]
    return [min(members, key=lambda i: key(objects[i]))]


def _relation_offsets(o: SceneObject, anchor: SceneObject, relation: str) -> tuple[float, float]:
    """Offset of ``o`` from ``anchor`` along the relation's direction, and the absolute cross offset."""
    dx, dy = o.cx - anchor.cx, o.cy - anchor.cy  # image y grows downwards
    main, cross = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return main, abs(cross)


def _relation_holds(o: SceneObject, anchor: SceneObject, relation: str, cone: float) -> bool:
    """Whether ``o`` lies in the direction cone of ``relation`` from ``anchor``: main > cone * cross."""
    main, cross = _relation_offsets(o, anchor, relation)
    return main > cone * cross


def _plain_phrases(o: SceneObject) -> tuple[NounPhrase, ...]:
    """The unmodified noun phrases that fit ``o``, most specific first ("the shape" last)."""
    return NounPhrase(o.colour, o.shape), NounPhrase(o.colour), NounPhrase(shape=o.shape), NounPhrase()


def _descriptions(
    objects: Sequence[SceneObject], target: int, relations: bool, image_size: int, target_attributes: str = "any"
) -> tuple[list[Expression], list[Expression], list[Expression], list[Expression]]:
    """Clear, unique descriptions of ``objects[target]`` by form: attribute, position, size, relation.
    ``target_attributes`` (any, one, none) caps how many of its colour and shape the target's phrase names."""
    o = objects[target]
    phrases = _plain_phrases(o)[{"any": 0, "one": 1, "none": 3}[target_attributes]:]
    margin = _POSITION_MARGIN * image_size
    attribute: list[Expression] = []
    position: list[Expression] = []
    size: list[Expression] = []
    related: list[Expression] = []
    for phrase in phrases:
        members = _attribute_matches(phrase, objects)
        if members == [target]:
            attribute.append(Expression(phrase))
            continue  # modifiers and relations only where the plain phrase is ambiguous
        others = [objects[i] for i in members if i != target]
        size_modifiers = _COMPARATIVES if len(members) == 2 else ("largest", "smallest")
        for modifiers, threshold, out in (
            (POSITION_MODIFIERS, margin, position),
            (size_modifiers, math.log(_SIZE_RATIO), size),
        ):
            for modifier in modifiers:
                key = _MODIFIER_KEYS[modifier]
                if all(key(p) - key(o) >= threshold for p in others):
                    out.append(Expression(replace(phrase, modifier=modifier)))
        if not relations:
            continue
        for a, anchor in enumerate(objects):
            if a == target:
                continue
            distractors = [p for p in others if p is not anchor]
            anchor_phrases = [p for p in _plain_phrases(anchor)[:3] if _attribute_matches(p, objects) == [a]]
            for rel in RELATIONS:
                main, cross = _relation_offsets(o, anchor, rel)
                if main >= max(margin, _CONE * cross) and not any(
                    _relation_holds(p, anchor, rel, 1.0 / _CONE) for p in distractors
                ):
                    related += [Expression(phrase, rel, p) for p in anchor_phrases]
    return attribute, position, size, related

