"""Rule specs: :func:`parse_rules` reads them, :func:`describe` writes the canonical one.

``parse_rules`` reads the CLI form ``"ranks:50-100,percent:0.95,sample:random:2"``, a preset name
(``stage2``) and the YAML form ``[{ranks: [50, 100]}, {percent: 0.95}, {sample: {n: 2, how:
random}}]``; ``describe(rules)`` writes the canonical string, stored with outputs as provenance
(``parse_rules(describe(rules)) == rules``). The rules themselves are in :mod:`assay.mining.select_rules`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from assay.mining.select_rules import (
    RULE_TYPES,
    AbsoluteMargin,
    MaxScore,
    MinScore,
    PercentOfPositive,
    RankWindow,
    Rule,
    Sample,
    TopK,
)

__all__ = ["PAPER_STAGE2", "PAPER_STAGE3", "PRESETS", "RuleSpecError", "describe", "parse_rules"]

#: The paper's stage 2: two negatives sampled at random from ranks 50-100.
PAPER_STAGE2 = "ranks:50-100,sample:random:2"
#: The paper's stage 3: the top 20 candidates (a judge filters them afterwards).
PAPER_STAGE3 = "top:20"
#: Whole-spec names accepted by :func:`parse_rules` (``assay mine --rules stage2``, a loop file's
#: ``rules: stage3``); the one place the paper's rules are named.
PRESETS = {"stage2": PAPER_STAGE2, "stage3": PAPER_STAGE3}


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
    (``stage2``), or a YAML list ``[{ranks: [50, 100]}, {percent: 0.95}, {sample: {n: 2, how: random}}]``
    (items may also be token strings or rule objects). An empty spec means no rules.

    Raises :class:`RuleSpecError` (a ``ValueError``) naming the bad token and what was expected.
    """
    if isinstance(spec, str):
        preset = PRESETS.get(spec.strip().lower())
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
