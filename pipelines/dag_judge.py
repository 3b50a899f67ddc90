"""The judge of the curation DAG (pipelines/dag.py): a Ray Data actor-pool class and the cache it shares.

``JudgeActor`` is the callable class ``map_batches`` runs on an ``ActorPoolStrategy``: one scorer per
actor (built on the first batch the cache cannot serve, so a rerun loads no model), with ``num_gpus``
per actor when the cluster has GPUs. Every actor asks the one ``CacheServer`` actor, which holds the
judgment cache (SQLite) on the driver's node: cache lookups before scoring, each scored batch stored at
once, wherever the actors run. Prompts, keys, scoring and the cache protocol are curation.judge's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assay.curation.judge.cache import Key
from assay.curation.judge.scoring import Score, Scorer
from assay.curation.judge.stage import (
    JudgeError,
    JudgePrompts,
    JudgeReport,
    lookup_scores,
    render_pair,
    score_missing,
)
from assay.curation.schema import CORPUS, QUERIES, ROW_COLUMNS, resolve_image_cell
from assay.pipelines.dag_steps import strings


class CacheServer:
    """The judgment cache in one actor (on the driver's node): SQLite stays in one process and one
    file, wherever the judge actors run."""

    def __init__(self, path: str):
        from assay.curation.judge.cache import JudgmentCache

        self.cache = JudgmentCache(path)

    def lookup(self, model_id: str, prompt_id: str, keys: list[Key], failures: bool) -> dict[Key, Score]:
        return self.cache.lookup(model_id, prompt_id, keys, failures=failures)

    def store(self, model_id: str, prompt_id: str, results: list[tuple[Key, Score]]) -> None:
        self.cache.store(model_id, prompt_id, results)

    def close(self) -> None:
        self.cache.close()  # the last connection: SQLite folds its write-ahead log into the file


class RemoteCache:
    """``JudgmentCache.lookup`` and ``store`` answered by the cache actor."""

    def __init__(self, server: Any):
        self.server = server

    def lookup(self, model_id: str, prompt_id: str, keys: Sequence[Key], *, failures: bool = False) -> dict:
        import ray

        return ray.get(self.server.lookup.remote(model_id, prompt_id, list(keys), failures))

    def store(self, model_id: str, prompt_id: str, results: Iterable[tuple[Key, Score]]) -> None:
        import ray

        ray.get(self.server.store.remote(model_id, prompt_id, list(results)))


class LazyScorer:
    """The scorer, built on the first batch that misses the cache (a rerun loads no model)."""

    def __init__(self, factory: Callable[[], Scorer], model_id: str):
        self.factory, self.model_id, self._scorer = factory, model_id, None

    def score(self, items: Sequence[Any]) -> list[Score]:
        if self._scorer is None:
            self._scorer = self.factory()
            if self._scorer.model_id != self.model_id:
                raise JudgeError(f"the judge actor loaded {self._scorer.model_id}, expected {self.model_id}")
        return self._scorer.score(items)


class JudgeActor:
    """``map_batches`` callable class: renders the selected pairs' prompts, serves what the cache holds,
    scores the rest (storing each batch), and adds j_margin, j_error, j_content, j_prompt, j_cached."""

    def __init__(
        self,
        factory: Callable[[], Scorer],
        model_id: str,
        cache: Any,
        prompt: Any,
        max_chars: int,
        batch_size: int,
        data_root: str,
    ):
        self.scorer = LazyScorer(factory, model_id)
        self.cache = RemoteCache(cache)
        self.prompts = JudgePrompts(prompt)
        self.max_chars, self.batch_size, self.data_root = max_chars, batch_size, data_root

    def _row(self, batch: pa.Table, i: int, prefix: str, table: str) -> dict[str, Any]:
        row = {c: batch.column(prefix + c)[i].as_py() for c in ROW_COLUMNS[table]}
        row["image"] = resolve_image_cell(row.get("image"), self.data_root)
        return row

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        selected = np.flatnonzero(
            np.asarray(pc.fill_null(batch.column("j_selected"), False).to_numpy(zero_copy_only=False), bool)
        )
        keys, items, prompt_ids = [], [], []
        for i in selected.tolist():
            key, item, pid = render_pair(
                self.prompts,
                self._row(batch, i, "qc_", QUERIES),
                self._row(batch, i, "dc_", CORPUS),
                self.max_chars,
            )
            keys.append(key), items.append(item), prompt_ids.append(pid)
        report = JudgeReport(model_id=self.scorer.model_id, rule="")
        scored = set(
            score_missing(
                self.scorer, self.cache, keys, items, prompt_ids, self.batch_size, report, None, None
            )
        )
        scores = lookup_scores(self.cache, self.scorer.model_id, keys, prompt_ids)
        margin = np.full(n, None, object)
        error, content, prompt, cached = (np.full(n, None, object) for _ in range(4))
        for j, i in enumerate(selected.tolist()):
            margin[i], error[i] = scores[j].margin, scores[j].error
            content[i], prompt[i], cached[i] = keys[j].content, prompt_ids[j], j not in scored
        drop = [c for c in batch.column_names if c.startswith(("qc_", "dc_"))]
        return (
            batch.drop_columns(drop)
            .append_column("j_margin", pa.array(margin.tolist(), pa.float64()))
            .append_column("j_error", strings(error))
            .append_column("j_content", strings(content))
            .append_column("j_prompt", strings(prompt))
            .append_column("j_cached", pa.array(cached.tolist(), pa.bool_()))
        )
