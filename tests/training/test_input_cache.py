"""The input cache: the processor's tensors bit for bit, keyed so nothing stale is read, never trusted
when damaged, and images still confined to their data root."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from assay.curation.dataset import write_dataset
from assay.training.data import TrainingData, TrainingDataError
from assay.training.generative import build_batch, reranker_sample, sample_from_input
from assay.training.input_cache import InputCache, processor_key
from assay.training.inputs import CachedInputs, Prefetcher, ProcessorInputs
from assay.training.model import MMEmbedder
from assay.training.tiny import build_tiny

TEXTS = ["what colour is it?", "a red square", "a blue circle", "Find the image.", "green", "red"]


def png(rgb, size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", size, rgb)
    image.putpixel((1, 2), (0, 0, 0))  # not flat: resizing has something to round
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(TEXTS, tokens_per_tile=16, image_size=16, patch_size=1, hidden_size=32, num_layers=1)


def embedder(tiny, max_tiles: int = 1, tokens_per_tile: int = 16, padding_side: str = "left") -> MMEmbedder:
    model, processor = tiny
    emb = MMEmbedder(model, processor, max_tiles=max_tiles, padding_side=padding_side)
    emb.set_tokens_per_tile(tokens_per_tile)
    return emb


@pytest.fixture
def image_dir(tmp_path):
    """A data root holding two image files (and their cells, made as TrainingData makes them)."""
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(png((200, 30, 30), (24, 16)))
    (root / "img" / "b.png").write_bytes(png((30, 30, 200), (16, 40)))
    real = os.path.realpath(root)
    return {name: {"bytes": None, "path": f"{real}/img/{name}.png", "root": real} for name in ("a", "b")}


def rows(cells) -> list[dict]:
    """Image only, text only, both (a file and inline bytes), and prompts of different lengths."""
    return [
        {"instruction": None, "text": None, "image": cells["a"]},
        {"instruction": "Find the image.", "text": "a red square", "image": None},
        {"instruction": "Find the image.", "text": "what colour is it? green", "image": cells["b"]},
        {"instruction": None, "text": "red", "image": {"bytes": png((20, 200, 20)), "path": None}},
        {"instruction": "Find the image.", "text": "a blue circle", "image": cells["a"]},
    ]


def assert_same(got: dict, want) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


# ---------------------------------------------------------------- equal to the processor


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("max_tiles", [1, 4], ids=["one-tile", "dynamic-tiling"])
def test_cached_inputs_equal_the_processor_bit_for_bit(tiny, image_dir, tmp_path, padding_side, max_tiles):
    emb = embedder(tiny, max_tiles=max_tiles, padding_side=padding_side)
    batch = rows(image_dir)
    plain = ProcessorInputs(emb)
    for side in ("query", "candidate"):
        want = emb.prepare([{**r, "image": _bytes_cell(r["image"])} for r in batch], side)
        assert set(want) == {"input_ids", "attention_mask", "pixel_values"}
        if max_tiles > 1:
            assert want["pixel_values"].shape[0] > 4  # the 24 x 16 and 16 x 40 images take several tiles
        cold = CachedInputs(emb, InputCache(tmp_path / "cache", emb.processor, emb.max_tiles))
        assert_same(cold.embed(batch, side), want)  # made by the processor, entry by entry
        cold.close()
        warm = CachedInputs(emb, InputCache(tmp_path / "cache", emb.processor, emb.max_tiles))
        assert_same(warm.embed(batch, side), want)  # read back from the shard
        assert warm.cache.misses == 0 and warm.cache.hits > 0
        assert_same(plain.embed(batch, side), want)
        for only in ([batch[1]], [batch[0]], batch[2:4]):  # text only, image only, mixed
            assert_same(
                warm.embed(only, side),
                emb.prepare([{**r, "image": _bytes_cell(r["image"])} for r in only], side),
            )


@pytest.mark.parametrize("max_tiles", [1, 4], ids=["one-tile", "dynamic-tiling"])
@pytest.mark.parametrize("expansion", [None, True, False], ids=["checked", "tokenizer", "stand-ins"])
def test_ids_of_prompts_over_cached_images_equal_the_processor(
    tiny, image_dir, tmp_path, max_tiles, expansion
):
    """Pixels cached, prompts new (stage 2 after stage 1 on the same images): the ids come from the
    tokenizer with the processor's expansion, or from the processor over blank stand-ins."""
    emb = embedder(tiny, max_tiles=max_tiles)
    batch = rows(image_dir)
    cache = InputCache(tmp_path / "cache", emb.processor, max_tiles)
    CachedInputs(emb, cache).embed(batch, "query")  # images and query prompts
    inputs = CachedInputs(emb, cache)
    inputs._expansion_matches = expansion
    misses = cache.misses
    got = inputs.embed(batch, "candidate")
    assert cache.misses - misses == 4  # new prompts (an image alone reads the same on both sides), no image
    assert_same(got, emb.prepare([{**r, "image": _bytes_cell(r["image"])} for r in batch], "candidate"))
    assert inputs._expansion_matches is (expansion if expansion is not None else True)


def test_cached_next_token_batches_equal_build_batch(tiny, image_dir, tmp_path):
    """Stage 1's samples (image + question -> answer, text -> text) and the reranker's (two images
    in one prompt, no end-of-turn token) give build_batch's tensors, labels included."""
    emb = embedder(tiny)
    q_img = {"instruction": None, "text": "what colour is it?", "image": image_dir["a"], "task": "vqa"}
    doc_img = {"instruction": None, "text": None, "image": image_dir["b"]}
    doc_txt = {"instruction": None, "text": "red", "image": None}
    samples = [
        sample_from_input({"image": image_dir["a"], "text": "what colour is it?"}, "red"),
        sample_from_input({"image": None, "text": "a red square"}, "a blue circle"),
        reranker_sample(None, q_img, doc_img, True),
        reranker_sample(None, q_img, doc_txt, False),
    ]
    readable = [type(s)(s.parts, [_bytes_cell(i) for i in s.images], s.target) for s in samples]
    assert len(readable[2].images) == 2
    for end_of_turn in (True, False):
        want = build_batch(emb, readable, end_of_turn=end_of_turn)
        for _ in range(2):  # cold, then from the shard
            inputs = CachedInputs(emb, InputCache(tmp_path / "cache", emb.processor, emb.max_tiles))
            assert_same(inputs.generative(samples, end_of_turn), want)
            inputs.close()
        assert_same(ProcessorInputs(emb).generative(samples, end_of_turn), want)


def _bytes_cell(cell):
    if cell is None:
        return None
    return {"bytes": cell["bytes"] or Path(cell["path"]).read_bytes(), "path": None}


# ---------------------------------------------------------------- keys


def test_the_key_changes_with_the_processor_and_nothing_else(tiny, tmp_path):
    model, processor = tiny
    base = processor_key(processor, 1)[0]
    assert processor_key(processor, 1)[0] == base  # stable
    processor.save_pretrained(tmp_path / "p")
    from assay.training.model import EmbedderProcessor

    reloaded = EmbedderProcessor.from_dir(tmp_path / "p")
    assert processor_key(reloaded, 1)[0] == base  # the same processor read back: the same entries
    assert processor_key(processor, 4)[0] != base  # dynamic tiling
    emb = embedder(tiny, tokens_per_tile=64)
    assert processor_key(emb.processor, 1)[0] != base  # tokens per tile
    emb.set_tokens_per_tile(16)
    other_size = build_tiny(
        TEXTS, tokens_per_tile=16, image_size=32, patch_size=2, hidden_size=32, num_layers=1
    )
    assert processor_key(other_size[1], 1)[0] != base  # tile size
    other_vocab = build_tiny(TEXTS + ["a new word"], tokens_per_tile=16, image_size=16, patch_size=1)
    assert processor_key(other_vocab[1], 1)[0] != base  # tokenizer


def test_another_tokens_per_tile_never_reads_the_entries_of_the_first(tiny, image_dir, tmp_path):
    batch = rows(image_dir)
    first = embedder(tiny, tokens_per_tile=16)
    inputs = CachedInputs(first, InputCache(tmp_path / "cache", first.processor, 1))
    inputs.embed(batch, "query")
    inputs.close()
    second = embedder(tiny, tokens_per_tile=64)
    cache = InputCache(tmp_path / "cache", second.processor, 1)
    assert len(cache) == 0 and cache.directory != inputs.cache.directory
    got = CachedInputs(second, cache).embed(batch, "query")
    assert_same(got, second.prepare([{**r, "image": _bytes_cell(r["image"])} for r in batch], "query"))
    first.set_tokens_per_tile(16)


def test_a_file_replaced_under_the_same_name_is_a_new_entry(tiny, image_dir, tmp_path):
    emb = embedder(tiny)
    row = [{"instruction": None, "text": "red", "image": image_dir["a"]}]
    first = CachedInputs(emb, InputCache(tmp_path / "cache", emb.processor, 1))
    before = first.embed(row, "query")["pixel_values"]
    first.close()
    Path(image_dir["a"]["path"]).write_bytes(png((10, 250, 10), (24, 16)))
    after = CachedInputs(emb, InputCache(tmp_path / "cache", emb.processor, 1)).embed(row, "query")
    assert not torch.equal(before, after["pixel_values"])
    assert torch.equal(
        after["pixel_values"],
        emb.prepare([{**row[0], "image": _bytes_cell(row[0]["image"])}], "query")["pixel_values"],
    )


# ---------------------------------------------------------------- damaged caches


def _filled(emb, image_dir, directory) -> tuple[Path, dict]:
    inputs = CachedInputs(emb, InputCache(directory, emb.processor, 1))
    want = inputs.embed(rows(image_dir), "query")
    inputs.close()
    (shard,) = inputs.cache.directory.glob("shard-*.safetensors")
    return shard, want


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "flipped pixel bytes", "empty"])
def test_a_damaged_shard_is_deleted_and_rebuilt_not_trusted(tiny, image_dir, tmp_path, damage, caplog):
    emb = embedder(tiny)
    shard, want = _filled(emb, image_dir, tmp_path / "cache")
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage header":
        data[8:40] = b"x" * 32
    elif damage == "flipped pixel bytes":
        data[-200] ^= 0xFF  # pixels are stored first, ids last: this lands in the ids or the pixels
        data[-4000] ^= 0xFF
    else:
        data = bytearray()
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="assay.training.input_cache"):
        inputs = CachedInputs(emb, InputCache(tmp_path / "cache", emb.processor, 1))
        got = inputs.embed(rows(image_dir), "query")
    assert_same(got, want)  # prepared again, not read from the damaged bytes
    assert not shard.exists()
    assert "damaged" in caplog.text
    inputs.close()
    (rebuilt,) = inputs.cache.directory.glob("shard-*.safetensors")
    assert_same(
        CachedInputs(emb, InputCache(tmp_path / "cache", emb.processor, 1)).embed(rows(image_dir), "query"),
        want,
    )
    assert rebuilt != shard


def test_a_shard_a_killed_writer_left_half_written_is_never_read(tiny, image_dir, tmp_path):
    """Shards are written under a temporary name and renamed: a kill leaves a ``.tmp-`` file, which
    no reader opens and the next run past an hour deletes."""
    emb = embedder(tiny)
    shard, want = _filled(emb, image_dir, tmp_path / "cache")
    old = shard.with_name(f".tmp-{shard.name}.999")
    old.write_bytes(shard.read_bytes()[:100])
    os.utime(old, (1, 1))
    fresh = shard.with_name(".tmp-shard-0.safetensors.998")
    fresh.write_bytes(b"half")
    cache = InputCache(tmp_path / "cache", emb.processor, 1)
    assert not old.exists() and fresh.exists()  # a live writer's file is left alone
    assert_same(CachedInputs(emb, cache).embed(rows(image_dir), "query"), want)
    assert cache.misses == 0


def test_an_unwritable_cache_warns_once_and_training_inputs_still_come(tiny, image_dir, tmp_path, caplog):
    emb = embedder(tiny)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="assay.training.input_cache"):
        inputs = CachedInputs(emb, InputCache(blocker, emb.processor, 1))
        got = inputs.embed(rows(image_dir), "query")
        inputs.close()
    assert_same(got, ProcessorInputs(emb).embed(rows(image_dir), "query"))
    assert "cannot write" in caplog.text


# ---------------------------------------------------------------- confinement


def _path_dataset(tmp_path: Path, image_path: str) -> Path:
    """A dataset whose one query's image is ``image_path`` under the data root ``tmp_path/data``."""
    data_root = tmp_path / "data"
    (data_root / "img").mkdir(parents=True, exist_ok=True)
    (data_root / "img" / "ok.png").write_bytes(png((200, 0, 0)))
    query = {
        "query_id": "q",
        "subset": "s",
        "text": "what colour?",
        "image": {"bytes": None, "path": image_path},
    }
    write_dataset(
        tmp_path / "ds",
        {
            "queries": [query],
            "corpus": [{"doc_id": "d", "subset": "s", "text": "red"}],
            "pairs": [{"query_id": "q", "doc_id": "d", "label": "positive"}],
        },
        data_root=str(data_root),
    )
    return tmp_path / "ds"


@pytest.mark.parametrize("path", ["../outside.png", "img/../../outside.png", "/etc/hostname"])
def test_paths_that_leave_the_root_on_paper_are_refused_at_load(tmp_path, path):
    (tmp_path / "outside.png").write_bytes(png((0, 0, 0)))
    with pytest.raises(TrainingDataError, match="outside the data root"):
        TrainingData.load([str(_path_dataset(tmp_path, path))])


def test_a_symlink_out_of_the_root_is_refused_when_first_read(tiny, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png((1, 2, 3)))
    ds = _path_dataset(tmp_path, "img/link.png")
    os.symlink(secret, tmp_path / "data" / "img" / "link.png")
    data = TrainingData.load([str(ds)])  # lexically inside: loading stays cheap
    emb = embedder(tiny)
    for inputs in (CachedInputs(emb, InputCache(tmp_path / "cache", emb.processor, 1)), ProcessorInputs(emb)):
        with pytest.raises(TrainingDataError, match="outside the data root"):
            inputs.embed(data.queries, "query")
    # a symlinked directory on the way out is refused the same way
    (tmp_path / "b" / "data" / "img").mkdir(parents=True)
    os.symlink(tmp_path, tmp_path / "b" / "data" / "img" / "up")
    data = TrainingData.load([str(_path_dataset(tmp_path / "b", "img/up/secret.png"))])
    with pytest.raises(TrainingDataError, match="outside the data root"):
        CachedInputs(emb, InputCache(tmp_path / "cache", emb.processor, 1)).embed(data.queries, "query")


def test_loading_resolves_the_data_root_once_not_every_path(tmp_path, monkeypatch):
    ds = _path_dataset(tmp_path, "img/ok.png")
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    data = TrainingData.load([str(ds)])
    assert len(calls) == 1  # the root; the image path is checked when first read
    assert data.queries[0]["image"]["path"].endswith("img/ok.png")


# ---------------------------------------------------------------- the input thread


def test_the_prefetcher_hands_steps_in_order_and_raises_the_producers_error_in_the_caller():
    made = []

    def produce(step):
        made.append(step)
        if step == 5:
            raise TrainingDataError("step 6 has a bad image")
        return step * 10

    fetch = Prefetcher(produce, range(2, 8), depth=2)
    assert [fetch.get(s) for s in range(2, 5)] == [20, 30, 40]
    with pytest.raises(TrainingDataError, match="bad image"):
        fetch.get(5)
    fetch.close()
    assert made == [2, 3, 4, 5]
