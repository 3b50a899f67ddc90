"""Verdict rules: from p_yes to "yes" (a true match: a false negative when not gold) or "no".

- ``paper``: logit(yes) > logit(no), i.e. p_yes > 0.5 (Magic-MM-Embedding, PAPER.md);
- ``unime``: p_yes > p_yes(the query's positive) - beta (UniME-V2): a candidate the judge rates
  nearly as well as the gold document is a false negative. With no judged positive for the query the
  rule falls back to ``paper`` (counted, so a report can say how often);
- ``threshold``: p_yes > t.

``parse_rule("unime:0.1")``, ``parse_rule("threshold:0.8")``, ``parse_rule("paper")``.
"""

from __future__ import annotations

from dataclasses import dataclass

RULES = ("paper", "unime", "threshold")


@dataclass(frozen=True)
class VerdictRule:
    name: str = "paper"
    value: float | None = None  # beta for unime, t for threshold

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"verdict rule must be one of {', '.join(RULES)}, not {self.name!r}")
        if self.name == "paper" and self.value is not None:
            raise ValueError("the paper rule takes no value")
        if self.name == "threshold" and not (self.value is not None and 0.0 <= self.value <= 1.0):
            raise ValueError(f"threshold must be in [0, 1], got {self.value}")
        if self.name == "unime" and not (self.value is not None and 0.0 <= self.value <= 1.0):
            raise ValueError(f"unime beta must be in [0, 1], got {self.value}")

    @property
    def needs_positive(self) -> bool:
        return self.name == "unime"

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name}:{self.value:g}"

    def verdict(self, p_yes: float, positive_p_yes: float | None = None) -> str:
        """``"yes"`` or ``"no"`` for one judged pair (``positive_p_yes``: the unime reference)."""
        if self.name == "threshold":
            return "yes" if p_yes > self.value else "no"
        if self.name == "unime" and positive_p_yes is not None:
            return "yes" if p_yes > positive_p_yes - self.value else "no"
        return "yes" if p_yes > 0.5 else "no"


def parse_rule(text: str) -> VerdictRule:
    """``paper`` | ``unime:BETA`` (default beta 0.1) | ``threshold:T``; ValueError names the problem."""
    name, _, value = text.strip().partition(":")
    if name == "unime" and not value:
        return VerdictRule("unime", 0.1)
    if not value:
        return VerdictRule(name)
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"verdict rule {text!r}: {value!r} is not a number") from None
    return VerdictRule(name, number)
