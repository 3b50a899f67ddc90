"""The filter expression language: what it accepts, what it refuses, and that nothing is evaluated."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

import assay.curation.filter_expr as fe
from assay.curation.filter_expr import FilterError, parse_filter

DF = pl.DataFrame(
    {
        "query_id": ["q1", "q2", "q3", "q4"],
        "label": ["positive", "hard_negative", None, "negative"],
        "judge_p_yes": [0.9, 0.2, None, 0.5],
        "rank": [1, 2, None, 4],
        "subset": ["vqa", "ret", "vqa", "wiki-en"],
    },
    schema_overrides={"judge_p_yes": pl.Float32, "rank": pl.Int32},
)


def mask(text: str) -> list[bool]:
    flt = parse_filter(text)
    flt.check(DF.schema)
    return flt.mask(DF).to_list()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("judge_p_yes < 0.5", [False, True, False, False]),
        ("judge_p_yes >= 0.5", [True, False, False, True]),
        ("not (judge_p_yes >= 0.5)", [False, True, True, False]),
        ("label == 'hard_negative'", [False, True, False, False]),
        ('label != "positive"', [False, True, False, True]),
        ("0.1 < judge_p_yes <= 0.5", [False, True, False, True]),
        ("0.5 > judge_p_yes", [False, True, False, False]),
        ("judge_p_yes == 0.2", [False, True, False, False]),
        ("rank in [1, 4]", [True, False, False, True]),
        ("rank in (2.0,)", [False, True, False, False]),
        ("label in ['positive', 'negative']", [True, False, False, True]),
        ("label not in ['positive', 'negative']", [False, True, False, False]),
        ("label in ['positive', None]", [True, False, True, False]),
        ("label in []", [False, False, False, False]),
        ("is_null(label)", [False, False, True, False]),
        ("not_null(judge_p_yes)", [True, True, False, True]),
        ("label == None", [False, False, True, False]),
        ("label is not None", [True, True, False, True]),
        ("startswith(subset, 'wiki')", [False, False, False, True]),
        ("endswith(label, 'negative')", [False, True, False, True]),
        ("contains(subset, 'ki-')", [False, False, False, True]),
        ("rank > -1 and subset == 'vqa'", [True, False, False, False]),
        ("label == 'positive' or is_null(judge_p_yes)", [True, False, True, False]),
        ("rank >= 2 and not (label == 'negative')", [False, True, False, False]),
    ],
)
def test_valid_expressions(text, expected):
    assert mask(text) == expected


def test_columns_and_applies_to():
    flt = parse_filter("  label == 'positive' and judge_p_yes < 0.5 and label != 'x' ")
    assert flt.columns == ("label", "judge_p_yes")
    assert flt.text == "label == 'positive' and judge_p_yes < 0.5 and label != 'x'"
    assert flt.applies_to(["query_id", "label", "judge_p_yes"])
    assert not flt.applies_to(["label"])


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("__import__('os').system('x')", "__import__('os').system('x')"),
        ("().__class__", "().__class__"),
        ("().__class__.__bases__[0].__subclasses__()", "().__class__.__bases__[0].__subclasses__()"),
        ("label.upper() == 'X'", "label.upper()"),
        ("label.real == 1", "label.real"),
        ("open('/etc/passwd')", "open"),
        ("eval('1') == 1", "eval"),
        ("(lambda: 1)()", "(lambda: 1)()"),
        ("lambda: True", "lambda: True"),
        ("label[0] == 'p'", "label[0]"),
        ("[x for x in label] == []", "[x for x in label]"),
        ("rank + 1 > 2", "rank + 1"),
        ("__builtins__ == 1", "__builtins__"),
        ("_secret == 1", "_secret"),
        ("(x := 1)", "x := 1"),
        ("f'{label}' == 'x'", "f'{label}'"),
        ("label == b'x'", "b'x'"),
        ("label if rank else label", "label if rank else label"),
        ("label in [x for x in 'ab']", "[x for x in 'ab']"),
        ("label in [rank]", "rank"),
        ("startswith(label, rank)", "startswith(label, rank)"),
        ("startswith(label)", "startswith(label)"),
        ("is_null(label, 1)", "is_null(label, 1)"),
        ("is_null(x=label)", "is_null(x=label)"),
        ("label", "label"),
        ("1 < 2", "1 < 2"),
        ("label in label", "label in label"),
        ("label < None", "label < None"),
        ("label is 'x'", "label is 'x'"),
    ],
)
def test_refused_constructs(text, part):
    with pytest.raises(FilterError) as e:
        parse_filter(text)
    msg = str(e.value)
    assert repr(text) in msg or text in msg  # names the expression
    assert part in msg  # and the offending part


def test_nothing_is_ever_evaluated(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.chdir(tmp_path)
    for text in (
        f"__import__('os').system('touch {marker}')",
        f"__import__('pathlib').Path('{marker}').touch() == 1",
        f"open('{marker}', 'w')",
    ):
        with pytest.raises(FilterError):
            parse_filter(text)
    assert not marker.exists()
    src = Path(fe.__file__).read_text()
    assert not re.search(r"(?<![\w.])(eval|exec|compile)\(", src)
    assert "__import__" not in src.replace("__import__('os')", "")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("label ==", "not valid syntax"),
        ("label == 'a' and", "not valid syntax"),
        ("x" * (fe.MAX_LENGTH + 1), "limit"),
        ("not " * 200_000 + "label == 'a'", "limit"),
    ],
)
def test_bad_text(text, needle):
    with pytest.raises(FilterError, match=needle):
        parse_filter(text)


@pytest.mark.parametrize(
    "text",
    [
        "(" * 3000 + "label == 'a'" + ")" * 3000,
        "not " * 2400 + "label == 'a'",
        "label == 'a' or " * 600 + "rank > 1",
    ],
)
def test_deep_or_long_expressions_do_not_crash(text):
    assert len(text) < fe.MAX_LENGTH
    try:
        flt = parse_filter(text)
    except FilterError:
        return  # refused cleanly (too deep)
    flt.check(DF.schema)
    assert len(flt.mask(DF)) == DF.height


def test_check_unknown_column_lists_the_columns():
    with pytest.raises(FilterError) as e:
        parse_filter("nope == 1 and label == 'x'").check(DF.schema, where="table 'pairs'")
    msg = str(e.value)
    assert "unknown column 'nope'" in msg
    assert "table 'pairs' has columns: query_id, label, judge_p_yes, rank, subset" in msg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("label < 1", "compares the string column 'label' with a number"),
        ("judge_p_yes == 'high'", "compares the number column 'judge_p_yes' with a string"),
        ("label == rank", "compares a string column with a number column"),
        ("startswith(rank, '1')", "compares the number column 'rank' with a string"),
        ("rank in ['a']", "compares the number column 'rank' with a string"),
        ("rank in [1, 'a']", "mixes literal types"),
    ],
)
def test_check_types(text, needle):
    with pytest.raises(FilterError, match=re.escape(needle)):
        parse_filter(text).check(DF.schema)


def test_check_struct_column_only_null_tests():
    import pyarrow as pa

    from assay.curation.schema import QUERIES_SCHEMA

    schema = dict(zip(QUERIES_SCHEMA.names, QUERIES_SCHEMA.types, strict=True))
    parse_filter("is_null(image) and subset == 'vqa'").check(schema)
    with pytest.raises(FilterError, match="only is_null"):
        parse_filter("image == 'x'").check(schema)
    assert isinstance(schema["image"], pa.StructType)


def test_sample_keeps_a_stable_fraction_of_values_whatever_the_row_order():
    flt = parse_filter("subset != 'vqa' or sample(query_id, 0.1)")
    ids = [f"vqa-{i}" for i in range(20_000)]
    df = pl.DataFrame({"subset": ["vqa"] * len(ids) + ["cls"] * 3, "query_id": ids + ["c1", "c2", "c3"]})
    kept = set(df.filter(flt.mask(df))["query_id"])
    assert {"c1", "c2", "c3"} <= kept  # other subsets untouched
    assert 0.09 < (len(kept) - 3) / len(ids) < 0.11
    # the same ids on another run, in another order, split over other shards
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=3)
    halves = [shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2 :]]
    again = set().union(*(set(h.filter(flt.mask(h))["query_id"]) for h in halves))
    assert again == kept
    # a null id is never sampled; fraction 0 keeps nothing, 1 keeps everything
    nulls = pl.DataFrame({"query_id": ["a", None]})
    assert parse_filter("sample(query_id, 1)").mask(nulls).to_list() == [True, False]
    assert not parse_filter("sample(query_id, 0)").mask(df).any()


@pytest.mark.parametrize("text", ["sample(query_id, 1.5)", "sample(query_id, 'x')", "sample(query_id, True)"])
def test_sample_refuses_a_bad_fraction(text):
    with pytest.raises(FilterError, match="fraction between 0 and 1"):
        parse_filter(text)
