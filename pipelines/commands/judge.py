"""`assay judge DATASET OUT --model ...`: score pairs with an MLLM judge, write verdicts to a new dataset."""

from __future__ import annotations

import time
from pathlib import Path

import click

from assay.pipelines.commands.common import (
    friendly_errors,
    judge_scoring_options,
    open_dataset,
    open_truth,
    print_counts,
    quiet_transformers,
    writing,
)

BACKENDS = ("transformers", "vllm", "openai")
BARS = " ▁▂▃▄▅▆▇█"


def _assay_checkpoint(model: str) -> bool:
    from assay.training.model import EMBEDDER_FILE

    return (Path(model) / EMBEDDER_FILE).is_file()


def scorer_factory(
    backend: str,
    model: str,
    *,
    device: str,
    batch_size: int,
    trust_remote_code: bool,
    image_root: str,
    endpoint: str | None = None,
    concurrency: int = 8,
    timeout: float = 60.0,
):
    """A zero-argument function that builds the judge (called in this process or in each Ray actor)."""
    if backend == "openai":
        if not endpoint:
            raise click.UsageError("--backend openai needs --endpoint (e.g. http://localhost:8000/v1)")

        def openai_judge():
            from assay.curation.judge.openai_backend import OpenAIScorer

            return OpenAIScorer(
                endpoint, model, concurrency=concurrency, timeout=timeout, image_root=image_root
            )

        return openai_judge
    if not Path(model).is_dir():
        raise click.BadParameter(
            f"{model} is not a model directory (models are never downloaded)", param_hint="--model"
        )
    if backend == "vllm":

        def vllm_judge():
            from assay.curation.judge.vllm_backend import VLLMScorer

            return VLLMScorer(model, trust_remote_code=trust_remote_code)

        return vllm_judge

    def transformers_judge():
        import torch

        if _assay_checkpoint(model):
            # An assay reranker: training/ loads it (compressed InternVL) and hands its scorer over.
            from assay.curation.judge.scoring import model_id_for
            from assay.training.generative import Reranker
            from assay.training.model import load_embedder

            dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            embedder = load_embedder(model).to(dev).eval()
            embedder.image_root = image_root
            return Reranker(embedder, batch_size=batch_size, model_id=model_id_for(model)).scorer
        from assay.curation.judge.hf import TransformersScorer

        dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        return TransformersScorer.from_pretrained(
            model,
            device=dev,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            image_root=image_root,
        )

    return transformers_judge


def format_histograms(hists: dict[str, dict[str, list[int]]]) -> str:
    """One line per subset and group: p_yes from 0 to 1 as bars, and the count."""
    lines = ["p_yes per subset (0 ... 1):"]
    for subset in sorted(hists):
        for group, counts in sorted(hists[subset].items()):
            top = max(counts) or 1
            bars = "".join(BARS[round(c / top * (len(BARS) - 1))] for c in counts)
            lines.append(f"  {subset:<16} {group:<9} |{bars}| n={sum(counts)}")
    return "\n".join(lines)


@click.command("judge", short_help="Score pairs with an MLLM judge; write verdicts to a new dataset.")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--model",
    required=True,
    help="Judge model directory (an assay reranker checkpoint, or a "
    "transformers/vLLM model), or the served model name with --backend openai.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="transformers",
    show_default=True,
    help="transformers: in process; vllm: vLLM offline engine(s); openai: an OpenAI-compatible "
    "endpoint such as `vllm serve`.",
)
@judge_scoring_options
@click.option("--endpoint", default=None, metavar="URL", help="Base URL of the OpenAI-compatible server.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Requests in flight (openai backend).",
)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds per request (openai).")
@click.option(
    "--actors",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Run the judge in N Ray actors (one per GPU with --gpus-per-actor 1); 0: in this process.",
)
@click.option("--gpus-per-actor", type=float, default=0.0, show_default=True)
@click.option("--ray-address", default=None, metavar="ADDRESS", help="Ray cluster for --actors.")
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    help="Keep up to N judged hard negatives (verdict no) per query, best-ranked first; drop the rest "
    "(the paper keeps up to 12 of the top 20).",
)
@click.option(
    "--truth",
    type=click.Path(exists=True),
    default=None,
    metavar="PATH",
    help="Measure the verdicts against this truth (query_id, doc_id[, relevant]; curation/truth.py): "
    "AUC of p_yes, precision and recall of false_negative, agreement with gold, per subset.",
)
@click.option("--no-progress", is_flag=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds a dataset or another run.")
@friendly_errors
def command(
    dataset,
    out,
    model,
    backend,
    prompt,
    rule,
    labels,
    batch_size,
    device,
    cache_path,
    endpoint,
    concurrency,
    timeout,
    actors,
    gpus_per_actor,
    ray_address,
    max_chars,
    trust_remote_code,
    keep,
    truth,
    no_progress,
    overwrite,
):
    """Judge the (query, doc) pairs of DATASET and write them, with judge_p_yes and judge_verdict, to OUT.

    \b
    The judge reads the prompt of judge_prompts/ for each query's task family, and answers with
    p_yes = e^yes / (e^yes + e^no) from the two label tokens' logits in one forward pass. A
    non-positive pair judged "yes" becomes label false_negative; gold positives keep their label.
    Judgments are cached by (judge model and weights hash, prompt version, query_id, doc_id): a
    rerun, or a later dataset holding the same pairs, judges only what is new. Pairs the judge
    cannot score (bad image, timeout, NaN) are listed in OUT/judge_failures.parquet.

    \b
    With --truth (the bundled example writes OUT/truth/<split>.parquet; a labelled
    sample works too) the verdicts are measured, per subset, before --keep trims any:
      AUC        of p_yes, real matches vs non-matches (threshold-free)
      FN prec.   share of the candidates judged yes (false_negative) that really match
      FN recall  share of the candidates that really match that were judged yes
      gold yes   share of the gold positives judged yes
    The numbers go to OUT's manifest (extra.judge.quality) and the run report. The
    truth only measures: it never changes a label.
    """
    with writing(out, "judge"):
        quiet_transformers()
        from tqdm import tqdm

        from assay.curation.judge.cache import default_cache_path
        from assay.curation.judge.stage import judge_dataset, p_yes_histograms
        from assay.curation.judge.verdicts import parse_rule

        src = open_dataset(dataset)
        verdict_rule = parse_rule(rule)
        truth_table = open_truth(truth)
        chosen = [s.strip() for s in labels.split(",") if s.strip()]
        factory = scorer_factory(
            backend,
            model,
            device=device,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            image_root=str(src.data_root.resolve()),
            endpoint=endpoint,
            concurrency=concurrency,
            timeout=timeout,
        )
        t0 = time.perf_counter()
        if actors:
            from assay.pipelines.judge_ray import RayPoolScorer

            scorer = RayPoolScorer(factory, actors=actors, num_gpus=gpus_per_actor, address=ray_address)
        else:
            scorer = factory()
        click.echo(f"judge {scorer.model_id} ({backend}) loaded in {time.perf_counter() - t0:.1f} s")
        cache = Path(cache_path) if cache_path else default_cache_path()
        bar = tqdm(desc="judge", unit="pair", disable=no_progress)
        try:
            manifest, report = judge_dataset(
                src,
                out,
                scorer,
                cache=cache,
                prompt=prompt,
                rule=verdict_rule,
                labels=chosen,
                batch_size=batch_size,
                max_chars=max_chars,
                keep_negatives=keep,
                overwrite=overwrite,
                progress=bar.update,
                truth=truth_table,
            )
        finally:
            bar.close()
            if hasattr(scorer, "close"):
                scorer.close()
        print_counts(manifest, "judge")
        click.echo(
            f"judged {report.scored} pairs in {report.seconds:.1f} s ({report.pairs_per_second:.1f} pairs/s), "
            f"{report.cached} from the cache ({cache}), {report.failed} failed"
        )
        click.echo(
            f"verdicts: {report.verdicts.get('yes', 0)} yes, {report.verdicts.get('no', 0)} no (rule {report.rule}); "
            f"{report.relabelled} relabelled false_negative; {report.positives_judged_no} gold positives judged no"
        )
        if report.failed:
            click.echo(f"failures: {Path(out) / 'judge_failures.parquet'}")
        click.echo(format_histograms(p_yes_histograms(out)))
        if report.quality:
            click.echo(format_quality(report.quality))
        warning = constant_judge_warning(out)
        if warning:
            click.echo(warning, err=True)


def format_quality(quality: dict) -> str:
    """The judge's quality against a truth (``curation.judge.quality``) as a table, one row per subset."""

    def f(v) -> str:
        return f"{v:>9.3f}" if isinstance(v, float) else f"{'-':>9}"

    truth = quality.get("truth") or {}
    lines = [
        f"judge quality against the truth {truth.get('path', '?')} ({truth.get('kind', '?')}):",
        f"  {'subset':<16} {'pairs':>7} {'AUC':>9} {'FN prec.':>9} {'FN recall':>9} {'gold yes':>9}"
        f"  (judged yes / real FN / candidates)",
    ]
    rows = [*quality["per_subset"].items(), ("all", quality["overall"])]
    for subset, q in rows:
        lines.append(
            f"  {subset or '(none)':<16} {q['pairs']:>7} {f(q['auc'])} {f(q['fn_precision'])} "
            f"{f(q['fn_recall'])} {f(q['gold_agreement'])}"
            f"  ({q['judged_yes']} / {q['relevant_candidates']} / {q['candidates']})"
        )
    lines.append("  (all: the counts pooled; its AUC is the mean over subsets)")
    unknown = quality["overall"]["unknown"]
    if unknown:
        lines.append(f"  {unknown} judged pairs the truth does not cover were left out")
    return "\n".join(lines)


#: Below this spread of p_yes over the judged pairs the verdicts say nothing about the pairs.
CONSTANT_JUDGE_STD = 0.01


def constant_judge_warning(out: str | Path) -> str | None:
    """A warning when the judge gave (nearly) every pair the same p_yes: an untrained or broken
    judge, whose verdicts are then one answer for all (the paper's rule turns it into all yes or
    all no)."""
    import numpy as np
    import pyarrow.compute as pc

    ds = open_dataset(str(out))
    values = [
        pc.drop_null(ds.read_shard("pairs", name, ["judge_p_yes"])["judge_p_yes"]).to_numpy()
        for name in ds.shards("pairs")
    ]
    p = np.concatenate(values) if values else np.empty(0)
    if p.size < 2 or float(p.std()) >= CONSTANT_JUDGE_STD:
        return None
    return (
        f"warning: the judge gave {p.size} pairs nearly the same p_yes ({p.mean():.3f} +- {p.std():.4f}): "
        "it does not tell these pairs apart, so its verdicts carry no information. Check the judge model "
        "(an assay reranker needs more training), its prompt and its label words."
    )
