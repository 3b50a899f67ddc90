"""``assay curate`` / ``assay.curate``: validate -> dedup -> [judge] -> [filter], the stage functions
composed, on the same executors; OUT is what the commands give run one after the other.

Each step writes its dataset under ``.OUT.curate/`` beside OUT (on object storage, the prefix of
that name beside OUT's) and the last one writes OUT; a killed run resumes at the step, and the
shard, it reached (each stage resumes on its own). When OUT is complete, the judge's failure list
is copied into it, ``OUT/curate.json`` records the run (a fingerprint of the input and every step's
options, and each step's :class:`Result`), and the folder in between is removed
(``storage.remove_tree``). A rerun of a finished run finds that record and returns at once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from assay.curation import storage
from assay.curation.dataset import MANIFEST, Dataset, atomic_write_bytes, atomic_write_json
from assay.curation.judge.stage import FAILURES_FILE
from assay.curation.lock import writing
from assay.pipelines.api_curation import dedup, filter, validate
from assay.pipelines.api_curation import judge as run_judge  # `judge` is curate's option
from assay.pipelines.result import PathLike, Result, Source, stage_function

#: What ``curate`` leaves in OUT beside the dataset: its fingerprint and each step's figures.
CURATE_RECORD = "curate.json"


@stage_function
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
    """validate -> dedup -> [judge] -> [filter] into ``out`` (``assay curate --help``; the module
    docstring). Every option is the stage's of the same name; ``judge`` names the judge model (no
    judge step without it), ``where`` the filter (no filter step without it). ``parts``: each
    step's :class:`Result`; ``details``: each step's figures."""
    given = {k: v for k, v in locals().items() if k not in ("dataset", "out", "overwrite")}
    steps = [("validate", validate, {}), ("dedup", dedup, {})]
    if judge:
        steps.append(("judge", run_judge, {"model": judge}))
    if where is not None:
        steps.append(("filter", filter, {}))
    plan = [(name, fn, {**_options_of(fn, given), **fixed}) for name, fn, fixed in steps]
    out = storage.path(out)
    work = out.parent / f".{out.name}.curate"
    with writing(out, command="assay curate"):
        fingerprint = _fingerprint(dataset, {name: options for name, _, options in plan})
        done = _finished(out, fingerprint)
        if done is not None and not overwrite:
            return done
        if overwrite:
            storage.remove_tree(work)
        parts: dict[str, Result] = {}
        source: Source = dataset
        for i, (name, stage, options) in enumerate(plan):
            target = out if i == len(plan) - 1 else work / name
            if storage.is_remote(target):  # a UPath is no os.PathLike: the stages take its URI
                target = str(target)
            parts[name] = stage(source, target, overwrite=overwrite, **options)
            source = target
        result = _commit(out, work, parts, fingerprint)
    return result


def _options_of(stage: Callable[..., Any], given: dict[str, Any]) -> dict[str, Any]:
    """The options of ``curate`` that ``stage`` takes (by name)."""
    names = inspect.signature(stage).parameters
    return {k: v for k, v in given.items() if k in names and k != "judge"}


def _commit(out: Any, work: Any, parts: dict[str, Result], fingerprint: str) -> Result:
    """OUT is complete: keep the judge's failure list in it, record the run, remove the steps' datasets."""
    failures = work / "judge" / FAILURES_FILE
    if "filter" in parts and failures.exists():
        atomic_write_bytes(out / FAILURES_FILE, failures.read_bytes())
    last = list(parts.values())[-1]
    quarantined = {f"{n}:{r}": v for n, p in parts.items() for r, v in p.quarantined.items()}
    details = {n: p.details for n, p in parts.items()}
    result = Result("curate", out, last.counts, quarantined, details, parts)
    record = {"fingerprint": fingerprint, "run_id": last.dataset.manifest.run_id, **result.to_json()}
    atomic_write_json(out / CURATE_RECORD, record)
    storage.remove_tree(work)
    return result


def _fingerprint(dataset: Source, options: dict[str, dict[str, Any]]) -> str:
    """The input (its run id) and every step's options: what makes a curate run the same run."""

    def ref(x: Any) -> Any:  # a dataset by its run id, wherever it lies
        if isinstance(x, Dataset):
            return x.manifest.run_id
        if isinstance(x, str | os.PathLike) and (storage.path(x) / MANIFEST).is_file():
            return Dataset(x).manifest.run_id
        if isinstance(x, list | tuple):
            return [ref(v) for v in x]
        return x

    blob = {
        "input": ref(dataset),
        "steps": {n: {k: ref(v) for k, v in o.items()} for n, o in options.items()},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _finished(out: Any, fingerprint: str) -> Result | None:
    """The stored result when ``out`` already holds this very curate run, complete."""
    record_path = out / CURATE_RECORD
    if not (out / MANIFEST).exists() or not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    if record.get("fingerprint") != fingerprint or record.get("run_id") != Dataset(out).manifest.run_id:
        return None
    return Result.from_json(record)
