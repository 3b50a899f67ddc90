"""`assay stats DATASET`: what a dataset holds and where it came from."""

from __future__ import annotations

import json

import click

from assay.pipelines.commands.common import Location, friendly_errors


@click.command("stats")
@click.argument("dataset", type=Location(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON instead of tables.")
@friendly_errors
def command(dataset: str, as_json: bool) -> None:
    """Print the counts of DATASET and its lineage.

    \b
    Rows per table; queries per subset and task; corpus per subset; pairs per label
    and per subset (the query's); quarantined rows per stage and reason; images
    inline or by path; and the lineage from the manifest: every stage that led to
    DATASET, when it ran, its counts and its settings.
    """
    from assay.curation.stats import format_stats
    from assay.pipelines import api

    stats = api.stats(dataset).details
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=False, default=str))
    else:
        click.echo(format_stats(stats))
