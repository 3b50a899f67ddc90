"""The `assay` command line. Each command lives in pipelines/commands/<name>.py and is a thin
layer: it parses arguments, builds an executor and calls a stage function of curation/."""

from __future__ import annotations

import sys

import click

from curation import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="assay")
def cli() -> None:
    """assay: curate, judge, mine and train data for universal multimodal embedders.

    Every stage reads a dataset directory and writes a new one (nothing is modified in place);
    a killed stage resumes when rerun with the same arguments. Run `assay COMMAND --help`.
    """


def _register() -> None:
    from pipelines.commands import (
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
    from pipelines.commands import eval as eval_command

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


def main() -> None:
    cli(prog_name="assay")


if __name__ == "__main__":
    sys.exit(main())
