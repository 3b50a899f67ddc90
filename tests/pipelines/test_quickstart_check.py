"""bench/quickstart_check.py reads a finished run: the warm-up's figures, the judge's AUC against the
truth, and each ablation arm's mean P@1 over its seeds, in the last line issue 16 names."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

CHECK = Path(__file__).resolve().parents[2] / "bench" / "quickstart_check.py"


def write_eval(run: Path, name: str, overall: float, per_subset: dict | None = None) -> None:
    (run / "metrics").mkdir(parents=True, exist_ok=True)
    body = {"overall": {"p_at_1": overall}, "per_subset": per_subset or {}}
    (run / "metrics" / f"{name}.json").write_text(json.dumps(body))


def run_check(run: Path, capsys) -> list[str]:
    argv = sys.argv
    sys.argv = [str(CHECK), str(run)]
    try:
        runpy.run_path(str(CHECK), run_name="__main__")
    except SystemExit as e:
        assert e.code == 0
    finally:
        sys.argv = argv
    return capsys.readouterr().out.strip().splitlines()


def test_reads_warmup_judge_and_arms_over_seeds(tmp_path, capsys):
    run = tmp_path / "run"
    write_eval(
        run,
        "eval-warmup",
        0.5,
        {
            "classification": {"p_at_1": 0.61},
            "vqa": {"p_at_1": 0.55},
            "retrieval": {"p_at_1": 0.2, "ndcg@10": 0.31},
        },
    )
    for name, value in [
        ("eval-stage3", 0.40),
        ("eval-stage3-seed1", 0.50),
        ("eval-stage3-percent", 0.30),
        ("eval-stage3-none", 0.35),
        ("eval-stage2", 0.99),  # not an arm
    ]:
        write_eval(run, name, value)
    judged = run / "judged"
    judged.mkdir()
    quality = {"overall": {"auc": 0.915}, "per_subset": {}}
    (judged / "manifest.json").write_text(json.dumps({"extra": {"judge": {"quality": quality}}}))
    lines = run_check(run, capsys)
    assert lines[-1] == (
        "warmup_classification=0.610 warmup_vqa=0.550 warmup_retrieval_ndcg10=0.310 judge_auc=0.915 "
        "judged=0.450 rule=0.300 none=0.350"
    )
    text = "\n".join(lines)
    assert "warmup_vqa" in text and "missed" in text and "2 seed(s)" in text and "captions  judged" in text
    assert "ablation mean      order judged >= rule-based >= none: no" in text  # 0.45 >= 0.30 but 0.30 < 0.35


def test_a_run_without_a_judge_or_arms_prints_nan(tmp_path, capsys):
    run = tmp_path / "run"
    write_eval(run, "eval-warmup", 0.5, {"vqa": {"p_at_1": 0.7}})
    last = run_check(run, capsys)[-1]
    assert "warmup_vqa=0.700" in last and "warmup_classification=nan" in last
    assert "judge_auc=nan" in last and "judged=nan" in last
