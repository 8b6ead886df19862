"""The vision-dependent benchmark's parts: the decoder's local vision path, the name probe, the controls
(blind LLM, shuffled or zeroed visual tokens) and starting a run from another run's checkpoint."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, build_model, tiny_cfg

from segrouter.cli import main
from segrouter.compressors.base import VisualTokens
from segrouter.errors import RecipeError, SegrouterError
from segrouter.model.module import visual_control
from segrouter.model.sequence import build_sequence
from segrouter.routing.base import Kind
from segrouter.vision_encoders.conv_stem import ConvStem

TINY = str(RECIPES / "tiny.yaml")
VISREF = [
    "model.mask_encoder={name: conv_stem, channels: 8, depth: 2, stride: 4}",
    "data.dataset.distinct=colours",
    "data.dataset.target_attributes=none",
    "data.dataset.forms=[position,relation]",
]


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------ the local vision path
def test_conv_stem_features_are_local_and_translation_equivariant() -> None:
    torch.manual_seed(0)
    stem = ConvStem(64, channels=8, depth=3, stride=4).eval()
    assert stem.grid_size == (16, 16) and stem.out_dim == 8 and stem.receptive_field == 15
    image = torch.rand(1, 3, 64, 64) * 0.2
    image[..., 20:28, 12:20] = 0.9  # an object
    moved = torch.roll(image, shifts=(0, 16), dims=(2, 3))  # the same object 16 px (4 cells) to the right
    with torch.no_grad():
        a, b = stem(image), stem(moved)
    # away from the borders and the wrapped-around columns, moving the image moves the features, nothing else
    assert torch.allclose(a[..., 2:14, 2:10], b[..., 2:14, 6:14], atol=1e-5)
    # a feature sees only its receptive field: a change 20 px away does not reach it
    far = image.clone()
    far[..., 20:28, 44:52] = 0.9
    with torch.no_grad():
        c = stem(far)
    assert torch.equal(a[..., 5, 3], c[..., 5, 3])


@pytest.mark.parametrize(
    ("params", "fragment"),
    [({"channels": 0}, "channels, depth and out_dim must be >= 1"), ({"stride": 3}, "stride must be a power of two"),
     ({"depth": 1, "stride": 4}, "stride must be a power of two"), ({"padding_mode": "reflect"}, "padding_mode")],
)
def test_conv_stem_settings_are_checked(params: dict, fragment: str) -> None:
    with pytest.raises(RecipeError, match=fragment):
        ConvStem(64, **params)


def test_the_mask_decoder_reads_its_own_encoder(tmp_path: Path) -> None:
    model, data = build_model(tiny_cfg(tmp_path, *VISREF))
    batch = next(iter(data.val_dataloader()))
    seen: list[torch.Tensor] = []
    model.mask_decoder.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        out = model(batch)
    assert seen[0].shape[1:] == (8, 8, 8)  # conv_stem's 8 channels on a 32/4 grid, not the ViT's 32 on 4×4
    assert out["masks"].shape == batch["mask"].shape


# ------------------------------------------------------------------------------------------- the name probe
def test_evaluation_batches_carry_the_name_for_the_probe_only(tmp_path: Path) -> None:
    model, data = build_model(tiny_cfg(tmp_path, *VISREF))
    tok = data.tokenizer
    batch = next(iter(data.val_dataloader()))
    sample = data.dataset("val")[0]
    plain = tok.convert_ids_to_tokens(batch["input_ids"][0][batch["text_mask"][0]].tolist())
    named = tok.convert_ids_to_tokens(batch["probe_ids"][0][batch["probe_text_mask"][0]].tolist())
    assert plain[-2:] == ["[SEG]", "[EOS]"]  # the masks never see the name
    assert named[-4:] == ["[SEG]", *sample["target"].split(), "[EOS]"]
    assert (tok.convert_ids_to_tokens([i for i in batch["probe_labels"][0].tolist() if i != -100])
            == sample["target"].split())
    assert "probe_ids" not in next(iter(data.train_dataloader()))


def test_name_probe_predictions_are_the_lm_heads_next_token_predictions(tmp_path: Path) -> None:
    """Checked against the stock Hugging Face forward (``full`` routing computes the same states)."""
    model, data = build_model(tiny_cfg(tmp_path, *VISREF))
    model.eval()
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        out = model(batch)
        pred, true, sample = model.name_tokens(batch, out["visual"])
        seq, names, _ = build_sequence(model.llm.embed(batch["probe_ids"]), batch["probe_ids"],
                                       batch["probe_text_mask"], batch["probe_labels"], out["visual"],
                                       model.image_token_id, model.mask_token_ids)
        logits = model.llm.model(inputs_embeds=seq.embeds, attention_mask=seq.valid.long()).logits
    expected, expected_true, expected_sample = [], [], []
    for b, t in (names != -100).nonzero().tolist():  # the token at t is predicted from position t - 1
        expected.append(int(logits[b, t - 1].argmax()))
        expected_true.append(int(names[b, t]))
        expected_sample.append(b)
    assert pred.tolist() == expected and true.tolist() == expected_true and sample.tolist() == expected_sample
    assert len(set(expected_sample)) == batch["image"].shape[0] and len(expected) == 2 * batch["image"].shape[0]


ROUTINGS = [
    "model.routing.name=full",
    "model.routing.name=token_routing",
    "model.routing={name: token_routing, proxy_rule: attention}",
    "model.routing={name: fastv, k: 1, ratio: 0.5, rank_by: all}",
    "model.routing={name: pdrop, layers: [1], keep: [0.5]}",
    "model.routing={name: mod, capacity: 0.5}",
]


@pytest.mark.parametrize("routing", ROUTINGS)
def test_nothing_after_the_mask_token_changes_it(tmp_path: Path, routing: str) -> None:
    """The name probe and the training answer both follow [SEG]: no strategy may let them choose what it sees
    (FastV's and token routing's attention rankings count only the queries up to the mask token)."""
    model, data = build_model(tiny_cfg(tmp_path, *VISREF, routing))
    model.eval()
    samples = [data.dataset("val")[i] for i in range(4)]
    batches = [data.collate(samples), data.collate(samples, train=True),
               data.collate([{**s, "target": "purple ring"} for s in samples], train=True)]
    prefixes, masks = [], []
    with torch.no_grad():
        for batch in batches:
            enc = model.encode(batch)
            hidden = model.routing(model.llm, enc.seq)
            prefixes.append([hidden[i, : int(enc.mask_pos[i, 0]) + 1] for i in range(len(samples))])
            masks.append(model(batch)["masks"])
    for prefix, mask in zip(prefixes[1:], masks[1:], strict=True):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(prefixes[0], prefix, strict=True))
        assert torch.allclose(masks[0], mask, atol=1e-5)


def test_name_acc_is_logged_and_reaches_one_for_a_model_that_names_correctly(tmp_path: Path) -> None:
    model, data = build_model(tiny_cfg(tmp_path, *VISREF))
    model.eval()
    batch = next(iter(data.val_dataloader()))

    truth = [i for i in batch["probe_labels"].flatten().tolist() if i != -100]

    class Oracle(torch.nn.Module):  # an LM head that knows the names, in probe order (the loss's rows get zeros)
        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            if hidden.shape[0] != len(truth):
                return torch.zeros(hidden.shape[0], len(data.tokenizer))
            return torch.nn.functional.one_hot(torch.tensor(truth), len(data.tokenizer)).float()

    model.llm.lm_head = Oracle()
    with torch.no_grad(), pytest.warns(UserWarning, match="trainer"):  # logging needs no trainer for this
        model._eval_step("val", batch, batch_idx=5)
    assert float(model.eval_means["val"]["name_acc"].compute()) == 1.0


# ---------------------------------------------------------------------------------------------- controls
def _tokens(b: int = 3, n: int = 4) -> VisualTokens:
    embeds = torch.arange(b * n * 2, dtype=torch.float32).view(b, n, 2)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, -1] = False
    return VisualTokens(embeds, mask, torch.rand(b, n, 2))


def test_visual_controls() -> None:
    v = _tokens()
    assert not bool(v.mask[2, 3])
    zero = visual_control(v, "zero")
    assert not zero.embeds.any() and torch.equal(zero.mask, v.mask) and torch.equal(zero.coords, v.coords)
    shuffled = visual_control(v, "shuffle")
    for i in range(3):  # every sample gets the previous sample's tokens, mask and places: none keeps its own
        j = (i - 1) % 3
        assert torch.equal(shuffled.embeds[i], v.embeds[j]) and torch.equal(shuffled.mask[i], v.mask[j])
        assert torch.equal(shuffled.coords[i], v.coords[j])
    blind = visual_control(v, "blind")
    assert blind.embeds.shape == (3, 0, 2) and not blind.counts.any()
    with pytest.raises(SegrouterError, match="at least 2 samples"):
        visual_control(_tokens(b=1), "shuffle")


def test_a_blind_llm_sees_no_image_token_and_still_segments(tmp_path: Path) -> None:
    model, data = build_model(tiny_cfg(tmp_path, *VISREF, "model.blind_llm=true"))
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        enc = model.encode(batch)
        out = model(batch)
    assert not bool((enc.seq.kinds == Kind.IMAGE).any()) and not enc.visual.counts.any()
    assert out["masks"].shape == batch["mask"].shape


def test_validate_with_a_control(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = f"output_dir={tmp_path}"
    assert main(["fit", "--recipe", TINY, out_dir, *VISREF]) == 0
    ckpt = str(tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt")
    scores = {}
    for control in (None, "shuffle", "zero"):
        os.environ.pop("SEGROUTER_RUN_VERSION", None)
        assert main(["validate", "--recipe", TINY, out_dir, *VISREF, "--ckpt", ckpt,
                     *(["--control", control] if control else [])]) == 0
        run = sorted((tmp_path / "tiny").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
        assert f"control: {control or 'null'}" in (run / "recipe.yaml").read_text()
        row = next(r for r in _metrics(run) if r.get("val/ciou"))
        assert row["val/name_acc"] != ""
        scores[control] = float(row["val/loss"])
    assert len(set(scores.values())) == 3  # each control changes what the LLM reads
    capsys.readouterr()
    assert main(["validate", "--recipe", TINY, out_dir, *VISREF, "--ckpt", ckpt, "--control", "shufle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'shufle'" in err[0]
    assert main(["validate", "--recipe", TINY, out_dir, *VISREF, "--ckpt", ckpt, "metrics.control=blind"]) == 2
    assert "metrics.control: unknown control 'blind'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ init_from
def test_init_from_starts_a_run_from_another_runs_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = f"output_dir={tmp_path}"
    assert main(["fit", "--recipe", TINY, out_dir, "name=stage1"]) == 0
    ckpt = tmp_path / "stage1" / "version_0" / "checkpoints" / "last.ckpt"
    stage1 = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    cfg = tiny_cfg(tmp_path, "name=stage2", f"init_from={ckpt}")
    from segrouter.build import build

    model, _ = build(cfg, init_weights=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stage1.items())
    routed, _ = build(tiny_cfg(tmp_path, f"init_from={ckpt}", "model.routing.name=token_routing"), init_weights=True)
    assert torch.equal(routed.llm.lm_head.weight, stage1["llm.lm_head.weight"])  # new modules keep their init
    assert "tensors not in it keep their initialisation (routing.projectors" in capsys.readouterr().err

    # a stage whose decoder differs takes only the named parts: here the vision encoder and the LLM
    partial, _ = build(tiny_cfg(tmp_path, *VISREF, f"init_from={ckpt}", "init_modules=[vision,llm]"), init_weights=True)
    assert torch.equal(partial.llm.lm_head.weight, stage1["llm.lm_head.weight"])
    assert torch.equal(partial.vision.vit.pos_embed, stage1["vision.vit.pos_embed"])
    assert not torch.equal(partial.text_proj[0].weight, stage1["text_proj.0.weight"])
    with pytest.raises(RecipeError, match="init_modules names no part of the model: vison"):
        build(tiny_cfg(tmp_path, f"init_from={ckpt}", "init_modules=[vison]"), init_weights=True)

    for bad, fragment in [(tmp_path / "missing.ckpt", "init_from: checkpoint not found"),
                          (ckpt, "init_from: checkpoint")]:
        os.environ.pop("SEGROUTER_RUN_VERSION", None)
        capsys.readouterr()
        assert main(["fit", "--recipe", TINY, out_dir, "name=stage2", f"init_from={bad}", "model.llm.hidden_size=64",
                     "model.llm.intermediate_size=128"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert bad == tmp_path / "missing.ckpt" or "of another shape" in err[0] and "same model settings" in err[0]
    assert not (tmp_path / "stage2").exists()  # nothing written by a run that could not start


def test_validate_with_another_recipes_checkpoint_is_one_line(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}"]) == 0
    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    capsys.readouterr()
    assert main(["validate", "--recipe", TINY, f"output_dir={tmp_path}", *VISREF]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the recipe" in err[0]
    assert len(list((tmp_path / "tiny").glob("version_*"))) == 1


def test_a_frozen_vit_from_a_pretraining_run(tmp_path: Path) -> None:
    """Stage 0 pretrains the ViT with dense supervision; the testbed loads it from that run's checkpoint."""
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}", "name=vision",
                 "model.vision_encoder.pos_embed=sincos"]) == 0
    ckpt = tmp_path / "vision" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model, _ = build_model(tiny_cfg(tmp_path, *VISREF, f"model.vision_encoder.weights={ckpt}",
                                    "model.vision_encoder.freeze=true", "model.vision_encoder.pos_embed=sincos"))
    vit = model.vision.vit.state_dict()
    assert vit and all(torch.equal(v, state[f"vision.vit.{k}"]) for k, v in vit.items())
    assert not any(p.requires_grad for p in model.vision.parameters())
    sincos = model.vision.vit.pos_embed
    assert sincos[0, 0].abs().max() <= 1 and not torch.equal(sincos[0, 0], sincos[0, 1])  # a fixed 2D table


def test_freeze_keeps_the_named_parts_fixed(tmp_path: Path) -> None:
    model, _ = build_model(tiny_cfg(tmp_path, *VISREF, "model.freeze=[mask_decoder,text_proj]"))
    assert not any(p.requires_grad for m in (model.mask_decoder, model.text_proj) for p in m.parameters())
    assert all(p.requires_grad for m in (model.llm, model.mask_encoder) for p in m.parameters())
    with pytest.raises(SegrouterError, match="model.freeze names no part of the model: decoder"):
        build_model(tiny_cfg(tmp_path, "model.freeze=[decoder]"))


def test_conv_stem_projects_to_the_width_a_decoder_was_trained_on() -> None:
    stem = ConvStem(64, channels=8, depth=3, stride=4, out_dim=128)
    assert stem.out_dim == 128 and stem(torch.rand(2, 3, 64, 64)).shape == (2, 128, 16, 16)


def test_semantic_maps_give_every_pixel_its_objects_class() -> None:
    from segrouter.datasets.synthetic import SyntheticReferringDataset

    ds = SyntheticReferringDataset("train", num_samples=8, image_size=32, colours=("red", "blue"),
                                   shapes=("circle", "square"))
    assert ds.semantic_classes == {"colour": ["red", "blue"], "shape": ["circle", "square"]}
    for i in range(8):
        scene, semantic = ds.scene(i), ds[i]["semantic"]
        assert semantic.dtype == torch.int64 and semantic.shape == (2, 32, 32)
        expected = torch.zeros(2, 32, 32, dtype=torch.int64)
        for o in scene.objects:
            expected[0, torch.from_numpy(o.mask)] = 1 + ["red", "blue"].index(o.colour)
            expected[1, torch.from_numpy(o.mask)] = 1 + ["circle", "square"].index(o.shape)
        assert torch.equal(semantic, expected) and bool((semantic == 0).any())


def test_the_semantic_loss_trains_the_vision_encoder(tmp_path: Path) -> None:
    """With every other loss weighed 0 the semantic head alone still gives the ViT a gradient; at weight 0 the
    model has no head and the loss no semantic part."""
    zero = ["model.loss.ce_weight=0", "model.loss.bce_weight=0", "model.loss.dice_weight=0"]
    model, data = build_model(tiny_cfg(tmp_path, "model.loss.semantic_weight=2", *zero))
    batch = data.collate([data.dataset("train")[i] for i in range(4)], train=True)
    assert batch["semantic"].shape == (4, 2, 32, 32)
    assert model.semantic_head is not None  # tiny: 4 colours, 3 shapes, each + background, on a 2x2 finer grid
    assert model.semantic_head.out_channels == (5 + 4) * 4
    parts = model.losses(model(batch), batch["mask"], batch["semantic"])
    assert torch.isclose(parts["loss"], 2 * parts["semantic"]) and parts["semantic"] > 0
    parts["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters() if p.requires_grad)
    with pytest.raises(SegrouterError, match="the batch has no per-pixel classes"):
        model.losses(model(batch), batch["mask"])
    plain, _ = build_model(tiny_cfg(tmp_path))
    assert plain.semantic_head is None
    assert "semantic" not in plain.losses(plain(batch), batch["mask"], batch["semantic"])


def test_the_semantic_loss_is_logged_and_refused_without_classes(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}", "model.loss.semantic_weight=1"]) == 0
    rows = _metrics(tmp_path / "tiny" / "version_0")
    assert any(r.get("train/semantic") for r in rows)
    from segrouter.model.module import SegmentationMLLM

    cfg = tiny_cfg(tmp_path, "model.loss.semantic_weight=1")
    _, data = build_model(tiny_cfg(tmp_path))
    with pytest.raises(RecipeError, match="model.loss.semantic_weight needs per-pixel classes, which the synthetic "
                                          "dataset does not give"):
        SegmentationMLLM(cfg, data.tokenizer)  # as for a dataset without semantic_classes
    os.environ.pop("SEGROUTER_RUN_VERSION", None)
    capsys.readouterr()
    assert main(["fit", "--recipe", TINY, f"output_dir={tmp_path}", "name=bad", "model.loss.semantic_weight=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.loss.semantic_weight" in err[0], err
    assert not (tmp_path / "bad").exists()
