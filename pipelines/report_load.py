"""What a run of `assay loop` wrote, read for the run report (pipelines/report.py).

Run directory read (written by pipelines/loop.py)::

    loop.json          name, file, steps (names, in order), ablation [{arm, eval}], started, finished
    steps/<name>.json  name, index, run, status, started, finished, seconds, argv, error, outputs:
                       dataset (ingest ... judge), train_dir + checkpoint (train), metrics (eval), path

plus the outputs the steps name: an eval step's metrics JSON and a train step's ``train_log.jsonl``.
An unreadable step file becomes a failed step that says why; an unreadable output is returned with
the reason, so the report never fails because of one step.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from assay.curation import storage
from assay.curation.dataset import Dataset
from assay.pipelines.report_common import NOT_RUN, READ_ERRORS, Step, num, output_path

__all__ = ["load_run", "outputs_summary", "read_metrics", "read_train_log"]


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[Step]]:
    """``loop.json`` and the steps: those ``loop.json`` lists, in its order, then any other step file."""
    run_dir = storage.path(run_dir)
    loop_file, steps_dir = run_dir / "loop.json", run_dir / "steps"
    if not loop_file.is_file() and not steps_dir.is_dir():
        raise FileNotFoundError(
            f"{run_dir} is not a run directory of `assay loop` (no loop.json, no steps/); "
            "pass the directory `assay loop FILE.yaml` writes into"
        )
    loop: dict[str, Any] = {}
    if loop_file.is_file():
        try:
            loop = json.loads(loop_file.read_text())
        except ValueError as e:
            raise ValueError(
                f"{loop_file}: not valid JSON ({e}); was the loop killed while writing it?"
            ) from e
        if not isinstance(loop, dict):
            raise ValueError(
                f"{loop_file}: expected a JSON object (name, steps, ...), found {type(loop).__name__}"
            )
    steps: dict[str, Step] = {}
    for i, entry in enumerate(loop.get("steps") or []):
        if isinstance(entry, dict):  # {"name": ..., "run": ...} tells the kind of a step not run yet
            steps[str(entry.get("name"))] = Step(
                name=str(entry.get("name")), index=i, run=str(entry.get("run") or "")
            )
        else:
            steps[str(entry)] = Step(name=str(entry), index=i)
    for path in sorted(steps_dir.glob("*.json")) if steps_dir.is_dir() else []:
        step = _read_step(path)
        steps[step.name] = replace(step, index=steps[step.name].index) if step.name in steps else step
    return loop, sorted(steps.values(), key=lambda s: s.index)


def _read_step(path: Path) -> Step:
    try:
        obj = json.loads(path.read_text())
        return Step(
            name=str(obj.get("name") or path.stem),
            index=int(obj.get("index", 1 << 30)),
            run=str(obj.get("run") or ""),
            status=str(obj.get("status") or NOT_RUN),
            started=obj.get("started"),
            finished=obj.get("finished"),
            seconds=None if obj.get("seconds") is None else float(obj["seconds"]),
            argv=[str(a) for a in obj.get("argv") or []],
            error=None if obj.get("error") is None else str(obj["error"]),
            outputs=dict(obj.get("outputs") or {}),
        )
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return Step(name=path.stem, index=1 << 30, status="failed", error=f"unreadable step file {path}: {e}")


def read_metrics(run_dir: Path, step: Step) -> tuple[dict[str, Any] | None, str]:
    """An eval step's metrics, or ``None`` and why not (the step's status, or what made them unreadable)."""
    if not step.complete or "metrics" not in step.outputs:
        return None, step.status if step.status != "complete" else NOT_RUN
    try:
        metrics = json.loads(output_path(run_dir, step.outputs["metrics"]).read_text())
        for entry in metrics["per_subset"].values():
            float(entry["p_at_1"])
        return metrics, ""
    except READ_ERRORS as e:
        return None, f"metrics unreadable: {e}"


def outputs_summary(run_dir: Path, out: dict[str, Any]) -> str:
    """One line on what a step's ``outputs`` hold: a dataset's counts (per split when there are
    several), an eval's overall P@1, the checkpoint's name, else every output; raises what an
    unreadable output raises (see ``READ_ERRORS``)."""
    if "dataset" in out:
        root = output_path(run_dir, out["dataset"])
        # `assay ingest --format example` writes one dataset per split under OUT
        parts = [root] if (root / "manifest.json").exists() else sorted(root.glob("*/manifest.json"))
        texts = []
        for part in parts or [root]:
            part = part.parent if part.name == "manifest.json" else part
            c = Dataset(part).manifest.counts
            counts = " · ".join(
                f"{k} {c[k]:,}" for k in ("queries", "corpus", "pairs", "quarantine") if k in c
            )
            texts.append(counts if part == root else f"{part.name}: {counts}")
        return "; ".join(texts)
    if "metrics" in out:
        o = json.loads(output_path(run_dir, out["metrics"]).read_text())["overall"]
        return f"P@1 {num(o.get('p_at_1'))} (micro {num(o.get('p_at_1_micro'))}, {o.get('queries')} queries)"
    if "checkpoint" in out:
        return f"checkpoint {Path(out['checkpoint']).name}"
    return " · ".join(f"{k} {v}" for k, v in out.items())


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """The log's records with a finite loss (a line being written by a running step is skipped)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            if isinstance(r, dict) and math.isfinite(float(r["loss"])):
                out.append({**r, "step": int(r["step"]), "loss": float(r["loss"])})
        except (ValueError, KeyError, TypeError):
            continue
    return out
