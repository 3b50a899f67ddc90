"""`assay judge DATASET OUT --model ...`: score pairs with an MLLM judge, write verdicts to a new dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from assay.curation import storage
from assay.pipelines.commands.common import (
    Location,
    friendly_errors,
    judge_pool_options,
    judge_scoring_options,
    print_counts,
    writing,
)
from assay.pipelines.judges import BACKENDS

BARS = " ▁▂▃▄▅▆▇█"


def format_histograms(hists: dict[str, dict[str, list[int]]]) -> str:
    """One line per subset and group: p_yes from 0 to 1 as bars, and the count."""
    lines = ["p_yes per subset (0 ... 1):"]
    for subset in sorted(hists):
        for group, counts in sorted(hists[subset].items()):
            top = max(counts) or 1
            bars = "".join(BARS[round(c / top * (len(BARS) - 1))] for c in counts)
            lines.append(f"  {subset:<16} {group:<9} |{bars}| n={sum(counts)}")
    return "\n".join(lines)


@click.command("judge", short_help="Score pairs with an MLLM judge; write verdicts to a new dataset.")
@click.argument("dataset", type=Location(exists=True, file_okay=False))
@click.argument("out", type=Location(file_okay=False))
@click.option(
    "--model",
    required=True,
    help="Judge model directory (an assay reranker checkpoint, or a "
    "transformers/vLLM model), or the served model name with --backend openai.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="transformers",
    show_default=True,
    help="transformers: in process; vllm: vLLM offline engine(s); openai: an OpenAI-compatible "
    "endpoint such as `vllm serve`.",
)
@judge_scoring_options
@click.option("--endpoint", default=None, metavar="URL", help="Base URL of the OpenAI-compatible server.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Requests in flight (openai backend).",
)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds per request (openai).")
@judge_pool_options
@click.option("--ray-address", default=None, metavar="ADDRESS", help="Ray cluster for --actors.")
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    help="Keep up to N judged hard negatives (verdict no) per query, best-ranked first; drop the rest "
    "(the paper keeps up to 12 of the top 20).",
)
@click.option(
    "--truth",
    type=click.Path(exists=True),
    default=None,
    metavar="PATH",
    help="Measure the verdicts against this truth (query_id, doc_id[, relevant]; curation/truth.py): "
    "AUC of p_yes, precision and recall of false_negative, agreement with gold, per subset.",
)
@click.option("--no-progress", is_flag=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds a dataset or another run.")
@friendly_errors
def command(dataset: str, out: str, **options: Any) -> None:
    """Judge the (query, doc) pairs of DATASET and write them, with judge_p_yes and judge_verdict, to OUT.

    \b
    The judge reads the prompt of judge_prompts/ for each query's task family, and answers with
    p_yes = e^yes / (e^yes + e^no) from the two label tokens' logits in one forward pass. A
    non-positive pair judged "yes" becomes label false_negative; gold positives keep their label.
    Judgments are cached by (judge model and weights hash, prompt version, query_id, doc_id): a
    rerun, or a later dataset holding the same pairs, judges only what is new. Pairs the judge
    cannot score (bad image, timeout, NaN) are listed in OUT/judge_failures.parquet.

    \b
    With --truth (the bundled example writes OUT/truth/<split>.parquet; a labelled
    sample works too) the verdicts are measured, per subset, before --keep trims any:
      AUC        of p_yes, real matches vs non-matches (threshold-free)
      FN prec.   share of the candidates judged yes (false_negative) that really match
      FN recall  share of the candidates that really match that were judged yes
      gold yes   share of the gold positives judged yes
    The numbers go to OUT's manifest (extra.judge.quality) and the run report. The
    truth only measures: it never changes a label.
    """
    from assay.curation.judge.stage import p_yes_histograms
    from assay.pipelines import api

    with writing(out, "judge"):
        result = api.judge(dataset, out, **options)
    r = result.details
    print_counts(result)
    click.echo(f"judge {r['model_id']} ({r['backend']})")
    click.echo(
        f"judged {r['scored']} pairs in {r['seconds']:.1f} s ({r['pairs_per_second']:.1f} pairs/s), "
        f"{r['cached']} from the cache ({r['cache']}), {r['failed']} failed"
    )
    click.echo(
        f"verdicts: {r['verdicts'].get('yes', 0)} yes, {r['verdicts'].get('no', 0)} no (rule {r['rule']}); "
        f"{r['relabelled']} relabelled false_negative; {r['positives_judged_no']} gold positives judged no"
    )
    if r["failed"]:
        click.echo(f"failures: {storage.display(storage.join(out, 'judge_failures.parquet'))}")
    click.echo(format_histograms(p_yes_histograms(out)))
    if r["quality"]:
        click.echo(format_quality(r["quality"]))
    warning = constant_judge_warning(out)
    if warning:
        click.echo(warning, err=True)


def format_quality(quality: dict) -> str:
    """The judge's quality against a truth (``curation.judge.quality``) as a table, one row per subset."""

    def f(v) -> str:
        return f"{v:>9.3f}" if isinstance(v, float) else f"{'-':>9}"

    truth = quality.get("truth") or {}
    lines = [
        f"judge quality against the truth {truth.get('path', '?')} ({truth.get('kind', '?')}):",
        f"  {'subset':<16} {'pairs':>7} {'AUC':>9} {'FN prec.':>9} {'FN recall':>9} {'gold yes':>9}"
        f"  (judged yes / real FN / candidates)",
    ]
    rows = [*quality["per_subset"].items(), ("all", quality["overall"])]
    for subset, q in rows:
        lines.append(
            f"  {subset or '(none)':<16} {q['pairs']:>7} {f(q['auc'])} {f(q['fn_precision'])} "
            f"{f(q['fn_recall'])} {f(q['gold_agreement'])}"
            f"  ({q['judged_yes']} / {q['relevant_candidates']} / {q['candidates']})"
        )
    lines.append("  (all: the counts pooled; its AUC is the mean over subsets)")
    unknown = quality["overall"]["unknown"]
    if unknown:
        lines.append(f"  {unknown} judged pairs the truth does not cover were left out")
    return "\n".join(lines)


#: Below this spread of p_yes over the judged pairs the verdicts say nothing about the pairs.
CONSTANT_JUDGE_STD = 0.01


def constant_judge_warning(out: str | Path) -> str | None:
    """A warning when the judge gave (nearly) every pair the same p_yes: an untrained or broken
    judge, whose verdicts are then one answer for all (the paper's rule turns it into all yes or
    all no)."""
    import numpy as np
    import pyarrow.compute as pc

    from assay.curation.dataset import Dataset

    ds = Dataset(out)
    values = [
        pc.drop_null(ds.read_shard("pairs", name, ["judge_p_yes"])["judge_p_yes"]).to_numpy()
        for name in ds.shards("pairs")
    ]
    p = np.concatenate(values) if values else np.empty(0)
    if p.size < 2 or float(p.std()) >= CONSTANT_JUDGE_STD:
        return None
    return (
        f"warning: the judge gave {p.size} pairs nearly the same p_yes ({p.mean():.3f} +- {p.std():.4f}): "
        "it does not tell these pairs apart, so its verdicts carry no information. Check the judge model "
        "(an assay reranker needs more training), its prompt and its label words."
    )
