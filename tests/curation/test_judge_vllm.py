"""The vLLM judge backend against the transformers one, on a tiny random Qwen2-VL (both float32).

Runs only where vLLM is installed (``make test-vllm`` builds ``.venv-vllm`` with the CPU build);
elsewhere the module is skipped. Both backends load the same directory and render each item with the
same chat template call, so they score the same token sequences and must give the same p_yes.
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in process: starts in seconds

from assay.curation.judge.hf import TransformersScorer  # noqa: E402
from assay.curation.judge.prompts import images_of, load_prompt, render  # noqa: E402
from assay.curation.judge.scoring import JudgeItem  # noqa: E402
from assay.curation.judge.vllm_backend import VLLMJudgeActor, VLLMScorer  # noqa: E402
from assay.training.tiny_qwen2vl import build_tiny_qwen2vl  # noqa: E402

ENGINE = {"dtype": "float32", "max_model_len": 2048, "kv_cache_memory_bytes": 256 * 1024**2}
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 30)}
SHAPES = ("circle", "square", "triangle")
#: Sizes on and off the 28 px grid, below and above the processor's 56..112 px budget.
SIZES = ((56, 56), (84, 56), (112, 112), (40, 64), (150, 90), (64, 64))


def _picture(colour: str, shape: str, size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(w // 2, h // 5), (w // 5, 4 * h // 5), (4 * w // 5, 4 * h // 5)], fill=COLOURS[colour])
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _items() -> list[JudgeItem]:
    items = []
    names = list(COLOURS)
    # Plain image questions: PIL images of several sizes, as PIL, bytes and {bytes, path} cells.
    for i in range(9):
        colour, shape, size = names[i % 4], SHAPES[i % 3], SIZES[i % len(SIZES)]
        img = _picture(colour, shape, size)
        image = [img, _png(img), {"bytes": _png(img), "path": None}][i % 3]
        asked = names[(i * 3) % 4]
        parts = [{"type": "image"}, {"type": "text", "text": f"Is the {shape} {asked}? Answer yes or no."}]
        items.append(JudgeItem(parts, [image]))
    # Two images in one prompt.
    for i in range(2):
        a, b = _picture(names[i], "circle", (56, 56)), _picture(names[i + 1], "square", (84, 84))
        parts = [
            {"type": "text", "text": "First picture:"},
            {"type": "image"},
            {"type": "text", "text": "Second picture:"},
            {"type": "image"},
            {"type": "text", "text": "Do they show the same colour?"},
        ]
        items.append(JudgeItem(parts, [a, b]))
    # Text only.
    for i, colour in enumerate(names):
        parts = [{"type": "text", "text": f"Is {colour} the colour of the sky?" + " Think." * i}]
        items.append(JudgeItem(parts))
    # The shipped vqa template, image queries and text answers, and a text-only pair.
    vqa = load_prompt("vqa")
    for i, colour in enumerate(names):
        query = {
            "text": "What colour is the shape?",
            "image": {"bytes": _png(_picture(colour, SHAPES[i % 3], SIZES[i])), "path": None},
        }
        for answer in (colour, names[(i + 1) % 4] + " shape, quite certainly"):
            doc = {"text": answer, "image": None}
            items.append(JudgeItem(render(vqa, query, doc), images_of(query, doc)))
    q, d = {"text": "What is the colour of grass?", "image": None}, {"text": "green", "image": None}
    items.append(JudgeItem(render(vqa, q, d), images_of(q, d)))
    return items


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"), texts=list(COLOURS), seed=1)


@pytest.fixture(scope="module")
def hf_scores(tiny_dir):
    hf = TransformersScorer.from_pretrained(tiny_dir, batch_size=8)  # left padding across lengths
    scores = hf.score(_items())
    assert all(s.ok for s in scores), [s.error for s in scores if not s.ok]
    return hf.model_id, scores


#: p_yes per prefix-caching setting, for the on/off comparison (the "on" engine runs first).
_P_YES: dict[bool, list[float]] = {}


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-cache", "no-prefix-cache"])
def vllm_scorer(request, tiny_dir):
    """One engine at a time: vLLM's in-process engine keeps process-wide state that closing resets."""
    with VLLMScorer(tiny_dir, enable_prefix_caching=request.param, **ENGINE) as scorer:
        yield scorer


def test_vllm_matches_transformers(vllm_scorer, hf_scores):
    items = _items()
    assert len(items) >= 24
    model_id, ref = hf_scores
    assert vllm_scorer.model_id == model_id
    got = vllm_scorer.score(items)
    assert all(s.ok for s in got), [s.error for s in got if not s.ok]
    p_ref, p_got = [s.p_yes for s in ref], [s.p_yes for s in got]
    assert p_got == pytest.approx(p_ref, abs=1e-3)
    # The scores differ from item to item, so the comparison means something.
    assert max(p_ref) - min(p_ref) > 1e-2


def test_prefix_caching_does_not_change_scores(vllm_scorer):
    items = _items()
    first = [s.p_yes for s in vllm_scorer.score(items)]
    again = [s.p_yes for s in vllm_scorer.score(items)]  # with caching on: served from the prefix cache
    assert again == pytest.approx(first, abs=1e-6)
    caching = vllm_scorer.enable_prefix_caching
    _P_YES[caching] = first
    if caching:
        return
    if True not in _P_YES:
        pytest.skip("the prefix-caching engine did not run in this session")
    assert _P_YES[False] == pytest.approx(_P_YES[True], abs=1e-5)


def test_a_broken_item_fails_alone(vllm_scorer):
    items = _items()[:5]
    broken = JudgeItem(items[0].parts, [{"bytes": b"not an image", "path": None}])
    too_long = JudgeItem([{"type": "text", "text": "yes no " * 3000}])
    scores = vllm_scorer.score([items[0], broken, *items[1:], too_long])
    assert not scores[1].ok and "Image" in scores[1].error
    assert not scores[-1].ok
    good = [s for i, s in enumerate(scores) if i not in (1, len(scores) - 1)]
    assert all(s.ok for s in good)
    assert [s.p_yes for s in good] == pytest.approx([s.p_yes for s in vllm_scorer.score(items)], abs=1e-6)


def test_ray_actor_batch(vllm_scorer):
    items = _items()[:6]
    actor = VLLMJudgeActor.__new__(VLLMJudgeActor)  # reuse the module's engine instead of a second one
    actor.scorer = vllm_scorer
    to_bytes = [
        [
            im if isinstance(im, bytes) else _png(im) if isinstance(im, Image.Image) else im["bytes"]
            for im in it.images
        ]
        or None
        for it in items
    ]
    batch = {
        "pair_id": np.arange(len(items) + 1),
        "parts_json": np.array([json.dumps(it.parts) for it in items] + ["not json"], dtype=object),
        "images": np.array([*to_bytes, None], dtype=object),
        "labels_json": np.array([json.dumps(list(it.labels)) for it in items] + [None], dtype=object),
    }
    out = actor(batch)
    assert list(out["pair_id"]) == list(range(len(items) + 1))
    expected = [s.margin for s in vllm_scorer.score(items)]
    assert out["margin"][:-1] == pytest.approx(expected, abs=1e-6)
    assert list(out["error"][:-1]) == [None] * len(items)
    assert np.isnan(out["margin"][-1]) and out["error"][-1].startswith("bad row")


def test_missing_vllm_names_the_extra(monkeypatch, tiny_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="gpu` extra"):
        VLLMScorer(tiny_dir)
