"""Options and error handling shared by the `assay` commands."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from curation.dataset import AlreadyComplete, Dataset, DatasetError


def executor_options(fn: Callable) -> Callable:
    """--executor, --ray-address, --num-cpus, --overwrite."""
    fn = click.option(
        "--overwrite", is_flag=True, help="Replace OUT if it already holds a dataset or another run."
    )(fn)
    fn = click.option(
        "--num-cpus",
        type=click.IntRange(min=1),
        default=None,
        help="CPUs for the local Ray runtime (default: all).",
    )(fn)
    fn = click.option(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="Run on an existing Ray cluster (e.g. ray://head:10001 or auto).",
    )(fn)
    fn = click.option(
        "--executor",
        type=click.Choice(["ray", "local"]),
        default="ray",
        show_default=True,
        help="ray: a Ray Data job (local Ray unless --ray-address); local: in this process.",
    )(fn)
    return fn


def validate_limit_options(fn: Callable) -> Callable:
    """--max-text-chars, --max-pixels, --max-image-mb, --no-decode: the row checks of validation
    (`assay validate`, and the validate step of `assay curate`)."""
    from curation.validate import ValidateConfig

    fn = click.option(
        "--no-decode",
        is_flag=True,
        help="Check image headers, paths and sizes only; skip the full decode that finds truncated images.",
    )(fn)
    fn = click.option(
        "--max-image-mb",
        type=click.FloatRange(min=0, min_open=True),
        default=ValidateConfig.max_image_bytes / 2**20,
        show_default=True,
        help="Images larger than this many MiB are refused (image_too_large).",
    )(fn)
    fn = click.option(
        "--max-pixels",
        type=click.IntRange(min=1),
        default=ValidateConfig.max_pixels,
        show_default=True,
        help="Images with more pixels are refused from their header, before decoding (image_too_large).",
    )(fn)
    fn = click.option(
        "--max-text-chars",
        type=click.IntRange(min=1),
        default=ValidateConfig.max_text_chars,
        show_default=True,
        help="Longer texts are refused (text_too_long).",
    )(fn)
    return fn


def judge_scoring_options(fn: Callable) -> Callable:
    """--prompt, --rule, --labels, --batch-size, --max-chars, --device, --cache, --trust-remote-code:
    how a judge scores pairs (`assay judge`, and the judge step of `assay curate`)."""
    from curation.schema import LABELS

    options = [
        click.option(
            "--prompt",
            default=None,
            metavar="NAME|FILE",
            help="Judge prompt: a family of judge_prompts/ (vqa, retrieval, ...) or a YAML file "
            "(default: each query's task family).",
        ),
        click.option(
            "--rule",
            default="paper",
            show_default=True,
            metavar="RULE",
            help="Verdict rule: paper (logit yes > logit no), unime:BETA (p_yes > p_yes(positive) - BETA), "
            "threshold:T (p_yes > T).",
        ),
        click.option(
            "--labels",
            default=",".join(LABELS),
            show_default=True,
            help="Comma-separated pair labels to judge; other pairs pass through untouched.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=32,
            show_default=True,
            help="Pairs per forward pass (transformers) or per request batch.",
        ),
        click.option(
            "--max-chars",
            type=click.IntRange(min=1),
            default=2000,
            show_default=True,
            help="Candidate text is cut to this many characters (and fenced) in the prompt.",
        ),
        click.option(
            "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
        ),
        click.option(
            "--cache",
            "cache_path",
            type=click.Path(dir_okay=False),
            default=None,
            help="Judgment cache (SQLite on this machine; default: $ASSAY_CACHE_DIR or "
            "~/.cache/assay/judgments.sqlite).",
        ),
        click.option(
            "--trust-remote-code", is_flag=True, help="Allow the model directory's own code (off by default)."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_executor(executor: str, ray_address: str | None, num_cpus: int | None):
    from pipelines.executors import make_executor

    return make_executor(executor, address=ray_address, num_cpus=num_cpus)


def open_dataset(path: str) -> Dataset:
    """Open a dataset or exit with a clear message."""
    try:
        return Dataset(path)
    except DatasetError as e:
        raise click.ClickException(str(e)) from e


def friendly_errors(fn: Callable) -> Callable:
    """Turn the errors a user can fix (bad dataset, bad config, bad input file) into one clear line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AlreadyComplete as done:
            click.echo(str(done))
            return None
        except (DatasetError, ValueError, FileNotFoundError, PermissionError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def print_counts(manifest: Any, stage: str) -> None:
    """The counts a stage prints when it finishes: rows per table, and quarantined rows per reason."""
    c = manifest.counts
    click.echo(
        f"{stage}: queries={c.get('queries', 0)} corpus={c.get('corpus', 0)} pairs={c.get('pairs', 0)} "
        f"quarantine={c.get('quarantine', 0)}"
    )
    mine = {k: v for k, v in manifest.quarantine_reasons.items() if k.startswith(f"{stage}:")}
    if mine:
        click.echo("quarantined by this stage, per reason:")
        for k, v in sorted(mine.items(), key=lambda kv: (-kv[1], kv[0])):
            click.echo(f"  {k.split(':', 1)[1]:<28} {v}")


def quiet_transformers() -> None:
    """No per-file progress bars or deprecation chatter from transformers / peft in assay's output."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
