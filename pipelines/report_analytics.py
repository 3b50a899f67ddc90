"""The figures of the run report (pipelines/report.py), computed from what the run wrote.

- the run: its overall status, wall time and each step's time (a running step: the time so far);
- eval metrics: the subsets the evals cover, in order, and the chance level of P@1 (one column when
  every eval agrees on it);
- ablation: each arm's evals found (one per seed), P@1 averaged over the seeds, and the spread
  (sample standard deviation) over them.

A metrics row is ``(label, metrics or None, note)``: the eval step or arm, its metrics as
``assay eval`` wrote them (``per_subset``, ``overall``, ``chance_p_at_1``, ``settings``) and, when
there are none, why.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from assay.pipelines.report_common import Step, dur, parse_time
from assay.pipelines.report_load import read_metrics

__all__ = [
    "ArmResult",
    "MetricsRow",
    "ablation_arms",
    "chance_columns",
    "mean_and_sd",
    "mean_metrics",
    "run_status",
    "step_seconds",
    "subsets_of",
    "wall_time",
]

MetricsRow = tuple[str, dict[str, Any] | None, str]


# --- the run ---------------------------------------------------------------------------------------


def run_status(loop: dict[str, Any], steps: list[Step]) -> str:
    """``failed`` if a step failed, ``complete`` if the loop finished with every step complete,
    ``running`` if it started and has not finished, else ``incomplete``."""
    started, finished = parse_time(loop.get("started")), parse_time(loop.get("finished"))
    statuses = Counter(s.status for s in steps)
    if statuses["failed"]:
        return "failed"
    if finished is not None and statuses["complete"] == len(steps):
        return "complete"
    return "running" if finished is None and started is not None else "incomplete"


def wall_time(loop: dict[str, Any], now: datetime) -> str:
    """The loop's time from start to finish, or so far; ``–`` if it has not started."""
    started, finished = parse_time(loop.get("started")), parse_time(loop.get("finished"))
    if started and finished:
        return f"{dur((finished - started).total_seconds())}"
    if started:
        return f"{dur((now - started).total_seconds())} so far"
    return "–"


def step_seconds(s: Step, now: datetime) -> float:
    """The step's time; for a running step, the time since it started."""
    if s.seconds is not None:
        return s.seconds
    started = parse_time(s.started)
    return (now - started).total_seconds() if s.status == "running" and started is not None else 0.0


# --- eval metrics ----------------------------------------------------------------------------------


def subsets_of(rows: list[MetricsRow]) -> list[str]:
    """Every subset of the rows' metrics, in the order first met."""
    seen: dict[str, None] = {}
    for _, m, _ in rows:
        for subset in (m or {}).get("per_subset", {}):
            seen.setdefault(subset, None)
    return list(seen)


def chance_columns(rows: list[MetricsRow]) -> list[tuple[str, dict[str, float]]]:
    """One "chance" column when every eval agrees on it (the same eval data); one per eval otherwise."""
    chances = [(label, m.get("chance_p_at_1") or {}) for label, m, _ in rows if m is not None]
    chances = [(label, c) for label, c in chances if c]
    if not chances:
        return []
    first = chances[0][1]
    same = all(c.keys() == first.keys() and all(math.isclose(c[k], first[k]) for k in c) for _, c in chances)
    return [("chance", first)] if same else [(f"chance ({label})", c) for label, c in chances]


# --- ablation --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmResult:
    """One ablation arm: its label (with the seeds found, for a seeded arm), P@1 averaged over the
    seeds found (``None`` if none), why evals are missing, and each seed's metrics."""

    label: str
    metrics: dict[str, Any] | None
    note: str
    seeds: list[dict[str, Any]]


def ablation_arms(run_dir: Path, loop: dict[str, Any], steps: list[Step]) -> list[ArmResult]:
    """The arms ``loop.json`` lists under ``ablation``, each with the metrics of its eval steps."""
    by_name = {s.name: s for s in steps}
    results = []
    for a in [a for a in loop.get("ablation") or [] if isinstance(a, dict)]:
        arm = str(a.get("arm", "?"))
        evals = [str(e) for e in (a.get("evals") or [a.get("eval", "")])]  # runs before seeds: `eval`
        found, notes = [], []
        for ev in evals:
            step = by_name.get(ev)
            metrics, note = (
                (None, f"eval step {ev!r} is not in this run")
                if step is None
                else read_metrics(run_dir, step)
            )
            if metrics is None:
                notes.append((ev, note))
            else:
                found.append(metrics)
        if len(evals) == 1:
            label, note = arm, notes[0][1] if notes else ""
        else:
            missing = f"; without {', '.join(ev for ev, _ in notes)}" if found and notes else ""
            label = f"{arm} ({len(found)} of {len(evals)} seeds{missing})"
            note = "; ".join(f"{ev}: {n}" for ev, n in notes)
        results.append(ArmResult(label, mean_metrics(found) if found else None, note, found))
    return results


def mean_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One eval's shape from several seeds' evals: per subset and overall, P@1 averaged."""
    first = runs[0]
    per_subset = {
        subset: {**entry, "p_at_1": statistics.fmean(m["per_subset"][subset]["p_at_1"] for m in runs)}
        for subset, entry in first["per_subset"].items()
        if all(subset in m["per_subset"] for m in runs)
    }
    overall = {
        key: statistics.fmean(m["overall"][key] for m in runs)
        for key in ("p_at_1", "p_at_1_micro")
        if all(m.get("overall", {}).get(key) is not None for m in runs)
    }
    return {**first, "per_subset": per_subset, "overall": {**first.get("overall", {}), **overall}}


def mean_and_sd(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for one value) of ``values``."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
