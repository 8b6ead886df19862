"""``segrouter predict``: masks for your own images and expressions from a trained checkpoint.

One image (``--image --text --out [--overlay]``), a JSON-lines file (``--jsonl``: one
``{"image", "text", "out"[, "overlay"]}`` per line, relative paths taken from the file's folder) or a folder
(``--folder DIR --text ... --out-dir OUT``: ``OUT/<stem>_mask.png`` and ``<stem>_overlay.png`` per image).
Images are resized as in training (longest side + pad, see :mod:`segrouter.images`); the mask
is cropped back out of the padding and resized to the original size, so it lies on the input pixels.
Masks are written as 8-bit PNGs, 255 = object. An output path that is one of the input images is refused
before anything is written.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segrouter.arguments import at_least, checked_device, output_file
from segrouter.errors import DataError, SegrouterError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_OVERLAY_RGB = np.array([255, 0, 0], dtype=np.float32)


@dataclass(frozen=True)
class Job:
    image: Path
    text: str
    out: Path
    overlay: Path | None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="the recipe the checkpoint was trained with")
    p.add_argument("--ckpt", help="checkpoint (.ckpt or consolidated DeepSpeed file; default: the newest run's best)")
    p.add_argument("--image", help="one input image")
    p.add_argument("--text", help="the referring expression (with --image or --folder)")
    p.add_argument("--out", help="mask PNG to write (with --image)")
    p.add_argument("--overlay", help="overlay PNG to write (with --image)")
    p.add_argument("--jsonl", help='batch file: one {"image", "text", "out"[, "overlay"]} per line')
    p.add_argument("--folder", help="segment every image in this folder with --text")
    p.add_argument("--out-dir", help="where --folder writes <stem>_mask.png and <stem>_overlay.png")
    p.add_argument("--generate", action="store_true",
                   help="the LLM writes its answer (greedy, with a KV cache; printed) and each [SEG] it writes gives "
                        "a mask: --out for the first, <out>_2.png, ... for more (default: the answer template)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=32, help="answer length limit with --generate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")


def _jobs(args: argparse.Namespace) -> list[Job]:
    modes = [m for m in ("image", "jsonl", "folder") if getattr(args, m)]
    if len(modes) != 1:
        raise SegrouterError("give exactly one of --image, --jsonl, --folder",
                             fix="e.g. --image img.png --text 'the dog' --out mask.png")
    if args.image:
        if not args.text or not args.out:
            raise SegrouterError("--image needs --text and --out", fix="add --text '...' --out mask.png")
        return [Job(Path(args.image), args.text, Path(args.out), Path(args.overlay) if args.overlay else None)]
    if args.folder:
        folder = Path(args.folder)
        if not folder.is_dir() or not args.text or not args.out_dir:
            raise SegrouterError(f"--folder needs an existing folder, --text and --out-dir (got {folder})",
                                 fix="check the arguments")
        out = Path(args.out_dir)
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {folder}",
                            fix="point --folder at your images")
        return [Job(f, args.text, out / f"{f.stem}_mask.png", out / f"{f.stem}_overlay.png") for f in files]
    path = Path(args.jsonl)
    if not path.is_file():
        raise DataError(f"jsonl file not found: {path}", fix="check --jsonl")
    jobs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            jobs.append(Job(path.parent / row["image"], str(row["text"]), path.parent / row["out"],
                            path.parent / row["overlay"] if row.get("overlay") else None))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path}:{n}: bad line ({type(exc).__name__}: {exc})",
                            fix='write {"image": ..., "text": ..., "out": ...}') from None
    return jobs


def encoder_inputs(model: Any, image: Image.Image) -> dict[str, torch.Tensor]:
    """What a dataset sample carries besides the letterboxed ``image``, for this model's encoders: the letterbox's
    content size, the mask encoder's own letterbox where it reads one (``sam_vit``), the vision encoder's centre
    crop where it reads one (``hf_clip``)."""
    from segrouter.images import center_crop, letterbox_input, letterbox_size

    size = model.image_size
    out = {"content_hw": torch.tensor(letterbox_size(image.height, image.width, size))}
    mask_size = getattr(model.mask_encoder, "input_size", None)
    if mask_size is not None:
        out["mask_image"], out["mask_image_hw"] = letterbox_input(image, mask_size)
    if model.vision.center_crop:
        out["vision_image"] = center_crop(image, size)
    return out


def predict_mask(model: Any, data: Any, image: Image.Image, text: str, device: torch.device) -> tuple[np.ndarray, int]:
    """Bool (H, W) mask at the image's own size for one expression, and how many visual tokens the LLM
    read (adaptive compressors such as ``sam_superpixel`` vary it per image)."""
    from segrouter.images import letterbox, unletterbox

    size = model.image_size
    img, _ = letterbox(image, None, size)
    inputs = encoder_inputs(model, image)
    sample = {"image": img, "mask": torch.zeros(size, size), "text": text, "id": "0", **inputs}
    batch = data.collate([sample])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        out = model(batch)
    full = unletterbox(out["masks"][0], tuple(inputs["content_hw"].tolist()), (image.height, image.width))
    return (full > 0).cpu().numpy(), int(out["visual_tokens"][0])


def generate_masks(model: Any, data: Any, image: Image.Image, text: str, device: torch.device,
                   max_new_tokens: int) -> tuple[str, list[np.ndarray]]:
    """The generated answer's text and one bool (H, W) mask per [SEG] it contains (:mod:`segrouter.generate`)."""
    from segrouter.generate import generate, prompt_batch
    from segrouter.images import letterbox, unletterbox

    inputs = encoder_inputs(model, image)
    hw, original = tuple(inputs["content_hw"].tolist()), (image.height, image.width)
    batch = prompt_batch(data.tokenizer, letterbox(image, None, model.image_size)[0], text, data.cfg.data.prompt,
                         inputs)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    tokens, logits = generate(model, batch, max_new_tokens=max_new_tokens, eos_token_id=data.tokenizer.eos_token_id)
    return (data.tokenizer.decode(tokens, skip_special_tokens=False),
            [(unletterbox(m, hw, original) > 0).cpu().numpy() for m in logits])


def overlay(image: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * _OVERLAY_RGB
    return Image.fromarray(rgb.round().astype(np.uint8))


def read_image(path: Path) -> Image.Image:
    from segrouter.images import BAD_IMAGE_ERRORS, open_image

    if not path.is_file():
        raise DataError(f"image not found: {path}", fix="check the image path")
    try:
        return open_image(path).convert("RGB")
    except BAD_IMAGE_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}", fix="pass a valid PNG/JPEG") from None


def write_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def load_model(recipe: str, overrides: list[str], ckpt: str | None, device: torch.device) -> tuple[Any, Any]:
    """The recipe's model with the checkpoint's weights (default: the newest run's best), on ``device`` in
    evaluation mode, and its data module (tokenizer, prompt)."""
    from segrouter.build import build
    from segrouter.checkpoints import load_weights
    from segrouter.recipe import load_recipe
    from segrouter.runs import find_eval_checkpoint

    cfg = load_recipe(recipe, overrides)
    path = find_eval_checkpoint(cfg, ckpt)
    model, data = build(cfg)
    load_weights(model, path)
    return model.to(device).eval(), data


def write_generated(image: Image.Image, masks: list[np.ndarray], out: Path, overlay_path: Path | None) -> str:
    """Write a generated answer's masks (``out`` for the first [SEG], ``<out>_2.png``, ... for more) and the first
    mask's overlay; what was written, for the user."""
    outs = [out if k == 1 else out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(1, 1 + len(masks))]
    for mask, path in zip(masks, outs, strict=True):
        write_png(Image.fromarray(mask.astype(np.uint8) * 255), path)
    if masks and overlay_path is not None:
        write_png(overlay(image, masks[0]), overlay_path)
    return ", ".join(f"{o} ({int(m.sum())} px)" for o, m in zip(outs, masks, strict=True)) \
        or "no mask (the answer has no [SEG])"


def run(args: argparse.Namespace) -> int:
    jobs = _jobs(args)
    inputs = {job.image.resolve() for job in jobs}
    for job in jobs:  # fail before the (slow) model build on a path typo
        if not job.image.is_file():
            raise DataError(f"image not found: {job.image}", fix="check the image path")
        for out in (o for o in (job.out, job.overlay) if o is not None):
            if out.resolve() in inputs:
                raise SegrouterError(f"output {out} is an input image, which writing it would destroy",
                                     fix="write masks and overlays to other paths")
            output_file(out, "output")
    device = checked_device(args.device)
    model, data = load_model(args.recipe, args.overrides, args.ckpt, device)
    for job in jobs:
        image = read_image(job.image)
        if args.generate:
            answer, masks = generate_masks(model, data, image, job.text, device, args.max_new_tokens)
            print(f"segrouter: {job.image}: answer {answer!r} → {write_generated(image, masks, job.out, job.overlay)}")
            continue
        mask, visual_tokens = predict_mask(model, data, image, job.text, device)
        write_png(Image.fromarray(mask.astype(np.uint8) * 255), job.out)
        if job.overlay is not None:
            write_png(overlay(image, mask), job.overlay)
        print(f"segrouter: {job.image} → {job.out} ({int(mask.sum())} px, {visual_tokens} visual tokens)")
    return 0
