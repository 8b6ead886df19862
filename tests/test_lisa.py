"""LISA's architecture (issue 15) at toy size: the HF CLIP tower, SAM's image encoder as the mask decoder's own
vision path (its 1024-px-style letterbox from the dataset), and ``segrouter import lisa`` on a fabricated
checkpoint in LISA's key names and layout, checked part by part against the weights loaded directly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_refcoco import make_layout
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SamConfig,
    SamModel,
    SamVisionConfig,
)

from segrouter.checkpoints import load_weights
from segrouter.cli import main
from segrouter.importer import sam_to_hf
from segrouter.recipe import load_recipe
from segrouter.vision_encoders.hf_clip import HFCLIP
from segrouter.vision_encoders.sam_vit import SamViT
from tests.conftest import build_model, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
CLIP_SIZE, SAM_SIZE = 56, 64


def tiny_sam() -> SamModel:
    torch.manual_seed(0)
    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=SAM_SIZE,
                             patch_size=16, output_channels=256, window_size=2, global_attn_indexes=[1], mlp_dim=64)
    return SamModel(SamConfig(vision_config=vision.to_dict())).eval()


def tiny_clip() -> CLIPVisionModel:
    torch.manual_seed(1)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                            intermediate_size=64, image_size=CLIP_SIZE, patch_size=14)).eval()


def test_sam_vit_from_a_sam_directory_zeroes_the_padding(tmp_path: Path) -> None:
    sam = tiny_sam()
    sam.save_pretrained(tmp_path / "sam")
    enc = SamViT(32, path=str(tmp_path / "sam")).eval()
    assert enc.input_size == SAM_SIZE and enc.out_dim == 256 and enc.grid_size == (4, 4)
    assert all(not p.requires_grad for p in enc.parameters())  # frozen by default, as in LISA
    images = torch.rand(2, 3, SAM_SIZE, SAM_SIZE)
    hw = torch.tensor([[SAM_SIZE, 40], [20, SAM_SIZE]])
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1) / 255
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1) / 255
    expected_input = (images - mean) / std
    expected_input[0, :, :, 40:] = 0  # SAM pads with zeros after normalising
    expected_input[1, :, 20:] = 0
    with torch.no_grad():
        assert torch.allclose(enc(images, hw), sam.vision_encoder(pixel_values=expected_input).last_hidden_state,
                              atol=1e-5)
        assert enc(images[:, :, :32, :32]).shape == (2, 256, 4, 4)  # another size: resized to input_size


def test_hf_clip_reads_llava_layer_without_cls(tmp_path: Path) -> None:
    clip = tiny_clip()
    clip.save_pretrained(tmp_path / "clip")
    enc = HFCLIP(CLIP_SIZE, path=str(tmp_path / "clip")).eval()
    images = torch.rand(2, 3, CLIP_SIZE, CLIP_SIZE)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = clip(pixel_values=(images - mean) / std, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.allclose(enc(images), ref.transpose(1, 2).reshape(2, 32, 4, 4), atol=1e-6)
    with pytest.raises(Exception, match="takes 56-px images"):
        HFCLIP(64, path=str(tmp_path / "clip"))


def test_clip_reads_clips_own_centre_crop(tmp_path: Path) -> None:
    """LISA feeds its CLIP what transformers' CLIPImageProcessor makes of the original image (shortest side at the
    tower's size, bicubic, centre crop), not the letterbox: the datasets give the model that crop as
    ``vision_image`` (equal to the processor's up to its one-level rounding), and the tower reads it; the mask
    frame stays the letterbox. ``preprocess: letterbox`` gives the tower the letterbox instead."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from segrouter.images import center_crop, crop_box, letterbox_to_crop

    rng = np.random.default_rng(0)
    for hw in ((30, 50), (50, 30)):
        image = Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8))
        processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                       do_normalize=False)
        ref = torch.as_tensor(np.asarray(processor.preprocess(image, return_tensors="np")["pixel_values"][0]))
        diff = (center_crop(image, 28) - ref).abs()
        assert diff.max() <= 1 / 255 + 1e-6 and (diff > 1e-5).float().mean() < 0.02
    assert crop_box(30, 50, 28) == (0, 9, 28, 46) and crop_box(50, 30, 28) == (9, 0, 46, 28)
    mask = torch.zeros(1, 8, 8)  # a letterbox of a 4×8 image: content (4, 8); the mask is the content's right half
    mask[0, :4, 4:] = 1
    np.testing.assert_array_equal(letterbox_to_crop(mask, torch.tensor([[4, 8]]))[0].numpy(), _crop_of_right_half())

    root, images = make_layout(tmp_path)
    data = ["data.dataset.name=refcoco", f"data.dataset.root={root}", f"data.dataset.image_dir={images}",
            f"data.dataset.image_size={CLIP_SIZE}", "data.batch_size=2", "data.eval_batch_size=2"]
    clip = [f"model.image_size={CLIP_SIZE}", "model.vision_encoder.name=hf_clip", "model.vision_encoder.patch_size=14",
            "model.vision_encoder.hidden_size=32", "model.vision_encoder.depth=2", "model.vision_encoder.num_heads=2",
            "model.vision_encoder.intermediate_size=64"]
    model, dm = build_model(tiny_cfg(tmp_path, *clip, *data))
    train = dm.dataset("train")
    sample = next(s for s in (train[i] for i in range(len(train))) if tuple(s["content_hw"].tolist()) != (56, 56))
    original = Image.open(images / "b.jpg").convert("RGB")
    torch.testing.assert_close(sample["vision_image"], center_crop(original, CLIP_SIZE))
    seen = []
    model.vision.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    batch = dm.collate([sample])
    model(batch)
    assert torch.equal(seen[0], batch["vision_image"]) and not torch.equal(seen[0], batch["image"])
    model, dm = build_model(tiny_cfg(tmp_path, *clip, *data, "model.vision_encoder.preprocess=letterbox"))
    assert "vision_image" not in dm.dataset("train")[0]


def _crop_of_right_half() -> np.ndarray:
    """The 4×8 image's right half on its 8×8 centre crop: resized to 8×16, columns 4..11 kept: 4..7 out, 8..11 in."""
    return np.tile(np.array([0.0, 0, 0, 0, 1, 1, 1, 1]), (8, 1))


# ------------------------------------------------------------------------------------------- SAM key names
def to_segment_anything(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF SamModel names back to segment-anything's (the test's own inverse of transformers' renaming)."""
    out = {}
    for key, value in hf.items():
        if key.startswith("shared_image_embedding."):
            continue
        key = key.replace("vision_encoder.layers.", "image_encoder.blocks.")
        key = key.replace("vision_encoder.", "image_encoder.")
        key = key.replace("patch_embed.projection", "patch_embed.proj")
        for new, old in (("conv1", "0"), ("layer_norm1", "1"), ("conv2", "2"), ("layer_norm2", "3")):
            key = key.replace(f"neck.{new}.", f"neck.{old}.")
        for new, old in (("conv1", "0"), ("layer_norm1", "1"), ("conv2", "3"), ("layer_norm2", "4"), ("conv3", "6")):
            key = key.replace(f"mask_embed.{new}.", f"mask_downscaling.{old}.")
        for new, old in (("upscale_conv1", "0"), ("upscale_layer_norm", "1"), ("upscale_conv2", "3")):
            key = key.replace(f"mask_decoder.{new}.", f"mask_decoder.output_upscaling.{old}.")
        if "iou_prediction_head." in key or "output_hypernetworks_mlps." in key:
            key = key.replace(".layers.0.", ".layers.1.").replace(".proj_in.", ".layers.0.")
            key = key.replace(".proj_out.", ".layers.2.")
        key = key.replace("point_embed.", "point_embeddings.")
        key = key.replace("shared_embedding.positional_embedding", "pe_layer.positional_encoding_gaussian_matrix")
        out[re.sub(r"\.layer_norm", ".norm", key)] = value
    return out


def test_sam_renaming_known_pairs_and_round_trip() -> None:
    pairs = {
        "image_encoder.blocks.0.norm1.weight": "vision_encoder.layers.0.layer_norm1.weight",
        "image_encoder.neck.0.weight": "vision_encoder.neck.conv1.weight",
        "image_encoder.patch_embed.proj.weight": "vision_encoder.patch_embed.projection.weight",
        "mask_decoder.output_hypernetworks_mlps.0.layers.1.weight":
            "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight",
        "mask_decoder.output_hypernetworks_mlps.3.layers.2.bias":
            "mask_decoder.output_hypernetworks_mlps.3.proj_out.bias",
        "mask_decoder.iou_prediction_head.layers.0.weight": "mask_decoder.iou_prediction_head.proj_in.weight",
        "mask_decoder.output_upscaling.1.weight": "mask_decoder.upscale_layer_norm.weight",
        "mask_decoder.transformer.norm_final_attn.weight": "mask_decoder.transformer.layer_norm_final_attn.weight",
        "mask_decoder.transformer.layers.1.norm3.bias": "mask_decoder.transformer.layers.1.layer_norm3.bias",
        "prompt_encoder.mask_downscaling.4.bias": "prompt_encoder.mask_embed.layer_norm2.bias",
        "prompt_encoder.point_embeddings.2.weight": "prompt_encoder.point_embed.2.weight",
    }
    t = torch.zeros(1)
    assert set(sam_to_hf(dict.fromkeys(pairs, t))) == set(pairs.values())
    hf = tiny_sam().state_dict()
    assert sam_to_hf(to_segment_anything(hf)).keys() == hf.keys()


# ------------------------------------------------------------------------------------------- the SAM path
def lisa_arch(tmp: Path, *overrides: str) -> list[str]:
    """The tiny recipe with LISA's two vision paths (random weights)."""
    return [f"output_dir={tmp}/runs", "model.mask_encoder.name=sam_vit", f"model.mask_encoder.input_size={SAM_SIZE}",
            "model.mask_encoder.hidden_size=32", "model.mask_encoder.depth=2", "model.mask_encoder.num_heads=2",
            "model.mask_encoder.output_channels=16", "model.mask_encoder.window_size=2",
            "model.mask_decoder.name=sam", "model.mask_decoder.embed_dim=16", "model.mask_decoder.num_heads=2",
            "model.mask_decoder.mlp_dim=32", "model.mask_decoder.neck=false", *overrides]


def test_lisa_architecture_trains_with_its_own_sam_input(tmp_path: Path) -> None:
    root, images = make_layout(tmp_path)
    data = ["data.dataset.name=refcoco", f"data.dataset.root={root}", f"data.dataset.image_dir={images}",
            "data.dataset.image_size=32", "data.batch_size=2", "data.eval_batch_size=2"]
    cfg = tiny_cfg(tmp_path, *lisa_arch(tmp_path)[1:], *data)
    model, dm = build_model(cfg)
    batch = dm.collate([dm.dataset("val")[0]])
    assert batch["mask_image"].shape == (1, 3, SAM_SIZE, SAM_SIZE) and batch["image"].shape == (1, 3, 32, 32)
    seen = []
    model.mask_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    model(batch)
    assert seen == [(1, 3, SAM_SIZE, SAM_SIZE)]  # SAM read the dataset's own letterbox, not the model's input
    assert main(["fit", "--recipe", TINY, *lisa_arch(tmp_path), *data]) == 0
    assert main(["fit", "--recipe", TINY, *lisa_arch(tmp_path)]) == 0  # synthetic images: resized for SAM


def test_sam_decoder_without_neck_needs_a_sam_embedding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fit", "--recipe", TINY, *lisa_arch(tmp_path, "model.mask_decoder.embed_dim=32")]
    assert main(argv) == 2
    assert "neck: false needs features of the decoder's width (32)" in capsys.readouterr().err


def test_superpixels_reuse_the_mask_encoders_sam_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LISA's architecture with the SAM superpixel projector reusing its SAM (the paper's setting): SAM's image
    encoder runs once per forward, for the decoder and the superpixels both, on the dataset's own letterbox of
    the original image; the LLM-side image's padding makes no token. Without a SAM mask encoder: exit 2."""
    from segrouter.superpixels.sam_amg import tiny_sam_config

    torch.manual_seed(0)
    SamModel(tiny_sam_config(width=32, image_size=SAM_SIZE, patch_size=16)).save_pretrained(tmp_path / "sam")
    root, images = make_layout(tmp_path)
    data = ["data.dataset.name=refcoco", f"data.dataset.root={root}", f"data.dataset.image_dir={images}",
            "data.dataset.image_size=32", "data.batch_size=2", "data.eval_batch_size=2"]
    ssp = ["model.compressor.name=sam_superpixel", "model.compressor.generator=sam",
           f"model.compressor.sam_path={tmp_path / 'sam'}", "model.compressor.reuse_mask_encoder=true",
           "model.compressor.points_per_side=4", "model.compressor.pred_iou_thresh=0.0",
           "model.compressor.stability_thresh=0.0", "model.compressor.min_area=2",
           "model.compressor.aggregator_heads=2"]
    arch = [*lisa_arch(tmp_path, f"model.mask_encoder.path={tmp_path / 'sam'}", "model.mask_decoder.embed_dim=32"),
            *ssp, *data]
    model, dm = build_model(tiny_cfg(tmp_path, *arch[1:]))
    train = dm.dataset("train")
    sample = next(s for s in (train[i] for i in range(len(train))) if tuple(s["content_hw"].tolist()) != (32, 32))
    batch = dm.collate([sample])
    calls = []
    model.mask_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    tokens = model(batch)["visual"]
    assert calls == [(1, 3, SAM_SIZE, SAM_SIZE)]  # one SAM pass, on the dataset's letterbox at SAM's size
    h, w = sample["content_hw"].tolist()
    assert (tokens.coords[0, tokens.mask[0], 0] < h / 32).all() and (tokens.coords[0, tokens.mask[0], 1] < w / 32).all()
    assert main(["fit", "--recipe", TINY, *arch]) == 0
    capsys.readouterr()
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}/no_sam", *ssp]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "segrouter" in line or "Error" in line]
    assert len(err) == 1 and "reuse_mask_encoder needs the model's SAM mask encoder, and the model has none" in err[0]


# ------------------------------------------------------------------------------------------- import lisa
def make_lisa(tmp: Path) -> tuple[Path, Path, dict[str, torch.Tensor], SamModel, CLIPVisionModel]:
    """A LISA-7B-v1-layout directory at toy size (HF config, pytorch_model.bin in LISA's key names, tokenizer
    with [SEG], <im_start>, <im_end>) and a CLIP directory; returns them with the weights they were made from."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    lisa, clip_dir = tmp / "LISA-7B-v1", tmp / "clip-vit-large-patch14"
    words = ["<unk>", "<s>", "</s>", "what", "is", "the", "box", "in", "this", "image", "sure", "it"]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens(["[SEG]", "<im_start>", "<im_end>"])
    tok.save_pretrained(lisa)
    torch.manual_seed(2)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=2,
                                         tie_word_embeddings=False))
    sam, clip = tiny_sam(), tiny_clip()
    clip.save_pretrained(clip_dir)
    state = dict(llama.state_dict())
    state.update({f"model.visual_model.{k}": v for k, v in to_segment_anything(sam.state_dict()).items()})
    state.update({"model.mm_projector.weight": torch.randn(32, 32), "model.mm_projector.bias": torch.randn(32),
                  "model.text_hidden_fcs.0.0.weight": torch.randn(32, 32),
                  "model.text_hidden_fcs.0.0.bias": torch.randn(32),
                  "model.text_hidden_fcs.0.2.weight": torch.randn(256, 32),
                  "model.text_hidden_fcs.0.2.bias": torch.randn(256)})
    torch.save(state, lisa / "pytorch_model.bin")
    config = {"architectures": ["LISAForCausalLM"], "model_type": "llava", "hidden_size": 32, "intermediate_size": 64,
              "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
              "vocab_size": len(tok), "out_dim": 256, "vision_tower": "openai/clip-vit-large-patch14",
              "mm_vision_select_layer": -2, "mm_use_im_start_end": True, "train_mask_decoder": True}
    (lisa / "config.json").write_text(json.dumps(config))
    return lisa, clip_dir, state, sam, clip


def test_import_lisa_maps_every_part(tmp_path: Path) -> None:
    lisa, clip_dir, state, sam, clip = make_lisa(tmp_path)
    root, images = make_layout(tmp_path)
    out = tmp_path / "imported"
    cpu = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true",
           "model.llm.gradient_checkpointing=false", f"data.dataset.root={root}", f"data.dataset.image_dir={images}",
           "data.eval_batch_size=2", "data.num_workers=0", f"output_dir={tmp_path}/runs"]
    assert main(["import", "lisa", "--from", str(lisa), "--clip", str(clip_dir), "--out", str(out), *cpu]) == 0
    cfg = load_recipe(out / "lisa.yaml")
    assert cfg.model.image_size == CLIP_SIZE and cfg.model.compressor.depth == 1
    model, _ = build_model(cfg)
    assert load_weights(model, out / "lisa.ckpt") == []  # every tensor of the model is in the checkpoint
    own = model.state_dict()
    for key, value in sam.vision_encoder.state_dict().items():
        assert torch.equal(own[f"mask_encoder.encoder.{key}"], value), key
    for key, value in sam.mask_decoder.state_dict().items():
        assert torch.equal(own[f"mask_decoder.decoder.{key}"], value), key
    assert torch.equal(own["mask_decoder.pos.positional_embedding"], sam.shared_image_embedding.positional_embedding)
    assert torch.equal(own["mask_decoder.no_mask.weight"], sam.prompt_encoder.no_mask_embed.weight)
    for key, value in clip.state_dict().items():
        assert torch.equal(own[f"vision.clip.{key}"], value), key
    vocab = state["model.embed_tokens.weight"].shape[0]
    for key, value in state.items():
        if key.startswith(("model.layers.", "model.norm.")):
            assert torch.equal(own[f"llm.model.{key}"], value), key
        elif key in ("model.embed_tokens.weight", "lm_head.weight"):  # the tokenizer gained <image>: one row more
            assert torch.equal(own[f"llm.model.{key}"][:vocab], value), key
    assert torch.equal(own["compressor.proj.0.weight"], state["model.mm_projector.weight"])
    for i in (0, 2):
        assert torch.equal(own[f"text_proj.{i}.weight"], state[f"model.text_hidden_fcs.0.{i}.weight"])
        assert torch.equal(own[f"text_proj.{i}.bias"], state[f"model.text_hidden_fcs.0.{i}.bias"])
    assert main(["test", "--recipe", str(out / "lisa.yaml"), "--ckpt", str(out / "lisa.ckpt"),
                 "data.dataset.test_split=testA"]) == 0


def test_import_lisa_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lisa, clip_dir, state, _, _ = make_lisa(tmp_path)
    out = tmp_path / "imported"
    out.mkdir()
    base = ["import", "lisa", "--from", str(lisa), "--clip", str(clip_dir)]
    not_lisa = tmp_path / "not_lisa"
    not_lisa.mkdir()
    (not_lisa / "config.json").write_text("{}")
    torch.save({k: v for k, v in state.items() if "text_hidden_fcs" not in k}, not_lisa / "pytorch_model.bin")
    capsys.readouterr()  # what making the fake directories printed
    for argv, message in (
        ([*base, "--out", str(out)], "exists"),
        (["import", "lisa", "--from", str(tmp_path / "nowhere"), "--clip", str(clip_dir), "--out", str(tmp_path / "o")],
         "is not a folder"),
        (["import", "lisa", "--from", str(not_lisa), "--clip", str(clip_dir), "--out", str(tmp_path / "o")],
         "not a LISA checkpoint: no model.text_hidden_fcs.0.0.weight"),
        ([*base, "--out", str(tmp_path / "o"), "model.mask_decoder.neck=maybe"], "neck"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists() and not list(out.iterdir())
