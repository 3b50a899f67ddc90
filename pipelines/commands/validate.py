"""`assay validate`: schema and content checks; refused rows go to the quarantine."""

from __future__ import annotations

from typing import Any

import click

from assay.pipelines.commands.common import (
    Location,
    executor_options,
    friendly_errors,
    print_counts,
    validate_limit_options,
    writing,
)


@click.command("validate")
@click.argument("dataset", type=Location(exists=True, file_okay=False))
@click.argument("out", type=Location(file_okay=False))
@validate_limit_options
@executor_options
@friendly_errors
def command(dataset: str, out: str, **options: Any) -> None:
    """Check every row of DATASET and write the good ones to OUT.

    \b
    Refused rows go, whole, to OUT/quarantine/ with the reason and the stage; nothing is dropped
    silently. Reasons: wrong_type, invalid_utf8, missing_id, missing_content, empty_text,
    text_too_long, nul_in_text, invalid_label, invalid_value, image_path_outside_root,
    image_not_found, image_too_large, unreadable_image, truncated_image, duplicate_id (an id
    given again with the same content: the first row is kept), conflicting_id (an id given to rows
    of different content: every row with it and every pair naming it go, since which row a pair
    meant cannot be told), unknown_query_id, unknown_doc_id (see curation/validate.py). A shard
    that is not a readable Parquet file stops the run before anything is written.

    \b
    Example:
      assay validate runs/easy-vqa/train runs/easy-vqa/train-valid
    """
    from assay.pipelines import api

    with writing(out, "validate"):
        result = api.validate(dataset, out, **options)
    print_counts(result)
    click.echo(f"wrote {out}")
