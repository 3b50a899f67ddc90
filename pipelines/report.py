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

This module writes the page (HTML of the run, eval and training sections, and the style sheet);
pipelines/report_load.py reads the run directory and pipelines/report_analytics.py computes the
figures shown (run status and times, chance levels, the ablation's means and spreads over seeds).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from assay.curation import storage
from assay.curation.dataset import atomic_write_bytes
from assay.curation.lock import writing
from assay.pipelines import report_plots as plots
from assay.pipelines.report_analytics import (
    MetricsRow,
    ablation_arms,
    chance_columns,
    mean_and_sd,
    run_status,
    step_seconds,
    subsets_of,
    wall_time,
)
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
from assay.pipelines.report_load import load_run, outputs_summary, read_metrics, read_train_log

__all__ = ["REPORT_FILE", "build_report", "render_report"]

REPORT_FILE = "report.html"


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of the run in ``run_dir`` to ``out`` (default ``run_dir/report.html``),
    atomically, holding its lock (a second writer is refused); returns its path."""
    run_dir = storage.path(run_dir)
    path = storage.path(out) if out is not None else run_dir / REPORT_FILE
    with writing(path, command="assay report"):
        loop, steps = load_run(run_dir)
        atomic_write_bytes(path, render_report(run_dir, loop, steps).encode("utf-8"))
    return path


def render_report(run_dir: Path, loop: dict[str, Any], steps: list[Step]) -> str:
    """The whole HTML page."""
    now = datetime.now(UTC)
    name = str(loop.get("name") or storage.path(storage.absolute(run_dir)).name)
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
    statuses = Counter(s.status for s in steps)
    in_steps = sum(s.seconds or 0.0 for s in steps)
    counts = ", ".join(f"{n} {esc(k)}" for k, n in sorted(statuses.items()))
    rows = [
        ("status", f"{badge(run_status(loop, steps))} ({counts})"),
        ("loop file", f"<code>{esc(loop.get('file') or '–')}</code>"),
        ("run directory", f"<code>{esc(storage.display(storage.absolute(run_dir)))}</code>"),
        ("started", esc(loop.get("started") or "–")),
        ("finished", esc(loop.get("finished") or "–")),
        ("total time", f"{esc(wall_time(loop, now))} (time in steps: {dur(in_steps)})"),
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
    seconds = [step_seconds(s, now) for s in steps]
    labels = [
        dur(t) if s.complete else s.status + (f", {dur(t)}" if t else "")
        for s, t in zip(steps, seconds, strict=True)
    ]
    chart = plots.steps_chart([s.name for s in steps], seconds, [s.status for s in steps], labels)
    return f"<table>{head}{''.join(rows)}</table>\n{chart}"


def _step_time(s: Step, now: datetime) -> str:
    if s.seconds is not None:
        return dur(s.seconds)
    if s.status == "running" and parse_time(s.started) is not None:
        return f"{dur(step_seconds(s, now))} so far"
    return "–"


def _step_output(run_dir: Path, s: Step) -> str:
    """One line on what a complete step produced (dataset counts, checkpoint, P@1, export path)."""
    out = s.outputs
    if not s.complete or not out:
        return "" if s.status != NOT_RUN else f"<span class=note>{NOT_RUN}</span>"
    try:
        text = outputs_summary(run_dir, out)
    except READ_ERRORS as e:
        return f"<span class=warn>output unreadable: {esc(e)}</span>"
    return f"<span title='{esc(json.dumps(out))}'>{esc(text)}</span>"


# --- eval metrics and ablation ---------------------------------------------------------------------


def _metrics_section(run_dir: Path, steps: list[Step]) -> str:
    evals = [s for s in steps if s.run == "eval"]
    if not evals:
        return ""
    rows: list[MetricsRow] = []
    details = []
    for s in evals:
        metrics, note = read_metrics(run_dir, s)
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
    arms = ablation_arms(run_dir, loop, steps)
    if not arms:
        return ""
    rows: list[MetricsRow] = [(a.label, a.metrics, a.note) for a in arms]
    spreads = [(a.label, a.seeds) for a in arms]
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


def _spread_table(arms: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """Per subset and arm: mean +- sample standard deviation of P@1 over the seeds, and each seed's."""
    subsets = subsets_of([(label, m, "") for label, runs in arms for m in runs])
    head = "<tr><th>subset \\ arm</th>" + "".join(f"<th>{esc(label)}</th>" for label, _ in arms) + "</tr>"

    def cell(values: list[float]) -> str:
        if not values:
            return "<td class=num>–</td>"
        mean, sd = mean_and_sd(values)
        each = ", ".join(num(v) for v in values)
        return f"<td class=num>{num(mean)} ± {num(sd)}<br><span class=note>{each}</span></td>"

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


def _p_at_1_table(kind: str, rows: list[MetricsRow]) -> str:
    """P@1 with one row per subset (MMEB has 36) and one column per eval step or arm, then chance."""
    subsets = subsets_of(rows)
    chances = chance_columns(rows)
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


def _p_at_1_chart(rows: list[MetricsRow], title: str) -> str:
    done = [(label, m) for label, m, _ in rows if m is not None]
    if not done:
        return ""
    subsets = subsets_of(rows)
    series = [
        (
            label,
            [m["per_subset"].get(s, {}).get("p_at_1") for s in subsets]
            + [m.get("overall", {}).get("p_at_1")],
        )
        for label, m in done
    ]
    chances = chance_columns(rows)
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
            log = read_train_log(output_path(run_dir, train_dir) / "train_log.jsonl")
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
