"""Read a finished quickstart run and print what issue 16 asks of it, against its targets.

    python bench/quickstart_check.py runs/quickstart

Reads ``metrics/eval-*.json`` (written by the loop's eval steps) and the judge step's manifest
(``extra.judge.quality``, written when the judge ran with ``--truth``):

- the stage-2 warm-up (``eval-warmup``): P@1 of classification and vqa, nDCG@10 of retrieval;
- the judge: AUC of p_yes against the truth, the mean over subsets (``overall.auc``);
- the ablation arms, each the mean over subsets of P@1 (``overall.p_at_1``), averaged over the
  arm's seeds: ``eval-stage3[-seedN]`` (judged), ``eval-stage3-percent[-seedN]`` (rule-based),
  ``eval-stage3-none[-seedN]`` (no hard negatives). A run without seed variants has one seed each.
  The same on the captions subset alone (the one with unlabelled matches), with the order of each.

The last line is ``warmup_classification=A warmup_vqa=B warmup_retrieval_ndcg10=C judge_auc=D
judged=E rule=F none=G`` (a figure the run does not have prints as ``nan``). Exit status 0 whatever
the figures: this reports, it does not judge.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

#: Issue 16's targets for the quickstart.
TARGETS = {
    "warmup_classification": 0.60,
    "warmup_vqa": 0.60,
    "warmup_retrieval_ndcg10": 0.30,
    "judge_auc": 0.90,
}
#: The example's subset with unlabelled matches (false negatives), where judging should matter most.
FALSE_NEGATIVE_SUBSET = "captions"
ARMS = {
    "judged": re.compile(r"^eval-stage3(-seed\d+)?$"),
    "rule": re.compile(r"^eval-stage3-percent(-seed\d+)?$"),
    "none": re.compile(r"^eval-stage3-none(-seed\d+)?$"),
}


def _subset_metric(metrics: dict, subset: str, key: str) -> float:
    value = metrics.get("per_subset", {}).get(subset, {}).get(key)
    return float(value) if value is not None else math.nan


def warmup_figures(run: Path) -> dict[str, float]:
    path = run / "metrics" / "eval-warmup.json"
    if not path.is_file():
        return dict.fromkeys(("warmup_classification", "warmup_vqa", "warmup_retrieval_ndcg10"), math.nan)
    m = json.loads(path.read_text())
    return {
        "warmup_classification": _subset_metric(m, "classification", "p_at_1"),
        "warmup_vqa": _subset_metric(m, "vqa", "p_at_1"),
        "warmup_retrieval_ndcg10": _subset_metric(m, "retrieval", "ndcg@10"),
    }


def judge_auc(run: Path) -> float:
    """The judge's AUC against the truth, from whichever dataset of the run recorded one."""
    for manifest in sorted(run.glob("*/manifest.json")):
        quality = json.loads(manifest.read_text()).get("extra", {}).get("judge", {}).get("quality")
        if quality and quality.get("overall", {}).get("auc") is not None:
            return float(quality["overall"]["auc"])
    return math.nan


def arm_figures(run: Path, subset: str | None = None) -> dict[str, list[float]]:
    """Each arm's P@1 per seed: the mean over subsets, or one ``subset``'s."""
    found: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for path in sorted((run / "metrics").glob("eval-*.json")):
        for arm, pattern in ARMS.items():
            if pattern.match(path.stem):
                m = json.loads(path.read_text())
                value = m["overall"]["p_at_1"] if subset is None else _subset_metric(m, subset, "p_at_1")
                if not math.isnan(value):  # a run without the subset
                    found[arm].append(float(value))
    return found


def _arms_line(label: str, arms: dict[str, list[float]]) -> dict[str, float]:
    """Print each arm's mean +- spread over seeds and whether the paper's order holds; the means."""
    means = {}
    for arm, values in arms.items():
        means[arm] = statistics.fmean(values) if values else math.nan
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"ablation {label:9s} {arm:7s} {means[arm]:7.3f} +- {spread:.3f} ({len(values)} seed(s))")
    order = means["judged"] >= means["rule"] >= means["none"]
    print(f"ablation {label:9s} order judged >= rule-based >= none: {'yes' if order else 'no'}")
    return means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the quickstart's run directory (runs/quickstart)")
    args = parser.parse_args(argv)
    run = args.run_dir
    if not (run / "metrics").is_dir():
        parser.error(f"{run}: no metrics/ folder; is it a finished quickstart run directory?")
    figures = {**warmup_figures(run), "judge_auc": judge_auc(run)}
    for name, target in TARGETS.items():
        value = figures[name]
        verdict = "no figure" if math.isnan(value) else ("met" if value >= target else "missed")
        print(f"{name:26s} {value:7.3f}   target >= {target:.2f}: {verdict}")
    means = _arms_line("mean", arm_figures(run))  # mean P@1 over subsets
    _arms_line(FALSE_NEGATIVE_SUBSET, arm_figures(run, FALSE_NEGATIVE_SUBSET))
    print(
        " ".join(f"{k}={v:.3f}" for k, v in figures.items())
        + f" judged={means['judged']:.3f} rule={means['rule']:.3f} none={means['none']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
