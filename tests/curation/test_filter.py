"""The filter stage: which tables an expression touches, referential integrity, pruning, resume, CLI."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from assay.curation.dataset import Dataset, write_dataset
from assay.curation.executor import LocalExecutor
from assay.curation.filter import filter_dataset
from assay.curation.filter_expr import FilterError
from assay.pipelines.commands.filter import command as filter_command


def rows(ds: Dataset, table: str) -> list[dict]:
    return [r for b in ds.iter_batches(table) for r in b.to_pylist()]


def ids(ds: Dataset, table: str) -> list:
    if table == "pairs":
        return [(r["query_id"], r["doc_id"]) for r in rows(ds, table)]
    key = "query_id" if table == "queries" else "doc_id"
    return [r[key] for r in rows(ds, table)]


@pytest.fixture
def source(tmp_path) -> Dataset:
    """4 queries (q0, q2 in 'ret'; q1, q3 in 'vqa'), 6 docs (odd ones 'vqa'), 12 pairs, small shards."""
    queries = [
        {
            "query_id": f"q{i}",
            "subset": "vqa" if i % 2 else "ret",
            "task": "vqa" if i % 2 else "retrieval",
            "instruction": "Find it.",
            "text": f"query {i}",
            "image": None,
        }
        for i in range(4)
    ]
    corpus = [
        {
            "doc_id": f"d{j}",
            "subset": "vqa" if j % 2 else "ret",
            "instruction": None,
            "text": f"doc {j}",
            "image": None,
        }
        for j in range(6)
    ]
    p_yes = {0: 0.9, 1: 0.1, 2: None, 3: 0.4, 4: 0.6, 5: None}
    pairs = []
    for i in range(4):
        for j in (i, i + 1, i + 2):
            label = "positive" if j == i else ("hard_negative" if j == i + 1 else "negative")
            pairs.append({"query_id": f"q{i}", "doc_id": f"d{j}", "label": label, "judge_p_yes": p_yes[j]})
    return write_dataset(
        tmp_path / "src", {"queries": queries, "corpus": corpus, "pairs": pairs}, rows_per_shard=4
    )


def test_subset_filter_pairs_follow(source, tmp_path):
    m = filter_dataset(source, tmp_path / "out", "subset == 'vqa'", executor=LocalExecutor(progress=False))
    out = Dataset(tmp_path / "out")
    assert ids(out, "queries") == ["q1", "q3"]
    assert ids(out, "corpus") == ["d1", "d3", "d5"]
    # only the pairs whose query and doc are both vqa survive
    assert ids(out, "pairs") == [("q1", "d1"), ("q1", "d3"), ("q3", "d3"), ("q3", "d5")]
    assert m.counts == {"queries": 2, "corpus": 3, "pairs": 4, "quarantine": 0}
    assert out.manifest.config == {"where": "subset == 'vqa'", "table": None, "prune": False}
    report = out.manifest.extra["filter"]
    assert report["applied_to"] == ["queries", "corpus"]
    assert report["dropped"] == {"queries": {"filter": 2}, "corpus": {"filter": 3}, "pairs": {"dangling": 8}}
    assert [s["stage"] for s in out.manifest.lineage] == ["write", "filter"]
    assert out.manifest.counts["quarantine"] == 0  # dropped, not quarantined


def test_label_filter_touches_pairs_only(source, tmp_path):
    filter_dataset(source, tmp_path / "out", "label == 'hard_negative'")
    out = Dataset(tmp_path / "out")
    assert ids(out, "pairs") == [("q0", "d1"), ("q1", "d2"), ("q2", "d3"), ("q3", "d4")]
    assert {r["label"] for r in rows(out, "pairs")} == {"hard_negative"}
    assert ids(out, "queries") == ids(source, "queries")
    assert ids(out, "corpus") == ids(source, "corpus")
    assert out.manifest.extra["filter"]["applied_to"] == ["pairs"]


def test_p_yes_filter_with_nulls(source, tmp_path):
    filter_dataset(source, tmp_path / "low", "judge_p_yes < 0.5")
    low = rows(Dataset(tmp_path / "low"), "pairs")
    assert low and all(r["judge_p_yes"] is not None and r["judge_p_yes"] < 0.5 for r in low)
    assert len(low) == 5  # d1 (0.1) twice and d3 (0.4) three times; the nulls compare false
    filter_dataset(source, tmp_path / "notHigh", "not (judge_p_yes >= 0.5)")
    not_high = rows(Dataset(tmp_path / "notHigh"), "pairs")
    assert sum(r["judge_p_yes"] is None for r in not_high) == 4  # d2 three times, d5 once: `not` keeps nulls
    assert len(not_high) == 9


def test_prune(source, tmp_path):
    m = filter_dataset(source, tmp_path / "out", "label == 'positive' and judge_p_yes >= 0.5", prune=True)
    out = Dataset(tmp_path / "out")
    assert ids(out, "pairs") == [("q0", "d0")]
    assert ids(out, "queries") == ["q0"]
    assert ids(out, "corpus") == ["d0"]
    assert m.extra["filter"]["dropped"] == {
        "queries": {"unreferenced": 3},
        "corpus": {"unreferenced": 5},
        "pairs": {"filter": 11},
    }
    # without --prune the queries and docs stay
    filter_dataset(source, tmp_path / "keep", "label == 'positive' and judge_p_yes >= 0.5")
    assert len(ids(Dataset(tmp_path / "keep"), "queries")) == 4


def test_table_option_limits_the_expression(source, tmp_path):
    filter_dataset(source, tmp_path / "out", "query_id != 'q1'", table="pairs")
    out = Dataset(tmp_path / "out")
    assert "q1" in ids(out, "queries")  # the queries table is not filtered
    assert all(q != "q1" for q, _ in ids(out, "pairs"))
    filter_dataset(source, tmp_path / "both", "query_id != 'q1'")  # default: every table with query_id
    assert "q1" not in ids(Dataset(tmp_path / "both"), "queries")
    with pytest.raises(FilterError, match="unknown column 'label'.*table 'queries' has columns"):
        filter_dataset(source, tmp_path / "bad", "label == 'x'", table="queries")


def test_errors_before_writing(source, tmp_path):
    for where, needle in [
        ("nope == 1", "unknown column 'nope'; the tables' columns are queries: query_id"),
        ("subset == 'vqa' and label == 'positive'", "no table has all of subset, label"),
        ("label.upper() == 'X'", r"call `label.upper\(\)` is not allowed"),
    ]:
        with pytest.raises(FilterError, match=needle):
            filter_dataset(source, tmp_path / "out", where)
        assert not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="OUT must be a new folder"):
        filter_dataset(source, source.root, "label == 'x'")


class Killed(Exception):
    pass


class DyingExecutor(LocalExecutor):
    """Runs the first ``n`` tasks of the write phase, then dies (as a killed run would)."""

    def __init__(self, n: int):
        super().__init__(progress=False)
        self.n = n

    def map(self, fn, tasks, desc):
        if desc.endswith("write"):
            for t in tasks[: self.n]:
                fn(t)
            raise Killed
        return super().map(fn, tasks, desc)


def test_resume_after_kill(source, tmp_path):
    where = "subset == 'vqa'"
    filter_dataset(source, tmp_path / "clean", where)
    with pytest.raises(Killed):
        filter_dataset(source, tmp_path / "resumed", where, executor=DyingExecutor(2))
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    m = filter_dataset(source, tmp_path / "resumed", where)
    clean, resumed = Dataset(tmp_path / "clean"), Dataset(tmp_path / "resumed")
    for t in ("queries", "corpus", "pairs"):
        assert rows(resumed, t) == rows(clean, t)
    assert m.extra["filter"] == clean.manifest.extra["filter"]


def test_cli(source, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(
        filter_command,
        [str(source.root), str(out), "--where", "label == 'hard_negative'", "--prune", "--executor", "local"],
    )
    assert res.exit_code == 0, res.output
    assert "filter: queries=4 corpus=4 pairs=4 quarantine=0" in res.output
    assert "unreferenced" in res.output
    assert Dataset(out).manifest.config["where"] == "label == 'hard_negative'"


def test_cli_unknown_column(source, tmp_path):
    res = CliRunner().invoke(
        filter_command,
        [str(source.root), str(tmp_path / "out"), "--where", "lable == 'x'", "--executor", "local"],
    )
    assert res.exit_code != 0
    assert "unknown column 'lable'" in res.output
    assert "pairs: query_id, doc_id, label" in res.output  # lists the columns
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--where", "__import__('os').system('x')"], "is not allowed"),
        (["--where", "label =="], "not valid syntax"),
        (["--where", "label == 'x'", "--table", "nope"], "Invalid value for '--table'"),
        ([], "Missing option '--where'"),
    ],
)
def test_cli_bad_arguments(source, tmp_path, args, needle):
    res = CliRunner().invoke(
        filter_command, [str(source.root), str(tmp_path / "out"), "--executor", "local", *args]
    )
    assert res.exit_code != 0
    assert needle in res.output


def test_cli_help():
    res = CliRunner().invoke(filter_command, ["--help"])
    assert res.exit_code == 0
    assert "--where" in res.output and "--prune" in res.output and "is_null(col)" in res.output


@pytest.mark.ray
def test_cli_ray(source, tmp_path, ray_local):
    out = tmp_path / "out"
    res = CliRunner().invoke(
        filter_command, [str(source.root), str(out), "--where", "subset == 'vqa'", "--executor", "ray"]
    )
    assert res.exit_code == 0, res.output
    assert ids(Dataset(out), "pairs") == [("q1", "d1"), ("q1", "d3"), ("q3", "d3"), ("q3", "d5")]
