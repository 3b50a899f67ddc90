"""The search cache: mining again with the same vectors searches nothing and mines what a search
mines; any other vector, method or a deeper search misses; a broken entry is a miss."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")

from click.testing import CliRunner  # noqa: E402
from helpers.fake_encoder import ContentEncoder  # noqa: E402

import assay.mining.search_cache as search_cache  # noqa: E402
from assay.curation.dataset import Dataset, write_dataset  # noqa: E402
from assay.mining.knn import search  # noqa: E402
from assay.mining.search_cache import SearchCache, cached_search  # noqa: E402
from assay.mining.stage import mine_dataset  # noqa: E402
from assay.pipelines.cli import cli  # noqa: E402


def _dataset(path, changed: str | None = None):
    """60 queries in two subsets, 150 documents; ``changed``: another text for d7."""
    queries, corpus, pairs = [], [], []
    for i in range(150):
        subset = "a" if i % 2 else "b"
        text = changed if (changed and i == 7) else f"document number {i}"
        corpus.append({"doc_id": f"d{i}", "subset": subset, "text": text})
        if i < 60:
            queries.append({"query_id": f"q{i}", "subset": subset, "task": "retrieval", "text": f"query {i}"})
            pairs.append({"query_id": f"q{i}", "doc_id": f"d{i}", "label": "positive"})
    write_dataset(path, {"queries": queries, "corpus": corpus, "pairs": pairs}, rows_per_shard=40)
    return path


def _mined(path):
    ds = Dataset(path)
    rows = [r for n in ds.shards("pairs") for r in ds.read_shard("pairs", n).to_pylist()]
    return sorted((r["query_id"], r["doc_id"], r["label"], r["rank"], r["score"]) for r in rows)


@pytest.fixture
def searches(monkeypatch):
    """Every kNN search the search cache lets through."""
    calls: list[int] = []
    real = search_cache.search
    monkeypatch.setattr(search_cache, "search", lambda q, *a, **kw: calls.append(len(q)) or real(q, *a, **kw))
    return calls


def test_mining_again_with_other_rules_searches_nothing_and_mines_what_a_search_mines(tmp_path, searches):
    ds, cache = _dataset(tmp_path / "ds"), tmp_path / "cache"
    _, first = mine_dataset(ds, tmp_path / "one", ContentEncoder(), cache_dir=cache, rules="top:5")
    assert searches == [30, 30] and not any(s["search_cached"] for s in first.values())
    assert len(list((cache / "search").glob("*.parquet"))) == 2  # one entry per subset

    searches.clear()
    manifest, again = mine_dataset(ds, tmp_path / "two", ContentEncoder(), cache_dir=cache, rules="top:2")
    assert searches == [] and all(s["search_cached"] for s in again.values())
    # the same as searching: every pair, rank and score
    _, fresh = mine_dataset(
        ds, tmp_path / "three", ContentEncoder(), cache_dir=cache, rules="top:2", search_cache=False
    )
    assert searches == [30, 30] and not any(s["search_cached"] for s in fresh.values())
    assert _mined(tmp_path / "two") == _mined(tmp_path / "three")
    # where the search came from is not part of what was mined: the manifests agree
    assert manifest.extra["mine"] == Dataset(tmp_path / "three").manifest.extra["mine"]


def test_one_changed_document_misses_the_cache(tmp_path, searches):
    cache = tmp_path / "cache"
    mine_dataset(
        _dataset(tmp_path / "ds"), tmp_path / "one", ContentEncoder(), cache_dir=cache, rules="top:5"
    )
    searches.clear()
    other = _dataset(tmp_path / "ds2", changed="a document about something else")
    _, stats = mine_dataset(other, tmp_path / "two", ContentEncoder(), cache_dir=cache, rules="top:5")
    # d7 is in subset "a": its search misses; subset "b" has the same vectors and hits
    assert searches == [30] and not stats["a"]["search_cached"] and stats["b"]["search_cached"]


def _vectors(n, d=24, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_an_exact_search_hits_at_any_depth_up_to_the_stored_one(tmp_path, searches):
    q, x = _vectors(200, seed=1), _vectors(900, seed=2)
    x[5] = x[17]  # equal rows: the order of ties comes from the cache as a search gives it
    blocks = lambda first: [(0, x[:400]), (400, x[400:])]  # noqa: E731
    cache = SearchCache(tmp_path)
    cached_search(cache, q, blocks, 40, method="exact")
    for k in (40, 25, 1):
        got, hit = cached_search(cache, q, blocks, k, method="exact")
        want = search(q, blocks(True), k, method="exact")
        assert hit and (got.ids == want.ids).all() and (got.scores == want.scores).all()
    searches.clear()
    deeper, hit = cached_search(cache, q, blocks, 60, method="exact")  # deeper: searched and kept
    assert not hit and searches == [200]
    assert cached_search(cache, q, blocks, 50, method="exact")[1]
    assert len(list(tmp_path.glob("*.parquet"))) == 1  # the deeper result replaced the shallower
    # one row of the last block changed, or the blocks cut elsewhere: another search
    y = x.copy()
    y[850] = x[3]
    assert not cached_search(cache, q, lambda first: [(0, y[:400]), (400, y[400:])], 10, method="exact")[1]
    assert not cached_search(cache, q, lambda first: [(0, x[:500]), (500, x[500:])], 10, method="exact")[1]
    # another method or parameter is another search
    assert not cached_search(cache, q, blocks, 10, method="hnsw")[1]
    assert not cached_search(cache, q, blocks, 10, method="hnsw", ef_search=64)[1]


def test_an_approximate_search_hits_only_at_its_own_depth(tmp_path):
    q, x = _vectors(100, seed=3), _vectors(500, seed=4)
    blocks = lambda first: [(0, x)]  # noqa: E731
    cache = SearchCache(tmp_path)
    cached_search(cache, q, blocks, 20, method="hnsw")
    assert cached_search(cache, q, blocks, 20, method="hnsw")[1]
    assert not cached_search(cache, q, blocks, 10, method="hnsw")[1]  # HNSW's beam depends on k


def test_a_broken_entry_is_a_miss_and_is_replaced(tmp_path):
    q, x = _vectors(50, seed=5), _vectors(300, seed=6)
    blocks = lambda first: [(0, x)]  # noqa: E731
    cache = SearchCache(tmp_path)
    cached_search(cache, q, blocks, 10, method="exact")
    (entry,) = tmp_path.glob("*.parquet")
    entry.write_bytes(entry.read_bytes()[:100])  # cut short
    got, hit = cached_search(cache, q, blocks, 10, method="exact")
    assert not hit and (got.ids == search(q, blocks(True), 10, method="exact").ids).all()
    assert cached_search(cache, q, blocks, 10, method="exact")[1]


def _two_blocks(x, passes: list[bool]):
    """``blocks(first)`` over x in two halves, noting each pass's ``first`` in ``passes``."""

    def blocks(first):
        passes.append(first)
        yield from [(0, x[:200]), (200, x[200:])]

    return blocks


def test_a_corpus_too_large_to_hold_is_read_again_for_the_search(tmp_path, monkeypatch):
    q, x = _vectors(60, seed=7), _vectors(400, seed=8)
    passes: list[bool] = []
    blocks = _two_blocks(x, passes)

    monkeypatch.setattr(search_cache, "HOLD_BYTES", x[:200].nbytes)  # holds one block, not two
    got, hit = cached_search(SearchCache(tmp_path), q, blocks, 15, method="exact")
    assert passes == [True, False] and not hit
    assert (got.ids == search(q, [(0, x[:200]), (200, x[200:])], 15, method="exact").ids).all()
    passes.clear()
    monkeypatch.setattr(search_cache, "HOLD_BYTES", x.nbytes)
    cached_search(SearchCache(tmp_path / "other"), q, blocks, 15, method="exact")
    assert passes == [True]  # held: one pass


def test_without_a_lookup_the_search_reads_the_corpus_once_and_is_kept(tmp_path, monkeypatch):
    """New query vectors (just encoded) cannot hit: one pass, searched as it is hashed, then kept."""
    q, x = _vectors(60, seed=9), _vectors(400, seed=10)
    passes: list[bool] = []
    blocks = _two_blocks(x, passes)

    monkeypatch.setattr(search_cache, "HOLD_BYTES", 0)  # holds nothing: a lookup would read twice
    cache = SearchCache(tmp_path)
    got, hit = cached_search(cache, q, blocks, 15, lookup=False, method="exact")
    assert passes == [True] and not hit
    assert (got.ids == search(q, [(0, x[:200]), (200, x[200:])], 15, method="exact").ids).all()
    again, hit = cached_search(cache, q, blocks, 15, method="exact")  # the same key as a lookup's
    assert hit and (again.ids == got.ids).all() and (again.scores == got.scores).all()


def test_the_cli_says_when_the_search_came_from_the_cache(tmp_path):
    ds = _dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    base = ["mine", str(ds), "--encoder", "all-MiniLM-L6-v2", "--rules", "top:3", "--cache", str(cache), "--no-progress"]  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(cli, [*base[:2], str(tmp_path / "one"), *base[2:]])
    assert first.exit_code == 0, first.output
    assert "from the search cache" not in first.output
    again = runner.invoke(cli, [*base[:2], str(tmp_path / "two"), *base[2:]])
    assert again.exit_code == 0, again.output
    assert again.output.count("search: from the search cache") == 2  # both subsets
    off = runner.invoke(cli, [*base[:2], str(tmp_path / "three"), *base[2:], "--no-search-cache"])
    assert off.exit_code == 0, off.output
    assert "from the search cache" not in off.output
    assert _mined(tmp_path / "two") == _mined(tmp_path / "three")
