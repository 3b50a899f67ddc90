"""Hard-negative selection: which kNN candidates of a query become its hard negatives.

After the kNN search each query has a ranked list of :class:`Candidate` (doc index, cosine score, rank
starting at 1 in search order, i.e. by descending score). :func:`select_negatives` first removes what
must never be a negative, then applies a chain of small rules in order::

    >>> from mining.select import Candidate, parse_rules, select_negatives
    >>> cands = [Candidate(doc=d, score=1.0 - d / 10, rank=d + 1) for d in range(6)]
    >>> sel = select_negatives(
    ...     cands, positives={0}, positive_score=1.0, content_of={0: "a", 1: "a"},
    ...     positive_contents=None, rules=parse_rules("percent:0.95,top:2"), seed=0, query_id="q1")
    >>> [c.doc for c in sel.negatives]
    [2, 3]
    >>> sel.dropped
    {'duplicate_doc': 0, 'positive': 1, 'same_content_as_positive': 1, 'percent_of_positive': 0, 'top_k': 2}

Always removed first (whatever the rules say):

- ``duplicate_doc``: a doc listed twice (e.g. merged shard results); the best-ranked copy stays;
- ``positive``: every gold positive of the query;
- ``same_content_as_positive``: a candidate whose content key equals a positive's content key
  (near-identical documents are the commonest false negatives). A content key of ``None`` means
  "unknown" and never matches anything.

Rules (each a frozen dataclass with ``apply(cands, ctx) -> list[Candidate]``; the spec token in
brackets is what :func:`parse_rules` reads and :func:`describe` writes):

- :class:`RankWindow` ``ranks:50-100``: keep ``start <= rank <= end`` (ranks of the search, so the
  window does not shift when positives are removed);
- :class:`TopK` ``top:20``: keep the ``k`` best-ranked of what is left at that point of the chain
  (so removing a positive does not shrink the count; use ``ranks:1-20`` for the raw window);
- :class:`AbsoluteMargin` ``margin:0.05``: keep ``score < positive_score - margin``;
- :class:`PercentOfPositive` ``percent:0.95``: keep ``score < pct * positive_score`` (NV-Retriever's
  "percent of positive"; meant for positive scores > 0: with a negative positive score the
  threshold lies above the positive's score);
- :class:`MinScore` ``min:0.2``: keep ``score >= x``; :class:`MaxScore` ``max:0.9``: keep
  ``score <= x``;
- :class:`Sample` ``sample:top:5`` / ``sample:random:2``: take ``n``, the first ``n`` by rank or
  ``n`` at random without replacement with the query's own rng; returned sorted by rank.

Unknown positive score: the positive-relative rules (margin, percent) keep **nothing** when the
query's positive score is unknown (``None`` or NaN), and :func:`select_negatives` counts those
candidates under ``no_positive_score``. Keeping everything instead would silently turn "below the
positive" into "anything", which lets the very false negatives these rules exist to stop (the
positive's near-duplicates, scored above it) through; a query with no scored positive is better
skipped and reported than mined blind.

Randomness: each query gets ``random.Random(query_seed(seed, query_id))``, where the seed is taken
from sha256 of the run seed and the query id (never Python's ``hash()``, which is salted per
process), so a run is reproducible, queries are independent of one another and of their order, and
re-running one query reproduces its draw.

Many queries at once: :func:`select_batch` takes the kNN result as arrays ((n_queries, depth) doc
ids and scores, positive scores, masks of positives and same-content candidates) and runs the
built-in rules as array operations, with the same per-query rng for ``sample:random``; it selects
exactly what :func:`select_negatives` selects row by row (the property test in
``tests/mining/test_select_batch.py`` holds it to that). A rule of one's own (any object with
``apply``) goes through :func:`select_negatives`; :func:`batch_supported` tells which.

Specs: ``parse_rules`` reads the CLI form ``"ranks:50-100,percent:0.95,sample:random:2"`` and the
YAML form ``[{ranks: [50, 100]}, {percent: 0.95}, {sample: {n: 2, how: random}}]``;
``describe(rules)`` writes the canonical string, stored with outputs as provenance
(``parse_rules(describe(rules)) == rules``).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

__all__ = [
    "PAPER_STAGE2",
    "PAPER_STAGE3",
    "PRESETS",
    "AbsoluteMargin",
    "BatchSelection",
    "Candidate",
    "MaxScore",
    "MinScore",
    "PercentOfPositive",
    "RankWindow",
    "Rule",
    "RuleSpecError",
    "Sample",
    "Selection",
    "SelectionContext",
    "TopK",
    "batch_supported",
    "candidates",
    "describe",
    "make_context",
    "parse_rules",
    "positive_score_of",
    "query_seed",
    "select_batch",
    "select_negatives",
]

#: The paper's stage 2: two negatives sampled at random from ranks 50-100.
PAPER_STAGE2 = "ranks:50-100,sample:random:2"
#: The paper's stage 3: the top 20 candidates (a judge filters them afterwards).
PAPER_STAGE3 = "top:20"
#: Whole-spec names accepted by :func:`parse_rules` (``-`` and ``_`` both work).
PRESETS = {"paper_stage2": PAPER_STAGE2, "paper_stage3": PAPER_STAGE3}

NO_POSITIVE_SCORE = "no_positive_score"


@dataclass(frozen=True)
class Candidate:
    """One kNN hit of a query: the doc index, its cosine score and its rank (1 = best) in the search."""

    doc: int
    score: float
    rank: int


def candidates(docs: Iterable[Any], scores: Iterable[Any], *, start_rank: int = 1) -> list[Candidate]:
    """Candidates from one query's kNN row (doc ids and scores in search order), ranks from ``start_rank``.

    Numpy scalars become plain ``int`` / ``float``. Negative doc ids (faiss's "no result") are skipped,
    and the ranks of the rest are kept as in the search.
    """
    docs, scores = list(docs), list(scores)
    if len(docs) != len(scores):
        raise ValueError(f"docs and scores differ in length: {len(docs)} != {len(scores)}")
    return [
        Candidate(doc=int(d), score=float(s), rank=start_rank + i)
        for i, (d, s) in enumerate(zip(docs, scores, strict=True))
        if int(d) >= 0
    ]


def positive_score_of(cands: Iterable[Candidate], positives: Iterable[int]) -> float | None:
    """The query's positive score: the max score of its positives among ``cands``; None if none was scored."""
    pos = set(positives)
    scores = [c.score for c in cands if c.doc in pos and not math.isnan(c.score)]
    return max(scores) if scores else None


def query_seed(seed: int | str, query_id: str) -> int:
    """A 64-bit seed for one query, from sha256 of the run seed and the query id (stable across processes).

    ``query_id`` is used as ``str(query_id)``, so ``1`` and ``"1"`` give the same seed.
    """
    digest = hashlib.sha256(f"assay.mining.select\x1f{seed}\x1f{query_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class SelectionContext:
    """What the rules may know about the query besides its candidates."""

    positives: frozenset[int]
    positive_score: float | None
    positive_contents: frozenset[Hashable]
    content_of: Callable[[int], Hashable | None]
    rng: random.Random = field(compare=False)


def _lookup(content_of: Any) -> Callable[[int], Hashable | None]:
    if content_of is None:
        return lambda doc: None
    if isinstance(content_of, Mapping):
        return content_of.get
    if callable(content_of):
        return content_of
    if isinstance(content_of, Sequence) or hasattr(content_of, "__getitem__"):
        seq = content_of

        def by_index(doc: int) -> Hashable | None:
            value = seq[doc]
            return value.item() if hasattr(value, "item") else value

        return by_index
    raise TypeError(f"content_of must be a mapping, a sequence or a callable, not {type(content_of)!r}")


def make_context(
    *,
    positives: Iterable[int],
    positive_score: float | None,
    content_of: Any = None,
    positive_contents: Iterable[Hashable] | None = None,
    seed: int | str = 0,
    query_id: str = "",
) -> SelectionContext:
    """Build a :class:`SelectionContext` (see :func:`select_negatives` for the arguments)."""
    positives = frozenset(int(p) for p in positives)
    lookup = _lookup(content_of)
    if positive_contents is None:
        keys = {lookup(p) for p in positives} if content_of is not None else set()
    else:
        keys = set(positive_contents)
        if keys - {None} and content_of is None:
            raise ValueError("positive_contents given without content_of: candidates' content is unknown")
    keys.discard(None)
    if positive_score is not None:
        positive_score = float(positive_score)
        if math.isnan(positive_score):
            positive_score = None
    return SelectionContext(
        positives=positives,
        positive_score=positive_score,
        positive_contents=frozenset(keys),
        content_of=lookup,
        rng=random.Random(query_seed(seed, query_id)),
    )


# -- rules -------------------------------------------------------------------------------------------


class Rule(Protocol):
    """A selection step: ``name`` keys its count in :attr:`Selection.dropped`."""

    name: ClassVar[str]
    needs_positive_score: ClassVar[bool]

    def apply(self, cands: list[Candidate], ctx: SelectionContext) -> list[Candidate]: ...

    def token(self) -> str: ...


def _by_rank(cands: Iterable[Candidate]) -> list[Candidate]:
    return sorted(cands, key=lambda c: (c.rank, c.doc))


def _check_int(value: Any, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")


def _as_float(obj: Any, attr: str, what: str) -> float:
    value = getattr(obj, attr)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, not {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    object.__setattr__(obj, attr, value)
    return value


def _fmt(x: float) -> str:
    return repr(float(x))


@dataclass(frozen=True)
class RankWindow:
    """Keep candidates whose search rank is in ``[start, end]`` (both inclusive)."""

    start: int
    end: int
    name: ClassVar[str] = "rank_window"
    needs_positive_score: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_int(self.start, "ranks start", 1)
        _check_int(self.end, "ranks end", 1)
        if self.end < self.start:
            raise ValueError(f"ranks end ({self.end}) must be >= start ({self.start})")

    def apply(self, cands: list[Candidate], ctx: SelectionContext) -> list[Candidate]:
        return [c for c in cands if self.start <= c.rank <= self.end]

    def token(self) -> str:
        return f"ranks:{self.start}-{self.end}"


@dataclass(frozen=True)
class TopK:
    """Keep the ``k`` best-ranked candidates left at this point of the chain."""

    k: int
    name: ClassVar[str] = "top_k"
    needs_positive_score: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_int(self.k, "top k", 1)

    def apply(self, cands: list[Candidate], ctx: SelectionContext) -> list[Candidate]:
        return _by_rank(cands)[: self.k]

    def token(self) -> str:
        return f"top:{self.k}"


@dataclass(frozen=True)
class AbsoluteMargin:
    """Keep ``score < positive_score - margin``; nothing when the positive score is unknown."""

    margin: float
    name: ClassVar[str] = "absolute_margin"
    needs_positive_score: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if _as_float(self, "margin", "margin") < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")

    def apply(self, cands: list[Candidate], ctx: SelectionContext) -> list[Candidate]:
        if ctx.positive_score is None:
            return []
        limit = ctx.positive_score - self.margin
        return [c for c in cands if c.score < limit]

    def token(self) -> str:
        return f"margin:{_fmt(self.margin)}"


@dataclass(frozen=True)
class PercentOfPositive:
    """Keep ``score < pct * positive_score`` (NV-Retriever); nothing when the positive score is unknown."""

    pct: float
    name: ClassVar[str] = "percent_of_positive"
    needs_positive_score: ClassVar[bool] = True

    def __post_init__(self) -> None:
        pct = _as_float(self, "pct", "percent")
        if not 0 < pct <= 1:
            raise ValueError(f"percent must be in (0, 1], got {pct}")

    def apply(self, cands: list[Candidate], ctx: SelectionContext) -> list[Candidate]:
        if ctx.positive_score is None:
            return []
        limit = self.pct * ctx.positive_score
        return [c for c in cands if c.score < limit]

    def token(self) -> str:
        return f"percent:{_fmt(self.pct)}"


@dataclass(frozen=True)
class MinScore:
    """Keep ``score >= x``."""

    x: float
    name: ClassVar[str] = "min_score"
    needs_positive_score: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _as_float(self, "x", "min score")

    def apply(self, cands: list[Candidate], ctx: SelectionContext) -> list[Candidate]:
        return [c for c in cands if c.score >= self.x]

    def token(self) -> str:
        return f"min:{_fmt(self.x)}"


@dataclass(frozen=True)
class MaxScore:
    """Keep ``score <= x``."""

    x: float
    name: ClassVar[str] = "max_score"
    needs_positive_score: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _as_float(self, "x", "max score")

    def apply(self, cands: list[Candidate], ctx: SelectionContext) -> list[Candidate]:
        return [c for c in cands if c.score <= self.x]

    def token(self) -> str:
        return f"max:{_fmt(self.x)}"


SAMPLE_HOWS = ("top", "random")


@dataclass(frozen=True)
class Sample:
    """Take ``n``: the first ``n`` by rank (``how="top"``) or ``n`` at random without replacement with the
    query's rng (``how="random"``); fewer if fewer are left. Returned sorted by rank."""

    n: int
    how: str
    name: ClassVar[str] = "sample"
    needs_positive_score: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_int(self.n, "sample n", 1)
        if self.how not in SAMPLE_HOWS:
            raise ValueError(f"sample how must be one of {SAMPLE_HOWS}, got {self.how!r}")

    def apply(self, cands: list[Candidate], ctx: SelectionContext) -> list[Candidate]:
        ordered = _by_rank(cands)
        if len(ordered) <= self.n:
            return ordered
        if self.how == "top":
            return ordered[: self.n]
        return _by_rank(ctx.rng.sample(ordered, self.n))

    def token(self) -> str:
        return f"sample:{self.how}:{self.n}"


RULE_TYPES: tuple[type, ...] = (
    RankWindow,
    TopK,
    AbsoluteMargin,
    PercentOfPositive,
    MinScore,
    MaxScore,
    Sample,
)


# -- selection ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The negatives (sorted by rank) and, per step, how many candidates it removed.

    ``dropped`` has a key for every step that ran, zeros included, in order: ``duplicate_doc``,
    ``positive``, ``same_content_as_positive``, then each rule's ``name`` (two rules of one kind
    add up), then ``no_positive_score`` if a positive-relative rule met an unknown positive score
    (what it removed is counted there rather than under its own name).
    """

    negatives: list[Candidate]
    dropped: dict[str, int]


def select_negatives(
    cands: Iterable[Candidate],
    *,
    positives: Iterable[int],
    positive_score: float | None,
    content_of: Mapping[int, Hashable] | Sequence[Hashable] | Callable[[int], Hashable] | None,
    positive_contents: Iterable[Hashable] | None,
    rules: Sequence[Rule],
    seed: int | str,
    query_id: str,
) -> Selection:
    """Choose one query's hard negatives from its kNN candidates.

    ``positives``: the query's gold positive doc indices. ``positive_score``: the max score of its
    positives (see :func:`positive_score_of`), ``None`` if no positive was scored. ``content_of``: the
    content key of a doc (mapping, sequence indexed by doc, or callable; ``None`` disables the content
    check). ``positive_contents``: the positives' content keys; ``None`` looks them up with
    ``content_of``. ``rules`` run in order after positives and same-content candidates are removed.
    ``seed`` and ``query_id`` seed the query's rng (see :func:`query_seed`).
    """
    ctx = make_context(
        positives=positives,
        positive_score=positive_score,
        content_of=content_of,
        positive_contents=positive_contents,
        seed=seed,
        query_id=query_id,
    )
    return apply_rules(cands, ctx, rules)


def apply_rules(cands: Iterable[Candidate], ctx: SelectionContext, rules: Sequence[Rule]) -> Selection:
    """:func:`select_negatives` with a ready context."""
    dropped: dict[str, int] = {"duplicate_doc": 0, "positive": 0, "same_content_as_positive": 0}
    current: list[Candidate] = []
    seen: set[int] = set()
    for c in _by_rank(cands):
        if c.doc in seen:
            dropped["duplicate_doc"] += 1
        else:
            seen.add(c.doc)
            current.append(c)

    kept = [c for c in current if c.doc not in ctx.positives]
    dropped["positive"] = len(current) - len(kept)
    current = kept
    if ctx.positive_contents:
        kept = [c for c in current if ctx.content_of(c.doc) not in ctx.positive_contents]
        dropped["same_content_as_positive"] = len(current) - len(kept)
        current = kept

    for rule in rules:
        dropped.setdefault(rule.name, 0)
        kept = rule.apply(current, ctx)
        key = NO_POSITIVE_SCORE if rule.needs_positive_score and ctx.positive_score is None else rule.name
        dropped[key] = dropped.get(key, 0) + len(current) - len(kept)
        current = kept
    return Selection(negatives=_by_rank(current), dropped=dropped)


# -- batch fast path ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSelection:
    """What :func:`select_batch` chose: ``keep`` (n_queries, depth) bool marks the negatives (read a row
    in column order: by rank); ``dropped`` holds, per step, the (n_queries,) counts of
    :attr:`Selection.dropped` (``no_positive_score`` only when some query needed a positive score it lacks).
    """

    keep: np.ndarray
    dropped: dict[str, np.ndarray]


def batch_supported(rules: Iterable[Rule]) -> bool:
    """Whether :func:`select_batch` can run ``rules`` (the built-in rule types; anything else needs the
    per-query :func:`select_negatives`)."""
    return all(type(rule) in RULE_TYPES for rule in rules)


def _first_n(alive: np.ndarray, n: int) -> np.ndarray:
    return alive & (np.cumsum(alive, axis=1) <= n)


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
    """:func:`select_negatives` for many queries at once, as array operations; the same negatives.

    ``docs`` / ``scores``: (n_queries, depth) kNN rows in search order, so column ``j`` has rank
    ``start_rank + j``; a doc id < 0 (faiss's "no result") or ``present`` False is no candidate.
    ``positive_scores``: (n_queries,) the query's positive score, NaN when unknown. ``is_positive``
    / ``same_content``: (n_queries, depth) bool, the candidate is a gold positive of the query / has
    a positive's content key (``None``: none is); both must depend on (query, doc) only, so the
    copies of a doc agree. ``query_ids`` seed each query's rng as :func:`select_negatives` does, so a
    random sample draws exactly what the per-query path draws. Raises ``TypeError`` for a rule that is
    not built in (see :func:`batch_supported`).
    """
    docs = np.asarray(docs)
    scores = np.asarray(scores, dtype=np.float64)
    if docs.ndim != 2 or scores.shape != docs.shape:
        raise ValueError(
            f"docs and scores must be (n_queries, depth) alike, got {docs.shape} and {scores.shape}"
        )
    nq, depth = docs.shape
    pos_score = np.asarray(positive_scores, dtype=np.float64).reshape(nq)
    if len(query_ids) != nq:
        raise ValueError(f"{len(query_ids)} query ids for {nq} rows of candidates")
    alive = docs >= 0 if present is None else np.asarray(present, dtype=bool) & (docs >= 0)

    # A doc listed twice: keep its first (best-ranked) column. A stable sort by doc groups the copies
    # in column order; every copy after the first of its group is a duplicate.
    dup = np.zeros_like(alive)
    if depth > 1:
        order = np.argsort(np.where(alive, docs, -1), axis=1, kind="stable")
        by_doc = np.take_along_axis(docs, order, axis=1)
        live = np.take_along_axis(alive, order, axis=1)
        later = (by_doc[:, 1:] == by_doc[:, :-1]) & live[:, 1:] & live[:, :-1]
        np.put_along_axis(dup, order[:, 1:], later, axis=1)
    dropped: dict[str, np.ndarray] = {"duplicate_doc": dup.sum(axis=1)}
    alive &= ~dup
    for name, mask in (("positive", is_positive), ("same_content_as_positive", same_content)):
        removed = alive & np.asarray(mask, dtype=bool) if mask is not None else np.zeros_like(alive)
        dropped[name] = removed.sum(axis=1)
        alive &= ~removed

    unknown = np.isnan(pos_score)
    if unknown.any() and any(rule.needs_positive_score for rule in rules):
        dropped[NO_POSITIVE_SCORE] = np.zeros(nq, dtype=np.int64)
    ranks = start_rank + np.arange(depth)
    rngs: dict[int, random.Random] = {}  # one per query, drawn from in rule order as the per-query path does
    with np.errstate(invalid="ignore"):  # NaN positive scores compare False: keep nothing
        for rule in rules:
            if type(rule) not in RULE_TYPES:
                raise TypeError(f"select_batch cannot run rule {rule!r}; use select_negatives")
            if isinstance(rule, RankWindow):
                keep = alive & ((ranks >= rule.start) & (ranks <= rule.end))[None, :]
            elif isinstance(rule, TopK):
                keep = _first_n(alive, rule.k)
            elif isinstance(rule, AbsoluteMargin):
                keep = alive & (scores < (pos_score - rule.margin)[:, None])
            elif isinstance(rule, PercentOfPositive):
                keep = alive & (scores < (rule.pct * pos_score)[:, None])
            elif isinstance(rule, MinScore):
                keep = alive & (scores >= rule.x)
            elif isinstance(rule, MaxScore):
                keep = alive & (scores <= rule.x)
            elif rule.how == "top":
                keep = _first_n(alive, rule.n)
            else:
                keep = alive.copy()
                for row in np.flatnonzero(alive.sum(axis=1) > rule.n).tolist():
                    rng = rngs.get(row)
                    if rng is None:
                        rng = rngs[row] = random.Random(query_seed(seed, query_ids[row]))
                    cols = np.flatnonzero(alive[row])
                    # random.sample picks positions from the length alone, so sampling range(m) draws
                    # the positions that sampling the rank-ordered candidates draws
                    keep[row] = False
                    keep[row, cols[rng.sample(range(len(cols)), rule.n)]] = True
            removed = (alive & ~keep).sum(axis=1)
            alive = keep
            counts = dropped.setdefault(rule.name, np.zeros(nq, dtype=np.int64))
            if rule.needs_positive_score and NO_POSITIVE_SCORE in dropped:
                dropped[NO_POSITIVE_SCORE] += np.where(unknown, removed, 0)
                counts += np.where(unknown, 0, removed)
            else:
                counts += removed
    return BatchSelection(keep=alive, dropped=dropped)


# -- specs -------------------------------------------------------------------------------------------


class RuleSpecError(ValueError):
    """A rule spec that cannot be parsed; the message names the offending token."""


_SPEC_HELP = (
    "expected comma-separated rules: ranks:START-END, top:K, margin:X, percent:P, min:X, max:X, "
    "sample:top:N or sample:random:N (or a preset: " + ", ".join(PRESETS) + ")"
)
_NAMES = ("ranks", "top", "margin", "percent", "min", "max", "sample")


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {value!r}")


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    else:
        raise ValueError(f"expected a number, got {value!r}")
    if not math.isfinite(out):
        raise ValueError(f"expected a finite number, got {value!r}")
    return out


def _mapping_args(value: Mapping, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict:
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}, allowed: {list(allowed)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    return dict(value)


def _build(name: str, value: Any) -> Rule:
    """One rule from its name and argument (a string from the CLI form, or a YAML value)."""
    if name == "ranks":
        if isinstance(value, str):
            parts = value.split("-")
            if len(parts) != 2:
                raise ValueError(f"expected START-END, got {value!r}")
            start, end = parts
        elif isinstance(value, Mapping):
            args = _mapping_args(value, ("start", "end"), ("start", "end"))
            start, end = args["start"], args["end"]
        elif isinstance(value, Sequence) and len(value) == 2:
            start, end = value
        else:
            raise ValueError(f"expected START-END or [START, END], got {value!r}")
        return RankWindow(_int(start), _int(end))
    if name == "top":
        if isinstance(value, Mapping):
            value = _mapping_args(value, ("k",), ("k",))["k"]
        return TopK(_int(value))
    if name in ("margin", "percent", "min", "max"):
        field_name = {"margin": "margin", "percent": "pct", "min": "x", "max": "x"}[name]
        if isinstance(value, Mapping):
            value = _mapping_args(value, (field_name,), (field_name,))[field_name]
        x = _float(value)
        cls = {"margin": AbsoluteMargin, "percent": PercentOfPositive, "min": MinScore, "max": MaxScore}[name]
        return cls(x)
    if name == "sample":
        if isinstance(value, str):
            parts = value.split(":")
            if len(parts) != 2:
                raise ValueError(f"expected sample:top:N or sample:random:N, got sample:{value}")
            how, n = parts[0].strip(), parts[1]
        elif isinstance(value, Mapping):
            args = _mapping_args(value, ("n", "how"), ("n", "how"))
            how, n = args["how"], args["n"]
        else:
            raise ValueError(f"expected {{n: N, how: top|random}}, got {value!r}")
        return Sample(_int(n), how)
    raise ValueError(f"unknown rule {name!r}")


def _parse_token(token: str) -> Rule:
    name, sep, arg = token.partition(":")
    name = name.strip()
    if name not in _NAMES:
        raise ValueError(f"unknown rule {name!r}")
    if not sep or not arg.strip():
        raise ValueError(f"rule {name!r} needs an argument")
    return _build(name, arg.strip())


def _parse_item(item: Any) -> Rule:
    if isinstance(item, RULE_TYPES):
        return item  # type: ignore[return-value]
    if isinstance(item, str):
        return _parse_token(item.strip())
    if isinstance(item, Mapping):
        if len(item) != 1:
            raise ValueError("each rule mapping must have exactly one key (the rule name)")
        ((name, value),) = item.items()
        if name not in _NAMES:
            raise ValueError(f"unknown rule {name!r}")
        return _build(name, value)
    raise ValueError(
        f"expected a mapping like {{top: 20}} or a string like 'top:20', got {type(item).__name__}"
    )


def parse_rules(spec: str | Sequence[Any]) -> list[Rule]:
    """Rules from a spec: ``"ranks:50-100,percent:0.95,sample:random:2"``, a preset name
    (``paper_stage2``), or a YAML list ``[{ranks: [50, 100]}, {percent: 0.95}, {sample: {n: 2, how: random}}]``
    (items may also be token strings or rule objects). An empty spec means no rules.

    Raises :class:`RuleSpecError` (a ``ValueError``) naming the bad token and what was expected.
    """
    if isinstance(spec, str):
        preset = PRESETS.get(spec.strip().lower().replace("-", "_"))
        if preset is not None:
            spec = preset
        items: list[Any] = [s.strip() for s in spec.split(",")]
        if items == [""]:
            return []
        where = f" in spec {spec!r}"
    elif isinstance(spec, Sequence):
        items = list(spec)
        where = ""
    else:
        raise RuleSpecError(f"rule spec must be a string or a list, not {type(spec).__name__}")
    rules: list[Rule] = []
    for i, item in enumerate(items):
        if isinstance(item, str) and not item.strip():
            raise RuleSpecError(f"empty rule at position {i + 1}{where}; {_SPEC_HELP}")
        try:
            rules.append(_parse_item(item))
        except (ValueError, TypeError) as exc:
            raise RuleSpecError(f"bad rule {item!r}{where}: {exc}; {_SPEC_HELP}") from None
    return rules


def describe(rules: Iterable[Rule]) -> str:
    """The canonical spec string of ``rules`` (``parse_rules(describe(rules)) == rules``)."""
    return ",".join(rule.token() for rule in rules)
