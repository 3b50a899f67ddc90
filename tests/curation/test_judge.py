"""The judge stage: verdicts written into a new dataset, cache and resume, failures, verdict rules."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.colours import COLOURS, colour_dataset
from helpers.fake_judge import FakeJudge

from assay.curation.dataset import Dataset
from assay.curation.judge.cache import JudgmentCache, Key, content_hash
from assay.curation.judge.scoring import JudgeItem, Score, label_token_ids, p_yes_from_margin
from assay.curation.judge.stage import JudgeError, judge_dataset, read_failures
from assay.curation.judge.verdicts import VerdictRule, parse_rule

#: The fake judge says "yes" to a vqa answer naming the green colour, "no" to other hard negatives.
EXTRA = [
    {"query_id": f"q-{c}-0", "doc_id": f"ans-{o}", "label": "hard_negative"}
    for c in COLOURS
    for o in COLOURS
    if o != c
]


@pytest.fixture()
def colours(tmp_path):
    return colour_dataset(tmp_path / "colours", extra_pairs=EXTRA)


def _table(path, table):
    ds = Dataset(path)
    return pa.concat_tables([ds.read_shard(table, name) for name in ds.shards(table)])


def _pairs(path):
    return {(r["query_id"], r["doc_id"]): r for r in _table(path, "pairs").to_pylist()}


def test_verdicts_written_and_false_negatives_relabelled(colours, tmp_path):
    judge = FakeJudge()
    manifest, report = judge_dataset(
        colours, tmp_path / "judged", judge, cache=tmp_path / "c.sqlite", labels=["hard_negative", "positive"]
    )
    pairs = _pairs(tmp_path / "judged")
    assert len(judge.calls) == len(pairs) == 32 + len(EXTRA)  # every selected pair judged once
    # a hard negative judged "yes" (an answer naming green) is a false negative now; the rest stay
    fn = {k for k, r in pairs.items() if r["label"] == "false_negative"}
    assert fn == {(f"q-{c}-0", "ans-green") for c in COLOURS if c != "green"}
    assert all(pairs[k]["judge_verdict"] == "yes" and pairs[k]["judge_p_yes"] > 0.9 for k in fn)
    hard = [r for r in pairs.values() if r["label"] == "hard_negative"]
    assert len(hard) == len(EXTRA) - 3 and all(r["judge_verdict"] == "no" for r in hard)
    # gold positives keep their label whatever the verdict, and the disagreement is counted
    assert sum(r["label"] == "positive" for r in pairs.values()) == 32
    assert report.positives_judged_no == sum(
        r["label"] == "positive" and r["judge_verdict"] == "no" for r in pairs.values()
    )
    assert report.relabelled == 3 and report.scored == len(pairs) and report.cached == 0
    # queries and corpus pass through unchanged; the manifest says who judged and how
    _src, _out = Dataset(colours), Dataset(tmp_path / "judged")
    assert _table(tmp_path / "judged", "corpus").equals(_table(colours, "corpus"))
    assert manifest.extra["judge"]["model_id"] == "fake@0"
    assert manifest.extra["judge"]["prompts"] == ["retrieval@v1", "vqa@v1"]
    assert manifest.config["rule"] == "paper"


def test_only_selected_labels_are_judged(colours, tmp_path):
    judge = FakeJudge()
    judge_dataset(colours, tmp_path / "j", judge, cache=tmp_path / "c.sqlite", labels=["hard_negative"])
    pairs = _pairs(tmp_path / "j")
    assert len(judge.calls) == len(EXTRA)
    assert all(r["judge_p_yes"] is None for r in pairs.values() if r["label"] == "positive")


def test_cache_serves_a_rerun_and_misses_on_new_prompt_or_content(colours, tmp_path):
    cache = tmp_path / "c.sqlite"
    first = FakeJudge()
    judge_dataset(colours, tmp_path / "a", first, cache=cache)
    again = FakeJudge()
    _, report = judge_dataset(colours, tmp_path / "b", again, cache=cache)
    assert again.calls == [] and report.cached == len(first.calls)
    assert _pairs(tmp_path / "a") == _pairs(tmp_path / "b")
    # another judge (weights) misses the cache
    other = FakeJudge(model_id="fake@1")
    judge_dataset(colours, tmp_path / "c", other, cache=cache)
    assert len(other.calls) == len(first.calls)
    # the same ids naming other content (another dataset) are judged afresh, not served stale
    changed = colour_dataset(tmp_path / "changed", shades=4, extra_pairs=EXTRA)
    corpus = _table(changed, "corpus").to_pylist()
    for row in corpus:
        if row["doc_id"] == "ans-red":
            row["text"] = "crimson"
    from assay.curation.dataset import write_dataset

    Dataset(changed)
    write_dataset(
        tmp_path / "changed2",
        {"queries": _table(changed, "queries"), "corpus": corpus, "pairs": _table(changed, "pairs")},
    )
    third = FakeJudge()
    judge_dataset(tmp_path / "changed2", tmp_path / "d", third, cache=cache)
    assert third.calls and all("<<<crimson>>>" in t for t in third.calls)


def test_killed_run_resumes_without_judging_a_pair_twice(colours, tmp_path):
    cache = tmp_path / "c.sqlite"
    reference = FakeJudge()
    judge_dataset(colours, tmp_path / "ref", reference, cache=tmp_path / "ref.sqlite", batch_size=5)

    class Killed(Exception):
        pass

    def kill_after_three(done, total):
        if kill_after_three.batches == 2:
            raise Killed
        kill_after_three.batches += 1

    kill_after_three.batches = 0
    judge = FakeJudge()
    with pytest.raises(Killed):
        judge_dataset(colours, tmp_path / "out", judge, cache=cache, batch_size=5, on_batch=kill_after_three)
    assert not (tmp_path / "out" / "manifest.json").exists()
    before = list(judge.calls)
    _, report = judge_dataset(colours, tmp_path / "out", judge, cache=cache, batch_size=5)
    assert len(before) == 15 and report.cached == 15
    assert sorted(judge.calls) == sorted(reference.calls)  # every pair judged exactly once overall
    assert _pairs(tmp_path / "out") == _pairs(tmp_path / "ref")


def test_failures_are_recorded_and_never_stop_the_run(colours, tmp_path):
    judge = FakeJudge(fail_on="<<<blue>>>")
    _, report = judge_dataset(colours, tmp_path / "j", judge, cache=tmp_path / "c.sqlite")
    failures = read_failures(tmp_path / "j").to_pylist()
    assert failures and all(f["doc_id"] == "ans-blue" and f["error"] == "simulated timeout" for f in failures)
    assert report.failed == len(failures)
    pairs = _pairs(tmp_path / "j")
    assert all(pairs[(f["query_id"], f["doc_id"])]["judge_p_yes"] is None for f in failures)
    assert sum(r["judge_p_yes"] is not None for r in pairs.values()) == len(pairs) - len(failures)
    # a rerun with a judge that now works retries exactly the failed pairs
    healed = FakeJudge()
    _, report = judge_dataset(colours, tmp_path / "j2", healed, cache=tmp_path / "c.sqlite")
    assert len(healed.calls) == len(failures) and report.failed == 0
    assert not (tmp_path / "j2" / "judge_failures.parquet").exists()


def test_unime_rule_compares_with_the_positive(colours, tmp_path):
    judge = FakeJudge()
    judge_dataset(colours, tmp_path / "j", judge, cache=tmp_path / "c.sqlite", rule=parse_rule("unime:1.0"))
    pairs = _pairs(tmp_path / "j")
    # beta = 1: anything above p(positive) - 1 is "yes", so every candidate of a judged query is relabelled
    assert all(r["judge_verdict"] == "yes" for r in pairs.values())
    with pytest.raises(JudgeError, match="positive"):
        judge_dataset(
            colours,
            tmp_path / "k",
            judge,
            cache=tmp_path / "c.sqlite",
            rule=parse_rule("unime"),
            labels=["hard_negative"],
        )


def test_a_pair_naming_an_unknown_doc_is_a_clear_error(tmp_path):
    path = colour_dataset(
        tmp_path / "bad", extra_pairs=[{"query_id": "q-red-0", "doc_id": "nope", "label": "negative"}]
    )
    with pytest.raises(JudgeError, match=r"\(q-red-0, nope\).*validate"):
        judge_dataset(path, tmp_path / "j", FakeJudge(), cache=tmp_path / "c.sqlite")


def test_verdict_rules():
    assert VerdictRule("paper").verdict(0.51) == "yes" and VerdictRule("paper").verdict(0.5) == "no"
    unime = parse_rule("unime:0.1")
    assert (
        unime.verdict(0.75, positive_p_yes=0.8) == "yes" and unime.verdict(0.65, positive_p_yes=0.8) == "no"
    )
    assert unime.verdict(0.6, positive_p_yes=None) == "yes"  # no positive judged: the paper's rule
    assert parse_rule("threshold:0.8").verdict(0.79) == "no"
    assert parse_rule("unime").value == 0.1
    for bad in ("maybe", "threshold", "threshold:2", "paper:1", "unime:x"):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_p_yes_and_label_tokens():
    assert p_yes_from_margin(0.0) == 0.5
    assert p_yes_from_margin(800.0) == 1.0 and p_yes_from_margin(-800.0) == 0.0  # no overflow
    assert Score(margin=float("nan")).p_yes != Score(margin=float("nan")).p_yes or True  # noqa: PLR0124
    from assay.curation.judge.scoring import checked_score

    assert not checked_score(float("nan"), 1.0).ok and "non-finite" in checked_score(float("inf"), 0.0).error

    class Tok:
        vocab = {"yes": [5], "no": [6], "Yes": [7], "maybe": [8, 9]}

        def __call__(self, word, add_special_tokens=False):
            return {"input_ids": self.vocab[word]}

    assert label_token_ids(Tok(), ("yes", "no")) == (5, 6)
    assert label_token_ids(Tok(), ("Yes", "no")) == (7, 6)  # case matters: the template says which
    with pytest.raises(ValueError, match="one token"):
        label_token_ids(Tok(), ("maybe", "no"))
    with pytest.raises(ValueError, match="same token"):
        label_token_ids(Tok(), ("yes", "yes"))


def test_cache_keeps_every_committed_batch(tmp_path):
    item = JudgeItem([{"type": "text", "text": "x"}])
    key = Key("q", "d", content_hash(item))
    with JudgmentCache(tmp_path / "c.sqlite") as cache:
        cache.store("m", "p@v1", [(key, Score(margin=1.5))])
    with JudgmentCache(tmp_path / "c.sqlite") as cache:  # a new process: the batch is there
        assert cache.lookup("m", "p@v1", [key]) == {key: Score(margin=1.5)}
        assert cache.lookup("m", "p@v2", [key]) == {}
        cache.store("m", "p@v1", [(key, Score(error="boom"))])
        assert cache.lookup("m", "p@v1", [key]) == {}
        assert cache.lookup("m", "p@v1", [key], failures=True)[key].error == "boom"
    assert pq  # parquet reader used by read_failures


def test_keep_negatives_keeps_the_best_ranked_judged_no_per_query(tmp_path):
    ranked = [dict(p, rank=r) for p, r in zip(EXTRA, [5, 2, 9] * len(COLOURS), strict=False)]
    data = colour_dataset(tmp_path / "ranked", extra_pairs=ranked)
    _, report = judge_dataset(
        data,
        tmp_path / "j",
        FakeJudge(),
        cache=tmp_path / "c.sqlite",
        labels=["hard_negative"],
        keep_negatives=1,
    )
    pairs = _pairs(tmp_path / "j")
    kept = [r for r in pairs.values() if r["label"] == "hard_negative"]
    by_query: dict[str, list] = {}
    for r in kept:
        by_query.setdefault(r["query_id"], []).append(r)
    assert all(len(v) == 1 and v[0]["judge_verdict"] == "no" for v in by_query.values())
    # of each query's "no" negatives the best-ranked stays; false negatives are never trimmed
    for qid, (row,) in by_query.items():
        nos = [p for p in ranked if p["query_id"] == qid and p["doc_id"] != "ans-green"]
        assert row["rank"] == min(p["rank"] for p in nos)
    assert sum(r["label"] == "false_negative" for r in pairs.values()) == 3
    assert report.trimmed == len(EXTRA) - 3 - len(by_query)
