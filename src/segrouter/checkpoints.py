"""Local weight loading (safetensors or torch files). Nothing here downloads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from segrouter.errors import SegrouterError


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``.safetensors`` file (its tensors) or a torch file (the whole saved dict; ``weights_only``: no
    pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise SegrouterError(f"weights file not found: {path}", fix="point the recipe at a local file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SegrouterError(f"cannot read weights {path}: {type(exc).__name__}: {exc}",
                             fix="check the file is intact") from None
    if not isinstance(obj, dict):
        raise SegrouterError(f"{path} holds no state dict", fix="save it with torch.save(model.state_dict(), path)")
    return obj


def state_dict_of(saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict in what :func:`read_checkpoint` read: a Lightning checkpoint's, or the file itself (keys
    without the ``_forward_module.`` prefix of a DeepSpeed-wrapped model)."""
    state = saved["state_dict"] if isinstance(saved.get("state_dict"), dict) else saved
    return {k.removeprefix("_forward_module."): v for k, v in state.items()}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file (``weights_only``: no pickled code)."""
    return state_dict_of(read_checkpoint(path))


def is_sharded(ckpt: str | Path) -> bool:
    """Whether ``ckpt`` is a DeepSpeed checkpoint folder (a folder with a ``latest`` file, as a DeepSpeed run
    saves it), which only its strategy reads. Any other folder is refused here, in one line."""
    path = Path(ckpt)
    if not path.is_dir():
        return False
    if not (path / "latest").is_file():
        raise SegrouterError(f"{ckpt} is a folder, neither a checkpoint file nor a DeepSpeed checkpoint folder "
                             "(it has no 'latest' file)", fix="pass a .ckpt file")
    return True


def load_weights(model: torch.nn.Module, ckpt: str | Path, *, allow_missing: bool = False,
                 only: Sequence[str] = (), where: str | None = None,
                 fix: str = "pass the recipe (and overrides) the checkpoint was trained with") -> list[str]:
    """Load a Lightning checkpoint or a consolidated DeepSpeed file (``segrouter consolidate``) into ``model``.

    Every key of the checkpoint must fit the model with its shape; with ``allow_missing`` the model may have
    parameters the checkpoint lacks (a method's new modules, e.g. token routing's projectors, when it starts
    from a trained ``full`` model): they keep their initialisation, and their names are returned. ``where``
    and ``fix`` go into the error when the checkpoint does not fit. ``only`` names the model's top-level
    modules to load (e.g. ``vision``, ``llm``): the rest of the checkpoint and of the model is left alone."""
    if is_sharded(ckpt):
        raise SegrouterError(f"{ckpt} is a sharded DeepSpeed checkpoint",
                             fix=f"run: segrouter consolidate --ckpt {ckpt} --out model.ckpt")
    state, missing = check_fits(model, load_state_dict(ckpt), ckpt, allow_missing=allow_missing, only=only,
                                where=where, fix=fix)
    model.load_state_dict(state, strict=False)
    return missing


def check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], ckpt: str | Path, *, allow_missing: bool = False,
               only: Sequence[str] = (), where: str | None = None,
               fix: str = "pass the recipe (and overrides) the checkpoint was trained with",
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Check that ``state`` (read from ``ckpt``) fits ``model`` as :func:`load_weights` describes, without loading
    it: (the part of ``state`` to load, the model's keys it lacks)."""
    own = model.state_dict()
    if only:
        def keep(key: str) -> bool:
            return key.split(".", 1)[0] in only

        empty = [m for m in only if not any(k.split(".", 1)[0] == m for k in state)]
        if empty:
            raise SegrouterError(f"checkpoint {ckpt} has no weights for {', '.join(empty)}", where=where, fix=fix)
        state = {k: v for k, v in state.items() if keep(k)}
        own = {k: v for k, v in own.items() if keep(k)}
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong or unexpected or (missing and not allow_missing):
        bad = wrong[0] if wrong else (unexpected or missing)[0]
        shape = f" ({tuple(state[bad].shape)} in the checkpoint, {tuple(own[bad].shape)} here)" if wrong else ""
        raise SegrouterError(
            f"checkpoint {ckpt} does not fit the recipe ({len(wrong)} of another shape, {len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {bad}{shape})",
            where=where, fix=fix,
        )
    return state, missing


def check_resumable(model: torch.nn.Module, ckpt: str | Path, recipe_name: str, *, other_recipe: bool = False) -> None:
    """Before ``fit --resume`` writes anything: the checkpoint is readable, was saved by a run of this recipe
    (its ``name``; ``other_recipe`` lifts this) and fits the model. DeepSpeed's sharded checkpoint folders are
    read by their strategy only, and not checked here."""
    if is_sharded(ckpt):
        return
    saved = read_checkpoint(ckpt)
    name = (saved.get("hyper_parameters") or {}).get("recipe", {}).get("name")
    if name != recipe_name and not other_recipe:
        raise SegrouterError(f"checkpoint {ckpt} was saved by a run of recipe '{name}', not '{recipe_name}'",
                             where="--ckpt", fix="resume with the recipe (and name=) it was trained with, or add "
                                                 "--other-recipe to continue it as a new run of this recipe")
    check_fits(model, state_dict_of(saved), ckpt, where="--ckpt",
               fix="resume with the recipe (and overrides) the checkpoint was trained with")
