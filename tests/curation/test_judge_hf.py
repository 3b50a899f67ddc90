"""The transformers judge backend on a tiny InternVL: the numbers a full forward pass gives, in batches."""

from __future__ import annotations

import pytest
import torch
from helpers.colours import COLOURS, TINY, png

from assay.curation.judge.hf import TransformersScorer
from assay.curation.judge.prompts import images_of, load_prompt, render
from assay.curation.judge.scoring import JudgeItem, label_token_ids
from assay.training.tiny import build_tiny

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
    from assay.curation.judge.hf import prompt_text
    from assay.curation.schema import load_image

    text = prompt_text(processor, item.parts)
    kw = {"images": [load_image(i) for i in item.images]} if item.images else {}
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


# -- shared query prefixes


def _mined(n_queries=3, per_query=7):
    """What a judge is given after mining: each query image + question with several candidates;
    one query's candidates carry images (the suffix then has an image of its own)."""
    vqa, retrieval = load_prompt("vqa"), load_prompt("retrieval")
    names = list(COLOURS)
    items = []
    for q in range(n_queries):
        rgb = COLOURS[names[q]]
        query = {"text": f"What colour is it? {q}", "image": {"bytes": png(rgb), "path": None}}
        for c in range(per_query):
            doc = {"text": f"{names[(q + c) % len(names)]} " * (1 + c % 3), "image": None}
            items.append(JudgeItem(render(vqa, query, doc), images_of(query, doc)))
    query = {"text": "the same picture", "image": {"bytes": png(COLOURS[names[0]]), "path": None}}
    for c in range(4):
        doc = {
            "text": f"candidate {c}",
            "image": {"bytes": png(COLOURS[names[(c + 1) % len(names)]]), "path": None},
        }
        items.append(JudgeItem(render(retrieval, query, doc), images_of(query, doc)))
    return items


@pytest.mark.parametrize("batch_size", [3, 64])
def test_shared_query_prefixes_give_the_plain_paths_scores(tiny, batch_size, monkeypatch):
    model, processor, _ = tiny
    items = _mined()
    plain = TransformersScorer(model, processor, model_id="t", batch_size=batch_size, prefix_sharing=False)
    shared = TransformersScorer(model, processor, model_id="t", batch_size=batch_size)
    assert shared.prefix_sharing
    calls = []
    original = TransformersScorer._forward_shared

    def spy(self, items_, texts, groups):
        out = original(self, items_, texts, groups)
        calls.append(None if out is None else sum(len(g.members) for g in groups))
        return out

    monkeypatch.setattr(TransformersScorer, "_forward_shared", spy)
    want = [s.p_yes for s in plain.score(items)]
    got = shared.score(items)
    assert all(s.ok for s in got)
    assert [s.p_yes for s in got] == pytest.approx(want, abs=1e-5)
    assert max(want) - min(want) > 1e-4
    assert None not in calls and sum(calls) == len(items)  # every item went through a shared prefix


def test_the_same_prompt_text_with_different_images_is_not_shared(tiny):
    model, processor, _ = tiny
    vqa = load_prompt("vqa")
    items = []
    for rgb in list(COLOURS.values())[:3]:
        query = {"text": "What colour is it?", "image": {"bytes": png(rgb), "path": None}}
        for answer in ("red", "blue"):
            doc = {"text": answer, "image": None}
            items.append(JudgeItem(render(vqa, query, doc), images_of(query, doc)))
    shared = TransformersScorer(model, processor, model_id="t", batch_size=64)
    got = [s.p_yes for s in shared.score(items)]
    want = [_reference(model, processor, it) for it in items]
    assert got == pytest.approx(want, abs=1e-5)
    assert abs(got[0] - got[2]) > 1e-6  # same text, different image: different scores


def test_a_cut_that_tokenises_differently_turns_prefix_sharing_off(tiny):
    from assay.curation.judge.hf import prompt_text
    from assay.curation.schema import load_image

    model, processor, _ = tiny
    item = _mined()[0]
    text = prompt_text(processor, item.parts)
    scorer = TransformersScorer(model, processor, model_id="t")
    # a cut inside a token: the prefix alone tokenises to something that does not start the whole
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = next(
        c
        for c in range(text.index("colour"), len(text))
        if (pre := processor.tokenizer(text[:c], add_special_tokens=False)["input_ids"]) != ids[: len(pre)]
    )
    assert not scorer._check_tokenisation(text, text[:cut], [load_image(i) for i in item.images])
    assert not scorer.prefix_sharing
    assert [s.ok for s in scorer.score(_mined())] == [True] * len(_mined())


def test_prefix_sharing_is_refused_for_a_model_that_cannot_take_it():
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(model_type="qwen2_vl"))
    processor = SimpleNamespace(image_token="<|image_pad|>", tokenizer=None)
    with pytest.raises(ValueError, match="prefix sharing"):
        TransformersScorer(model, processor, model_id="t", prefix_sharing=True)
    assert not TransformersScorer(model, processor, model_id="t").prefix_sharing
