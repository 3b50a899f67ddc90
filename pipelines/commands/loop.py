"""`assay loop FILE.yaml`: run the steps of a loop file in order into one run directory."""

from __future__ import annotations

import sys

import click

from assay.pipelines.commands.common import writing


@click.command("loop", short_help="Run a mine-train loop (YAML steps) into a run directory; resumable.")
@click.argument("loop_file", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--run-dir", default=None, help="The run directory (default: the file's run_dir).")
@click.option("--from", "start", default=None, metavar="STEP", help="Redo STEP and every step after it.")
@click.option("--to", "stop", default=None, metavar="STEP", help="Stop after STEP.")
@click.option("--dry-run", is_flag=True, help="Print each step's state and command line; run nothing.")
@click.option("--no-report", is_flag=True, help="Do not write RUN/report.html.")
def command(loop_file, run_dir, start, stop, dry_run, no_report):
    """Run the steps of FILE (YAML) in order into the run directory, skipping complete ones.

    \b
    Each step is one assay command (ingest, validate, dedup, filter, curate, train, eval, mine,
    judge, export) with args and options; {run} is the run directory and {NAME} what the earlier
    step NAME produced (a dataset, the final checkpoint of a train step, an eval's metrics file).
    RUN/steps/NAME.json records each step's command line, fingerprint, status and time.

    \b
    A rerun skips complete steps; a killed loop resumes at the step it reached, and that step's
    stage at the shard, subset or checkpoint it reached. A complete step whose definition changed
    is refused until --from redoes it and everything after it. RUN/report.html (metrics per step
    and subset, loss curves, score histograms, time per step) is written at the end.

    \b
    Examples:
      assay loop examples/quickstart.yaml
      assay loop examples/quickstart.yaml --dry-run
      assay loop examples/quickstart.yaml --from mine-top20
      assay loop my-loop.yaml --run-dir runs/try2 --to stage2
    """
    from assay.pipelines.loop import Loop, LoopError, load_loop

    try:
        spec = load_loop(loop_file, run_dir=run_dir)
        for name in (start, stop):
            if name:
                spec.step(name)
        loop = Loop(spec, echo=lambda line: click.echo(line, err=False))
        if dry_run:
            for step, state in loop.status():
                try:
                    argv = "assay " + " ".join(loop.resolve(step)[0])
                except LoopError:
                    argv = f"assay {step.run} ... (after the steps it reads)"
                click.echo(f"{step.index + 1:>3} {step.name:<22} {state:<12} {argv}")
            return
        click.echo(f"loop {spec.name}: {len(spec.steps)} steps into {loop.run_dir}")
        with writing(loop.run_dir, "loop", kind="run"):
            ok = loop.run(start=start, stop=stop, report=not no_report)
    except LoopError as e:
        raise click.ClickException(str(e)) from e
    if not ok:
        click.echo("loop stopped at a failed step; fix it and rerun the same command to resume", err=True)
        sys.exit(1)
    click.echo(f"loop {spec.name}: done")
