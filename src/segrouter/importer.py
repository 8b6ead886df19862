"""``segrouter import lisa``: a LISA checkpoint as a segrouter recipe and checkpoint.

A released LISA model (e.g. ``xinlai/LISA-7B-v1``, a Hugging Face directory of ``LISAForCausalLM``) holds a
LLaVA LLaMA (``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``), LLaVA's one-Linear
projector (``model.mm_projector``), LISA's ``[SEG]`` projection (``model.text_hidden_fcs.0.{0,2}``: Linear,
ReLU, Linear to 256) and a whole SAM ViT-H in segment-anything's key names (``model.visual_model.image_encoder``,
``.prompt_encoder``, ``.mask_decoder``). Its CLIP tower (``openai/clip-vit-large-patch14``, 224 px) is not in
it: LISA loads CLIP from its own directory, and so does the import (``--clip``).

The import writes, under ``--out``:

- ``llm/``: the LLaMA as a plain HF ``LlamaForCausalLM`` directory (config from LISA's, safetensors, LISA's
  tokenizer files, which already carry ``[SEG]``), for ``model.llm.path``;
- ``sam/``: the SAM as an HF ``SamModel`` directory, renamed from segment-anything's keys as transformers'
  ``convert_sam_to_hf.py`` renames them (:func:`sam_to_hf`), for the ``sam_vit`` mask encoder and the ``sam``
  mask decoder (``neck: false``), which together are LISA's mask path;
- ``lisa.yaml``: the recipe (``recipes/lisa7b_full.yaml``'s architecture with these paths and the given data
  settings), and ``lisa.ckpt``: the model built from it with the projector and ``[SEG]`` projection set from
  LISA's tensors, so ``segrouter validate/test/predict --recipe OUT/lisa.yaml --ckpt OUT/lisa.ckpt`` evaluate
  LISA, and any routing recipe can start from it (``--training-free``, or ``init_from``).

Building the model takes its full size in memory (a 7B LLM in fp32: about 28 GB, plus SAM ViT-H).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segrouter.arguments import file_in_the_way
from segrouter.errors import SegrouterError

if TYPE_CHECKING:  # torch is imported when the import runs, not when the CLI parses its arguments
    import torch

# segment-anything → HF SamModel substrings, applied in this order (transformers' convert_sam_to_hf.py)
SAM_RENAMES: tuple[tuple[str, str], ...] = (
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
)
_HYPER = re.compile(r"(.*\.output_hypernetworks_mlps\.\d+\.)layers\.(\d+)(\..*)")
_HYPER_NAMES = {"0": "proj_in", "1": "layers.0", "2": "proj_out"}
SAM_PREFIX, CLIP_PREFIX = "model.visual_model.", "model.vision_tower."
OWN = ("model.mm_projector.", "model.text_hidden_fcs.")  # LISA's own modules, neither LLM nor SAM
LISA_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "lisa7b_full.yaml"  # LISA's architecture


def sam_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """segment-anything's SAM state dict in HF ``SamModel`` names (pixel mean/std dropped; the positional
    embedding also under ``shared_image_embedding``, as HF ties it)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        for old, new in SAM_RENAMES:
            key = key.replace(old, new)
        hyper = _HYPER.fullmatch(key)
        if hyper:
            key = f"{hyper[1]}{_HYPER_NAMES[hyper[2]]}{hyper[3]}"
        out[key] = value
    pe = "prompt_encoder.shared_embedding.positional_embedding"
    if pe in out:
        out["shared_image_embedding.positional_embedding"] = out[pe].clone()  # its own storage: safetensors
    return out


def read_weights(folder: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (``*.safetensors`` or ``pytorch_model*.bin``, sharded or not)."""
    from segrouter.checkpoints import load_state_dict

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise SegrouterError(f"{what}: no weights in {folder} (*.safetensors or pytorch_model*.bin)",
                             fix=f"point {what} at the downloaded model directory")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_state_dict(f))
    return state


def read_config(folder: Path, what: str) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SegrouterError(f"{what}: cannot read {path} ({type(exc).__name__})",
                             fix=f"point {what} at the downloaded model directory") from None


def split_lisa(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ...]:
    """(LLaMA, SAM in segment-anything names, LISA's own) parts of a LISA state dict; CLIP keys (a training
    checkpoint may keep them) and rotary buffers are dropped."""
    llm, sam, own = {}, {}, {}
    for key, value in state.items():
        if key.startswith(SAM_PREFIX):
            sam[key.removeprefix(SAM_PREFIX)] = value
        elif key.startswith(OWN):
            own[key] = value
        elif key.startswith(CLIP_PREFIX) or key.endswith("rotary_emb.inv_freq"):
            continue
        elif key.startswith(("model.", "lm_head.")):
            llm[key] = value
    missing = [k for k, part in (("model.embed_tokens.weight", llm), ("lm_head.weight", llm),
                                 ("model.text_hidden_fcs.0.0.weight", own), ("model.text_hidden_fcs.0.2.weight", own),
                                 ("image_encoder.patch_embed.proj.weight", sam)) if k not in part]
    if not any(k.startswith("model.mm_projector.") for k in own):
        missing.append("model.mm_projector")
    if missing:
        raise SegrouterError(f"not a LISA checkpoint: no {missing[0]}",
                             fix="pass the directory of a LISA model (LISAForCausalLM, e.g. LISA-7B-v1)")
    return llm, sam, own


def write_llm(lisa: Path, config: dict[str, Any], llm: dict[str, torch.Tensor], out: Path) -> None:
    """The LLaMA part as an HF ``LlamaForCausalLM`` directory with LISA's tokenizer files."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
            "rms_norm_eps", "max_position_embeddings", "rope_theta", "bos_token_id", "eos_token_id",
            "pad_token_id", "hidden_act")
    fields = {k: config[k] for k in keys if config.get(k) is not None}
    vocab, hidden = llm["model.embed_tokens.weight"].shape
    LlamaConfig(**fields, vocab_size=int(vocab), tie_word_embeddings=False).save_pretrained(out)
    if int(hidden) != int(config.get("hidden_size", hidden)):
        raise SegrouterError(f"LISA's config says hidden_size {config['hidden_size']}, its embeddings {hidden}",
                             fix="use a complete, unmodified LISA directory")
    save_file({k: v.contiguous() for k, v in llm.items()}, str(out / "model.safetensors"))
    tokenizer_files = [p for p in lisa.iterdir() if p.name.startswith(("tokenizer", "special_tokens_map",
                                                                          "added_tokens"))]
    if not tokenizer_files:
        raise SegrouterError(f"no tokenizer files in {lisa}", fix="LISA's directory holds its tokenizer: copy it too")
    for p in tokenizer_files:
        shutil.copy(p, out / p.name)


def write_sam(sam: dict[str, torch.Tensor], out: Path) -> None:
    """SAM as an HF ``SamModel`` directory; the vision encoder's size read from the tensors (ViT-B/L/H)."""
    import torch
    from safetensors.torch import save_file
    from transformers import SamConfig, SamModel, SamVisionConfig

    hf = sam_to_hf(sam)
    layers = sorted({int(k.split(".")[2]) for k in hf if k.startswith("vision_encoder.layers.")})
    hidden = int(hf["vision_encoder.patch_embed.projection.weight"].shape[0])
    patch = int(hf["vision_encoder.patch_embed.projection.weight"].shape[-1])
    side = int(hf["vision_encoder.pos_embed"].shape[1])
    # windowed blocks' relative position tables span 2·window − 1, global blocks' 2·(image / patch) − 1
    spans = {i: int(hf[f"vision_encoder.layers.{i}.attn.rel_pos_h"].shape[0]) for i in layers}
    global_blocks = [i for i in layers if spans[i] == 2 * side - 1]
    windowed = [spans[i] for i in layers if i not in global_blocks]
    vision = SamVisionConfig(
        hidden_size=hidden, num_hidden_layers=len(layers),
        num_attention_heads=int(hidden // int(hf["vision_encoder.layers.0.attn.rel_pos_h"].shape[1])),
        output_channels=int(hf["vision_encoder.neck.conv1.weight"].shape[0]), image_size=side * patch,
        patch_size=patch, global_attn_indexes=global_blocks,
        window_size=(windowed[0] + 1) // 2 if windowed else 14,
        mlp_dim=int(hf["vision_encoder.layers.0.mlp.lin1.weight"].shape[0]),
    )
    config = SamConfig(vision_config=vision.to_dict())
    with torch.device("meta"):  # the expected names and shapes, without allocating a ViT-H
        expected = SamModel(config).state_dict()
    wrong = [k for k, v in hf.items() if k not in expected or expected[k].shape != v.shape]
    absent = [k for k in expected if k not in hf]
    if wrong or absent:
        raise SegrouterError(f"LISA's SAM does not map onto HF's SamModel ({len(wrong)} unknown or misshapen, "
                             f"{len(absent)} missing keys, e.g. {(wrong or absent)[0]})",
                             fix="is this a SAM ViT-B/L/H from segment-anything? see docs/real_scale.md")
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"))


def projector_depth(own: dict[str, torch.Tensor]) -> int:
    """LLaVA's projector in LISA's checkpoint: one Linear (``mm_projector.weight``, LISA-7B-v1) or LLaVA-1.5's
    ``mlp2x_gelu`` (``mm_projector.0`` and ``.2``)."""
    return 1 if "model.mm_projector.weight" in own else 2


def lisa_recipe(recipe: Path, out: Path, clip: Path, clip_size: int, depth: int, overrides: list[str]) -> Any:
    """The recipe of the imported model: ``recipe`` (LISA's architecture) at the imported paths and sizes."""
    from segrouter.recipe import load_recipe

    return load_recipe(recipe, [
        "name=lisa_imported",
        f"model.image_size={clip_size}",
        f"model.vision_encoder.path={clip}",
        f"model.compressor.depth={depth}",
        f"model.llm.path={out / 'llm'}",
        f"model.mask_encoder.path={out / 'sam'}",
        f"model.mask_decoder.path={out / 'sam'}",
        "model.lora.enabled=false",
        *overrides,
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=["lisa"], help="what to import (lisa: a LISA Hugging Face directory)")
    parser.add_argument("--from", dest="src", required=True, metavar="DIR",
                        help="the LISA model directory (config.json, weights, tokenizer), e.g. LISA-7B-v1")
    parser.add_argument("--clip", required=True, metavar="DIR",
                        help="LISA's CLIP tower as an HF directory (openai/clip-vit-large-patch14): LISA does not "
                             "keep it in its checkpoint")
    parser.add_argument("--out", required=True, metavar="DIR", help="new folder for llm/, sam/, lisa.yaml, lisa.ckpt")
    parser.add_argument("--recipe", default=str(LISA_RECIPE),
                        help="the recipe with LISA's architecture that the import fills in "
                             "(default: recipes/lisa7b_full.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe settings for the imported model, e.g. data.dataset.root=... ")


def run(args: argparse.Namespace) -> int:
    import torch
    from omegaconf import OmegaConf

    from segrouter.model.module import SegmentationMLLM
    from segrouter.text import build_tokenizer

    lisa, clip, out = Path(args.src), Path(args.clip), Path(args.out)
    for folder, flag in ((lisa, "--from"), (clip, "--clip")):
        if not folder.is_dir():
            raise SegrouterError(f"{flag} {folder} is not a folder", fix="pass the downloaded model directory")
    if not Path(args.recipe).is_file():
        raise SegrouterError(f"recipe not found: {args.recipe}", fix="pass --recipe recipes/lisa7b_full.yaml")
    if out.exists():
        raise SegrouterError(f"--out {out} exists", fix="name a new folder: the import never overwrites files")
    blocked = file_in_the_way(out.parent)
    if blocked is not None:
        raise SegrouterError(f"--out {out} cannot be created: {blocked} is a file", fix="name a folder path")
    config, clip_config = read_config(lisa, "--from"), read_config(clip, "--clip")
    clip_size = int(clip_config.get("vision_config", clip_config).get("image_size", 224))
    llm, sam, own = split_lisa(read_weights(lisa, "--from"))
    depth = projector_depth(own)
    # a bad override fails here, before anything is written
    overrides = list(args.overrides)
    cfg = lisa_recipe(Path(args.recipe), out.resolve(), clip.resolve(), clip_size, depth, overrides)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:  # everything is made in the staging folder, renamed to --out only when complete
        (staging / "llm").mkdir(parents=True)
        (staging / "sam").mkdir()
        write_llm(lisa, config, llm, staging / "llm")
        write_sam(sam, staging / "sam")
        # the model alone (no dataset: the recipe's data settings may point where the data is not, e.g. a laptop)
        here = lisa_recipe(Path(args.recipe), staging.resolve(), clip.resolve(), clip_size, depth, overrides)
        model = SegmentationMLLM(here, build_tokenizer(here.model.llm.path, [], int(here.model.num_mask_tokens)))
        projector = {"model.mm_projector.": model.compressor.proj[0]} if depth == 1 else \
            {f"model.mm_projector.{i}.": model.compressor.proj[i] for i in (0, 2)}
        fcs = {f"model.text_hidden_fcs.0.{i}.": model.text_proj[i] for i in (0, 2)}
        with torch.no_grad():
            for prefix, linear in {**projector, **fcs}.items():
                for name in ("weight", "bias"):
                    getattr(linear, name).copy_(own[prefix + name])
        OmegaConf.save(cfg, staging / "lisa.yaml")
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"recipe": OmegaConf.to_container(cfg)}},
                   staging / "lisa.ckpt")
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"segrouter: imported {lisa} into {out}: recipe {out / 'lisa.yaml'}, checkpoint {out / 'lisa.ckpt'}")
    return 0
