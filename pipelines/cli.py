"""The `assay` command line. Each command lives in pipelines/commands/<name>.py and is a thin
layer: it parses arguments, builds an executor and calls a stage function of curation/.

An error that escapes a command ends the run with one message on stderr and exit status 1, never a
traceback: a bad file, dataset, config or argument (``ValueError``, ``OSError``, ``DatasetError``)
is shown as it is, anything else as an internal error. ``ASSAY_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys

import click

from assay.curation import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="assay")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Let model directories holding pickle files (pytorch_model.bin, *.pt) load: only for models "
    "you trust (the same as ASSAY_ALLOW_PICKLE=1). Refused by default.",
)
def cli(allow_pickle: bool) -> None:
    """assay: curate, judge, mine and train data for universal multimodal embedders.

    Every stage reads a dataset directory and writes a new one (nothing is modified in place);
    a killed stage resumes when rerun with the same arguments. Run `assay COMMAND --help`.
    """
    if allow_pickle:  # read by curation.safety; inherited by the Ray workers this run starts
        os.environ["ASSAY_ALLOW_PICKLE"] = "1"


def _register() -> None:
    from assay.pipelines.commands import (
        curate,
        dedup,
        export,
        filter,
        ingest,
        judge,
        loop,
        mine,
        report,
        stats,
        train,
        validate,
    )
    from assay.pipelines.commands import eval as eval_command

    for module in (
        ingest,
        validate,
        dedup,
        filter,
        curate,
        export,
        stats,
        judge,
        mine,
        train,
        eval_command,
        loop,
        report,
    ):
        cli.add_command(module.command)


_register()


def _is_user_error(e: Exception) -> bool:
    """Errors whose message says what to fix in the input (the file, the row or key, and why)."""
    from assay.curation.dataset import DatasetError

    if isinstance(e, ValueError | OSError | DatasetError):  # ConfigError, LoopError, IngestError, Arrow
        return True
    trainer = sys.modules.get("assay.training.trainer")  # not imported here: it loads torch
    return trainer is not None and isinstance(e, trainer.TrainingError)


def main(argv: list[str] | None = None) -> None:
    """``assay ARGV`` (default: the process's arguments); exits with the command's status."""
    try:
        cli.main(args=argv, prog_name="assay")
    except Exception as e:  # noqa: BLE001 - the last stop before the user's terminal
        if os.environ.get("ASSAY_DEBUG", "") not in ("", "0"):
            raise
        message = str(e).strip() or type(e).__name__
        if _is_user_error(e):
            click.echo(f"Error: {message}", err=True)
        else:
            click.echo(
                f"Error: internal error ({type(e).__name__}: {message}). This is a bug in assay, not in "
                "your input: rerun with ASSAY_DEBUG=1 to see the traceback, and report it.",
                err=True,
            )
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
