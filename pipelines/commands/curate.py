"""`assay curate DATASET OUT`: validate, dedup, judge and filter, one after the other, into one dataset."""

from __future__ import annotations

from typing import Any

import click

from assay.curation.schema import DATA_TABLES
from assay.pipelines.commands.common import (
    Location,
    dedup_options,
    executor_options,
    friendly_errors,
    judge_pool_options,
    judge_scoring_options,
    print_counts,
    validate_limit_options,
    writing,
)


@click.command("curate", short_help="validate -> dedup -> judge -> filter into one dataset.")
@click.argument("dataset", type=Location(exists=True, file_okay=False))
@click.argument("out", type=Location(file_okay=False))
@click.option(
    "--judge",
    default=None,
    metavar="MODEL",
    help="Judge model directory (an assay reranker checkpoint, or a transformers/vLLM model). "
    "Without it there is no judge step.",
)
@click.option(
    "--backend",
    type=click.Choice(["transformers", "vllm"]),
    default="transformers",
    show_default=True,
    help="How the judge runs the model (see `assay judge --help`).",
)
@judge_scoring_options
@click.option(
    "--where",
    "-w",
    default=None,
    metavar="EXPR",
    help="Filter expression applied last, e.g. \"judge_verdict == 'no'\" (see `assay filter --help`). "
    "Without it there is no filter step.",
)
@click.option(
    "--table",
    type=click.Choice(DATA_TABLES),
    default=None,
    help="Apply --where to this table only (default: every table that has its columns).",
)
@dedup_options
@click.option(
    "--decontaminate",
    default=None,
    metavar="TABLES",
    show_default="queries",
    help="Tables checked against --against: queries, corpus or queries,corpus.",
)
@validate_limit_options
@judge_pool_options
@executor_options
@friendly_errors
def command(dataset: str, out: str, **options: Any) -> None:
    """Curate DATASET into OUT: validate -> dedup -> judge -> filter.

    \b
    The same stages as `assay validate`, `assay dedup --against`, `assay judge --model` and
    `assay filter --where` run one after the other, with the same options; OUT is the dataset the
    last of them writes (the same rows, the same refused rows with the same stage and reason):
      validate  row checks per shard; duplicate ids and pairs naming unknown ids across shards
      dedup     exact and near-duplicate rows, eval-set copies (--against), duplicate pairs
      judge     (with --judge) each pair's prompt scored by the judge, in this process or in
                --actors Ray actors; the judgment cache is read first, so a rerun judges only new pairs
      filter    (with --where) the rows the expression rejects are dropped, then dangling pairs
    Refused rows go, whole, to OUT/quarantine/ (reasons: see `assay validate --help` and
    `assay dedup --help`); pairs the judge cannot score are listed in OUT/judge_failures.parquet.
    The datasets in between are written to .OUT.curate/ beside OUT and removed at the end.

    \b
    Every stage runs on the executor (a local Ray, a cluster with --ray-address, or --executor
    local). If it is killed, rerun the same command: it resumes at the stage and shard it reached,
    and nothing is judged twice. Rerunning a finished command does nothing.

    \b
    Examples:
      assay curate runs/raw runs/clean --against runs/eval
      assay curate runs/mined runs/judged --judge runs/reranker/step-000300 --where "judge_verdict == 'no'"
      assay curate data/mined data/judged --judge /models/Qwen2-VL-7B-Instruct --backend vllm \\
          --ray-address auto --actors 4 --gpus-per-actor 1
    """
    from assay.pipelines import api

    with writing(out, "curate"):
        result = api.curate(dataset, out, **options)
    for part in result.parts.values():
        print_counts(part)
    judge = result.details.get("judge")
    if judge:
        click.echo(
            f"judge {judge['model_id']}: {judge['scored']} pairs scored, {judge['cached']} from the cache, "
            f"{judge['failed']} failed; {judge['verdicts'].get('yes', 0)} yes, "
            f"{judge['verdicts'].get('no', 0)} no (rule {judge['rule']}), {judge['relabelled']} relabelled "
            "false_negative"
        )
    dropped = result.details.get("filter", {}).get("dropped", {})
    for t in DATA_TABLES:
        for reason, n in sorted(dropped.get(t, {}).items()):
            click.echo(f"filter dropped {n} {t} ({reason})")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    command(prog_name="assay curate")
