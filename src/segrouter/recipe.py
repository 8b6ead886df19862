"""Recipes: omegaconf YAML with ``base:`` inheritance and ``key=value`` overrides, validated up front.

A recipe is data, never code: YAML is read with omegaconf's safe loader (no ``!!python`` tags) and
interpolations are resolved without custom resolvers. Validation happens in two passes before anything is
built: the fixed top-level schema (keys and types, via omegaconf structured configs), then every component
node against its registered constructor (see :mod:`segrouter.registry`).
"""

from __future__ import annotations

import dataclasses
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
from segrouter.registry import load_plugins, registry

MODEL_COMPONENTS: dict[str, str] = {
    "vision_encoder": "vision_encoder",
    "compressor": "compressor",
    "llm": "llm",
    "routing": "routing",
    "mask_decoder": "mask_decoder",
}


@dataclass
class LossConfig:
    """LISA's weights: text cross-entropy + per-pixel BCE + Dice."""

    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5


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
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class CheckpointConfig:
    monitor: str | None = "val/ciou"
    mode: str = "max"
    save_last: bool = True
    save_top_k: int = 1
    every_n_train_steps: int | None = None  # also write last.ckpt every N steps (mid-epoch resume points)


@dataclass
class LoggerConfig:
    csv: bool = True
    tensorboard: bool = False


CONTROLS = ("shuffle", "zero")


@dataclass
class MetricsConfig:
    flops_batches: int = 2  # eval batches per epoch whose LLM FLOPs are counted (0 = off)
    # evaluation-time control on the LLM's visual tokens: shuffle (another sample's, rolled across the batch)
    # or zero; null for none. Set by `segrouter validate/test --control`.
    control: str | None = None


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
        return _kind_mismatch(OmegaConf.to_container(base, resolve=False), OmegaConf.to_container(override, resolve=False))
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
        if isinstance(new, DictConfig) and isinstance(old, DictConfig) and "name" in new and new.get("name") != old.get("name"):
            OmegaConf.update(base, key, {}, merge=False)
    try:
        return OmegaConf.merge(base, override)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:  # e.g. a list where the base has a mapping
        key = getattr(exc, "full_key", None) or _where(base, override)
        raise RecipeError(f"cannot merge: {_first_line(exc)}", where=str(key) if key else None,
                          fix="a value must keep the kind (mapping, list or scalar) it has in the base recipe") from None


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
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping of keys", where=str(path), fix="start the file with 'name: ...'")
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"cannot parse recipe: {exc}", where=str(path)) from None


def _load_with_bases(path: Path, stack: tuple[Path, ...]) -> DictConfig:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(p.name for p in (*stack, path))
        raise RecipeError(f"inheritance cycle: {chain}", where=str(path), fix="remove one of the 'base:' entries")
    cfg = _read_yaml(path)
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
        merged = merge(merged, _load_with_bases(base_path, (*stack, path)))
    return merge(merged, cfg)


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            raise RecipeError(f"override '{o}' is not key=value", fix="write overrides like trainer.max_steps=100")
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
    """Read a recipe with its bases, apply overrides, check it against the schema and the registries."""
    raw = _load_with_bases(Path(path), ())
    if overrides:
        raw = merge(raw, _parse_overrides(overrides))
    plugin_dirs = raw.get("plugins", [])
    if not isinstance(plugin_dirs, (list, ListConfig)) or not all(isinstance(d, str) for d in plugin_dirs):
        raise RecipeError("'plugins' must be a list of folders", where="plugins")
    load_plugins(list(plugin_dirs))
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
                raise RecipeError(f"expected a list of {item_type.__name__}, got an item {OmegaConf.to_container(item)!r}",
                                  where=key, fix="fix the value's type")
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
    lora = cfg.model.lora
    if lora.enabled and (lora.r < 1 or not lora.targets):
        raise RecipeError("LoRA needs r >= 1 and at least one target module", where="model.lora", fix="e.g. r: 8, targets: [q_proj, v_proj]")
    if cfg.model.num_mask_tokens < 1:
        raise RecipeError("must be >= 1", where="model.num_mask_tokens")
    for key, allowed in (("prompt", {"expression"}), ("answer", {"mask_tokens", "target"})):
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(cfg.data[key]) if f is not None}
        except ValueError as exc:
            raise RecipeError(f"bad template: {exc}", where=f"data.{key}", fix="write '{{' and '}}' for literal braces") from None
        if fields - allowed:
            raise RecipeError(f"unknown placeholder(s) {sorted(fields - allowed)}", where=f"data.{key}",
                              fix=f"use only {', '.join('{' + a + '}' for a in sorted(allowed))}")
    if "{expression}" not in cfg.data.prompt:
        raise RecipeError("prompt template has no {expression}", where="data.prompt", fix="e.g. 'segment {expression}'")
    if "{mask_tokens}" not in cfg.data.answer:
        raise RecipeError("answer template has no {mask_tokens}", where="data.answer", fix="e.g. 'it is {mask_tokens}'")
    if "{target}" in cfg.data.answer and cfg.data.answer.index("{target}") < cfg.data.answer.index("{mask_tokens}"):
        raise RecipeError("{target} comes before {mask_tokens}, so the mask tokens would see the ground truth's name",
                          where="data.answer", fix="put {target} after {mask_tokens}, e.g. 'it is {mask_tokens} {target}'")
    if cfg.optim.scheduler not in ("cosine", "constant"):
        raise RecipeError(f"unknown scheduler '{cfg.optim.scheduler}'", where="optim.scheduler", fix="use cosine or constant")
    if cfg.checkpoint.every_n_train_steps is not None and cfg.checkpoint.every_n_train_steps < 1:
        raise RecipeError("must be >= 1 (or null: last.ckpt at validation only)", where="checkpoint.every_n_train_steps")
    monitor = cfg.checkpoint.monitor
    if monitor is not None and monitor not in monitorable():
        raise RecipeError(f"no metric '{monitor}' is logged{did_you_mean(monitor, monitorable())}",
                          where="checkpoint.monitor", fix=f"use one of: {', '.join(monitorable())} (or null)")
    if cfg.checkpoint.mode not in ("min", "max"):
        raise RecipeError(f"mode must be min or max, got '{cfg.checkpoint.mode}'", where="checkpoint.mode")


def component(cfg: DictConfig, key: str) -> dict[str, Any]:
    """A component node as a plain dict, ready for ``Registry.build``."""
    return OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)  # type: ignore[return-value]


def save_recipe(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)
