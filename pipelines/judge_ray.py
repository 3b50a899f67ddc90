"""Judges as Ray actors: one scorer per actor (one per GPU at scale), fed batches in parallel.

``RayPoolScorer(factory, actors=N, num_gpus=1)`` is itself a ``Scorer``: the judge stage calls
``score(items)`` as it would on an in-process backend, and the items are split across N actors, each
holding its own model (a vLLM engine per GPU, or a transformers model) built once by ``factory()`` on
the actor. Results come back in order. On a laptop ``num_gpus=0`` runs CPU actors on the local Ray;
with ``--ray-address`` the actors land on the cluster's GPUs.

Image cells travel inside the items: inline bytes go as they are; paths must be readable on the
actor's node: a dataset whose data root is a URI (``s3://...``) is, since each actor reads the image
from the store; a local data root needs storage every node mounts, as for every other stage on a
cluster. A model directory given as a URI is copied by each actor to its own node
(``pipelines.judges``). The actors only score: the judgment cache is read and written by the process
that runs the judge stage (``curation.judge.stage``), so no cache file is shared between nodes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from assay.curation.judge.scoring import JudgeItem, Score, Scorer


class _ScorerActor:
    def __init__(self, factory: Callable[[], Scorer]):
        self.scorer = factory()

    def model_id(self) -> str:
        return self.scorer.model_id

    def score(self, items: Sequence[JudgeItem]) -> list[Score]:
        return self.scorer.score(items)


class RayPoolScorer:
    """``actors`` Ray actors, each with the scorer ``factory()`` builds; see the module docstring."""

    def __init__(
        self,
        factory: Callable[[], Scorer],
        *,
        actors: int = 1,
        num_gpus: float = 0,
        num_cpus: float = 1,
        address: str | None = None,
    ):
        import ray

        if actors < 1:
            raise ValueError("actors must be at least 1")
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_gpus=num_gpus, num_cpus=num_cpus)(_ScorerActor)
        self._ray = ray
        self._actors = [remote.remote(factory) for _ in range(actors)]
        ids = ray.get([a.model_id.remote() for a in self._actors])
        if len(set(ids)) != 1:
            raise ValueError(f"the judge actors loaded different models: {sorted(set(ids))}")
        self.model_id = ids[0]
        where = f"{num_gpus:g} GPU each" if num_gpus else "on CPUs"
        print(f"judge {self.model_id}: in {actors} actor(s), {where}", file=sys.stderr)

    def score(self, items: Sequence[JudgeItem]) -> list[Score]:
        n = len(self._actors)
        size = -(-len(items) // n) if items else 0
        chunks = [list(items[i : i + size]) for i in range(0, len(items), size)] if size else []
        futures = [actor.score.remote(chunk) for actor, chunk in zip(self._actors, chunks, strict=False)]
        out: list[Score] = []
        for part in self._ray.get(futures):
            out.extend(part)
        return out

    def close(self) -> None:
        """Stop the actors (and the local Ray this scorer started, if it started one)."""
        for a in self._actors:
            self._ray.kill(a)
        self._actors = []
        if self._owns_ray:
            self._ray.shutdown()

    def __enter__(self) -> RayPoolScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
