"""Building a judge from what a user names: a model directory (an assay reranker or a transformers
/ vLLM model) or a served model behind an OpenAI-compatible endpoint, in this process or in a pool
of Ray actors. ``assay judge``, ``assay mine --judge``, ``assay curate --judge`` and their Python
functions (``assay.judge`` ...) all build theirs here.

A model directory may be a URI (``s3://bucket/models/judge``): the process that builds the judge
(this one, or each Ray actor on its own node) copies it once to its cache root and loads that copy
(``training.checkpoint.local_model_path``: a published assay checkpoint is verified against its
manifest, any other directory is copied by ``curation.remote_model``); the model id is the same as
for a local copy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from assay.curation import storage
from assay.curation.remote_model import remote_files

BACKENDS = ("transformers", "vllm", "openai")


def _local(model: str) -> Any:
    """``model`` itself when it is a local directory; a URI's copy on this machine (module docs): a
    published assay checkpoint verified against its manifest, any other model directory as listed."""
    if not storage.is_remote(model):
        return model
    from assay.training.checkpoint import local_model_path

    return local_model_path(model)


def _is_assay_checkpoint(model: str) -> bool:
    from assay.training.model import EMBEDDER_FILE

    return (Path(model) / EMBEDDER_FILE).is_file()


def _device(device: str) -> str:
    import torch

    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def scorer_factory(
    backend: str,
    model: str,
    *,
    device: str = "auto",
    batch_size: int = 32,
    trust_remote_code: bool = False,
    image_root: str,
    endpoint: str | None = None,
    concurrency: int = 8,
    timeout: float = 60.0,
) -> Callable[[], Any]:
    """A zero-argument function that builds the judge (called in this process or in each Ray
    actor). Raises ValueError for what can be told before loading anything: an unknown backend,
    an openai backend without an endpoint, a model directory that does not exist (models are never
    downloaded)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown judge backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "openai":
        if not endpoint:
            raise ValueError(
                "the openai judge backend needs an endpoint (--endpoint URL, e.g. http://localhost:8000/v1)"
            )

        def openai_judge():
            from assay.curation.judge.openai_backend import OpenAIScorer

            return OpenAIScorer(
                endpoint, model, concurrency=concurrency, timeout=timeout, image_root=image_root
            )

        return openai_judge
    if storage.is_remote(model):
        remote_files(model)  # there, and no pickle in it: refused here, before any actor starts
    elif not Path(model).is_dir():
        raise ValueError(f"judge model {model} is not a model directory (models are never downloaded)")
    if backend == "vllm":

        def vllm_judge():
            from assay.curation.judge.vllm_backend import VLLMScorer

            return VLLMScorer(_local(model), trust_remote_code=trust_remote_code)

        return vllm_judge

    def transformers_judge():
        model_dir = _local(model)
        if _is_assay_checkpoint(model_dir):
            # An assay reranker: training/ loads it (compressed InternVL) and hands its scorer over.
            from assay.curation.judge.scoring import model_id_for
            from assay.training.generative import Reranker
            from assay.training.model import load_embedder

            embedder = load_embedder(model_dir).to(_device(device)).eval()
            embedder.image_root = image_root
            return Reranker(embedder, batch_size=batch_size, model_id=model_id_for(model_dir)).scorer
        from assay.curation.judge.hf import TransformersScorer

        return TransformersScorer.from_pretrained(
            model_dir,
            device=_device(device),
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            image_root=image_root,
        )

    return transformers_judge


def start_scorer(
    factory: Callable[[], Any],
    *,
    actors: int = 0,
    gpus_per_actor: float = 0.0,
    ray_address: str | None = None,
) -> Any:
    """The judge ``factory`` builds: in this process (``actors=0``), or one per Ray actor behind one
    scorer (``pipelines.judge_ray.RayPoolScorer``). Close it with ``close_scorer``."""
    if actors:
        from assay.pipelines.judge_ray import RayPoolScorer

        return RayPoolScorer(factory, actors=actors, num_gpus=gpus_per_actor, address=ray_address)
    return factory()


def close_scorer(scorer: Any) -> None:
    if hasattr(scorer, "close"):
        scorer.close()
