"""Mining against a corpus pool bigger than the labelled pairs (`mine_dataset(..., corpus=[...])`)."""

from __future__ import annotations

import hashlib
import importlib
import inspect

import pytest

pytest.importorskip("faiss")
pytest.importorskip("sentence_transformers")

from click.testing import CliRunner  # noqa: E402
from helpers.colours import png  # noqa: E402
from helpers.fake_encoder import ContentEncoder  # noqa: E402
from helpers.stdlib_docs import MODULES  # noqa: E402

import assay.mining.pools as pools  # noqa: E402
import assay.mining.stage as stage  # noqa: E402
from assay.curation.dataset import Dataset, DatasetError, write_dataset  # noqa: E402
from assay.mining.embed_cache import EmbeddingCache  # noqa: E402
from assay.mining.encoders import load_encoder  # noqa: E402
from assay.mining.pools import PoolError  # noqa: E402
from assay.mining.stage import mine_dataset  # noqa: E402
from assay.pipelines.cli import cli  # noqa: E402

RULES = "top:5"
COPIED = (0, 3, 6)  # queries whose positive has a content duplicate (another id) in the pool
SHARED = 9  # d9 is in the pool too: the same id, the same document


def _member_docs(module) -> list[str]:
    """Docstrings (first 50 words) of a module's own public functions and classes."""
    docs = []
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
        obj = getattr(module, attr, None)
        if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        words = (inspect.getdoc(obj) or "").split() if obj.__module__ == module.__name__ else []
        if len(words) > 8:
            docs.append(" ".join(words[:50]))
    return docs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DATASET: module docstrings (first line -> the rest), two subsets; POOL: four times as many
    documents (the modules' functions and classes, in their module's subset), plus copies of three
    positives under other ids, one of DATASET's documents under its own id, and a foreign subset."""
    queries, corpus, pairs = [], [], []
    members: dict[str, list[dict]] = {"even": [], "odd": []}
    for name in MODULES:
        module = importlib.import_module(name)
        first, _, rest = (module.__doc__ or "").strip().partition("\n")
        if not first.strip() or len(rest.split()) <= 8:
            continue
        i, subset = len(queries), ("even" if len(queries) % 2 == 0 else "odd")
        queries.append({"query_id": f"q{i}", "subset": subset, "task": "retrieval", "text": first.strip()})
        corpus.append({"doc_id": f"d{i}", "subset": subset, "text": " ".join(rest.split()[:50])})
        pairs.append({"query_id": f"q{i}", "doc_id": f"d{i}", "label": "positive"})
        members[subset] += [
            {"doc_id": f"{name}.{j}", "subset": subset, "text": t} for j, t in enumerate(_member_docs(module))
        ]
    # four times the pairs' documents, as many per subset as the subset has documents
    pool = [
        m for subset, docs in members.items() for m in docs[: 4 * sum(c["subset"] == subset for c in corpus)]
    ]
    assert len(pool) == 4 * len(corpus)
    pool += [{"doc_id": f"copy-of-d{i}", **{k: corpus[i][k] for k in ("subset", "text")}} for i in COPIED]
    # content equal after normalisation: a duplicate too
    pool.append({**pool[-len(COPIED)], "doc_id": f"upper-copy-of-d{COPIED[0]}"})
    pool[-1]["text"] = pool[-1]["text"].upper()
    pool.append(dict(corpus[SHARED]))
    pool += [
        {"doc_id": f"far-{j}", "subset": "elsewhere", "text": f"nothing mined here {j}"} for j in range(3)
    ]
    root = tmp_path_factory.mktemp("corpus")
    write_dataset(root / "ds", {"queries": queries, "corpus": corpus, "pairs": pairs}, rows_per_shard=7)
    # a documents-only dataset: empty queries and pairs tables
    write_dataset(root / "pool", {"queries": [], "corpus": pool, "pairs": []}, rows_per_shard=40)
    return root / "ds", root / "pool"


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One embedding cache for the module: each text is encoded once (test_mine.py covers the cache)."""
    return tmp_path_factory.mktemp("embeddings")


def _rows(path, table):
    ds = Dataset(path)
    return [r for n in ds.shards(table) for r in ds.read_shard(table, n).to_pylist()]


def _snapshot(path):
    """Everything of a dataset a user reads: each table's rows (sorted) and shard names."""
    key = lambda r: tuple(str(v) for v in r.values())  # noqa: E731
    ds = Dataset(path)
    return {t: (ds.shards(t), sorted(_rows(path, t), key=key)) for t in ("queries", "corpus", "pairs")}


def _validate(path, out):
    result = CliRunner().invoke(cli, ["validate", str(path), str(out)])
    assert result.exit_code == 0, result.output
    return Dataset(out).manifest


def test_negatives_come_from_the_pool_and_the_output_is_whole(data, cache, minilm, tmp_path, monkeypatch):
    ds_path, pool_path = data
    batches = []
    real_embed = EmbeddingCache.embed_table
    monkeypatch.setattr(
        EmbeddingCache,
        "embed_table",
        lambda self, t, *a, **k: batches.append(t.num_rows) or real_embed(self, t, *a, **k),
    )
    manifest, stats = mine_dataset(
        ds_path, tmp_path / "out", minilm, cache_dir=cache, rules=RULES, corpus=[pool_path]
    )
    pool_ids = {r["doc_id"] for r in _rows(pool_path, "corpus")}
    own_ids = {r["doc_id"] for r in _rows(ds_path, "corpus")}
    pairs = _rows(tmp_path / "out", "pairs")
    mined = [p for p in pairs if p["label"] == "hard_negative"]
    from_pool = [p for p in mined if p["doc_id"] not in own_ids]
    assert mined and {p["doc_id"] for p in from_pool} <= pool_ids
    # the pool is 4x DATASET's corpus: most of the top 5 come from it
    assert len(from_pool) >= 0.6 * len(mined), (len(from_pool), len(mined))
    assert sum(s["pool_negatives"] for s in stats.values()) == len(from_pool)
    # no gold positive, and no copy of a positive's content (same text; upper-cased), is a negative
    gold = {(p["query_id"], p["doc_id"]) for p in pairs if p["label"] == "positive"}
    assert not gold & {(p["query_id"], p["doc_id"]) for p in mined}
    copies = {f"q{i}": {f"copy-of-d{i}"} for i in COPIED}
    copies[f"q{COPIED[0]}"].add(f"upper-copy-of-d{COPIED[0]}")
    assert all(p["doc_id"] not in copies.get(p["query_id"], ()) for p in mined)
    # ... though the copies (the positive's own vector) would be in the top 5 where the positive is
    score = {(p["query_id"], p["label"]): p["score"] for p in pairs}
    worst = {q: min(p["score"] for p in mined if p["query_id"] == q) for q in copies}
    near = [q for q in copies if score[q, "positive"] > worst[q]]
    assert len(near) >= 2 and stats["even"]["dropped"]["same_content_as_positive"] >= len(near)
    # within a subset only; the foreign subset is never searched
    subset_of = {r["doc_id"]: r["subset"] for r in _rows(pool_path, "corpus") + _rows(ds_path, "corpus")}
    query_subset = {r["query_id"]: r["subset"] for r in _rows(ds_path, "queries")}
    assert all(subset_of[p["doc_id"]] == query_subset[p["query_id"]] for p in mined)
    # self-contained: every referenced document is in the output's corpus, once; the pool's copy of d9 is d9
    corpus = _rows(tmp_path / "out", "corpus")
    ids = [r["doc_id"] for r in corpus]
    assert len(ids) == len(set(ids)) and {p["doc_id"] for p in pairs} <= set(ids)
    assert set(ids) == own_ids | {p["doc_id"] for p in from_pool}
    checked = _validate(tmp_path / "out", tmp_path / "valid")
    assert checked.counts["quarantine"] == 0 and checked.counts["pairs"] == len(pairs)
    # the manifest names the pool and counts what it gave
    (summary,) = manifest.extra["corpus"]
    assert manifest.config["corpus"][0]["path"] == summary["path"] == str(pool_path.resolve())
    assert (
        summary["manifest_sha256"] == hashlib.sha256((pool_path / "manifest.json").read_bytes()).hexdigest()
    )
    assert summary["ignored"] == {"elsewhere": 3} and summary["same_doc"] == 1
    assert summary["documents"] == len(pool_ids) and summary["searched"] == len(pool_ids) - 4
    assert summary["negatives"] == len(from_pool) and summary["added"] == len(
        {p["doc_id"] for p in from_pool}
    )
    # out of core: the pool went through the cache shard by shard (40 rows), never whole
    assert max(batches) <= 40 and sum(batches) > len(pool_ids)


def test_a_killed_run_resumes_to_the_same_output(data, cache, minilm, tmp_path, monkeypatch):
    ds_path, pool_path = data
    monkeypatch.setattr(pools, "COPY_SHARD_ROWS", 10)  # several shards of copied documents
    ref, _ = mine_dataset(ds_path, tmp_path / "ref", minilm, cache_dir=cache, rules=RULES, corpus=[pool_path])
    assert len(Dataset(tmp_path / "ref").shards("corpus")) > len(Dataset(ds_path).shards("corpus")) + 1
    # killed while mining the second subset
    real_mine, seen = stage._mine_subset, []

    def dies_on_second(*args, **kw):
        seen.append(args[1])
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real_mine(*args, **kw)

    monkeypatch.setattr(stage, "_mine_subset", dies_on_second)
    run = dict(cache_dir=cache, rules=RULES, corpus=[pool_path])
    with pytest.raises(KeyboardInterrupt):
        mine_dataset(ds_path, tmp_path / "out", minilm, **run)
    monkeypatch.setattr(stage, "_mine_subset", real_mine)
    # another pool does not resume into this run
    other = write_dataset(tmp_path / "other", {"corpus": _rows(pool_path, "corpus")[:20]})
    with pytest.raises(DatasetError, match="unfinished 'mine' run with other inputs"):
        mine_dataset(ds_path, tmp_path / "out", minilm, **{**run, "corpus": [other.root]})
    # resumed, then killed while copying the pool's documents, after the first shard
    real_write, writes = pools._write, []

    def dies_on_second_write(*args):
        writes.append(args[1])
        if len(writes) == 2:
            raise KeyboardInterrupt
        real_write(*args)

    monkeypatch.setattr(pools, "_write", dies_on_second_write)
    with pytest.raises(KeyboardInterrupt):
        mine_dataset(ds_path, tmp_path / "out", minilm, **run)
    monkeypatch.setattr(pools, "_write", real_write)
    done, _ = mine_dataset(ds_path, tmp_path / "out", minilm, **run)
    assert _snapshot(tmp_path / "out") == _snapshot(tmp_path / "ref")
    assert done.extra == ref.extra and done.config == ref.config
    # a rerun finds it complete; the same pool again gives the same output
    again, _ = mine_dataset(ds_path, tmp_path / "out", minilm, **run)
    assert again.run_id == done.run_id and _snapshot(tmp_path / "out") == _snapshot(tmp_path / "ref")
    with pytest.raises(DatasetError, match="made by other inputs or settings"):
        mine_dataset(ds_path, tmp_path / "out", minilm, **{**run, "corpus": [other.root]})


def test_the_next_round_meets_the_copied_documents_as_the_same_documents(data, cache, minilm, tmp_path):
    ds_path, pool_path = data
    run = dict(cache_dir=cache, rules=RULES, corpus=[pool_path])
    mine_dataset(ds_path, tmp_path / "r1", minilm, **run)
    m2, _ = mine_dataset(tmp_path / "r1", tmp_path / "r2", minilm, **run)
    added = m2.extra["corpus"][0]
    copied = len(_rows(tmp_path / "r1", "corpus")) - len(_rows(ds_path, "corpus"))
    assert added["same_doc"] == 1 + copied

    # the same encoder and rules find the same negatives, now all in the input's corpus: nothing to copy
    def negatives(path):
        return {(r["query_id"], r["doc_id"], r["rank"]) for r in _rows(path, "pairs") if r["rank"]}

    assert negatives(tmp_path / "r2") == negatives(tmp_path / "r1")
    assert added["added"] == added["negatives"] == 0 and copied > 0
    ids = [r["doc_id"] for r in _rows(tmp_path / "r2", "corpus")]
    assert len(ids) == len(set(ids))
    assert _validate(tmp_path / "r2", tmp_path / "v2").counts["quarantine"] == 0


def test_an_id_naming_two_documents_is_an_error(data, cache, minilm, tmp_path):
    ds_path, pool_path = data
    rows = [{"doc_id": "d4", "subset": "even", "text": "another text under the id d4"}]
    bad = write_dataset(tmp_path / "bad", {"corpus": rows})
    with pytest.raises(PoolError) as err:
        mine_dataset(
            ds_path,
            tmp_path / "o",
            minilm,
            cache_dir=cache,
            rules=RULES,
            corpus=[pool_path, bad.root],
        )
    text = str(err.value)
    assert "'d4'" in text and str(ds_path) in text and str(tmp_path / "bad") in text and "text differ" in text
    assert not (tmp_path / "o").exists()  # refused before anything was written
    # in a subset the run does not mine, the clash does not matter
    elsewhere = write_dataset(tmp_path / "else", {"corpus": [{**rows[0], "subset": "elsewhere"}]})
    m, _ = mine_dataset(
        ds_path, tmp_path / "o2", minilm, cache_dir=cache, rules=RULES, corpus=[elsewhere.root]
    )
    assert m.extra["corpus"][0]["ignored"] == {"elsewhere": 1}


def test_pool_images_by_path_are_copied_inline(tmp_path):
    """A pool with its own data root: its image paths would not resolve under the output's."""
    shades = [png((10 * k, 200 - 10 * k, 40)) for k in range(12)]
    queries = [
        {"query_id": f"q{k}", "subset": "img", "task": "retrieval", "text": f"shade {k}"} for k in range(3)
    ]
    corpus = [
        {"doc_id": f"img{k}", "subset": "img", "image": {"bytes": shades[k], "path": None}} for k in range(3)
    ]
    pairs = [{"query_id": f"q{k}", "doc_id": f"img{k}", "label": "positive"} for k in range(3)]
    write_dataset(tmp_path / "ds", {"queries": queries, "corpus": corpus, "pairs": pairs})
    (tmp_path / "pictures" / "images").mkdir(parents=True)
    pool = []
    for k in range(3, 12):
        (tmp_path / "pictures" / "images" / f"s{k}.png").write_bytes(shades[k])
        pool.append(
            {"doc_id": f"pool{k}", "subset": "img", "image": {"bytes": None, "path": f"images/s{k}.png"}}
        )
    write_dataset(tmp_path / "pool", {"corpus": pool}, data_root=str(tmp_path / "pictures"))
    mine_dataset(
        tmp_path / "ds",
        tmp_path / "out",
        ContentEncoder(),
        cache_dir=tmp_path / "c",
        rules="top:4",
        corpus=[tmp_path / "pool"],
    )
    copied = [r for r in _rows(tmp_path / "out", "corpus") if r["doc_id"].startswith("pool")]
    assert copied and all(
        r["image"]["bytes"] == shades[int(r["doc_id"][4:])] and r["image"]["path"] is None for r in copied
    )
    assert _validate(tmp_path / "out", tmp_path / "v").counts["quarantine"] == 0


def test_mine_command_takes_corpus_pools(data, cache, tmp_path):
    ds_path, pool_path = data
    assert "--corpus" in CliRunner().invoke(cli, ["mine", "--help"]).output
    result = CliRunner().invoke(
        cli,
        ["mine", str(ds_path), str(tmp_path / "out"), "--encoder", "all-MiniLM-L6-v2", "--rules", RULES,
         "--corpus", str(pool_path), "--cache", str(cache), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = Dataset(tmp_path / "out").manifest.extra["corpus"][0]
    assert (
        f"corpus {summary['path']}: {summary['documents']} documents" in result.output
        and f"{summary['negatives']} negatives" in result.output
    )
    assert "3 ignored (subsets not in the dataset: elsewhere)" in result.output
