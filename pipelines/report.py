"""The run report of `assay loop`: one self-contained HTML file per run directory.

``build_report(run_dir)`` reads what the loop wrote (``loop.json``, ``steps/<name>.json``) and the
outputs the steps name, and writes ``RUN/report.html`` with:

- the run: every step's status, error, output and time (table and bar chart), and the total time;
- eval metrics: P@1 per subset of every eval step, with the chance level and overall (table and
  grouped bar chart), and the ablation (P@1 per subset per arm) when ``loop.json`` lists arms;
- training: the loss curve of every train step, raw and smoothed (a running or failed step shows
  what it logged so far);
- mining and judge (pipelines/report_datasets.py): per mine step and subset, cosine scores of the
  gold positives vs the mined negatives; per judge step, the false-negative rate and the p_yes
  histograms per subset, and the judge's quality against a truth when the step had one.

Plots are inline SVG drawn by matplotlib (pipelines/report_plots.py); the page has no JavaScript
and no external URL, so it can be archived or mailed alone. Every string read from the run (step
names, subsets, errors) is escaped. A step that has not run, is running or failed shows that in its
place, and an output that cannot be read shows why in its section: the report never fails because
of one step.

Run directory read (written by pipelines/loop.py)::

    loop.json          name, file, steps (names, in order), ablation [{arm, eval}], started, finished
    steps/<name>.json  name, index, run, status, started, finished, seconds, argv, error, outputs:
                       dataset (ingest ... judge), train_dir + checkpoint (train), metrics (eval), path
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from assay.curation.dataset import Dataset, atomic_write_bytes
from assay.pipelines import report_plots as plots
from assay.pipelines.report_common import (
    NOT_RUN,
    READ_ERRORS,
    Step,
    badge,
    clip,
    dur,
    esc,
    no_output,
    num,
    output_path,
    parse_time,
    subset_cell,
)
from assay.pipelines.report_datasets import judge_section, mining_section

__all__ = ["NOT_RUN", "REPORT_FILE", "Step", "build_report", "load_run", "render_report"]

REPORT_FILE = "report.html"


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of the run in ``run_dir`` to ``out`` (default ``run_dir/report.html``),
    atomically; returns its path."""
    run_dir = Path(run_dir)
    loop, steps = load_run(run_dir)
    path = Path(out) if out is not None else run_dir / REPORT_FILE
    atomic_write_bytes(path, render_report(run_dir, loop, steps).encode("utf-8"))
    return path


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[Step]]:
    """``loop.json`` and the steps: those ``loop.json`` lists, in its order, then any other step file."""
    run_dir = Path(run_dir)
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


def render_report(run_dir: Path, loop: dict[str, Any], steps: list[Step]) -> str:
    """The whole HTML page."""
    now = datetime.now(UTC)
    name = str(loop.get("name") or run_dir.resolve().name)
    with plots.plot_settings():
        sections = [
            ("steps", "Steps and time", _steps_section(run_dir, steps, now)),
            ("metrics", "Eval metrics", _metrics_section(run_dir, steps)),
            ("ablation", "Ablation", _ablation_section(run_dir, loop, steps)),
            ("training", "Training loss", _training_section(run_dir, steps)),
            ("mining", "Mined negatives", mining_section(run_dir, steps)),
            ("judge", "Judge", judge_section(run_dir, steps)),
        ]
    sections = [s for s in sections if s[2]]
    nav = " · ".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    body = "\n".join(
        f'<section id="{key}"><h2>{title}</h2>\n{content}</section>' for key, title, content in sections
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>assay run {esc(name)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>assay run <code>{esc(name)}</code></h1>\n"
        f"{_run_header(run_dir, loop, steps, now)}<nav>{nav}</nav>\n{body}\n</body></html>\n"
    )


# --- run summary -----------------------------------------------------------------------------------


def _run_header(run_dir: Path, loop: dict[str, Any], steps: list[Step], now: datetime) -> str:
    started, finished = parse_time(loop.get("started")), parse_time(loop.get("finished"))
    statuses = Counter(s.status for s in steps)
    if statuses["failed"]:
        status = "failed"
    elif finished is not None and statuses["complete"] == len(steps):
        status = "complete"
    else:
        status = "running" if finished is None and started is not None else "incomplete"
    if started and finished:
        wall = f"{dur((finished - started).total_seconds())}"
    elif started:
        wall = f"{dur((now - started).total_seconds())} so far"
    else:
        wall = "–"
    in_steps = sum(s.seconds or 0.0 for s in steps)
    counts = ", ".join(f"{n} {esc(k)}" for k, n in sorted(statuses.items()))
    rows = [
        ("status", f"{badge(status)} ({counts})"),
        ("loop file", f"<code>{esc(loop.get('file') or '–')}</code>"),
        ("run directory", f"<code>{esc(run_dir.resolve())}</code>"),
        ("started", esc(loop.get("started") or "–")),
        ("finished", esc(loop.get("finished") or "–")),
        ("total time", f"{esc(wall)} (time in steps: {dur(in_steps)})"),
        ("report written", now.strftime("%Y-%m-%dT%H:%M:%SZ")),
    ]
    return (
        '<table class="kv">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>\n"
    )


def _steps_section(run_dir: Path, steps: list[Step], now: datetime) -> str:
    if not steps:
        return "<p class=note>No steps: loop.json lists none and steps/ is empty.</p>"
    head = "<tr><th>#</th><th>step</th><th>command</th><th>status</th><th>time</th><th>started</th><th>output</th></tr>"
    rows = []
    for i, s in enumerate(steps, 1):
        detail = ""
        if s.error:
            detail += f"<pre class=error>{esc(clip(s.error))}</pre>"
        if s.argv:
            detail += f"<details><summary>command line</summary><pre>{esc(' '.join(s.argv))}</pre></details>"
        rows.append(
            f"<tr><td>{i}</td><td><code>{esc(s.name)}</code></td><td>{esc(s.run or '–')}</td>"
            f"<td>{badge(s.status)}</td><td class=num>{esc(_step_time(s, now))}</td>"
            f"<td>{esc(s.started or '–')}</td><td>{_step_output(run_dir, s)}{detail}</td></tr>"
        )
    seconds = [_seconds(s, now) for s in steps]
    labels = [
        dur(t) if s.complete else s.status + (f", {dur(t)}" if t else "")
        for s, t in zip(steps, seconds, strict=True)
    ]
    chart = plots.steps_chart([s.name for s in steps], seconds, [s.status for s in steps], labels)
    return f"<table>{head}{''.join(rows)}</table>\n{chart}"


def _seconds(s: Step, now: datetime) -> float:
    """The step's time; for a running step, the time since it started."""
    if s.seconds is not None:
        return s.seconds
    started = parse_time(s.started)
    return (now - started).total_seconds() if s.status == "running" and started is not None else 0.0


def _step_time(s: Step, now: datetime) -> str:
    if s.seconds is not None:
        return dur(s.seconds)
    if s.status == "running" and parse_time(s.started) is not None:
        return f"{dur(_seconds(s, now))} so far"
    return "–"


def _step_output(run_dir: Path, s: Step) -> str:
    """One line on what a complete step produced (dataset counts, checkpoint, P@1, export path)."""
    out = s.outputs
    if not s.complete or not out:
        return "" if s.status != NOT_RUN else f"<span class=note>{NOT_RUN}</span>"
    try:
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
            text = "; ".join(texts)
        elif "metrics" in out:
            o = json.loads(output_path(run_dir, out["metrics"]).read_text())["overall"]
            text = (
                f"P@1 {num(o.get('p_at_1'))} (micro {num(o.get('p_at_1_micro'))}, {o.get('queries')} queries)"
            )
        elif "checkpoint" in out:
            text = f"checkpoint {Path(out['checkpoint']).name}"
        else:
            text = " · ".join(f"{k} {v}" for k, v in out.items())
    except READ_ERRORS as e:
        return f"<span class=warn>output unreadable: {esc(e)}</span>"
    return f"<span title='{esc(json.dumps(out))}'>{esc(text)}</span>"


# --- eval metrics and ablation ---------------------------------------------------------------------


def _metrics_of(run_dir: Path, step: Step) -> dict[str, Any]:
    return json.loads(output_path(run_dir, step.outputs["metrics"]).read_text())


def _metrics_section(run_dir: Path, steps: list[Step]) -> str:
    evals = [s for s in steps if s.run == "eval"]
    if not evals:
        return ""
    rows: list[tuple[str, dict[str, Any] | None, str]] = []
    details = []
    for s in evals:
        metrics, note = _try_metrics(run_dir, s)
        rows.append((s.name, metrics, note))
        if metrics is not None:
            details.append(_metrics_detail(s.name, metrics))
    truths = sorted({(m["settings"].get("truth") or {}).get("path", "") for _, m, _ in rows if m} - {""})
    note = (
        "<p>Scored against the truth "
        + ", ".join(f"<code>{esc(t)}</code>" for t in truths)
        + ": every matching doc counts as relevant, labelled or not (<code>assay eval --truth</code>).</p>"
        if truths
        else ""
    )
    return (
        note
        + _p_at_1_table("eval step", rows)
        + _p_at_1_chart(rows, "P@1 per subset, per eval step")
        + "".join(details)
    )


def _ablation_section(run_dir: Path, loop: dict[str, Any], steps: list[Step]) -> str:
    """Each arm's P@1 per subset; an arm with one eval per seed shows the mean over its seeds, and a
    second table the spread (sample standard deviation) with each seed's figure."""
    arms = [a for a in loop.get("ablation") or [] if isinstance(a, dict)]
    if not arms:
        return ""
    by_name = {s.name: s for s in steps}
    rows, spreads = [], []
    for a in arms:
        arm = str(a.get("arm", "?"))
        evals = [str(e) for e in (a.get("evals") or [a.get("eval", "")])]  # runs before seeds: `eval`
        found, notes = [], []
        for ev in evals:
            step = by_name.get(ev)
            metrics, note = (
                (None, f"eval step {ev!r} is not in this run")
                if step is None
                else _try_metrics(run_dir, step)
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
        rows.append((label, _mean_metrics(found) if found else None, note))
        spreads.append((label, found))
    seeded = any(len(found) > 1 for _, found in spreads)
    intro = (
        "<p>P@1 per subset of each arm: the mean over the arm's seeds (one eval step per seed); "
        "the spread over seeds is the table below.</p>"
        if seeded
        else "<p>P@1 per subset of each arm (the eval step each arm names).</p>"
    )
    return (
        intro
        + _p_at_1_table("arm", rows)
        + (_spread_table(spreads) if seeded else "")
        + _p_at_1_chart(rows, "P@1 per subset, per ablation arm")
    )


def _mean_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
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


def _spread_table(arms: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """Per subset and arm: mean +- sample standard deviation of P@1 over the seeds, and each seed's."""
    subsets = _subsets_of([(label, m, "") for label, runs in arms for m in runs])
    head = "<tr><th>subset \\ arm</th>" + "".join(f"<th>{esc(label)}</th>" for label, _ in arms) + "</tr>"

    def cell(values: list[float]) -> str:
        if not values:
            return "<td class=num>–</td>"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        each = ", ".join(num(v) for v in values)
        return f"<td class=num>{num(statistics.fmean(values))} ± {num(sd)}<br><span class=note>{each}</span></td>"

    body = "".join(
        f"<tr><td>{esc(s)}</td>"
        + "".join(
            cell([m["per_subset"][s]["p_at_1"] for m in runs if s in m["per_subset"]]) for _, runs in arms
        )
        + "</tr>"
        for s in subsets
    )
    body += (
        "<tr class=total><td>overall (mean over subsets)</td>"
        + "".join(
            cell([m["overall"]["p_at_1"] for m in runs if "p_at_1" in m.get("overall", {})])
            for _, runs in arms
        )
        + "</tr>"
    )
    return (
        f"<p>Spread over seeds: mean ± standard deviation, then each seed.</p><table>{head}{body}</table>\n"
    )


def _try_metrics(run_dir: Path, step: Step) -> tuple[dict[str, Any] | None, str]:
    if not step.complete or "metrics" not in step.outputs:
        return None, step.status if step.status != "complete" else NOT_RUN
    try:
        metrics = _metrics_of(run_dir, step)
        for entry in metrics["per_subset"].values():
            float(entry["p_at_1"])
        return metrics, ""
    except READ_ERRORS as e:
        return None, f"metrics unreadable: {e}"


def _subsets_of(rows: list[tuple[str, dict[str, Any] | None, str]]) -> list[str]:
    seen: dict[str, None] = {}
    for _, m, _ in rows:
        for subset in (m or {}).get("per_subset", {}):
            seen.setdefault(subset, None)
    return list(seen)


def _p_at_1_table(kind: str, rows: list[tuple[str, dict[str, Any] | None, str]]) -> str:
    """P@1 with one row per subset (MMEB has 36) and one column per eval step or arm, then chance."""
    subsets = _subsets_of(rows)
    chances = _chance_rows(rows)
    head = f"<tr><th>subset \\ {esc(kind)}</th>"
    for label, m, note in rows:
        status = "" if m is not None else f"<br><span class=note>{esc(note)}</span>"
        head += f"<th><code>{esc(label)}</code>{status}</th>"
    head += "".join(f"<th class=chance>{esc(label)}</th>" for label, _ in chances) + "</tr>"

    def line(title: str, value_of: Any, css: str = "") -> str:
        cells = "".join(f"<td class=num>{value_of(m) if m is not None else '–'}</td>" for _, m, _ in rows)
        return f"<tr{css}><td>{title}</td>{cells}"

    body = []
    for s in subsets:
        chance = "".join(f"<td class='num chance'>{num(c.get(s))}</td>" for _, c in chances)
        body.append(
            line(subset_cell(s), lambda m, s=s: num(m["per_subset"].get(s, {}).get("p_at_1")))
            + chance
            + "</tr>"
        )
    blank = "<td></td>" * len(chances)
    overall = [
        ("overall (mean over subsets)", "p_at_1", " class=total"),
        ("overall (micro, over queries)", "p_at_1_micro", ""),
        ("queries", "queries", ""),
    ]
    for title, key, css in overall:
        fmt = num if key != "queries" else (lambda v: esc("–" if v is None else v))
        body.append(
            line(title, lambda m, key=key, fmt=fmt: fmt(m.get("overall", {}).get(key)), css) + blank + "</tr>"
        )
    return f"<table>{head}{''.join(body)}</table>\n"


def _chance_rows(rows: list[tuple[str, dict[str, Any] | None, str]]) -> list[tuple[str, dict[str, float]]]:
    """One "chance" column when every eval agrees on it (the same eval data); one per eval otherwise."""
    chances = [(label, m.get("chance_p_at_1") or {}) for label, m, _ in rows if m is not None]
    chances = [(label, c) for label, c in chances if c]
    if not chances:
        return []
    first = chances[0][1]
    same = all(c.keys() == first.keys() and all(math.isclose(c[k], first[k]) for k in c) for _, c in chances)
    return [("chance", first)] if same else [(f"chance ({label})", c) for label, c in chances]


def _p_at_1_chart(rows: list[tuple[str, dict[str, Any] | None, str]], title: str) -> str:
    done = [(label, m) for label, m, _ in rows if m is not None]
    if not done:
        return ""
    subsets = _subsets_of(rows)
    series = [
        (
            label,
            [m["per_subset"].get(s, {}).get("p_at_1") for s in subsets]
            + [m.get("overall", {}).get("p_at_1")],
        )
        for label, m in done
    ]
    chances = _chance_rows(rows)
    return plots.p_at_1_chart(series, [*subsets, "overall"], chances[0][1] if chances else {}, title)


def _metrics_detail(name: str, m: dict[str, Any]) -> str:
    settings = m.get("settings", {})
    cols = [f"recall@{k}" for k in settings.get("ks", [])] + (
        [f"ndcg@{settings['ndcg_at']}"] if "ndcg_at" in settings else []
    )
    cols = [c for c in cols if any(c in e for e in m["per_subset"].values())]
    chance = m.get("chance_p_at_1") or {}
    head = (
        "<tr><th>subset</th><th>task</th><th>queries</th><th>relevant / query</th><th>P@1</th><th>chance</th>"
    )
    head += "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
    body = "".join(
        f"<tr><td>{esc(s)}</td><td>{esc(e.get('task', '–'))}</td><td class=num>{esc(e.get('queries', '–'))}</td>"
        f"<td class=num>{num(e.get('positives_per_query'), 2)}</td>"
        f"<td class=num>{num(e.get('p_at_1'))}</td><td class=num>{num(chance.get(s))}</td>"
        + "".join(f"<td class=num>{num(e.get(c))}</td>" for c in cols)
        + "</tr>"
        for s, e in m["per_subset"].items()
    )
    ckpt = m.get("checkpoint")
    where = f" — checkpoint <code>{esc(ckpt)}</code>" if ckpt else ""
    return f"<details><summary>all metrics of <code>{esc(name)}</code>{where}</summary><table>{head}{body}</table></details>\n"


# --- training --------------------------------------------------------------------------------------


def _training_section(run_dir: Path, steps: list[Step]) -> str:
    trains = [s for s in steps if s.run == "train"]
    if not trains:
        return ""
    cards = []
    for s in trains:
        title = f"<h3><code>{esc(s.name)}</code> {badge(s.status)}</h3>"
        train_dir = s.outputs.get("train_dir")
        if not train_dir:
            cards.append(f"<div class=card>{title}<p class=note>{esc(no_output(s))}</p></div>")
            continue
        try:
            log = _read_train_log(output_path(run_dir, train_dir) / "train_log.jsonl")
        except OSError as e:
            cards.append(f"<div class=card>{title}<p class=warn>no training log: {esc(e)}</p></div>")
            continue
        if not log:
            cards.append(f"<div class=card>{title}<p class=note>the training log is empty</p></div>")
            continue
        loss = [r["loss"] for r in log]
        secs = sum(float(r.get("seconds") or 0.0) for r in log)
        facts = (
            f"{len(log)} logged steps up to step {log[-1]['step']}; loss {num(loss[0])} → {num(loss[-1])} "
            f"(min {num(min(loss))}); {dur(secs)} in logged steps"
        )
        chart = plots.loss_chart(s.name, [r["step"] for r in log], loss)
        cards.append(f"<div class=card>{title}<p>{esc(facts)}</p>{chart}</div>")
    return f"<div class=grid>{''.join(cards)}</div>\n"


def _read_train_log(path: Path) -> list[dict[str, Any]]:
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


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#212121;max-width:1160px;
margin:24px auto;padding:0 16px;background:#fff}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;border-bottom:2px solid #e0e0e0;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:20px 0 6px}nav{margin:12px 0;color:#616161}a{color:#1565c0}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{border:1px solid #e0e0e0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv th{width:130px}.chance{color:#616161;font-style:italic}tr.total td{font-weight:600}
.badge{color:#fff;border-radius:3px;padding:0 6px;font-size:12px;white-space:nowrap}
.note{color:#757575}.warn{color:#c62828}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;font-size:12px;max-height:240px;overflow:auto}
pre.error{color:#b71c1c;background:#ffebee;padding:4px}
figure.plot{margin:8px 0}figure.plot svg{max-width:100%;height:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
.card{border:1px solid #e0e0e0;border-radius:4px;padding:0 10px}
details{margin:6px 0}
"""
