"""assay: training data and training for universal multimodal embedders (the Magic-MM-Embedding recipe).

From Python, every stage of the ``assay`` command is a function here, with the command's arguments
and options as its own (see ``assay.pipelines.api``), and each returns an ``assay.Result``:

    import assay

    raw = assay.ingest("easy-vqa", "runs/nb/raw", format="example", executor="local")
    train = assay.validate(raw.parts["train"].out, "runs/nb/train-valid", executor="local")

    assay.Dataset       a dataset folder (Parquet tables + manifest)
    assay.ingest        raw pairs -> a dataset          assay.mine      hard negatives per query
    assay.validate      row checks, quarantine          assay.train     one stage of the recipe
    assay.dedup         duplicates, eval copies         assay.evaluate  P@1, Recall@k, nDCG@10
    assay.filter        rows an expression accepts      assay.export    a trainer's format
    assay.judge         an MLLM judge's verdicts        assay.curate    validate -> dedup -> judge -> filter
    assay.Loop          a loop file's steps, resumable
    assay.stats         counts and lineage              assay.report    a loop run's HTML report

One import namespace over the project's top-level folders (a setuptools package-dir mapping in
pyproject.toml; the folders stay where docs/DESIGN.md puts them):

    assay.curation       datasets, the curation stages, the judge      (curation/)
    assay.mining         embeddings, kNN, hard-negative selection       (mining/)
    assay.training       the embedder, the trainer, evaluation          (training/)
    assay.pipelines      the CLI, the loop, Ray execution, the report   (pipelines/)
    assay.judge_prompts  the shipped judge prompt templates             (judge_prompts/)

Imports point one way: pipelines -> mining -> training -> curation. ``import assay`` itself is
cheap: the functions are loaded on first use.
"""

from typing import Any

from assay.curation import __version__

_API = (
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
)

__all__ = ["Loop", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from assay.pipelines import api

        return getattr(api, name)
    if name == "Loop":
        from assay.pipelines.loop import Loop

        return Loop
    raise AttributeError(f"module 'assay' has no attribute {name!r}")
