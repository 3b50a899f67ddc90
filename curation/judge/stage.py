"""The judge stage: score (query, doc) pairs with an MLLM judge and write its verdicts into a new dataset.

``judge_dataset(source, out, scorer)`` works in two passes over the pairs, shard by shard:

1. **score**: render the judge prompt of every selected pair (the template of its task family, or
   the one given), look it up in the judgment cache, and send only the misses to the scorer, in
   batches; each finished batch is committed to the cache at once. A kill loses at most the batch in
   flight, and a rerun scores exactly the pairs still missing.
2. **write**: each pairs shard again, now with ``judge_p_yes`` and ``judge_verdict`` from the cache,
   written atomically. The verdict rule (``verdicts.py``) may need every pair of a query at once
   (UniME-V2 compares a candidate with the query's positive), which is why scoring finishes first.

A non-positive pair judged "yes" is relabelled ``false_negative`` (DESIGN.md: judged relevant though
not gold); gold positives keep their label whatever the verdict (the disagreement is counted). Pairs
whose label is not selected pass through untouched. A pair the judge could not score (a broken
image, a timeout, a NaN) keeps empty judge columns and goes into ``judge_failures.parquet`` beside
the tables with its error; the run never stops for one pair. Queries and corpus are linked, not copied.

The manifest's ``extra.judge`` records the judge's model id, the prompt ids, the rule and the counts
(judged, from cache, failed, yes/no, relabelled). Given a truth (``truth=``, ``curation.truth``),
pass 2 also measures the verdicts against it, over every judged pair before any is trimmed
(``quality.JudgeQuality``: AUC of p_yes, precision and recall of the false negatives, agreement with
gold), into ``extra.judge.quality``. The truth is only read to measure: it never changes a label.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from assay.curation import storage
from assay.curation.dataset import AlreadyComplete, Dataset, DatasetWriter, Manifest, atomic_write_parquet
from assay.curation.judge.cache import JudgmentCache, Key, content_hash
from assay.curation.judge.prompts import PromptTemplate, family_for_task, images_of, load_prompt, render
from assay.curation.judge.quality import JudgeQuality
from assay.curation.judge.scoring import JudgeItem, Score, Scorer
from assay.curation.judge.verdicts import VerdictRule
from assay.curation.schema import (
    CORPUS,
    ID_COLUMN,
    LABELS,
    NULL_KEY,
    PAIRS,
    QUERIES,
    ROW_COLUMNS,
    resolve_image_cell,
)
from assay.curation.truth import Truth, read_truth

FAILURES_FILE = "judge_failures.parquet"
FAILURES_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("doc_id", pa.string()), ("label", pa.string()), ("error", pa.string())]
)


class JudgeError(ValueError):
    """A judge run that cannot start as asked."""


@dataclass
class JudgeReport:
    """What one judge run did (also stored in the output manifest)."""

    model_id: str
    rule: str
    prompts: list[str] = field(default_factory=list)
    selected: int = 0
    scored: int = 0  # sent to the judge in this run
    cached: int = 0  # served by the cache
    failed: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    relabelled: int = 0
    trimmed: int = 0  # judged hard negatives beyond keep_negatives per query, dropped
    positives_judged_no: int = 0
    unime_fallbacks: int = 0
    seconds: float = 0.0
    p_yes: dict[str, list[float]] = field(default_factory=dict)  # subset -> scores (for histograms)
    quality: dict[str, Any] | None = None  # against a truth (quality.JudgeQuality), when one was given

    @property
    def pairs_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "p_yes"}
        out["pairs_per_second"] = round(self.pairs_per_second, 2)
        return out


class JudgePrompts:
    """The template of each task family (or the one given), loaded once."""

    def __init__(self, prompt: str | Path | PromptTemplate | None):
        self.fixed = load_prompt(prompt) if isinstance(prompt, (str, Path)) else prompt
        self._by_family: dict[str, PromptTemplate] = {}

    def for_task(self, task: str | None) -> PromptTemplate:
        if self.fixed is not None:
            return self.fixed
        family = family_for_task(task)
        if family not in self._by_family:
            self._by_family[family] = load_prompt(family)
        return self._by_family[family]


def _rows_by_id(ds: Dataset, table: str, ids: set[str]) -> dict[str, dict[str, Any]]:
    """The rows of ``table`` whose id is in ``ids`` (streamed shard by shard, filtered in Arrow)."""
    id_col = ID_COLUMN[table]
    wanted = pa.array(sorted(ids), pa.string())
    found: dict[str, dict[str, Any]] = {}
    root = ds.data_root
    for name in ds.shards(table):
        t = ds.read_shard(table, name, columns=ROW_COLUMNS[table])
        t = t.filter(pc.is_in(t.column(id_col), value_set=wanted))
        for row in t.to_pylist():
            row["image"] = resolve_image_cell(row.get("image"), root)
            found[row[id_col]] = row
    return found


def _shard_items(
    ds: Dataset, pairs: pa.Table, selected: pa.Array, prompts: JudgePrompts, max_chars: int
) -> tuple[list[int], list[Key], list[JudgeItem], list[str], list[str | None]]:
    """Render the selected pairs of one shard: (row indices, keys, items, prompt ids, subsets)."""
    rows = [i for i, keep in enumerate(selected.to_pylist()) if keep]
    qids = pairs.column("query_id").to_pylist()
    dids = pairs.column("doc_id").to_pylist()
    queries = _rows_by_id(ds, QUERIES, {qids[i] for i in rows})
    docs = _rows_by_id(ds, CORPUS, {dids[i] for i in rows})
    keys, items, prompt_ids, subsets = [], [], [], []
    for i in rows:
        q, d = queries.get(qids[i]), docs.get(dids[i])
        if q is None or d is None:
            raise JudgeError(
                f"{storage.display(ds.root)}: pair ({qids[i]}, {dids[i]}) names a "
                f"{'query' if q is None else 'doc'} that the dataset does not hold; run `assay validate` "
                "on it first"
            )
        key, item, prompt_id = render_pair(prompts, q, d, max_chars)
        items.append(item)
        keys.append(key)
        prompt_ids.append(prompt_id)
        subsets.append(q.get("subset"))
    return rows, keys, items, prompt_ids, subsets


def render_pair(
    prompts: JudgePrompts, query: dict[str, Any], doc: dict[str, Any], max_chars: int
) -> tuple[Key, JudgeItem, str]:
    """The judge prompt of one pair and its cache key: (key, item, prompt id). ``query`` and ``doc``
    are rows (``ROW_COLUMNS``) whose image paths are already resolved (``resolve_image_cell``)."""
    template = prompts.for_task(query.get("task"))
    item = JudgeItem(
        render(template, query, doc, max_chars=max_chars), images_of(query, doc), template.labels
    )
    return Key(query["query_id"], doc["doc_id"], content_hash(item)), item, template.id


def judge_dataset(
    source: Dataset | str | Path,
    out: str | Path,
    scorer: Scorer,
    *,
    cache: JudgmentCache | str | Path,
    prompt: str | Path | PromptTemplate | None = None,
    rule: VerdictRule | None = None,
    labels: Sequence[str] = LABELS,
    batch_size: int = 64,
    max_chars: int = 2000,
    relabel: bool = True,
    keep_negatives: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    truth: Truth | str | Path | None = None,
) -> tuple[Manifest, JudgeReport]:
    """Judge the pairs of ``source`` whose label is in ``labels``; write the result to ``out``.

    ``scorer``: any judge backend (``curation.judge.scoring.Scorer``). ``cache``: a JudgmentCache or
    its path. ``prompt``: a template (name, YAML path or object) for every pair; default: each query's
    task family. ``progress(n)`` is called with the number of pairs scored or served after each batch;
    ``on_batch(done, total)`` after each batch is committed (tests kill runs there).
    ``keep_negatives``: keep at most that many judged hard negatives (verdict no) per query, the
    best-ranked first (the paper keeps up to n after judging the top-k); the rest are dropped.
    ``truth``: a ``curation.truth.Truth`` (or its file) to measure the verdicts against
    (``report.quality``, the manifest's ``extra.judge.quality``); it changes no label.
    """
    ds = source if isinstance(source, Dataset) else Dataset(source)
    rule = rule or VerdictRule()
    bad = sorted(set(labels) - set(LABELS))
    if bad or not labels:
        raise JudgeError(f"labels to judge must be among {', '.join(LABELS)}; got {list(labels)}")
    if batch_size < 1:
        raise JudgeError("batch_size must be at least 1")
    prompts = JudgePrompts(prompt)
    if rule.needs_positive and "positive" not in labels:
        raise JudgeError("the unime rule compares with the query's positive: include 'positive' in labels")
    own_cache = not isinstance(cache, JudgmentCache)
    cache = JudgmentCache(cache) if own_cache else cache
    config = {
        "judge_model": scorer.model_id,
        "prompt": prompts.fixed.id if prompts.fixed else "per-task-family",
        "rule": str(rule),
        "labels": sorted(labels),
        "max_chars": max_chars,
        "relabel": relabel,
        "keep_negatives": keep_negatives,
    }
    if truth is not None:
        truth = truth if isinstance(truth, Truth) else read_truth(truth)
        config["truth"] = truth.source  # only when given: runs without one keep their config
    quality = JudgeQuality(truth) if truth is not None else None
    report = JudgeReport(model_id=scorer.model_id, rule=str(rule))
    try:
        writer = DatasetWriter(
            out,
            stage="judge",
            config=config,
            parents=[ds],
            data_root=storage.absolute(ds.data_root),
            overwrite=overwrite,
        )
    except AlreadyComplete as done:
        stored = done.manifest.extra.get("judge", {})
        return done.manifest, JudgeReport(
            **{k: v for k, v in stored.items() if k in JudgeReport.__annotations__}
        )
    try:
        wanted = pa.array(sorted(labels), pa.string())
        t0 = time.perf_counter()
        # -- pass 1: score everything selected that the cache does not hold
        shard_keys: dict[str, tuple[list[int], list[Key], list[str], list[str | None]]] = {}
        for name in ds.shards(PAIRS):
            pairs = ds.read_shard(PAIRS, name)
            selected = pc.fill_null(pc.is_in(pairs.column("label"), value_set=wanted), False)
            rows, keys, items, prompt_ids, subsets = _shard_items(ds, pairs, selected, prompts, max_chars)
            shard_keys[name] = (rows, keys, prompt_ids, subsets)
            report.selected += len(rows)
            score_missing(scorer, cache, keys, items, prompt_ids, batch_size, report, progress, on_batch)
        report.seconds = time.perf_counter() - t0
        # -- pass 2: verdicts, written shard by shard
        found = {
            name: lookup_scores(cache, scorer.model_id, keys, pids)
            for name, (_, keys, pids, _) in shard_keys.items()
        }
        positive_p = _positive_p_yes(ds, shard_keys, found)
        drop = (
            _negatives_to_drop(ds, shard_keys, found, positive_p, rule, keep_negatives)
            if keep_negatives is not None
            else {}
        )
        failures: list[dict[str, Any]] = []
        for name in ds.shards(PAIRS):
            # Verdicts are recomputed for every shard (cheap, deterministic) so that the report counts
            # the whole dataset even when a resumed run finds some shards already written.
            pairs = ds.read_shard(PAIRS, name)
            rows, keys, _, subsets = shard_keys[name]
            table, shard_failures = apply_verdicts(
                pairs, rows, keys, subsets, found[name], positive_p, rule, relabel, report
            )
            if quality is not None:  # every judged pair, before the keep limit trims any
                judged = table.take(pa.array(rows, pa.int64()))
                cols = [judged.column(c).to_pylist() for c in ("label", "judge_p_yes", "judge_verdict")]
                quality.add(subsets, [k.query_id for k in keys], [k.doc_id for k in keys], *cols)
            if drop.get(name):
                table = table.filter(pa.array([i not in drop[name] for i in range(table.num_rows)]))
                report.trimmed += len(drop[name])
            failures.extend(shard_failures)
            if not writer.is_done(PAIRS, name):
                writer.sink.write_shard(PAIRS, name, table)
        for table in (QUERIES, CORPUS):
            for name in ds.shards(table):
                if not writer.is_done(table, name):
                    writer.sink.link_shard(table, name, ds.shard_path(table, name))
        if failures:
            failures_table = pa.Table.from_pylist(failures, FAILURES_SCHEMA)
            atomic_write_parquet(storage.join(out, FAILURES_FILE), failures_table)
        report.failed = len(failures)
        report.prompts = sorted({p for _, _, pids, _ in shard_keys.values() for p in pids})
        if quality is not None:
            report.quality = quality.result()
        manifest = writer.finish(extra={"judge": report.summary()})
    finally:
        if own_cache:
            cache.close()
    return manifest, report


def score_missing(
    scorer: Scorer,
    cache: JudgmentCache,
    keys: list[Key],
    items: list[JudgeItem],
    prompt_ids: list[str],
    batch_size: int,
    report: JudgeReport,
    progress: Callable[[int], None] | None,
    on_batch: Callable[[int, int], None] | None,
) -> list[int]:
    """Send the items the cache does not hold to the scorer, in batches, each batch stored in the
    cache as soon as it is scored; returns the indices of the items scored."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, pid in enumerate(prompt_ids):
        by_prompt[pid].append(i)
    scored: list[int] = []
    for pid, idx in by_prompt.items():
        hits = cache.lookup(scorer.model_id, pid, [keys[i] for i in idx])
        todo = [i for i in idx if keys[i] not in hits]
        scored.extend(todo)
        report.cached += len(idx) - len(todo)
        if progress and len(idx) > len(todo):
            progress(len(idx) - len(todo))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            scores = scorer.score([items[i] for i in chunk])
            if len(scores) != len(chunk):
                raise JudgeError(
                    f"judge {scorer.model_id} returned {len(scores)} scores for {len(chunk)} pairs"
                )
            cache.store(scorer.model_id, pid, [(keys[i], s) for i, s in zip(chunk, scores, strict=True)])
            report.scored += len(chunk)
            if progress:
                progress(len(chunk))
            if on_batch:
                on_batch(start + len(chunk), len(todo))
    return scored


def lookup_scores(cache: JudgmentCache, model_id: str, keys: list[Key], prompt_ids: list[str]) -> list[Score]:
    """The cached judgment of every key (failures included; "not judged" where there is none)."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, pid in enumerate(prompt_ids):
        by_prompt[pid].append(i)
    out: list[Score] = [Score(error="not judged")] * len(keys)
    for pid, idx in by_prompt.items():
        found = cache.lookup(model_id, pid, [keys[i] for i in idx], failures=True)
        for i in idx:
            out[i] = found.get(keys[i], Score(error="not judged"))
    return out


def _positive_p_yes(
    ds: Dataset, shard_keys: dict[str, tuple], found: dict[str, list[Score]]
) -> dict[str, float]:
    """The highest p_yes among each query's judged gold positives (the unime reference)."""
    best: dict[str, float] = {}
    for name, (rows, keys, _, _) in shard_keys.items():
        labels = ds.read_shard(PAIRS, name, columns=["label"]).column("label").to_pylist()
        positive_reference([labels[r] for r in rows], keys, found[name], best)
    return best


def positive_reference(
    labels: Sequence[str | None], keys: Sequence[Key], scores: Sequence[Score], best: dict[str, float]
) -> dict[str, float]:
    """Fold judged pairs into ``best``: the highest p_yes among each query's judged gold positives."""
    for label, key, score in zip(labels, keys, scores, strict=True):
        if label == "positive" and score.ok:
            best[key.query_id] = max(best.get(key.query_id, 0.0), float(score.p_yes))
    return best


def apply_verdicts(
    pairs: pa.Table,
    rows: list[int],
    keys: list[Key],
    subsets: list[str | None],
    scores: list[Score],
    positive_p: dict[str, float],
    rule: VerdictRule,
    relabel: bool,
    report: JudgeReport,
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Write the verdicts of the judged ``rows`` of a pairs table (``scores`` in the order of ``keys``)
    into its label, judge_p_yes and judge_verdict columns, counting into ``report``; returns the table
    and the pairs that could not be judged (query_id, doc_id, label, error)."""
    labels = pairs.column("label").to_pylist()
    p_col = pairs.column("judge_p_yes").to_pylist()
    v_col = pairs.column("judge_verdict").to_pylist()
    failures = []
    counts: Counter[str] = Counter()
    for r, key, subset, score in zip(rows, keys, subsets, scores, strict=True):
        if not score.ok:
            p_col[r], v_col[r] = None, None
            failures.append(
                {"query_id": key.query_id, "doc_id": key.doc_id, "label": labels[r], "error": score.error}
            )
            continue
        p = float(score.p_yes)
        reference = positive_p.get(key.query_id) if rule.needs_positive else None
        if rule.needs_positive and reference is None:
            report.unime_fallbacks += 1
        verdict = rule.verdict(p, reference)
        p_col[r], v_col[r] = p, verdict
        counts[verdict] += 1
        report.p_yes.setdefault(subset or "", []).append(p)
        if labels[r] == "positive":
            report.positives_judged_no += verdict == "no"
        elif verdict == "yes" and relabel and labels[r] != "false_negative":
            labels[r] = "false_negative"
            report.relabelled += 1
    for k, v in counts.items():
        report.verdicts[k] = report.verdicts.get(k, 0) + v
    table = pairs
    for col, values, typ in (
        ("label", labels, pa.string()),
        ("judge_p_yes", p_col, pairs.schema.field("judge_p_yes").type),
        ("judge_verdict", v_col, pa.string()),
    ):
        table = table.set_column(table.column_names.index(col), col, pa.array(values, typ))
    return table, failures


def _negatives_to_drop(
    ds: Dataset,
    shard_keys: dict[str, tuple],
    found: dict[str, list[Score]],
    positive_p: dict[str, float],
    rule: VerdictRule,
    n: int,
) -> dict[str, set[int]]:
    """Rows (per shard) of judged hard negatives beyond the ``n`` best-ranked "no"s of their query."""
    ranked: dict[str, list[tuple[int, int, str, int]]] = defaultdict(list)
    for order, (name, (rows, keys, _, _)) in enumerate(shard_keys.items()):
        t = ds.read_shard(PAIRS, name, columns=["label", "rank"])
        labels, ranks = t.column("label").to_pylist(), t.column("rank").to_pylist()
        for r, key, score in zip(rows, keys, found[name], strict=True):
            if labels[r] != "hard_negative" or not score.ok:
                continue
            reference = positive_p.get(key.query_id) if rule.needs_positive else None
            if rule.verdict(float(score.p_yes), reference) == "no":
                rank = ranks[r] if ranks[r] is not None else 1 << 30
                ranked[key.query_id].append((rank, order, name, r))
    drop: dict[str, set[int]] = defaultdict(set)
    for entries in ranked.values():
        entries.sort()
        for _, _, name, r in entries[n:]:
            drop[name].add(r)
    return drop


def read_failures(dataset: str | Path) -> pa.Table:
    """The pairs a judge run could not score, with their errors (empty when there were none)."""
    path = storage.path(dataset) / FAILURES_FILE
    return storage.read_table(path) if path.exists() else FAILURES_SCHEMA.empty_table()


def iter_judged(ds: Dataset) -> Iterable[dict[str, Any]]:
    """The judged pairs of a dataset (query_id, doc_id, label, judge_p_yes, judge_verdict)."""
    cols = ["query_id", "doc_id", "label", "judge_p_yes", "judge_verdict"]
    for batch in ds.iter_batches(PAIRS, columns=cols):
        for row in batch.to_pylist():
            if row["judge_p_yes"] is not None:
                yield row


def p_yes_histograms(dataset: str | Path | Dataset, bins: int = 10) -> dict[str, dict[str, list[int]]]:
    """Per subset and label group (positive / other), counts of judged p_yes in ``bins`` equal bins."""
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    subset_of = ds.query_subsets()
    out: dict[str, dict[str, list[int]]] = {}
    for row in iter_judged(ds):
        group = "positive" if row["label"] == "positive" else "candidate"
        counts = out.setdefault(subset_of.get(row["query_id"], NULL_KEY), {}).setdefault(group, [0] * bins)
        counts[min(int(row["judge_p_yes"] * bins), bins - 1)] += 1
    return out
