"""`assay loop`: steps in order, skipped when complete, refused when changed, redone with --from,
failures recorded, and a loop killed during mining and during training that reaches the same final
metrics as one never interrupted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers.colours import colour_dataset, train_loop_steps
from helpers.kill import assay_cmd, assert_same_dataset, run_and_kill, run_ok
from safetensors.torch import load_file

from assay.curation.dataset import Dataset
from assay.pipelines.cli import cli
from assay.pipelines.loop import Loop, LoopError, load_loop


def write_loop(path: Path, steps: list[dict], **top) -> Path:
    path.write_text(
        yaml.safe_dump({"run_dir": str(path.parent / "run"), "executor": "local", **top, "steps": steps})
    )
    return path


def curation_steps(source: Path, where: str = "subset == 'vqa'") -> list[dict]:
    return [
        {"name": "valid", "run": "validate", "args": [str(source), "{run}/valid"]},
        {"name": "vqa", "run": "filter", "args": ["{valid}", "{run}/vqa"], "options": {"where": where}},
        {
            "name": "export",
            "run": "export",
            "args": ["{vqa}", "{run}/export/vqa.jsonl"],
            "options": {"format": "jsonl", "overwrite": True},
        },
    ]


def query_subsets(path: Path) -> set[str]:
    ds = Dataset(path)
    return {
        s
        for name in ds.shards("queries")
        for s in ds.read_shard("queries", name, ["subset"])["subset"].to_pylist()
    }


def loop(*args: str):
    return CliRunner().invoke(cli, ["loop", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return colour_dataset(tmp_path_factory.mktemp("colours") / "ds")


# ---------------------------------------------------------------- the loop file


@pytest.mark.parametrize(
    "steps, top, needle",
    [
        ([{"name": "a", "run": "rm", "args": []}], {}, r"`run` must be one of"),
        (
            [{"name": "a", "run": "validate", "args": ["{b}", "x"]}],
            {},
            r"step 1 \(a\): \{b\} names no earlier step",
        ),
        (
            [
                {"name": "a", "run": "validate", "args": ["{b}", "x"]},
                {"name": "b", "run": "validate", "args": ["y", "z"]},
            ],
            {},
            r"\{b\} names no earlier step \(it comes later\)",
        ),
        ([{"name": "a", "run": "validate"}, {"name": "a", "run": "validate"}], {}, "comes earlier too"),
        ([{"name": "s1", "run": "train"}], {}, "a train step needs `config:`"),
        ([{"name": "a", "run": "validate", "config": {}}], {}, "only train steps take `config`"),
        ([{"name": "a", "run": "validate", "colour": 1}], {}, r"step 1 \(a\): unknown key\(s\) colour"),
        (
            [{"name": "a", "run": "validate", "args": "x"}],
            {},
            r"step 1 \(a\): `args` must be a list, got 'x'",
        ),
        ([{"name": "a", "run": "validate"}], {"num_cpus": "4"}, r"`num_cpus` must be int, got '4'"),
        ([{"name": "a", "run": "validate"}], {"executor": "lcoal"}, r"`executor` must be one of 'ray' or"),
        (
            [{"name": "a", "run": "eval"}],
            {"ablation": [{"arm": "x", "eval": "a", "seed": 1}]},
            r"ablation arm 'x': unknown key\(s\) seed",
        ),
        ([{"name": "../x", "run": "validate"}], {}, "`name` must be"),
        (
            [{"name": "a", "run": "validate"}],
            {"ablation": [{"arm": "x", "eval": "a"}]},
            "is not an eval step",
        ),
        (
            [{"name": "a", "run": "validate"}],
            {"ablation": [{"arm": "x", "evals": ["a"]}]},
            "'a' is not an eval step",
        ),
        ([{"name": "a", "run": "validate"}], {"ablation": [{"arm": "x", "evals": []}]}, "must be a list"),
        ([{"name": "a", "run": "validate"}], {"ablation": [{"arm": "x"}]}, "one eval per seed"),
        ([{"name": "a", "run": "validate"}], {"nope": 1}, r"loop.yaml: unknown key\(s\) nope \(known: "),
    ],
)
def test_a_bad_loop_file_names_the_step_and_the_problem(tmp_path, steps, top, needle):
    f = write_loop(tmp_path / "loop.yaml", steps, **top)
    with pytest.raises(LoopError, match=needle):
        load_loop(f)
    res = loop(str(f))
    assert res.exit_code != 0 and str(f) in res.output


def test_a_loop_file_that_is_not_yaml_or_not_there(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [\n")
    assert "is not valid YAML" in loop(str(bad)).output
    assert "does not exist" in loop(str(tmp_path / "none.yaml")).output


# ---------------------------------------------------------------- running, skipping, redoing


def test_steps_run_in_order_then_are_skipped_refused_when_changed_and_redone_with_from(colours, tmp_path):
    f = write_loop(tmp_path / "loop.yaml", curation_steps(colours))
    res = loop(str(f))
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    records = {n: json.loads((run / "steps" / f"{n}.json").read_text()) for n in ("valid", "vqa", "export")}
    assert [r["index"] for r in records.values()] == [0, 1, 2]
    assert all(r["status"] == "complete" and r["seconds"] > 0 for r in records.values())
    # {valid} became the validate step's output; the loop-level executor reached the commands
    assert records["vqa"]["argv"][:4] == ["assay", "filter", str(run / "valid"), str(run / "vqa")]
    assert "--executor" in records["vqa"]["argv"] and "local" in records["vqa"]["argv"]
    assert records["vqa"]["outputs"] == {"dataset": str(run / "vqa")}
    subsets = query_subsets(run / "vqa")
    assert subsets == {"vqa"}
    exported = [json.loads(line) for line in (run / "export" / "vqa.jsonl").read_text().splitlines()]
    assert {r["subset"] for r in exported} == {"vqa"} and len(exported) == 16
    loop_record = json.loads((run / "loop.json").read_text())
    assert loop_record["steps"] == ["valid", "vqa", "export"] and loop_record["finished"]

    # a rerun runs nothing
    mtime = (run / "export" / "vqa.jsonl").stat().st_mtime_ns
    res = loop(str(f))
    assert res.exit_code == 0 and res.output.count("complete, skipped") == 3
    assert (run / "export" / "vqa.jsonl").stat().st_mtime_ns == mtime

    # a changed step is refused, and so is nothing else
    f = write_loop(tmp_path / "loop.yaml", curation_steps(colours, where="subset == 'retrieval'"))
    dry = loop(str(f), "--dry-run")
    states = {line.split()[1]: line.split()[2] for line in dry.output.splitlines()}
    assert states == {"valid": "complete", "vqa": "stale", "export": "complete"}
    res = loop(str(f))
    assert res.exit_code != 0 and "--from vqa" in res.output

    # --from redoes it and everything after it, with the new definition
    res = loop(str(f), "--from", "vqa")
    assert res.exit_code == 0, res.output
    assert "valid: complete, skipped" in res.output
    exported = [json.loads(line) for line in (run / "export" / "vqa.jsonl").read_text().splitlines()]
    assert {r["subset"] for r in exported} == {"retrieval"} and len(exported) == 16  # 4 queries x 4 images
    subsets = query_subsets(run / "vqa")
    assert subsets == {"retrieval"}


def test_a_complete_step_whose_output_was_deleted_runs_again(colours, tmp_path):
    f = write_loop(tmp_path / "loop.yaml", curation_steps(colours))
    assert loop(str(f)).exit_code == 0
    run = tmp_path / "run"
    shutil.rmtree(run / "vqa")  # deleted by hand; its record still says complete
    dry = loop(str(f), "--dry-run")
    states = {line.split()[1]: " ".join(line.split()[2:4]) for line in dry.output.splitlines()}
    assert states["vqa"] == "output missing" and states["valid"].startswith("complete")
    res = loop(str(f))
    assert res.exit_code == 0, res.output
    assert f"vqa: complete, but its output {run / 'vqa'} is gone: running it again" in res.output
    assert "valid: complete, skipped" in res.output and "export: complete, skipped" in res.output
    assert query_subsets(run / "vqa") == {"vqa"}
    assert loop(str(f)).output.count("complete, skipped") == 3


def test_a_failed_step_is_recorded_stops_the_loop_and_reruns_when_fixed(colours, tmp_path):
    f = write_loop(tmp_path / "loop.yaml", curation_steps(colours, where="colour == 'red'"))
    res = loop(str(f))
    assert res.exit_code == 1
    run = tmp_path / "run"
    failed = json.loads((run / "steps" / "vqa.json").read_text())
    assert failed["status"] == "failed" and "unknown column 'colour'" in failed["error"]
    assert not (run / "steps" / "export.json").exists()  # the loop stopped there
    assert json.loads((run / "loop.json").read_text())["finished"] is None
    # fixed: the failed step runs again (no --from needed), then the rest
    f = write_loop(tmp_path / "loop.yaml", curation_steps(colours))
    res = loop(str(f))
    assert res.exit_code == 0, res.output
    record = json.loads((run / "steps" / "vqa.json").read_text())
    assert record["status"] == "complete" and record["attempts"] == 2


def test_from_refuses_to_delete_outputs_outside_the_run_directory(colours, tmp_path):
    steps = curation_steps(colours)
    steps[1]["args"][1] = str(tmp_path / "elsewhere")
    f = write_loop(tmp_path / "loop.yaml", steps)
    assert loop(str(f)).exit_code == 0
    res = loop(str(f), "--from", "vqa")
    assert res.exit_code != 0 and "outside the run directory" in res.output
    assert (tmp_path / "elsewhere" / "manifest.json").exists()


def test_to_stops_after_the_step(colours, tmp_path):
    f = write_loop(tmp_path / "loop.yaml", curation_steps(colours))
    assert loop(str(f), "--to", "vqa").exit_code == 0
    assert not (tmp_path / "run" / "steps" / "export.json").exists()
    spec = load_loop(f)
    assert [s for _, s in Loop(spec).status()] == ["complete", "complete", "pending"]


# ---------------------------------------------------------------- killed during mining and training


@pytest.mark.timeout(900)
def test_a_loop_killed_during_mining_and_during_training_reaches_the_same_final_metrics(colours, tmp_path):
    (tmp_path / "clean").mkdir()
    clean = write_loop(tmp_path / "clean" / "loop.yaml", train_loop_steps(colours))
    run_ok(assay_cmd("loop", str(clean), "--no-report"), timeout=600)
    want = json.loads((tmp_path / "clean" / "run" / "metrics" / "eval.json").read_text())

    (tmp_path / "killed").mkdir()
    f = write_loop(tmp_path / "killed" / "loop.yaml", train_loop_steps(colours))
    run = tmp_path / "killed" / "run"
    # mining writes one file per finished subset: kill after the first of the two
    assert run_and_kill(
        assay_cmd("loop", str(f), "--no-report"), run, "mined/_progress/mined/*.parquet", 1, 600
    )
    assert json.loads((run / "steps" / "mine.json").read_text())["status"] == "running"
    # rerun: the mine step resumes (its first subset is not mined again); kill stage 2 mid-way
    assert run_and_kill(assay_cmd("loop", str(f), "--no-report"), run, "stage2/step-000010", 1, 600)
    assert not (run / "stage2" / "complete.json").exists()
    stage2 = json.loads((run / "steps" / "stage2.json").read_text())
    assert stage2["status"] == "running"
    out = run_ok(assay_cmd("loop", str(f), "--no-report"), timeout=600)
    assert "stage2: resuming" in out and "mine: complete, skipped" in out
    assert json.loads((run / "steps" / "stage2.json").read_text())["attempts"] == 2
    got = json.loads((run / "metrics" / "eval.json").read_text())
    assert got["per_subset"] == want["per_subset"] and got["overall"] == want["overall"]
    assert_same_dataset(tmp_path / "clean" / "run" / "mined", run / "mined")
    # the same weights, too
    final = json.loads((run / "steps" / "stage2.json").read_text())["outputs"]["checkpoint"]
    ref = json.loads((tmp_path / "clean" / "run" / "steps" / "stage2.json").read_text())["outputs"][
        "checkpoint"
    ]
    assert os.path.basename(final) == os.path.basename(ref)
    a, b = load_file(Path(final) / "model.safetensors"), load_file(Path(ref) / "model.safetensors")
    assert a.keys() == b.keys()
    # Bit for bit almost always; rarely a stage run in another process differs in its last bits and
    # Adam grows that to ~1e-5 (docs/RELIABILITY.md, "Not a resume bug"). A wrong resume (a step
    # lost or repeated, optimizer state lost) moves weights by about one step, ~lr = 1e-3.
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())
    assert diff <= 1e-4, f"stage 2 weights differ from the uninterrupted run's by {diff:.3g}"


def test_an_option_the_command_does_not_have_is_refused_before_anything_runs(colours, tmp_path):
    steps = curation_steps(colours)
    steps[0]["options"] = {"colour": "red"}
    f = write_loop(tmp_path / "loop.yaml", steps)
    res = loop(str(f))
    assert res.exit_code != 0 and "step valid: assay validate has no option --colour" in res.output
    assert not (tmp_path / "run" / "valid").exists()
