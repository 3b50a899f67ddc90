"""README's main command: `assay loop examples/quickstart.yaml` on the bundled easy-vqa example.

The whole loop takes ~10 minutes of this CPU (docs/BENCHMARKS.md), so the default suite checks
every step of the file against the commands and the training config, and runs its curation steps
for real; the slow test runs all of it and reads the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.cli import run_assay

from assay.curation.dataset import Dataset
from assay.curation.stats import dataset_stats
from assay.pipelines.loop import Loop, load_loop, stage_options
from assay.training.config import config_from_dict

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def assay(*args: str, timeout: float = 900):
    return run_assay(*args, timeout=timeout)


def test_every_quickstart_step_names_real_options_and_a_valid_training_config(tmp_path):
    spec = load_loop(QUICKSTART, run_dir=tmp_path)
    names = spec.names
    # the recipe of the issue, in its order
    order = [
        "raw",
        "train-clean",
        "stage2-warmup",
        "eval-warmup",
        "mine-ranks",
        "mine-judge",
        "reranker",
        "stage2",
        "eval-stage2",
        "mine-top20",
        "judge",
        "stage3",
        "eval-stage3",
        "export",
    ]
    assert [n for n in names if n in order] == order
    steps = 0
    for step in spec.steps:
        params = stage_options(step.run)
        for key in step.options:
            assert key in params, f"step {step.name}: assay {step.run} has no --{key}"
        if step.run == "train":
            # every {NAME} stands for a path; the config must pass the trainer's own checks
            raw = json.loads(re.sub(r"\{[A-Za-z0-9_.-]+\}", str(tmp_path / "x"), json.dumps(step.config)))
            config = config_from_dict(raw, where=f"{QUICKSTART} step {step.name}")
            assert config.max_steps, f"step {step.name}: a CPU budget needs max_steps"
            steps += config.max_steps
    # the whole loop fits the 15 minutes of a 2-core CPU (docs/BENCHMARKS.md: ~0.1-0.15 s a step
    # here, ~2 min of curation, mining, judging and evals besides)
    assert steps <= 3500, f"{steps} training steps in all: over the quickstart's CPU budget"
    # the paper's three arms, each on 3 seeds (issue 16: mean and spread in the report)
    arms = {a["evals"][0]: len(a["evals"]) for a in spec.ablation}
    assert arms == {"eval-stage3-none": 3, "eval-stage3-percent": 3, "eval-stage3": 3}


def test_the_quickstart_curation_steps_run_and_a_rerun_runs_nothing(tmp_path):
    run = tmp_path / "run"
    res = assay("loop", str(QUICKSTART), "--run-dir", str(run), "--to", "train-mine", "--no-report")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    train, test = Dataset(run / "train-clean"), Dataset(run / "test-clean")
    stats = dataset_stats(train)
    assert set(stats["queries"]["by_subset"]) == {"vqa", "classification", "retrieval", "captions"}
    assert [step["stage"] for step in train.manifest.lineage] == ["ingest", "validate", "dedup"]

    def images(ds):
        return {
            r["image"]["path"]
            for b in ds.iter_batches("queries", ["image"])
            for r in b.to_pylist()
            if r["image"]
        }

    # decontaminated: no training query carries an image of the test split
    assert images(train) and images(test) and not images(train) & images(test)
    # the mining sample: every retrieval query, ~2% of the others, the same ones on every run
    sample = dataset_stats(Dataset(run / "train-mine"))["queries"]["by_subset"]
    full = stats["queries"]["by_subset"]
    assert sample["retrieval"] == full["retrieval"]
    assert 0.01 < sample["vqa"] / full["vqa"] < 0.03

    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")}
    res = assay("loop", str(QUICKSTART), "--run-dir", str(run), "--to", "train-mine", "--no-report")
    assert res.returncode == 0 and res.stdout.count("complete, skipped") == 6
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")}
    states = [state for _, state in Loop(load_loop(QUICKSTART, run_dir=run)).status()]
    assert states[:6] == ["complete"] * 6 and set(states[6:]) == {"pending"}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_whole_quickstart_loop_and_its_report(tmp_path):
    run = tmp_path / "run"
    res = assay("loop", str(QUICKSTART), "--run-dir", str(run), timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for arm in ("eval-stage3", "eval-stage3-percent", "eval-stage3-none", "eval-warmup", "eval-stage2"):
        metrics = json.loads((run / "metrics" / f"{arm}.json").read_text())
        assert set(metrics["per_subset"]) == {"vqa", "classification", "retrieval", "captions"}
        assert metrics["settings"]["truth"]["kind"] == "complete"  # scored against the example's truth
    judged = Dataset(run / "judged")
    assert judged.manifest.extra["judge"]["quality"]["per_subset"]["captions"]["candidates"]
    html = (run / "report.html").read_text()
    assert "no hard negatives" in html and html.count("<svg") >= 6
    first = json.loads((run / "export" / "train-judged.jsonl").open().readline())
    assert {"qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text"} <= set(first)
