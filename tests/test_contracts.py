"""Every registered component meets its kind's contract (timm's test_models.py): one test body per kind,
parametrized over every name the registries hold — built-ins and plugins alike, so a new component is
tested the moment it is registered. Each is built from its defaults (only sizes made tiny, and data paths
given where a dataset needs files), its defaults pass ``check_params``, its output has the contract's
shapes, and gradients reach its inputs. The docs' component tables must name exactly the registered ones."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_eval_protocol import make_grefcoco, make_reasonseg
from test_refcoco import make_layout

from segrouter.geometry import grid_coords
from segrouter.registry import KINDS, default_plugin_dirs, load_plugins, registry
from segrouter.routing.base import Kind, TokenSequence, recording_tokens
from segrouter.text import build_tokenizer

load_plugins()  # the repository's plugins/ (and installed entry points): a plugin meets the same contract
NAMES = {kind: registry(kind).names() for kind in KINDS}
BATCH, IMAGE, GRID, VISION_DIM, LLM_WIDTH = 2, 32, (8, 8), 16, 32


def _cases(kind: str) -> list[Any]:
    return [pytest.param(name, id=name) for name in NAMES[kind]]


def _check_defaults(kind: str, name: str, **required: Any) -> None:
    """The recipe node ``{name}`` (plus any required parameter) validates: types and ``check_params``."""
    registry(kind).validate({"name": name, **required}, where=f"contract.{kind}")


def _grads_reach(x: torch.Tensor) -> None:
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _images() -> torch.Tensor:
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(BATCH, 3, 4, 4), size=(IMAGE, IMAGE), mode="bilinear")
    return smooth.clamp(0, 1)


# encoders whose defaults are a real model's size (SAM ViT-B at 1024 px, CLIP ViT-L/14): built tiny here
TINY_ENCODERS: dict[str, dict[str, Any]] = {
    "sam_vit": {"input_size": 64, "hidden_size": 16, "depth": 2, "num_heads": 2, "output_channels": 16,
                "window_size": 2},
    "hf_clip": {"patch_size": 8, "hidden_size": 16, "depth": 2, "num_heads": 2, "intermediate_size": 32},
}


@pytest.mark.parametrize("name", _cases("vision_encoder"))
def test_vision_encoder_contract(name: str) -> None:
    _check_defaults("vision_encoder", name)
    encoder = registry("vision_encoder").build({"name": name, **TINY_ENCODERS.get(name, {})}, IMAGE)
    images = _images().requires_grad_(True)
    features = encoder(images)
    assert features.shape == (BATCH, encoder.out_dim, *encoder.grid_size)
    features.square().mean().backward()
    _grads_reach(images)


@pytest.mark.parametrize("name", _cases("compressor"))
def test_compressor_contract(name: str) -> None:
    _check_defaults("compressor", name)
    compressor = registry("compressor").build({"name": name}, VISION_DIM, LLM_WIDTH, GRID)
    torch.manual_seed(0)
    features = torch.randn(BATCH, VISION_DIM, *GRID, requires_grad=True)
    tokens = compressor(features, _images())
    n = tokens.embeds.shape[1]
    assert tokens.embeds.shape == (BATCH, n, LLM_WIDTH) and tokens.mask.shape == (BATCH, n)
    assert tokens.coords.shape == (BATCH, n, 2) and tokens.mask.dtype == torch.bool
    assert (tokens.counts >= 1).all()
    coords = tokens.coords[tokens.mask]
    assert ((coords >= 0) & (coords <= 1)).all(), "token centres must be image coordinates in [0, 1]"
    (tokens.embeds * tokens.mask[..., None]).square().mean().backward()
    _grads_reach(features)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer(None, ["a"], 1)


@pytest.mark.parametrize("name", _cases("llm"))
def test_llm_contract(name: str, tokenizer: Any) -> None:
    _check_defaults("llm", name)
    llm = registry("llm").build({"name": name}, tokenizer)
    assert len(llm.layers) == llm.num_layers >= 1
    seq = _sequence(n_image=0, width=llm.hidden_size, ids=torch.arange(10).view(2, 5) % len(tokenizer), llm=llm)
    assert seq.embeds.shape == (2, 5, llm.hidden_size)
    cos, sin = llm.rotary(seq.embeds, seq.positions)
    assert cos.shape == sin.shape and cos.shape[:2] == (2, 5)
    logits = llm.lm_head(registry("routing").build({"name": "full"})(llm, seq))
    assert logits.shape[:2] == (2, 5) and logits.shape[2] >= len(tokenizer)
    logits.square().mean().backward()
    _grads_reach(seq.embeds)


@pytest.fixture(scope="module")
def small_llm(tokenizer: Any) -> Any:
    """Four layers (the shallowest depth every routing default fits), grouped key/value heads."""
    torch.manual_seed(0)
    node = {"name": "hf_causal", "family": "llama", "hidden_size": 32, "num_layers": 4, "num_heads": 4,
            "num_kv_heads": 2}
    return registry("llm").build(node, tokenizer).eval()


def _sequence(n_image: int, width: int, ids: torch.Tensor | None = None, llm: Any = None) -> TokenSequence:
    """``[BOS] image×n_image text text [SEG] text`` per sample, the second sample one image token fewer and
    right-padded; image tokens on a patch grid's centres. Embeddings are random leaves that require grad, or
    ``llm.embed(ids)`` (detached: a leaf) when ids are given."""
    rows = [[Kind.TEXT] + [Kind.IMAGE] * max(n_image - b, 0) + [Kind.TEXT] * 2 + [Kind.MASK, Kind.TEXT]
            for b in range(2)]
    length = max(len(r) for r in rows)
    torch.manual_seed(0)
    embeds = torch.randn(2, length, width) if ids is None else llm.embed(ids).detach()
    kinds = torch.tensor([[int(k) for k in r] + [int(Kind.PAD)] * (length - len(r)) for r in rows])
    positions = torch.where(kinds != Kind.PAD, torch.arange(length)[None], 0)
    coords = torch.zeros(2, length, 2)
    side = max(1, int(np.ceil(np.sqrt(max(n_image, 1)))))
    for b in range(2):
        image = (kinds[b] == Kind.IMAGE).nonzero()[:, 0]
        coords[b, image] = grid_coords(side, side)[: len(image)]
    return TokenSequence(embeds.requires_grad_(True), kinds, positions, coords)


@pytest.mark.parametrize("name", _cases("routing"))
def test_routing_contract(name: str, small_llm: Any) -> None:
    _check_defaults("routing", name)
    strategy = registry("routing").build({"name": name})
    strategy.setup(small_llm)
    seq = _sequence(n_image=16, width=small_llm.hidden_size)
    out = strategy(small_llm, seq)
    assert out.shape == seq.embeds.shape and torch.isfinite(out).all()
    stats = strategy.stats.as_lists()
    valid = seq.valid.sum(dim=1).float().mean().item()
    for key in ("attn_tokens", "ffn_tokens"):
        assert len(stats[key]) == small_llm.num_layers, f"one {key} entry per layer"
        assert all(0 < v <= valid for v in stats[key])
    out.square().mean().backward()
    _grads_reach(seq.embeds)
    for pname, p in strategy.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
    assert strategy.stats.ffn_masks is None, "which tokens ran each FFN is kept only inside recording_tokens()"
    with recording_tokens(), torch.no_grad():  # what `segrouter analyze tokens` reads: masks in sequence order
        strategy(small_llm, seq)
    masks, ffn = strategy.stats.ffn_masks, strategy.stats.as_lists()["ffn_tokens"]
    assert masks is not None and len(masks) == small_llm.num_layers, "one FFN mask per layer"
    for mask, count in zip(masks, ffn, strict=True):
        assert mask.shape == seq.kinds.shape and mask.dtype == torch.bool and not (mask & ~seq.valid).any()
        assert mask.sum(dim=1).float().mean().item() == pytest.approx(count)


@pytest.mark.parametrize("name", _cases("mask_decoder"))
def test_mask_decoder_contract(name: str) -> None:
    _check_defaults("mask_decoder", name)
    decoder = registry("mask_decoder").build({"name": name}, VISION_DIM, (4, 4))
    torch.manual_seed(0)
    features = torch.randn(BATCH, VISION_DIM, 4, 4, requires_grad=True)
    prompts = torch.randn(BATCH, 1, decoder.prompt_dim, requires_grad=True)
    logits = decoder(features, prompts)
    assert logits.dim() == 3 and logits.shape[0] == BATCH and min(logits.shape[1:]) >= 4
    logits.square().mean().backward()
    _grads_reach(features)
    _grads_reach(prompts)


def _hf_refer_folder(tmp: Path) -> Path:
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = {"image": [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(2)],
            "expression": ["a", "b"], "mask": [np.eye(8, dtype=np.uint8).tolist()] * 2}
    features = datasets.Features({"image": datasets.Image(), "expression": datasets.Value("string"),
                                  "mask": datasets.Sequence(datasets.Sequence(datasets.Value("uint8")))})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp / "hf"))
    return tmp / "hf"


def _data_files(name: str, tmp: Path) -> dict[str, Any]:
    """The required parameters of the datasets that read files, pointing at tiny data written to ``tmp``."""
    if name == "refcoco":
        root, images = make_layout(tmp)
        return {"root": str(root), "image_dir": str(images)}
    if name == "hf_refer":
        return {"path": str(_hf_refer_folder(tmp))}
    if name == "grefcoco":
        root, images = make_grefcoco(tmp)
        return {"root": str(root), "image_dir": str(images)}
    if name == "reasonseg":
        return {"root": str(make_reasonseg(tmp))}
    required = [p.name for p in registry("dataset").get(name).params().values() if p.required]
    if required:
        pytest.skip(f"dataset '{name}' needs {required}: give it tiny data in _data_files")
    return {}


@pytest.mark.parametrize("name", _cases("dataset"))
def test_dataset_contract(name: str, tmp_path: Path) -> None:
    files = _data_files(name, tmp_path)
    _check_defaults("dataset", name, **files)
    size = {"image_size": IMAGE} if "image_size" in registry("dataset").get(name).params() else {}
    dataset = registry("dataset").build({"name": name, **files, **size}, "train")
    sample = dataset[0]
    side = size.get("image_size", sample["image"].shape[-1])
    assert sample["image"].shape == (3, side, side) and sample["image"].dtype == torch.float32
    assert 0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1
    assert sample["mask"].shape == (side, side) and set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
    assert isinstance(sample["text"], str) and sample["text"] and isinstance(sample["id"], str)


def _ours(kind: str) -> set[str]:
    """Registered names shipped with segrouter: built-ins and the repository's plugins/ (not other installs)."""
    plugins = [str(d.resolve()) for d in default_plugin_dirs()]
    return {e.name for e in registry(kind).entries()
            if e.source.startswith("segrouter") or any(e.source.startswith(f"plugin {d}") for d in plugins)}


def _table(path: Path, row: str) -> dict[str, set[str]]:
    """Kind → the component names (backticked snake_case words) in the last column of the markdown table
    whose rows start with ``row`` (a regex holding the kind as group 1)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(row, line)
        if m and m.group(1) in KINDS:
            out[m.group(1)] = set(re.findall(r"`([a-z][a-z0-9_]*)`", line.rsplit("|", 2)[-2]))
    return out


@pytest.mark.parametrize(("doc", "row"), [("docs/architecture.md", r"\| `(\w+)` \(`\w+/`\)"),
                                          ("README.md", r"\| `(\w+)` \|")])
def test_docs_component_tables_name_every_registered_component(doc: str, row: str) -> None:
    table = _table(ROOT / doc, row)
    assert set(table) == set(KINDS), f"{doc}: one row per kind"
    for kind in KINDS:
        assert table[kind] == _ours(kind), f"{doc}, {kind}: the table names {sorted(table[kind])}"
