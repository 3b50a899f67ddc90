"""The compressed InternVL embedder on the tiny configuration: built offline, on the real code path."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import InternVLForConditionalGeneration  # noqa: E402
from transformers.models.internvl.modeling_internvl import InternVLModel  # noqa: E402

from assay.training.model import (  # noqa: E402
    TOKENS_PER_TILE_CHOICES,
    MMEmbedder,
    compressed_side,
    format_prompt,
    load_embedder,
)
from assay.training.tiny import build_processor, build_tiny  # noqa: E402

TEXTS = [
    "Represent the given image with the following question.",
    "Find an image that matches the given description.",
    "what colour is the shape? red blue green circle square triangle",
]


def shape_image(
    colour: tuple[int, int, int], box: bool = False, size: tuple[int, int] = (48, 40)
) -> Image.Image:
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if box:
        draw.rectangle((4, 4, 30, 30), fill=colour)
    else:
        draw.ellipse((8, 8, 40, 36), fill=colour)
    return img


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(TEXTS, tokens_per_tile=64)
    return model, processor


@pytest.fixture
def embedder(tiny):
    model, processor = tiny
    emb = MMEmbedder(model, processor)
    yield emb
    emb.set_tokens_per_tile(64)  # the fixture's model is shared: put the setting back


def rows():
    return [
        {"instruction": "Find the image.", "text": "a red circle", "image": shape_image((255, 0, 0))},
        {"instruction": "Represent the given answer.", "text": "blue", "image": None},
        {"instruction": None, "text": None, "image": shape_image((0, 0, 255), box=True, size=(70, 30))},
        {
            "instruction": "Find the image.",
            "text": "a much longer description of a green square",
            "image": None,
        },
    ]


def test_tiny_builds_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access while building the tiny model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    model, processor = build_tiny(TEXTS, tokens_per_tile=36)
    cfg = model.config
    assert cfg.model_type == "internvl" and cfg.text_config.model_type == "qwen2"
    assert cfg.text_config.head_dim >= 32
    assert cfg.vision_config.hidden_size // cfg.vision_config.num_attention_heads >= 32
    assert (
        cfg.image_token_id
        == processor.image_token_id
        == processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    )
    assert cfg.text_config.vocab_size >= len(processor.tokenizer)
    assert processor.image_seq_length == cfg.image_seq_length == 36
    for token in ("<img>", "</img>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(processor.tokenizer(token, add_special_tokens=False).input_ids) == 1


@pytest.mark.parametrize("tokens", TOKENS_PER_TILE_CHOICES)
def test_tokens_per_tile_features_and_placeholders(embedder, tokens):
    embedder.set_tokens_per_tile(tokens)
    batch = embedder.prepare(rows(), "query")
    # the processor put exactly tokens_per_tile context tokens per image, between <img> and </img>
    per_row = (batch["input_ids"] == embedder.processor.image_token_id).sum(1).tolist()
    assert per_row == [tokens, 0, tokens, 0]
    feats = embedder.backbone.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    assert feats.shape == (2, tokens, embedder.config.text_config.hidden_size)
    # and the whole forward agrees with it (InternVL raises when features and placeholders differ)
    with torch.no_grad():
        assert embedder(**batch).shape == (4, embedder.config.text_config.hidden_size)


def test_grid_side_before_pixel_shuffle():
    assert [compressed_side(t, 0.5) for t in TOKENS_PER_TILE_CHOICES] == [12, 16, 20, 24, 32]


def test_bilinear_is_inserted_before_pixel_shuffle(embedder):
    """64 tokens = vision tower, bilinear 32x32 -> 16x16, InternVL's pixel shuffle, connector."""
    pixels = embedder.prepare(rows()[:1], "query")["pixel_values"]
    net = embedder.backbone
    with torch.no_grad():
        got = net.get_image_features(pixel_values=pixels).pooler_output
        grid = net.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:, :]
        grid = grid.reshape(1, 32, 32, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
        flat = InternVLModel.pixel_shuffle(net, grid.permute(0, 2, 3, 1).contiguous(), 0.5).reshape(1, 64, -1)
        want = net.multi_modal_projector(flat)
    torch.testing.assert_close(got, want)


def test_256_tokens_is_vanilla_internvl(embedder):
    """At 256 tokens per tile the resize is skipped: bit-for-bit transformers' own InternVL."""
    embedder.set_tokens_per_tile(256)
    vanilla = InternVLForConditionalGeneration(embedder.config).eval()
    vanilla.load_state_dict(embedder.model.state_dict())
    batch = embedder.prepare(rows(), "query")
    with torch.no_grad():
        ours = embedder.backbone.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        theirs = vanilla.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        assert torch.equal(ours, theirs)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        h_ours = embedder.backbone(pixel_values=batch["pixel_values"], **kwargs).last_hidden_state
        h_theirs = vanilla.model(pixel_values=batch["pixel_values"], **kwargs).last_hidden_state
    assert torch.equal(h_ours, h_theirs)


def test_mismatched_processor_is_refused(tiny):
    model, processor = tiny
    other = build_processor(processor.tokenizer, tokens_per_tile=256)
    with pytest.raises(ValueError, match="image_seq_length"):
        MMEmbedder(model, other)
    emb = MMEmbedder(model, processor)
    for bad in (50, 48, 1024):  # not square / not even on the grid / more than vanilla
        with pytest.raises(ValueError):
            emb.set_tokens_per_tile(bad)
    assert emb.tokens_per_tile == processor.image_seq_length == 64


def test_prompt_templates():
    img = object()
    assert format_prompt({"instruction": "Find it.", "image": img, "text": "cat"}, "query", "<I>") == (
        "Instruct: Find it. <I> Query: cat"
    )
    assert format_prompt({"instruction": "Match.", "image": img, "text": "cat"}, "candidate", "<I>") == (
        "Instruct: Match. <I> Text: cat"
    )
    assert format_prompt({"instruction": "Match.", "image": None, "text": "cat"}, "candidate", "<I>") == (
        "Instruct: Match. Text: cat"
    )
    assert (
        format_prompt({"instruction": "Match.", "image": img, "text": ""}, "candidate", "<I>")
        == "Instruct: Match. <I>"
    )
    with pytest.raises(ValueError):
        format_prompt({"text": None, "image": None}, "query", "<I>")


def test_embeddings_unit_norm_deterministic_and_distinct(embedder):
    a = embedder.encode_queries(rows())
    b = embedder.encode_queries(rows())
    assert a.dtype == torch.float32 and a.shape == (4, embedder.config.text_config.hidden_size)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(4))
    assert torch.equal(a, b)
    red = {"instruction": "Find the image.", "text": "a shape", "image": shape_image((255, 0, 0))}
    green = {**red, "image": shape_image((0, 200, 0), box=True)}
    q = embedder.encode_queries([red, green])
    assert not torch.allclose(q[0], q[1], atol=1e-4)
    c = embedder.encode_candidates([red])
    assert not torch.allclose(q[0], c[0], atol=1e-4)  # "Query:" and "Text:" differ


def test_padding_side_does_not_change_embeddings(embedder):
    embedder.padding_side = "left"
    left = embedder.encode_candidates(rows())
    embedder.padding_side = "right"
    right = embedder.encode_candidates(rows())
    alone = torch.cat([embedder.encode_candidates([r]) for r in rows()])
    embedder.padding_side = "left"
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)


def test_forward_gives_gradients(embedder):
    embedder.train()
    try:
        q = embedder.embed(rows(), "query")
        c = embedder.embed(rows(), "candidate")
        assert q.requires_grad
        loss = F.cross_entropy(q @ c.T / 0.03, torch.arange(4))
        loss.backward()
        vis = embedder.backbone.vision_tower.embeddings.patch_embeddings.projection.weight.grad
        lm = embedder.backbone.language_model.layers[-1].mlp.down_proj.weight.grad
        assert vis is not None and vis.abs().sum() > 0 and lm is not None and lm.abs().sum() > 0
    finally:
        embedder.zero_grad(set_to_none=True)
        embedder.eval()


def test_image_cells_bytes_and_paths(embedder, tmp_path):
    img = shape_image((255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    img.save(tmp_path / "red.png")
    embedder.image_root = tmp_path
    try:
        as_pil = embedder.encode_queries([{"text": "x", "image": Image.open(io.BytesIO(buf.getvalue()))}])
        as_bytes = embedder.encode_queries([{"text": "x", "image": {"bytes": buf.getvalue(), "path": None}}])
        as_path = embedder.encode_queries([{"text": "x", "image": {"bytes": None, "path": "red.png"}}])
    finally:
        embedder.image_root = None
    assert torch.equal(as_pil, as_bytes) and torch.equal(as_pil, as_path)


def test_save_load_round_trip(embedder, tmp_path):
    embedder.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert any(name.endswith(".safetensors") for name in files)
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    loaded = load_embedder(tmp_path)
    assert loaded.tokens_per_tile == loaded.processor.image_seq_length == 64
    # the image processor's backend is pinned, so pixels are the same on machines with torchvision
    assert json.loads((tmp_path / "assay_embedder.json").read_text())["image_backend"] == "pil"
    assert loaded.image_backend == "pil"
    assert torch.equal(loaded.encode_queries(rows()), embedder.encode_queries(rows()))
    assert torch.equal(loaded.encode_candidates(rows()), embedder.encode_candidates(rows()))
    # the same directory at another compression: model and processor follow together
    other = load_embedder(tmp_path, tokens_per_tile=144)
    assert other.tokens_per_tile == other.processor.image_seq_length == 144
    assert other.encode_queries(rows()[:1]).shape[0] == 1


def test_loading_never_runs_remote_code(embedder, tmp_path, monkeypatch):
    embedder.save_pretrained(tmp_path)
    marker = tmp_path / "remote_code_ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n")
    for name in ("config.json", "tokenizer_config.json"):
        cfg = json.loads((tmp_path / name).read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.Evil", "AutoTokenizer": ["evil.Evil", None]}
        (tmp_path / name).write_text(json.dumps(cfg))
    import transformers.dynamic_module_utils as dyn

    def refuse(*args, **kwargs):
        raise AssertionError("remote code was looked up")

    monkeypatch.setattr(dyn, "get_class_from_dynamic_module", refuse)
    loaded = load_embedder(tmp_path)
    assert not marker.exists()
    assert loaded.encode_queries(rows()[:1]).shape[0] == 1
    with pytest.raises(ValueError, match="remote code"):
        load_embedder(tmp_path, trust_remote_code=True)
    chat = Path(tmp_path / "chat")
    chat.mkdir()
    (chat / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(ValueError, match="-hf"):
        load_embedder(chat)


def test_dynamic_tiling_costs_tokens_per_tile_per_tile(embedder):
    """max_tiles > 1: InternVL's tiles plus a thumbnail, each tile tokens_per_tile placeholders."""
    embedder.max_tiles = 4
    try:
        wide = [
            {"instruction": "Find it.", "text": "wide", "image": shape_image((255, 0, 0), size=(128, 64))}
        ]
        batch = embedder.prepare(wide, "candidate")
        tiles = batch["pixel_values"].shape[0]
        assert tiles == 3  # 2 x 1 tiles + thumbnail
        assert int((batch["input_ids"] == embedder.processor.image_token_id).sum()) == 64 * tiles
        with torch.no_grad():
            assert embedder(**batch).shape[0] == 1
    finally:
        embedder.max_tiles = 1
