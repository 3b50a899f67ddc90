"""Config files a user writes (the training config, the loop file), checked by a pydantic schema.

A config's schema derives from ``StrictModel``: a key the schema does not name is refused, and a
value is never converted to another type (``"8"`` is not an int, ``true`` is not a number), with one
exception: an int is taken where a float is wanted, because YAML reads ``lr: 1`` as an int. Paths
are plain strings (YAML has no path type). Value checks are written as field constraints
(``Field(gt=0)``, ``Literal[...]``) or validators whose ``ValueError`` says what must hold.

``explain`` turns pydantic's ``ValidationError`` into one line for the user: every problem with its
key, what is wrong and the value that was given. The caller puts the file's name in front.

Example::

    >>> from pydantic import Field
    >>> class Optim(StrictModel):
    ...     lr: float = Field(default=1e-4, gt=0)
    >>> class Config(StrictModel):
    ...     optim: Optim = Optim()
    >>> try:
    ...     Config.model_validate({"optim": {"lr": "fast", "momentum": 0.9}})
    ... except ValidationError as e:
    ...     print(explain(e, Config))
    optim: unknown key(s) momentum (known: lr); optim.lr must be float, got 'fast'
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

#: Where a value sits in a config: keys and list positions, outermost first.
Loc = tuple[str | int, ...]

#: What a pydantic type error expects, in the words of the error message.
_EXPECTED = {
    "int_type": "int",
    "float_type": "float",
    "string_type": "str",
    "bool_type": "bool",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_CONSTRAINTS = {
    "greater_than": ("gt", "must be > {}"),
    "greater_than_equal": ("ge", "must be >= {}"),
    "less_than": ("lt", "must be < {}"),
    "less_than_equal": ("le", "must be <= {}"),
    "literal_error": ("expected", "must be one of {}"),
    "string_pattern_mismatch": ("pattern", "must match {}"),
}
_EMPTY = ("too_short", "string_too_short")


class StrictModel(BaseModel):
    """The base of every config schema: unknown keys refused, no type conversion (int -> float aside)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def dotted(loc: Loc) -> str:
    """``optim.lr``, ``subsets[2]``: a key as a user finds it in the file."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def explain(error: ValidationError, model: type[BaseModel], name: Callable[[Loc], str] = dotted) -> str:
    """Every problem of ``error`` (raised by ``model``) in one line, problems separated by '; '.

    ``name`` says a location the way the caller's users know it (``dotted`` by default)."""
    unknown: dict[Loc, list[str]] = {}
    known: dict[Loc, list[str]] = {}
    by_key: dict[Loc, list[dict[str, Any]]] = {}
    for e in error.errors(include_url=False):
        if e["type"] == "extra_forbidden":
            parent, at = _field_loc(model, e["loc"][:-1])
            unknown.setdefault(parent, []).append(str(e["loc"][-1]))
            known[parent] = sorted(at.model_fields) if at is not None else []
        elif e["loc"][-1:] == ("[key]",):  # a mapping's key of the wrong type: loc (..., key, '[key]')
            by_key.setdefault(_field_loc(model, e["loc"][:-2])[0], []).append({**e, "type": "key_type"})
        else:
            by_key.setdefault(_field_loc(model, e["loc"])[0], []).append(e)
    lines = []
    for parent, keys in unknown.items():
        lead = f"{name(parent)}: " if parent else ""
        listed = f" (known: {', '.join(known[parent])})" if known[parent] else ""
        lines.append(f"{lead}unknown key(s) {', '.join(sorted(keys))}{listed}")
    for loc, errors in by_key.items():
        lines.append(_problem(model, loc, name(loc) if loc else "", errors))
    return "; ".join(lines)


def _problem(model: type[BaseModel], loc: Loc, key: str, errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    kind, ctx, got = first["type"], first.get("ctx") or {}, f", got {_short(first['input'])}"
    if kind in ("value_error", "assertion_error"):
        # a validator's own sentence: "must ..." after a field, a whole sentence after a mapping
        text = str(ctx.get("error", first["msg"]))
        at_model = _field_loc(model, loc)[1] is not None
        return f"{key}: {text}" if key and at_model else f"{key} {text}".strip()
    if kind == "missing":
        return f"{key} is required{_described(model, loc)}"
    if kind == "key_type":
        return f"{key}: every key must be str{got}"
    members = [e["loc"][len(loc)] for e in errors if len(e["loc"]) > len(loc)]
    if members and all(isinstance(m, str) for m in members):  # a union: pydantic tried each member
        whole = next((e["input"] for e in errors if len(e["loc"]) == len(loc) + 1), first["input"])
        expected = dict.fromkeys(_member(m) for m in members)
        return f"{key} must be {' or '.join(expected)}, got {_short(whole)}"
    if kind in _EXPECTED:
        return f"{key} must be {_EXPECTED[kind]}{got}"
    if kind in _EMPTY and ctx.get("min_length") == 1:
        return f"{key} must not be empty{_described(model, loc)}{got}"
    if kind in _CONSTRAINTS:
        ctx_key, text = _CONSTRAINTS[kind]
        bound = ctx.get(ctx_key)  # a float field's bound comes as a float: 0.0, said as 0
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{key} {text.format(bound)}{got}"
    return f"{key} is not valid ({first['msg'][0].lower()}{first['msg'][1:]}){got}"


def _member(tag: str) -> str:
    """A union member as pydantic names it (``list[str]``, ``dict[str,any]``), in the words above."""
    if tag.startswith("list["):
        return f"a list of {_member(tag[5:-1])}"
    return "a mapping" if tag.startswith("dict[") else tag


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field_loc(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Loc, type[BaseModel] | None]:
    """The keys and positions of ``loc`` that name fields (pydantic adds the member of a union it
    tried, e.g. ``('target_modules', 'list[str]', 0)``), and the schema at the end, if one is."""
    out: list[str | int] = []
    at: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif at is not None and part in at.model_fields:
            out.append(part)
            at = _model_in(at.model_fields[part].annotation)
        else:
            break
    return tuple(out), at


def _described(model: type[BaseModel], loc: Loc) -> str:
    """`` (its description)`` when the field has one: what to write there."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    parent = _field_loc(model, loc[:-1])[1]
    field = parent.model_fields.get(loc[-1]) if parent is not None else None
    return f" ({field.description})" if field is not None and field.description else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The schema a field holds: itself, or inside ``X | None`` / ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
