"""What every function of ``assay.pipelines.api`` shares: the :class:`Result` it returns, how it
opens a dataset argument, reads a repeatable option and an executor name, and shows progress."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, ValidationError, validate_call

from assay.curation import storage
from assay.curation.dataset import Dataset, Manifest

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

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "out": str(self.out),
            "counts": self.counts,
            "quarantined": self.quarantined,
            "details": self.details,
            "parts": {n: p.to_json() for n, p in self.parts.items()},
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Result:
        parts = {n: cls.from_json(p) for n, p in obj.get("parts", {}).items()}
        return cls(
            obj["stage"], storage.path(obj["out"]), obj["counts"], obj["quarantined"], obj["details"], parts
        )

    def __str__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        refused = sum(self.quarantined.values())
        return f"{self.stage}: {self.out}  {counts}" + (f"  quarantined={refused}" if refused else "")


def result_of(stage: str, manifest: Manifest, out: PathLike, details: dict[str, Any] | None = None) -> Result:
    """The :class:`Result` of a stage that wrote a dataset: its manifest's counts, and the reasons
    this stage (not an earlier one) quarantined rows for."""
    prefix = f"{manifest.stage}:"
    refused = {k[len(prefix) :]: v for k, v in manifest.quarantine_reasons.items() if k.startswith(prefix)}
    return Result(stage, storage.path(out), dict(manifest.counts), refused, dict(details or {}))


def open_dataset(source: Source) -> Dataset:
    """``source`` as a :class:`Dataset` (a path is opened; a clear error if it holds none)."""
    return source if isinstance(source, Dataset) else Dataset(source)


def many(value: str | Sequence[Any] | None) -> list[Any]:
    """A repeatable option: None, one value or a list of them."""
    if value is None:
        return []
    if isinstance(value, str | os.PathLike | Dataset):
        return [value]
    return list(value)


def executor_for(executor: Any, ray_address: str | None, num_cpus: int | None) -> Any:
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
def progress_bars(disable: bool, **units: str) -> Iterator[dict[str, Any]]:
    """One tqdm bar per keyword, named by it and counting its unit (``embed="row"``)."""
    from tqdm import tqdm

    bars = {name: tqdm(desc=name, unit=unit, disable=disable) for name, unit in units.items()}
    try:
        yield bars
    finally:
        for bar in bars.values():
            bar.close()


def stage_function(fn: Callable[..., Result]) -> Callable[..., Result]:
    """An API function whose arguments are checked and converted by their annotations before it
    runs (pydantic, lax: a loop file's ``"64"`` is the number 64, ``"true"`` is True), a wrong one
    reported in one line naming it: ``assay.validate: max_image_mb: Input should be a valid number
    (got 'lots')``."""
    checked = validate_call(config=ConfigDict(arbitrary_types_allowed=True))(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Result:
        try:
            return checked(*args, **kwargs)
        except ValidationError as e:
            if e.title != fn.__name__:  # raised inside the stage, by a model of its own
                raise
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err['input']!r})" for err in e.errors()
            )
            raise ValueError(f"assay.{fn.__name__}: {problems}") from None

    return wrapper
