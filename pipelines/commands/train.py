"""`assay train --stage 1|2|3|reranker CONFIG`: run one training stage from a YAML config."""

from __future__ import annotations

from typing import Any

import click

from assay.pipelines.commands.common import Location, friendly_errors, writing


@click.command("train")
@click.argument("config", metavar="CONFIG", type=Location(dir_okay=False))
@click.option(
    "--stage",
    type=click.Choice(["1", "2", "3", "reranker"]),
    default=None,
    help="The stage to run; must match the config's `stage:` when it has one.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Where to train (default: the config's, else auto). cuda trains in bf16 autocast.",
)
@click.option("--output", default=None, help="Override the config's output directory.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Data-parallel workers under Ray Train's TorchTrainer (1: train in this process).",
)
@click.option(
    "--use-gpu/--no-gpu", default=None, help="Give each Ray Train worker a GPU (default: when --device cuda)."
)
@click.option("--ray-address", default=None, metavar="ADDRESS", help="Run the workers on this Ray cluster.")
@click.option("--no-progress", is_flag=True, help="No progress bar (the log file still gets every step).")
@friendly_errors
def command(config: str, **options: Any) -> None:
    """Train one stage of the recipe from CONFIG (YAML); resumes from the last checkpoint.

    \b
    Stages (PAPER.md):
      1         continual pretraining: next-token loss on (image, question) -> answer samples
      reranker  the pointwise yes/no judge, from a stage-1 checkpoint
      2         contrastive: InfoNCE with in-batch negatives (warm-up), plus mined hard
                negatives when the data has them; LoRA rank 16, GradCache
      3         contrastive on judged hard negatives (<= 12 per query), false negatives masked

    Checkpoints go to OUTPUT/step-NNNNNN (safetensors, config, tokenizer, processor, training
    config, optimizer state, weights hash); a rerun resumes from the latest complete one, and a
    finished stage is returned at once. The final checkpoint is printed on the last line.
    """
    from assay.pipelines import api
    from assay.training.config import load_config

    output = options["output"] or load_config(config).output  # a bad config: one clear line, now
    with writing(output, "train", kind="train"):
        result = api.train(config, **options)
    click.echo(f"final checkpoint: {result.out}")
