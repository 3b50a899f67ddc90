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

from assay.curation.dataset import Dataset
from assay.pipelines.api_curation import OptionsNotApplicable as OptionsNotApplicable
from assay.pipelines.api_curation import dedup, export, filter, ingest, judge, validate
from assay.pipelines.api_models import evaluate, mine, train
from assay.pipelines.api_models import metrics_path as metrics_path
from assay.pipelines.curate import curate
from assay.pipelines.result import PathLike, Result, Source, open_dataset

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


#: What ``import assay`` offers (``assay/__init__.py`` lists the same names, to stay cheap to import).
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
