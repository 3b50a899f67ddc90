"""The batch fast path of negative selection picks exactly what the per-query path picks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from assay.mining.select import select_negatives
from assay.mining.select_batch import batch_supported, select_batch
from assay.mining.select_rules import (
    AbsoluteMargin,
    Candidate,
    MaxScore,
    MinScore,
    PercentOfPositive,
    RankWindow,
    Sample,
    TopK,
)
from assay.mining.select_spec import parse_rules

N_DOCS = 24
# few distinct values, so scores tie with each other and with the rules' thresholds
SCORES = st.sampled_from([-0.5, 0.0, 0.25, 0.5, 0.55, 0.6, 0.75, 0.8, 0.9, 0.95, 1.0])

rule_strategy = st.one_of(
    st.builds(lambda a, b: RankWindow(min(a, b), max(a, b)), st.integers(1, 30), st.integers(1, 30)),
    st.builds(TopK, st.integers(1, 12)),
    st.builds(AbsoluteMargin, st.sampled_from([0.0, 0.05, 0.25, 0.3])),
    st.builds(PercentOfPositive, st.sampled_from([0.5, 0.8, 0.95, 1.0])),
    st.builds(MinScore, st.sampled_from([-0.5, 0.0, 0.5, 0.75])),
    st.builds(MaxScore, st.sampled_from([0.0, 0.5, 0.8, 1.0])),
    st.builds(Sample, st.integers(1, 8), st.sampled_from(["top", "random"])),
)


@st.composite
def batches(draw):
    """A batch of kNN rows in search order, with what the stage hands over alongside them."""
    nq = draw(st.integers(1, 6))
    depth = draw(st.integers(0, 24))
    rows_docs, rows_scores = [], []
    for _ in range(nq):
        # doc ids repeat within a row (merged shard results) and -1 means "no result"
        rows_docs.append(draw(st.lists(st.integers(-1, N_DOCS - 1), min_size=depth, max_size=depth)))
        scores = draw(st.lists(st.one_of(SCORES, st.floats(-1, 1, width=32)), min_size=depth, max_size=depth))
        rows_scores.append(sorted(scores, reverse=True) if draw(st.booleans()) else scores)
    docs = np.asarray(rows_docs, dtype=np.int64).reshape(nq, depth)
    scores = np.asarray(rows_scores, dtype=np.float32).reshape(nq, depth)
    present = np.asarray(draw(st.lists(st.booleans(), min_size=nq * depth, max_size=nq * depth)), bool)
    present = present.reshape(nq, depth) if draw(st.booleans()) else None
    # content keys: None never matches; several docs share a key (near-duplicates)
    keys = draw(st.lists(st.one_of(st.none(), st.integers(0, 6)), min_size=N_DOCS, max_size=N_DOCS))
    positives = [draw(st.sets(st.integers(0, N_DOCS - 1), max_size=4)) for _ in range(nq)]
    pos_scores = [draw(st.one_of(st.none(), SCORES, st.floats(-1, 1))) for _ in range(nq)]
    rules = draw(st.lists(rule_strategy, max_size=4))
    query_ids = draw(st.lists(st.text(max_size=4), min_size=nq, max_size=nq))
    return docs, scores, present, keys, positives, pos_scores, rules, query_ids, draw(st.integers(0, 3))


def reference(docs, scores, present, keys, positives, pos_scores, rules, query_ids, seed, start_rank):
    """The per-query path, one row at a time."""
    out = []
    for i in range(len(docs)):
        cands = [
            Candidate(doc=int(d), score=float(s), rank=start_rank + j)
            for j, (d, s) in enumerate(zip(docs[i], scores[i], strict=True))
            if d >= 0 and (present is None or present[i, j])
        ]
        out.append(
            select_negatives(
                cands,
                positives=positives[i],
                positive_score=pos_scores[i],
                content_of=keys,
                positive_contents=None,
                rules=rules,
                seed=seed,
                query_id=query_ids[i],
            )
        )
    return out


def masks(docs, keys, positives):
    """The stage's inputs: candidate is a gold positive / has a positive's content key."""
    is_pos = np.zeros(docs.shape, dtype=bool)
    same = np.zeros(docs.shape, dtype=bool)
    for i, row in enumerate(docs):
        banned = {keys[p] for p in positives[i]} - {None}
        for j, d in enumerate(row):
            if d >= 0:
                is_pos[i, j] = int(d) in positives[i]
                same[i, j] = keys[d] is not None and keys[d] in banned
    return is_pos, same


@settings(max_examples=400, deadline=None)
@given(batches(), st.integers(1, 3))
def test_batch_selects_exactly_what_the_per_query_path_selects(batch, start_rank):
    docs, scores, present, keys, positives, pos_scores, rules, query_ids, seed = batch
    is_pos, same = masks(docs, keys, positives)
    got = select_batch(
        docs,
        scores,
        positive_scores=np.array([np.nan if p is None else p for p in pos_scores]),
        is_positive=is_pos,
        same_content=same,
        rules=rules,
        seed=seed,
        query_ids=query_ids,
        present=present,
        start_rank=start_rank,
    )
    want = reference(docs, scores, present, keys, positives, pos_scores, rules, query_ids, seed, start_rank)
    for i, sel in enumerate(want):
        cols = np.flatnonzero(got.keep[i])
        assert [(int(docs[i, j]), start_rank + int(j)) for j in cols] == [
            (c.doc, c.rank) for c in sel.negatives
        ]
        for name in set(sel.dropped) | set(got.dropped):
            batch_count = int(got.dropped[name][i]) if name in got.dropped else 0
            assert batch_count == sel.dropped.get(name, 0), name


def test_random_samples_match_the_per_query_path_across_rules_in_any_order():
    """Two random samples in one chain draw from one rng per query, as select_negatives does."""
    rng = np.random.default_rng(0)
    docs = np.stack([rng.permutation(200)[:120] for _ in range(50)])
    scores = -np.sort(-rng.random(docs.shape).astype(np.float32), axis=1)
    keys = [None] * 200
    positives = [{int(docs[i, 0])} for i in range(50)]
    pos_scores = [float(scores[i, 0]) for i in range(50)]
    is_pos, same = masks(docs, keys, positives)
    for spec in (
        "sample:random:40,min:0.2,sample:random:5",
        "ranks:10-90,sample:random:20,top:3,percent:0.9",
    ):
        rules = parse_rules(spec)
        ids = [f"q{i}" for i in range(50)]
        got = select_batch(
            docs,
            scores,
            positive_scores=np.array(pos_scores),
            is_positive=is_pos,
            same_content=same,
            rules=rules,
            seed=7,
            query_ids=ids,
        )
        want = reference(docs, scores, None, keys, positives, pos_scores, rules, ids, 7, 1)
        assert [docs[i, got.keep[i]].tolist() for i in range(50)] == [
            [c.doc for c in s.negatives] for s in want
        ]
        assert sum(got.keep.sum(axis=1) > 0) > 25


def test_no_positive_score_is_counted_like_the_per_query_path():
    docs = np.arange(10).reshape(2, 5)
    scores = np.full((2, 5), 0.5, np.float32)
    got = select_batch(
        docs,
        scores,
        positive_scores=np.array([np.nan, 1.0]),
        is_positive=None,
        same_content=None,
        rules=parse_rules("margin:0.1,top:2"),
        seed=0,
        query_ids=["a", "b"],
    )
    assert got.keep.sum(axis=1).tolist() == [0, 2]
    assert got.dropped["no_positive_score"].tolist() == [5, 0]
    assert got.dropped["absolute_margin"].tolist() == [0, 0]
    assert got.dropped["top_k"].tolist() == [0, 3]


@dataclass(frozen=True)
class EveryOther:
    name: ClassVar[str] = "every_other"
    needs_positive_score: ClassVar[bool] = False

    def apply(self, cands, ctx):
        return cands[::2]

    def token(self) -> str:
        return "every-other"


def test_rules_the_batch_path_cannot_run_are_refused():
    assert batch_supported(parse_rules("ranks:1-5,top:3,margin:0.1,percent:0.9,min:0,max:1,sample:random:2"))
    assert not batch_supported([TopK(3), EveryOther()])
    with pytest.raises(TypeError, match="select_negatives"):
        select_batch(
            np.zeros((1, 3), np.int64),
            np.zeros((1, 3), np.float32),
            positive_scores=np.ones(1),
            is_positive=None,
            same_content=None,
            rules=[EveryOther()],
            seed=0,
            query_ids=["q"],
        )
