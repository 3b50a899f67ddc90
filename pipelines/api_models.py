"""The stages that use a model, from Python: ``assay.mine``, ``assay.train`` and ``assay.evaluate``
(see ``assay.pipelines.api`` for the rule they follow)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from assay.curation import storage
from assay.curation.dataset import Dataset
from assay.curation.lock import writing
from assay.pipelines.api_curation import judge as run_judge
from assay.pipelines.result import (
    PathLike,
    Result,
    Source,
    many,
    open_dataset,
    progress_bars,
    quiet_transformers,
    result_of,
    stage_function,
)


@stage_function
def mine(
    dataset: Source,
    out: PathLike,
    *,
    encoder: str,
    rules: str | Sequence[Any] = "stage2",
    depth: int | None = None,
    subset: str | Sequence[str] | None = None,
    corpus: Sequence[Source] | Source = (),
    index: str = "auto",
    device: str = "cpu",
    batch_size: int = 64,
    cache: PathLike | None = None,
    seed: int = 0,
    judge: str | None = None,
    keep: int | None = None,
    judge_cache: PathLike | None = None,
    instructions: bool = False,
    trust_remote_code: bool = False,
    fast: bool = False,
    max_length: int | None = None,
    no_search_cache: bool = False,
    no_progress: bool = False,
    overwrite: bool = False,
    ray_address: str | None = None,
) -> Result:
    """Hard negatives per query against ``encoder`` (``assay mine --help``). With ``judge`` the
    mined dataset goes to ``OUT.unjudged`` and the judged one to ``out``; ``parts`` holds both.
    ``details["stats"]``: positive and negative scores per subset. ``ray_address``: run the stage
    as one task on that Ray cluster (``pipelines.mine_ray``: every location should be a URI)."""
    from assay.curation.judge.cache import cache_root
    from assay.mining.encoders import load_encoder
    from assay.mining.stage import mine_dataset

    if keep is not None and judge is None:
        raise ValueError("--keep needs --judge (keep= needs judge=: it keeps the judged hard negatives)")
    if ray_address:
        from assay.pipelines.mine_ray import mine_on_cluster

        options = {
            "dataset": dataset, "out": str(out), "encoder": encoder, "rules": rules, "depth": depth,
            "subset": subset, "corpus": corpus, "index": index, "device": device,
            "batch_size": batch_size, "cache": None if cache is None else str(cache), "seed": seed,
            "judge": judge, "keep": keep, "judge_cache": None if judge_cache is None else str(judge_cache),
            "instructions": instructions, "trust_remote_code": trust_remote_code, "overwrite": overwrite,
            "fast": fast, "max_length": max_length, "no_search_cache": no_search_cache,
        }  # fmt: skip
        return mine_on_cluster(ray_address, options)
    out = storage.path(out)
    mined_out = storage.path(f"{str(out).rstrip('/')}.unjudged") if judge else out
    with writing(out, command="assay mine"), writing(mined_out, command="assay mine"):
        quiet_transformers()
        source = open_dataset(dataset)
        pools = [open_dataset(p) for p in many(corpus)]
        enc = load_encoder(
            encoder,
            device=device,
            batch_size=batch_size,
            image_root=storage.absolute(source.data_root),
            instructions=instructions,
            trust_remote_code=trust_remote_code,
            precision="fast" if fast else "exact",
            max_length=max_length,
        )
        with progress_bars(no_progress, embed="row", mine="query") as bars:
            manifest, stats = mine_dataset(
                source,
                mined_out,
                enc,
                cache_dir=cache if cache else cache_root() / "embeddings",
                rules=rules,
                depth=depth,
                subsets=many(subset) or None,
                corpus=pools,
                method=index,
                device=device,
                seed=seed,
                overwrite=overwrite,
                progress=lambda what, n: bars[what].update(n),
                search_cache=not no_search_cache,
            )
        details = {
            "encoder": enc.model_id,
            "rules": manifest.config["rules"],
            "depth": manifest.config["depth"],
            "stats": stats,
            "corpus": manifest.extra.get("corpus", []),
        }
        mined = result_of("mine", manifest, mined_out, details)
        if not judge:
            return mined
        judged = run_judge(
            mined_out,
            out,
            model=judge,
            device="auto" if device == "cpu" else device,
            batch_size=batch_size,
            labels=["hard_negative"],
            keep=keep,
            cache=judge_cache,
            trust_remote_code=trust_remote_code,
            no_progress=no_progress,
            overwrite=overwrite,
        )
    return Result("mine", out, judged.counts, judged.quarantined, details, {"mine": mined, "judge": judged})


@stage_function
def train(
    config: PathLike | dict[str, Any] | Any,
    *,
    stage: str | None = None,
    device: str | None = None,
    output: PathLike | None = None,
    max_steps: int | None = None,
    workers: int = 1,
    use_gpu: bool | None = None,
    ray_address: str | None = None,
    no_progress: bool = False,
) -> Result:
    """Train one stage of the recipe (``assay train --help``) from a config: a YAML file, a mapping
    of its keys, or a ``TrainConfig``. Resumes from the last checkpoint; a finished stage returns at
    once. ``out``: the final checkpoint; ``details``: the training output folder and its record."""
    from assay.training.config import TrainConfig, config_from_dict, load_config
    from assay.training.trainer import COMPLETE_FILE

    overrides: dict[str, Any] = {"device": device, "output": output, "max_steps": max_steps}
    if no_progress:
        overrides["progress"] = False
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(config, TrainConfig):
        cfg = config_from_dict(config.to_dict(), **overrides) if overrides else config
    elif isinstance(config, dict):
        cfg = config_from_dict(config, **overrides)
    else:
        cfg = load_config(config, **overrides)
    if stage is not None and cfg.stage != str(stage):
        raise ValueError(f"the config is a stage {cfg.stage} config, but stage {stage} was asked for")
    with writing(cfg.output, command="assay train"):  # before torch is imported: refuse at once
        quiet_transformers()
        if workers > 1 or ray_address:
            from assay.pipelines.train_ray import train_distributed

            gpu = use_gpu if use_gpu is not None else cfg.device == "cuda"
            final = train_distributed(cfg, num_workers=workers, use_gpu=gpu, address=ray_address)
        else:
            from assay.training.trainer import train as run_train

            final = run_train(cfg)
    record = json.loads((storage.path(cfg.output) / COMPLETE_FILE).read_text())
    details = {"output": storage.display(cfg.output), **record}
    return Result("train", storage.path(final), {"steps": record["steps"]}, {}, details)


#: "org/name": what a Hugging Face hub id looks like (a path that does not exist may still be one).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def checkpoint_ref(checkpoint: PathLike) -> str:
    """A local checkpoint directory (made absolute) or a hub id; a clear error otherwise. A URI
    (``s3://...``) is read from its local copy (``training.checkpoint.local_model_path``: an assay
    checkpoint must be committed, and is verified)."""
    if storage.is_remote(checkpoint):
        from assay.training.checkpoint import local_model_path

        return str(local_model_path(checkpoint))
    p = Path(checkpoint)
    if p.exists():
        if not p.is_dir():
            raise ValueError(
                f"checkpoint {checkpoint} is a file; pass the directory written by save_pretrained"
            )
        if not (p / "config.json").is_file():
            raise ValueError(
                f"checkpoint {checkpoint} has no config.json: not a model directory "
                "(pass the directory written by `assay train` / MMEmbedder.save_pretrained)"
            )
        return str(p.resolve())
    if _HUB_ID.match(str(checkpoint)) and not str(checkpoint).startswith((".", "/")):
        return str(checkpoint)
    raise ValueError(f"checkpoint not found: {checkpoint}")


@stage_function
def evaluate(
    checkpoint: PathLike,
    dataset: Source,
    *,
    out: PathLike | None = None,
    batch_size: int = 32,
    candidates: str = "pairs",
    subset: str | Sequence[str] | None = None,
    tokens_per_tile: int | None = None,
    device: str | None = None,
    truth: PathLike | None = None,
    max_queries: int | None = None,
) -> Result:
    """Score an embedder checkpoint on a dataset (``assay eval --help``): P@1 per subset and meta-task,
    Recall@k and nDCG@10 for retrieval. The metrics go to ``out`` (default
    ``./<dataset>.metrics.json``) and to ``details``."""
    source = open_dataset(dataset)
    out_path = metrics_path(source.root, out)
    subsets = many(subset)
    with writing(out_path, command="assay eval"):
        ref = checkpoint_ref(checkpoint)
        from assay.curation.truth import read_truth

        truth_table = read_truth(truth) if truth is not None else None
        if subsets:
            have = set(source.query_subsets().values())
            missing = sorted(set(subsets) - have)
            if missing:
                raise ValueError(
                    f"no queries in subset(s) {', '.join(missing)} of {source.root} "
                    f"(subsets: {', '.join(sorted(have)) or 'none'})"
                )
        try:
            import torch

            from assay.training.evaluate import evaluate as run_evaluate
            from assay.training.evaluate import write_metrics
            from assay.training.model import load_embedder
        except ImportError as e:
            raise ImportError(f"assay eval needs the training extra (torch, transformers): {e}") from e
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: no CUDA device is available")
        quiet_transformers()
        try:
            embedder = load_embedder(
                ref, tokens_per_tile=tokens_per_tile, trust_remote_code=False, device=device
            )
        except OSError as e:
            raise ValueError(f"cannot load checkpoint {checkpoint}: {e}") from e
        metrics = run_evaluate(
            source,
            lambda rows: embedder.encode_queries(rows, batch_size=batch_size),
            lambda rows: embedder.encode_candidates(rows, batch_size=batch_size),
            batch_size=batch_size,
            candidate_set=candidates,
            subsets=subsets or None,
            progress=True,
            max_queries_per_subset=max_queries,
            truth=truth_table,
        )
        metrics["checkpoint"] = storage.display(checkpoint) if storage.is_remote(checkpoint) else ref
        metrics["dataset"] = storage.display(storage.absolute(source.root))
        metrics["settings"].update(
            tokens_per_tile=embedder.tokens_per_tile, device=device, batch_size=batch_size
        )
        write_metrics(metrics, out_path)
    return Result("eval", out_path, {"queries": int(metrics["overall"]["queries"])}, {}, metrics)


def metrics_path(dataset: Source, out: PathLike | None = None) -> Path:
    """Where ``evaluate`` writes its metrics: ``out``, or ``./<dataset name>.metrics.json``."""
    if out:
        return storage.path(out)
    root = dataset.root if isinstance(dataset, Dataset) else storage.path(dataset)
    name = root.name if storage.is_remote(root) else Path(root).resolve().name
    return Path.cwd() / f"{name}.metrics.json"
