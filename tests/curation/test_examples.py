"""The easy-vqa example's captions subset: one labelled image per caption, the truth beside the splits.

(The example's other subsets, resumption and package counts are tested in test_ingest.py.)"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from assay.curation.dataset import Dataset, DatasetError
from assay.curation.examples_captions import Caption, Look, captions_of, label_captions
from assay.curation.truth import read_truth

pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    from assay.curation.examples import ingest_easy_vqa

    out = tmp_path_factory.mktemp("easy-vqa")
    ingest_easy_vqa(out)
    return out


def rows(ds: Dataset, table: str, columns: list[str]) -> list[dict]:
    return [r for b in ds.iter_batches(table, columns=columns) for r in b.to_pylist()]


def captions_of_split(out, split):
    ds = Dataset(out / split)
    queries = {r["query_id"]: r for r in rows(ds, "queries", ["query_id", "subset", "task", "text"])}
    captions = {q: r for q, r in queries.items() if r["subset"] == "captions"}
    pairs = [r for r in rows(ds, "pairs", ["query_id", "doc_id", "label"]) if r["query_id"] in captions]
    corpus = {r["doc_id"] for r in rows(ds, "corpus", ["doc_id", "subset"]) if r["subset"] == "captions"}
    return ds, captions, pairs, corpus


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_have_one_labelled_image_and_the_truth_has_the_rest(example, split):
    ds, captions, pairs, corpus = captions_of_split(example, split)
    figures = ds.manifest.extra["captions"]
    assert len(captions) == figures["queries"] and len(corpus) == figures["corpus"]
    assert {r["task"] for r in captions.values()} == {"retrieval"}
    # exactly one labelled positive per caption, and the labelled images are the corpus
    per_query = collections.Counter(p["query_id"] for p in pairs)
    assert set(per_query) == set(captions) and set(per_query.values()) == {1}
    assert {p["label"] for p in pairs} == {"positive"} and {p["doc_id"] for p in pairs} == corpus
    # the truth: every labelled pair, plus unlabelled matches for most captions
    truth = read_truth(example / "truth" / f"{split}.parquet")
    assert truth.complete and ds.manifest.extra["truth"] == f"../truth/{split}.parquet"
    assert all(truth.relevant(p["query_id"], p["doc_id"]) for p in pairs)
    matches = np.array([len(truth.matches[q]) for q in captions])
    assert all(truth.matches[q] <= corpus for q in captions)
    assert matches.mean() == pytest.approx(figures["matches_per_query"]["mean"], abs=1e-3)
    assert (matches > 1).sum() == figures["queries_with_unlabelled_matches"] > len(captions) / 2
    # the fully labelled subsets: the truth is their gold, no more
    gold = {(r["query_id"], r["doc_id"]) for r in rows(ds, "pairs", ["query_id", "doc_id"])}
    assert sum(len(v) for v in truth.matches.values()) == len(gold) - len(pairs) + matches.sum()


def test_a_caption_matches_the_images_of_more_specific_captions():
    look = Look("red", "circle", "small", "left", "top")
    texts = sorted(c.text() for c in captions_of(look))
    assert texts == [
        "a red circle at the top",
        "a red circle in the top left corner",
        "a red circle on the left",
        "a small red circle",
        "a small red circle at the top",
        "a small red circle in the top left corner",
        "a small red circle on the left",
    ]
    assert Caption("red", "circle", size="small").matches(look)
    assert not Caption("red", "circle", across="right").matches(look)
    # each caption gets its own image while one is free; the general one then shares
    looks = {1: look, 2: Look("red", "circle", "small", "right", "middle")}
    labelled = label_captions(looks)
    assert labelled[Caption("red", "circle", "small", "left", "top")] == 1
    assert labelled[Caption("red", "circle", across="right")] == 2
    assert set(labelled.values()) == {1, 2}


def test_training_cannot_read_the_truth(example):
    """TrainingData.load reads the datasets a config names: the labelled pairs, never the truth."""
    from assay.training.data import TrainingData

    ds, captions, pairs, _ = captions_of_split(example, "train")
    data = TrainingData.load([str(example / "train")], subsets=["captions"])
    positives = {
        data.queries[q]["query_id"]: [data.corpus[d]["doc_id"] for d in ds_]
        for q, ds_ in data.positives.items()
    }
    assert positives == {p["query_id"]: [p["doc_id"]] for p in pairs}
    assert not data.false_negatives
    with pytest.raises(DatasetError):  # the truth folder is no dataset: it cannot be named as one
        TrainingData.load([str(example / "truth")])


def test_eval_with_the_example_truth_counts_every_matching_image(example):
    """An encoder that knows the truth puts a true match first for every caption: P@1 is 1 against
    the truth, and far lower against the single labels (the first match is often not the labelled one)."""
    from assay.training.evaluate import evaluate

    ds, captions, _, corpus = captions_of_split(example, "test")
    truth = read_truth(example / "truth" / "test.parquet")
    column = {d: i for i, d in enumerate(sorted(corpus))}

    def encode_candidates(batch):
        return np.eye(len(column), dtype=np.float32)[[column[r["doc_id"]] for r in batch]]

    def encode_queries(batch):  # the mean of the caption's matches: all of them tie for first
        out = np.zeros((len(batch), len(column)), np.float32)
        for i, r in enumerate(batch):
            out[i, [column[d] for d in truth.matches[r["query_id"]]]] = 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    kw = {"subsets": ["captions"], "batch_size": 256}
    labelled = evaluate(ds, encode_queries, encode_candidates, **kw)["per_subset"]["captions"]
    true = evaluate(ds, encode_queries, encode_candidates, truth=truth, **kw)["per_subset"]["captions"]
    assert true["p_at_1"] == 1.0 and true["ndcg@10"] == pytest.approx(1.0)
    assert labelled["p_at_1"] < 0.6 and labelled["positives_per_query"] == 1.0
    assert true["positives_per_query"] == pytest.approx(
        ds.manifest.extra["captions"]["matches_per_query"]["mean"], abs=1e-3
    )
