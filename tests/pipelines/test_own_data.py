"""README's "your own data" walk-through: `assay loop examples/own-data.yaml` on the committed
example (a folder of 25 PNGs and pairs.jsonl in a user's own column names), end to end, then again.

One run of the whole recipe (ingest with --map, validate, dedup, a held-out split, stage 1, the
reranker, stage 2 warm-up, mine, judge, stage 3, eval, export) takes about 2 minutes of this CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.cli import run_assay

from assay.pipelines.loop import load_loop

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own-data"
LOOP_FILE = ROOT / "examples" / "own-data.yaml"


def assay(*args: str, timeout: float = 600):
    return run_assay(*args, timeout=timeout)


def counts(dataset: Path) -> dict[str, int]:
    return json.loads((dataset / "manifest.json").read_text())["counts"]


def test_the_example_is_small_and_names_its_images_by_relative_path():
    files = [p for p in EXAMPLE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) < 100_000
    rows = [json.loads(line) for line in (EXAMPLE / "pairs.jsonl").read_text().splitlines()]
    paths = [r.get("image") or r.get("target_image") for r in rows]
    assert all(p and not os.path.isabs(p) and p.startswith("images/") for p in paths)
    missing = [p for p in paths if not (EXAMPLE / p).exists()]
    assert missing == ["images/purple-star-big.png"]  # the one row validate must refuse
    assert len(list((EXAMPLE / "images").glob("*.png"))) == 25


@pytest.mark.timeout(900)
def test_the_own_data_loop_runs_end_to_end_and_a_rerun_runs_nothing(tmp_path):
    run = tmp_path / "run"
    res = assay("loop", str(LOOP_FILE), "--run-dir", str(run))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]

    # every step of the file completed, in order
    names = load_loop(LOOP_FILE).names
    records = [json.loads((run / "steps" / f"{n}.json").read_text()) for n in names]
    assert [r["status"] for r in records] == ["complete"] * len(names)
    assert {p.stem for p in (run / "steps").glob("*.json")} == set(names)
    assert json.loads((run / "loop.json").read_text())["finished"]

    # ingest kept every row of the user's file; validate refused the one naming a missing picture
    # (its query, then its pair); dedup folded the byte-for-byte copy of a picture into one
    lines = (EXAMPLE / "pairs.jsonl").read_text().splitlines()
    raw = counts(run / "raw")
    assert raw["pairs"] == raw["queries"] == len(lines) == 74 and raw["quarantine"] == 0
    assert counts(run / "valid")["pairs"] == len(lines) - 1
    reasons = json.loads((run / "clean" / "manifest.json").read_text())["quarantine_reasons"]
    assert "image_not_found" in json.dumps(reasons) and "exact_duplicate" in json.dumps(reasons)
    test, train = counts(run / "test"), counts(run / "train")
    assert test["queries"] > 0 and train["queries"] > 0
    assert test["queries"] + train["queries"] == counts(run / "clean")["queries"]

    # eval: both subsets of the user's `source` column, against several candidates each
    for step in ("eval-warmup", "eval-stage3"):
        metrics = json.loads((run / "metrics" / f"{step}.json").read_text())
        subsets = metrics["per_subset"]
        assert set(subsets) == {"shapes-qa", "captions"}
        assert all(s["queries"] > 0 and s["candidates_per_query"] >= 5 for s in subsets.values())
        assert subsets["captions"]["task"] == "retrieval" and "recall@5" in subsets["captions"]

    # the judged hard negatives reached the exports, and both files parse
    exported = [json.loads(line) for line in (run / "export" / "train.jsonl").read_text().splitlines()]
    assert len(exported) == train["queries"]
    assert {r["subset"] for r in exported} == {"shapes-qa", "captions"}
    assert all(r["qry"] and r["neg_text"] for r in exported)
    flat = pq.read_table(run / "export" / "pairs.parquet").to_pylist()
    labels = {r["label"] for r in flat}
    assert labels == {"positive", "hard_negative"}
    assert all(r["judge_verdict"] in ("yes", "no") for r in flat)
    assert (run / "report.html").stat().st_size > 1000

    # a rerun skips every step
    again = assay("loop", str(LOOP_FILE), "--run-dir", str(run), "--no-report", timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("complete, skipped") == len(names), again.stdout
