"""`assay filter DATASET OUT --where EXPR`: keep the rows an expression accepts."""

from __future__ import annotations

from typing import Any

import click

from assay.curation.schema import DATA_TABLES
from assay.pipelines.commands.common import Location, executor_options, friendly_errors, print_counts, writing


@click.command("filter")
@click.argument("dataset", type=Location(file_okay=False))
@click.argument("out", type=Location(file_okay=False))
@click.option(
    "--where",
    "-w",
    "where",
    required=True,
    metavar="EXPR",
    help='The condition rows must meet, e.g. "judge_p_yes < 0.5" or "label == \'hard_negative\'".',
)
@click.option(
    "--table",
    type=click.Choice(DATA_TABLES),
    default=None,
    help="Apply the expression to this table only (default: every table that has its columns).",
)
@click.option(
    "--prune", is_flag=True, help="Also drop queries and documents that no remaining pair refers to."
)
@executor_options
@friendly_errors
def command(dataset: str, out: str, **options: Any) -> None:
    """Write the rows of DATASET that --where accepts as a new dataset OUT.

    \b
    The expression is applied to every table that has all the columns it names
    (or only to --table); rows failing it are dropped. Pairs whose query or document
    is gone are dropped too, and with --prune so are queries and documents no pair
    refers to. The expression is recorded in OUT's manifest.

    \b
    Expressions: comparisons (== != < <= > >=, chained), and / or / not, parentheses,
    `col in [...]`, `col not in [...]`, string/number/True/False/None literals,
    is_null(col), not_null(col), startswith(col, 'x'), endswith(col, 'x'),
    contains(col, 'x'). A comparison with a missing value is false. Nothing is ever
    evaluated as Python.

    \b
    Examples:
      assay filter data/ out/ --where "subset == 'vqa'"
      assay filter data/ out/ --where "label == 'hard_negative' and judge_p_yes < 0.5"
      assay filter data/ out/ --where "judge_p_yes >= 0.5 or is_null(judge_p_yes)" --prune
    """
    from assay.pipelines import api

    with writing(out, "filter"):
        click.echo(f"filter: applying {options['where'].strip()!r}", err=True)
        result = api.filter(dataset, out, **options)
    print_counts(result)
    dropped = result.details.get("dropped", {})
    lines = [(t, r, n) for t in DATA_TABLES for r, n in sorted(dropped.get(t, {}).items()) if n]
    if lines:
        click.echo("dropped, per table and reason:")
        for t, r, n in lines:
            click.echo(f"  {t:<8} {r:<14} {n}")
    click.echo(f"wrote {out}")
