"""`assay ingest`: raw pairs (JSONL, CSV, Parquet, HF datasets, image folders) -> an assay dataset."""

from __future__ import annotations

import click

from assay.curation.ingest import (
    DOC_TARGETS,
    FORMATS,
    TARGETS,
    infer_format,
    ingest,
    ingest_split_folders,
    load_mapping,
    parse_map_flags,
    split_folders,
)
from assay.pipelines.commands.common import (
    build_executor,
    executor_options,
    friendly_errors,
    print_counts,
    writing,
)

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

\b
Examples:
  assay ingest pairs.jsonl data/pairs --map query_text=question --map doc_image=img --task vqa
  assay ingest pairs.csv data/pairs --mapping columns.yaml --subset coco --embed-images
  assay ingest photos/ data/photos --format imagefolder --captions captions.csv
  assay ingest passages.jsonl data/pool --documents --map doc_text=passage --subset coco
  assay ingest --format example easy-vqa data/easy-vqa --executor local
"""


@click.command("ingest", help=HELP, short_help="Raw pairs (JSONL, CSV, Parquet, HF, images) -> a dataset.")
@click.argument("source")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Input format (default: from the extension).",
)
@click.option(
    "--map",
    "maps",
    multiple=True,
    metavar="TARGET=COLUMN",
    help="Read TARGET from input column COLUMN, e.g. --map query_text=question (repeatable).",
)
@click.option(
    "--mapping",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    metavar="FILE.yaml",
    help="A YAML file of TARGET: COLUMN lines; --map flags override it.",
)
@click.option(
    "--data-root",
    type=click.Path(exists=True, file_okay=False),
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
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    metavar="FILE.csv",
    help="imagefolder: a CSV with columns file,label (classification).",
)
@click.option(
    "--captions",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    metavar="FILE.csv",
    help="imagefolder: a CSV with columns file,caption (retrieval: caption -> image).",
)
@click.option(
    "--documents",
    "documents_only",
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
def command(
    source,
    out,
    fmt,
    maps,
    mapping,
    data_root,
    embed_images,
    subset,
    task,
    labels,
    captions,
    documents_only,
    rows_per_shard,
    executor,
    ray_address,
    num_cpus,
    overwrite,
):
    with writing(out, "ingest"):
        if fmt == "example" or (
            fmt is None and not labels and not captions and infer_format(source) == "example"
        ):
            _ingest_example(
                source,
                out,
                maps=maps,
                mapping=mapping,
                data_root=data_root,
                subset=subset,
                task=task,
                labels=labels,
                captions=captions,
                documents_only=documents_only,
                embed_images=embed_images,
                rows_per_shard=rows_per_shard,
                executor=build_executor(executor, ray_address, num_cpus),
                overwrite=overwrite,
            )
            return
        if (
            fmt in (None, "imagefolder")
            and not (labels or captions or documents_only)
            and split_folders(source)
        ):
            _refuse_flags(
                "an image folder of splits",
                {"--map": maps, "--mapping": mapping, "--data-root": data_root, "--task": task},
            )
            manifests = ingest_split_folders(
                source,
                out,
                subset=subset,
                embed_images=embed_images,
                rows_per_shard=rows_per_shard,
                executor=build_executor(executor, ray_address, num_cpus),
                overwrite=overwrite,
            )
            _print_splits(manifests)
            click.echo(f"wrote {', '.join(f'{out}/{s}' for s in manifests)} and {out}/truth")
            return
        columns = load_mapping(mapping) if mapping else {}
        columns.update(parse_map_flags(maps))
        manifest = ingest(
            source,
            out,
            format=fmt,
            mapping=columns or None,
            data_root=data_root,
            embed_images=embed_images,
            subset=subset,
            task=task,
            labels=labels,
            captions=captions,
            rows_per_shard=rows_per_shard,
            executor=build_executor(executor, ray_address, num_cpus),
            overwrite=overwrite,
            documents_only=documents_only,
        )
        print_counts(manifest, "ingest")
        click.echo(f"wrote {out}")


def _ingest_example(
    name,
    out,
    *,
    maps,
    mapping,
    data_root,
    subset,
    task,
    labels,
    captions,
    documents_only,
    embed_images,
    rows_per_shard,
    executor,
    overwrite,
) -> None:
    from assay.curation.examples import EXAMPLES, ingest_example

    if name not in EXAMPLES:
        raise click.BadParameter(
            f"unknown example {name!r}; the bundled examples are {', '.join(EXAMPLES)}", param_hint="SOURCE"
        )
    _refuse_flags(
        "a bundled example",
        {
            "--map": maps,
            "--mapping": mapping,
            "--data-root": data_root,
            "--subset": subset,
            "--task": task,
            "--labels": labels,
            "--captions": captions,
            "--embed-images": embed_images,
            "--documents": documents_only,
        },
    )
    manifests = ingest_example(
        name, out, executor=executor, overwrite=overwrite, rows_per_shard=rows_per_shard
    )
    _print_splits(manifests)
    click.echo(f"wrote {out}/train and {out}/test (images in {out}/images)")


def _refuse_flags(what: str, flags: dict[str, object]) -> None:
    """A usage error naming every flag given (truthy) that does not apply to ``what``."""
    unused = [flag for flag, value in flags.items() if value]
    if unused:
        raise click.UsageError(f"{', '.join(unused)} do not apply to {what}")


def _print_splits(manifests: dict) -> None:
    for split, manifest in manifests.items():
        click.echo(f"[{split}]")
        print_counts(manifest, "ingest")
