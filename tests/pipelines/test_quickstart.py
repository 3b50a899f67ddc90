"""README's main command: examples/quickstart.sh on the bundled easy-vqa example, in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from curation.dataset import Dataset
from curation.stats import dataset_stats

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_curates_easy_vqa_end_to_end(tmp_path):
    run = tmp_path / "run"
    env = {
        **os.environ,
        "RUN": str(run),
        "EXEC": "local",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    res = subprocess.run(
        ["bash", str(ROOT / "examples" / "quickstart.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "quickstart done" in res.stdout

    train, test = Dataset(run / "train-clean"), Dataset(run / "test-clean")
    stats = dataset_stats(train)
    assert set(stats["queries"]["by_subset"]) == {"vqa", "classification", "retrieval"}
    assert [step["stage"] for step in train.manifest.lineage] == ["ingest", "validate", "dedup"]
    # decontaminated: no training query carries an image of the test split
    test_images = {
        r["image"]["path"]
        for b in test.iter_batches("queries", ["image"])
        for r in b.to_pylist()
        if r["image"]
    }
    train_images = {
        r["image"]["path"]
        for b in train.iter_batches("queries", ["image"])
        for r in b.to_pylist()
        if r["image"]
    }
    assert train_images and test_images and not train_images & test_images
    first = json.loads((run / "export" / "train-vlm2vec.jsonl").open().readline())
    assert {"qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text"} <= set(first)

    # rerun: every step is already complete and nothing changes
    before = {p: p.stat().st_mtime_ns for p in (run / "train-clean").rglob("*.parquet")}
    res = subprocess.run(
        ["bash", str(ROOT / "examples" / "quickstart.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert before == {p: p.stat().st_mtime_ns for p in (run / "train-clean").rglob("*.parquet")}
