"""Hard-negative selection, one query at a time: which kNN candidates of a query become its hard negatives.

After the kNN search each query has a ranked list of :class:`~assay.mining.select_rules.Candidate`
(doc index, cosine score, rank starting at 1 in search order, i.e. by descending score).
:func:`select_negatives` first removes what must never be a negative, then applies a chain of small
rules (:mod:`assay.mining.select_rules`) in order::

    >>> from assay.mining.select import select_negatives
    >>> from assay.mining.select_rules import Candidate
    >>> from assay.mining.select_spec import parse_rules
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

Next to this module: :mod:`assay.mining.select_batch` selects for many queries at once as array
operations (the same negatives), and :mod:`assay.mining.select_spec` reads and writes rule specs.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from assay.mining.select_rules import Candidate, Rule, SelectionContext, by_rank

__all__ = [
    "Selection",
    "candidates",
    "make_context",
    "positive_score_of",
    "query_seed",
    "select_negatives",
]

NO_POSITIVE_SCORE = "no_positive_score"


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
    for c in by_rank(cands):
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
    return Selection(negatives=by_rank(current), dropped=dropped)
