"""Hard-negative selection rules: behaviour, composition, exclusions, determinism, specs."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from assay.mining.select import candidates, make_context, positive_score_of, query_seed, select_negatives
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
from assay.mining.select_spec import PAPER_STAGE2, PAPER_STAGE3, RuleSpecError, describe, parse_rules


def ranked(n: int, top: float = 1.0, step: float = 0.01) -> list[Candidate]:
    """n candidates, doc i at rank i + 1 with descending scores."""
    return [Candidate(doc=i, score=round(top - i * step, 6), rank=i + 1) for i in range(n)]


def ctx(positive_score: float | None = 1.0, seed: int = 0, query_id: str = "q"):
    return make_context(positives=(), positive_score=positive_score, seed=seed, query_id=query_id)


def select(cands, rules, *, positives=(), positive_score=1.0, content_of=None, positive_contents=None, **kw):
    if isinstance(rules, str):
        rules = parse_rules(rules)
    return select_negatives(
        cands,
        positives=positives,
        positive_score=positive_score,
        content_of=content_of,
        positive_contents=positive_contents,
        rules=rules,
        seed=kw.get("seed", 0),
        query_id=kw.get("query_id", "q"),
    )


def docs(cands) -> list[int]:
    return [c.doc for c in cands]


# -- each rule ---------------------------------------------------------------------------------------


def test_rank_window_is_inclusive_and_uses_search_ranks():
    cands = ranked(10)
    assert docs(RankWindow(3, 5).apply(cands, ctx())) == [2, 3, 4]
    assert docs(RankWindow(10, 20).apply(cands, ctx())) == [9]
    # a removed positive does not shift the window
    sel = select(cands, [RankWindow(1, 3)], positives={0})
    assert docs(sel.negatives) == [1, 2]


def test_top_k_takes_best_ranked_of_what_is_left():
    cands = ranked(10)
    assert docs(TopK(3).apply(list(reversed(cands)), ctx())) == [0, 1, 2]
    assert docs(TopK(20).apply(cands, ctx())) == docs(cands)
    sel = select(cands, [TopK(3)], positives={0})
    assert docs(sel.negatives) == [1, 2, 3]


def test_absolute_margin_is_strict():
    cands = [Candidate(0, 0.9, 1), Candidate(1, 0.75, 2), Candidate(2, 0.7499, 3)]
    assert docs(AbsoluteMargin(0.25).apply(cands, ctx(1.0))) == [2]
    assert docs(AbsoluteMargin(0.0).apply(cands, ctx(0.9))) == [1, 2]


def test_percent_of_positive():
    cands = [Candidate(0, 0.96, 1), Candidate(1, 0.95, 2), Candidate(2, 0.94, 3)]
    assert docs(PercentOfPositive(0.95).apply(cands, ctx(1.0))) == [2]  # 0.95 * 1.0 is not kept
    assert docs(PercentOfPositive(0.5).apply(cands, ctx(1.92))) == [1, 2]


def test_min_and_max_score_are_inclusive():
    cands = [Candidate(0, 0.9, 1), Candidate(1, 0.5, 2), Candidate(2, 0.2, 3), Candidate(3, 0.1, 4)]
    assert docs(MinScore(0.2).apply(cands, ctx())) == [0, 1, 2]
    assert docs(MaxScore(0.5).apply(cands, ctx())) == [1, 2, 3]


def test_sample_top_and_random():
    cands = ranked(20)
    assert docs(Sample(3, "top").apply(list(reversed(cands)), ctx())) == [0, 1, 2]
    got = Sample(5, "random").apply(cands, ctx())
    assert len(got) == 5 and len(set(docs(got))) == 5
    assert [c.rank for c in got] == sorted(c.rank for c in got)
    assert set(docs(got)) <= set(range(20))
    # fewer candidates than n: all of them, sorted by rank
    assert docs(Sample(5, "random").apply(list(reversed(cands[:3])), ctx())) == [0, 1, 2]


def test_positive_relative_rules_keep_nothing_without_positive_score():
    cands = ranked(5, top=0.5)
    for rule in (AbsoluteMargin(0.05), PercentOfPositive(0.95)):
        assert rule.apply(cands, ctx(None)) == []
        sel = select(cands, [rule], positive_score=None)
        assert sel.negatives == []
        assert sel.dropped["no_positive_score"] == 5
        assert sel.dropped[rule.name] == 0
    # NaN counts as unknown
    assert select(cands, [PercentOfPositive(0.95)], positive_score=float("nan")).negatives == []
    # rules that do not need it are unaffected
    sel = select(cands, "top:2", positive_score=None)
    assert docs(sel.negatives) == [0, 1] and "no_positive_score" not in sel.dropped


def test_no_rules_keeps_everything_but_exclusions():
    cands = ranked(5)
    sel = select(cands, [], positives={1}, content_of={3: "x", 1: "x"})
    assert docs(sel.negatives) == [0, 2, 4]
    assert sel.dropped == {"duplicate_doc": 0, "positive": 1, "same_content_as_positive": 1}


# -- composition ---------------------------------------------------------------------------------------


def test_composition_order_matters_and_is_respected():
    cands = [Candidate(i, s, i + 1) for i, s in enumerate([0.99, 0.98, 0.9, 0.8, 0.7, 0.6])]
    filter_then_top = select(cands, "percent:0.95,top:2", positive_score=1.0)
    top_then_filter = select(cands, "top:2,percent:0.95", positive_score=1.0)
    assert docs(filter_then_top.negatives) == [2, 3]
    assert top_then_filter.negatives == []
    assert list(filter_then_top.dropped) == [
        "duplicate_doc",
        "positive",
        "same_content_as_positive",
        "percent_of_positive",
        "top_k",
    ]
    assert filter_then_top.dropped["percent_of_positive"] == 2 and filter_then_top.dropped["top_k"] == 2
    assert top_then_filter.dropped["top_k"] == 4 and top_then_filter.dropped["percent_of_positive"] == 2


def test_paper_stage2_and_stage3():
    cands = ranked(120, step=0.005)
    s2 = select(cands, PAPER_STAGE2, positives={55}, query_id="q7")
    assert len(s2.negatives) == 2
    assert all(50 <= c.rank <= 100 and c.doc != 55 for c in s2.negatives)
    assert s2.dropped["rank_window"] == 119 - 50 and s2.dropped["sample"] == 48
    s3 = select(cands, PAPER_STAGE3, positives={0, 4})
    assert docs(s3.negatives) == [1, 2, 3] + list(range(5, 22))


def test_dropped_counts_add_up():
    cands = ranked(30) + [Candidate(3, 0.5, 40)]  # doc 3 again, worse rank
    sel = select(
        cands,
        "ranks:1-25,margin:0.01,min:0.8,max:0.975,sample:top:5",
        positives={0},
        content_of=lambda d: d % 7,
        positive_score=1.0,
    )
    assert sel.dropped["duplicate_doc"] == 1
    assert sel.dropped["same_content_as_positive"] == 4  # docs 7, 14, 21, 28
    assert sum(sel.dropped.values()) + len(sel.negatives) == len(cands)
    assert docs(sel.negatives) == [3, 4, 5, 6, 8]
    assert sel.negatives[0] == Candidate(3, 0.97, 4)  # the best-ranked copy of a duplicate stays


# -- exclusions: positives and same content are never returned -------------------------------------------


def test_same_content_as_positive_is_removed():
    cands = ranked(6)
    keys = ["a", "b", "a", None, "c", "b"]
    sel = select(cands, [], positives={0}, content_of=keys)
    assert docs(sel.negatives) == [1, 3, 4, 5]
    assert sel.dropped["same_content_as_positive"] == 1
    # explicit positive contents (e.g. a positive outside the candidate pool)
    sel = select(cands, [], positives={0}, content_of=keys, positive_contents={"b"})
    assert docs(sel.negatives) == [2, 3, 4]
    # unknown content (None) never matches, even a positive with unknown content
    sel = select(cands, [], positives={3}, content_of=keys)
    assert docs(sel.negatives) == [0, 1, 2, 4, 5]


def test_positive_contents_without_lookup_is_an_error():
    with pytest.raises(ValueError, match="content_of"):
        select(ranked(3), [], positives={0}, positive_contents={"a"})


@st.composite
def query_cases(draw):
    n = draw(st.integers(0, 40))
    scores = sorted(draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)), reverse=True)
    doc_ids = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
    cands = [Candidate(d, s, r + 1) for r, (d, s) in enumerate(zip(doc_ids, scores, strict=True))]
    draw(st.randoms(use_true_random=False)).shuffle(cands)
    keys = draw(st.lists(st.one_of(st.none(), st.integers(0, 8)), min_size=61, max_size=61))
    positives = draw(st.sets(st.integers(0, 60), max_size=5))
    extra = draw(st.sets(st.integers(0, 8), max_size=2))
    use_explicit = draw(st.booleans())
    pos_score = draw(st.one_of(st.none(), st.floats(0.05, 1)))
    rules = draw(st.sampled_from(["", "top:5", PAPER_STAGE2, "percent:0.95,sample:random:3", "min:-0.5"]))
    return cands, keys, positives, extra, use_explicit, pos_score, rules


@settings(max_examples=100, deadline=None)
@given(query_cases(), st.text(max_size=5))
def test_positives_and_same_content_never_returned(case, query_id):
    cands, keys, positives, extra, use_explicit, pos_score, rules = case
    pos_contents = {keys[p] for p in positives} | extra if use_explicit else None
    sel = select(
        cands,
        rules,
        positives=positives,
        positive_score=pos_score,
        content_of=keys,
        positive_contents=pos_contents,
        query_id=query_id,
    )
    banned = ({keys[p] for p in positives} | (extra if use_explicit else set())) - {None}
    for c in sel.negatives:
        assert c.doc not in positives
        assert keys[c.doc] is None or keys[c.doc] not in banned
    assert len({c.doc for c in sel.negatives}) == len(sel.negatives)
    assert [c.rank for c in sel.negatives] == sorted(c.rank for c in sel.negatives)
    assert {(c.doc, c.rank) for c in sel.negatives} <= {(c.doc, c.rank) for c in cands}
    assert sum(sel.dropped.values()) + len(sel.negatives) == len(cands)


# -- determinism ---------------------------------------------------------------------------------------


def test_random_sampling_is_deterministic_per_seed_and_query():
    cands = ranked(100)
    rules = parse_rules("sample:random:5")

    first = [docs(select(cands, rules, seed=1, query_id=f"q{i}").negatives) for i in range(10)]
    again = [docs(select(cands, rules, seed=1, query_id=f"q{i}").negatives) for i in range(10)]
    assert first == again
    assert len({tuple(x) for x in first}) == 10  # differs across query ids
    # independent of the order the candidates come in
    assert docs(select(cands[::-1], rules, seed=1, query_id="q3").negatives) == first[3]
    other_seed = [docs(select(cands, rules, seed=2, query_id=f"q{i}").negatives) for i in range(10)]
    assert other_seed != first


def test_query_seed_is_stable_and_not_python_hash():
    assert query_seed(0, "q1") == query_seed(0, "q1")
    assert query_seed(0, "q1") != query_seed(0, "q2") != query_seed(1, "q2")
    # a fixed value: the same in every process (str hashes are salted per process)
    assert query_seed(0, "q1") == int.from_bytes(
        hashlib.sha256(b"assay.mining.select\x1f0\x1fq1").digest()[:8], "big"
    )
    assert (
        random.Random(query_seed(0, "q1")).random()
        == make_context(positives=(), positive_score=None, seed=0, query_id="q1").rng.random()
    )


# -- helpers --------------------------------------------------------------------------------------------


def test_candidates_and_positive_score_of():
    import numpy as np

    cands = candidates(np.array([4, -1, 2]), np.array([0.9, 0.0, 0.8], dtype=np.float32))
    assert [(c.doc, c.rank) for c in cands] == [(4, 1), (2, 3)]
    assert type(cands[0].doc) is int and type(cands[0].score) is float
    assert positive_score_of(cands, {2}) == pytest.approx(0.8)
    assert positive_score_of(cands, {7}) is None


# -- specs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "rules"),
    [
        (
            "ranks:50-100,percent:0.95,sample:random:2",
            [RankWindow(50, 100), PercentOfPositive(0.95), Sample(2, "random")],
        ),
        ("top:20", [TopK(20)]),
        (
            "margin:0.05,min:0.2,max:0.9,sample:top:5",
            [AbsoluteMargin(0.05), MinScore(0.2), MaxScore(0.9), Sample(5, "top")],
        ),
        (" ranks : 1 - 3 , top:2 ", [RankWindow(1, 3), TopK(2)]),
        ("min:-0.1,max:1", [MinScore(-0.1), MaxScore(1.0)]),
        ("", []),
        ("stage2", [RankWindow(50, 100), Sample(2, "random")]),
        ("Stage3", [TopK(20)]),
    ],
)
def test_parse_string_specs(spec, rules):
    assert parse_rules(spec) == rules


def test_parse_yaml_list_form():
    yaml_form = [{"ranks": [50, 100]}, {"percent": 0.95}, {"sample": {"n": 2, "how": "random"}}]
    assert parse_rules(yaml_form) == parse_rules(PAPER_STAGE2.replace(",", ",percent:0.95,"))
    assert parse_rules(
        [{"ranks": "1-5"}, {"top": {"k": 3}}, "min:0.1", {"ranks": {"start": 2, "end": 4}}]
    ) == [
        RankWindow(1, 5),
        TopK(3),
        MinScore(0.1),
        RankWindow(2, 4),
    ]
    assert parse_rules([{"sample": "top:4"}, TopK(1)]) == [Sample(4, "top"), TopK(1)]
    assert parse_rules([]) == []


def test_describe_is_canonical():
    assert describe(parse_rules(" ranks:50-100 , percent:.95,sample:random:2")) == (
        "ranks:50-100,percent:0.95,sample:random:2"
    )
    assert describe(parse_rules("min:0")) == "min:0.0"
    assert describe([]) == ""


rule_strategy = st.one_of(
    st.tuples(st.integers(1, 500), st.integers(0, 500)).map(lambda t: RankWindow(t[0], t[0] + t[1])),
    st.integers(1, 1000).map(TopK),
    st.floats(0, 2, allow_nan=False).map(AbsoluteMargin),
    st.floats(0, 1, exclude_min=True).map(PercentOfPositive),
    st.floats(-1e9, 1e9, allow_nan=False).map(MinScore),
    st.floats(-1e9, 1e9, allow_nan=False).map(MaxScore),
    st.builds(Sample, st.integers(1, 100), st.sampled_from(["top", "random"])),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(rule_strategy, max_size=6))
def test_parse_describe_round_trip(rules):
    assert parse_rules(describe(rules)) == rules


@pytest.mark.parametrize(
    ("spec", "token"),
    [
        ("ranks:50-100,pick:3", "pick:3"),
        ("ranks:100-50", "ranks:100-50"),
        ("ranks:50", "ranks:50"),
        ("top:twenty", "top:twenty"),
        ("top:0", "top:0"),
        ("top", "top"),
        ("percent:1.5", "percent:1.5"),
        ("percent:0", "percent:0"),
        ("margin:-0.1", "margin:-0.1"),
        ("min:nan", "min:nan"),
        ("max:inf", "max:inf"),
        ("sample:random", "sample:random"),
        ("sample:best:2", "sample:best:2"),
        ("sample:2:random", "sample:2:random"),
        ("top:2,,min:0.1", "empty rule at position 2"),
    ],
)
def test_bad_string_specs_name_the_token(spec, token):
    with pytest.raises(RuleSpecError) as exc:
        parse_rules(spec)
    assert isinstance(exc.value, ValueError)
    assert token in str(exc.value)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ([{"ranks": [1]}], "ranks"),
        ([{"top": 20, "min": 0.1}], "exactly one key"),
        ([{"sample": {"n": 2}}], "missing field"),
        ([{"sample": {"n": 2, "how": "random", "k": 1}}], "unknown field"),
        ([{"percent": "high"}], "high"),
        ([{"top": True}], "top"),
        ([{"bogus": 1}], "bogus"),
        ([3], "3"),
    ],
)
def test_bad_yaml_specs(spec, fragment):
    with pytest.raises(RuleSpecError, match=fragment):
        parse_rules(spec)


def test_rule_constructors_validate():
    with pytest.raises(ValueError):
        RankWindow(0, 5)
    with pytest.raises(ValueError):
        Sample(2, "bottom")
    with pytest.raises(TypeError):
        TopK(2.5)  # type: ignore[arg-type]
    assert MinScore(1) == MinScore(1.0) and isinstance(MinScore(1).x, float)
