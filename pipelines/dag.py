"""The curation DAG: validate -> dedup -> judge -> filter as one Ray Data pipeline, one output dataset.

``run_curation_dag(source, out, judge_model=..., where=...)`` writes the dataset that ``assay validate``,
``assay dedup``, ``assay judge`` and ``assay filter`` write when run one after the other: the same rows
in the same shards, and the same refused rows in the quarantine with the same stage and reason (in
files of the same names), without the three datasets in between. Every decision is taken by the
stage's own code in curation/; this module wires them into Ray Data operators (what each operator
runs is in pipelines/dag_steps.py and dag_targets.py, the judge's actor pool in pipelines/dag_judge.py):

=========  ==============================================================  ================================
step       Ray Data operators                                              decided by (curation/)
=========  ==============================================================  ================================
read       ``from_items(shards).map_batches``: one task per input shard    validate.check_rows (row checks),
                                                                           dedup_scan.scan_rows,
                                                                           filter.keep_mask
validate   ``groupby(hash of id).map_groups``: duplicate and conflicting   validate.item_decisions,
           ids; pairs: joins on query_id and doc_id with the kept ids       validate.pair_decisions
targets    the validated pairs' target rows joined with the query and      dedup_targets.targets_by_owner,
           corpus rows by id (``groupby(hash of table + id)``)              attach_targets
dedup      ``groupby(hash of subset + text key).map_groups``: exact, near   dedup.plan_content_rows (eval
           and eval copies; pairs: joins with the canonical rows, then     rows broadcast), plan_pair_rows
           ``groupby(hash of canonical query)``
judge      joins with the canonical query and doc rows, then                judge.stage.render_pair,
           ``map_batches`` on an actor pool (``ActorPoolStrategy``, one     score_missing (cache first),
           scorer per actor, ``num_gpus`` per actor when the cluster has     lookup_scores
           GPUs); the judgment cache is one actor all of them share
verdicts   ``map_batches`` (the unime rule: ``groupby(hash of query)``)     judge.stage.apply_verdicts
filter     in the read (queries, corpus) and after the verdicts (pairs)     filter.keep_mask,
                                                                           pair_filter_reasons
write      ``groupby(table, shard).map_groups``: one output shard per       shardstage.apply_plan, ShardSink
           input shard, atomically, then its completion marker
=========  ==============================================================  ================================

A join here is a partitioned join: both sides get a partition number from a stable hash of the key,
are unioned, and ``groupby(partition).map_groups`` joins each partition in memory. (Ray Data's
``Dataset.join`` starts aggregator actors for every join, 12-18 s each on a 2-CPU machine; a sort-based
groupby takes under a second.) A partition holds every row of the keys it holds, which is all that
each curation function asks of its input (see their docstrings). Only ids, hashes and decisions cross
the shuffles, except the judge's inputs (the rows of the pairs it judges); the write reads each input
shard again and applies the decisions, so no image is shuffled to be written. The driver never holds
the dataset's rows: it holds the shard names, the eval datasets' hashes (``against``) and a few
counts per shard.

What differs from the four commands: the output is one dataset (stage ``curate``, its config holding
each step's), so the manifest's reasons read ``curate:<stage>:<reason>``; a quarantined row's
``source`` names the input shard and row (the intermediate datasets do not exist), and so does the
detail of a duplicate_pair; ``judge_failures.parquet`` is kept in the output. ``prune`` and
``keep_negatives`` are not offered.

Resuming: an output shard is written (data, quarantine files, then its marker) only when the whole
pipeline has decided it; a rerun after a kill recomputes the decisions (the judge reads its cache, so
nothing is scored twice) and writes only the shards without a marker. A rerun of a finished run does
nothing and starts nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assay.curation.dataset import AlreadyComplete, Dataset, DatasetWriter, Manifest, atomic_write_parquet
from assay.curation.dedup import CONFLICTS, DEFAULT_DECONTAMINATE, dedup_config, eval_rows
from assay.curation.dedup import STAGE as DEDUP
from assay.curation.filter import filter_targets
from assay.curation.filter_expr import Filter, parse_filter
from assay.curation.judge.scoring import Scorer
from assay.curation.judge.stage import FAILURES_FILE, JudgeError, JudgePrompts
from assay.curation.judge.verdicts import VerdictRule, parse_rule
from assay.curation.schema import CORPUS, DATA_TABLES, LABELS, PAIRS, QUERIES
from assay.curation.validate import STAGE as VALIDATE
from assay.curation.validate import ValidateConfig
from assay.pipelines.dag_judge import CacheServer, JudgeActor
from assay.pipelines.dag_steps import (
    PART,
    SIDE,
    STAGE,
    CurateRun,
    attach_docs,
    decide_items,
    dedup_items,
    dedup_pairs,
    dedup_partition,
    finish_pairs,
    id_map,
    join_ids,
    scan_content,
    scan_eval,
    scan_items,
    scan_pairs,
    tag_partition,
    validate_ids,
    validate_pairs,
    write_shard,
)
from assay.pipelines.dag_targets import item_targets, join_valid, pair_target_rows, valid_map

JUDGE = "judge"
FILTER = "filter"
#: Rows per hash partition the shuffles aim at (ids, hashes and decisions: ~150 bytes a row).
ROWS_PER_PARTITION = 500_000


def run_curation_dag(
    source: Dataset | str | os.PathLike,
    out: str | os.PathLike,
    *,
    judge_model: str | os.PathLike | Callable[[], Scorer] | None = None,
    rule: str | VerdictRule = "paper",
    where: str | None = None,
    against: Iterable[Dataset | str | os.PathLike] = (),
    ray_address: str | None = None,
    num_cpus: int | None = None,
    validate_config: ValidateConfig | None = None,
    near: bool = True,
    phash_distance: int = 4,
    decontaminate: str | Iterable[str] = DEFAULT_DECONTAMINATE,
    decontaminate_text_only: bool = True,
    judge_backend: str = "transformers",
    judge_model_id: str | None = None,
    prompt: str | os.PathLike | None = None,
    labels: Sequence[str] = LABELS,
    batch_size: int = 32,
    max_chars: int = 2000,
    device: str = "auto",
    trust_remote_code: bool = False,
    cache: str | os.PathLike | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    table: str | None = None,
    partitions: int | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Validate, dedup, judge and filter ``source`` in one Ray Data pipeline; write the result to ``out``.

    Args:
        source: the dataset to curate.
        out: the new dataset's directory; a killed run there resumes when called again alike.
        judge_model: a model directory (an assay reranker checkpoint or a transformers / vLLM model),
            or a zero-argument function building a ``Scorer`` (named by ``judge_model_id``, or by
            the function's ``model_id`` attribute). None: no judge step.
        rule: the verdict rule (``paper``, ``unime:BETA``, ``threshold:T``).
        where: a filter expression (curation.filter_expr), applied to ``table`` only when given.
            None: no filter step.
        against: evaluation datasets to decontaminate against; ``decontaminate``: the tables
            checked; ``decontaminate_text_only``: rows without an image can be contaminated too.
        ray_address: an existing Ray cluster (``ray://head:10001``, ``auto``); None: a local Ray with
            ``num_cpus`` CPUs (default: all).
        validate_config: validate's limits. ``near``, ``phash_distance``: dedup's near duplicates.
        judge_backend, prompt, labels, batch_size, max_chars, device, trust_remote_code: as for
            ``assay judge``. ``cache``: the judgment cache (default ``$ASSAY_CACHE_DIR`` or
            ~/.cache/assay/judgments.sqlite), a path on this machine.
        actors, gpus_per_actor: the judge's actor pool; by default one actor per GPU (``num_gpus=1``
            each) when the cluster has GPUs, else one actor on CPUs.
        partitions: hash partitions of the shuffles (default: the cluster's CPUs, more for large data).
        overwrite: replace whatever ``out`` holds.

    Returns:
        The manifest of the new dataset; ``extra`` has each step's counts.

    Example::

        manifest = run_curation_dag("runs/raw", "runs/clean", against=["runs/eval"],
                                    judge_model="runs/reranker/step-000300", where="judge_verdict == 'no'")
    """
    src = source if isinstance(source, Dataset) else Dataset(source)
    vcfg = validate_config or ValidateConfig()
    if min(vcfg.max_pixels, vcfg.max_text_chars, vcfg.max_image_bytes) <= 0:
        raise ValueError("validate limits must be positive")
    dcfg, evals = dedup_config(
        src,
        out,
        near=near,
        phash_distance=phash_distance,
        against=against,
        decontaminate=decontaminate,
        decontaminate_text_only=decontaminate_text_only,
    )
    flt = parse_filter(where) if where is not None else None
    targets = filter_targets(flt, table) if flt is not None else ()
    rule = rule if isinstance(rule, VerdictRule) else parse_rule(rule)
    judge = None
    if judge_model is not None:
        judge = _judge_setup(judge_model, judge_backend, judge_model_id, labels, rule, prompt, batch_size)
        judge["factory"] = judge["factory"] or _model_factory(
            str(judge_model),
            judge_backend,
            device,
            batch_size,
            trust_remote_code,
            str(src.data_root.resolve()),
        )
    config = {
        "validate": vcfg.to_dict(),
        "dedup": dcfg,
        # the keys `assay judge` and `assay filter` record
        "judge": judge
        and {
            "judge_model": judge["model_id"],
            "prompt": judge["prompt_id"],
            "rule": str(rule),
            "labels": sorted(labels),
            "max_chars": max_chars,
            "relabel": True,
            "keep_negatives": None,
        },
        "filter": flt and {"where": flt.text, "table": table, "prune": False},
    }
    data_root = str(src.data_root.resolve())
    try:
        writer = DatasetWriter(
            out, stage=STAGE, config=config, parents=[src], data_root=data_root, overwrite=overwrite
        )
    except AlreadyComplete as done:
        print(f"curate: {done}", file=sys.stderr)
        return done.manifest
    run = CurateRun(
        source_root=str(src.root.resolve()),
        source_name=src.root.name,
        data_root=data_root,
        out=str(writer.root),
        depth=len(writer.lineage_of_parents()),
        names={t: src.shards(t) for t in DATA_TABLES},
        validate=vcfg,
        near=dcfg["near"],
        distance=dcfg["phash_distance"] if dcfg["near"] else 0,
        text_only=dcfg["decontaminate_text_only"],
        parts=partitions or 1,
        where=flt and flt.text,
        targets=tuple(targets),
        judge=judge is not None,
        labels=tuple(labels),
        rule=rule,
    )
    todo = [(t, n) for t, names in run.names.items() for n in names if not writer.is_done(t, n)]
    if todo:
        from assay.pipelines.executors import RayExecutor

        RayExecutor(address=ray_address, num_cpus=num_cpus)._init()
        start = time.perf_counter()
        with _data_context():
            _execute(
                run,
                src,
                evals,
                tuple(dcfg["decontaminate"]),
                dcfg,
                judge,
                partitions=partitions,
                cache=cache,
                pool={"prompt": prompt, "max_chars": max_chars, "batch_size": batch_size},
                actors=actors,
                gpus_per_actor=gpus_per_actor,
            )
        print(f"curate: {len(todo)} output shard(s) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    failures = sorted((writer.progress_dir / "judge_failures").glob("*.parquet"))
    if failures:
        atomic_write_parquet(
            writer.root / FAILURES_FILE, pa.concat_tables([pq.read_table(f) for f in failures])
        )
    return writer.finish(extra=_summary(writer.markers(), judge, rule, flt, targets))


def _judge_setup(
    judge_model: Any,
    backend: str,
    model_id: str | None,
    labels: Sequence[str],
    rule: VerdictRule,
    prompt: Any,
    batch_size: int,
) -> dict[str, Any]:
    """The judge's model id and prompt id, its settings checked as judge_dataset checks them (the
    factory too when the judge is given as one)."""
    bad = sorted(set(labels) - set(LABELS))
    if bad or not labels:
        raise JudgeError(f"labels to judge must be among {', '.join(LABELS)}; got {list(labels)}")
    if batch_size < 1:
        raise JudgeError("batch_size must be at least 1")
    if rule.needs_positive and "positive" not in labels:
        raise JudgeError("the unime rule compares with the query's positive: include 'positive' in labels")
    prompts = JudgePrompts(prompt)
    prompt_id = prompts.fixed.id if prompts.fixed else "per-task-family"
    if callable(judge_model):
        model_id = model_id or getattr(judge_model, "model_id", None)
        if not model_id:
            raise JudgeError("a judge given as a function needs judge_model_id (the model and weights' name)")
        return {"factory": judge_model, "model_id": model_id, "prompt_id": prompt_id}
    if backend not in ("transformers", "vllm"):
        raise JudgeError(f"judge backend {backend!r}: choose transformers or vllm")
    if not Path(judge_model).is_dir():
        raise JudgeError(f"{judge_model} is not a model directory (models are never downloaded)")
    from assay.curation.judge.scoring import model_id_for

    return {"factory": None, "model_id": model_id or model_id_for(judge_model), "prompt_id": prompt_id}


def _model_factory(
    path: str, backend: str, device: str, batch_size: int, trust_remote_code: bool, image_root: str
) -> Callable[[], Scorer]:
    """What each judge actor calls to load the model: `assay judge`'s own loader."""
    from assay.pipelines.commands.judge import scorer_factory

    return scorer_factory(
        backend,
        path,
        device=device,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        image_root=image_root,
    )


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data settings for this pipeline, restored afterwards."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    settings = {
        "enable_progress_bars": sys.stderr.isatty(),
        "print_on_execution_start": False,
        "enable_auto_log_stats": False,
        # Many operators share few CPUs; per-operator reservations left them one task at a time.
        "op_resource_reservation_enabled": False,
        # Sort-based shuffles: the hash shuffle starts aggregator actors for every operator.
        "shuffle_strategy": ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
    }
    saved = {k: getattr(ctx, k) for k in settings}
    for k, v in settings.items():
        setattr(ctx, k, v)
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


# ---------------------------------------------------------------------------------------------------
# the operators


def _execute(
    run: CurateRun,
    src: Dataset,
    evals: list[Dataset],
    decontaminate: tuple[str, ...],
    dcfg: dict[str, Any],
    judge: dict[str, Any] | None,
    *,
    partitions: int | None,
    cache: str | os.PathLike | None,
    pool: dict[str, Any],
    actors: int | None,
    gpus_per_actor: float | None,
) -> None:
    import ray

    resources = ray.cluster_resources()
    rows = sum(src.num_rows(t) for t in DATA_TABLES)
    cpus = int(resources.get("CPU", 1))
    run = CurateRun(
        **{**vars(run), "parts": partitions or max(1, cpus, math.ceil(rows / ROWS_PER_PARTITION))}
    )
    decisions = []
    # validate: queries and corpus (duplicate and conflicting ids), then the pairs (ids that name no
    # kept row); both kept in the object store: dedup's targets and the pairs' dedup use them
    valid = _valid_items(run)
    pairs = _valid_pairs(run, valid)
    # dedup of queries and corpus, with what the validated pairs say each row is about
    items = None
    if valid is not None:
        evals_hashes = _eval_hashes(evals, decontaminate, dcfg) if evals else {}
        items = _dedup_items(run, valid, pairs, evals_hashes, decontaminate)
        decisions.append(items.map_batches(decide_items, fn_kwargs={"run": run}, batch_format="pyarrow"))
    cache_server = _start_cache(cache) if judge is not None else None
    try:
        if pairs is not None:
            decisions.append(
                _pairs(run, pairs, items, judge, cache_server, resources, pool, actors, gpus_per_actor)
            )
        if not decisions:
            return
        merged = decisions[0] if len(decisions) == 1 else decisions[0].union(decisions[1])
        written = merged.groupby(["_t", "_shard"]).map_groups(
            write_shard, fn_kwargs={"run": run}, batch_format="pyarrow"
        )
        written.materialize()
    finally:
        if cache_server is not None:
            with contextlib.suppress(Exception):
                ray.get(cache_server.close.remote())
            ray.kill(cache_server)


def _valid_items(run: CurateRun) -> Any:
    """Queries and corpus: read and check, duplicate and conflicting ids (by id); materialized.
    None when there are no shards."""
    items = _read(run, (QUERIES, CORPUS), scan_items)
    if items is None:
        return None
    return _partitioned(items, ["_t", "id"], run.parts, validate_ids, run=run, valid="_ok").materialize()


def _valid_pairs(run: CurateRun, valid: Any) -> Any:
    """Pairs: read and check, joined with what validate says of their ids (unknown, conflicting,
    the content identity of a kept row); materialized. None when there are no pair shards."""
    pairs = _read(run, (PAIRS,), scan_pairs)
    if pairs is None:
        return None
    for column, table, prefix in (("query_id", QUERIES, "qv_"), ("doc_id", CORPUS, "dv_")):
        ids = (
            None
            if valid is None
            else valid.map_batches(valid_map, fn_kwargs={"table": table}, batch_format="pyarrow")
        )
        pairs = _partitioned(
            pairs, [column], run.parts, join_valid, right=ids, right_on=["id"], column=column, prefix=prefix
        )
    return pairs.map_batches(validate_pairs, batch_format="pyarrow").materialize()


def _dedup_items(
    run: CurateRun, valid: Any, pairs: Any, evals: dict[str, Any], decontaminate: tuple[str, ...]
) -> Any:
    """Queries and corpus: their targets from the validated pairs (by id), then dedup (by subset and
    text): one decided row each (``dag_steps.dedup_items``), materialized."""
    items = valid
    if run.near and pairs is not None:
        targets = pairs.map_batches(pair_target_rows, batch_format="pyarrow")
        items = _partitioned(
            items, ["_t", "id"], run.parts, item_targets, right=targets, right_on=["_t", "id"]
        )
    items = items.map_batches(dedup_partition, fn_kwargs={"run": run}, batch_format="pyarrow")
    items = items.groupby(PART).map_groups(
        dedup_items, fn_kwargs={"run": run, "evals": evals, "tables": decontaminate}, batch_format="pyarrow"
    )
    return items.materialize()


def _pairs(
    run: CurateRun,
    pairs: Any,
    items: Any,
    judge: dict[str, Any] | None,
    cache_server: Any,
    resources: dict[str, float],
    pool: dict[str, Any],
    actors: int | None,
    gpus_per_actor: float | None,
) -> Any:
    """Validated pairs joined with the id maps of queries and corpus (canonical rows), dedup by
    canonical query (with the query rows to judge), the doc rows to judge, the judge pool, then
    verdicts and the filter: one decision row each."""
    for column, table, prefix in (("query_id", QUERIES, "q_"), ("doc_id", CORPUS, "d_")):
        ids = (
            None
            if items is None
            else items.map_batches(id_map, fn_kwargs={"table": table}, batch_format="pyarrow")
        )
        pairs = _partitioned(
            pairs, [column], run.parts, join_ids, right=ids, right_on=["id"], column=column, prefix=prefix
        )
    position = ["_shard", "_row"]
    queries = _read(run, (QUERIES,), scan_content) if judge else None
    pairs = _partitioned(
        pairs, ["q_canon_shard", "q_canon_row"], run.parts, dedup_pairs, right=queries, right_on=position,
        valid="_ok", run=run,
    )  # fmt: skip
    if judge is None:
        return pairs.map_batches(finish_pairs, fn_kwargs={"run": run}, batch_format="pyarrow")
    docs = _read(run, (CORPUS,), scan_content)
    pairs = _partitioned(
        pairs, ["d_canon_shard", "d_canon_row"], run.parts, attach_docs, right=docs, right_on=position,
        valid="j_selected",
    )  # fmt: skip
    pairs = _judge_pool(pairs, judge, cache_server, resources, run, pool, actors, gpus_per_actor)
    if run.rule.needs_positive:  # unime compares a pair with its query's positive: a query's pairs together
        return _partitioned(pairs, ["final_query_id"], run.parts, finish_pairs, valid="j_selected", run=run)
    return pairs.map_batches(finish_pairs, fn_kwargs={"run": run}, batch_format="pyarrow")


def _read(run: CurateRun, tables: Sequence[str], fn: Callable[..., pa.Table]) -> Any:
    """One Ray task per input shard of ``tables``; None when there are none."""
    import ray.data

    tasks = [{"table": t, "shard": i} for t in tables for i in range(len(run.names[t]))]
    if not tasks:
        return None
    return ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
        fn, batch_size=1, batch_format="pyarrow", fn_kwargs={"run": run}
    )


def _judge_pool(
    pairs: Any,
    judge: dict[str, Any],
    cache_server: Any,
    resources: dict[str, float],
    run: CurateRun,
    pool: dict[str, Any],
    actors: int | None,
    gpus_per_actor: float | None,
) -> Any:
    """The judge step: ``map_batches`` on an actor pool, one scorer per actor, on GPUs when there are."""
    import ray.data

    gpus = float(resources.get("GPU", 0))
    per = (1.0 if gpus_per_actor is None else float(gpus_per_actor)) if gpus > 0 else 0.0
    n = actors or (max(1, int(gpus // per)) if per > 0 else 1)
    where = f"{per:g} GPU each" if per > 0 else "on CPUs"
    print(f"curate: judge {judge['model_id']} in {n} actor(s), {where}", file=sys.stderr)
    return pairs.map_batches(
        JudgeActor,
        fn_constructor_kwargs={
            "factory": judge["factory"],
            "model_id": judge["model_id"],
            "cache": cache_server,
            "data_root": run.data_root,
            **pool,
        },
        compute=ray.data.ActorPoolStrategy(size=n),
        batch_size=max(pool["batch_size"] * 4, 64),
        batch_format="pyarrow",
        num_cpus=1,
        **({"num_gpus": per} if per > 0 else {}),
    )


def _start_cache(path: str | os.PathLike | None) -> Any:
    """The judgment cache's actor, on this (the driver's) node so that the path means what it says."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from assay.curation.judge.cache import default_cache_path

    options: dict[str, Any] = {"num_cpus": 0}
    with contextlib.suppress(Exception):  # a Ray client has no node of its own: then anywhere
        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    return ray.remote(CacheServer).options(**options).remote(str(path or default_cache_path()))


def _eval_hashes(evals: list[Dataset], tables: Sequence[str], config: dict[str, Any]) -> dict[str, Any]:
    """dedup's scan of the eval datasets (a Ray Data job, one task per shard), as ``dedup.eval_rows``
    per table. Eval sets are small next to training data: their hashes go to every dedup partition."""
    import ray
    import ray.data

    tasks = [
        {
            "eval": k,
            "table": t,
            "shard_index": i,
            "src": str(ev.shard_path(t, name)),
            "data_root": str(ev.data_root.resolve()),
        }
        for k, ev in enumerate(evals)
        for t in tables
        for i, name in enumerate(ev.shards(t))
    ]
    blocks = []
    if tasks:
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        ds = ds.map_batches(scan_eval, batch_size=1, batch_format="pyarrow", fn_kwargs={"config": config})
        blocks = [b for b in ray.get(ds.to_arrow_refs()) if b.num_rows]
    every = pa.concat_tables(blocks) if blocks else None
    out = {}
    for t in tables:
        parts = []
        for k, ev in enumerate(evals):
            if not ev.shards(t):
                continue  # as dedup: an eval dataset without the table is no part
            side = pa.table({})
            if every is not None:
                mine = pc.and_(pc.equal(every.column("eval"), k), pc.equal(every.column("table"), t))
                side = every.filter(mine).sort_by([("shard", "ascending"), ("row", "ascending")])
            parts.append((str(ev.root), side))
        out[t] = eval_rows(parts)
    return out


# ---------------------------------------------------------------------------------------------------
# partitioned joins: hash, union, groupby(partition).map_groups


def _partitioned(
    left: Any,
    on: list[str],
    parts: int,
    fn: Callable[..., pa.Table],
    *,
    right: Any | None = None,
    right_on: list[str] = (),
    valid: str | None = None,
    **kwargs: Any,
) -> Any:
    """Partition ``left`` rows by a stable hash of ``on`` (rows whose ``valid`` column is false, or
    with a null key, anywhere) and ``right`` rows by ``right_on``, then run ``fn(left, right, **kwargs)``
    on every partition; ``right`` arrives with its columns named ``_r_<name>`` (None when it has none)."""
    ds = left.map_batches(
        tag_partition,
        fn_kwargs={"keys": on, "parts": parts, "side": 0, "valid": valid},
        batch_format="pyarrow",
    )
    if right is not None:
        right = right.map_batches(
            _right, fn_kwargs={"keys": list(right_on), "parts": parts}, batch_format="pyarrow"
        )
        ds = ds.union(right)
    return ds.groupby(PART).map_groups(_split_then, fn_kwargs={"fn": fn, **kwargs}, batch_format="pyarrow")


def _right(batch: pa.Table, keys: list[str], parts: int) -> pa.Table:
    batch = batch.rename_columns([f"_r_{c}" for c in batch.column_names])
    return tag_partition(batch, [f"_r_{k}" for k in keys], parts, side=1)


def _split_then(group: pa.Table, fn: Callable[..., pa.Table], **kwargs: Any) -> pa.Table:
    side = np.asarray(group.column(SIDE).to_numpy(zero_copy_only=False))
    right_cols = [c for c in group.column_names if c.startswith("_r_")]
    left = group.filter(pa.array(side == 0)).drop_columns([PART, SIDE, *right_cols])
    right = group.filter(pa.array(side == 1)).select(right_cols) if (side == 1).any() else None
    return fn(left, right, **kwargs)


# ---------------------------------------------------------------------------------------------------
# the manifest's counts


def _summary(
    markers: list[dict[str, Any]],
    judge: dict[str, Any] | None,
    rule: VerdictRule,
    flt: Filter | None,
    targets: Sequence[str],
) -> dict[str, Any]:
    """Each step's counts, added up from the shard markers."""
    steps: dict[str, Counter[str]] = {VALIDATE: Counter(), DEDUP: Counter()}
    kept: Counter[str] = Counter()
    dropped: dict[str, Counter[str]] = {t: Counter() for t in DATA_TABLES}
    report: dict[str, Any] = dict.fromkeys(
        ("selected", "scored", "cached", "failed", "relabelled", "positives_judged_no", "unime_fallbacks"), 0
    )
    report |= {"verdicts": Counter(), "prompts": set()}
    for m in markers:
        for key, n in m.get("reasons", {}).items():
            step, _, reason = key.partition(":")
            steps[step][reason] += n
        steps[DEDUP][CONFLICTS] += m.get(CONFLICTS, 0)
        kept[m["table"]] += m.get("kept", m.get("rows", 0))
        dropped[m["table"]].update(m.get("dropped", {}))
        for k, v in m.get(JUDGE, {}).items():
            if k in ("verdicts", "prompts"):
                report[k].update(v)
            else:
                report[k] += v
    extra: dict[str, Any] = {step: dict(sorted(c.items())) for step, c in steps.items()}
    if judge is not None:
        report |= {"verdicts": dict(sorted(report["verdicts"].items())), "prompts": sorted(report["prompts"])}
        extra[JUDGE] = {"model_id": judge["model_id"], "rule": str(rule), **report}
    if flt is not None:
        extra[FILTER] = {
            "where": flt.text,
            "applied_to": list(targets),
            "kept": dict(kept),
            "dropped": {t: dict(c) for t, c in dropped.items() if c},
        }
    return extra
