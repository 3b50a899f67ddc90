"""`assay export DATASET OUT --format FORMAT`: training data for other tools."""

from __future__ import annotations

from typing import Any

import click

from assay.curation.export import FORMATS
from assay.pipelines.commands.common import Location, friendly_errors, writing


@click.command("export")
@click.argument("dataset", type=Location(file_okay=False))
@click.argument("out", type=Location())
@click.option(
    "--format",
    "-f",
    type=click.Choice(FORMATS),
    required=True,
    help="What to write (see Formats above).",
)
@click.option(
    "--where",
    "-w",
    default=None,
    metavar="EXPR",
    help="Export only the pairs this expression accepts, over the columns of the flat view "
    "(e.g. \"subset == 'vqa' and label != 'false_negative'\"); see `assay filter --help`.",
)
@click.option(
    "--num-negatives",
    "-n",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Keep at most N negatives per query (jsonl and the sentence-transformers formats); "
    "n-tuple needs it: the number of negative columns.",
)
@click.option(
    "--copy-images",
    is_flag=True,
    help="Copy images stored as paths into OUT/images/ instead of writing their absolute paths.",
)
@click.option(
    "--skip-image-rows",
    is_flag=True,
    help="Sentence-transformers formats: leave out pairs with an image instead of refusing.",
)
@click.option(
    "--with-instruction",
    is_flag=True,
    help='Sentence-transformers formats: write "{instruction} {text}" instead of the text alone.',
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@friendly_errors
def command(dataset: str, out: str, **options: Any) -> None:
    """Export DATASET to OUT as Parquet, VLM2Vec JSONL, a Hugging Face dataset, or a
    sentence-transformers format.

    \b
    Every format starts from the flat view, one row per pair joined with its query and
    document: query_id, subset, task, query_instruction, query_text, query_image, doc_id,
    doc_instruction, doc_text, doc_image, label, score, rank, judge_p_yes, judge_verdict,
    origin. Inline images are written once to OUT/images/<sha256>.<ext> and referenced
    by relative path; images stored as paths are written as absolute paths (or copied
    with --copy-images).

    \b
    Formats:
      parquet       the flat view: OUT/pairs.parquet (or OUT if it ends with .parquet)
      jsonl         VLM2Vec layout, one row per (query, positive): qry, qry_image_path,
                    pos_text, pos_image_path, neg_text [...], neg_image_path [...],
                    query_id, subset: OUT/train.jsonl (or OUT if it ends with .jsonl)
      hf            the flat view via datasets.Dataset.save_to_disk(OUT)
      triplet       anchor, positive, negative
      n-tuple       anchor, positive, negative_1 .. negative_N (needs --num-negatives)
      labeled-pair  sentence1, sentence2, label (1.0 positive, 0.0 negative)
      labeled-list  query, docs [...], labels [1/0 ...]
    The sentence-transformers formats (the last four) are text-only and written to
    OUT/train.parquet (or OUT if it ends with .parquet). Negatives are a query's
    hard_negative then negative pairs, by rank; false_negative pairs never.

    DATASET and OUT may be URIs (s3://bucket/path, ...). An export to a URI is built in a
    local temporary folder and uploaded: a file whole, after its images; a folder with
    export.json last (a folder without it is no finished export; rerun to redo it).

    \b
    Examples:
      assay export data/ out/ --format jsonl --num-negatives 4
      assay export data/ out.parquet --format parquet --where "judge_verdict == 'yes'"
      assay export data/ st/ --format n-tuple -n 3 --where "subset == 'msmarco'"
      assay export s3://bucket/ds s3://bucket/exports/train.jsonl --format jsonl
    """
    from assay.pipelines import api

    with writing(out, "export", kind="file"):
        d = api.export(dataset, out, **options).details
    click.echo(f"export: wrote {d['rows']:,} {d['format']} rows to {d['path']}")
    if d["images_written"]:
        click.echo(f"  images written: {d['images_written']:,} (to {d['images_dir']})")
    for k, v in d["skipped"].items():
        click.echo(f"  left out: {k}: {v:,}")
