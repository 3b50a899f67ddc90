"""The curation stages from Python: ``assay.ingest``, ``validate``, ``dedup``, ``filter``, ``judge``
and ``export`` (see ``assay.pipelines.api`` for the rule they follow)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from assay.curation import storage
from assay.curation.lock import writing
from assay.pipelines.result import (
    PathLike,
    Result,
    Source,
    executor_for,
    many,
    open_dataset,
    progress_bars,
    quiet_transformers,
    result_of,
    stage_function,
)


@stage_function
def ingest(
    source: PathLike,
    out: PathLike,
    *,
    format: str | None = None,
    map: str | Sequence[str] = (),
    mapping: PathLike | None = None,
    data_root: PathLike | None = None,
    embed_images: bool = False,
    subset: str | None = None,
    task: str | None = None,
    labels: PathLike | None = None,
    captions: PathLike | None = None,
    documents: bool = False,
    rows_per_shard: int = 50_000,
    executor: Any = "ray",
    ray_address: str | None = None,
    num_cpus: int | None = None,
    overwrite: bool = False,
) -> Result:
    """Raw pairs (JSONL, CSV, Parquet, an HF dataset, an image folder, a bundled example) -> a
    dataset at ``out`` (``assay ingest --help``). A bundled example or a folder of split folders
    gives ``out/<split>``: one :class:`Result` per split in ``parts``."""
    from assay.curation import ingest as ing

    with writing(out, command="assay ingest"):
        run = executor_for(executor, ray_address, num_cpus)
        flags = {
            "map": map,
            "mapping": mapping,
            "data_root": data_root,
            "subset": subset,
            "task": task,
            "labels": labels,
            "captions": captions,
            "documents": documents,
            "embed_images": embed_images,
        }
        if format == "example" or (
            format is None and not labels and not captions and ing.infer_format(source) == "example"
        ):
            from assay.curation.examples import EXAMPLES, ingest_example

            if str(source) not in EXAMPLES:
                raise ValueError(
                    f"unknown example {str(source)!r}; the bundled examples are {', '.join(EXAMPLES)}"
                )
            if storage.is_remote(out):
                raise ValueError(
                    f"{storage.display(out)}: a bundled example is written to a local folder; ingest it "
                    "there, or ingest your own files to object storage"
                )
            _refuse_options("a bundled example", flags)
            splits = ingest_example(
                str(source), out, executor=run, overwrite=overwrite, rows_per_shard=rows_per_shard
            )
        elif (
            format in (None, "imagefolder")
            and not (labels or captions or documents)
            and ing.split_folders(source)
        ):
            _refuse_options(
                "an image folder of splits", {k: flags[k] for k in ("map", "mapping", "data_root", "task")}
            )
            splits = ing.ingest_split_folders(
                source,
                out,
                subset=subset,
                embed_images=embed_images,
                rows_per_shard=rows_per_shard,
                executor=run,
                overwrite=overwrite,
            )
        else:
            columns = ing.load_mapping(mapping) if mapping else {}
            columns.update(ing.parse_map_flags(many(map)))
            manifest = ing.ingest(
                source,
                out,
                format=format,
                mapping=columns or None,
                data_root=data_root,
                embed_images=embed_images,
                subset=subset,
                task=task,
                labels=labels,
                captions=captions,
                rows_per_shard=rows_per_shard,
                executor=run,
                overwrite=overwrite,
                documents_only=documents,
            )
            return result_of("ingest", manifest, out)
    parts = {split: result_of("ingest", m, storage.join(out, split)) for split, m in splits.items()}
    counts: dict[str, int] = {}
    for part in parts.values():
        for table, n in part.counts.items():
            counts[table] = counts.get(table, 0) + n
    return Result("ingest", storage.path(out), counts, {}, {"splits": list(parts)}, parts)


class OptionsNotApplicable(ValueError):
    """Options given to a stage that do not apply to its input (e.g. a column mapping for a bundled
    example)."""


def _refuse_options(what: str, options: dict[str, Any]) -> None:
    unused = [f"--{name.replace('_', '-')}" for name, value in options.items() if value]
    if unused:
        raise OptionsNotApplicable(f"{', '.join(unused)} do not apply to {what}")


@stage_function
def validate(
    dataset: Source,
    out: PathLike,
    *,
    max_text_chars: int | None = None,
    max_pixels: int | None = None,
    max_image_mb: float | None = None,
    no_decode: bool = False,
    executor: Any = "ray",
    ray_address: str | None = None,
    num_cpus: int | None = None,
    overwrite: bool = False,
) -> Result:
    """Check every row; the good ones go to ``out``, refused rows to its quarantine with a reason
    (``assay validate --help``). Limits left None keep their defaults (``ValidateConfig``)."""
    from assay.curation.validate import validate as run_validate

    with writing(out, command="assay validate"):
        manifest = run_validate(
            open_dataset(dataset),
            out,
            validate_config(max_text_chars, max_pixels, max_image_mb, no_decode),
            executor=executor_for(executor, ray_address, num_cpus),
            overwrite=overwrite,
        )
    return result_of("validate", manifest, out)


def validate_config(
    max_text_chars: int | None = None,
    max_pixels: int | None = None,
    max_image_mb: float | None = None,
    no_decode: bool = False,
) -> Any:
    from assay.curation.validate import ValidateConfig

    d = ValidateConfig()
    return ValidateConfig(
        max_text_chars=d.max_text_chars if max_text_chars is None else max_text_chars,
        max_pixels=d.max_pixels if max_pixels is None else max_pixels,
        max_image_bytes=d.max_image_bytes if max_image_mb is None else int(max_image_mb * 2**20),
        decode_images=not no_decode,
    )


@stage_function
def dedup(
    dataset: Source,
    out: PathLike,
    *,
    against: Sequence[Source] | Source = (),
    decontaminate: str | None = None,
    images_only: bool = False,
    phash_distance: int = 4,
    no_near: bool = False,
    executor: Any = "ray",
    ray_address: str | None = None,
    num_cpus: int | None = None,
    overwrite: bool = False,
) -> Result:
    """Exact and near duplicates, and copies of ``against`` eval datasets, to the quarantine
    (``assay dedup --help``). ``decontaminate`` (tables checked against ``against``) defaults to
    queries."""
    from assay.curation.dedup import DEFAULT_DECONTAMINATE
    from assay.curation.dedup import dedup as run_dedup

    evals = [open_dataset(a) for a in many(against)]
    if decontaminate is not None and not evals:
        raise ValueError(
            "--decontaminate chooses the tables checked against --against (decontaminate=, against=); "
            "give --against EVAL"
        )
    with writing(out, command="assay dedup"):
        manifest = run_dedup(
            open_dataset(dataset),
            out,
            near=not no_near,
            phash_distance=phash_distance,
            against=evals,
            decontaminate=decontaminate if decontaminate is not None else DEFAULT_DECONTAMINATE,
            decontaminate_text_only=not images_only,
            executor=executor_for(executor, ray_address, num_cpus),
            overwrite=overwrite,
        )
    return result_of("dedup", manifest, out, manifest.extra.get("dedup", {}))


@stage_function
def filter(
    dataset: Source,
    out: PathLike,
    *,
    where: str,
    table: str | None = None,
    prune: bool = False,
    executor: Any = "ray",
    ray_address: str | None = None,
    num_cpus: int | None = None,
    overwrite: bool = False,
) -> Result:
    """The rows ``where`` accepts (``assay filter --help``); a bad expression is refused before
    anything is written. ``details["dropped"]``: rows dropped per table and reason."""
    from assay.curation.filter import filter_dataset, filter_targets
    from assay.curation.filter_expr import parse_filter

    source = open_dataset(dataset)
    filter_targets(parse_filter(where), table)  # refuse a bad expression before starting Ray
    with writing(out, command="assay filter"):
        manifest = filter_dataset(
            source,
            out,
            where,
            table=table,
            prune=prune,
            executor=executor_for(executor, ray_address, num_cpus),
            overwrite=overwrite,
        )
    return result_of("filter", manifest, out, manifest.extra.get("filter", {}))


@stage_function
def judge(
    dataset: Source,
    out: PathLike,
    *,
    model: str,
    backend: str = "transformers",
    prompt: str | None = None,
    rule: str = "paper",
    labels: str | Sequence[str] | None = None,
    batch_size: int = 32,
    max_chars: int = 2000,
    device: str = "auto",
    cache: PathLike | None = None,
    trust_remote_code: bool = False,
    endpoint: str | None = None,
    concurrency: int = 8,
    timeout: float = 60.0,
    actors: int = 0,
    gpus_per_actor: float = 0.0,
    ray_address: str | None = None,
    keep: int | None = None,
    truth: PathLike | None = None,
    no_progress: bool = False,
    overwrite: bool = False,
) -> Result:
    """Score the pairs with an MLLM judge; write them with ``judge_p_yes`` and ``judge_verdict``
    (``assay judge --help``). ``details``: the judge's report (scored, cached, failed, verdicts,
    relabelled, and its quality against ``truth`` when given)."""
    from assay.curation.judge.cache import default_cache_path
    from assay.curation.judge.stage import judge_dataset
    from assay.curation.judge.verdicts import parse_rule
    from assay.curation.schema import LABELS
    from assay.curation.truth import read_truth
    from assay.pipelines.judges import close_scorer, scorer_factory, start_scorer

    with writing(out, command="assay judge"):
        source = open_dataset(dataset)
        verdict_rule = parse_rule(rule)
        truth_table = read_truth(truth) if truth is not None else None
        factory = scorer_factory(
            backend,
            model,
            device=device,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            image_root=storage.absolute(source.data_root),
            endpoint=endpoint,
            concurrency=concurrency,
            timeout=timeout,
        )
        if backend != "openai":
            quiet_transformers()
        scorer = start_scorer(factory, actors=actors, gpus_per_actor=gpus_per_actor, ray_address=ray_address)
        # A URI cache is segments on object storage (curation.judge.cache); a path, SQLite here.
        cache_path = (cache if storage.is_remote(cache) else Path(cache)) if cache else default_cache_path()
        try:
            with progress_bars(no_progress, judge="pair") as bars:
                manifest, report = judge_dataset(
                    source,
                    out,
                    scorer,
                    cache=cache_path,
                    prompt=prompt,
                    rule=verdict_rule,
                    labels=_labels(labels) or list(LABELS),
                    batch_size=batch_size,
                    max_chars=max_chars,
                    keep_negatives=keep,
                    overwrite=overwrite,
                    progress=bars["judge"].update,
                    truth=truth_table,
                )
        finally:
            close_scorer(scorer)
    details = {**report.summary(), "backend": backend, "cache": storage.display(cache_path)}
    return result_of("judge", manifest, out, details)


def _labels(labels: str | Sequence[str] | None) -> list[str]:
    """``"positive,hard_negative"`` or a list of labels."""
    items = labels.split(",") if isinstance(labels, str) else list(labels or [])
    return [s.strip() for s in items if s.strip()]


@stage_function
def export(
    dataset: Source,
    out: PathLike,
    *,
    format: str,
    where: str | None = None,
    num_negatives: int | None = None,
    copy_images: bool = False,
    skip_image_rows: bool = False,
    with_instruction: bool = False,
    overwrite: bool = False,
) -> Result:
    """Write the dataset in a trainer's format (``assay export --help``): parquet, jsonl (VLM2Vec),
    hf, or a sentence-transformers format. ``counts["rows"]``: rows written."""
    from assay.curation.export import export_dataset

    with writing(out, command="assay export"):
        done = export_dataset(
            open_dataset(dataset),
            out,
            format,
            where=where,
            num_negatives=num_negatives,
            copy_images=copy_images,
            skip_image_rows=skip_image_rows,
            with_instruction=with_instruction,
            overwrite=overwrite,
        )
    return Result("export", storage.path(done.path), {"rows": done.rows}, {}, done.to_json())
