"""Negative selection for many queries at once: the vectorised path of :mod:`assay.mining.select`.

:func:`select_batch` takes the kNN result as arrays ((n_queries, depth) doc ids and scores, positive
scores, masks of positives and same-content candidates) and runs the built-in rules as array
operations, with the same per-query rng for ``sample:random``; it selects exactly what
:func:`assay.mining.select.select_negatives` selects row by row (the property test in
``tests/mining/test_select_batch.py`` holds it to that). A rule of one's own (any object with
``apply``) goes through ``select_negatives``; :func:`batch_supported` tells which.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from assay.mining.select import NO_POSITIVE_SCORE, query_seed
from assay.mining.select_rules import (
    RULE_TYPES,
    AbsoluteMargin,
    MaxScore,
    MinScore,
    PercentOfPositive,
    RankWindow,
    Rule,
    TopK,
)

__all__ = ["BatchSelection", "batch_supported", "select_batch"]


@dataclass(frozen=True)
class BatchSelection:
    """What :func:`select_batch` chose: ``keep`` (n_queries, depth) bool marks the negatives (read a row
    in column order: by rank); ``dropped`` holds, per step, the (n_queries,) counts of
    :attr:`~assay.mining.select.Selection.dropped` (``no_positive_score`` only when some query needed a
    positive score it lacks).
    """

    keep: np.ndarray
    dropped: dict[str, np.ndarray]


def batch_supported(rules: Iterable[Rule]) -> bool:
    """Whether :func:`select_batch` can run ``rules`` (the built-in rule types; anything else needs the
    per-query :func:`~assay.mining.select.select_negatives`)."""
    return all(type(rule) in RULE_TYPES for rule in rules)


def select_batch(
    docs: np.ndarray,
    scores: np.ndarray,
    *,
    positive_scores: np.ndarray,
    is_positive: np.ndarray | None,
    same_content: np.ndarray | None,
    rules: Sequence[Rule],
    seed: int | str,
    query_ids: Sequence[str],
    present: np.ndarray | None = None,
    start_rank: int = 1,
) -> BatchSelection:
    """:func:`~assay.mining.select.select_negatives` for many queries at once, as array operations; the
    same negatives.

    ``docs`` / ``scores``: (n_queries, depth) kNN rows in search order, so column ``j`` has rank
    ``start_rank + j``; a doc id < 0 (faiss's "no result") or ``present`` False is no candidate.
    ``positive_scores``: (n_queries,) the query's positive score, NaN when unknown. ``is_positive``
    / ``same_content``: (n_queries, depth) bool, the candidate is a gold positive of the query / has
    a positive's content key (``None``: none is); both must depend on (query, doc) only, so the
    copies of a doc agree. ``query_ids`` seed each query's rng as ``select_negatives`` does, so a
    random sample draws exactly what the per-query path draws. Raises ``TypeError`` for a rule that is
    not built in (see :func:`batch_supported`).
    """
    docs, scores, pos_score = _check_rows(docs, scores, positive_scores, query_ids)
    alive = docs >= 0 if present is None else np.asarray(present, dtype=bool) & (docs >= 0)
    alive, dropped = _drop_always_removed(docs, alive, is_positive=is_positive, same_content=same_content)

    unknown = np.isnan(pos_score)
    if unknown.any() and any(rule.needs_positive_score for rule in rules):
        dropped[NO_POSITIVE_SCORE] = np.zeros(len(docs), dtype=np.int64)
    ranks = start_rank + np.arange(docs.shape[1])
    rngs = _QueryRngs(seed, query_ids)
    with np.errstate(invalid="ignore"):  # NaN positive scores compare False: keep nothing
        for rule in rules:
            keep = _apply_rule(rule, alive, scores=scores, pos_score=pos_score, ranks=ranks, rngs=rngs)
            _count_removed(dropped, rule, (alive & ~keep).sum(axis=1), unknown)
            alive = keep
    return BatchSelection(keep=alive, dropped=dropped)


def _check_rows(
    docs: np.ndarray, scores: np.ndarray, positive_scores: np.ndarray, query_ids: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``docs``, ``scores`` (float64) and ``positive_scores`` (float64, one per row) as arrays, shapes checked."""
    docs = np.asarray(docs)
    scores = np.asarray(scores, dtype=np.float64)
    if docs.ndim != 2 or scores.shape != docs.shape:
        raise ValueError(
            f"docs and scores must be (n_queries, depth) alike, got {docs.shape} and {scores.shape}"
        )
    nq = len(docs)
    pos_score = np.asarray(positive_scores, dtype=np.float64).reshape(nq)
    if len(query_ids) != nq:
        raise ValueError(f"{len(query_ids)} query ids for {nq} rows of candidates")
    return docs, scores, pos_score


def _drop_always_removed(
    docs: np.ndarray, alive: np.ndarray, *, is_positive: np.ndarray | None, same_content: np.ndarray | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Remove what is never a negative (duplicate docs, positives, same content as a positive), whatever
    the rules say; the candidates left and the per-query counts of each removal."""
    dup = _later_copies(docs, alive)
    dropped: dict[str, np.ndarray] = {"duplicate_doc": dup.sum(axis=1)}
    alive = alive & ~dup
    for name, mask in (("positive", is_positive), ("same_content_as_positive", same_content)):
        removed = alive & np.asarray(mask, dtype=bool) if mask is not None else np.zeros_like(alive)
        dropped[name] = removed.sum(axis=1)
        alive &= ~removed
    return alive, dropped


def _later_copies(docs: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Marks every copy of a doc listed twice in its row but the first (best-ranked) one.

    A stable sort by doc groups the copies in column order; every copy after the first of its group
    is a duplicate.
    """
    dup = np.zeros_like(alive)
    if docs.shape[1] > 1:
        order = np.argsort(np.where(alive, docs, -1), axis=1, kind="stable")
        by_doc = np.take_along_axis(docs, order, axis=1)
        live = np.take_along_axis(alive, order, axis=1)
        later = (by_doc[:, 1:] == by_doc[:, :-1]) & live[:, 1:] & live[:, :-1]
        np.put_along_axis(dup, order[:, 1:], later, axis=1)
    return dup


class _QueryRngs:
    """Each query's rng, made on its first draw and drawn from in rule order, as the per-query path does."""

    def __init__(self, seed: int | str, query_ids: Sequence[str]) -> None:
        self.seed = seed
        self.query_ids = query_ids
        self.made: dict[int, random.Random] = {}

    def of(self, row: int) -> random.Random:
        rng = self.made.get(row)
        if rng is None:
            rng = self.made[row] = random.Random(query_seed(self.seed, self.query_ids[row]))
        return rng


def _apply_rule(
    rule: Rule,
    alive: np.ndarray,
    *,
    scores: np.ndarray,
    pos_score: np.ndarray,
    ranks: np.ndarray,
    rngs: _QueryRngs,
) -> np.ndarray:
    """The candidates of ``alive`` that ``rule`` keeps."""
    if type(rule) not in RULE_TYPES:
        raise TypeError(f"select_batch cannot run rule {rule!r}; use select_negatives")
    if isinstance(rule, RankWindow):
        return alive & ((ranks >= rule.start) & (ranks <= rule.end))[None, :]
    if isinstance(rule, TopK):
        return _first_n(alive, rule.k)
    if isinstance(rule, AbsoluteMargin):
        return alive & (scores < (pos_score - rule.margin)[:, None])
    if isinstance(rule, PercentOfPositive):
        return alive & (scores < (rule.pct * pos_score)[:, None])
    if isinstance(rule, MinScore):
        return alive & (scores >= rule.x)
    if isinstance(rule, MaxScore):
        return alive & (scores <= rule.x)
    if rule.how == "top":
        return _first_n(alive, rule.n)
    return _sample_random(alive, rule.n, rngs)


def _first_n(alive: np.ndarray, n: int) -> np.ndarray:
    return alive & (np.cumsum(alive, axis=1) <= n)


def _sample_random(alive: np.ndarray, n: int, rngs: _QueryRngs) -> np.ndarray:
    """``n`` of each row's candidates at random, with the query's rng (rows with ``n`` or fewer keep all)."""
    keep = alive.copy()
    for row in np.flatnonzero(alive.sum(axis=1) > n).tolist():
        cols = np.flatnonzero(alive[row])
        # random.sample picks positions from the length alone, so sampling range(m) draws
        # the positions that sampling the rank-ordered candidates draws
        keep[row] = False
        keep[row, cols[rngs.of(row).sample(range(len(cols)), n)]] = True
    return keep


def _count_removed(
    dropped: dict[str, np.ndarray], rule: Rule, removed: np.ndarray, unknown: np.ndarray
) -> None:
    """Add what ``rule`` removed to its count, or, for a query whose positive score the rule needed and
    lacks, to ``no_positive_score``."""
    counts = dropped.setdefault(rule.name, np.zeros(len(removed), dtype=np.int64))
    if rule.needs_positive_score and NO_POSITIVE_SCORE in dropped:
        dropped[NO_POSITIVE_SCORE] += np.where(unknown, removed, 0)
        counts += np.where(unknown, 0, removed)
    else:
        counts += removed
