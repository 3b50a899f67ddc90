"""`assay ingest`: raw pairs (JSONL, CSV, Parquet, HF datasets, image folders) -> an assay dataset."""

from __future__ import annotations

from typing import Any

import click

from assay.curation.ingest import DOC_TARGETS, FORMATS, TARGETS
from assay.pipelines.commands.common import Location, executor_options, friendly_errors, print_counts, writing

HELP = f"""Turn raw image+text pairs in SOURCE into a new assay dataset at OUT.

\b
Each input row is one (query, document) pair. Its columns are mapped onto these targets:
  {", ".join(TARGETS[:6])},
  {", ".join(TARGETS[6:])}
A target reads the column of the same name unless --map or --mapping names another, except
label and score: the pair's relevance label (one of positive, negative, hard_negative,
false_negative) and score are read only when mapped (--map label=relevance), so a column named
label holding class names stays content (--map doc_text=label). Without a mapped label every
row is a positive pair. Rows without an id get a content-hash id, so a document named by many
rows is stored once. An image cell is a path (relative to --data-root), {{bytes, path}} (the HF
convention) or inline bytes.

\b
--documents: each row is one document ({", ".join(DOC_TARGETS)}); the
dataset holds a corpus and no queries or pairs (e.g. a pool to mine from). A document gets
the same id as when ingested in a pair (with the same subset); an image folder gives one
document per image.

\b
Formats (inferred from the extension, or from what a folder holds, when --format is omitted):
  jsonl, csv, parquet  a file, or a folder of them
  hf                   a folder written by datasets.Dataset.save_to_disk (one split)
  imagefolder          one subfolder per class (task classification), or a flat folder with
                       --labels FILE.csv (file,label) or --captions FILE.csv (file,caption:
                       task retrieval, caption -> image); a folder of split folders
                       (train/, test/, ... each one folder per class) -> OUT/<split> and
                       OUT/truth, as the example writes
  example              a bundled example: easy-vqa -> OUT/train and OUT/test, four subsets
                       (vqa, classification, retrieval, captions), and OUT/truth

Rows that cannot be read (bad JSON or UTF-8, a number where text belongs, no text and no image
on a side) go to OUT/quarantine with their file:line and a reason; they never stop the run. A
killed ingest resumes when rerun with the same arguments and ends with the same files.

SOURCE, OUT, --mapping, --data-root, --labels and --captions may be URIs (s3://bucket/path,
gs://..., any fsspec filesystem; credentials and endpoint from the environment, ~/.aws or
fsspec's configuration).

\b
Examples:
  assay ingest pairs.jsonl data/pairs --map query_text=question --map doc_image=img --task vqa
  assay ingest pairs.csv data/pairs --mapping columns.yaml --subset coco --embed-images
  assay ingest photos/ data/photos --format imagefolder --captions captions.csv
  assay ingest passages.jsonl data/pool --documents --map doc_text=passage --subset coco
  assay ingest s3://bucket/raw/pairs/ s3://bucket/ds/pairs --embed-images
  assay ingest --format example easy-vqa data/easy-vqa --executor local
"""


@click.command("ingest", help=HELP, short_help="Raw pairs (JSONL, CSV, Parquet, HF, images) -> a dataset.")
@click.argument("source")
@click.argument("out", type=Location(file_okay=False))
@click.option(
    "--format",
    type=click.Choice(FORMATS),
    default=None,
    help="Input format (default: from the extension).",
)
@click.option(
    "--map",
    multiple=True,
    metavar="TARGET=COLUMN",
    help="Read TARGET from input column COLUMN, e.g. --map query_text=question (repeatable).",
)
@click.option(
    "--mapping",
    type=Location(exists=True, dir_okay=False),
    default=None,
    metavar="FILE.yaml",
    help="A YAML file of TARGET: COLUMN lines; --map flags override it.",
)
@click.option(
    "--data-root",
    type=Location(exists=True, file_okay=False),
    default=None,
    help="Folder that relative image paths start from (default: the input file's folder).",
)
@click.option(
    "--embed-images",
    is_flag=True,
    help="Read image files into the dataset (paths outside the data root are quarantined).",
)
@click.option("--subset", default=None, help="Subset name for rows without one (default: the input's name).")
@click.option(
    "--task",
    default=None,
    help="Task for rows without one: classification, vqa, retrieval, grounding, visdoc or your own "
    "(default: retrieval).",
)
@click.option(
    "--labels",
    type=Location(exists=True, dir_okay=False),
    default=None,
    metavar="FILE.csv",
    help="imagefolder: a CSV with columns file,label (classification).",
)
@click.option(
    "--captions",
    type=Location(exists=True, dir_okay=False),
    default=None,
    metavar="FILE.csv",
    help="imagefolder: a CSV with columns file,caption (retrieval: caption -> image).",
)
@click.option(
    "--documents",
    is_flag=True,
    help="Each row is one document (doc_id, doc_text, doc_image, doc_instruction, subset): write a "
    "corpus with no queries or pairs.",
)
@click.option(
    "--rows-per-shard",
    type=click.IntRange(min=1),
    default=50_000,
    show_default=True,
    help="Rows per output Parquet shard.",
)
@executor_options
@friendly_errors
def command(source: str, out: str, **options: Any) -> None:
    from assay.pipelines import api

    with writing(out, "ingest"):
        try:
            result = api.ingest(source, out, **options)
        except api.OptionsNotApplicable as e:
            raise click.UsageError(str(e)) from e
    for split, part in result.parts.items() or [(None, result)]:
        if split:
            click.echo(f"[{split}]")
        print_counts(part)
    click.echo(f"wrote {', '.join(str(p.out) for p in result.parts.values()) or out}")
