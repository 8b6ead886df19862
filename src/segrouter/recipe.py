"""Recipes: omegaconf YAML with ``base:`` inheritance and ``key=value`` overrides, validated up front.

A recipe is data, never code: YAML is read with the safe loader (no ``!!python`` tags), interpolations may
only refer to other keys (a ``${resolver:...}`` call such as ``oc.env`` is an error), and the folders a
recipe lists under ``plugins:`` are only checked to be loaded already (the user opts into their code with
``--plugins DIR``), never imported from here. Validation happens in two passes before anything is built:
the fixed top-level schema (keys and types, via omegaconf structured configs), then every component node
against its registered constructor (see :mod:`segrouter.registry`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from segrouter.errors import RecipeError, did_you_mean
from segrouter.metric_names import monitorable
from segrouter.registry import check_recipe_plugins, registry

MODEL_COMPONENTS: dict[str, str] = {
    "vision_encoder": "vision_encoder",
    "compressor": "compressor",
    "llm": "llm",
    "routing": "routing",
    "mask_decoder": "mask_decoder",
}


@dataclass
class LossConfig:
    """LISA's weights: text cross-entropy + per-pixel BCE + Dice. ``semantic_weight`` adds a per-pixel
    class loss on the vision encoder's features (a 1×1 head over its grid, logits upsampled to the image), for
    datasets that give every pixel a class (the synthetic one: each colour-shape pair; 0 is background): dense
    supervision of the vision stage, the role CLIP or ImageNet pretraining plays for a real MLLM's encoder."""

    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    semantic_weight: float = 0.0


@dataclass
class LoRAConfig:
    """LoRA on the LLM (LISA: r=8, alpha=16, dropout 0.05 on q_proj/v_proj). When enabled the LLM's base
    weights are frozen except the token embeddings and LM head, which must learn the new special tokens."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class ModelConfig:
    vision_encoder: dict[str, Any] = field(default_factory=lambda: {"name": "timm_vit"})
    compressor: dict[str, Any] = field(default_factory=lambda: {"name": "mlp"})
    llm: dict[str, Any] = field(default_factory=lambda: {"name": "hf_causal"})
    routing: dict[str, Any] = field(default_factory=lambda: {"name": "full"})
    mask_decoder: dict[str, Any] = field(default_factory=lambda: {"name": "sam"})
    # the mask decoder's own vision encoder (e.g. a local conv_stem; LISA's SAM ViT); null: it reads vision_encoder's
    mask_encoder: dict[str, Any] | None = None
    blind_llm: bool = False  # control: the LLM gets no visual tokens (the mask decoder still sees the image)
    image_size: int = 64
    num_mask_tokens: int = 1
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    freeze_vision: bool = False  # LISA keeps the (pretrained) vision tower frozen
    freeze: list[str] = field(default_factory=list)  # other parts to keep fixed, e.g. [mask_decoder, text_proj]


@dataclass
class DataConfig:
    dataset: dict[str, Any] = field(default_factory=lambda: {"name": "synthetic"})
    batch_size: int = 16
    eval_batch_size: int = 32
    num_workers: int = 0
    prompt: str = "segment {expression}"
    answer: str = "it is {mask_tokens}"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    scheduler: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1


@dataclass
class DeepSpeedConfig:
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass
class EarlyStoppingConfig:
    """Lightning's ``EarlyStopping`` (when enabled): end the fit when ``monitor`` has not improved by more than
    ``min_delta`` for ``patience`` validations in a row."""

    enabled: bool = False
    monitor: str = "val/ciou"
    mode: str = "max"
    patience: int = 3
    min_delta: float = 0.0


@dataclass
class CompileConfig:
    """``torch.compile`` of the model before training or evaluation (when enabled): ``backend`` is any name
    ``torch._dynamo.list_backends()`` gives (``inductor`` by default; ``eager`` traces without compiling, to check
    that a model compiles), ``mode`` one of torch.compile's modes or null."""

    enabled: bool = False
    backend: str = "inductor"
    mode: str | None = None


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = -1
    max_epochs: int | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    log_every_n_steps: int = 10
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    num_sanity_val_steps: int = 0
    deterministic: bool = False
    enable_progress_bar: bool = True
    lr_monitor: bool = False  # log the learning rate every logging step (Lightning's LearningRateMonitor)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class CheckpointConfig:
    monitor: str | None = "val/ciou"
    mode: str = "max"
    save_last: bool = True
    save_top_k: int = 1
    every_n_train_steps: int | None = None  # also write last.ckpt every N steps (mid-epoch resume points)


@dataclass
class WandbConfig:
    """Weights & Biases (when enabled; needs ``pip install wandb``). Offline by default: the run is written under
    the run folder's ``wandb/`` and needs no network or account; ``wandb sync`` uploads it later."""

    enabled: bool = False
    project: str = "segrouter"
    offline: bool = True


@dataclass
class LoggerConfig:
    csv: bool = True
    tensorboard: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)


CONTROLS = ("shuffle", "zero")
RESOLUTIONS = ("original", "model")  # metrics.resolution


@dataclass
class MetricsConfig:
    flops_batches: int = 2  # eval batches per epoch whose LLM FLOPs are counted (0 = off)
    # evaluation-time control on the LLM's visual tokens: shuffle (another sample's, rolled across the batch)
    # or zero; null for none. Set by `segrouter validate/test --control`.
    control: str | None = None
    # this evaluation applies the recipe's method to a checkpoint trained without it (a dense `full` model): its
    # new parameters keep their initialisation. Set by `segrouter validate/test --training-free`.
    training_free: bool = False
    # where masks are scored: original (the field's protocol: the prediction is cropped out of the padding and
    # resized to the original image, against the original mask) or model (both at model.image_size, letterboxed).
    # Datasets that keep no original (synthetic: generated at the model's size) are scored at the model's size.
    resolution: str = "original"


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    plugins: list[str] = field(default_factory=list)
    init_from: str | None = None  # a checkpoint whose weights start the run (e.g. a stage-1 or a trained full model)
    init_modules: list[str] = field(default_factory=list)  # load only these parts of the model from it (empty: all)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass(frozen=True)
class Rule:
    """The values a recipe key allows beyond its type: ``ok(value)`` and the range in words for the error."""

    ok: typing.Callable[[Any], bool]
    text: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int(lo: int, hi: int | None = None, *, also: tuple[Any, ...] = ()) -> Rule:
    text = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return Rule(lambda v: any(v is a or v == a and _is_int(v) for a in also)
                or (_is_int(v) and v >= lo and (hi is None or v <= hi)),
                " or ".join([*(repr(a) if a is not None else "null" for a in also), text]))


def _real(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
          also: tuple[Any, ...] = ()) -> Rule:
    if hi is None:
        text = f"a number {'>' if lo_open else '>='} {lo}"
    else:
        text = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Rule(lambda v: v in also if v is None else (
        _is_real(v) and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))),
        " or ".join([*("null" for a in also if a is None), text]))


def _count_or_fraction(lo: int, *, fraction_lo_open: bool) -> Rule:
    """Lightning's batch counts: null, an integer (batches) or a float fraction of an epoch."""
    frac = "(0.0, 1.0]" if fraction_lo_open else "[0.0, 1.0]"
    return Rule(lambda v: v is None or (_is_int(v) and v >= lo) or (
        isinstance(v, float) and (0.0 < v if fraction_lo_open else 0.0 <= v) and v <= 1.0),
        f"null, an integer >= {lo} (batches) or a float in {frac} (fraction of an epoch)")


def _devices(v: Any) -> bool:
    """Lightning's ``devices``: 'auto', -1 (all), a count >= 1, or device indices (a list, or "0,1")."""
    if _is_int(v):
        return v >= 1 or v == -1
    if isinstance(v, str):
        v = v.replace(" ", "")
        return v in ("auto", "-1") or (bool(re.fullmatch(r"\d+(,\d+)*,?", v)) and v != "0")
    return isinstance(v, (list, ListConfig)) and len(v) > 0 and all(_is_int(d) and d >= 0 for d in v)


# Value ranges of the fixed keys, checked at validation so that a value Lightning or torch would reject fails
# before anything is built or written (often they reject it only after the run folder exists).
RANGES: dict[str, Rule] = {
    "seed": _int(0, 2**32 - 1),
    "model.image_size": _int(1),
    "model.num_mask_tokens": _int(1),
    "model.loss.ce_weight": _real(0),
    "model.loss.bce_weight": _real(0),
    "model.loss.dice_weight": _real(0),
    "model.loss.semantic_weight": _real(0),
    "model.lora.r": _int(1),
    "model.lora.alpha": _real(0, lo_open=True),
    "model.lora.dropout": _real(0, 1, hi_open=True),
    "data.batch_size": _int(1),
    "data.eval_batch_size": _int(1),
    "data.num_workers": _int(0),
    "optim.lr": _real(0, lo_open=True),
    "optim.weight_decay": _real(0),
    "optim.warmup_steps": _int(0),
    "optim.min_lr_ratio": _real(0, 1),
    "trainer.devices": Rule(_devices, "'auto', -1, an integer >= 1, or a list of device indices >= 0"),
    "trainer.num_nodes": _int(1),
    "trainer.max_steps": _int(0, also=(-1,)),
    "trainer.max_epochs": _int(0, also=(None, -1)),
    "trainer.accumulate_grad_batches": _int(1),
    "trainer.gradient_clip_val": _real(0, also=(None,)),
    "trainer.val_check_interval": _count_or_fraction(1, fraction_lo_open=True),
    "trainer.check_val_every_n_epoch": _int(1, also=(None,)),
    "trainer.log_every_n_steps": _int(1),
    "trainer.limit_train_batches": _count_or_fraction(0, fraction_lo_open=False),
    "trainer.limit_val_batches": _count_or_fraction(0, fraction_lo_open=False),
    "trainer.limit_test_batches": _count_or_fraction(0, fraction_lo_open=False),
    "trainer.num_sanity_val_steps": _int(0, also=(-1,)),
    "trainer.early_stopping.patience": _int(0),
    "trainer.early_stopping.min_delta": _real(0),
    "checkpoint.save_top_k": _int(0, also=(-1,)),
    "checkpoint.every_n_train_steps": _int(1, also=(None,)),
    "metrics.flops_batches": _int(0),
}


def _lightning_choices() -> dict[str, tuple[str, ...]]:
    """The names Lightning accepts for the string-valued trainer keys (asked of Lightning itself)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry
    from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT

    from segrouter.training.trainer import DEEPSPEED_STAGES  # the DeepSpeed stages segrouter configures itself

    precisions = [str(a) for lit in typing.get_args(_PRECISION_INPUT) for a in typing.get_args(lit)]
    strategies = [s for s in StrategyRegistry.available_strategies() if not s.startswith("deepspeed")]
    return {
        "trainer.accelerator": ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())),
        "trainer.precision": tuple(dict.fromkeys(precisions)),
        "trainer.strategy": ("auto", *strategies, *DEEPSPEED_STAGES),
    }


def validate_ranges(cfg: DictConfig) -> None:
    """Every key of :data:`RANGES` within its range, and the string trainer keys among Lightning's names."""
    for key, rule in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if not rule.ok(value):
            shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
            raise RecipeError(f"{shown!r} is out of range", where=key, fix=f"allowed: {rule.text}")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas):
        raise RecipeError(f"{list(betas)!r} is out of range", where="optim.betas", fix="allowed: two numbers in [0, 1)")
    for key, choices in _lightning_choices().items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise RecipeError(f"unknown value {value!r}{did_you_mean(value, choices)}", where=key,
                              fix=f"use one of: {', '.join(choices)}")


COMPONENT_PATHS = (*(f"model.{k}" for k in MODEL_COMPONENTS), "model.mask_encoder", "data.dataset")


def _first_line(exc: Exception) -> str:
    """The first line of an omegaconf/Python error message (omegaconf keeps it in ``msg``)."""
    return (getattr(exc, "msg", None) or str(exc) or type(exc).__name__).splitlines()[0]


def _kind_mismatch(base: Any, override: Any, prefix: str = "") -> str | None:
    """The first dotted key where ``override`` puts a mapping, list or scalar in place of another kind."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return None
    for k, o in override.items():
        b = base.get(k)
        if b is None or o is None:
            continue
        kinds = [dict if isinstance(v, dict) else list if isinstance(v, list) else object for v in (b, o)]
        if kinds[0] is not kinds[1]:
            return f"{prefix}{k}"
        found = _kind_mismatch(b, o, f"{prefix}{k}.")
        if found:
            return found
    return None


def _where(base: DictConfig, override: DictConfig) -> str | None:
    try:
        return _kind_mismatch(OmegaConf.to_container(base, resolve=False),
                              OmegaConf.to_container(override, resolve=False))
    except Exception:  # only a hint for the message
        return None


def merge(base: DictConfig, override: DictConfig) -> DictConfig:
    """``OmegaConf.merge``, except that a component node whose ``name`` changes is replaced, not merged:
    the new component must not inherit the old one's parameters."""
    base = base.copy()
    for key in COMPONENT_PATHS:
        try:
            new, old = OmegaConf.select(override, key), OmegaConf.select(base, key)
        except OmegaConfBaseException:  # e.g. 'data' is a list here: the merge below reports it
            continue
        if (isinstance(new, DictConfig) and isinstance(old, DictConfig) and "name" in new
                and new.get("name") != old.get("name")):
            OmegaConf.update(base, key, {}, merge=False)
    try:
        return OmegaConf.merge(base, override)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:  # e.g. a list where the base has a mapping
        key = getattr(exc, "full_key", None) or _where(base, override)
        raise RecipeError(f"cannot merge: {_first_line(exc)}", where=str(key) if key else None,
                          fix="a value must keep the kind (mapping, list or scalar) it has in the "
                              "base recipe") from None


# Bounds on what one recipe may expand to: a hand-written recipe has a few hundred values, while a few lines of
# YAML aliases ("billion laughs") or a base: list repeated at every level can ask for billions.
MAX_RECIPE_NODES = 20_000  # mappings, lists and scalars of one file (or override) with every alias expanded
MAX_RECIPE_DEPTH = 64  # nesting of mappings and lists
MAX_BASE_DEPTH = 32  # base: chains


def _check_size(data: Any, where: str) -> None:
    """Count ``data``'s nodes as omegaconf will copy them (an alias counts once per use), stopping at the
    bounds; each distinct node is visited once, so a bomb is refused in time proportional to its text."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise RecipeError("a YAML alias refers to a node that contains it", where=where,
                              fix="remove the recursive alias (*name inside &name)")
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"nested deeper than {MAX_RECIPE_DEPTH} levels", where=where, fix="flatten the recipe")
        open_nodes.add(id(node))
        total = 1
        for child in node.values() if isinstance(node, dict) else node:
            total += size(child, depth + 1)
            if total > MAX_RECIPE_NODES:
                raise RecipeError(
                    f"expands to more than {MAX_RECIPE_NODES} values (each YAML alias repeats what it points to)",
                    where=where, fix="write the recipe out without nested anchors/aliases")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(data, 0)


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", fix="check the path (recipes live in recipes/)")
    try:
        text = path.read_text()
        data = yaml.safe_load(text)  # refuses !!python tags: recipes are data
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"invalid YAML{line}: {problem}", where=str(path), fix="fix the YAML syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe: {exc}", where=str(path)) from None
    except RecursionError:
        raise RecipeError(f"nested deeper than {MAX_RECIPE_DEPTH} levels", where=str(path),
                          fix="flatten the recipe") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping of keys", where=str(path), fix="start the file with 'name: ...'")
    _check_size(data, str(path))
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"cannot parse recipe: {exc}", where=str(path)) from None


def _load_with_bases(path: Path, stack: tuple[Path, ...], loaded: dict[Path, DictConfig]) -> DictConfig:
    """``path`` merged over its bases. ``loaded`` holds every file already read in this load (with its own
    bases merged), so a base named many times, at any depth, is read and merged up once: a recipe that names
    the same base twice at each of 22 levels costs 22 loads, not 2^22."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(p.name for p in (*stack, path))
        raise RecipeError(f"inheritance cycle: {chain}", where=str(path), fix="remove one of the 'base:' entries")
    if path in loaded:
        return loaded[path]
    if len(stack) >= MAX_BASE_DEPTH:
        raise RecipeError(f"more than {MAX_BASE_DEPTH} levels of base: recipes", where=str(path),
                          fix="shorten the chain of base: recipes")
    loaded[path] = _merge_bases(path, _read_yaml(path), stack, loaded)
    return loaded[path]


def _merge_bases(path: Path, cfg: DictConfig, stack: tuple[Path, ...], loaded: dict[Path, DictConfig]) -> DictConfig:
    bases = cfg.pop("base", None)
    if bases is None:
        return cfg
    if isinstance(bases, str):
        bases = [bases]
    elif not OmegaConf.is_list(bases):
        raise RecipeError("'base' must be a recipe path or a list of them", where=f"{path}: base")
    merged = OmegaConf.create({})
    for b in bases:
        if not isinstance(b, str):
            raise RecipeError(f"base entry {b!r} is not a path", where=f"{path}: base")
        base_path = (path.parent / b) if not Path(b).is_absolute() else Path(b)
        if not base_path.is_file():
            raise RecipeError(
                f"base recipe not found: {b}",
                where=f"{path}: base",
                fix=f"paths are relative to {path.parent}",
            )
        merged = merge(merged, _load_with_bases(base_path, (*stack, path), loaded))
    return merge(merged, cfg)


_RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w\-]*(?:\.[A-Za-z_][\w\-]*)*)\s*:")


def _reject_resolvers(node: Any, prefix: str = "") -> None:
    """Refuse ``${resolver:...}`` calls anywhere in the recipe: only references to other keys are allowed.

    omegaconf registers resolvers such as ``oc.env`` globally; ``${oc.env:HF_TOKEN}`` would copy a secret
    into the saved ``recipe.yaml``, ``hparams.yaml`` and every checkpoint. A recipe is shared data, so it may
    refer to its own keys (``${model.image_size}``) and nothing else. An escaped ``\\${...}`` is refused too:
    telling it from an escaped backslash followed by a real call is not worth the risk."""
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_resolvers(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _reject_resolvers(v, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(node, str) and (m := _RESOLVER_CALL.search(node)):
        env = m.group(1) == "oc.env"
        raise RecipeError(
            f"'{node}' calls the resolver '{m.group(1)}'; a recipe may only refer to its own keys, "
            f"e.g. ${{model.image_size}}",
            where=prefix.rstrip(".") or None,
            fix=("write the value itself (as key=value on the command line if it varies); environment variables are "
                 "never read into a recipe, which is saved with the run and its checkpoints") if env
            else "write the value itself, or refer to another key with ${key}",
        )


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            raise RecipeError(f"override '{o}' is not key=value", fix="write overrides like trainer.max_steps=100")
        key, _, value = o.partition("=")
        try:  # a value is YAML too: bound its aliases before omegaconf expands them
            _check_size(yaml.safe_load(value), key)
        except yaml.YAMLError:
            pass  # reported by from_dotlist below, with its usual message
        except RecursionError:
            raise RecipeError(f"nested deeper than {MAX_RECIPE_DEPTH} levels", where=key) from None
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"bad override value: {problem}", fix="quote the value or fix its YAML syntax") from None
    except OmegaConfBaseException as exc:
        raise RecipeError(f"bad override: {exc.msg if hasattr(exc, 'msg') else exc}", fix="write key=value") from None


def _schema_error(exc: OmegaConfBaseException, schema: DictConfig) -> RecipeError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    msg = _first_line(exc)
    parent_path, _, leaf = str(key).rpartition(".")
    parent = OmegaConf.select(schema, parent_path) if parent_path else schema
    known = list(parent.keys()) if isinstance(parent, DictConfig) else []
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return RecipeError(
            f"unknown key '{leaf}'{did_you_mean(leaf, known)}",
            where=str(key),
            fix=f"valid keys here: {', '.join(map(str, known))}",
        )
    return RecipeError(msg, where=str(key), fix="fix the value's type")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Read a recipe with its bases, apply overrides, check it against the schema and the registries.

    Imports nothing: load the plugins first (:func:`segrouter.registry.load_plugins`)."""
    raw = _load_with_bases(Path(path), (), {})
    if overrides:
        raw = merge(raw, _parse_overrides(overrides))
    _reject_resolvers(OmegaConf.to_container(raw, resolve=False))
    plugin_dirs = raw.get("plugins", [])
    if not isinstance(plugin_dirs, (list, ListConfig)) or not all(isinstance(d, str) for d in plugin_dirs):
        raise RecipeError("'plugins' must be a list of folders", where="plugins")
    check_recipe_plugins(list(plugin_dirs))  # never imports: plugins are opted into with --plugins
    schema = OmegaConf.structured(Recipe)
    try:
        cfg = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        if not (getattr(exc, "full_key", None) or getattr(exc, "key", None)):
            exc.full_key = _where(schema, raw)  # e.g. "str is not a subclass of LossConfig" names no key
        raise _schema_error(exc, schema) from None
    except (TypeError, ValueError) as exc:  # omegaconf's "Cannot merge incompatible container types"
        raise RecipeError(f"wrong type: {_first_line(exc)}",
                          where=_where(schema, raw),
                          fix="a mapping, list or scalar must keep the kind the schema gives it") from None
    for key, item_type in _typed_lists(Recipe):  # omegaconf lets a mapping through as an item of list[str]
        for item in OmegaConf.select(cfg, key) or []:
            if isinstance(item, (DictConfig, ListConfig)):
                raise RecipeError(f"expected a list of {item_type.__name__}, "
                                  f"got an item {OmegaConf.to_container(item)!r}",
                                  where=key, fix="fix the value's type")
    validate_ranges(cfg)
    validate_components(cfg)
    return cfg


def _typed_lists(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted key, item type) of every schema field typed as a list of scalars."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, type]] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _typed_lists(hint, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is list and typing.get_args(hint)[0] in (str, int, float, bool):
            out.append((f"{prefix}{f.name}", typing.get_args(hint)[0]))
    return out


def validate_components(cfg: DictConfig) -> None:
    """Check every component node against its registry (names, parameters, types), and the other values."""
    if cfg.name in ("", ".", "..") or Path(cfg.name).name != cfg.name or "\\" in cfg.name:
        raise RecipeError(f"'{cfg.name}' is not a folder name", where="name",
                          fix="runs go to {output_dir}/{name}/: give a name without '/', '\\' or '..' (e.g. my_run)")
    for key, kind in MODEL_COMPONENTS.items():
        registry(kind).validate(OmegaConf.to_container(cfg.model[key]), where=f"model.{key}")
    if cfg.model.mask_encoder is not None:
        registry("vision_encoder").validate(OmegaConf.to_container(cfg.model.mask_encoder), where="model.mask_encoder")
    registry("dataset").validate(OmegaConf.to_container(cfg.data.dataset), where="data.dataset")
    if cfg.metrics.control not in (None, *CONTROLS):
        raise RecipeError(f"unknown control '{cfg.metrics.control}'{did_you_mean(cfg.metrics.control, CONTROLS)}",
                          where="metrics.control", fix=f"use one of: {', '.join(CONTROLS)} (or null)")
    if cfg.metrics.resolution not in RESOLUTIONS:
        raise RecipeError(f"unknown resolution '{cfg.metrics.resolution}'"
                          f"{did_you_mean(str(cfg.metrics.resolution), RESOLUTIONS)}",
                          where="metrics.resolution", fix=f"use one of: {', '.join(RESOLUTIONS)}")
    lora = cfg.model.lora
    if lora.enabled and not lora.targets:
        raise RecipeError("LoRA needs at least one target module", where="model.lora.targets",
                          fix="e.g. targets: [q_proj, v_proj]")
    for key, allowed in (("prompt", {"expression", "image"}), ("answer", {"mask_tokens", "target"})):
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(cfg.data[key]) if f is not None}
        except ValueError as exc:
            raise RecipeError(f"bad template: {exc}", where=f"data.{key}",
                              fix="write '{{' and '}}' for literal braces") from None
        if fields - allowed:
            raise RecipeError(f"unknown placeholder(s) {sorted(fields - allowed)}", where=f"data.{key}",
                              fix=f"use only {', '.join('{' + a + '}' for a in sorted(allowed))}")
    if "{expression}" not in cfg.data.prompt:
        raise RecipeError("prompt template has no {expression}", where="data.prompt", fix="e.g. 'segment {expression}'")
    if "{mask_tokens}" not in cfg.data.answer:
        raise RecipeError("answer template has no {mask_tokens}", where="data.answer", fix="e.g. 'it is {mask_tokens}'")
    if "{target}" in cfg.data.answer and cfg.data.answer.index("{target}") < cfg.data.answer.index("{mask_tokens}"):
        raise RecipeError("{target} comes before {mask_tokens}, so the mask tokens would see the ground truth's name",
                          where="data.answer",
                          fix="put {target} after {mask_tokens}, e.g. 'it is {mask_tokens} {target}'")
    if cfg.optim.scheduler not in ("cosine", "constant"):
        raise RecipeError(f"unknown scheduler '{cfg.optim.scheduler}'", where="optim.scheduler",
                          fix="use cosine or constant")
    monitor = cfg.checkpoint.monitor
    if monitor is not None and monitor not in monitorable():
        raise RecipeError(f"no metric '{monitor}' is logged{did_you_mean(monitor, monitorable())}",
                          where="checkpoint.monitor", fix=f"use one of: {', '.join(monitorable())} (or null)")
    if cfg.checkpoint.mode not in ("min", "max"):
        raise RecipeError(f"mode must be min or max, got '{cfg.checkpoint.mode}'", where="checkpoint.mode")
    stop = cfg.trainer.early_stopping
    if stop.monitor not in monitorable():
        raise RecipeError(f"no metric '{stop.monitor}' is logged{did_you_mean(stop.monitor, monitorable())}",
                          where="trainer.early_stopping.monitor", fix=f"use one of: {', '.join(monitorable())}")
    if stop.mode not in ("min", "max"):
        raise RecipeError(f"mode must be min or max, got '{stop.mode}'", where="trainer.early_stopping.mode")
    if cfg.trainer.lr_monitor and not (cfg.logger.csv or cfg.logger.tensorboard or cfg.logger.wandb.enabled):
        raise RecipeError("the learning rate has no logger to go to", where="trainer.lr_monitor",
                          fix="set logger.csv=true (or logger.tensorboard=true), or trainer.lr_monitor=false")
    if cfg.logger.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise RecipeError("the wandb package is not installed", where="logger.wandb.enabled",
                          fix="pip install wandb (or pip install -e '.[wandb]'), or set logger.wandb.enabled=false")
    _check_compile(cfg.trainer.compile)


def _check_compile(c: DictConfig) -> None:
    if c.mode is not None and c.mode not in COMPILE_MODES:
        raise RecipeError(f"unknown torch.compile mode '{c.mode}'{did_you_mean(c.mode, COMPILE_MODES)}",
                          where="trainer.compile.mode", fix=f"use one of: {', '.join(COMPILE_MODES)} (or null)")
    if c.enabled:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if c.backend not in backends:
            raise RecipeError(f"unknown torch.compile backend '{c.backend}'{did_you_mean(c.backend, backends)}",
                              where="trainer.compile.backend", fix=f"use one of: {', '.join(backends)}")


def component(cfg: DictConfig, key: str) -> dict[str, Any]:
    """A component node as a plain dict, ready for ``Registry.build``."""
    return OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)  # type: ignore[return-value]


def recipe_yaml(cfg: DictConfig) -> str:
    """The resolved recipe as YAML: what a run folder's ``recipe.yaml`` holds and ``--print-recipe`` prints."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_recipe(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(recipe_yaml(cfg))
    tmp.replace(path)
