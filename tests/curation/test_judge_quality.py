"""Judge quality against a truth: AUC of p_yes, precision and recall of false_negative, gold agreement."""

from __future__ import annotations

import random

import pytest
from helpers.colours import COLOURS, colour_dataset

from assay.curation.dataset import Dataset, write_dataset
from assay.curation.judge.quality import judge_quality, roc_auc
from assay.curation.judge.stage import judge_dataset
from assay.curation.truth import Truth, TruthError, read_truth, write_truth


def judged(q, d, label, p, verdict):
    return {"query_id": q, "doc_id": d, "label": label, "judge_p_yes": p, "judge_verdict": verdict}


@pytest.fixture
def hand_made(tmp_path):
    """Subset s: q1, q2 (a complete truth knows them); subset t: q3 (a labelled sample knows it)."""
    queries = [
        {"query_id": q, "subset": s, "task": "retrieval", "text": q} for q, s in (("q1", "s"), ("q2", "s"))
    ]
    queries.append({"query_id": "q3", "subset": "t", "task": "retrieval", "text": "q3"})
    docs = ["g1", "a", "b", "c", "d", "g2", "e", "f", "g3", "x", "y"]
    corpus = [{"doc_id": d, "subset": "t" if d in ("g3", "x", "y") else "s", "text": d} for d in docs]
    pairs = [
        judged("q1", "g1", "positive", 0.9, "yes"),
        judged("q1", "a", "false_negative", 0.8, "yes"),  # a real match the judge found
        judged("q1", "b", "false_negative", 0.7, "yes"),  # the judge's mistake
        judged("q1", "c", "hard_negative", 0.6, "no"),  # a real match it missed
        judged("q1", "d", "hard_negative", 0.2, "no"),
        judged("q2", "g2", "positive", 0.4, "no"),  # gold, judged no
        judged("q2", "e", "hard_negative", 0.1, "no"),
        {"query_id": "q2", "doc_id": "f", "label": "negative"},  # not judged: left out
        judged("q3", "g3", "positive", 0.9, "yes"),
        judged("q3", "x", "hard_negative", 0.3, "no"),
        judged("q3", "y", "false_negative", 0.95, "yes"),
    ]
    write_dataset(tmp_path / "judged", {"queries": queries, "corpus": corpus, "pairs": pairs})
    complete = read_truth(
        write_truth(tmp_path / "truth.parquet", [("q1", "g1"), ("q1", "a"), ("q1", "c"), ("q2", "g2")])
    )
    sample = read_truth(
        write_truth(tmp_path / "sample.parquet", [("q3", "y"), ("q3", "x")], relevant=[True, False])
    )
    return tmp_path / "judged", complete, sample


def test_quality_against_a_complete_truth_by_hand(hand_made):
    path, complete, _ = hand_made
    q = judge_quality(path, complete)
    s = q["per_subset"]["s"]
    # matches g1 .9, a .8, c .6, g2 .4 vs non-matches b .7, d .2, e .1: 3 + 3 + 2 + 2 of 12 pairs
    assert s["auc"] == pytest.approx(10 / 12)
    assert s["pairs"] == 7 and s["unknown"] == 0
    # candidates a b c d e; real false negatives a c; judged yes a b -> precision 1/2, recall 1/2
    assert (s["candidates"], s["relevant_candidates"], s["judged_yes"], s["true_yes"]) == (5, 2, 2, 1)
    assert s["fn_precision"] == 0.5 and s["fn_recall"] == 0.5
    assert s["positives"] == 2 and s["gold_agreement"] == 0.5
    # p_yes of the candidates, matches and non-matches apart (20 bins)
    assert sum(s["p_yes_hist"]["match"]) == 2 and s["p_yes_hist"]["match"][16] == 1  # a: 0.8
    assert sum(s["p_yes_hist"]["no_match"]) == 3
    # the truth knows nothing of q3: its pairs are unknown, but gold agreement needs no truth
    t = q["per_subset"]["t"]
    assert t["pairs"] == 0 and t["unknown"] == 3 and t["auc"] is None and t["fn_precision"] is None
    assert t["gold_agreement"] == 1.0
    assert q["overall"]["pairs"] == 7 and q["overall"]["gold_agreement"] == 2 / 3
    assert q["overall"]["auc"] == s["auc"]  # the mean over subsets with an AUC (t has none)
    assert q["truth"]["kind"] == "complete" and q["truth"]["queries"] == 2


def test_quality_against_a_labelled_sample(hand_made):
    path, _, sample = hand_made
    t = judge_quality(path, sample)["per_subset"]["t"]
    # y (0.95, a match) above x (0.3, not); g3 is gold but the sample does not say: unknown
    assert t["auc"] == 1.0 and t["pairs"] == 2 and t["unknown"] == 1
    assert t["fn_precision"] == 1.0 and t["fn_recall"] == 1.0
    assert sample.relevant("q3", "g3") is None and sample.relevant("q3", "x") is False


def test_roc_auc_matches_the_pairwise_definition():
    rng = random.Random(0)
    pos = [rng.choice([0.1, 0.5, 0.7, 0.9]) for _ in range(40)]
    neg = [rng.choice([0.1, 0.3, 0.5, 0.7]) for _ in range(30)]
    pairwise = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(pos, neg) == pytest.approx(pairwise)
    assert roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0 and roc_auc([0.5], [0.5]) == 0.5


class GreenJudge:
    """Says yes to any answer naming green (and to the right colour), no to the rest."""

    model_id = "green@0"

    def score(self, items):
        from assay.curation.judge.scoring import Score

        return [
            Score(margin=3.0 if "<<<green>>>" in "".join(p.get("text", "") for p in it.parts) else -2.0)
            for it in items
        ]


def test_judge_run_measures_every_judged_pair_and_changes_no_label(tmp_path):
    extra = [
        {"query_id": f"q-{c}-0", "doc_id": f"ans-{o}", "label": "hard_negative", "rank": i}
        for c in COLOURS
        for i, o in enumerate(o for o in COLOURS if o != c)
    ]
    data = colour_dataset(tmp_path / "data", extra_pairs=extra)
    gold = [(r["query_id"], r["doc_id"]) for r in _pairs(data) if r["label"] == "positive"]
    # the truth: gold, plus one candidate that really matches (the red query's "green" answer)
    truth = read_truth(write_truth(tmp_path / "truth.parquet", [*gold, ("q-red-0", "ans-green")]))
    kw = {"cache": tmp_path / "c.sqlite", "labels": ["positive", "hard_negative"], "keep_negatives": 1}
    manifest, report = judge_dataset(data, tmp_path / "judged", GreenJudge(), truth=truth, **kw)
    _, plain = judge_dataset(data, tmp_path / "plain", GreenJudge(), **kw)
    # the truth only measures: the same labels and verdicts as a run without it
    assert _pairs(tmp_path / "judged") == _pairs(tmp_path / "plain") and plain.quality is None
    vqa = report.quality["per_subset"]["vqa"]
    # yes to green for red, blue and yellow: 1 of 3 claims right; the one real false negative found
    assert (vqa["judged_yes"], vqa["true_yes"], vqa["relevant_candidates"]) == (3, 1, 1)
    assert vqa["fn_precision"] == pytest.approx(1 / 3) and vqa["fn_recall"] == 1.0
    # measured before --keep 1 trimmed the judged "no"s: all 12 candidates count
    assert vqa["candidates"] == 12 and report.trimmed > 0
    assert judge_quality(tmp_path / "judged", truth)["per_subset"]["vqa"]["candidates"] == 12 - report.trimmed
    assert manifest.extra["judge"]["quality"] == report.quality
    assert manifest.config["truth"] == str(tmp_path / "truth.parquet")
    # a rerun finds the run complete and gives back the stored numbers
    _, again = judge_dataset(data, tmp_path / "judged", GreenJudge(), truth=truth, **kw)
    assert again.quality == report.quality


def _pairs(path):
    ds = Dataset(path)
    rows = [r for name in ds.shards("pairs") for r in ds.read_shard("pairs", name).to_pylist()]
    return sorted(rows, key=lambda r: (r["query_id"], r["doc_id"]))


def test_truth_files_are_checked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"query_id": ["q"], "doc": ["d"]}), tmp_path / "a.parquet")
    with pytest.raises(TruthError, match="no column doc_id"):
        read_truth(tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text(
        '{"query_id": "q", "doc_id": "d", "relevant": true}\n'
        '{"query_id": "q", "doc_id": "d", "relevant": false}\n'
    )
    with pytest.raises(TruthError, match=r"relevant and as not relevant \(row 1\)"):
        read_truth(tmp_path / "b.jsonl")
    (tmp_path / "c.csv").write_text("query_id,doc_id,relevant\nq,d,1\nq,e,0\n")
    truth = read_truth(tmp_path / "c.csv")
    assert isinstance(truth, Truth) and not truth.complete
    assert (truth.relevant("q", "d"), truth.relevant("q", "e"), truth.relevant("q", "z")) == (
        True,
        False,
        None,
    )
    with pytest.raises(TruthError, match="does not exist"):
        read_truth(tmp_path / "nope.parquet")
