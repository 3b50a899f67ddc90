"""SIGKILL `assay dedup` mid-run, rerun it, and find the output identical to a clean run."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers.kill import assay_cmd, assert_same_dataset, run_and_kill, run_ok
from PIL import Image

from curation.dataset import Dataset, write_dataset


def _png(seed: int, size: int = 96, pixel: bool = False) -> bytes:
    rs = np.random.RandomState(seed)
    img = Image.fromarray((rs.rand(8, 8, 3) * 255).astype("uint8")).resize((size, size), Image.BILINEAR)
    if pixel:
        img.putpixel((size - 1, size - 1), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _datasets(tmp_path, n: int = 320):
    """8 shards each of queries and corpus, every row with an image (some by path), with exact and
    near duplicates, pairs to rewrite, and an eval set that some queries copy."""
    media = tmp_path / "media"
    media.mkdir()
    for s in range(20):
        (media / f"{s}.png").write_bytes(_png(s))
    queries = [
        {
            "query_id": f"q{i}",
            "subset": f"s{i % 2}",
            "task": "retrieval",
            "instruction": None,
            "text": f"Question {i % 90}",
            "image": {"bytes": _png(1000 + i % 150, pixel=i % 7 == 0), "path": None},
        }
        for i in range(n)
    ]
    corpus = [
        {
            "doc_id": f"d{i}",
            "subset": "s0",
            "instruction": None,
            "text": None,
            "image": (
                {"bytes": None, "path": f"{i % 20}.png"}
                if i % 5 == 0
                else {"bytes": _png(i % 200, pixel=i % 3 == 0), "path": None}
            ),
        }
        for i in range(n)
    ]
    pairs = [
        {
            "query_id": f"q{i}",
            "doc_id": f"d{(i * 13) % n}",
            "label": "positive",
            "score": None,
            "rank": None,
            "judge_p_yes": None,
            "judge_verdict": None,
            "origin": "gold",
        }
        for i in range(n)
    ]
    src = write_dataset(
        tmp_path / "src",
        {"queries": queries, "corpus": corpus, "pairs": pairs},
        rows_per_shard=n // 8,
        data_root=str(media),
    )
    evals = [
        {
            "query_id": f"e{i}",
            "subset": "eval",
            "task": "retrieval",
            "instruction": None,
            "text": f"question {i}",
            "image": {"bytes": _png(1000 + i), "path": None},
        }
        for i in range(0, 40, 3)
    ]
    ev = write_dataset(tmp_path / "eval", {"queries": evals}, rows_per_shard=4)
    return src, ev


@pytest.mark.parametrize(
    ("kill_at", "count"),
    [
        ("_progress/scan/corpus/part-*.parquet", 2),
        ("_progress/eval-scan/*/queries/part-*.parquet", 1),
        ("_progress/done/corpus/*.json", 2),
    ],
)
def test_dedup_killed_mid_run_resumes_to_the_same_output(tmp_path, kill_at, count):
    src, ev = _datasets(tmp_path)
    args = ["dedup", str(src.root), None, "--against", str(ev.root), "--executor", "local"]

    def cmd(out):
        return assay_cmd(*[a if a is not None else str(out) for a in args])

    run_ok(cmd(tmp_path / "clean"))
    killed = tmp_path / "killed"
    assert run_and_kill(cmd(killed), killed, kill_at, count=count), "dedup finished before it could be killed"
    assert not (killed / "manifest.json").exists()
    out = run_ok(cmd(killed))
    assert "near_duplicate_image" in out and "contaminated" in out

    rows = assert_same_dataset(tmp_path / "clean", killed)
    clean, resumed = Dataset(tmp_path / "clean").manifest, Dataset(killed).manifest
    assert resumed.counts == clean.counts and resumed.quarantine_reasons == clean.quarantine_reasons
    # none lost, none duplicated: every input row is in the output or in the quarantine, once
    assert rows == sum(resumed.counts[t] for t in ("queries", "corpus", "pairs", "quarantine"))
    assert resumed.counts["quarantine"] > 0
    assert sum(resumed.counts[t] for t in ("queries", "corpus", "pairs", "quarantine")) == sum(
        src.num_rows(t) for t in ("queries", "corpus", "pairs")
    )
