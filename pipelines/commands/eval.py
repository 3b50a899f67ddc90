"""`assay eval CHECKPOINT DATASET`: score an embedder checkpoint on a dataset (MMEB P@1, retrieval metrics)."""

from __future__ import annotations

from typing import Any

import click

from assay.pipelines.commands.common import Location, friendly_errors, writing


def _fmt(v: Any, width: int = 7, digits: int = 3) -> str:
    if v is None:
        return f"{'-':>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.{digits}f}"
    return f"{v:>{width}}"


def format_metrics(metrics: dict[str, Any]) -> str:
    """The metrics dict of ``training.evaluate.evaluate`` as readable tables."""
    per_subset = metrics["per_subset"]
    chance = metrics.get("chance_p_at_1", {})
    ks = metrics["settings"]["ks"]
    ndcg = f"ndcg@{metrics['settings']['ndcg_at']}"
    name_w = max([len("subset"), *(len(s) for s in per_subset)])
    task_w = max([len("task"), *(len(str(e["task"])) for e in per_subset.values())])
    rcols = [f"recall@{k}" for k in ks] + [ndcg]
    header = (
        f"{'subset':<{name_w}}  {'task':<{task_w}}  {'queries':>7}  {'pos/q':>7}  {'cand/q':>7}  {'P@1':>7}  {'chance':>7}"
        + "".join(f"  {c.replace('recall', 'R').replace('ndcg', 'nDCG'):>7}" for c in rcols)
    )
    lines = [header, "-" * len(header)]
    for s, e in per_subset.items():
        cand = e["candidates_per_query"]
        lines.append(
            f"{s:<{name_w}}  {str(e['task']):<{task_w}}  {_fmt(e['queries'])}  "
            f"{_fmt(e.get('positives_per_query'), digits=1)}  {_fmt(cand, digits=1)}  {_fmt(e['p_at_1'])}  {_fmt(chance.get(s))}"
            + "".join(f"  {_fmt(e.get(c))}" for c in rcols)
        )
    lines.append("")
    lines.append("per meta-task (mean P@1 over subsets):")
    for t, e in metrics["per_task"].items():
        lines.append(
            f"  {t:<{task_w}}  P@1 {_fmt(e['p_at_1'])}  ({e['subsets']} subset{'s' if e['subsets'] != 1 else ''})"
        )
    o = metrics["overall"]
    lines.append("")
    lines.append(
        f"overall: P@1 {_fmt(o['p_at_1'], 0)} (mean over {o['subsets']} subsets), "
        f"micro {_fmt(o['p_at_1_micro'], 0)} over {o['queries']} queries"
    )
    if o["queries_without_positive"]:
        lines.append(f"skipped {o['queries_without_positive']} queries with no positive in the corpus")
    truth = metrics["settings"].get("truth")
    if truth:
        c = metrics.get("counts", {})
        lines.append(
            f"relevance from the truth {truth['path']} ({truth['kind']}) for {c.get('truth_queries', 0)} "
            f"queries: {c.get('truth_matches_unlabelled', 0)} unlabelled matches counted as relevant, "
            f"{c.get('truth_labels_overruled', 0)} labels overruled"
        )
    return "\n".join(lines)


@click.command("eval")
@click.argument("checkpoint")
@click.argument("dataset", type=Location(file_okay=False))
@click.option(
    "--out",
    type=Location(dir_okay=False),
    default=None,
    help="Where to write the metrics JSON (default: ./<DATASET name>.metrics.json).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Rows per forward pass of the model.",
)
@click.option(
    "--candidates",
    type=click.Choice(["pairs", "subset"]),
    default="pairs",
    show_default=True,
    help="pairs: rank each query's labelled docs (MMEB); subset: rank its whole subset corpus.",
)
@click.option(
    "--subset",
    multiple=True,
    metavar="NAME",
    help="Evaluate only this subset (repeat for several; default: all).",
)
@click.option(
    "--tokens-per-tile",
    type=click.IntRange(min=1),
    default=None,
    help="Image tokens per image tile (default: what the checkpoint was saved with).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Where the model runs (default: cuda when available, else cpu).",
)
@click.option(
    "--truth",
    type=click.Path(exists=True),
    default=None,
    metavar="PATH",
    help="A truth file (query_id, doc_id[, relevant]; curation/truth.py) that decides relevance where "
    "it knows it: every matching doc counts, labelled or not.",
)
@click.option(
    "--max-queries",
    type=click.IntRange(min=1),
    default=None,
    help="Score only the first N queries of each subset (a quick estimate; candidates stay complete).",
)
@friendly_errors
def command(checkpoint: str, dataset: str, out: str | None, **options: Any) -> None:
    """Score the embedder CHECKPOINT on DATASET and write the metrics as JSON.

    \b
    Every query is embedded and ranked against its candidates (MMEB protocol):
      P@1       the top candidate is a positive; per subset, per meta-task (mean over
                its subsets) and overall (mean over subsets, and micro over queries)
      chance    the P@1 of a random ranking, to read P@1 against
      pos/q     relevant docs per query (the labelled positives, or the truth's matches)
      R@k       Recall@1/5/10 and nDCG@10, for retrieval and visdoc subsets, ranking
                the whole subset corpus
    False-negative pairs are left out of both the candidates and the ranking; queries
    with no positive are skipped and counted. See training/evaluate.py for details.

    \b
    With --truth, relevance comes from the truth wherever it knows the pair: a doc
    that matches counts as a positive even when no pair labels it (real data labels
    one positive per query), one that does not match counts as a negative. The
    bundled example writes its truth to OUT/truth/<split>.parquet.

    \b
    CHECKPOINT is a directory written by MMEmbedder.save_pretrained (or a
    transformers-native InternVL such as OpenGVLab/InternVL3-2B-hf); remote code is
    never run. DATASET is an assay dataset directory.

    \b
    Example:
      assay eval runs/ckpt-final runs/mmeb/test --subset VOC2007 --subset MSCOCO_t2i \\
          --tokens-per-tile 64 --out runs/ckpt-final/mmeb.metrics.json
    """
    from assay.pipelines import api

    out = api.metrics_path(dataset, out)
    with writing(out, "eval", kind="file"):
        result = api.evaluate(checkpoint, dataset, out=out, **options)
    click.echo(format_metrics(result.details))
    click.echo(f"wrote {result.out}")
