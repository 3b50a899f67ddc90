"""assay: training data and training for universal multimodal embedders (the Magic-MM-Embedding recipe).

One import namespace over the project's top-level folders (a setuptools package-dir mapping in
pyproject.toml; the folders stay where docs/DESIGN.md puts them):

    assay.curation       datasets, the curation stages, the judge      (curation/)
    assay.mining         embeddings, kNN, hard-negative selection       (mining/)
    assay.training       the embedder, the trainer, evaluation          (training/)
    assay.pipelines      the CLI, the loop, Ray execution, the report   (pipelines/)
    assay.judge_prompts  the shipped judge prompt templates             (judge_prompts/)

Imports point one way: pipelines -> mining -> training -> curation.
"""

from assay.curation import __version__

__all__ = ["__version__"]
