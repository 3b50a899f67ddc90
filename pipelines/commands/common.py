"""Options and error handling shared by the `assay` commands."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from assay.curation import storage
from assay.curation.dataset import TMP_PREFIX, AlreadyComplete, DatasetError
from assay.curation.lock import OutputInUse, describe_holder, environment_error


class Location(click.Path):
    """A click.Path that also takes a URI (``s3://bucket/ds``, ``gs://...``: ``curation.storage``).
    A local path is checked as click.Path checks it; a URI, when ``exists``, for being there."""

    name = "location"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not storage.is_remote(value):
            return super().convert(value, param, ctx)
        if self.exists and not storage.path(value).exists():
            self.fail(f"{storage.display(value)} does not exist.", param, ctx)
        return value


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
    from assay.curation.validate import ValidateConfig

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


def dedup_options(fn: Callable) -> Callable:
    """--against, --images-only, --phash-distance, --no-near: what counts as a duplicate or an
    eval-set copy (`assay dedup`, and the dedup step of `assay curate`). Each command adds its own
    --decontaminate, whose default differs."""
    from assay.curation.hamming import MAX_DISTANCE

    options = [
        click.option(
            "--against",
            multiple=True,
            metavar="EVAL",
            type=Location(exists=True, file_okay=False),
            help="An evaluation dataset: training rows whose content matches one of its rows are "
            "removed as contaminated. Repeat for several.",
        ),
        click.option(
            "--images-only",
            is_flag=True,
            help="Only rows with an image can be contaminated: for short label-like texts that train "
            "and eval share by design (easy-vqa's retrieval queries such as 'a blue circle').",
        ),
        click.option(
            "--phash-distance",
            type=int,
            default=4,
            show_default=True,
            metavar="N",
            help=f"Images whose 64-bit pHash differ in at most N bits, and whose colour thumbnails "
            f"agree, are near duplicates (0: equal hashes only; at most {MAX_DISTANCE}; negative: off). "
            "Unrelated images are ~32 bits apart. Near copies whose pairs disagree are kept and counted.",
        ),
        click.option(
            "--no-near",
            is_flag=True,
            help="Skip near-duplicate images (the dedup step then decodes no image).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def judge_pool_options(fn: Callable) -> Callable:
    """--actors, --gpus-per-actor: where the judge runs (`assay judge`, `assay curate`)."""
    fn = click.option(
        "--gpus-per-actor",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        help="GPUs per judge actor.",
    )(fn)
    return click.option(
        "--actors",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Run the judge in N Ray actors (one per GPU with --gpus-per-actor 1); 0: in this process.",
    )(fn)


def judge_scoring_options(fn: Callable) -> Callable:
    """--prompt, --rule, --labels, --batch-size, --max-chars, --device, --cache, --trust-remote-code:
    how a judge scores pairs (`assay judge`, and the judge step of `assay curate`)."""
    from assay.curation.schema import LABELS

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
            type=Location(dir_okay=False),
            default=None,
            help="Judgment cache: a SQLite file on this machine (default: $ASSAY_CACHE_DIR or "
            "~/.cache/assay/judgments.sqlite), or a URI (s3://bucket/cache/judgments: segments "
            "that the nodes of a cluster share).",
        ),
        click.option(
            "--trust-remote-code", is_flag=True, help="Allow the model directory's own code (off by default)."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def friendly_errors(fn: Callable) -> Callable:
    """Turn the errors a user can fix (bad dataset, bad config, bad input file) into one clear line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except AlreadyComplete as done:
            click.echo(str(done))
            return None
        except (DatasetError, ValueError, FileNotFoundError, PermissionError) as e:
            raise click.ClickException(str(e)) from e
        except Exception as e:
            # A full disk, a read-only or forbidden folder outside what `writing` guards: one line.
            env = environment_error(e)
            if env is None:
                raise
            code, text, filename = env
            where = f": {filename}" if filename else ""
            raise click.ClickException(f"{text} (errno {code}){where}") from e

    return wrapper


# -- writing an output: one writer at a time, and a clear line when the disk says no ---------------

#: What is left of OUT after each kind of failed write, and how to go on.
_AFTER = {
    "dataset": "{out} has no manifest.json, so it is not a dataset yet: {fix} and rerun the same command "
    "(completed shards are kept and resume)",
    "file": "nothing was written to {out}: {fix} and rerun",
    "train": "{out} holds no new checkpoint (earlier ones are kept): {fix} and rerun the same command "
    "to resume from the latest",
    "run": "the steps already complete in {out} are kept: {fix} and rerun the same command to resume",
}


def _inside(path: Path, out: Path) -> bool:
    """``path`` is OUT, under it, a folder above it, or one of OUT's own files beside it (its lock
    ``.OUT.lock``, its staging ``.tmp-OUT-PID``)."""
    path, out = path.resolve(), out.resolve()
    own = (out.name, f".{out.name}", f"{TMP_PREFIX}{out.name}")
    return (
        path == out
        or out in path.parents
        or path in out.parents
        or (path.parent == out.parent and path.name.startswith(own))
    )


def output_error(
    e: BaseException, out: str | os.PathLike, command: str, kind: str
) -> click.ClickException | None:
    """The one-line error for a failed write of ``out`` (a full disk, a read-only or forbidden
    folder, another writer), or None when ``e`` is something else."""
    if isinstance(e, OutputInUse):
        ended = (
            f" or for its lease to end (at {e.holder['lease_ends']})" if e.holder.get("lease_ends") else ""
        )
        return click.ClickException(
            f"assay {command}: {storage.display(out)} is being written by {describe_holder(e.holder)}; "
            f"wait for it to finish{ended} (or stop it) and rerun. Nothing was written. "
            f"(lock file: {storage.display(e.lock)})"
        )
    out = storage.path(out)
    env = environment_error(e)
    if env is None:
        return None
    code, text, filename = env
    if filename and not storage.is_remote(out) and not _inside(Path(filename), out):
        # Somewhere else (a cache, the input): say where, not that OUT failed.
        return click.ClickException(f"assay {command}: cannot write {filename}: {text} (errno {code})")
    if code == errno.EROFS:
        after = "choose an output on a writable file system (or remount it read-write) and rerun"
    elif code == errno.EACCES:
        denied = f" ({filename})" if filename and str(filename) != str(out) else ""
        after = f"permission denied{denied}: fix the permissions of {out} or its folder, or choose another output, and rerun"
    else:
        fix = "free space" if code == errno.ENOSPC else "free space within your quota"
        after = _AFTER[kind].format(out=out, fix=fix)
    return click.ClickException(f"assay {command}: cannot write {out}: {text} (errno {code}); {after}")


@contextlib.contextmanager
def writing(out: str | os.PathLike, command: str, kind: str = "dataset") -> Iterator[None]:
    """Turn what can go wrong writing OUT (another writer holds its lock, a full disk, a read-only
    or forbidden output) into one clear line. ``kind`` (dataset, file, train, run) says what a
    failure leaves. The lock itself is taken by the library (``assay.curation.lock.writing``)."""
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except Exception as e:
        clear = output_error(e, out, command, kind)
        if clear is None:
            raise
        raise clear from e


def print_counts(result: Any) -> None:
    """What a stage prints when it finishes (an ``assay.Result``): rows per table, and the rows it
    quarantined per reason."""
    c = result.counts
    click.echo(
        f"{result.stage}: queries={c.get('queries', 0)} corpus={c.get('corpus', 0)} pairs={c.get('pairs', 0)} "
        f"quarantine={c.get('quarantine', 0)}"
    )
    if result.quarantined:
        click.echo("quarantined by this stage, per reason:")
        for k, v in sorted(result.quarantined.items(), key=lambda kv: (-kv[1], kv[0])):
            click.echo(f"  {k:<28} {v}")
