"""`assay curate`: validate -> dedup -> judge -> filter, the stage functions composed, gives what the
four commands give run one after the other; its judge runs in an actor pool through the cache; bad
rows are quarantined; a finished run is not redone; a killed run resumes; it runs on a Ray cluster."""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from helpers.badrows import make_fuzz_rows, marker_of, queries_table  # noqa: E402
from helpers.colours import COLOURS, TINY  # noqa: E402
from helpers.kill import assert_same_dataset, run_and_kill  # noqa: E402
from helpers.ray_head import ray_head  # noqa: E402
from PIL import Image  # noqa: E402

from assay.curation.dataset import Dataset, write_dataset  # noqa: E402
from assay.curation.quarantine import decode_record  # noqa: E402
from assay.pipelines.cli import cli  # noqa: E402
from assay.pipelines.commands import curate  # noqa: E402
from assay.training.model import MMEmbedder  # noqa: E402
from assay.training.tiny import build_tiny  # noqa: E402

pytestmark = pytest.mark.ray

#: Drops the corpus subset "drop-me" (and so, as dangling, the pair naming its document).
WHERE = "not startswith(subset, 'drop')"


def _noise_png(seed: int, changed: int = 0, step: int = 1) -> bytes:
    """A 32x32 noise image; ``changed`` pixels set to black (``step`` apart on the diagonal) make a
    near duplicate of it."""
    rng = random.Random(seed)
    img = Image.new("RGB", (32, 32))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(32 * 32)])
    for i in range(changed):
        img.putpixel((i * step, i * step), (0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _dataset(root: Path) -> tuple[Dataset, Dataset, dict[str, tuple[str, str]]]:
    """Every kind of bad row (helpers.badrows), exact and near duplicates, a copy of an eval query,
    a duplicate document (its pairs rewritten, one then repeating another), a document the filter
    drops, and near copies whose targets disagree (a query answered otherwise, a document a query
    tells apart: kept, conflicts) or agree through a duplicate document (folded); several shards per
    table. Returns (dataset, eval dataset, bad row marker -> (table, reason))."""
    queries, corpus, pairs, expected = make_fuzz_rows(
        root / "data", root / "outside", n_good=30, n_bad=25, seed=1, max_text_chars=1000
    )
    for i, changed in enumerate([0, 0, 2, 0]):  # two exact copies of dup-0, and a near copy (2 pixels)
        image = {"bytes": _noise_png(7 if i < 3 else 8, changed), "path": None}
        queries.append(
            {"query_id": f"dup-{i}", "subset": "s", "task": "vqa", "text": "Which?", "image": image}
        )
        pairs.append({"query_id": f"dup-{i}", "doc_id": "d-good", "label": "positive", "score": 1.0})
    corpus.append({"doc_id": "d-copy", "subset": "s", "text": "A good  document"})  # = d-good, normalised
    corpus.append({"doc_id": "d-drop", "subset": "drop-me", "text": "a document the filter drops"})
    # near copies of dup-0: answered with d-copy (= d-good by content: the same targets, folded), and
    # with another document (a conflict, kept)
    for qid, changed, doc in (("near-same", 3, "d-copy"), ("near-other", 4, "d-other")):
        image = {"bytes": _noise_png(7, changed, step=5), "path": None}
        queries.append({"query_id": qid, "subset": "s", "task": "vqa", "text": "Which?", "image": image})
        pairs.append({"query_id": qid, "doc_id": doc, "label": "positive", "score": 1.0})
    # near-copy pictures in the corpus: img-b is told apart from img-a by q-good-6 (kept), img-c is not
    for did, changed in (("img-a", 0), ("img-b", 2), ("img-c", 3)):
        corpus.append(
            {
                "doc_id": did,
                "subset": "s",
                "text": None,
                "image": {"bytes": _noise_png(9, changed), "path": None},
            }
        )
    pairs += [
        {"query_id": "q-good-6", "doc_id": "img-a", "label": "positive", "score": 1.0},
        {"query_id": "q-good-6", "doc_id": "img-b", "label": "hard_negative", "score": 0.3},
        {"query_id": "q-good-7", "doc_id": "img-c", "label": "positive", "score": 1.0},
    ]
    pairs += [
        {"query_id": "q-good-1", "doc_id": "d-copy", "label": "positive", "score": 1.0},  # -> duplicate_pair
        {"query_id": "q-good-2", "doc_id": "d-copy", "label": "hard_negative", "score": 0.2},
        {"query_id": "q-good-2", "doc_id": "d-drop", "label": "hard_negative", "score": 0.1},  # dangling
    ]
    ds = write_dataset(
        root / "raw",
        {"queries": queries_table(queries), "corpus": corpus, "pairs": pairs},
        rows_per_shard=17,
        data_root=str(root / "data"),
    )
    copied = [q for q in queries if q["query_id"] in ("q-good-4", "q-good-5")]
    ev = write_dataset(root / "eval", {"queries": copied}, data_root=str(root / "data"))
    return ds, ev, expected


def _invoke(command, args: list[str]) -> str:
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _chain(ds: Dataset, ev: Dataset, root: Path, reranker: Path, cache: Path, rule: str = "paper") -> Path:
    """The four commands, one after the other (stages in process: the quickest way to the reference)."""
    local = ["--executor", "local"]
    _invoke(cli, ["validate", ds.root, root / "valid", "--max-text-chars", 1000, *local])
    _invoke(cli, ["dedup", root / "valid", root / "dedup", "--against", ev.root, *local])
    judge = ["--model", reranker, "--cache", cache, "--rule", rule, "--no-progress"]
    _invoke(cli, ["judge", root / "dedup", root / "judged", *judge])
    _invoke(cli, ["filter", root / "judged", root / "chain", "--where", WHERE, *local])
    return root / "chain"


def _tables(path: Path, sub: str) -> dict[str, list[dict]]:
    d = path / sub
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(d.glob("*.parquet"))} if d.is_dir() else {}


def _assert_same_result(chain: Path, dag: Path, p_tolerance: float = 0.0) -> int:
    """The same data shards (row for row; judge_p_yes within ``p_tolerance``) and the same quarantine
    files, row for row, but for ``source``, which names the dataset a row was refused from (curate's
    steps write theirs under other names)."""
    rows = 0
    for sub in ("queries", "corpus", "pairs"):
        a, b = _tables(chain, sub), _tables(dag, sub)
        assert a.keys() == b.keys(), sub
        for name in a:
            assert len(a[name]) == len(b[name]), f"{sub}/{name}"
            for x, y in zip(a[name], b[name], strict=True):
                px, py = x.pop("judge_p_yes", None), y.pop("judge_p_yes", None)
                assert x == y, f"{sub}/{name}"
                assert (px is None) == (py is None) and (px is None or abs(px - py) <= p_tolerance), (px, py)
            rows += len(a[name])
    a, b = _tables(chain, "quarantine"), _tables(dag, "quarantine")
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            for row in (x, y):
                row.pop("source")
            assert x == y, name
        rows += len(a[name])
    return rows


@pytest.fixture(scope="module")
def reranker(tmp_path_factory) -> Path:
    settings = {k: v for k, v in TINY.items() if k != "seed"}
    model, processor = build_tiny(
        ["What colour is it?", "Which?", *COLOURS], tokens_per_tile=16, seed=1, **settings
    )
    path = tmp_path_factory.mktemp("judge") / "reranker"
    MMEmbedder(model, processor).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def curated(tmp_path_factory, reranker, ray_local):
    """The dataset, the four commands' result, and `assay curate`'s (judge in a 1-actor pool)."""
    root = tmp_path_factory.mktemp("curate")
    ds, ev, expected = _dataset(root)
    chain = _chain(ds, ev, root, reranker, root / "chain.sqlite")
    args = [ds.root, root / "dag", "--judge", reranker, "--cache", root / "dag.sqlite", "--where", WHERE]
    args += ["--against", ev.root, "--max-text-chars", 1000, "--actors", 1]
    start = time.perf_counter()
    output = _invoke(curate.command, args)
    seconds = time.perf_counter() - start
    return (
        {"root": root, "ds": ds, "ev": ev, "expected": expected, "chain": chain, "args": args},
        output,
        seconds,
    )


def test_curate_gives_what_the_four_commands_give(curated):
    run, output, seconds = curated
    dag = run["root"] / "dag"
    # the same rows and refused rows; the judge's p_yes agrees to batch-padding noise (scored apart)
    assert _assert_same_result(run["chain"], dag, p_tolerance=1e-5) > 50
    m, chain = Dataset(dag).manifest, Dataset(run["chain"]).manifest
    assert m.counts == chain.counts
    assert m.quarantine_reasons == chain.quarantine_reasons
    assert [step["stage"] for step in m.lineage][-4:] == ["validate", "dedup", "judge", "filter"]
    assert {"exact_duplicate", "near_duplicate_image", "contaminated", "duplicate_pair"} <= {
        k.split(":", 1)[1] for k in m.quarantine_reasons
    }
    # what each step did, kept in OUT/curate.json: near copies whose targets disagree are kept and
    # counted alike (one query, one document)
    record = json.loads((dag / "curate.json").read_text())["details"]
    assert [record["dedup"][t]["near_duplicate_conflicts"] for t in ("queries", "corpus")] == [1, 1]
    assert record["filter"]["dropped"] == chain.extra["filter"]["dropped"]
    assert {t: d for t, d in record["filter"]["dropped"].items() if d} == {
        "corpus": {"filter": 1},
        "pairs": {"dangling": 1},
    }
    judged = record["judge"]
    assert judged["scored"] == judged["selected"] > 0 and judged["cached"] == 0
    failures = "judge_failures.parquet"  # kept in OUT when the judge wrote one
    assert (dag / failures).exists() == (run["root"] / "judged" / failures).exists()
    assert not (run["root"] / ".dag.curate").exists()  # the datasets in between are gone
    assert "judge reranker" in output and f"{judged['scored']} pairs scored" in output
    print(f"curate with a judge: {seconds:.1f} s")


def test_bad_rows_are_quarantined_with_their_reasons(curated):
    run, _, _ = curated
    found = {}
    for rows in _tables(run["root"] / "dag", "quarantine").values():
        for q in rows:
            if q["stage"] == "validate":
                found[marker_of(q["table"], decode_record(q["record"]))] = (q["table"], q["reason"])
    assert {k: found.get(k) for k in run["expected"]} == run["expected"]


def test_a_finished_run_is_not_redone(curated):
    run, _, _ = curated
    dag = run["root"] / "dag"
    before = {p: p.stat().st_mtime_ns for p in dag.rglob("*")}
    start = time.perf_counter()
    output = _invoke(curate.command, run["args"])
    assert "pairs scored" in output  # the stored figures, reported again
    assert {p: p.stat().st_mtime_ns for p in dag.rglob("*")} == before
    assert time.perf_counter() - start < 5


def test_the_pool_judges_through_the_cache(curated, reranker):
    # Another run with the same cache and another rule scores nothing: every judgment is served.
    run, _, _ = curated
    root = run["root"]
    cache = root / "dag.sqlite"
    args = [run["ds"].root, root / "unime", "--judge", reranker, "--cache", cache, "--rule", "unime:0.1"]
    args += ["--where", WHERE, "--against", run["ev"].root, "--max-text-chars", 1000]
    args += ["--actors", 1]
    output = _invoke(curate.command, args)
    judged = json.loads((root / "unime" / "curate.json").read_text())["details"]["judge"]
    assert judged["scored"] == 0 and judged["cached"] == judged["selected"] > 0
    assert "0 pairs scored" in output
    # ... and gives what the chain gives with the same judgments (a copy of the cache: exact p_yes)
    shutil.copy(cache, root / "copy.sqlite")
    chain = root / "unime-chain"
    chain.mkdir()
    judge = ["--model", reranker, "--cache", root / "copy.sqlite", "--rule", "unime:0.1", "--no-progress"]
    _invoke(cli, ["judge", root / "dedup", chain / "judged", *judge])
    _invoke(cli, ["filter", chain / "judged", chain / "out", "--where", WHERE, "--executor", "local"])
    assert _assert_same_result(chain / "out", root / "unime") > 50


def _kill_dataset(root: Path) -> Dataset:
    queries, corpus, pairs, _ = make_fuzz_rows(
        root / "data", root / "outside", n_good=100, n_bad=30, seed=3, max_text_chars=1000
    )
    return write_dataset(
        root / "raw",
        {"queries": queries_table(queries), "corpus": corpus, "pairs": pairs},
        rows_per_shard=10,
        data_root=str(root / "data"),
    )


def test_a_killed_run_resumes_to_the_same_output(tmp_path, ray_local):
    ds = _kill_dataset(tmp_path)
    args = [str(ds.root), "--where", "label != 'negative'", "--max-text-chars", "1000"]
    _invoke(curate.command, [args[0], tmp_path / "clean", *args[1:]])
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "assay.pipelines.commands.curate", args[0], str(killed), *args[1:]]
    cmd += ["--num-cpus", "2"]
    # killed in its dedup step, once the validate step is complete and dedup has written shards
    progress = ".killed.curate/dedup/_progress/done/*/*.json"
    assert run_and_kill(cmd, tmp_path, progress, count=3), "curate finished before the kill"
    assert not (killed / "manifest.json").exists()
    assert (tmp_path / ".killed.curate/validate/manifest.json").exists()
    written = len(list(tmp_path.glob(progress)))
    _invoke(curate.command, [args[0], killed, *args[1:]])  # resume, in this process
    assert assert_same_dataset(tmp_path / "clean", killed) > 100
    assert 3 <= written < sum(len(ds.shards(t)) for t in ("queries", "corpus", "pairs"))
    assert not (tmp_path / ".killed.curate").exists()


# ---------------------------------------------------------------------------------------------------
# --ray-address: a `ray start --head` cluster in a subprocess, with a (declared) GPU


@pytest.fixture
def gpu_cluster():
    """A throwaway one-node cluster declaring one GPU (none is needed: the judge actor asks for it,
    Ray places it there, and torch finds no CUDA, so the model runs on the CPU)."""
    with ray_head(num_gpus=1) as cluster:
        yield cluster


def test_ray_address_runs_the_judge_on_the_clusters_gpu(curated, reranker, gpu_cluster):
    run, _, _ = curated
    address, env = gpu_cluster
    out = run["root"] / "cluster"
    args = [str(a) for a in run["args"]]
    args[1], args[5] = str(out), str(run["root"] / "cluster.sqlite")
    cmd = [sys.executable, "-m", "assay.pipelines.commands.curate", *args, "--ray-address", address]
    cmd += ["--gpus-per-actor", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"connected to the cluster at {address}" in res.stderr
    assert "in 1 actor(s), 1 GPU each" in res.stderr
    assert _assert_same_result(run["root"] / "dag", out, p_tolerance=1e-5) > 50
