"""`assay curate DATASET OUT`: validate, dedup, judge and filter in one Ray Data pipeline."""

from __future__ import annotations

import click

from assay.curation.dedup import DEFAULT_DECONTAMINATE
from assay.curation.schema import DATA_TABLES
from assay.curation.validate import ValidateConfig
from assay.pipelines.commands.common import (
    dedup_options,
    friendly_errors,
    judge_scoring_options,
    open_dataset,
    print_counts,
    validate_limit_options,
    writing,
)


@click.command("curate", short_help="validate -> dedup -> judge -> filter as one Ray Data pipeline.")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--judge",
    "judge_model",
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
    help="How each judge actor runs the model.",
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
    default=",".join(DEFAULT_DECONTAMINATE),
    show_default=True,
    metavar="TABLES",
    help="Tables checked against --against: queries, corpus or queries,corpus.",
)
@validate_limit_options
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDRESS",
    help="Run on an existing Ray cluster (ray://head:10001, or auto); default: a local Ray.",
)
@click.option(
    "--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of the local Ray (default: all)."
)
@click.option(
    "--actors",
    type=click.IntRange(min=1),
    default=None,
    help="Judge actors (default: one per GPU of the cluster, or one on CPUs when it has none).",
)
@click.option(
    "--gpus-per-actor",
    type=click.FloatRange(min=0),
    default=None,
    help="GPUs per judge actor when the cluster has GPUs (default 1; 0: judge on CPUs).",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=None,
    help="Hash partitions of the shuffles (default: the cluster's CPUs, more for large data).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds a dataset or another run.")
@friendly_errors
def command(
    dataset,
    out,
    judge_model,
    backend,
    rule,
    labels,
    prompt,
    batch_size,
    max_chars,
    device,
    cache_path,
    trust_remote_code,
    where,
    table,
    against,
    decontaminate,
    images_only,
    phash_distance,
    no_near,
    max_text_chars,
    max_pixels,
    max_image_mb,
    no_decode,
    ray_address,
    num_cpus,
    actors,
    gpus_per_actor,
    partitions,
    overwrite,
):
    """Curate DATASET into OUT in one Ray Data pipeline: validate -> dedup -> judge -> filter.

    \b
    OUT is the dataset `assay validate`, `assay dedup --against`, `assay judge --model` and
    `assay filter --where` give when run one after the other (the same rows, the same refused
    rows with the same stage and reason), without the datasets in between:
      validate  row checks per shard; duplicate ids and pairs naming unknown ids across shards
      dedup     exact and near-duplicate rows, eval-set copies (--against), duplicate pairs
      judge     (with --judge) each pair's prompt scored by the judge in a Ray actor pool: one
                actor per GPU (num_gpus per actor) when the cluster has GPUs, else on CPUs; the
                judgment cache is read first, so a rerun judges only new pairs
      filter    (with --where) the rows the expression rejects are dropped, then dangling pairs
    Refused rows go, whole, to OUT/quarantine/ (reasons: see `assay validate --help` and
    `assay dedup --help`); pairs the judge cannot score are listed in OUT/judge_failures.parquet.

    \b
    Runs on a local Ray (--num-cpus) or on a cluster (--ray-address; assay installed on its nodes,
    DATASET and OUT on storage they all see; the judgment cache stays on this machine). If it is
    killed, rerun the same command: finished output shards are kept, nothing is judged twice.
    Rerunning a finished command does nothing.

    \b
    Examples:
      assay curate runs/raw runs/clean --against runs/eval
      assay curate runs/mined runs/judged --judge runs/reranker/step-000300 --where "judge_verdict == 'no'"
      assay curate data/mined data/judged --judge /models/Qwen2-VL-7B-Instruct --backend vllm \\
          --ray-address auto --gpus-per-actor 1
    """
    with writing(out, "curate"):
        from assay.pipelines.dag import run_curation_dag

        source = open_dataset(dataset)
        evals = [open_dataset(a) for a in against]
        manifest = run_curation_dag(
            source,
            out,
            judge_model=judge_model,
            rule=rule,
            where=where,
            table=table,
            against=evals,
            decontaminate=decontaminate,
            decontaminate_text_only=not images_only,
            near=not no_near,
            phash_distance=phash_distance,
            validate_config=ValidateConfig(
                max_text_chars=max_text_chars,
                max_pixels=max_pixels,
                max_image_bytes=int(max_image_mb * 2**20),
                decode_images=not no_decode,
            ),
            judge_backend=backend,
            labels=[s.strip() for s in labels.split(",") if s.strip()],
            prompt=prompt,
            batch_size=batch_size,
            max_chars=max_chars,
            device=device,
            trust_remote_code=trust_remote_code,
            cache=cache_path,
            ray_address=ray_address,
            num_cpus=num_cpus,
            actors=actors,
            gpus_per_actor=gpus_per_actor,
            partitions=partitions,
            overwrite=overwrite,
        )
        print_counts(manifest, "curate")
        judge = manifest.extra.get("judge")
        if judge:
            click.echo(
                f"judge {judge['model_id']}: {judge['scored']} pairs scored, {judge['cached']} from the cache, "
                f"{judge['failed']} failed; {judge['verdicts'].get('yes', 0)} yes, "
                f"{judge['verdicts'].get('no', 0)} no (rule {judge['rule']}), {judge['relabelled']} relabelled "
                "false_negative"
            )
        dropped = manifest.extra.get("filter", {}).get("dropped", {})
        for t in DATA_TABLES:
            for reason, n in sorted(dropped.get(t, {}).items()):
                click.echo(f"filter dropped {n} {t} ({reason})")
        click.echo(f"wrote {out}")


if __name__ == "__main__":
    command(prog_name="assay curate")
