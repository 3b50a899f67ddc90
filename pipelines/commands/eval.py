"""`assay eval CHECKPOINT DATASET`: score an embedder checkpoint on a dataset (MMEB P@1, retrieval metrics)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from assay.pipelines.commands.common import (
    friendly_errors,
    open_dataset,
    open_truth,
    quiet_transformers,
    writing,
)

#: "org/name": what a Hugging Face hub id looks like (a path that does not exist may still be one).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def _checkpoint_ref(checkpoint: str) -> str:
    """A local checkpoint directory (made absolute) or a hub id; a clear error otherwise."""
    p = Path(checkpoint)
    if p.exists():
        if not p.is_dir():
            raise click.ClickException(
                f"checkpoint {checkpoint} is a file; pass the directory written by save_pretrained"
            )
        if not (p / "config.json").is_file():
            raise click.ClickException(
                f"checkpoint {checkpoint} has no config.json: not a model directory "
                "(pass the directory written by `assay train` / MMEmbedder.save_pretrained)"
            )
        return str(p.resolve())
    if _HUB_ID.match(checkpoint) and not checkpoint.startswith((".", "/")):
        return checkpoint
    raise click.ClickException(f"checkpoint not found: {checkpoint}")


def _dataset_subsets(ds: Any) -> set[str]:
    from assay.curation.schema import QUERIES
    from assay.training.evaluate import NULL_KEY

    found: set[str] = set()
    for batch in ds.iter_batches(QUERIES, columns=["subset"]):
        found |= {NULL_KEY if s is None else s for s in batch.column(0).to_pylist()}
    return found


@click.command("eval")
@click.argument("checkpoint")
@click.argument("dataset", type=click.Path(file_okay=False))
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
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
    "candidate_set",
    type=click.Choice(["pairs", "subset"]),
    default="pairs",
    show_default=True,
    help="pairs: rank each query's labelled docs (MMEB); subset: rank its whole subset corpus.",
)
@click.option(
    "--subset",
    "subsets",
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
def command(
    checkpoint: str,
    dataset: str,
    out: str | None,
    batch_size: int,
    candidate_set: str,
    subsets: tuple[str, ...],
    tokens_per_tile: int | None,
    device: str | None,
    truth: str | None,
    max_queries: int | None,
) -> None:
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
    out_path = Path(out) if out else Path.cwd() / f"{Path(dataset).resolve().name}.metrics.json"
    with writing(out_path, "eval", kind="file"):
        ref = _checkpoint_ref(checkpoint)
        ds = open_dataset(dataset)
        truth_table = open_truth(truth)
        if subsets:
            missing = sorted(set(subsets) - _dataset_subsets(ds))
            if missing:
                have = ", ".join(sorted(_dataset_subsets(ds))) or "none"
                raise click.ClickException(
                    f"no queries in subset(s) {', '.join(missing)} of {dataset} (subsets: {have})"
                )
        try:
            import torch

            from assay.training.evaluate import evaluate, write_metrics
            from assay.training.model import load_embedder
        except ImportError as e:
            raise click.ClickException(
                f"assay eval needs the training extra (torch, transformers): {e}"
            ) from e

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise click.ClickException("--device cuda: no CUDA device is available")

        quiet_transformers()
        click.echo(f"loading {ref} on {device}", err=True)
        try:
            embedder = load_embedder(
                ref, tokens_per_tile=tokens_per_tile, trust_remote_code=False, device=device
            )
        except OSError as e:
            raise click.ClickException(f"cannot load checkpoint {checkpoint}: {e}") from e

        def encode_queries(rows: list[dict[str, Any]]) -> Any:
            return embedder.encode_queries(rows, batch_size=batch_size)

        def encode_candidates(rows: list[dict[str, Any]]) -> Any:
            return embedder.encode_candidates(rows, batch_size=batch_size)

        metrics = evaluate(
            ds,
            encode_queries,
            encode_candidates,
            batch_size=batch_size,
            candidate_set=candidate_set,
            subsets=list(subsets) or None,
            progress=True,
            max_queries_per_subset=max_queries,
            truth=truth_table,
        )
        metrics["checkpoint"] = ref
        metrics["dataset"] = str(Path(dataset).resolve())
        metrics["settings"]["tokens_per_tile"] = embedder.tokens_per_tile
        metrics["settings"]["device"] = device
        metrics["settings"]["batch_size"] = batch_size
        click.echo(format_metrics(metrics))
        write_metrics(metrics, out_path)
        click.echo(f"wrote {out_path}")
