"""The transformers judge backend on a tiny InternVL: the numbers a full forward pass gives, in batches."""

from __future__ import annotations

import pytest
import torch
from helpers.colours import COLOURS, TINY, png

from curation.judge.hf import TransformersScorer
from curation.judge.prompts import images_of, load_prompt, render
from curation.judge.scoring import JudgeItem, label_token_ids
from training.tiny import build_tiny

SETTINGS = {k: v for k, v in TINY.items() if k != "seed"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = ["What colour is it?", "a red image", *COLOURS]
    model, processor = build_tiny(texts, tokens_per_tile=64, seed=3, **SETTINGS)  # 64 = vanilla here
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor, path


def _items():
    vqa, retrieval = load_prompt("vqa"), load_prompt("retrieval")
    items = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        query = {"text": "What colour is it?" + " really" * i, "image": {"bytes": png(rgb), "path": None}}
        for answer in ("red", "a much longer answer " * (i + 1)):
            doc = {"text": answer, "image": None}
            items.append(JudgeItem(render(vqa, query, doc), images_of(query, doc)))
        q2, d2 = (
            {"text": f"a {name} image", "image": None},
            {"text": None, "image": {"bytes": png(rgb), "path": None}},
        )
        items.append(JudgeItem(render(retrieval, q2, d2), images_of(q2, d2)))
        q3, d3 = {"text": f"a {name} thing", "image": None}, {"text": name * (i + 1), "image": None}
        items.append(JudgeItem(render(retrieval, q3, d3), images_of(q3, d3)))  # text only
    return items


def _reference(model, processor, item):
    """softmax over the two label logits of one unpadded prompt's full-vocabulary logits."""
    from curation.judge.hf import load_pil, prompt_text

    text = prompt_text(processor, item.parts)
    kw = {"images": [load_pil(i) for i in item.images]} if item.images else {}
    enc = processor(text=[text], return_tensors="pt", **kw)
    with torch.no_grad():
        logits = model(**enc).logits[0, -1]
    yes, no = label_token_ids(processor.tokenizer, item.labels)
    return float(torch.softmax(logits[[yes, no]].double(), 0)[0])


def test_batched_scores_equal_one_unpadded_forward_each(tiny):
    model, processor, _ = tiny
    items = _items()
    scores = TransformersScorer(model, processor, model_id="t", batch_size=5).score(items)
    assert all(s.ok for s in scores)
    ref = [_reference(model, processor, it) for it in items]
    assert [s.p_yes for s in scores] == pytest.approx(ref, abs=1e-5)
    assert max(ref) - min(ref) > 1e-4  # the scores differ from pair to pair: the comparison means something


def test_batch_size_does_not_change_scores(tiny):
    model, processor, _ = tiny
    items = _items()
    one = [s.p_yes for s in TransformersScorer(model, processor, model_id="t", batch_size=1).score(items)]
    many = [s.p_yes for s in TransformersScorer(model, processor, model_id="t", batch_size=16).score(items)]
    assert many == pytest.approx(one, abs=1e-5)


def test_a_broken_image_fails_alone(tiny):
    model, processor, _ = tiny
    items = _items()[:4]
    broken = JudgeItem(items[0].parts, [{"bytes": b"not an image", "path": None}])
    scores = TransformersScorer(model, processor, model_id="t", batch_size=8).score([*items, broken])
    assert [s.ok for s in scores] == [True, True, True, True, False]
    assert "UnidentifiedImageError" in scores[-1].error or "cannot identify" in scores[-1].error


def test_from_pretrained_refuses_a_vlm_without_its_image_processor(tiny):
    # An assay checkpoint's processor class is assay's own: AutoProcessor falls back to the bare
    # tokenizer, which would silently score image prompts without their pixels. It is refused instead.
    _, _, path = tiny
    with pytest.raises(ValueError, match="no image processor"):
        TransformersScorer.from_pretrained(path)
