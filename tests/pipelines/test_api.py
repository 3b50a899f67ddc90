"""assay from Python (`import assay`): the README's "From Python" code runs; every option of a command
is a keyword of its function; a stage returns one `Result` that says what it wrote and counted; a
second writer is refused from Python as from the CLI."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from helpers.badrows import make_fuzz_rows, queries_table

import assay
from assay.curation.dataset import Dataset, write_dataset
from assay.curation.lock import OutputInUse
from assay.pipelines import api
from assay.pipelines.cli import cli
from assay.pipelines.loop import STAGES

REPO = Path(__file__).resolve().parents[2]


def _readme_python() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the From Python section has one code block"
    return blocks[0]


@pytest.mark.timeout(600)
def test_the_readme_from_python_section_runs(tmp_path):
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", _readme_python()], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()  # the trainer prints its own lines between them

    def line(prefix: str) -> str:
        found = [x for x in lines if x.startswith(prefix)]
        assert len(found) == 1, (prefix, res.stdout)
        return found[0]

    # what the comments in the README say it prints
    assert (
        line("validate: ")
        == "validate: runs/py/valid  queries=73 corpus=33 pairs=73 quarantine=2  quarantined=2"
    )
    assert line("{'image_not_found'") == "{'image_not_found': 1, 'unknown_query_id': 1}"
    assert line("runs/py/stage2/") == "runs/py/stage2/step-000060 {'steps': 60}"
    p_at_1 = float(lines[lines.index(line("runs/py/stage2/")) + 1])
    assert 0.0 <= p_at_1 <= 1.0  # (how good a 60-step model is, is the benchmarks' business)
    exported = line("export: ")
    assert exported.startswith("export: runs/py/train.jsonl  rows=")
    rows = (tmp_path / "runs/py/train.jsonl").read_text().splitlines()
    assert len(rows) == int(exported.rsplit("=", 1)[1]) > 0


def _long_options(command: click.Command) -> set[str]:
    return {
        o[2:].replace("-", "_")
        for p in command.params
        if isinstance(p, click.Option)
        for o in p.opts
        if o.startswith("--")
    } - {"help"}


@pytest.mark.parametrize("run", sorted(STAGES))
def test_every_option_of_a_command_is_a_keyword_of_its_function(run):
    fn = getattr(assay, STAGES[run])
    params = inspect.signature(fn).parameters
    keywords = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    missing = _long_options(cli.commands[run]) - keywords
    assert not missing, f"assay {run} has options that assay.{STAGES[run]} lacks: {sorted(missing)}"
    positional = [n for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    arguments = [p.name for p in cli.commands[run].params if isinstance(p, click.Argument)]
    assert len(positional) == len(arguments), (positional, arguments)


@pytest.fixture
def raw(tmp_path) -> tuple[Dataset, dict]:
    queries, corpus, pairs, expected = make_fuzz_rows(
        tmp_path / "data", tmp_path / "outside", n_good=20, n_bad=12, seed=4, max_text_chars=1000
    )
    ds = write_dataset(
        tmp_path / "raw",
        {"queries": queries_table(queries), "corpus": corpus, "pairs": pairs},
        rows_per_shard=9,
        data_root=str(tmp_path / "data"),
    )
    return ds, expected


def test_a_stage_returns_what_it_wrote_and_counted(raw, tmp_path):
    ds, expected = raw
    by_path = assay.validate(ds.root, tmp_path / "a", max_text_chars=1000, executor="local")
    by_dataset = assay.validate(ds, tmp_path / "b", max_text_chars=1000, executor="local")
    assert isinstance(by_path, assay.Result) and by_path.stage == "validate"
    assert by_path.out == tmp_path / "a" and by_path.dataset.manifest.counts == by_path.counts
    assert by_path.counts == by_dataset.counts and by_path.quarantined == by_dataset.quarantined
    # the refused rows, per reason, are the ones the fuzz rows were made to trigger
    want: dict[str, int] = {}
    for _, reason in expected.values():
        want[reason] = want.get(reason, 0) + 1
    assert {r: by_path.quarantined.get(r, 0) for r in want} == want
    assert sum(by_path.quarantined.values()) == by_path.counts["quarantine"]
    # a later stage counts only its own refusals; the earlier ones stay in the quarantine
    dedup = assay.dedup(by_path.dataset, tmp_path / "c", executor="local")
    assert not set(dedup.quarantined) & set(want)
    assert dedup.counts["quarantine"] == by_path.counts["quarantine"] + sum(dedup.quarantined.values())


def test_a_second_writer_is_refused_from_python(raw, tmp_path):
    ds, _ = raw
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from assay.curation.lock import output_lock\n"
            f"with output_lock({str(out)!r}, command='assay validate'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        with pytest.raises(OutputInUse, match="assay validate"):
            assay.validate(ds, out, executor="local")
        assert time.perf_counter() - start < 5
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert assay.validate(ds, out, max_text_chars=1000, executor="local").counts["queries"] > 0


def test_bad_options_are_refused_before_anything_is_written(raw, tmp_path):
    ds, _ = raw
    with pytest.raises(ValueError, match="unknown column"):
        assay.filter(ds, tmp_path / "f", where="no_such_column == 1", executor="local")
    with pytest.raises(ValueError, match="--keep needs --judge"):
        assay.mine(ds, tmp_path / "m", encoder="all-MiniLM-L6-v2", keep=3)
    with pytest.raises(ValueError, match="not a model directory"):
        assay.judge(ds, tmp_path / "j", model=str(tmp_path / "nowhere"))
    assert not any((tmp_path / n).exists() for n in ("f", "m", "j"))
    # options are checked against their types, converted where a text says a number (a loop file)
    with pytest.raises(ValueError, match=r"assay.validate: max_image_mb: Input should be a valid number"):
        assay.validate(ds, tmp_path / "v", max_image_mb="lots", executor="local")
    assert not (tmp_path / "v").exists()
    ok = assay.validate(ds, tmp_path / "v", max_text_chars="1000", no_decode="true", executor="local")
    assert (
        ok.dataset.manifest.config
        == assay.validate(
            ds, tmp_path / "w", max_text_chars=1000, no_decode=True, executor="local"
        ).dataset.manifest.config
    )


def test_import_assay_is_cheap():
    code = "import sys, assay; print(sorted(m for m in ('torch', 'ray', 'pyarrow') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    assert {*api.__all__, "Loop", "__version__"} == set(assay.__all__)
