"""`assay dedup`: exact and near-duplicate rows, and rows copied from evaluation datasets, to quarantine."""

from __future__ import annotations

from typing import Any

import click

from assay.pipelines.commands.common import (
    Location,
    dedup_options,
    executor_options,
    friendly_errors,
    print_counts,
    writing,
)


@click.command("dedup", short_help="Exact and near-duplicate rows, and eval-set copies, to quarantine.")
@click.argument("dataset", type=Location(exists=True, file_okay=False))
@click.argument("out", type=Location(file_okay=False))
@dedup_options
@click.option(
    "--decontaminate",
    default=None,
    metavar="TABLES",
    show_default="queries",
    help="Comma-separated tables checked against --against: queries, corpus or queries,corpus. "
    "The corpus is off by default: label-space documents (class names, answer options) are "
    "shared by design between train and test, and removing them would remove the task.",
)
@executor_options
@friendly_errors
def command(dataset: str, out: str, **options: Any) -> None:
    """Remove duplicate rows of DATASET, and rows copied from evaluation sets; write the rest to OUT.

    \b
    Rows are compared within one table and one subset (queries with queries, corpus with corpus):
      exact_duplicate       same text after normalisation (Unicode NFKC, case folded, whitespace
                            collapsed) and the same image bytes (sha256; images by path are read
                            from the data root)
      near_duplicate_image  same normalised text (or none), images near in structure (pHash at
                            most --phash-distance bits apart) AND colour (8x8 thumbnails within
                            32 of 255 per cell): resized, re-encoded, slightly edited copies, not
                            recoloured ones; and the same targets: two queries with the same
                            positive documents, two documents no query tells apart
      contaminated          the same content as a row of an --against dataset (any subset), or,
                            with near on, the same text and a near-identical image

    \b
    Near copies whose targets disagree (the same question about the same picture, answered "yes"
    and "no") are a conflict in the data, not a copy: both rows stay, and the count is printed
    and kept in the manifest (extra.dedup.TABLE.near_duplicate_conflicts, with examples).

    \b
    The first occurrence (in shard order, then row order) is kept; the others go, whole, to
    OUT/quarantine/ with the reason and the id of the row kept. Pairs naming a removed duplicate
    are rewritten to name the kept row; a pair that thereby repeats an earlier one is quarantined
    as duplicate_pair, and a pair naming a contaminated row as references_removed_row. Nothing
    is dropped silently.

    \b
    Runs as a Ray Data job (local Ray unless --ray-address); --executor local runs in this
    process. If it is killed, rerun the same command to resume: finished shards are kept and the
    result is the same as an uninterrupted run.

    \b
    Examples:
      assay dedup runs/train-valid runs/train-dedup
      assay dedup runs/train-valid runs/train-dedup --against runs/mmeb-eval --phash-distance 6
      assay dedup runs/train-valid runs/train-dedup --against runs/eval --decontaminate queries,corpus
    """
    from assay.pipelines import api

    with writing(out, "dedup"):
        result = api.dedup(dataset, out, **options)
    print_counts(result)
    for table in ("queries", "corpus"):
        for note in dedup_notes(table, result.details.get(table, {})):
            click.echo(note, err=True)
    if result.details.get("pairs", {}).get("rewritten"):
        click.echo(f"pairs rewritten to the kept rows: {result.details['pairs']['rewritten']}")
    click.echo(f"wrote {out}")


def dedup_notes(table: str, s: dict) -> list[str]:
    """What a user should know of a table's dedup: unreadable images, near copies kept as conflicts."""
    notes = []
    if s.get("images_unreadable"):
        notes.append(
            f"note: {s['images_unreadable']} {table} image path(s) could not be read and were compared "
            "by path; run `assay validate` to quarantine them"
        )
    if s.get("images_not_phashed"):
        notes.append(
            f"note: {s['images_not_phashed']} {table} image(s) could not be decoded and were left out "
            "of the near-duplicate check"
        )
    if s.get("near_duplicate_conflicts"):
        notes.append(
            f"note: {s['near_duplicate_conflicts']} row(s) of {table} are near copies of an earlier row "
            "whose targets disagree: kept, not folded (a conflict in the data, not a copy); e.g. "
            + s["conflict_examples"][0]
        )
    return notes


if __name__ == "__main__":
    command(prog_name="assay dedup")
