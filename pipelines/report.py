"""The run report of `assay loop`: one self-contained HTML file per run directory.

``build_report(run_dir)`` reads what the loop wrote (``loop.json``, ``steps/<name>.json``) and the
outputs the steps name, and writes ``RUN/report.html`` with:

- the run: every step's status, error, output and time (table and bar chart), and the total time;
- eval metrics: P@1 per subset of every eval step, with the chance level and overall (table and
  grouped bar chart), and the ablation (P@1 per subset per arm) when ``loop.json`` lists arms;
- training: the loss curve of every train step, raw and smoothed (a running or failed step shows
  what it logged so far);
- mining: per mine step and subset, cosine scores of the gold positives vs the mined negatives;
- judge: per judge step, p_yes histograms per subset (positives vs candidates) and the
  false-negative rate per subset: pairs relabelled ``false_negative`` / judged non-gold pairs.

Plots are inline SVG drawn by matplotlib (pipelines/report_plots.py); the page has no JavaScript
and no external URL, so it can be archived or mailed alone. Every string read from the run (step names, subsets, errors) is escaped.
A step that has not run, is running or failed shows that in its place, and an output that cannot be
read shows why in its section: the report never fails because of one step.

Run directory read (written by pipelines/loop.py)::

    loop.json          name, file, steps (names, in order), ablation [{arm, eval}], started, finished
    steps/<name>.json  name, index, run, status, started, finished, seconds, argv, error, outputs:
                       dataset (ingest ... judge), train_dir + checkpoint (train), metrics (eval), path

Mined negatives are the pairs whose origin starts with ``mined:``; positives are the gold pairs with a
score (without one, the percentiles in the manifest's ``extra.mine`` stand in). p_yes histograms are
``curation.judge.stage.p_yes_histograms``.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.dataset import Dataset, DatasetError, atomic_write_bytes
from curation.judge.stage import p_yes_histograms
from curation.schema import PAIRS, QUERIES
from mining.stage import MINED_PREFIX
from pipelines import report_plots as plots

REPORT_FILE = "report.html"
NOT_RUN = "not run yet"
#: Errors an unreadable or half-written output raises; its section says so instead of failing.
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, DatasetError)
_JUDGE_BINS = 20


@dataclass
class Step:
    """One step of the run, as its ``steps/<name>.json`` says (``status`` is NOT_RUN without one)."""

    name: str
    index: int
    run: str = ""
    status: str = NOT_RUN
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    argv: list[str] = field(default_factory=list)
    error: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == "complete"


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
            ("mining", "Mined negatives", _mining_section(run_dir, steps)),
            ("judge", "Judge", _judge_section(run_dir, steps)),
        ]
    sections = [s for s in sections if s[2]]
    nav = " · ".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    body = "\n".join(
        f'<section id="{key}"><h2>{title}</h2>\n{content}</section>' for key, title, content in sections
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>assay run {_e(name)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>assay run <code>{_e(name)}</code></h1>\n"
        f"{_run_header(run_dir, loop, steps, now)}<nav>{nav}</nav>\n{body}\n</body></html>\n"
    )


# --- run summary -----------------------------------------------------------------------------------


def _run_header(run_dir: Path, loop: dict[str, Any], steps: list[Step], now: datetime) -> str:
    started, finished = _time(loop.get("started")), _time(loop.get("finished"))
    statuses = Counter(s.status for s in steps)
    if statuses["failed"]:
        status = "failed"
    elif finished is not None and statuses["complete"] == len(steps):
        status = "complete"
    else:
        status = "running" if finished is None and started is not None else "incomplete"
    if started and finished:
        wall = f"{_dur((finished - started).total_seconds())}"
    elif started:
        wall = f"{_dur((now - started).total_seconds())} so far"
    else:
        wall = "–"
    in_steps = sum(s.seconds or 0.0 for s in steps)
    counts = ", ".join(f"{n} {_e(k)}" for k, n in sorted(statuses.items()))
    rows = [
        ("status", f"{_badge(status)} ({counts})"),
        ("loop file", f"<code>{_e(loop.get('file') or '–')}</code>"),
        ("run directory", f"<code>{_e(run_dir.resolve())}</code>"),
        ("started", _e(loop.get("started") or "–")),
        ("finished", _e(loop.get("finished") or "–")),
        ("total time", f"{_e(wall)} (time in steps: {_dur(in_steps)})"),
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
            detail += f"<pre class=error>{_e(_clip(s.error))}</pre>"
        if s.argv:
            detail += f"<details><summary>command line</summary><pre>{_e(' '.join(s.argv))}</pre></details>"
        rows.append(
            f"<tr><td>{i}</td><td><code>{_e(s.name)}</code></td><td>{_e(s.run or '–')}</td>"
            f"<td>{_badge(s.status)}</td><td class=num>{_e(_step_time(s, now))}</td>"
            f"<td>{_e(s.started or '–')}</td><td>{_step_output(run_dir, s)}{detail}</td></tr>"
        )
    seconds = [_seconds(s, now) for s in steps]
    labels = [
        _dur(t) if s.complete else s.status + (f", {_dur(t)}" if t else "")
        for s, t in zip(steps, seconds, strict=True)
    ]
    chart = plots.steps_chart([s.name for s in steps], seconds, [s.status for s in steps], labels)
    return f"<table>{head}{''.join(rows)}</table>\n{chart}"


def _seconds(s: Step, now: datetime) -> float:
    """The step's time; for a running step, the time since it started."""
    if s.seconds is not None:
        return s.seconds
    started = _time(s.started)
    return (now - started).total_seconds() if s.status == "running" and started is not None else 0.0


def _step_time(s: Step, now: datetime) -> str:
    if s.seconds is not None:
        return _dur(s.seconds)
    if s.status == "running" and _time(s.started) is not None:
        return f"{_dur(_seconds(s, now))} so far"
    return "–"


def _step_output(run_dir: Path, s: Step) -> str:
    """One line on what a complete step produced (dataset counts, checkpoint, P@1, export path)."""
    out = s.outputs
    if not s.complete or not out:
        return "" if s.status != NOT_RUN else f"<span class=note>{NOT_RUN}</span>"
    try:
        if "dataset" in out:
            root = _path(run_dir, out["dataset"])
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
            o = json.loads(_path(run_dir, out["metrics"]).read_text())["overall"]
            text = f"P@1 {_num(o.get('p_at_1'))} (micro {_num(o.get('p_at_1_micro'))}, {o.get('queries')} queries)"
        elif "checkpoint" in out:
            text = f"checkpoint {Path(out['checkpoint']).name}"
        else:
            text = " · ".join(f"{k} {v}" for k, v in out.items())
    except _READ_ERRORS as e:
        return f"<span class=warn>output unreadable: {_e(e)}</span>"
    return f"<span title='{_e(json.dumps(out))}'>{_e(text)}</span>"


# --- eval metrics and ablation ---------------------------------------------------------------------


def _metrics_of(run_dir: Path, step: Step) -> dict[str, Any]:
    return json.loads(_path(run_dir, step.outputs["metrics"]).read_text())


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
    return (
        _p_at_1_table("eval step", rows)
        + _p_at_1_chart(rows, "P@1 per subset, per eval step")
        + "".join(details)
    )


def _ablation_section(run_dir: Path, loop: dict[str, Any], steps: list[Step]) -> str:
    arms = [a for a in loop.get("ablation") or [] if isinstance(a, dict)]
    if not arms:
        return ""
    by_name = {s.name: s for s in steps}
    rows = []
    for a in arms:
        arm, ev = str(a.get("arm", "?")), str(a.get("eval", ""))
        step = by_name.get(ev)
        if step is None:
            rows.append((arm, None, f"eval step {ev!r} is not in this run"))
        else:
            metrics, note = _try_metrics(run_dir, step)
            rows.append((arm, metrics, note))
    intro = "<p>P@1 per subset of each arm (the eval step each arm names).</p>"
    return intro + _p_at_1_table("arm", rows) + _p_at_1_chart(rows, "P@1 per subset, per ablation arm")


def _try_metrics(run_dir: Path, step: Step) -> tuple[dict[str, Any] | None, str]:
    if not step.complete or "metrics" not in step.outputs:
        return None, step.status if step.status != "complete" else NOT_RUN
    try:
        metrics = _metrics_of(run_dir, step)
        for entry in metrics["per_subset"].values():
            float(entry["p_at_1"])
        return metrics, ""
    except _READ_ERRORS as e:
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
    head = f"<tr><th>subset \\ {_e(kind)}</th>"
    for label, m, note in rows:
        status = "" if m is not None else f"<br><span class=note>{_e(note)}</span>"
        head += f"<th><code>{_e(label)}</code>{status}</th>"
    head += "".join(f"<th class=chance>{_e(label)}</th>" for label, _ in chances) + "</tr>"

    def line(title: str, value_of: Any, css: str = "") -> str:
        cells = "".join(f"<td class=num>{value_of(m) if m is not None else '–'}</td>" for _, m, _ in rows)
        return f"<tr{css}><td>{title}</td>{cells}"

    body = []
    for s in subsets:
        chance = "".join(f"<td class='num chance'>{_num(c.get(s))}</td>" for _, c in chances)
        body.append(
            line(_sub(s), lambda m, s=s: _num(m["per_subset"].get(s, {}).get("p_at_1"))) + chance + "</tr>"
        )
    blank = "<td></td>" * len(chances)
    overall = [
        ("overall (mean over subsets)", "p_at_1", " class=total"),
        ("overall (micro, over queries)", "p_at_1_micro", ""),
        ("queries", "queries", ""),
    ]
    for title, key, css in overall:
        fmt = _num if key != "queries" else (lambda v: _e("–" if v is None else v))
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
    head = "<tr><th>subset</th><th>task</th><th>queries</th><th>P@1</th><th>chance</th>"
    head += "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
    body = "".join(
        f"<tr><td>{_e(s)}</td><td>{_e(e.get('task', '–'))}</td><td class=num>{_e(e.get('queries', '–'))}</td>"
        f"<td class=num>{_num(e.get('p_at_1'))}</td><td class=num>{_num(chance.get(s))}</td>"
        + "".join(f"<td class=num>{_num(e.get(c))}</td>" for c in cols)
        + "</tr>"
        for s, e in m["per_subset"].items()
    )
    ckpt = m.get("checkpoint")
    where = f" — checkpoint <code>{_e(ckpt)}</code>" if ckpt else ""
    return f"<details><summary>all metrics of <code>{_e(name)}</code>{where}</summary><table>{head}{body}</table></details>\n"


# --- training --------------------------------------------------------------------------------------


def _training_section(run_dir: Path, steps: list[Step]) -> str:
    trains = [s for s in steps if s.run == "train"]
    if not trains:
        return ""
    cards = []
    for s in trains:
        title = f"<h3><code>{_e(s.name)}</code> {_badge(s.status)}</h3>"
        train_dir = s.outputs.get("train_dir")
        if not train_dir:
            cards.append(f"<div class=card>{title}<p class=note>{_e(_no_output(s))}</p></div>")
            continue
        try:
            log = _read_train_log(_path(run_dir, train_dir) / "train_log.jsonl")
        except OSError as e:
            cards.append(f"<div class=card>{title}<p class=warn>no training log: {_e(e)}</p></div>")
            continue
        if not log:
            cards.append(f"<div class=card>{title}<p class=note>the training log is empty</p></div>")
            continue
        loss = [r["loss"] for r in log]
        secs = sum(float(r.get("seconds") or 0.0) for r in log)
        facts = (
            f"{len(log)} logged steps up to step {log[-1]['step']}; loss {_num(loss[0])} → {_num(loss[-1])} "
            f"(min {_num(min(loss))}); {_dur(secs)} in logged steps"
        )
        chart = plots.loss_chart(s.name, [r["step"] for r in log], loss)
        cards.append(f"<div class=card>{title}<p>{_e(facts)}</p>{chart}</div>")
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


# --- mining ----------------------------------------------------------------------------------------


def _mining_section(run_dir: Path, steps: list[Step]) -> str:
    mines = [s for s in steps if s.run == "mine"]
    if not mines:
        return ""
    intro = (
        "<p>Cosine score of each query's gold positives and of the negatives this step mined "
        f"(pairs whose origin starts with <code>{MINED_PREFIX}</code>), per subset. "
        "Bars are the share of each group per score bin.</p>"
    )
    return intro + "".join(_one_mine(run_dir, s) for s in mines)


def _one_mine(run_dir: Path, s: Step) -> str:
    title = f"<h3><code>{_e(s.name)}</code> {_badge(s.status)}</h3>"
    if not s.complete or "dataset" not in s.outputs:
        return f"{title}<p class=note>{_e(_no_output(s))}</p>"
    try:
        ds = Dataset(_path(run_dir, s.outputs["dataset"]))
        scores = _mined_scores(ds)
        summary = ds.manifest.extra.get("mine") or {}
    except _READ_ERRORS as e:
        return f"{title}<p class=warn>mined dataset unreadable: {_e(e)}</p>"
    subsets = sorted(set(scores) | set(summary))
    if not subsets:
        return f"{title}<p class=note>no mined negatives and no positives with a score</p>"
    head = (
        "<tr><th>subset</th><th>queries</th><th>positives</th><th>positive score (mean / median)</th>"
        "<th>mined negatives</th><th>negative score (mean / median)</th></tr>"
    )
    body = []
    for sub in subsets:
        pos, neg = scores.get(sub, {}).get("positive"), scores.get(sub, {}).get("negative")
        info = summary.get(sub) or {}
        pstat = info.get("positive_score") or {}
        body.append(
            f"<tr><td>{_sub(sub)}</td><td class=num>{_e(info.get('queries', '–'))}</td>"
            f"<td class=num>{len(pos) if pos is not None else _e(pstat.get('n', 0))}</td>"
            f"<td class=num>{_mean_median(pos, pstat)}</td><td class=num>{0 if neg is None else len(neg)}</td>"
            f"<td class=num>{_mean_median(neg, info.get('negative_score') or {})}</td></tr>"
        )
    positive_stats = {sub: (summary.get(sub) or {}).get("positive_score") or {} for sub in subsets}
    chart = plots.score_histograms(s.name, subsets, scores, positive_stats)
    return f"{title}<table>{head}{''.join(body)}</table>\n{chart}"


def _mean_median(values: np.ndarray | None, stats: dict[str, Any]) -> str:
    if values is not None and len(values):
        return f"{_num(float(values.mean()))} / {_num(float(np.median(values)))}"
    return f"{_num(stats.get('mean'))} / {_num(stats.get('p50'))}"


class _Subsets:
    """Each pair's subset, looked up in Arrow: query id -> row of the queries table -> subset code.
    A query without a subset (or a pair whose query is missing) is in subset ""."""

    def __init__(self, ds: Dataset):
        ids, subsets = [], []
        for batch in ds.iter_batches(QUERIES, columns=["query_id", "subset"]):
            ids.append(batch.column(0))
            subsets.append(pc.fill_null(batch.column(1), ""))
        self.ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
        encoded = pc.dictionary_encode(pa.concat_arrays(subsets) if subsets else pa.array([], pa.string()))
        self.names: list[str] = [*encoded.dictionary.to_pylist(), ""]  # the last: unknown query
        self.codes = np.append(encoded.indices.to_numpy(zero_copy_only=False), len(self.names) - 1)

    def of(self, query_ids: pa.ChunkedArray) -> np.ndarray:
        """The subset code of every query id (an index into ``names``)."""
        row = pc.fill_null(pc.index_in(query_ids, value_set=self.ids), -1).to_numpy()
        return self.codes[row]  # -1, an unknown query, picks the last code


def _mined_scores(ds: Dataset) -> dict[str, dict[str, np.ndarray]]:
    """subset -> {"positive": scores of gold positives, "negative": scores of mined negatives}."""
    subsets = _Subsets(ds)
    parts: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for name in ds.shards(PAIRS):
        t = ds.read_shard(PAIRS, name, columns=["query_id", "label", "score", "origin"])
        has_score = pc.is_valid(t["score"])
        mined = pc.and_(pc.starts_with(pc.fill_null(t["origin"], ""), MINED_PREFIX), has_score)
        positive = pc.and_(pc.equal(pc.fill_null(t["label"], ""), "positive"), has_score)
        for group, mask in (("negative", mined), ("positive", pc.and_(positive, pc.invert(mined)))):
            sel = t.filter(mask)
            if not sel.num_rows:
                continue
            codes = subsets.of(sel["query_id"])
            values = sel["score"].to_numpy().astype(np.float64)
            for code in np.unique(codes):
                parts[subsets.names[code]][group].append(values[codes == code])
    return {k: {g: np.concatenate(v) for g, v in groups.items()} for k, groups in parts.items()}


# --- judge -----------------------------------------------------------------------------------------


def _judge_section(run_dir: Path, steps: list[Step]) -> str:
    judges = [s for s in steps if s.run == "judge"]
    if not judges:
        return ""
    intro = (
        "<p>p_yes of every judged pair per subset, gold positives vs the other candidates (share of "
        "each group per bin), and the false-negative rate: non-gold pairs the judge found relevant "
        "(relabelled <code>false_negative</code>) / judged non-gold pairs.</p>"
    )
    return intro + "".join(_one_judge(run_dir, s) for s in judges)


def _one_judge(run_dir: Path, s: Step) -> str:
    title = f"<h3><code>{_e(s.name)}</code> {_badge(s.status)}</h3>"
    if not s.complete or "dataset" not in s.outputs:
        return f"{title}<p class=note>{_e(_no_output(s))}</p>"
    try:
        ds = Dataset(_path(run_dir, s.outputs["dataset"]))
        hist = p_yes_histograms(ds, bins=_JUDGE_BINS)
        rates = _false_negatives(ds)
        info = ds.manifest.extra.get("judge") or {}
    except _READ_ERRORS as e:
        return f"{title}<p class=warn>judged dataset unreadable: {_e(e)}</p>"
    facts = ""
    if info:
        keys = (
            "model_id",
            "rule",
            "scored",
            "cached",
            "failed",
            "relabelled",
            "positives_judged_no",
            "pairs_per_second",
        )
        facts = "<p>" + " · ".join(f"{k} <b>{_e(info[k])}</b>" for k in keys if k in info) + "</p>"
    if not hist and not rates:
        return f"{title}{facts}<p class=note>no judged pairs</p>"
    subsets = sorted(set(hist) | set(rates))
    head = (
        "<tr><th>subset</th><th>judged non-gold</th><th>false negatives</th><th>false-negative rate</th></tr>"
    )
    body = []
    total_fn = total = 0
    for sub in subsets:
        fn, judged = rates.get(sub, (0, 0))
        total_fn, total = total_fn + fn, total + judged
        body.append(
            f"<tr><td>{_sub(sub)}</td><td class=num>{judged:,}</td><td class=num>{fn:,}</td>"
            f"<td class=num>{_pct(fn, judged)}</td></tr>"
        )
    body.append(
        f"<tr class=total><td>all</td><td class=num>{total:,}</td><td class=num>{total_fn:,}</td>"
        f"<td class=num>{_pct(total_fn, total)}</td></tr>"
    )
    table = f"<table>{head}{''.join(body)}</table>\n"
    with_fn = [sub for sub in subsets if rates.get(sub, (0, 0))[1]]
    with_hist = [sub for sub in subsets if hist.get(sub)]
    fn_chart = plots.false_negative_chart(s.name, with_fn, rates) if with_fn else ""
    hist_chart = plots.p_yes_histograms_chart(s.name, with_hist, hist) if with_hist else ""
    return title + facts + table + fn_chart + hist_chart


def _false_negatives(ds: Dataset) -> dict[str, tuple[int, int]]:
    """subset -> (false negatives, judged non-gold pairs)."""
    subsets = _Subsets(ds)
    fn = np.zeros(len(subsets.names), dtype=np.int64)
    judged = np.zeros(len(subsets.names), dtype=np.int64)
    for name in ds.shards(PAIRS):
        t = ds.read_shard(PAIRS, name, columns=["query_id", "label", "judge_p_yes"])
        label = pc.fill_null(t["label"], "")
        t = t.filter(pc.and_(pc.is_valid(t["judge_p_yes"]), pc.not_equal(label, "positive")))
        if not t.num_rows:
            continue
        codes = subsets.of(t["query_id"])
        is_fn = pc.equal(pc.fill_null(t["label"], ""), "false_negative").to_numpy().astype(bool)
        judged += np.bincount(codes, minlength=len(judged))
        fn += np.bincount(codes[is_fn], minlength=len(fn))
    out: dict[str, tuple[int, int]] = {}
    for code in np.flatnonzero(judged):
        before = out.get(subsets.names[code], (0, 0))
        out[subsets.names[code]] = (before[0] + int(fn[code]), before[1] + int(judged[code]))
    return out


# --- small helpers ---------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _sub(subset: str) -> str:
    return _e(subset) if subset else "<i>(no subset)</i>"


def _badge(status: str) -> str:
    colour = plots.STATUS_COLOUR.get(status, plots.OTHER_STATUS)
    return f'<span class=badge style="background:{colour}">{_e(status)}</span>'


def _num(v: Any, digits: int = 3) -> str:
    if v is None or isinstance(v, bool):
        return "–"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    return "–" if math.isnan(f) else f"{f:.{digits}f}"


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "–"


def _dur(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds + 0.5), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _path(run_dir: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else run_dir / p


def _no_output(s: Step) -> str:
    if s.status == "complete":
        return "complete, but it recorded no output"
    return f"{s.status}: {s.error}" if s.error else s.status


def _clip(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n…\n" + text[-limit // 2 :]


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
