"""The bad-input corpus (tests/data/bad_inputs/, its README lists every kind): each bad input is fed
to the `assay` command that would meet it, and must end in one of two ways a user can see:

- a clear error: a non-zero exit; on stderr one paragraph that names the file (and the line, row
  or key where that applies) and says what is wrong; no Python traceback; no output left behind;
- a quarantine: exit 0; the bad row in OUT/quarantine with its reason and where it was; the good
  rows through.

Most kinds run in this process through ``pipelines.cli.main``, the entry point of the `assay` script
(its error handling included), with the process's stdout and stderr captured at the file-descriptor
level. The kinds marked ``sub=True`` run ``python -m pipelines.cli`` as a subprocess, the strongest
check that no traceback reaches the terminal; ``ASSAY_BAD_INPUTS_SUBPROCESS=1`` runs every kind so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.kill import assay_cmd

from assay.pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "bad_inputs"
ALL_SUBPROCESS = os.environ.get("ASSAY_BAD_INPUTS_SUBPROCESS", "") not in ("", "0")
LOCAL = ("--executor", "local")


@dataclass(frozen=True)
class Kind:
    """One kind of bad input. ``argv`` (after `assay`) may use {B} (a copy of the corpus), {out}
    (the output the command must not leave behind, or whose quarantine is checked) and {tmp}."""

    name: str
    argv: tuple[str, ...]
    tries: str
    #: clear error: substrings stderr must hold (the file, the line/row/key, what is wrong)
    error: tuple[str, ...] = ()
    code: int = 1  # the exit status of a clear error (click's usage errors: 2)
    #: quarantine: (reason, a marker of the bad row: in its source, id or detail), per bad row
    quarantine: tuple[tuple[str, str], ...] = ()
    kept: tuple[tuple[str, int], ...] = ()  # (table, rows that must come through)
    #: a command to run first (it must succeed); the checks apply to ``argv`` after it
    before: tuple[str, ...] = ()
    setup: Callable[[Path, Path], None] | None = None
    sub: bool = False
    slow: bool = False

    @property
    def command(self) -> str:
        return self.argv[0]

    @property
    def outcome(self) -> str:
        return "clear error" if self.error else "quarantine"


# --------------------------------------------------------------------------------------- setups


def _secret(b: Path, tmp: Path) -> None:
    """A real picture just outside the data roots that ``../../secret.png`` reaches."""
    shutil.copyfile(b / "ingest" / "escape" / "ok.png", b / "secret.png")


def _symlink_out(b: Path, tmp: Path) -> None:
    outside = tmp / "outside"
    outside.mkdir()
    shutil.copyfile(b / "ingest" / "escape" / "ok.png", outside / "secret.png")
    img = b / "datasets" / "image_symlink_out" / "img"
    img.mkdir(parents=True, exist_ok=True)
    os.symlink(outside / "secret.png", img / "link.png")


def _huge_text(b: Path, tmp: Path) -> None:
    """A JSONL file whose line 2 holds a 200 MB text field, written 1 MiB at a time."""
    with open(tmp / "huge.jsonl", "wb") as f:
        f.write(json.dumps({"query_text": "good one", "doc_text": "a"}).encode() + b"\n")
        f.write(b'{"doc_text": "huge", "query_text": "')
        block = b"x" * (1 << 20)
        for _ in range(200):
            f.write(block)
        f.write(b'"}\n')
        f.write(json.dumps({"query_text": "good two", "doc_text": "b"}).encode() + b"\n")


# ---------------------------------------------------------------------------------------- kinds

ING = "{B}/ingest"
D = "{B}/datasets"
C = "{B}/config"
L = "{B}/loop"

KINDS = [
    # ---- assay ingest
    Kind(
        "ingest-parquet-truncated",
        ("ingest", f"{ING}/truncated.parquet", "{out}", *LOCAL),
        "a Parquet file cut in half (no footer)",
        error=("truncated.parquet", "not a readable Parquet file"),
        sub=True,
    ),
    Kind(
        "ingest-parquet-wrong-column-types",
        ("ingest", f"{ING}/wrong_types.parquet", "{out}", *LOCAL),
        "Parquet with query_text as int64 (rows 0, 2) and a string score",
        quarantine=(
            ("wrong_type", "wrong_types.parquet#row=0"),
            ("wrong_type", "wrong_types.parquet#row=2"),
        ),
        kept=(("queries", 1), ("pairs", 1)),
        sub=True,
    ),
    Kind(
        "ingest-jsonl-latin1-bytes",
        ("ingest", f"{ING}/latin1.jsonl", "{out}", *LOCAL),
        "a latin-1 byte (0xe9) in line 2 of a UTF-8 JSONL file",
        quarantine=(("invalid_utf8", "latin1.jsonl:2"),),
        kept=(("pairs", 2),),
    ),
    Kind(
        "ingest-csv-latin1-bytes",
        ("ingest", f"{ING}/latin1.csv", "{out}", *LOCAL),
        "a latin-1 byte in a cell of line 3 of a UTF-8 CSV file",
        quarantine=(("invalid_utf8", "latin1.csv:3"),),
        kept=(("pairs", 2),),
    ),
    Kind(
        "ingest-csv-latin1-header",
        ("ingest", f"{ING}/latin1_header.csv", "{out}", *LOCAL),
        "a latin-1 byte in the CSV header row",
        error=("latin1_header.csv", "header row", "column 1", "not valid UTF-8"),
    ),
    Kind(
        "ingest-jsonl-utf16-bom",
        ("ingest", f"{ING}/utf16.jsonl", "{out}", *LOCAL),
        "a UTF-16 JSONL file (with its byte-order mark)",
        error=("utf16.jsonl", "UTF-16", "UTF-8"),
        sub=True,
    ),
    Kind(
        "ingest-csv-utf16-bom",
        ("ingest", f"{ING}/utf16.csv", "{out}", *LOCAL),
        "a UTF-16 CSV file (with its byte-order mark)",
        error=("utf16.csv", "UTF-16", "UTF-8"),
    ),
    Kind(
        "ingest-jsonl-malformed-line",
        ("ingest", f"{ING}/malformed_line.jsonl", "{out}", *LOCAL),
        "line 3 of 4 is broken JSON",
        quarantine=(("invalid_json", "malformed_line.jsonl:3"),),
        kept=(("pairs", 3),),
        sub=True,
    ),
    Kind(
        "ingest-csv-ragged-rows",
        ("ingest", f"{ING}/ragged.csv", "{out}", *LOCAL),
        "CSV rows with too few (line 3) and too many (line 4) fields",
        quarantine=(("missing_field", "ragged.csv:3"), ("invalid_csv", "ragged.csv:4")),
        kept=(("pairs", 2),),
    ),
    Kind(
        "ingest-jsonl-empty-file",
        ("ingest", f"{ING}/empty.jsonl", "{out}", *LOCAL),
        "a 0-byte JSONL file",
        error=("empty.jsonl", "empty"),
        sub=True,
    ),
    Kind(
        "ingest-csv-empty-file",
        ("ingest", f"{ING}/empty.csv", "{out}", *LOCAL),
        "a 0-byte CSV file",
        error=("empty.csv", "empty"),
    ),
    Kind(
        "ingest-jsonl-raw-nul-byte",
        ("ingest", f"{ING}/raw_nul.jsonl", "{out}", *LOCAL),
        "a raw NUL byte inside a JSON string (line 2)",
        quarantine=(("invalid_json", "raw_nul.jsonl:2"),),
        kept=(("pairs", 1),),
    ),
    Kind(
        "ingest-jsonl-lines-not-objects",
        ("ingest", f"{ING}/not_objects.jsonl", "{out}", *LOCAL),
        "JSON lines that are an array (line 2) and a string (line 3)",
        quarantine=(("wrong_type", "not_objects.jsonl:2"), ("wrong_type", "not_objects.jsonl:3")),
        kept=(("pairs", 1),),
    ),
    Kind(
        "ingest-jsonl-deep-nesting",
        ("ingest", f"{ING}/deep_nesting.jsonl", "{out}", *LOCAL),
        "line 2 nests arrays 5,000 deep (RecursionError in the JSON parser)",
        quarantine=(("invalid_json", "deep_nesting.jsonl:2"),),
        kept=(("pairs", 1),),
        sub=True,
    ),
    Kind(
        "ingest-embed-image-path-dotdot",
        ("ingest", f"{ING}/escape/pairs.jsonl", "{out}", "--embed-images", *LOCAL),
        "--embed-images with an image path ../../secret.png leaving the data root (the file exists)",
        quarantine=(("image_path_outside_root", "pairs.jsonl:2"),),
        kept=(("pairs", 1),),
        setup=_secret,
    ),
    Kind(
        "ingest-jsonl-id-clash",
        (
            "ingest",
            f"{ING}/id_clash.jsonl",
            "{out}",
            *("--map", "query_id=id", "--map", "query_text=question", "--map", "doc_image=image"),
            *LOCAL,
        ),
        "--map query_id=id, and id g5 on line 2 and again on line 4 with other content and another image",
        quarantine=(
            ("conflicting_id", "id_clash.jsonl:4"),
            ("conflicting_id", "first row, id_clash.jsonl:2"),
        ),
        kept=(("queries", 3), ("pairs", 3)),
    ),
    Kind(
        "ingest-mapping-unknown-target",
        (
            "ingest",
            f"{ING}/question_answer.jsonl",
            "{out}",
            "--mapping",
            f"{ING}/unknown_target.yaml",
            *LOCAL,
        ),
        "a --mapping YAML naming a target assay does not have (answer_text)",
        error=("unknown_target.yaml", "answer_text", "unknown target"),
    ),
    Kind(
        "ingest-captions-csv-missing-column",
        ("ingest", f"{ING}/images", "{out}", "--captions", f"{ING}/captions_no_column.csv", *LOCAL),
        "an image folder's --captions CSV without a caption column",
        error=("captions_no_column.csv", "caption"),
    ),
    Kind(
        "ingest-hf-folder-not-saved-dataset",
        ("ingest", f"{D}/not_a_dataset", "{out}", "--format", "hf", *LOCAL),
        "--format hf on a folder that save_to_disk did not write",
        error=("not_a_dataset", "save_to_disk"),
    ),
    Kind(
        "ingest-rows-per-shard-zero",
        ("ingest", f"{ING}/question_answer.jsonl", "{out}", "--rows-per-shard", "0", *LOCAL),
        "--rows-per-shard 0 (a count that must be >= 1)",
        error=("--rows-per-shard", "0 is not in the range x>=1"),
        code=2,
    ),
    Kind(
        "ingest-then-validate-200mb-text",
        ("validate", "{tmp}/raw", "{out}", *LOCAL),
        "a 200 MB text field (line 2 of a JSONL file, made at test time): ingested, then refused by validate",
        quarantine=(("text_too_long", "209715200 characters"), ("unknown_query_id", "is not in queries")),
        kept=(("queries", 2),),
        before=("ingest", "{tmp}/huge.jsonl", "{tmp}/raw", *LOCAL),
        setup=_huge_text,
        sub=True,
        slow=True,
    ),
    # ---- assay validate
    Kind(
        "validate-folder-not-a-dataset",
        ("validate", f"{D}/not_a_dataset", "{out}", *LOCAL),
        "a folder of notes and a CSV passed where a dataset is expected",
        error=("not_a_dataset", "not an assay dataset", "manifest.json"),
        sub=True,
    ),
    Kind(
        "validate-manifest-corrupt-json",
        ("validate", f"{D}/corrupt_manifest", "{out}", *LOCAL),
        "a dataset whose manifest.json is cut off mid-JSON",
        error=("corrupt_manifest/manifest.json", "unreadable manifest"),
    ),
    Kind(
        "validate-manifest-future-schema",
        ("validate", f"{D}/future_schema", "{out}", *LOCAL),
        "a dataset whose manifest claims schema_version 99",
        error=("future_schema/manifest.json", "schema_version 99", "not supported"),
    ),
    Kind(
        "validate-shard-truncated",
        ("validate", f"{D}/truncated_shard", "{out}", *LOCAL),
        "a dataset whose queries shard is a truncated Parquet file",
        error=("truncated_shard/queries/part-00000.parquet", "not a readable Parquet file"),
        sub=True,
    ),
    Kind(
        "dedup-shard-truncated",
        ("dedup", f"{D}/truncated_shard", "{out}", *LOCAL),
        "dedup of a dataset whose queries shard is a truncated Parquet file",
        error=("truncated_shard/queries/part-00000.parquet", "not a readable Parquet file"),
    ),
    Kind(
        "filter-shard-truncated",
        ("filter", f"{D}/truncated_shard", "{out}", "--where", "subset == 'a'", *LOCAL),
        "filter of a dataset whose queries shard is a truncated Parquet file",
        error=("truncated_shard/queries/part-00000.parquet", "not a readable Parquet file"),
    ),
    Kind(
        "validate-shard-wrong-column-types",
        ("validate", f"{D}/wrong_types", "{out}", *LOCAL),
        "a queries shard with text as int64 and image as a string",
        quarantine=(("wrong_type", "column text has type int64"), ("unknown_query_id", "q-1")),
        kept=(("corpus", 1),),
    ),
    Kind(
        "validate-duplicate-ids",
        ("validate", f"{D}/duplicate_ids", "{out}", *LOCAL),
        "a query_id given twice with the same content, another twice with different content (each row with its own pair)",
        quarantine=(("duplicate_id", "q-dup"), ("conflicting_id", "q-clash")),
        kept=(("queries", 2), ("pairs", 3)),
    ),
    Kind(
        "validate-pairs-unknown-ids",
        ("validate", f"{D}/dangling_pairs", "{out}", *LOCAL),
        "pairs naming a query_id and a doc_id that do not exist",
        quarantine=(("unknown_query_id", "q-missing"), ("unknown_doc_id", "d-missing")),
        kept=(("pairs", 1),),
        sub=True,
    ),
    Kind(
        "validate-nul-in-text",
        ("validate", f"{D}/nul_text", "{out}", *LOCAL),
        "a query text holding a NUL character (U+0000)",
        quarantine=(("nul_in_text", "q-nul"), ("unknown_query_id", "q-nul")),
        kept=(("queries", 1), ("pairs", 1)),
    ),
    Kind(
        "validate-unknown-label",
        ("validate", f"{D}/unknown_label", "{out}", *LOCAL),
        "a pair labelled Hard-Negative (not one of the four labels)",
        quarantine=(("invalid_label", "Hard-Negative"),),
        kept=(("pairs", 1),),
    ),
    Kind(
        "validate-image-is-a-text-file",
        ("validate", f"{D}/image_text_file", "{out}", *LOCAL),
        "an image path naming a text file called .png",
        quarantine=(("unreadable_image", "q-bad"), ("unknown_query_id", "q-bad")),
        kept=(("queries", 1),),
    ),
    Kind(
        "validate-image-decompression-bomb",
        ("validate", f"{D}/image_huge_header", "{out}", *LOCAL),
        "a PNG header claiming 100,000 x 100,000 pixels",
        quarantine=(("image_too_large", "10000000000 pixels"), ("unknown_query_id", "q-bad")),
        kept=(("queries", 1),),
        sub=True,
    ),
    Kind(
        "validate-image-truncated-png",
        ("validate", f"{D}/image_truncated", "{out}", *LOCAL),
        "a PNG cut in the middle of its pixel data",
        quarantine=(("truncated_image", "q-bad"), ("unknown_query_id", "q-bad")),
        kept=(("queries", 1),),
    ),
    Kind(
        "validate-image-zero-bytes",
        ("validate", f"{D}/image_zero_bytes", "{out}", *LOCAL),
        "an image file of 0 bytes",
        quarantine=(("unreadable_image", "q-bad"), ("unknown_query_id", "q-bad")),
        kept=(("queries", 1),),
    ),
    Kind(
        "validate-image-symlink-out-of-root",
        ("validate", f"{D}/image_symlink_out", "{out}", *LOCAL),
        "an image path that is a symlink to a picture outside the data root",
        quarantine=(("image_path_outside_root", "q-bad"), ("unknown_query_id", "q-bad")),
        kept=(("queries", 1),),
        setup=_symlink_out,
    ),
    Kind(
        "validate-image-path-dotdot",
        ("validate", f"{D}/image_dotdot_path", "{out}", *LOCAL),
        "an image path ../../secret.png leaving the data root (the file exists)",
        quarantine=(("image_path_outside_root", "q-bad"), ("unknown_query_id", "q-bad")),
        kept=(("queries", 1),),
        setup=_secret,
    ),
    Kind(
        "validate-image-path-absolute",
        ("validate", f"{D}/image_absolute_path", "{out}", *LOCAL),
        "an absolute image path (/etc/hostname) outside the data root",
        quarantine=(("image_path_outside_root", "q-bad"), ("unknown_query_id", "q-bad")),
        kept=(("queries", 1),),
    ),
    Kind(
        "validate-image-path-with-nul",
        ("validate", f"{D}/image_nul_path", "{out}", *LOCAL),
        "an image path holding a NUL character (ValueError in os.path)",
        quarantine=(("image_not_found", "q-bad"), ("unknown_query_id", "q-bad")),
        kept=(("queries", 1),),
    ),
    Kind(
        "validate-max-pixels-zero",
        ("validate", f"{D}/unknown_label", "{out}", "--max-pixels", "0", *LOCAL),
        "--max-pixels 0 (a limit that must be >= 1)",
        error=("--max-pixels", "0 is not in the range x>=1"),
        code=2,
    ),
    # ---- assay train (the config is checked before any work)
    Kind(
        "train-config-unknown-keys",
        ("train", f"{C}/unknown_keys.yaml"),
        "a training config with misspelt keys (learning_rate, batchsize)",
        error=("unknown_keys.yaml", "unknown key", "batchsize", "learning_rate"),
    ),
    Kind(
        "train-config-python-tag",
        ("train", f"{C}/python_tag.yaml"),
        "a training config with !!python/object/apply:os.system (must not run)",
        error=("python_tag.yaml", "python/object/apply:os.system", "no tags"),
        sub=True,
    ),
    Kind(
        "train-config-lr-not-a-number",
        ("train", f"{C}/lr_string.yaml"),
        'a training config with lr: "fast"',
        error=("lr_string.yaml", "lr must be float", "'fast'"),
    ),
    Kind(
        "train-config-batch-size-zero",
        ("train", f"{C}/batch_size_zero.yaml"),
        "a training config with batch_size: 0",
        error=("batch_size_zero.yaml", "batch_size", ">= 1"),
    ),
    Kind(
        "train-config-not-yaml",
        ("train", f"{C}/not_yaml.yaml"),
        "a training config that is not valid YAML (an unclosed flow mapping)",
        error=("not_yaml.yaml", "not valid YAML"),
    ),
    Kind(
        "train-config-top-level-list",
        ("train", f"{C}/top_level_list.yaml"),
        "a training config that is a YAML list, not a mapping",
        error=("top_level_list.yaml", "expected a mapping", "list"),
    ),
    Kind(
        "train-max-steps-zero",
        ("train", f"{C}/lr_string.yaml", "--max-steps", "0"),
        "--max-steps 0 (a count that must be >= 1)",
        error=("--max-steps", "0 is not in the range x>=1"),
        code=2,
    ),
    # ---- assay loop (the file is checked before any step runs)
    Kind(
        "loop-python-tag",
        ("loop", f"{L}/python_tag.yaml"),
        "a loop file with a !!python/object/apply:os.system step (must not run)",
        error=("python_tag.yaml", "python/object/apply:os.system", "not valid YAML"),
        sub=True,
    ),
    Kind(
        "loop-unknown-step-reference",
        ("loop", f"{L}/unknown_step_ref.yaml"),
        "a loop step reading {rwa}, a step that does not exist",
        error=("unknown_step_ref.yaml", "step 2 (valid)", "{rwa}", "names no earlier step"),
    ),
    Kind(
        "loop-unknown-command",
        ("loop", f"{L}/unknown_command.yaml"),
        "a loop step running `ingestt`, a command that does not exist",
        error=("unknown_command.yaml", "step 1 (raw)", "'ingestt'"),
    ),
    Kind(
        "loop-from-unknown-step",
        ("loop", f"{L}/two_steps.yaml", "--from", "nope"),
        "--from naming a step the loop file does not have",
        error=("two_steps.yaml", "no step named 'nope'"),
    ),
    # ---- assay mine
    Kind(
        "mine-batch-size-zero",
        ("mine", f"{D}/unknown_label", "{out}", "--encoder", "all-MiniLM-L6-v2", "--batch-size", "0"),
        "--batch-size 0 (a count that must be >= 1)",
        error=("--batch-size", "0 is not in the range x>=1"),
        code=2,
    ),
]


def _params():
    for k in KINDS:
        marks = [pytest.mark.slow] if k.slow else []
        yield pytest.param(k, id=k.name, marks=marks)


# ---------------------------------------------------------------------------------------- running


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_assay(argv: list[str], cwd: Path, sub: bool, capfd) -> Result:
    if sub:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("ASSAY_DEBUG", None)
        res = subprocess.run(assay_cmd(*argv), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
        return Result(res.returncode, res.stdout, res.stderr)
    capfd.readouterr()
    code: int | str | None = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    if isinstance(code, str):  # sys.exit("message")
        err, code = err + code, 1
    return Result(int(code or 0), out, err)


def _quarantine_rows(out: Path) -> list[dict]:
    rows = []
    for p in sorted((out / "quarantine").glob("*.parquet")):
        rows += pq.read_table(p, columns=["table", "id", "reason", "detail", "stage", "source"]).to_pylist()
    return rows


def _rows(out: Path, table: str) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in (out / table).glob("*.parquet"))


@pytest.mark.parametrize("kind", list(_params()))
def test_bad_input(kind: Kind, tmp_path, monkeypatch, capfd):
    bad = tmp_path / "bad_inputs"
    shutil.copytree(CORPUS, bad, symlinks=True, ignore=shutil.ignore_patterns("*.md", "*.py"))
    out = tmp_path / "out"
    if kind.setup:
        kind.setup(bad, tmp_path)
    fill = {"B": str(bad), "out": str(out), "tmp": str(tmp_path)}
    work = tmp_path / "work"  # the current directory: relative paths in configs and loops land here
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("ASSAY_DEBUG", raising=False)
    sub = kind.sub or ALL_SUBPROCESS
    if kind.before:
        first = run_assay([a.format(**fill) for a in kind.before], work, sub, capfd)
        assert first.code == 0, f"{kind.before[0]} failed:\n{first.stdout}\n{first.stderr}"
    res = run_assay([a.format(**fill) for a in kind.argv], work, sub, capfd)
    shown = f"exit {res.code}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"

    assert "Traceback (most recent call last)" not in res.stdout + res.stderr, shown
    assert "pwned" not in res.stdout + res.stderr, shown  # a YAML python tag never runs
    if kind.error:
        assert res.code == kind.code, shown
        message = res.stderr[res.stderr.find("Error:") :].strip()
        assert res.stderr.count("Error:") == 1 and message, shown
        assert "\n\n" not in message, f"not one paragraph:\n{shown}"
        for needle in kind.error:
            assert needle in message, f"{needle!r} not in the error:\n{shown}"
        assert "internal error" not in message, shown
        assert not out.exists(), f"{out} left behind: {sorted(p.name for p in out.iterdir())}"
        assert not any(work.iterdir()), f"left behind in the current directory: {list(work.iterdir())}"
        assert not list(tmp_path.glob(".*.lock")), "a lock file left beside the output"
        return
    assert res.code == 0, shown
    assert (out / "manifest.json").is_file() and not (out / "_progress").exists(), shown
    stage = kind.command
    got = [r for r in _quarantine_rows(out) if r["stage"] == stage]
    for reason, marker in kind.quarantine:
        hits = [
            r
            for r in got
            if r["reason"] == reason and any(marker in (r[c] or "") for c in ("source", "id", "detail"))
        ]
        assert hits, f"no {reason} row marked {marker!r} in the quarantine: {got}\n{shown}"
        assert all(r["detail"] for r in hits), hits
    assert {r["reason"] for r in got} == {reason for reason, _ in kind.quarantine}, f"other reasons: {got}"
    for table, n in kind.kept:
        assert _rows(out, table) == n, f"{table}: {_rows(out, table)} rows came through, expected {n}"


def test_the_corpus_is_small_and_covers_enough_kinds():
    files = [p for p in CORPUS.rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 50_000 for p in files), [p for p in files if p.stat().st_size >= 50_000]
    assert sum(p.stat().st_size for p in files) < 500_000
    assert len({k.name for k in KINDS}) == len(KINDS) >= 24
    readme = (CORPUS / "README.md").read_text()
    missing = [k.name for k in KINDS if f"`{k.name}`" not in readme]
    assert not missing, f"kinds not listed in tests/data/bad_inputs/README.md: {missing}"


def test_ingest_an_id_clash_takes_its_pair_with_it(tmp_path):
    """Issue 15, point 4, as a property: 400 JSONL rows naming their own ids (--map query_id=id), ids
    drawn from 120, so many come back with the same question (another pair of that query: kept) or
    another question (a clash), read in several tasks. Every clashing row is refused with its pair,
    its detail naming the line of the id's first row; no other row is; and the kept pairs are exactly
    the (question, image) statements of the kept rows: nothing the input did not say."""
    import random

    from assay.curation.dataset import Dataset
    from assay.curation.executor import LocalExecutor
    from assay.curation.ingest import ingest
    from assay.curation.quarantine import decode_record

    rng = random.Random(15)
    rows, first = [], {}
    questions = ["a red square", "a blue circle", "a green triangle", "a orange square number 5"]
    for line in range(1, 401):
        row = {
            "id": f"g{rng.randrange(120)}",
            "question": rng.choice(questions),
            "image": f"img/{rng.randrange(5)}.png",
        }
        rows.append(row)
        first.setdefault(row["id"], (line, row["question"]))
    path = tmp_path / "clash.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mapping = {"query_id": "id", "query_text": "question", "doc_image": "image"}
    m = ingest(
        path, tmp_path / "out", mapping=mapping, chunk_bytes=3000, executor=LocalExecutor(progress=False)
    )
    assert m.extra["read_tasks"] > 3

    clashing = {n: r for n, r in enumerate(rows, 1) if r["question"] != first[r["id"]][1]}
    assert 50 < len(clashing) < 350
    refused = {}
    for q in _quarantine_rows(tmp_path / "out"):
        assert q["reason"] == "conflicting_id", q
        refused[int(q["source"].rsplit(":", 1)[1])] = q
    assert set(refused) == set(clashing)
    for n, q in refused.items():
        assert f"first row, clash.jsonl:{first[clashing[n]['id']][0]}" in q["detail"], q["detail"]
    records = [decode_record(r) for p in sorted((tmp_path / "out" / "quarantine").glob("*.parquet"))
               for r in pq.read_table(p, columns=["record"]).column("record").to_pylist()]  # fmt: skip
    assert {(r["query_id"], r["query_text"], r["doc_image"]["path"]) for r in records} == {
        (r["id"], r["question"], r["image"]) for r in clashing.values()
    }

    out = Dataset(tmp_path / "out")
    read = lambda t: [r for b in out.iter_batches(t) for r in b.to_pylist()]  # noqa: E731
    text = {r["query_id"]: r["text"] for r in read("queries")}
    image = {r["doc_id"]: r["image"]["path"] for r in read("corpus")}
    kept_pairs = {(p["query_id"], text[p["query_id"]], image[p["doc_id"]]) for p in read("pairs")}
    stated = {(r["id"], r["question"], r["image"]) for n, r in enumerate(rows, 1) if n not in clashing}
    assert kept_pairs == stated
    assert len(text) == len(first) and m.extra["conflicting_id_rows"] == len(clashing)
