"""Negative-selection rules: the candidate, what a rule may know of its query, and the built-in rules.

A :class:`Candidate` is one kNN hit of a query (doc index, cosine score, rank starting at 1 in search
order). A rule is a frozen dataclass with ``apply(cands, ctx) -> list[Candidate]``, where ``ctx`` is
the query's :class:`SelectionContext`; :func:`assay.mining.select.select_negatives` chains them. The
spec token in brackets is what :func:`assay.mining.select_spec.parse_rules` reads and ``token()``
writes:

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

The positive-relative rules (margin, percent; ``needs_positive_score``) keep nothing when the
query's positive score is unknown (see :mod:`assay.mining.select`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

__all__ = [
    "RULE_TYPES",
    "AbsoluteMargin",
    "Candidate",
    "MaxScore",
    "MinScore",
    "PercentOfPositive",
    "RankWindow",
    "Rule",
    "Sample",
    "SelectionContext",
    "TopK",
    "by_rank",
]


@dataclass(frozen=True)
class Candidate:
    """One kNN hit of a query: the doc index, its cosine score and its rank (1 = best) in the search."""

    doc: int
    score: float
    rank: int


@dataclass(frozen=True)
class SelectionContext:
    """What the rules may know about the query besides its candidates."""

    positives: frozenset[int]
    positive_score: float | None
    positive_contents: frozenset[Hashable]
    content_of: Callable[[int], Hashable | None]
    rng: random.Random = field(compare=False)


class Rule(Protocol):
    """A selection step: ``name`` keys its count in :attr:`assay.mining.select.Selection.dropped`."""

    name: ClassVar[str]
    needs_positive_score: ClassVar[bool]

    def apply(self, cands: list[Candidate], ctx: SelectionContext) -> list[Candidate]: ...

    def token(self) -> str: ...


def by_rank(cands: Iterable[Candidate]) -> list[Candidate]:
    """``cands`` sorted by search rank (then doc)."""
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
        return by_rank(cands)[: self.k]

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
        ordered = by_rank(cands)
        if len(ordered) <= self.n:
            return ordered
        if self.how == "top":
            return ordered[: self.n]
        return by_rank(ctx.rng.sample(ordered, self.n))

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
