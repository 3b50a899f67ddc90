"""The dataset sections of the run report (pipelines/report.py): mined negatives and the judge.

- mining: per mine step and subset, cosine scores of the gold positives vs the mined negatives
  (pairs whose origin starts with ``mined:``; positives are the gold pairs with a score, and without
  one the percentiles in the manifest's ``extra.mine`` stand in);
- judge: per judge step, the false-negative rate per subset (pairs relabelled ``false_negative`` /
  judged non-gold pairs), the p_yes histograms per subset (positives vs candidates,
  ``curation.judge.stage.p_yes_histograms``) and, beside them, the judge's quality against a truth
  when the step had one (``assay judge --truth``; ``curation.judge.quality``, read from the
  manifest's ``extra.judge.quality``): AUC of p_yes, precision and recall of false_negative,
  agreement with gold, and the candidates' p_yes split into real matches and non-matches.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from assay.curation.dataset import Dataset
from assay.curation.judge.stage import p_yes_histograms
from assay.curation.schema import PAIRS
from assay.mining.stage import MINED_PREFIX
from assay.pipelines import report_plots as plots
from assay.pipelines.report_common import (
    READ_ERRORS,
    Step,
    Subsets,
    badge,
    esc,
    no_output,
    num,
    output_path,
    pct,
    subset_cell,
)

JUDGE_BINS = 20


def mining_section(run_dir: Path, steps: list[Step]) -> str:
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
    title = f"<h3><code>{esc(s.name)}</code> {badge(s.status)}</h3>"
    if not s.complete or "dataset" not in s.outputs:
        return f"{title}<p class=note>{esc(no_output(s))}</p>"
    try:
        ds = Dataset(output_path(run_dir, s.outputs["dataset"]))
        scores = _mined_scores(ds)
        summary = ds.manifest.extra.get("mine") or {}
    except READ_ERRORS as e:
        return f"{title}<p class=warn>mined dataset unreadable: {esc(e)}</p>"
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
            f"<tr><td>{subset_cell(sub)}</td><td class=num>{esc(info.get('queries', '–'))}</td>"
            f"<td class=num>{len(pos) if pos is not None else esc(pstat.get('n', 0))}</td>"
            f"<td class=num>{_mean_median(pos, pstat)}</td><td class=num>{0 if neg is None else len(neg)}</td>"
            f"<td class=num>{_mean_median(neg, info.get('negative_score') or {})}</td></tr>"
        )
    positive_stats = {sub: (summary.get(sub) or {}).get("positive_score") or {} for sub in subsets}
    chart = plots.score_histograms(s.name, subsets, scores, positive_stats)
    return f"{title}<table>{head}{''.join(body)}</table>\n{chart}"


def _mean_median(values: np.ndarray | None, stats: dict[str, Any]) -> str:
    if values is not None and len(values):
        return f"{num(float(values.mean()))} / {num(float(np.median(values)))}"
    return f"{num(stats.get('mean'))} / {num(stats.get('p50'))}"


def _mined_scores(ds: Dataset) -> dict[str, dict[str, np.ndarray]]:
    """subset -> {"positive": scores of gold positives, "negative": scores of mined negatives}."""
    subsets = Subsets(ds)
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


def judge_section(run_dir: Path, steps: list[Step]) -> str:
    judges = [s for s in steps if s.run == "judge"]
    if not judges:
        return ""
    intro = (
        "<p>p_yes of every judged pair per subset, gold positives vs the other candidates (share of "
        "each group per bin), and the false-negative rate: non-gold pairs the judge found relevant "
        "(relabelled <code>false_negative</code>) / judged non-gold pairs. With a truth, how right "
        "the judge was.</p>"
    )
    return intro + "".join(_one_judge(run_dir, s) for s in judges)


def _one_judge(run_dir: Path, s: Step) -> str:
    title = f"<h3><code>{esc(s.name)}</code> {badge(s.status)}</h3>"
    if not s.complete or "dataset" not in s.outputs:
        return f"{title}<p class=note>{esc(no_output(s))}</p>"
    try:
        ds = Dataset(output_path(run_dir, s.outputs["dataset"]))
        hist = p_yes_histograms(ds, bins=JUDGE_BINS)
        rates = _false_negatives(ds)
        info = ds.manifest.extra.get("judge") or {}
    except READ_ERRORS as e:
        return f"{title}<p class=warn>judged dataset unreadable: {esc(e)}</p>"
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
        facts = "<p>" + " · ".join(f"{k} <b>{esc(info[k])}</b>" for k in keys if k in info) + "</p>"
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
            f"<tr><td>{subset_cell(sub)}</td><td class=num>{judged:,}</td><td class=num>{fn:,}</td>"
            f"<td class=num>{pct(fn, judged)}</td></tr>"
        )
    body.append(
        f"<tr class=total><td>all</td><td class=num>{total:,}</td><td class=num>{total_fn:,}</td>"
        f"<td class=num>{pct(total_fn, total)}</td></tr>"
    )
    table = f"<table>{head}{''.join(body)}</table>\n"
    with_fn = [sub for sub in subsets if rates.get(sub, (0, 0))[1]]
    with_hist = [sub for sub in subsets if hist.get(sub)]
    fn_chart = plots.false_negative_chart(s.name, with_fn, rates) if with_fn else ""
    hist_chart = plots.p_yes_histograms_chart(s.name, with_hist, hist) if with_hist else ""
    return title + facts + table + fn_chart + hist_chart + _quality(s.name, info.get("quality"))


def _quality(name: str, quality: dict[str, Any] | None) -> str:
    """The judge's quality against a truth: a table per subset and the candidates' p_yes by the truth."""
    if not quality:
        return (
            "<p class=note>No truth given to this judge step, so its verdicts are not measured "
            "(<code>assay judge --truth FILE</code>).</p>"
        )
    truth = quality.get("truth") or {}
    intro = (
        f"<p>Judge quality against the truth <code>{esc(truth.get('path', '?'))}</code> "
        f"({esc(truth.get('kind', '?'))}, {esc(truth.get('queries', '?'))} queries), over every judged "
        "pair before any was trimmed: AUC of p_yes (real matches vs non-matches, any threshold), "
        "precision and recall of <code>false_negative</code> (a candidate judged yes that really "
        "matches / every candidate that really matches), and the share of gold positives judged yes. The <i>all</i> row pools the counts; its AUC "
        "is the mean over subsets (p_yes is not comparable across subsets).</p>"
    )
    head = (
        "<tr><th>subset</th><th>judged pairs</th><th>AUC of p_yes</th><th>FN precision</th>"
        "<th>FN recall</th><th>gold judged yes</th><th>candidates judged yes</th>"
        "<th>candidates that match</th><th>candidates</th></tr>"
    )
    per_subset = quality.get("per_subset") or {}
    rows = [(subset_cell(sub), q, "") for sub, q in per_subset.items()]
    rows.append(("all", quality.get("overall") or {}, " class=total"))
    body = "".join(
        f"<tr{css}><td>{label}</td><td class=num>{esc(q.get('pairs', '–'))}</td>"
        f"<td class=num>{num(q.get('auc'))}</td><td class=num>{num(q.get('fn_precision'))}</td>"
        f"<td class=num>{num(q.get('fn_recall'))}</td><td class=num>{num(q.get('gold_agreement'))} "
        f"({esc(q.get('positives_yes', 0))}/{esc(q.get('positives', 0))})</td>"
        f"<td class=num>{esc(q.get('judged_yes', 0))}</td><td class=num>{esc(q.get('relevant_candidates', 0))}</td>"
        f"<td class=num>{esc(q.get('candidates', 0))}</td></tr>"
        for label, q, css in rows
    )
    unknown = (quality.get("overall") or {}).get("unknown")
    note = (
        f"<p class=note>{esc(unknown)} judged pairs the truth does not cover are left out.</p>"
        if unknown
        else ""
    )
    hists = {sub: q.get("p_yes_hist") or {} for sub, q in per_subset.items()}
    shown = [sub for sub, h in hists.items() if any(sum(v) for v in h.values())]
    chart = (
        plots.p_yes_histograms_chart(
            name, shown, hists, plots.TRUTH_GROUPS, "judge p_yes of the candidates, by the truth"
        )
        if shown
        else ""
    )
    return intro + f"<table>{head}{body}</table>\n{note}" + chart


def _false_negatives(ds: Dataset) -> dict[str, tuple[int, int]]:
    """subset -> (false negatives, judged non-gold pairs)."""
    subsets = Subsets(ds)
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
