"""`assay report RUN`: write the HTML report of an `assay loop` run directory."""

from __future__ import annotations

from pathlib import Path

import click

from assay.pipelines.commands.common import Location, friendly_errors, writing


@click.command("report")
@click.argument("run", type=Location(file_okay=False))
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the HTML file (default: RUN/report.html).",
)
@friendly_errors
def command(run: str, out: str | None) -> None:
    """Write the report of the `assay loop` run in RUN as one self-contained HTML file.

    \b
    The page shows every step's status, error and time; P@1 per subset of each eval step
    (with chance and overall) and of each ablation arm; the loss curve of each train step;
    per mine step, the scores of positives vs mined negatives; per judge step, the p_yes
    histograms and the false-negative rate per subset. Plots are inline SVG: no JavaScript,
    no network, so the file can be archived or mailed alone. `assay loop` writes it after
    every step; run this to refresh it while a loop runs, or after editing a run by hand.
    A step that has not run yet, is running or failed is shown as such.

    \b
    Example:
      assay report runs/loop-demo
      assay report runs/loop-demo --out /tmp/loop-demo.html && xdg-open /tmp/loop-demo.html
    """
    from assay.pipelines import api
    from assay.pipelines.report import REPORT_FILE

    with writing(out or Path(run) / REPORT_FILE, "report", kind="file"):
        result = api.report(run, out=out)
    click.echo(f"wrote {result.out}")
