"""The run report of `assay loop`: a synthetic run directory (real datasets, a metrics JSON, a training
log, a failed step and steps not run yet) turned into one HTML page, read as text and rendered in
headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from assay.curation.dataset import DatasetWriter, shard_name
from assay.curation.judge.quality import JudgeQuality
from assay.curation.schema import CORPUS, PAIRS, QUERIES, SCHEMAS
from assay.curation.truth import Truth
from assay.pipelines.commands import report as report_command
from assay.pipelines.report import build_report

HOSTILE = "<script>alert(1)</script>"
SUBSETS = {"colours": "vqa", HOSTILE: "retrieval"}
MATH = "_cost $\\undefinedcommand{x}$ & co"
ORIGIN = "mined:tiny-encoder:ranks:50-100,sample:random:2"
#: Charts: time per step, eval P@1, ablation, 2 loss curves (complete + failed), mine, judge x3
EXPECTED_SVGS = 9
#: Measured on this page: ~73,000 clearly coloured pixels in the first 5000 px with its plots, ~4,000
#: (the status badges) with every <svg> removed.
COLOURED_PIXELS = 30_000


def _dataset(root: Path, pairs: list[dict], stage: str, extra: dict) -> str:
    queries, corpus = [], []
    for s, task in SUBSETS.items():
        for i in range(10):
            queries.append({"query_id": f"{s}-q{i}", "subset": s, "task": task, "text": f"question {i}"})
            corpus.extend({"doc_id": f"{s}-d{i}-{k}", "subset": s, "text": f"doc {i} {k}"} for k in range(5))
    writer = DatasetWriter(root, stage=stage, config={})
    for table, rows in ((QUERIES, queries), (CORPUS, corpus), (PAIRS, pairs)):
        writer.sink.write_shard(table, shard_name(0), pa.Table.from_pylist(rows, schema=SCHEMAS[table]))
    writer.finish(extra=extra)
    return str(root.resolve())


def _mined(root: Path) -> str:
    pairs = []
    for s in SUBSETS:
        for i in range(10):
            # positives of the hostile subset carry no score: the report falls back to the manifest
            score = 0.7 + 0.02 * i if s == "colours" else None
            pairs.append(
                {"query_id": f"{s}-q{i}", "doc_id": f"{s}-d{i}-0", "label": "positive", "score": score}
            )
            for k in (1, 2):
                pairs.append(
                    {
                        "query_id": f"{s}-q{i}",
                        "doc_id": f"{s}-d{i}-{k}",
                        "label": "hard_negative",
                        "score": 0.3 + 0.01 * i + 0.05 * k,
                        "rank": 50 + k,
                        "origin": ORIGIN,
                    }
                )
    summary = {
        s: {
            "queries": 10,
            "negatives": 20,
            "positive_score": {"n": 10, "mean": 0.81, "p10": 0.7, "p50": 0.8, "p90": 0.9},
            "negative_score": {"n": 20, "mean": 0.42, "p10": 0.36, "p50": 0.42, "p90": 0.48},
        }
        for s in SUBSETS
    }
    return _dataset(root, pairs, "mine", {"mine": summary, "origin": ORIGIN})


def _judged(root: Path) -> str:
    """colours: 4 judged candidates per query, 1 a false negative (10/40); hostile: 1 of 20."""
    pairs = []
    for s in SUBSETS:
        n_candidates = 4 if s == "colours" else 2
        for i in range(10):
            q = f"{s}-q{i}"
            pairs.append(
                {
                    "query_id": q,
                    "doc_id": f"{s}-d{i}-0",
                    "label": "positive",
                    "judge_p_yes": 0.9,
                    "judge_verdict": "yes",
                }
            )
            for k in range(1, n_candidates + 1):
                fn = k == 1 and (s == "colours" or i == 0)
                pairs.append(
                    {
                        "query_id": q,
                        "doc_id": f"{s}-d{i}-{k}",
                        "label": "false_negative" if fn else "hard_negative",
                        "judge_p_yes": 0.8 if fn else 0.05 * k,
                        "judge_verdict": "yes" if fn else "no",
                    }
                )
        # pairs the judge did not see count in no rate
        pairs += [{"query_id": f"{s}-q0", "doc_id": f"{s}-d9-{k}", "label": "negative"} for k in range(3)]
    # the truth knows the colours queries: d0, d1 match, and d2 too for half of them (missed by the judge)
    matches = [(f"colours-q{i}", f"colours-d{i}-{k}") for i in range(10) for k in (0, 1, 2) if k < 2 or i < 5]
    quality = JudgeQuality(
        Truth("truth.parquet", True, {q: frozenset(d for qq, d in matches if qq == q) for q, _ in matches})
    )
    judged = [r for r in pairs if "judge_p_yes" in r]
    quality.add(
        [r["query_id"].rsplit("-q", 1)[0] for r in judged],
        *(
            [r.get(c) for r in judged]
            for c in ("query_id", "doc_id", "label", "judge_p_yes", "judge_verdict")
        ),
    )
    extra = {
        "judge": {
            "model_id": "judge-model-x",
            "rule": "paper",
            "scored": 80,
            "relabelled": 11,
            "quality": quality.result(),
        }
    }
    return _dataset(root, pairs, "judge", extra)


def _metrics(path: Path, colours: float, hostile: float, extra_subset: bool = False) -> str:
    metrics = {
        "per_subset": {
            "colours": {"p_at_1": colours, "queries": 10, "task": "vqa", "candidates_per_query": 5.0},
            HOSTILE: {
                "p_at_1": hostile,
                "queries": 10,
                "task": "retrieval",
                "recall@1": hostile,
                "recall@5": 0.9,
            },
        },
        "overall": {
            "p_at_1": (colours + hostile) / 2,
            "p_at_1_micro": (colours + hostile) / 2,
            "queries": 20,
        },
        "chance_p_at_1": {"colours": 0.2, HOSTILE: 0.05},
        "per_task": {"vqa": {"p_at_1": colours, "subsets": 1}},
        "checkpoint": "/runs/x/step-000040",
        "settings": {"ks": [1, 5], "ndcg_at": 10, "truth": {"path": "raw/truth/test.parquet"}},
    }
    if extra_subset:  # matplotlib would read it as mathtext, and fail on the unknown command
        metrics["per_subset"][MATH] = {"p_at_1": 0.777, "queries": 5, "task": "vqa"}
    path.write_text(json.dumps(metrics))
    return str(path.resolve())


def _train_dir(path: Path, steps: int, garbage: bool = False) -> str:
    path.mkdir(parents=True)
    lines = [
        json.dumps({"step": i, "epoch": 0, "loss": 6.0 * 0.97**i, "lr": 1e-3, "seconds": 0.25, "units": 32})
        for i in range(1, steps + 1)
    ]
    if garbage:
        lines.append('{"step": 99, "loss": ')  # a line a running trainer is still writing
    (path / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    return str(path.resolve())


def _step(run: Path, name: str, index: int, kind: str, status: str, seconds, outputs, error=None) -> None:
    obj = {
        "name": name,
        "index": index,
        "run": kind,
        "status": status,
        "started": "2026-11-26T10:00:00Z",
        "finished": None if status == "running" else "2026-11-26T10:01:00Z",
        "seconds": seconds,
        "argv": ["assay", kind, "--flag"],
        "error": error,
        "outputs": outputs,
    }
    (run / "steps").mkdir(exist_ok=True)
    (run / "steps" / f"{name}.json").write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("loop")
    run = base / "run"
    run.mkdir()
    mined, judged = _mined(base / "mined"), _judged(base / "judged")
    names = ["ingest", "train-s1", "eval-s1", "mine", "judge", "eval-s2", "train-s2", "eval-s3", "export"]
    loop = {
        "file": "examples/loop.yaml",
        "name": "demo-run",
        "steps": names,
        "ablation": [
            {"arm": "no hard negatives", "eval": "eval-s1"},
            {"arm": "hard negatives", "eval": "eval-s2"},
            {"arm": "judge-filtered", "eval": "eval-s3"},
        ],
        "started": "2026-11-26T10:00:00Z",
        "finished": None,
    }
    (run / "loop.json").write_text(json.dumps(loop))
    _step(run, "ingest", 0, "ingest", "complete", 3.5, {"dataset": mined})
    train_dir = _train_dir(base / "train-s1", 40)
    _step(
        run,
        "train-s1",
        1,
        "train",
        "complete",
        125.0,
        {"checkpoint": f"{train_dir}/step-000040", "train_dir": train_dir},
    )
    _step(
        run,
        "eval-s1",
        2,
        "eval",
        "complete",
        8.0,
        {"metrics": _metrics(base / "s1.json", 0.42, 0.083, extra_subset=True)},
    )
    _step(run, "mine", 3, "mine", "complete", 20.0, {"dataset": mined})
    _step(run, "judge", 4, "judge", "complete", 30.0, {"dataset": judged})
    _step(run, "eval-s2", 5, "eval", "complete", 9.0, {"metrics": _metrics(base / "s2.json", 0.61, 0.2)})
    failed_dir = _train_dir(base / "train-s2", 6, garbage=True)
    _step(
        run,
        "train-s2",
        6,
        "train",
        "failed",
        4.0,
        {"train_dir": failed_dir},
        error="CUDA out of memory <b>oops</b>",
    )
    return run


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    """The report of the run, built once for the tests that only read it."""
    return build_report(run_dir)


def test_report_shows_every_section_with_the_numbers_of_its_inputs(run_dir, report):
    path = report
    assert path == run_dir / "report.html"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]
    page = path.read_text()
    for section in ("steps", "metrics", "ablation", "training", "mining", "judge"):
        assert f'<section id="{section}">' in page
    assert "demo-run" in page and "examples/loop.yaml" in page
    # steps: every status, the failed step's error escaped, the total of step times
    assert page.count(">not run yet<") >= 2  # eval-s3 and export, in the steps table
    assert "CUDA out of memory &lt;b&gt;oops&lt;/b&gt;" in page and "<b>oops</b>" not in page
    assert "3 min 20 s" in page  # 199.5 s: 3.5 + 125 + 8 + 20 + 30 + 9 + 4 seconds
    assert "2 min 05 s" in page  # train-s1
    # eval metrics per subset, chance, overall; the ablation arm whose eval has not run
    for value in ("0.420", "0.083", "0.610", "0.200", "0.050", "0.252", "0.405"):
        assert f">{value}<" in page, value
    assert "<th class=chance>chance</th>" in page
    assert ">0.777<" in page and "_cost $\\undefinedcommand{x}$ &amp; co" in page
    assert "judge-filtered</code><br><span class=note>not run yet</span>" in page
    assert "Scored against the truth <code>raw/truth/test.parquet</code>" in page
    # training: the complete and the failed step's partial log (the half-written line skipped)
    assert "40 logged steps up to step 40" in page and "6 logged steps up to step 6" in page
    # mining: scores from the pairs (colours) and from the manifest (hostile subset has no pair scores)
    assert "0.790 / 0.790" in page and "0.810 / 0.800" in page
    # judge: false-negative rate per subset, unjudged pairs left out
    assert ">25.0%<" in page and ">5.0%<" in page and ">18.3%<" in page
    assert "judge-model-x" in page
    # judge quality against the truth, beside the histograms: colours has 15 real false negatives
    # among 40 candidates; the judge claimed 10, all right (precision 1, recall 10/15); AUC of p_yes
    # (0.9, 0.8 x 10, 0.1 x 5 vs 0.1 x 5, 0.15 x 10, 0.2 x 10) = (500 + 5 x 2.5) / 625
    assert "Judge quality against the truth <code>truth.parquet</code>" in page
    assert ">0.820<" in page and ">0.667<" in page and ">1.000 (10/10)<" in page
    assert "candidates that match (real false negatives)" in page
    # user text never becomes markup
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<svg") == EXPECTED_SVGS
    # self-contained: nothing to fetch
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page


def test_report_of_a_run_that_has_not_started(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    steps = [{"name": "train-s1"}, {"name": "eval-s1"}]
    (run / "loop.json").write_text(json.dumps({"name": "fresh", "steps": steps, "ablation": []}))
    page = build_report(run, out=tmp_path / "elsewhere.html").read_text()
    assert page.count("not run yet") >= 2
    assert page.count("<svg") == 1  # the time per step chart only
    assert '<section id="ablation">' not in page


def test_report_shows_unreadable_outputs_in_place(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "loop.json").write_text(
        json.dumps({"name": "broken", "steps": ["eval", "mine", "judge", "train"]})
    )
    (tmp_path / "bad.json").write_text("{not json")
    _step(run, "eval", 0, "eval", "complete", 1.0, {"metrics": str(tmp_path / "bad.json")})
    _step(run, "mine", 1, "mine", "complete", 1.0, {"dataset": str(tmp_path / "nowhere")})
    _step(run, "judge", 2, "judge", "running", None, {})
    _step(run, "train", 3, "train", "complete", 1.0, {"train_dir": str(tmp_path / "no-train-dir")})
    (run / "steps" / "zombie.json").write_text("{")
    page = build_report(run).read_text()
    assert "metrics unreadable" in page
    assert "mined dataset unreadable" in page and "not an assay dataset" in page
    assert "no training log" in page
    assert "unreadable step file" in page and "zombie" in page
    assert re.search(
        r"judge</code> <span class=badge[^>]*>running</span></h3><p class=note>running</p>", page
    )


def test_report_command(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "loop.json").write_text(json.dumps({"name": "cli", "steps": ["train"]}))
    result = CliRunner().invoke(report_command.command, [str(run)])
    assert result.exit_code == 0, result.output
    assert f"wrote {run / 'report.html'}" in result.output and (run / "report.html").is_file()
    out = tmp_path / "r.html"
    result = CliRunner().invoke(report_command.command, [str(run), "--out", str(out)])
    assert result.exit_code == 0 and "<svg" in out.read_text()
    missing = CliRunner().invoke(report_command.command, [str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "not a run directory of `assay loop`" in missing.output
    (run / "loop.json").write_text("{")
    broken = CliRunner().invoke(report_command.command, [str(run)])
    assert broken.exit_code == 1 and "loop.json: not valid JSON" in broken.output
    assert "assay report runs/" in CliRunner().invoke(report_command.command, ["--help"]).output


@pytest.fixture
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("ASSAY_REQUIRE_CHROMIUM") == "1":
            pytest.fail("ASSAY_REQUIRE_CHROMIUM=1 but chromium is not on PATH (apt-get install chromium)")
        pytest.skip(
            "chromium not installed (Debian package `chromium`); set ASSAY_REQUIRE_CHROMIUM=1 to fail instead"
        )
    return found


def test_report_renders_with_its_plots_in_chromium(chromium, report, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    base = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",  # its own profile: parallel runs do not collide
    ]
    url = report.resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<svg\b", dom.stdout)) == EXPECTED_SVGS
    assert "<script" not in dom.stdout.lower()
    cap = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,5000", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cap.returncode == 0 and shot.is_file(), cap.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert rgb.shape == (5000, 1200, 3)
    # clearly coloured pixels (not grey text or borders): the bars and histograms of the plots
    coloured = int(((rgb.max(axis=2) - rgb.min(axis=2)) > 80).sum())
    assert coloured > COLOURED_PIXELS, coloured


def test_an_arm_run_on_several_seeds_shows_its_mean_and_spread(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    names = ["eval-a", "eval-a-seed1", "eval-a-seed2", "eval-b", "eval-b-seed1"]
    values = {"eval-a": 0.4, "eval-a-seed1": 0.5, "eval-a-seed2": 0.6, "eval-b": 0.1, "eval-b-seed1": 0.3}
    for i, name in enumerate(names):
        metrics = _metrics(tmp_path / f"{name}.json", colours=values[name], hostile=0.2)
        _step(run, name, i, "eval", "complete", 1.0, {"metrics": metrics})
    ablation = [
        {"arm": "judged", "evals": ["eval-a", "eval-a-seed1", "eval-a-seed2"]},
        {"arm": "none", "evals": ["eval-b", "eval-b-seed1", "eval-missing"]},
    ]
    (run / "loop.json").write_text(json.dumps({"name": "seeds", "steps": names, "ablation": ablation}))
    page = build_report(run).read_text()
    section = page[page.index('<section id="ablation">') :]
    section = section[: section.index("</section>")]
    # the arm's column holds the mean over its seeds: colours 0.5 (0.4, 0.5, 0.6), 0.2 for b
    assert "judged (3 of 3 seeds)" in section and "none (2 of 3 seeds; without eval-missing)" in section
    assert ">0.500<" in section and ">0.200<" in section
    # and the spread table: mean +- sample standard deviation, then each seed's figure
    assert "0.500 ± 0.100<br><span class=note>0.400, 0.500, 0.600</span>" in section
    assert "0.200 ± 0.141<br><span class=note>0.100, 0.300</span>" in section
