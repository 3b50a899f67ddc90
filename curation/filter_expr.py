"""The filter expression language: a small, safe condition over a table's columns.

    judge_p_yes < 0.5
    label == 'hard_negative'
    subset in ['vqa', 'retrieval'] and not_null(text)
    0.2 <= score < 0.8 or not (origin == 'mined')
    startswith(doc_id, 'wiki-')

The text is parsed with Python's ``ast`` (mode ``eval``) and a whitelist of nodes is translated into
a polars expression; nothing is ever evaluated as Python. Allowed:

- comparisons ``== != < <= > >=`` (chained ones such as ``0 < score <= 1`` too) between a column
  and a literal, or between two columns;
- ``and``, ``or``, ``not`` and parentheses;
- ``col in [...]`` / ``col not in [...]`` with a list or tuple of literals;
- literals: strings, numbers (with a sign), ``True``, ``False``, ``None``;
- ``col == None``, ``col is None`` (and ``!=`` / ``is not``) test for a missing value, as do the
  functions ``is_null(col)`` and ``not_null(col)``;
- ``startswith(col, 'text')``, ``endswith(col, 'text')``, ``contains(col, 'text')`` (a literal
  substring, not a regular expression);
- ``sample(col, 0.1)``: true for a fixed pseudo-random 10% of the values of a string column (a
  blake2b hash of the value, so the same ids are kept on every run, machine and shard layout):
  ``subset != 'vqa' or sample(query_id, 0.1)`` keeps a tenth of the vqa queries.

Everything else (attribute access, subscripts, calls to other names, arithmetic, lambdas,
comprehensions, names starting with an underscore) is refused with a :class:`FilterError` that names
the expression and the offending part.

Nulls: a comparison with a missing value is false (``judge_p_yes < 0.5`` and ``judge_p_yes >= 0.5``
are both false where ``judge_p_yes`` is null), and so are ``in``, ``not in`` and the string
functions; ``not`` then negates a plain true/false, so ``not (judge_p_yes >= 0.5)`` keeps the nulls.
Use ``is_null(col)`` to select missing values explicitly.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl

#: Longest expression accepted (a guard against pathological input to the parser).
MAX_LENGTH = 10_000

_CMP_OPS = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
_FUNCTIONS = ("is_null", "not_null", "startswith", "endswith", "contains", "sample")
_ALLOWED = (
    "comparisons (== != < <= > >=), and/or/not, `col in [...]`, string/number/True/False/None "
    "literals, column names, is_null(col), not_null(col), startswith/endswith/contains(col, 'text'), "
    "sample(col, fraction)"
)


class FilterError(ValueError):
    """A filter expression that cannot be used; the message names the expression and the problem."""


@dataclass(frozen=True)
class _Use:
    """How the expression uses a column, checked against the table's types by ``Filter.check``."""

    column: str
    kind: str  # 'string' | 'number' | 'bool' | 'column:<other>' | 'any' (null tests)
    op: str
    part: str


@dataclass(frozen=True)
class Filter:
    """A parsed filter: the source text, the columns it names, and the polars expression."""

    text: str
    columns: tuple[str, ...]
    _expr: pl.Expr = field(repr=False, compare=False)
    _uses: tuple[_Use, ...] = field(repr=False, compare=False, default=())

    @property
    def expr(self) -> pl.Expr:
        """The boolean polars expression (never null: missing values compare false)."""
        return self._expr

    def applies_to(self, columns: Iterable[str]) -> bool:
        """Whether a table with these columns has every column the expression names."""
        have = set(columns)
        return all(c in have for c in self.columns)

    def check(self, schema: Mapping[str, Any], where: str = "the table") -> None:
        """Refuse unknown columns and comparisons the column types cannot support.

        ``schema`` maps column names to polars or pyarrow types (a ``pa.Schema`` works too: pass
        ``dict(zip(schema.names, schema.types))``).
        """
        missing = [c for c in self.columns if c not in schema]
        if missing:
            raise FilterError(
                f"filter expression {self.text!r}: unknown column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(c) for c in missing)}; {where} has columns: {', '.join(schema)}"
            )
        kinds = {name: _kind_of(dtype) for name, dtype in schema.items()}
        for use in self._uses:
            have = kinds[use.column]
            if use.kind == "any":
                continue
            want = use.kind
            if want.startswith("column:"):
                other = kinds[want.split(":", 1)[1]]
                if have != other or have in ("struct", "other"):
                    raise FilterError(
                        f"filter expression {self.text!r}: `{use.part}` compares a {have} column with a "
                        f"{other} column"
                    )
                continue
            if have in ("struct", "other"):
                raise FilterError(
                    f"filter expression {self.text!r}: column {use.column!r} holds {have} values; "
                    f"only is_null({use.column}) / not_null({use.column}) can test it"
                )
            if have != want:
                raise FilterError(
                    f"filter expression {self.text!r}: `{use.part}` compares the {have} column "
                    f"{use.column!r} with a {want}"
                )
            if want == "bool" and use.op not in ("==", "!=", "in", "not in"):
                raise FilterError(f"filter expression {self.text!r}: `{use.part}` orders booleans")

    def mask(self, df: pl.DataFrame) -> pl.Series:
        """Evaluate on a DataFrame: a boolean Series with no nulls."""
        try:
            # with_columns broadcasts a constant result (e.g. `label in []`) to the frame's height
            out = df.with_columns(self._expr.fill_null(False).alias("__keep__")).get_column("__keep__")
        except pl.exceptions.PolarsError as e:
            raise FilterError(f"filter expression {self.text!r} cannot be evaluated: {e}") from e
        return out.alias("keep")


def _kind_of(dtype: Any) -> str:
    """'string', 'number', 'bool', 'struct' or 'other' for a polars or pyarrow type."""
    if isinstance(dtype, type) and issubclass(dtype, pl.DataType):
        dtype = dtype()
    if isinstance(dtype, pl.DataType):
        if dtype == pl.String or dtype == pl.Categorical or isinstance(dtype, pl.Enum):
            return "string"
        if dtype == pl.Boolean:
            return "bool"
        if dtype.is_numeric():
            return "number"
        if isinstance(dtype, pl.Struct):
            return "struct"
        return "other"
    import pyarrow as pa

    if isinstance(dtype, pa.DataType):
        if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_dictionary(dtype):
            return "string"
        if pa.types.is_boolean(dtype):
            return "bool"
        if pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
            return "number"
        if pa.types.is_struct(dtype):
            return "struct"
    return "other"


def _lit_kind(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "string"


class _Translator:
    def __init__(self, text: str):
        self.text = text
        self.columns: list[str] = []
        self.uses: list[_Use] = []
        # ast offsets are UTF-8 byte columns per line; ast.get_source_segment re-splits the whole
        # text on every call, which is quadratic for long expressions.
        self._bytes = text.encode("utf-8")
        starts = [0]
        for i, b in enumerate(self._bytes):
            if b == 0x0A:
                starts.append(i + 1)
        self._line_starts = starts

    # -- helpers ---------------------------------------------------------------------------------
    def part(self, node: ast.AST) -> str:
        """The source text of ``node``."""
        try:
            start = self._line_starts[node.lineno - 1] + node.col_offset
            end = self._line_starts[node.end_lineno - 1] + node.end_col_offset
        except (AttributeError, IndexError, TypeError):
            return ast.dump(node)
        return self._bytes[start:end].decode("utf-8", errors="replace")

    def refuse(self, node: ast.AST, what: str) -> FilterError:
        return FilterError(
            f"filter expression {self.text!r}: {what} `{self.part(node)}` is not allowed; "
            f"allowed are {_ALLOWED}"
        )

    def describe(self, node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return "attribute access"
        if isinstance(node, ast.Subscript):
            return "subscript"
        if isinstance(node, ast.Call):
            return "call"
        if isinstance(node, ast.Lambda):
            return "lambda"
        if isinstance(node, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
            return "comprehension"
        if isinstance(node, ast.BinOp):
            return "arithmetic"
        if isinstance(node, ast.NamedExpr):
            return "assignment"
        if isinstance(node, ast.IfExp):
            return "conditional expression"
        if isinstance(node, ast.JoinedStr):
            return "f-string"
        if isinstance(node, ast.Starred):
            return "starred expression"
        return f"{type(node).__name__.lower()} expression"

    def column(self, node: ast.Name) -> str:
        name = node.id
        if name.startswith("_"):
            raise FilterError(
                f"filter expression {self.text!r}: the name `{name}` is not allowed (names starting with '_' "
                "are never columns)"
            )
        if name not in self.columns:
            self.columns.append(name)
        return name

    def literal(self, node: ast.AST) -> tuple[bool, Any]:
        """(True, value) for a literal node, (False, None) otherwise."""
        if isinstance(node, ast.Constant):
            if node.value is None or isinstance(node.value, bool | int | float | str):
                return True, node.value
            raise self.refuse(node, f"a {type(node.value).__name__} literal")
        if (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, ast.USub | ast.UAdd)
            and isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, int | float)
            and not isinstance(node.operand.value, bool)
        ):
            v = node.operand.value
            return True, (-v if isinstance(node.op, ast.USub) else v)
        return False, None

    def operand(self, node: ast.AST) -> tuple[str, Any]:
        """('col', name) or ('lit', value)."""
        if isinstance(node, ast.Name):
            return "col", self.column(node)
        ok, value = self.literal(node)
        if ok:
            return "lit", value
        raise self.refuse(node, self.describe(node))

    # -- conditions -----------------------------------------------------------------------------
    def cond(self, node: ast.AST) -> pl.Expr:
        if isinstance(node, ast.BoolOp):
            parts = [self.cond(v) for v in node.values]
            # flat n-ary and/or: a left fold of hundreds of terms makes a deep, slow expression tree
            return pl.all_horizontal(parts) if isinstance(node.op, ast.And) else pl.any_horizontal(parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.cond(node.operand)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Name):
            raise FilterError(
                f"filter expression {self.text!r}: the column `{node.id}` alone is not a condition; "
                f"compare it (e.g. `{node.id} == 'x'`) or test it with not_null({node.id})"
            )
        if isinstance(node, ast.Constant):
            raise FilterError(
                f"filter expression {self.text!r}: the literal `{self.part(node)}` alone is not a condition"
            )
        raise self.refuse(node, self.describe(node))

    def compare(self, node: ast.Compare) -> pl.Expr:
        out: pl.Expr | None = None
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            e = self.compare_one(node, left, op, right)
            out = e if out is None else (out & e)
            left = right
        assert out is not None
        return out

    def compare_one(self, whole: ast.AST, left: ast.AST, op: ast.cmpop, right: ast.AST) -> pl.Expr:
        seg = f"{self.part(left)} {self.op_text(op)} {self.part(right)}"
        if isinstance(op, ast.In | ast.NotIn):
            return self.membership(left, op, right, seg)
        if isinstance(op, ast.Is | ast.IsNot):
            lk, lv = self.operand(left)
            rk, rv = self.operand(right)
            if lk == "col" and rk == "lit" and rv is None:
                return self.null_test(lv, isinstance(op, ast.Is), seg)
            raise FilterError(
                f"filter expression {self.text!r}: `{seg}`: `is` / `is not` only test a column against None"
            )
        sym = _CMP_OPS.get(type(op))
        if sym is None:  # pragma: no cover - every cmpop is handled above
            raise self.refuse(whole, "operator")
        lk, lv = self.operand(left)
        rk, rv = self.operand(right)
        if lk == "lit" and rk == "lit":
            raise FilterError(
                f"filter expression {self.text!r}: `{seg}` compares two literals; name a column"
            )
        if lk == "lit":  # put the column on the left: 0.5 > p  ->  p < 0.5
            lk, lv, rk, rv = rk, rv, lk, lv
            sym = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(sym, sym)
        if rk == "lit" and rv is None:
            if sym in ("==", "!="):
                return self.null_test(lv, sym == "==", seg)
            raise FilterError(f"filter expression {self.text!r}: `{seg}` orders against None; use is_null()")
        a = pl.col(lv)
        if rk == "col":
            b = pl.col(rv)
            self.uses.append(_Use(lv, f"column:{rv}", sym, seg))
        else:
            b = pl.lit(rv)
            self.uses.append(_Use(lv, _lit_kind(rv), sym, seg))
        e = {
            "==": a == b,
            "!=": a != b,
            "<": a < b,
            "<=": a <= b,
            ">": a > b,
            ">=": a >= b,
        }[sym]
        return e.fill_null(False)

    @staticmethod
    def op_text(op: ast.cmpop) -> str:
        return {ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}.get(
            type(op), _CMP_OPS.get(type(op), "?")
        )

    def null_test(self, column: str, is_null: bool, seg: str) -> pl.Expr:
        self.uses.append(_Use(column, "any", "null", seg))
        return pl.col(column).is_null() if is_null else pl.col(column).is_not_null()

    def membership(self, left: ast.AST, op: ast.cmpop, right: ast.AST, seg: str) -> pl.Expr:
        if not isinstance(left, ast.Name):
            raise FilterError(
                f"filter expression {self.text!r}: `{seg}`: the left side of `in` must be a column name"
            )
        col = self.column(left)
        if not isinstance(right, ast.List | ast.Tuple):
            raise FilterError(
                f"filter expression {self.text!r}: `{seg}`: the right side of `in` must be a list or tuple "
                "of literals, e.g. label in ['negative', 'hard_negative']"
            )
        values = []
        for elt in right.elts:
            ok, v = self.literal(elt)
            if not ok:
                raise self.refuse(elt, f"{self.describe(elt)} inside a list:")
            values.append(v)
        has_none = any(v is None for v in values)
        values = [v for v in values if v is not None]
        kinds = {_lit_kind(v) for v in values}
        if len(kinds) > 1:
            raise FilterError(f"filter expression {self.text!r}: `{seg}` mixes literal types {sorted(kinds)}")
        c = pl.col(col)
        if not values:
            hit = pl.lit(False)
        elif kinds == {"string"}:
            hit = c.is_in(pl.Series(values, dtype=pl.String).implode()).fill_null(False)
        else:  # numbers and booleans: equalities, so `x in [0.3]` agrees with `x == 0.3`
            hit = pl.any_horizontal([(c == pl.lit(v)).fill_null(False) for v in values])
        kind = kinds.pop() if kinds else "any"
        self.uses.append(_Use(col, kind, "in", seg))
        if isinstance(op, ast.In):
            return (hit | c.is_null()) if has_none else hit
        # `not in`: false for a missing value whether or not None is listed (null compares false,
        # and a listed None means the missing value is "in").
        return ~hit & c.is_not_null()

    def call(self, node: ast.Call) -> pl.Expr:
        func = node.func
        if not isinstance(func, ast.Name):
            raise self.refuse(node, "call")
        name = func.id
        if name not in _FUNCTIONS:
            raise FilterError(
                f"filter expression {self.text!r}: call to `{name}` in `{self.part(node)}` is not allowed; "
                f"the functions are {', '.join(_FUNCTIONS)}"
            )
        if node.keywords:
            raise self.refuse(node, "a call with keyword arguments")
        want = 1 if name in ("is_null", "not_null") else 2
        if len(node.args) != want:
            raise FilterError(
                f"filter expression {self.text!r}: `{self.part(node)}`: {name}() takes {want} argument"
                f"{'s' if want > 1 else ''}"
            )
        arg0 = node.args[0]
        if not isinstance(arg0, ast.Name):
            raise FilterError(
                f"filter expression {self.text!r}: `{self.part(node)}`: the first argument of {name}() must be "
                "a column name"
            )
        col = self.column(arg0)
        if want == 1:
            return self.null_test(col, name == "is_null", self.part(node))
        ok, v = self.literal(node.args[1])
        if name == "sample":
            return self.sample(col, ok, v, node)
        if not ok or not isinstance(v, str):
            raise FilterError(
                f"filter expression {self.text!r}: `{self.part(node)}`: the second argument of {name}() must be "
                "a string literal"
            )
        self.uses.append(_Use(col, "string", name, self.part(node)))
        s = pl.col(col).str
        e = {
            "startswith": s.starts_with(v),
            "endswith": s.ends_with(v),
            "contains": s.contains(v, literal=True),
        }[name]
        return e.fill_null(False)

    def sample(self, col: str, ok: bool, fraction: Any, node: ast.Call) -> pl.Expr:
        if (
            not ok
            or isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0 <= fraction <= 1
        ):
            raise FilterError(
                f"filter expression {self.text!r}: `{self.part(node)}`: the second argument of sample() must be "
                "a fraction between 0 and 1"
            )
        self.uses.append(_Use(col, "string", "sample", self.part(node)))
        return (
            pl.col(col)
            .map_batches(lambda s: _hash_unit(s) < fraction, return_dtype=pl.Boolean)
            .fill_null(False)
        )


def _hash_unit(values: pl.Series) -> pl.Series:
    """A stable pseudo-random number in [0, 1) per string (blake2b; null stays null)."""
    out = [
        None
        if v is None
        else int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "big") / 2**64
        for v in values.to_list()
    ]
    return pl.Series(values.name, out, dtype=pl.Float64)


def parse_filter(text: str) -> Filter:
    """Parse a filter expression; raises :class:`FilterError` for anything outside the language."""
    if not isinstance(text, str) or not text.strip():
        raise FilterError("filter expression is empty; give a condition such as \"label == 'positive'\"")
    if len(text) > MAX_LENGTH:
        raise FilterError(f"filter expression is {len(text)} characters long; the limit is {MAX_LENGTH}")
    source = text.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as e:
        raise FilterError(
            f"filter expression {source!r} is not valid syntax: {e.msg} (column {e.offset})"
        ) from e
    except (RecursionError, MemoryError, ValueError) as e:
        raise FilterError(f"filter expression {source!r} cannot be parsed: {type(e).__name__}") from e
    tr = _Translator(source)
    try:
        expr = tr.cond(tree.body)
    except RecursionError as e:
        raise FilterError(f"filter expression {source!r} is nested too deeply") from e
    if not tr.columns:
        raise FilterError(f"filter expression {source!r} names no column")
    return Filter(source, tuple(tr.columns), expr.fill_null(False), tuple(tr.uses))
