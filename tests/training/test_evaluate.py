"""evaluate: P@1 against each query's candidate set (MMEB), Recall@k and nDCG@10, with fake encoders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from assay.curation.dataset import write_dataset
from assay.training.evaluate import evaluate, write_metrics

DIM = 32


def q(qid, subset, task="classification", text=None, image=None):
    return {"query_id": qid, "subset": subset, "task": task, "text": text or qid, "image": image}


def d(did, subset, text=None, image=None):
    return {"doc_id": did, "subset": subset, "text": text or did, "image": image}


def p(qid, did, label="positive"):
    return {"query_id": qid, "doc_id": did, "label": label}


def unit(i, dim=DIM):
    v = np.zeros(dim, np.float32)
    v[i] = 1.0
    return v


class Lookup:
    """A fake encoder: each row's vector from a table by id; records every call."""

    def __init__(self, vectors: dict[str, np.ndarray], key: str):
        self.vectors = vectors
        self.key = key
        self.calls: list[list[dict]] = []

    def __call__(self, rows):
        self.calls.append(rows)
        return np.stack([self.vectors[r[self.key]] for r in rows])

    @property
    def ids(self):
        return [r[self.key] for rows in self.calls for r in rows]


def encoders(qvec, dvec):
    return Lookup(qvec, "query_id"), Lookup(dvec, "doc_id")


@pytest.fixture
def small(tmp_path):
    """One classification subset (pair candidates) and one retrieval subset (whole corpus)."""
    queries = [q(f"c{i}", "cls") for i in range(4)] + [q(f"r{i}", "ret", "retrieval") for i in range(3)]
    corpus = [d(f"cd{j}", "cls") for j in range(6)] + [d(f"rd{j}", "ret") for j in range(12)]
    pairs = []
    for i in range(4):  # each cls query: its positive cd{i} and two negatives
        pairs += [p(f"c{i}", f"cd{i}"), p(f"c{i}", f"cd{(i + 1) % 6}", "negative")]
        pairs.append(p(f"c{i}", f"cd{(i + 2) % 6}", "hard_negative"))
    for i in range(3):
        pairs.append(p(f"r{i}", f"rd{i}"))
    ds = write_dataset(tmp_path / "ds", {"queries": queries, "corpus": corpus, "pairs": pairs})
    docs = [r["doc_id"] for r in corpus]
    dvec = {did: unit(j) for j, did in enumerate(docs)}
    positive = {f"c{i}": f"cd{i}" for i in range(4)} | {f"r{i}": f"rd{i}" for i in range(3)}
    return ds, dvec, positive


def test_perfect_encoder_scores_one(small):
    ds, dvec, positive = small
    qvec = {qid: dvec[did] for qid, did in positive.items()}
    m = evaluate(ds, *encoders(qvec, dvec), batch_size=2)
    assert m["overall"]["p_at_1"] == 1.0
    assert m["overall"]["queries"] == 7
    cls, ret = m["per_subset"]["cls"], m["per_subset"]["ret"]
    assert cls["p_at_1"] == 1.0 and cls["task"] == "classification" and cls["queries"] == 4
    assert cls["candidates_per_query"] == 3.0
    assert "ndcg@10" not in cls and "recall@1" not in cls
    assert ret["p_at_1"] == 1.0 and ret["ndcg@10"] == pytest.approx(1.0)
    assert ret["recall@1"] == ret["recall@5"] == ret["recall@10"] == 1.0
    # a retrieval query with one pair ranks against the whole subset corpus
    assert ret["candidates_per_query"] == 12.0
    assert m["chance_p_at_1"] == {"cls": pytest.approx(1 / 3), "ret": pytest.approx(1 / 12)}
    assert m["per_task"] == {
        "classification": {"p_at_1": 1.0, "subsets": 1},
        "retrieval": {"p_at_1": 1.0, "subsets": 1},
    }


def test_reversed_encoder_scores_zero(small):
    ds, dvec, positive = small
    qvec = {qid: -dvec[did] for qid, did in positive.items()}
    m = evaluate(ds, *encoders(qvec, dvec))
    assert m["overall"]["p_at_1"] == 0.0
    ret = m["per_subset"]["ret"]
    assert ret["p_at_1"] == 0.0 and ret["ndcg@10"] == 0.0
    assert ret["recall@1"] == ret["recall@5"] == ret["recall@10"] == 0.0


def test_random_encoder_is_near_chance(tmp_path):
    rng = np.random.default_rng(0)
    nq, nc = 1500, 4
    queries = [q(f"q{i}", "s") for i in range(nq)]
    corpus = [d(f"d{i}_{j}", "s") for i in range(nq) for j in range(nc)]
    pairs = [
        p(f"q{i}", f"d{i}_{j}", "positive" if j == 0 else "negative") for i in range(nq) for j in range(nc)
    ]
    ds = write_dataset(tmp_path / "ds", {"queries": queries, "corpus": corpus, "pairs": pairs})

    def rand(rows):
        v = rng.standard_normal((len(rows), DIM)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    m = evaluate(ds, rand, rand, batch_size=256)
    assert m["chance_p_at_1"]["s"] == pytest.approx(0.25)
    assert m["per_subset"]["s"]["candidates_per_query"] == 4.0
    assert abs(m["per_subset"]["s"]["p_at_1"] - 0.25) < 0.05  # sd ~0.011 at 1500 queries


def test_recall_and_ndcg_by_hand(tmp_path):
    """One query, 12 docs with fixed scores, positives ranked 1st, 3rd and 12th."""
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.1]
    order = [5, 0, 7, 2, 9, 11, 1, 3, 4, 6, 8, 10]  # corpus position of the doc of each rank
    corpus = [d(f"x{j}", "ret") for j in range(12)]
    score_of = {f"x{order[r]}": s for r, s in enumerate(scores)}
    positives = [f"x{order[0]}", f"x{order[2]}", f"x{order[11]}"]
    ds = write_dataset(
        tmp_path / "ds",
        {
            "queries": [q("q", "ret", "retrieval")],
            "corpus": corpus,
            "pairs": [p("q", did) for did in positives],
        },
    )
    dvec = {did: np.array([s, 0.0], np.float32) for did, s in score_of.items()}
    m = evaluate(ds, *encoders({"q": np.array([1.0, 0.0], np.float32)}, dvec), ks=(1, 2, 3, 5, 10))
    r = m["per_subset"]["ret"]
    assert r["recall@1"] == pytest.approx(1 / 3)
    assert r["recall@2"] == pytest.approx(1 / 3)
    assert r["recall@3"] == pytest.approx(2 / 3)
    assert r["recall@5"] == pytest.approx(2 / 3)
    assert r["recall@10"] == pytest.approx(2 / 3)
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert r["ndcg@10"] == pytest.approx(dcg / idcg)
    # the pairs name positives only: P@1 ranks the whole subset (pairs alone would make it 1 by
    # construction); the top doc is a positive, and chance is 3 positives in 12
    assert r["p_at_1"] == 1.0 and r["candidates_per_query"] == 12.0
    assert m["chance_p_at_1"]["ret"] == pytest.approx(0.25)


def test_per_task_averages_subsets_not_queries(tmp_path):
    # subset a: 4 queries, 3 right; subset b: 1 query, wrong. Both classification.
    queries = [q(f"a{i}", "a") for i in range(4)] + [q("b0", "b")]
    corpus = [d(f"ad{j}", "a") for j in range(5)] + [d("bd0", "b"), d("bd1", "b")]
    pairs = [p(f"a{i}", f"ad{i}") for i in range(4)] + [p(f"a{i}", "ad4", "negative") for i in range(4)]
    pairs += [p("b0", "bd0"), p("b0", "bd1", "negative")]
    ds = write_dataset(tmp_path / "ds", {"queries": queries, "corpus": corpus, "pairs": pairs})
    dvec = {f"ad{j}": unit(j) for j in range(5)} | {"bd0": unit(10), "bd1": unit(11)}
    qvec = {"a0": unit(0), "a1": unit(1), "a2": unit(2), "a3": unit(4), "b0": unit(11)}
    m = evaluate(ds, *encoders(qvec, dvec))
    assert m["per_subset"]["a"]["p_at_1"] == 0.75
    assert m["per_subset"]["b"]["p_at_1"] == 0.0
    assert m["per_task"]["classification"] == {"p_at_1": pytest.approx(0.375), "subsets": 2}
    assert m["overall"]["p_at_1"] == pytest.approx(0.375)  # mean over subsets (MMEB)
    assert m["overall"]["p_at_1_micro"] == pytest.approx(3 / 5)
    assert m["overall"]["queries"] == 5


def test_pair_candidates_versus_whole_subset(tmp_path):
    """q0 has a pair candidate set {pos, neg}; another doc of the subset outscores its positive.
    q1 has a single pair (its positive): it falls back to the whole subset."""
    queries = [q("q0", "s"), q("q1", "s")]
    corpus = [d("pos0", "s"), d("neg0", "s"), d("other", "s"), d("pos1", "s")]
    pairs = [p("q0", "pos0"), p("q0", "neg0", "hard_negative"), p("q1", "pos1")]
    ds = write_dataset(tmp_path / "ds", {"queries": queries, "corpus": corpus, "pairs": pairs})
    dvec = {
        "pos0": np.array([0.8, 0.6, 0, 0], np.float32),
        "neg0": np.array([0, 1, 0, 0], np.float32),
        "other": np.array([1, 0, 0, 0], np.float32),
        "pos1": np.array([0, 0, 1, 0], np.float32),
    }
    qvec = {"q0": np.array([1, 0, 0, 0], np.float32), "q1": np.array([0.6, 0, 0.8, 0], np.float32)}
    pairs_m = evaluate(ds, *encoders(qvec, dvec))
    s = pairs_m["per_subset"]["s"]
    assert s["p_at_1"] == 1.0  # q0 right among {pos0, neg0}; q1 right among all 4 (0.8 > 0.6)
    assert s["candidates_per_query"] == (2 + 4) / 2
    assert pairs_m["chance_p_at_1"]["s"] == pytest.approx((1 / 2 + 1 / 4) / 2)

    subset_m = evaluate(ds, *encoders(qvec, dvec), candidate_set="subset")
    s = subset_m["per_subset"]["s"]
    assert s["candidates_per_query"] == 4.0
    assert s["p_at_1"] == 0.5  # q0 now loses to "other"; q1 wins (0.8 > 0.6)
    assert subset_m["settings"]["candidate_set"] == "subset"


def test_pair_candidates_exact_per_query(tmp_path):
    """The same as above, one query at a time, so each verdict is pinned."""
    corpus = [d("pos0", "s"), d("neg0", "s"), d("other", "s")]
    ds = write_dataset(
        tmp_path / "ds",
        {
            "queries": [q("q0", "s")],
            "corpus": corpus,
            "pairs": [p("q0", "pos0"), p("q0", "neg0", "negative")],
        },
    )
    dvec = {"pos0": unit(0) * 0.5, "neg0": unit(1), "other": unit(0)}
    qvec = {"q0": unit(0)}
    assert evaluate(ds, *encoders(qvec, dvec))["per_subset"]["s"]["p_at_1"] == 1.0
    assert evaluate(ds, *encoders(qvec, dvec), candidate_set="subset")["per_subset"]["s"]["p_at_1"] == 0.0


def test_false_negative_is_left_out_of_the_candidates(tmp_path):
    corpus = [d("fn", "s"), d("pos", "s"), d("neg", "s")]
    base = [p("q", "pos"), p("q", "neg", "negative")]
    dvec = {"fn": unit(0), "pos": unit(0) * 0.9 + unit(1) * 0.1, "neg": unit(2)}
    qvec = {"q": unit(0)}
    as_neg = write_dataset(
        tmp_path / "a",
        {"queries": [q("q", "s", "retrieval")], "corpus": corpus, "pairs": [*base, p("q", "fn", "negative")]},
    )
    m = evaluate(as_neg, *encoders(qvec, dvec))
    assert m["per_subset"]["s"]["p_at_1"] == 0.0
    assert m["per_subset"]["s"]["candidates_per_query"] == 3.0
    assert m["per_subset"]["s"]["recall@1"] == 0.0

    as_fn = write_dataset(
        tmp_path / "b",
        {
            "queries": [q("q", "s", "retrieval")],
            "corpus": corpus,
            "pairs": [*base, p("q", "fn", "false_negative")],
        },
    )
    m = evaluate(as_fn, *encoders(qvec, dvec))
    s = m["per_subset"]["s"]
    assert s["p_at_1"] == 1.0 and s["candidates_per_query"] == 2.0
    # ... and out of the whole-corpus ranking of the retrieval metrics too
    assert s["recall@1"] == 1.0 and s["ndcg@10"] == pytest.approx(1.0)
    m = evaluate(as_fn, *encoders(qvec, dvec), candidate_set="subset")
    assert m["per_subset"]["s"]["p_at_1"] == 1.0
    assert m["per_subset"]["s"]["candidates_per_query"] == 2.0


def test_truth_counts_an_unlabelled_match_as_relevant(tmp_path):
    """Real data labels one positive per query: an encoder that ranks another true match first is
    wrong by the labels and right by the truth."""
    from assay.curation.truth import write_truth

    queries = [q("cap1", "captions", "retrieval"), q("cap2", "captions", "retrieval")]
    corpus = [d(f"img{j}", "captions") for j in range(6)]
    pairs = [p("cap1", "img0"), p("cap2", "img3")]  # one labelled image each
    ds = write_dataset(tmp_path / "ds", {"queries": queries, "corpus": corpus, "pairs": pairs})
    dvec = {f"img{j}": unit(j) for j in range(6)}
    qvec = {"cap1": unit(1), "cap2": unit(3)}  # cap1 ranks img1 first: it matches, unlabelled
    truth = write_truth(tmp_path / "truth.parquet", [("cap1", "img0"), ("cap1", "img1"), ("cap2", "img3")])

    without = evaluate(ds, *encoders(qvec, dvec))["per_subset"]["captions"]
    m = evaluate(ds, *encoders(qvec, dvec), truth=truth)
    with_truth = m["per_subset"]["captions"]
    assert without["p_at_1"] == 0.5 and with_truth["p_at_1"] == 1.0
    assert without["positives_per_query"] == 1.0 and with_truth["positives_per_query"] == 1.5
    # cap1 ranks img1 (a match), then img0, img2, ... (equal scores: corpus order)
    assert without["recall@1"] == 0.5 and with_truth["recall@1"] == 0.75 and with_truth["recall@5"] == 1.0
    assert m["counts"]["truth_matches_unlabelled"] == 1 and m["counts"]["truth_queries"] == 2
    assert m["settings"]["truth"]["kind"] == "complete"


def test_truth_decides_where_it_speaks_and_labels_where_it_is_silent(tmp_path):
    from assay.curation.truth import write_truth

    corpus = [d("pos", "s"), d("neg", "s"), d("fn", "s")]
    pairs = [p("q", "pos"), p("q", "neg", "hard_negative"), p("q", "fn", "false_negative")]
    ds = write_dataset(tmp_path / "ds", {"queries": [q("q", "s")], "corpus": corpus, "pairs": pairs})
    dvec = {"pos": unit(0) * 0.8 + unit(3) * 0.6, "neg": unit(1), "fn": unit(0)}
    qvec = {"q": unit(0)}  # ranks fn, then pos, then neg

    def p1(truth=None):
        return evaluate(ds, *encoders(qvec, dvec), truth=truth)["per_subset"]["s"]["p_at_1"]

    assert p1() == 1.0  # the judged false negative is left out: pos is first
    # a complete truth naming q knows fn is no match: it is a negative now, and ranks first
    assert p1(write_truth(tmp_path / "complete.parquet", [("q", "pos")])) == 0.0
    # a labelled sample that says so too
    assert p1(write_truth(tmp_path / "no.parquet", [("q", "fn")], relevant=[False])) == 0.0
    # a labelled sample silent on fn leaves its label alone
    assert p1(write_truth(tmp_path / "other.parquet", [("q", "neg")], relevant=[False])) == 1.0
    # a truth naming docs or queries the dataset does not hold is counted, not an error
    m = evaluate(
        ds, *encoders(qvec, dvec), truth=write_truth(tmp_path / "x.parquet", [("q", "gone"), ("z", "pos")])
    )
    assert m["counts"]["truth_pairs_not_in_dataset"] == 2


def test_queries_without_positive_are_skipped(tmp_path):
    queries = [q("q0", "s"), q("q1", "s"), q("q2", "s"), q("q3", "s")]
    corpus = [d("d0", "s"), d("d1", "s")]
    pairs = [
        p("q0", "d0"),
        p("q0", "d1", "negative"),
        p("q1", "d1", "negative"),  # negatives only
        p("q2", "gone"),  # its positive is not in the corpus
        p("nobody", "d0"),  # unknown query
    ]  # q3: no pairs at all
    ds = write_dataset(tmp_path / "ds", {"queries": queries, "corpus": corpus, "pairs": pairs})
    qenc, denc = encoders({"q0": unit(0)}, {"d0": unit(0), "d1": unit(1)})
    m = evaluate(ds, qenc, denc)
    s = m["per_subset"]["s"]
    assert s["queries"] == 1 and s["queries_without_positive"] == 3 and s["p_at_1"] == 1.0
    assert m["overall"]["queries_without_positive"] == 3
    assert m["counts"]["missing_docs"] == 1 and m["counts"]["pairs_without_query"] == 1
    assert qenc.ids == ["q0"]  # skipped queries are never encoded


def test_empty_subset_and_empty_dataset(tmp_path):
    ds = write_dataset(
        tmp_path / "ds",
        {"queries": [q("q0", "lonely")], "corpus": [d("d0", "other")], "pairs": []},
    )
    m = evaluate(ds, *encoders({}, {}))
    lonely = m["per_subset"]["lonely"]
    assert lonely["queries"] == 0 and lonely["p_at_1"] is None and lonely["queries_without_positive"] == 1
    assert m["overall"] == {
        "p_at_1": None,
        "p_at_1_micro": None,
        "queries": 0,
        "queries_without_positive": 1,
        "subsets": 0,
    }
    assert m["per_task"] == {}

    empty = write_dataset(tmp_path / "empty", {"queries": [], "corpus": [], "pairs": []})
    m = evaluate(empty, *encoders({}, {}))
    assert m["per_subset"] == {} and m["overall"]["queries"] == 0


def test_null_subset_and_task(tmp_path):
    ds = write_dataset(
        tmp_path / "ds",
        {
            "queries": [q("q", None, None), q("other", "s")],
            "corpus": [d("d0", None), d("d1", None), d("e0", "s")],
            "pairs": [p("q", "d0"), p("other", "e0")],
        },
    )
    m = evaluate(
        ds, *encoders({"q": unit(1), "other": unit(2)}, {"d0": unit(1), "d1": unit(0), "e0": unit(2)})
    )
    none = m["per_subset"]["(none)"]
    assert none["task"] == "(none)" and none["p_at_1"] == 1.0 and none["candidates_per_query"] == 2.0
    assert m["per_subset"]["s"]["candidates_per_query"] == 1.0


def test_ties_break_by_corpus_order(tmp_path):
    """Equal scores rank in corpus order: the earlier doc first."""
    corpus = [d("a", "s"), d("pos", "s"), d("b", "s"), d("c", "s")]
    ds = write_dataset(
        tmp_path / "ds",
        {
            "queries": [q("q1", "s", "retrieval"), q("q2", "s", "retrieval")],
            "corpus": corpus,
            "pairs": [p("q1", "pos"), p("q2", "a")],
        },
    )
    same = {k: unit(0) for k in ("a", "pos", "b", "c")}
    m = evaluate(ds, *encoders({"q1": unit(0), "q2": unit(0)}, same))
    s = m["per_subset"]["s"]
    assert s["p_at_1"] == 0.5  # q1's positive is second, q2's first
    assert s["recall@1"] == 0.5 and s["recall@5"] == 1.0
    assert s["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)
    # the same holds in a pair candidate set
    ds2 = write_dataset(
        tmp_path / "ds2",
        {
            "queries": [q("q1", "s")],
            "corpus": corpus,
            "pairs": [p("q1", "pos"), p("q1", "a", "negative")],
        },
    )
    m = evaluate(ds2, *encoders({"q1": unit(0)}, same))
    assert m["per_subset"]["s"]["p_at_1"] == 0.0  # "a" comes before "pos" in the corpus


def test_image_paths_resolved_against_data_root(tmp_path, make_png):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "sub" / "cat.png").write_bytes(make_png())
    (images / "dog.png").write_bytes(make_png((0, 0, 255)))
    inline = make_png((0, 255, 0))
    ds = write_dataset(
        tmp_path / "ds",
        {
            "queries": [q("q", "s", image={"bytes": None, "path": "sub/cat.png"})],
            "corpus": [
                d("d0", "s", image={"bytes": None, "path": "dog.png"}),
                d("d1", "s", image={"bytes": inline, "path": None}),
                d("d2", "s"),
            ],
            "pairs": [p("q", "d0"), p("q", "d1", "negative")],
        },
        data_root=str(images),
    )
    seen = {}

    def enc(rows):
        for r in rows:
            seen[r.get("query_id") or r["doc_id"]] = r
        return np.stack([unit(0) for _ in rows])

    evaluate(ds, enc, enc, candidate_set="subset")
    qimg = seen["q"]["image"]
    assert qimg["bytes"] is None and Path(qimg["path"]).is_absolute()
    assert Path(qimg["path"]) == (images / "sub" / "cat.png").resolve()
    assert Path(seen["d0"]["image"]["path"]).read_bytes() == (images / "dog.png").read_bytes()
    assert seen["d1"]["image"] == {"bytes": inline, "path": None}
    assert seen["d2"]["image"] is None
    assert seen["q"]["task"] == "classification" and seen["q"]["text"] == "q"
    assert set(seen["d0"]) == {"doc_id", "subset", "instruction", "text", "image"}


def test_an_image_path_leaving_the_data_root_is_never_handed_to_the_encoder(tmp_path, make_png):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "secret.png").write_bytes(make_png())
    ds = write_dataset(
        tmp_path / "ds",
        {
            "queries": [q("q", "s", image={"bytes": None, "path": "../secret.png"})],
            "corpus": [d("d0", "s"), d("d1", "s")],
            "pairs": [p("q", "d0"), p("q", "d1", "negative")],
        },
        data_root=str(images),
    )

    def enc(rows):
        return np.stack([unit(0) for _ in rows])

    with pytest.raises(ValueError, match="outside the data root"):
        evaluate(ds, enc, enc)


def test_batches_and_each_doc_encoded_once_per_subset(tmp_path):
    n = 23
    queries = [q(f"q{i}", "s", "retrieval") for i in range(n)]
    corpus = [d(f"d{i}", "s") for i in range(n)] + [d("x", "t")]
    pairs = [p(f"q{i}", f"d{i}") for i in range(n)] + [
        p(f"q{i}", f"d{(i + 1) % n}", "negative") for i in range(n)
    ]
    ds = write_dataset(
        tmp_path / "ds", {"queries": queries, "corpus": corpus, "pairs": pairs}, rows_per_shard=5
    )
    qenc, denc = encoders({f"q{i}": unit(i) for i in range(n)}, {f"d{i}": unit(i) for i in range(n)})
    m = evaluate(ds, qenc, denc, batch_size=4)
    assert m["per_subset"]["s"]["p_at_1"] == 1.0 and m["per_subset"]["s"]["ndcg@10"] == 1.0
    assert all(len(c) <= 4 for c in qenc.calls + denc.calls)
    assert sorted(denc.ids) == sorted(f"d{i}" for i in range(n))  # once each; "t" never read
    assert sorted(qenc.ids) == sorted(f"q{i}" for i in range(n))


def test_pair_docs_from_another_subset(tmp_path):
    """A pair may name a doc stored under another subset: it is encoded for this subset too."""
    ds = write_dataset(
        tmp_path / "ds",
        {
            "queries": [q("q", "s")],
            "corpus": [d("shared", "pool"), d("local", "s")],
            "pairs": [p("q", "shared"), p("q", "local", "negative")],
        },
    )
    m = evaluate(ds, *encoders({"q": unit(0)}, {"shared": unit(0), "local": unit(1)}))
    assert m["per_subset"]["s"]["p_at_1"] == 1.0
    assert "pool" not in m["per_subset"]
    # ranked against the whole subset, the query's positives join the subset's corpus
    m = evaluate(ds, *encoders({"q": unit(0)}, {"shared": unit(0), "local": unit(1)}), candidate_set="subset")
    assert m["per_subset"]["s"]["p_at_1"] == 1.0
    assert m["per_subset"]["s"]["candidates_per_query"] == 2.0
    m = evaluate(ds, *encoders({"q": unit(1)}, {"shared": unit(0), "local": unit(1)}), candidate_set="subset")
    assert m["per_subset"]["s"]["p_at_1"] == 0.0


def test_torch_outputs_accepted(small):
    torch = pytest.importorskip("torch")
    ds, dvec, positive = small
    qvec = {qid: dvec[did] for qid, did in positive.items()}
    qenc, denc = encoders(qvec, dvec)
    m = evaluate(ds, lambda rows: torch.from_numpy(qenc(rows)), lambda rows: torch.from_numpy(denc(rows)))
    assert m["overall"]["p_at_1"] == 1.0


def test_bad_encoder_output_and_arguments(small):
    ds, dvec, positive = small
    qvec = {qid: dvec[did] for qid, did in positive.items()}
    with pytest.raises(ValueError, match="shape"):
        evaluate(ds, lambda rows: np.zeros((1, DIM)), Lookup(dvec, "doc_id"))
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(ds, lambda rows: np.full((len(rows), DIM), np.nan), Lookup(dvec, "doc_id"))
    with pytest.raises(ValueError, match="dim"):
        evaluate(ds, lambda rows: np.zeros((len(rows), 3)), Lookup(dvec, "doc_id"))
    with pytest.raises(ValueError, match="candidate_set"):
        evaluate(ds, *encoders(qvec, dvec), candidate_set="all")


def test_subsets_restriction(small):
    ds, dvec, positive = small
    qvec = {qid: dvec[did] for qid, did in positive.items()}
    qenc, denc = encoders(qvec, dvec)
    m = evaluate(ds, qenc, denc, subsets=["ret"])
    assert list(m["per_subset"]) == ["ret"]
    assert all(i.startswith("r") for i in qenc.ids + denc.ids)


def test_write_metrics(small, tmp_path):
    ds, dvec, positive = small
    qvec = {qid: dvec[did] for qid, did in positive.items()}
    m = evaluate(ds, *encoders(qvec, dvec))
    out = write_metrics(m, tmp_path / "out" / "metrics.json")
    assert out.is_file()
    back = json.loads(out.read_text())
    assert back["overall"]["p_at_1"] == 1.0
    assert back["per_subset"]["ret"]["ndcg@10"] == pytest.approx(1.0)
    assert back["chance_p_at_1"]["cls"] == pytest.approx(1 / 3)
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temporary left behind
