"""The mining stage: hard negatives per subset with a real encoder, cached embeddings, resume."""

from __future__ import annotations

import importlib

import pytest

pytest.importorskip("faiss")
pytest.importorskip("sentence_transformers")

from click.testing import CliRunner  # noqa: E402
from helpers.colours import TINY, colour_dataset  # noqa: E402
from helpers.stdlib_docs import MODULES  # noqa: E402

from assay.curation.dataset import Dataset, write_dataset  # noqa: E402
from assay.mining.encoders import EncoderError, load_encoder  # noqa: E402
from assay.mining.stage import MiningError, mine_dataset  # noqa: E402
from assay.pipelines.cli import cli  # noqa: E402


def _docstring_pairs():
    pairs = []
    for name in MODULES:
        doc = (importlib.import_module(name).__doc__ or "").strip()
        first, _, rest = doc.partition("\n")
        if first.strip() and len(rest.split()) > 8:
            pairs.append((first.strip(), " ".join(rest.split()[:80])))
    return pairs


@pytest.fixture(scope="module")
def docs_dataset(tmp_path_factory):
    """Two subsets of real text pairs (stdlib docstrings: first line -> the rest), one duplicate doc."""
    pairs = _docstring_pairs()
    queries, corpus, links = [], [], []
    for i, (q, d) in enumerate(pairs):
        subset = "even" if i % 2 == 0 else "odd"
        queries.append({"query_id": f"q{i}", "subset": subset, "task": "retrieval", "text": q})
        corpus.append({"doc_id": f"d{i}", "subset": subset, "text": d})
        links.append({"query_id": f"q{i}", "doc_id": f"d{i}", "label": "positive"})
    # the same text as q0's positive under another id: a false negative by content
    corpus.append({"doc_id": "d0-copy", "subset": "even", "text": pairs[0][1].upper()})
    path = tmp_path_factory.mktemp("docs") / "ds"
    write_dataset(path, {"queries": queries, "corpus": corpus, "pairs": links}, rows_per_shard=7)
    return path


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("all-MiniLM-L6-v2")


def _pairs(path):
    ds = Dataset(path)
    return [r for n in ds.shards("pairs") for r in ds.read_shard("pairs", n).to_pylist()]


def test_mined_negatives_follow_the_rules_and_never_hit_a_positive(docs_dataset, minilm, tmp_path):
    manifest, stats = mine_dataset(
        docs_dataset, tmp_path / "out", minilm, cache_dir=tmp_path / "cache", rules="ranks:2-6,sample:top:3"
    )
    pairs = _pairs(tmp_path / "out")
    gold = {(p["query_id"], p["doc_id"]) for p in pairs if p["label"] == "positive"}
    mined = [p for p in pairs if p["label"] == "hard_negative"]
    assert len(gold) == len(_pairs(docs_dataset)) and mined
    assert all(2 <= p["rank"] <= 6 for p in mined)
    assert all(p["origin"].startswith(f"mined:{minilm.model_id}:") for p in mined)
    by_query: dict[str, list] = {}
    for p in mined:
        by_query.setdefault(p["query_id"], []).append(p)
        assert (p["query_id"], p["doc_id"]) not in gold
    assert all(len(v) <= 3 for v in by_query.values())
    # q0's positive has a copy (same text, other case): it is never q0's negative
    assert all(p["doc_id"] != "d0-copy" for p in by_query.get("q0", []))
    # within a subset only: odd queries only get odd documents
    subset_of_doc = {f"d{i}": ("even" if i % 2 == 0 else "odd") for i in range(100)} | {"d0-copy": "even"}
    assert all(
        subset_of_doc[p["doc_id"]] == ("even" if int(p["query_id"][1:]) % 2 == 0 else "odd") for p in mined
    )
    # scores are cosines, in rank order per query
    for v in by_query.values():
        scores = [p["score"] for p in sorted(v, key=lambda p: p["rank"])]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    assert (
        set(stats) == {"even", "odd"}
        and stats["even"]["positive_score"]["mean"] > stats["even"]["negative_score"]["mean"]
    )
    # the run's stats are the manifest's plus where this run's search came from (searched: a new cache)
    assert {s: {**v, "search_cached": False} for s, v in manifest.extra["mine"].items()} == stats


def test_remining_with_the_same_encoder_encodes_nothing(docs_dataset, minilm, tmp_path):
    from assay.mining.embed_cache import EmbeddingCache

    mine_dataset(docs_dataset, tmp_path / "a", minilm, cache_dir=tmp_path / "cache", rules="top:5")
    calls = []
    original = minilm.encode
    minilm.encode = lambda rows, side: calls.append(len(rows)) or original(rows, side)
    try:
        mine_dataset(docs_dataset, tmp_path / "b", minilm, cache_dir=tmp_path / "cache", rules="top:5")
    finally:
        minilm.encode = original
    assert calls == []
    assert _pairs(tmp_path / "a") == _pairs(tmp_path / "b")
    with EmbeddingCache(tmp_path / "cache", minilm) as cache:
        assert cache._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] > 0


def test_a_new_round_replaces_the_last_rounds_negatives(docs_dataset, minilm, tmp_path):
    mine_dataset(docs_dataset, tmp_path / "r1", minilm, cache_dir=tmp_path / "c", rules="top:4")
    mine_dataset(tmp_path / "r1", tmp_path / "r2", minilm, cache_dir=tmp_path / "c", rules="ranks:2-3")
    r1 = [p for p in _pairs(tmp_path / "r1") if p["label"] == "hard_negative"]
    r2 = [p for p in _pairs(tmp_path / "r2") if p["label"] == "hard_negative"]
    assert r1 and r2 and all(2 <= p["rank"] <= 3 for p in r2) and len(r2) < len(r1)


def test_a_killed_run_resumes_to_the_same_result(docs_dataset, minilm, tmp_path, monkeypatch):
    import assay.mining.stage as stage

    mine_dataset(
        docs_dataset, tmp_path / "ref", minilm, cache_dir=tmp_path / "c1", rules="ranks:2-8,sample:random:2"
    )
    real = stage._mine_subset
    seen = []

    def dies_on_second(*args, **kw):
        seen.append(args[1])
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(stage, "_mine_subset", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        mine_dataset(
            docs_dataset,
            tmp_path / "out",
            minilm,
            cache_dir=tmp_path / "c2",
            rules="ranks:2-8,sample:random:2",
        )
    monkeypatch.setattr(stage, "_mine_subset", lambda *a, **k: seen.append(a[1]) or real(*a, **k))
    mine_dataset(
        docs_dataset, tmp_path / "out", minilm, cache_dir=tmp_path / "c2", rules="ranks:2-8,sample:random:2"
    )
    assert seen == ["even", "odd", "odd"]  # the finished subset was not mined again
    key = lambda p: (p["query_id"], p["doc_id"], p["label"], p["rank"])  # noqa: E731
    assert sorted(map(key, _pairs(tmp_path / "out"))) == sorted(map(key, _pairs(tmp_path / "ref")))


def test_images_with_an_assay_checkpoint(tmp_path):
    from assay.training.model import MMEmbedder
    from assay.training.tiny import build_tiny

    data = colour_dataset(tmp_path / "colours")
    settings = {k: v for k, v in TINY.items() if k != "seed"}
    model, processor = build_tiny(["a red image", "What colour is it?"], tokens_per_tile=16, **settings)
    MMEmbedder(model, processor).save_pretrained(tmp_path / "ckpt")
    enc = load_encoder(str(tmp_path / "ckpt"), image_root=str(Dataset(data).data_root))
    _, stats = mine_dataset(
        data, tmp_path / "out", enc, cache_dir=tmp_path / "c", rules="top:3", subsets=["retrieval"]
    )
    mined = [p for p in _pairs(tmp_path / "out") if p["label"] == "hard_negative"]
    # text queries ("a red image") against image documents: 16 images, 4 positives each
    assert stats["retrieval"]["queries"] == 4 and len(mined) == 12
    assert all(
        p["doc_id"].startswith("img-") and p["doc_id"].split("-")[1] not in p["query_id"] for p in mined
    )


def test_bad_settings_are_clear(docs_dataset, minilm, tmp_path):
    with pytest.raises(MiningError, match="no subset 'nope'"):
        mine_dataset(docs_dataset, tmp_path / "o", minilm, cache_dir=tmp_path / "c", subsets=["nope"])
    with pytest.raises(EncoderError, match="never downloaded"):
        load_encoder("sentence-transformers/some-other-model")
    with pytest.raises(ValueError):
        mine_dataset(docs_dataset, tmp_path / "o2", minilm, cache_dir=tmp_path / "c", rules="ranks:banana")


def test_mine_command_prints_score_statistics(docs_dataset, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["mine", str(docs_dataset), str(tmp_path / "out"), "--encoder", "all-MiniLM-L6-v2", "--rules", "top:3",
         "--cache", str(tmp_path / "c"), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "positive mean/p50" in result.output and "even" in result.output and "odd" in result.output
    assert "mine: queries=" in result.output


def test_mine_then_judge_keeps_n_per_query(tmp_path):
    from assay.training.model import MMEmbedder
    from assay.training.tiny import build_tiny

    data = colour_dataset(tmp_path / "colours")
    settings = {k: v for k, v in TINY.items() if k != "seed"}
    model, processor = build_tiny(
        ["a red image", "What colour is it?", "yes no"], tokens_per_tile=16, **settings
    )
    MMEmbedder(model, processor).save_pretrained(tmp_path / "ckpt")
    args = ["mine", str(data), str(tmp_path / "out"), "--encoder", str(tmp_path / "ckpt"), "--rules", "top:3",
            "--subset", "retrieval", "--cache", str(tmp_path / "c"), "--judge", str(tmp_path / "ckpt"),
            "--keep", "1", "--judge-cache", str(tmp_path / "j.sqlite"), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "judged 12 mined pairs" in result.output
    mined = [p for p in _pairs(tmp_path / "out.unjudged") if p["label"] == "hard_negative"]
    judged = [p for p in _pairs(tmp_path / "out") if p["label"] in ("hard_negative", "false_negative")]
    assert len(mined) == 12 and all(p["judge_verdict"] in ("yes", "no") for p in judged)
    per_query: dict[str, int] = {}
    for p in judged:
        per_query[p["query_id"]] = per_query.get(p["query_id"], 0) + (p["label"] == "hard_negative")
    assert all(n <= 1 for n in per_query.values())
    bad = CliRunner().invoke(cli, [*args[:5], "--keep", "2", "--cache", str(tmp_path / "c")])
    assert bad.exit_code != 0 and "--keep needs --judge" in bad.output


def test_sentence_transformers_exports_take_the_mined_output(docs_dataset, minilm, tmp_path):
    import pyarrow.parquet as pq

    mine_dataset(docs_dataset, tmp_path / "m", minilm, cache_dir=tmp_path / "c", rules="top:2")
    for fmt in ("triplet", "n-tuple"):
        out = tmp_path / f"{fmt}.parquet"
        extra = ["--num-negatives", "2"] if fmt == "n-tuple" else []
        result = CliRunner().invoke(cli, ["export", str(tmp_path / "m"), str(out), "--format", fmt, *extra])
        assert result.exit_code == 0, result.output
        table = pq.read_table(out)
        assert table.num_rows > 0 and {"anchor", "positive"} <= set(table.column_names)
    triplets = pq.read_table(tmp_path / "triplet.parquet").to_pylist()
    assert all(t["negative"] and t["negative"] != t["positive"] for t in triplets)


def test_gold_positives_carry_the_encoders_cosine(docs_dataset, minilm, tmp_path):
    import numpy as np

    _, stats = mine_dataset(
        docs_dataset, tmp_path / "out", minilm, cache_dir=tmp_path / "c", rules="margin:0.05,top:3"
    )
    pairs = _pairs(tmp_path / "out")
    gold = [p for p in pairs if p["label"] == "positive"]
    assert len(gold) == len(_pairs(docs_dataset)) and all(p["score"] is not None for p in gold)
    ds = Dataset(docs_dataset)
    text = {r.get("query_id") or r.get("doc_id"): r["text"] for t in ("queries", "corpus")
            for n in ds.shards(t) for r in ds.read_shard(t, n).to_pylist()}  # fmt: skip
    q = minilm.encode([{"text": text[p["query_id"]]} for p in gold], "query")
    d = minilm.encode([{"text": text[p["doc_id"]]} for p in gold], "candidate")
    np.testing.assert_allclose([p["score"] for p in gold], (q * d).sum(axis=1), atol=1e-5)
    # the score the margin rule compared against: every negative is 0.05 below its query's positive
    positive = {p["query_id"]: p["score"] for p in gold}
    mined = [p for p in pairs if p["label"] == "hard_negative"]
    assert mined and all(p["score"] < positive[p["query_id"]] - 0.05 + 1e-6 for p in mined)
    # the statistics and the pairs agree
    n_even = sum(1 for p in gold if int(p["query_id"][1:]) % 2 == 0)
    assert stats["even"]["positive_score"]["n"] == n_even
    # a second round scores the positives again (with the encoder of that round) and keeps one row each
    mine_dataset(tmp_path / "out", tmp_path / "again", minilm, cache_dir=tmp_path / "c", rules="top:1")
    again = [p for p in _pairs(tmp_path / "again") if p["label"] == "positive"]
    assert sorted((p["query_id"], p["doc_id"], p["score"]) for p in again) == sorted(
        (p["query_id"], p["doc_id"], p["score"]) for p in gold
    )


def test_a_rule_of_ones_own_goes_query_by_query_to_the_same_result(docs_dataset, minilm, tmp_path):
    from dataclasses import dataclass
    from typing import ClassVar

    from assay.mining.select_batch import batch_supported
    from assay.mining.select_rules import TopK

    @dataclass(frozen=True)
    class FirstThree:  # TopK(3) under another name: the batch path does not know it
        name: ClassVar[str] = "top_k"
        needs_positive_score: ClassVar[bool] = False

        def apply(self, cands, ctx):
            return sorted(cands, key=lambda c: c.rank)[:3]

        def token(self) -> str:
            return "first-three"

    from assay.mining.select_rules import AbsoluteMargin

    built_in, own = [AbsoluteMargin(0.01), TopK(3)], [AbsoluteMargin(0.01), FirstThree()]
    _, batch = mine_dataset(docs_dataset, tmp_path / "b", minilm, cache_dir=tmp_path / "c", rules=built_in)
    _, one = mine_dataset(docs_dataset, tmp_path / "o", minilm, cache_dir=tmp_path / "c", rules=own)
    key = lambda p: (p["query_id"], p["doc_id"], p["label"], p["rank"], p["score"])  # noqa: E731
    assert sorted(map(key, _pairs(tmp_path / "b"))) == sorted(map(key, _pairs(tmp_path / "o")))
    assert batch == one and not batch_supported([FirstThree()])


def test_search_blocks_do_not_change_the_result(docs_dataset, minilm, tmp_path, monkeypatch):
    import assay.mining.stage as stage

    rules = "ranks:2-9,sample:random:3"
    mine_dataset(docs_dataset, tmp_path / "one", minilm, cache_dir=tmp_path / "c", rules=rules)
    monkeypatch.setattr(stage, "SEARCH_BLOCK_ROWS", 10)  # shards of 7 rows: blocks of one shard
    mine_dataset(docs_dataset, tmp_path / "many", minilm, cache_dir=tmp_path / "c", rules=rules)
    assert _pairs(tmp_path / "one") == _pairs(tmp_path / "many")
