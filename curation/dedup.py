"""Dedup: drop exact and near-duplicate rows, and rows that copy an evaluation dataset.

What counts as a duplicate
    Rows are compared within one table (queries with queries, corpus with corpus) and one subset.
    * exact_duplicate: same normalised text and same image bytes (curation.content_key).
    * near_duplicate_image: same normalised text (or both without text), images near in structure
      AND colour (curation.near_image: 64-bit pHashes at most ``phash_distance`` bits apart, found by
      pigeonhole banding (curation.hamming), never all pairs; and 8x8 colour thumbnails within
      ``COLOUR_DISTANCE`` of 255 in every cell and channel, at the grid that fits the smaller
      picture), AND targets that agree (curation.dedup_targets): two queries only when they have the
      same positive documents, two documents only when no query calls one relevant and the other
      irrelevant. Near copies whose targets disagree are not duplicates but a conflict in the data:
      they are kept, and counted in the stats (``near_duplicate_conflicts``, with examples).
      ``phash_distance`` negative or ``near=False``: no near duplicates at all.
    * contaminated: the row's content (normalised text and image bytes, whatever the subset) equals
      a row of the same table of an ``against`` dataset, or, with near on, has the same text and an
      image near (structure and colour) one of theirs, whatever its answer. Only ``decontaminate``
      tables are checked: queries by default, because corpus documents such as class names are
      shared by design between train and test.

What happens to them
    The first occurrence in dataset order (shard, then row) is kept; the others go to quarantine,
    whole, with the reason and a detail naming the kept row (or the eval row). Pairs that name a
    removed duplicate are rewritten to name the kept row (an exact copy has the same content; a near
    copy a near-identical picture, the same text and the same targets, so no pair comes to state
    what no input row said);
    pairs that thereby become the same (query_id, doc_id) as an earlier pair go to quarantine as
    duplicate_pair; pairs that name a contaminated row go to quarantine as references_removed_row.
    Nothing is lost.

How it runs
    curation.shardstage: scan (per shard, through the executor: read images, sha256, pHash, colour
    thumbnail), plan (in this process, over ids, hashes and thumbnails only: about 350 bytes a row
    at peak, plus the pairs' ids and labels for the targets; curation.dedup_plan), apply (per shard,
    atomic writes). Eval datasets are scanned the same way, through the same executor. A killed
    run resumes to the same output when rerun.

Example::

    from assay.curation.dataset import Dataset
    from assay.curation.dedup import dedup

    manifest = dedup(Dataset("data/train"), "data/train-dedup", against=[Dataset("data/eval")])
    print(manifest.quarantine_reasons)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from assay.curation import storage
from assay.curation.content_key import CONTENT_KEY_VERSION
from assay.curation.dataset import PROGRESS, Dataset, Manifest
from assay.curation.dedup_plan import plan_content_rows, plan_pair_rows
from assay.curation.dedup_rows import EvalRows, as_numpy
from assay.curation.dedup_scan import ROW_SCAN_SCHEMA, eval_scan_task, scan_shard
from assay.curation.dedup_targets import attach_targets, item_keys, pair_targets
from assay.curation.executor import Executor, LocalExecutor
from assay.curation.hamming import MAX_DISTANCE
from assay.curation.near_image import COLOUR_DISTANCE, GRID
from assay.curation.schema import CORPUS, PAIRS, QUERIES
from assay.curation.shardstage import PLAN_SCHEMA, Scan, read_scans, run_shard_stage, split_by_shard

STAGE = "dedup"
CONTENT_TABLES = (QUERIES, CORPUS)
DEFAULT_DECONTAMINATE = (QUERIES,)


def _plan_part(part: pa.Table) -> pa.Table:
    return part.select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA)


class _Planner:
    """The plan step of dedup (a callable for run_shard_stage). Scans the eval datasets through the
    executor first (resumable, like the main scan), then decides every row from ids and hashes."""

    def __init__(
        self,
        out: Path,
        *,
        near: bool,
        distance: int,
        against: list[Dataset],
        decontaminate: tuple[str, ...],
        config: dict[str, Any],
        executor: Executor,
    ):
        self.out, self.near, self.distance = out, near, distance
        self.against, self.decontaminate = against, decontaminate
        self.config, self.executor = config, executor
        self.stats: dict[str, Any] = {}

    def _eval_rows(self) -> dict[str, EvalRows]:
        if not self.against:
            return {}
        progress = self.out / PROGRESS / "eval-scan"
        scans: dict[tuple[int, str], list[tuple[str, Path]]] = {}
        tasks = []
        for k, ev in enumerate(self.against):
            for table in self.decontaminate:
                scans[(k, table)] = []
                for name in ev.shards(table):
                    scan_out = progress / f"{k:02d}" / table / name
                    scans[(k, table)].append((name, scan_out))
                    if not scan_out.exists():
                        tasks.append(
                            {
                                "table": table,
                                "shard": name,
                                "src": str(ev.shard_path(table, name)),
                                "data_root": storage.absolute(ev.data_root),
                                "config": self.config,
                                "scan_out": str(scan_out),
                            }
                        )
        if tasks:
            self.executor.map(eval_scan_task, tasks, desc=f"{STAGE}: scan eval")
        return {
            table: EvalRows(
                [
                    (str(ev.root), read_scans(scans[(k, table)], columns=ROW_SCAN_SCHEMA.names))
                    for k, ev in enumerate(self.against)
                    if scans[(k, table)]
                ]
            )
            for table in self.decontaminate
        }

    def _targets(self, scans: dict[str, list[tuple[str, Scan]]]) -> dict[str, pa.Table]:
        """What the pairs say each query and document is about (curation.dedup_targets)."""
        p_scans = scans.get(PAIRS, [])
        if not self.near or not p_scans:
            return {}
        keys = {}
        for table in CONTENT_TABLES:
            t_scans = scans.get(table, [])
            side = read_scans(t_scans, columns=["id", "subset", "key_a", "key_b"]) if t_scans else None
            if side is None or side.num_rows == 0:
                keys[table] = (pa.array([], pa.string()), np.zeros(0, np.uint64))
                continue
            a, b = (as_numpy(side.column(c), np.uint64) for c in ("key_a", "key_b"))
            ids = side.column("id").combine_chunks().cast(pa.string())
            keys[table] = (ids, item_keys(side.column("subset"), a, b))
        pairs = read_scans(p_scans, columns=["query_id", "doc_id", "label"])
        return pair_targets(pairs, keys[QUERIES], keys[CORPUS])

    def __call__(self, scans: dict[str, list[tuple[str, Scan]]]) -> dict[tuple[str, str], pa.Table]:
        evals = self._eval_rows()
        targets = self._targets(scans)
        plans: dict[tuple[str, str], pa.Table] = {}
        content: dict[str, tuple[pa.Array, np.ndarray]] = {}
        for table in CONTENT_TABLES:
            t_scans = scans.get(table, [])
            side = read_scans(t_scans, columns=ROW_SCAN_SCHEMA.names) if t_scans else pa.table({})
            decisions, canon, stats, _ = plan_content_rows(
                table,
                attach_targets(side, targets.get(table)) if side.num_rows else side,
                evals.get(table),
                near=self.near,
                distance=self.distance,
                text_only=self.config["decontaminate_text_only"],
            )
            plans.update(split_by_shard(decisions, t_scans, table, _plan_part))
            ids = side.column("id").combine_chunks() if side.num_rows else pa.array([], pa.string())
            content[table] = (ids, canon)
            self.stats[table] = stats
        p_scans = scans.get(PAIRS, [])
        if p_scans:
            decisions, stats = plan_pair_rows(
                read_scans(p_scans, columns=["row", "query_id", "doc_id"]),
                [name for name, _ in p_scans],
                content,
            )
            plans.update(split_by_shard(decisions, p_scans, PAIRS, _plan_part))
            self.stats[PAIRS] = stats
        return plans


def _tables(decontaminate: str | Iterable[str]) -> tuple[str, ...]:
    items = decontaminate.split(",") if isinstance(decontaminate, str) else list(decontaminate)
    tables = tuple(dict.fromkeys(t.strip() for t in items if t.strip()))
    bad = [t for t in tables if t not in CONTENT_TABLES]
    if bad:
        raise ValueError(
            f"decontaminate: unknown table(s) {', '.join(map(repr, bad))}; "
            f"choose from {', '.join(CONTENT_TABLES)}"
        )
    return tuple(t for t in CONTENT_TABLES if t in tables)


def dedup_config(
    source: Dataset,
    out: str | os.PathLike,
    *,
    near: bool = True,
    phash_distance: int = 4,
    against: Iterable[Dataset | str | os.PathLike] = (),
    decontaminate: str | Iterable[str] = DEFAULT_DECONTAMINATE,
    decontaminate_text_only: bool = True,
) -> tuple[dict[str, Any], list[Dataset]]:
    """The settings of a dedup run as its manifest records them, checked, and the eval datasets
    (arguments as for ``dedup``). ``config["near"]`` says whether near duplicates are looked for,
    ``config["phash_distance"]`` within how many bits, ``config["decontaminate"]`` which tables."""
    near = bool(near) and phash_distance is not None and phash_distance >= 0
    if near and phash_distance > MAX_DISTANCE:
        raise ValueError(
            f"phash_distance {phash_distance} is too large: use 0 to {MAX_DISTANCE} (unrelated "
            "images are about 32 bits apart; 4 to 10 catches resized or re-encoded copies)"
        )
    evals = [a if isinstance(a, Dataset) else Dataset(a) for a in against]
    tables = _tables(decontaminate) if evals else ()
    for ev in evals:
        if storage.absolute(ev.root) in (storage.absolute(source.root), storage.absolute(out)):
            raise ValueError(
                f"{ev.root}: an eval dataset to decontaminate against must not be the "
                "dataset being deduplicated or the output"
            )
    config = {
        "content_key_version": CONTENT_KEY_VERSION,
        "near": near,
        "phash": "imagehash.phash 8x8 (64 bits)" if near else None,
        "phash_distance": int(phash_distance) if near else None,
        "colour": f"{GRID}x{GRID} RGB thumbnail, cells of >= 4x4 pixels" if near else None,
        "colour_distance": COLOUR_DISTANCE if near else None,
        "near_targets": "queries: same positive documents; corpus: no query tells them apart"
        if near
        else None,
        "against": [ev.parent_ref() for ev in evals],
        "decontaminate": list(tables),
        "decontaminate_text_only": bool(decontaminate_text_only),
    }
    return config, evals


def dedup(
    source: Dataset,
    out: str | os.PathLike,
    *,
    near: bool = True,
    phash_distance: int = 4,
    against: Iterable[Dataset | str | os.PathLike] = (),
    decontaminate: str | Iterable[str] = DEFAULT_DECONTAMINATE,
    decontaminate_text_only: bool = True,
    executor: Executor | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write ``source`` without duplicates (and without rows copied from ``against``) to ``out``.

    Args:
        source: the dataset to deduplicate.
        out: the new dataset's directory; a killed run there resumes when called again alike.
        near: find near-duplicate images (pHash). Off as well when ``phash_distance`` is negative.
        phash_distance: the most bits two pHashes may differ in to count as near duplicates (0 to 16).
        against: evaluation datasets; training rows whose content matches one of their rows are removed.
        decontaminate: the tables checked against them ("queries", "corpus", or both).
        decontaminate_text_only: also count rows without an image as contaminated. Turn it off where
            train and eval share short label-like texts by design (easy-vqa's retrieval queries such
            as "a blue circle"), so that only rows carrying an image are checked.
        executor: runs the per-shard scan and write tasks (default: LocalExecutor, in process).
        overwrite: replace whatever ``out`` holds.

    Returns:
        The manifest of the new dataset; ``manifest.extra["dedup"]`` has counts per table.
    """
    config, evals = dedup_config(
        source,
        out,
        near=near,
        phash_distance=phash_distance,
        against=against,
        decontaminate=decontaminate,
        decontaminate_text_only=decontaminate_text_only,
    )
    near, tables, out = config["near"], tuple(config["decontaminate"]), storage.path(out)
    executor = executor or LocalExecutor()
    planner = _Planner(
        out,
        near=near,
        distance=config["phash_distance"] if near else 0,
        against=evals,
        decontaminate=tables,
        config=config,
        executor=executor,
    )
    # The planner fills planner.stats before the manifest is written.
    return run_shard_stage(
        source,
        out,
        stage=STAGE,
        config=config,
        scan_fn=scan_shard,
        plan_fn=planner,
        executor=executor,
        overwrite=overwrite,
        extra={STAGE: planner.stats},
    )
