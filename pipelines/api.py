"""assay from Python: every stage of the ``assay`` command as a function, re-exported at ``import assay``.

    import assay

    raw = assay.ingest("easy-vqa", "runs/nb/raw", format="example", executor="local")
    valid = assay.validate(raw.parts["train"], "runs/nb/train-valid", executor="local")
    print(valid)                        # validate: runs/nb/train-valid  queries=... quarantined=...
    valid.dataset                       # the output, an assay.Dataset

The rule: ``assay.X(INPUTS..., **options)`` takes what ``assay X`` takes. Its positional arguments
are the command's (a dataset is a path or an :class:`~assay.curation.dataset.Dataset`), and every
option of ``assay X --help`` is a keyword of the same name, dashes as underscores, with the same
default (``--no-near`` is ``no_near=True``, a repeatable option takes a list, ``--executor`` is
``"ray"`` unless you say ``"local"``). ``assay eval`` is :func:`evaluate`. The command line and the
loop parse their arguments and call these functions; nothing the CLI does is missing here.

Every function returns one :class:`Result`: what it wrote (``out``), the rows it counted per table,
the rows it refused per reason, and the stage's own figures (``details``). It holds the lock of its
output while it writes (a second writer, from Python or the CLI, gets ``OutputInUse`` at once),
resumes an interrupted run of the same settings, and returns at once when the output already holds
this very run. Bad input raises ``ValueError`` (``DatasetError``, ``ConfigError``, ...) whose message
names the file, the row or the option.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assay.curation.dataset import Dataset, Manifest, atomic_write_bytes, atomic_write_json
from assay.curation.judge.stage import FAILURES_FILE
from assay.curation.lock import writing

PathLike = str | os.PathLike
Source = PathLike | Dataset


@dataclass(frozen=True)
class Result:
    """What a stage wrote and counted.

    ``out``: the dataset folder, checkpoint, metrics file or export it wrote. ``counts``: rows per
    table of a dataset output (an export: ``rows``; an eval: ``queries``; training: ``steps``).
    ``quarantined``: rows this stage refused, per reason. ``details``: the stage's own figures (the
    judge's report, the mining statistics, the metrics of an eval, ...). ``parts``: the results a
    stage made of several outputs is made of (an ingest's splits, mine-then-judge's two steps)."""

    stage: str
    out: Path
    counts: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, Result] = field(default_factory=dict)

    @property
    def dataset(self) -> Dataset:
        """The output, opened as a dataset (the stages that write one)."""
        return Dataset(self.out)

    def __str__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        refused = sum(self.quarantined.values())
        return f"{self.stage}: {self.out}  {counts}" + (f"  quarantined={refused}" if refused else "")


def result_of(stage: str, manifest: Manifest, out: PathLike, details: dict[str, Any] | None = None) -> Result:
    """The :class:`Result` of a stage that wrote a dataset: its manifest's counts, and the reasons
    this stage (not an earlier one) quarantined rows for."""
    prefix = f"{manifest.stage}:"
    refused = {k[len(prefix) :]: v for k, v in manifest.quarantine_reasons.items() if k.startswith(prefix)}
    return Result(stage, Path(out), dict(manifest.counts), refused, dict(details or {}))


def open_dataset(source: Source) -> Dataset:
    """``source`` as a :class:`Dataset` (a path is opened; a clear error if it holds none)."""
    return source if isinstance(source, Dataset) else Dataset(source)


def _many(value: str | Sequence[Any] | None) -> list[Any]:
    """A repeatable option: None, one value or a list of them."""
    if value is None:
        return []
    if isinstance(value, str | os.PathLike | Dataset):
        return [value]
    return list(value)


def _executor(executor: Any, ray_address: str | None, num_cpus: int | None) -> Any:
    """``"ray"``, ``"local"``, or an executor object (anything with ``map(fn, tasks, desc)``)."""
    if not isinstance(executor, str):
        return executor
    from assay.pipelines.executors import make_executor

    return make_executor(executor, address=ray_address, num_cpus=num_cpus)


def quiet_transformers() -> None:
    """No per-file progress bars or deprecation chatter from transformers / peft."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


@contextmanager
def _bars(*names: str, disable: bool) -> Iterator[dict[str, Any]]:
    from tqdm import tqdm

    bars = {
        n: tqdm(desc=n, unit="row" if n == "embed" else "query" if n == "mine" else "pair", disable=disable)
        for n in names
    }
    try:
        yield bars
    finally:
        for bar in bars.values():
            bar.close()


# -- curation ---------------------------------------------------------------------------------------


def ingest(
    source: PathLike,
    out: PathLike,
    *,
    format: str | None = None,
    map: Sequence[str] = (),
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
        run = _executor(executor, ray_address, num_cpus)
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
            columns.update(ing.parse_map_flags(_many(map)))
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
    parts = {split: result_of("ingest", m, Path(out) / split) for split, m in splits.items()}
    counts: dict[str, int] = {}
    for part in parts.values():
        for table, n in part.counts.items():
            counts[table] = counts.get(table, 0) + n
    return Result("ingest", Path(out), counts, {}, {"splits": list(parts)}, parts)


class OptionsNotApplicable(ValueError):
    """Options given to a stage that do not apply to its input (e.g. a column mapping for a bundled
    example)."""


def _refuse_options(what: str, options: dict[str, Any]) -> None:
    unused = [f"--{name.replace('_', '-')}" for name, value in options.items() if value]
    if unused:
        raise OptionsNotApplicable(f"{', '.join(unused)} do not apply to {what}")


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
            executor=_executor(executor, ray_address, num_cpus),
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

    evals = [open_dataset(a) for a in _many(against)]
    if decontaminate is not None and not evals:
        raise ValueError("decontaminate chooses the tables checked against `against`; give an eval dataset")
    with writing(out, command="assay dedup"):
        manifest = run_dedup(
            open_dataset(dataset),
            out,
            near=not no_near,
            phash_distance=phash_distance,
            against=evals,
            decontaminate=decontaminate if decontaminate is not None else DEFAULT_DECONTAMINATE,
            decontaminate_text_only=not images_only,
            executor=_executor(executor, ray_address, num_cpus),
            overwrite=overwrite,
        )
    return result_of("dedup", manifest, out, manifest.extra.get("dedup", {}))


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
            executor=_executor(executor, ray_address, num_cpus),
            overwrite=overwrite,
        )
    return result_of("filter", manifest, out, manifest.extra.get("filter", {}))


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
            image_root=str(source.data_root.resolve()),
            endpoint=endpoint,
            concurrency=concurrency,
            timeout=timeout,
        )
        if backend != "openai":
            quiet_transformers()
        scorer = start_scorer(factory, actors=actors, gpus_per_actor=gpus_per_actor, ray_address=ray_address)
        cache_path = Path(cache) if cache else default_cache_path()
        try:
            with _bars("judge", disable=no_progress) as bars:
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
    details = {**report.summary(), "backend": backend, "cache": str(cache_path)}
    return result_of("judge", manifest, out, details)


#: ``mine`` and ``curate`` take an option named ``judge`` (the judge model), which hides the function.
_judge = judge


def _labels(labels: str | Sequence[str] | None) -> list[str]:
    """``"positive,hard_negative"`` or a list of labels."""
    items = labels.split(",") if isinstance(labels, str) else list(labels or [])
    return [s.strip() for s in items if s.strip()]


def curate(
    dataset: Source,
    out: PathLike,
    *,
    judge: str | None = None,
    backend: str = "transformers",
    prompt: str | None = None,
    rule: str = "paper",
    labels: str | Sequence[str] | None = None,
    batch_size: int = 32,
    max_chars: int = 2000,
    device: str = "auto",
    cache: PathLike | None = None,
    trust_remote_code: bool = False,
    where: str | None = None,
    table: str | None = None,
    against: Sequence[Source] | Source = (),
    decontaminate: str | None = None,
    images_only: bool = False,
    phash_distance: int = 4,
    no_near: bool = False,
    max_text_chars: int | None = None,
    max_pixels: int | None = None,
    max_image_mb: float | None = None,
    no_decode: bool = False,
    actors: int = 0,
    gpus_per_actor: float = 0.0,
    executor: Any = "ray",
    ray_address: str | None = None,
    num_cpus: int | None = None,
    overwrite: bool = False,
) -> Result:
    """validate -> dedup -> [judge] -> [filter] into ``out``: the stage functions above, composed
    (``assay curate --help``). Each step writes its dataset under ``.OUT.curate/`` beside ``out``
    and the last one writes ``out``; the folder is removed when ``out`` is complete. A killed run
    resumes at the step (and the shard) it reached. ``parts``: each step's :class:`Result`."""
    out = Path(out)
    work = out.parent / f".{out.name}.curate"
    run = {"executor": executor, "ray_address": ray_address, "num_cpus": num_cpus}
    steps: list[tuple[str, Any, dict[str, Any]]] = [
        (
            "validate",
            validate,
            {
                "max_text_chars": max_text_chars,
                "max_pixels": max_pixels,
                "max_image_mb": max_image_mb,
                "no_decode": no_decode,
                **run,
            },
        ),
        (
            "dedup",
            dedup,
            {
                "against": against,
                "decontaminate": decontaminate,
                "images_only": images_only,
                "phash_distance": phash_distance,
                "no_near": no_near,
                **run,
            },
        ),
    ]
    if judge:
        judge_options = {
            "model": judge,
            "backend": backend,
            "prompt": prompt,
            "rule": rule,
            "labels": labels,
            "batch_size": batch_size,
            "max_chars": max_chars,
            "device": device,
            "cache": cache,
            "trust_remote_code": trust_remote_code,
            "actors": actors,
            "gpus_per_actor": gpus_per_actor,
            "ray_address": ray_address,
        }
        steps.append(("judge", _judge, judge_options))
    if where is not None:
        steps.append(("filter", filter, {"where": where, "table": table, **run}))
    options = {name: opts for name, _, opts in steps}
    record_path = out / CURATE_RECORD
    with writing(out, command="assay curate"):
        fingerprint = _curate_fingerprint(dataset, options)
        done = _finished_curate(out, record_path, fingerprint)
        if done is not None and not overwrite:
            return done
        if overwrite:
            shutil.rmtree(work, ignore_errors=True)
        parts: dict[str, Result] = {}
        source: Source = dataset
        for i, (name, stage, opts) in enumerate(steps):
            target = out if i == len(steps) - 1 else work / name
            parts[name] = stage(source, target, overwrite=overwrite, **opts)
            source = target
        failures = work / "judge" / FAILURES_FILE
        if judge and where is not None and failures.exists():  # the judge's list, kept in OUT
            atomic_write_bytes(out / FAILURES_FILE, failures.read_bytes())
        last = parts[steps[-1][0]]
        quarantined = {f"{n}:{r}": v for n, p in parts.items() for r, v in p.quarantined.items()}
        result = Result(
            "curate", out, last.counts, quarantined, {n: p.details for n, p in parts.items()}, parts
        )
        atomic_write_json(
            record_path,
            {"fingerprint": fingerprint, "run_id": last.dataset.manifest.run_id, **_plain(result)},
        )
        shutil.rmtree(work, ignore_errors=True)
    return result


#: What ``curate`` leaves in OUT beside the dataset: its fingerprint and each step's figures.
CURATE_RECORD = "curate.json"


def _curate_fingerprint(dataset: Source, options: dict[str, dict[str, Any]]) -> str:
    """The input (its run id) and every step's options: what makes a curate run the same run."""
    import hashlib

    def ref(x: Any) -> Any:  # a dataset by its run id, wherever it lies
        if isinstance(x, Dataset):
            return x.manifest.run_id
        if isinstance(x, str | os.PathLike) and (Path(x) / "manifest.json").is_file():
            return Dataset(x).manifest.run_id
        if isinstance(x, list | tuple):
            return [ref(v) for v in x]
        return x

    blob = {
        "input": ref(dataset),
        "steps": {n: {k: ref(v) for k, v in o.items()} for n, o in options.items()},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _finished_curate(out: Path, record_path: Path, fingerprint: str) -> Result | None:
    """The stored result when ``out`` already holds this very curate run, complete."""
    if not (out / "manifest.json").exists() or not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    if record.get("fingerprint") != fingerprint or record.get("run_id") != Dataset(out).manifest.run_id:
        return None
    return _result_from_json(record)


def _plain(result: Result) -> dict[str, Any]:
    return {
        "stage": result.stage,
        "out": str(result.out),
        "counts": result.counts,
        "quarantined": result.quarantined,
        "details": result.details,
        "parts": {n: _plain(p) for n, p in result.parts.items()},
    }


def _result_from_json(obj: dict[str, Any]) -> Result:
    parts = {n: _result_from_json(p) for n, p in obj.get("parts", {}).items()}
    return Result(obj["stage"], Path(obj["out"]), obj["counts"], obj["quarantined"], obj["details"], parts)


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
    return Result("export", Path(done.path), {"rows": done.rows}, {}, done.to_json())


# -- mining, training, evaluation -------------------------------------------------------------------


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
    no_progress: bool = False,
    overwrite: bool = False,
) -> Result:
    """Hard negatives per query against ``encoder`` (``assay mine --help``). With ``judge`` the
    mined dataset goes to ``OUT.unjudged`` and the judged one to ``out``; ``parts`` holds both.
    ``details["stats"]``: positive and negative scores per subset."""
    from assay.curation.judge.cache import cache_root
    from assay.mining.encoders import load_encoder
    from assay.mining.stage import mine_dataset

    if keep is not None and judge is None:
        raise ValueError("keep needs judge (it keeps the judged hard negatives)")
    out = Path(out)
    mined_out = Path(f"{str(out).rstrip('/')}.unjudged") if judge else out
    with writing(out, command="assay mine"), writing(mined_out, command="assay mine"):
        quiet_transformers()
        source = open_dataset(dataset)
        pools = [open_dataset(p) for p in _many(corpus)]
        enc = load_encoder(
            encoder,
            device=device,
            batch_size=batch_size,
            image_root=str(source.data_root.resolve()),
            instructions=instructions,
            trust_remote_code=trust_remote_code,
        )
        with _bars("embed", "mine", disable=no_progress) as bars:
            manifest, stats = mine_dataset(
                source,
                mined_out,
                enc,
                cache_dir=Path(cache) if cache else cache_root() / "embeddings",
                rules=rules,
                depth=depth,
                subsets=_many(subset) or None,
                corpus=pools,
                method=index,
                device=device,
                seed=seed,
                overwrite=overwrite,
                progress=lambda what, n: bars[what].update(n),
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
        judged = _judge(
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
    record = json.loads((Path(cfg.output) / COMPLETE_FILE).read_text())
    return Result("train", Path(final), {"steps": record["steps"]}, {}, {"output": str(cfg.output), **record})


#: "org/name": what a Hugging Face hub id looks like (a path that does not exist may still be one).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def checkpoint_ref(checkpoint: PathLike) -> str:
    """A local checkpoint directory (made absolute) or a hub id; a clear error otherwise."""
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
    out_path = Path(out) if out else Path.cwd() / f"{source.root.resolve().name}.metrics.json"
    subsets = _many(subset)
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
        metrics["checkpoint"] = ref
        metrics["dataset"] = str(source.root.resolve())
        metrics["settings"].update(
            tokens_per_tile=embedder.tokens_per_tile, device=device, batch_size=batch_size
        )
        write_metrics(metrics, out_path)
    return Result("eval", out_path, {"queries": int(metrics["overall"]["queries"])}, {}, metrics)


# -- looking at what was written --------------------------------------------------------------------


def stats(dataset: Source) -> Result:
    """The counts of a dataset and its lineage (``assay stats --help``): ``details`` holds rows per
    table, per subset, task and label, the quarantine per stage and reason, and every stage that led
    to it."""
    from assay.curation.stats import dataset_stats

    ds = open_dataset(dataset)
    return Result("stats", ds.root, dict(ds.manifest.counts), {}, dataset_stats(ds))


def report(run: PathLike, *, out: PathLike | None = None) -> Result:
    """The HTML report of an ``assay loop`` run directory (``assay report --help``), written to
    ``out`` (default ``RUN/report.html``)."""
    from assay.pipelines.report import build_report

    return Result("report", build_report(run, out))


__all__ = [
    "Dataset",
    "Result",
    "curate",
    "dedup",
    "evaluate",
    "export",
    "filter",
    "ingest",
    "judge",
    "mine",
    "report",
    "stats",
    "train",
    "validate",
]
