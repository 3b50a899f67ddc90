"""The mine-train loop: the steps of a YAML file, run in order into one run directory.

A loop file names a run directory and a list of steps; each step is one ``assay`` command (ingest,
validate, dedup, filter, curate, train, eval, mine, judge, export), with its positional ``args``
and its ``options`` (``--key value``; ``true`` for a flag). ``{run}`` is the run directory and
``{NAME}`` is what an earlier step NAME produced: a dataset directory, the final checkpoint of a
train step, the metrics file of an eval step, the file an export wrote. A train step gives its
config inline (``config:``, written to ``RUN/steps/NAME.train.yaml``) or as a path.

    name: quickstart
    run_dir: runs/quickstart
    executor: local                   # or ray; ray_address: runs every Ray stage on a cluster
    steps:
      - {name: raw, run: ingest, args: [easy-vqa, "{run}/raw"], options: {format: example}}
      - {name: train-valid, run: validate, args: ["{raw}/train", "{run}/train-valid"]}
      - name: stage1
        run: train
        config: {stage: "1", data: ["{train-valid}"], output: "{run}/stage1", tiny: {}}
      - {name: eval-s1, run: eval, args: ["{stage1}", "{test-valid}"]}
    ablation:                         # optional: eval steps to put side by side in the report
      - {arm: "no hard negatives", eval: eval-s1}
      # or one eval per seed: the report shows each subset's mean and spread over them
      # - {arm: "no hard negatives", evals: [eval-s1, eval-s1-seed1, eval-s1-seed2]}

The file's schema is ``LoopFile`` (pydantic, ``curation.config_schema.StrictModel``): an unknown key,
a value of the wrong type or an unknown command is refused before any step runs, with the file and
the step named (``loop.yaml: step 2 (valid): unknown key(s) colour (known: args, config, ...)``).

Each step leaves ``RUN/steps/NAME.json``: its command line, a fingerprint (the command line, the
train config and the fingerprints of the steps it reads), status, start, end and seconds, and
what it produced. On a rerun a complete step with the same fingerprint is skipped; a step that was
killed is run again with the same command line, and its stage resumes at the shard, subset or
checkpoint it reached (every stage does, see DESIGN.md). A complete step whose definition changed
is refused until ``--from NAME`` redoes it and every step after it (their outputs inside the run
directory are removed first). ``RUN/report.html`` is written at the end, and after a failure.

A step runs in this process as a call of the stage's function in ``assay.pipelines.api`` (``eval``:
``evaluate``) with the step's args and its options as keywords (``--max-text-chars`` is
``max_text_chars``; an option the function does not take is refused before anything runs), so a
local Ray runtime started by the first Ray stage serves them all, and each step's ``Result`` is kept
in ``Loop.results``. The command line recorded for the step is the same call on the command line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import inspect
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from assay.curation import storage
from assay.curation.config_schema import Loc, StrictModel, dotted, explain
from assay.curation.dataset import atomic_write_bytes, atomic_write_json
from assay.curation.lock import output_lock

#: The commands a step may run, and what each produces (the output a later ``{NAME}`` names).
DATASET_COMMANDS = ("ingest", "validate", "dedup", "filter", "curate", "mine", "judge")
COMMANDS = (*DATASET_COMMANDS, "train", "eval", "export")
Command = Literal[COMMANDS]
#: Loop-level settings handed to every command that has the option and whose step does not set it.
SHARED_SETTINGS = ("executor", "ray_address", "num_cpus", "device")
_REF = re.compile(r"\{([A-Za-z0-9_.-]+)\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class LoopError(ValueError):
    """A loop file or run directory that cannot be used; the message says which step and why."""


class StepEntry(StrictModel):
    """One step as the loop file gives it (the schema of an entry of ``steps``)."""

    name: str
    run: Command
    args: list[Any] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] | str | None = None

    @field_validator("args", "options", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any, info: ValidationInfo) -> Any:
        """``args:`` with nothing after it (YAML null) is no args."""
        return ([] if info.field_name == "args" else {}) if value is None else value

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value) or value == "run":
            raise ValueError("must be letters, digits, '-', '_' or '.' (and not 'run')")
        return value

    @model_validator(mode="after")
    def _config_for_train_only(self) -> StepEntry:
        if self.run == "train" and self.config is None:
            raise ValueError("a train step needs `config:` (a mapping, or a YAML file's path)")
        if self.run != "train" and self.config is not None:
            raise ValueError("only train steps take `config`")
        return self


class Step(StepEntry):
    """A step of a checked loop: its entry and its place in the file."""

    index: int = 0


class AblationArm(StrictModel):
    """An entry of ``ablation``: one arm and its eval step, or one eval step per seed."""

    arm: str
    eval: str | None = None
    evals: list[str] | None = None

    @model_validator(mode="after")
    def _eval_or_evals(self) -> AblationArm:
        if (self.eval is None) == (self.evals is None):
            raise ValueError(
                "each ablation entry is {arm: TEXT, eval: STEP} or {arm: TEXT, evals: [STEP, ...]} "
                "(one eval per seed)"
            )
        if self.evals == []:
            raise ValueError("`evals` must be a list of eval steps, not an empty one")
        return self


class LoopFile(StrictModel):
    """The schema of a loop file (see the module docstring)."""

    name: str | None = None
    run_dir: str | None = None
    steps: list[StepEntry] = Field(min_length=1, description="the steps, in order")
    ablation: list[AblationArm] | None = None
    executor: Literal["ray", "local"] | None = None
    ray_address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] | None = None


@dataclass
class LoopSpec:
    name: str
    run_dir: Any  # a Path, or a UPath for a URI (curation.storage.path)
    steps: list[Step]
    settings: dict[str, Any]
    ablation: list[dict[str, Any]]  # {arm, evals: [eval step per seed]}
    source: Path

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise LoopError(f"{self.source}: no step named {name!r}; the steps are {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]


def load_loop(path: str | Path, run_dir: str | Path | None = None) -> LoopSpec:
    """Read and check a loop file (``yaml.safe_load``, then ``LoopFile``); every problem names the
    file and the step."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise LoopError(f"loop file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise LoopError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise LoopError(f"{path}: expected a mapping with run_dir and steps, got {type(raw).__name__}")
    try:
        spec = LoopFile.model_validate(raw)
    except ValidationError as e:
        raise LoopError(f"{path}: {explain(e, LoopFile, lambda loc: _where(raw, loc))}") from None
    run_dir = run_dir if run_dir is not None else spec.run_dir
    if not run_dir:
        raise LoopError(f"{path}: no run_dir (give one in the file or with --run-dir)")
    steps: dict[str, Step] = {}
    for i, entry in enumerate(spec.steps):
        where = f"{path}: step {i + 1} ({entry.name})"
        if entry.name in steps:
            raise LoopError(f"{where}: a step named {entry.name!r} comes earlier too")
        # every {NAME} must be an earlier step (or {run})
        for ref in _refs([entry.args, entry.options, entry.config]):
            if ref != "run" and ref not in steps:
                later = " (it comes later)" if any(s.name == ref for s in spec.steps) else ""
                raise LoopError(f"{where}: {{{ref}}} names no earlier step{later}")
        steps[entry.name] = Step(**entry.model_dump(), index=i)
    arms = []
    for a in spec.ablation or []:
        evals = a.evals if a.evals is not None else [a.eval]
        for ev in evals:
            if ev not in steps or steps[ev].run != "eval":
                raise LoopError(f"{path}: ablation arm {a.arm!r}: {ev!r} is not an eval step")
        arms.append({"arm": a.arm, "evals": evals})
    settings = {k: getattr(spec, k) for k in SHARED_SETTINGS if getattr(spec, k) is not None}
    return LoopSpec(spec.name or path.stem, storage.path(run_dir), list(steps.values()), settings, arms, path)


def _where(raw: dict[str, Any], loc: Loc) -> str:
    """A place in a loop file as its author knows it: ``step 2 (valid): `options```, ``ablation
    arm 'x'``, `` `run_dir` ``."""
    if len(loc) >= 2 and loc[0] in ("steps", "ablation") and isinstance(loc[1], int):
        entries = raw.get(loc[0])
        entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
        label = entry.get("name" if loc[0] == "steps" else "arm") if isinstance(entry, dict) else None
        if loc[0] == "steps":
            head = f"step {loc[1] + 1}" + (f" ({label})" if label is not None else "")
        else:
            head = f"ablation arm {label!r}" if label is not None else f"ablation entry {loc[1] + 1}"
        return head + (f": `{dotted(loc[2:])}`" if loc[2:] else "")
    return f"`{dotted(loc)}`"


def _refs(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return _REF.findall(obj)
    if isinstance(obj, dict):
        return [r for v in obj.values() for r in _refs(v)]
    if isinstance(obj, list | tuple):
        return [r for v in obj for r in _refs(v)]
    return []


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Loop:
    """Runs a loop file (a path, or the :class:`LoopSpec` ``load_loop`` read); see the module
    docstring. ``Loop("examples/quickstart.yaml").run()`` from Python is ``assay loop`` on the
    command line; each step's ``assay.Result`` is kept in ``results``."""

    def __init__(
        self,
        spec: LoopSpec | str | os.PathLike,
        *,
        run_dir: str | os.PathLike | None = None,
        echo: Callable[[str], None] = print,
    ):
        if not isinstance(spec, LoopSpec):
            spec = load_loop(spec, run_dir=run_dir)
        self.spec = spec
        self.results: dict[str, Any] = {}
        self.run_dir = storage.path(storage.absolute(spec.run_dir))
        self.steps_dir = self.run_dir / "steps"
        self.echo = echo

    # -- the state of each step, on disk

    def manifest_path(self, step: Step) -> Path:
        return self.steps_dir / f"{step.name}.json"

    def manifest(self, step: Step) -> dict[str, Any] | None:
        p = self.manifest_path(step)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise LoopError(f"{p} is not valid JSON ({e}); delete it to rerun step {step.name}") from e

    def _write(self, step: Step, record: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path(step), record)

    def _write_loop_record(self, finished: bool) -> None:
        p = self.run_dir / "loop.json"
        old = json.loads(p.read_text()) if p.exists() else {}
        atomic_write_json(
            p,
            {
                "file": str(self.spec.source.resolve()),
                "name": self.spec.name,
                "steps": self.spec.names,
                "ablation": self.spec.ablation,
                "settings": self.spec.settings,
                "started": old.get("started") if old.get("finished") is None and old else _now(),
                "finished": _now() if finished else None,
            },
        )

    # -- resolving a step into a command line

    def _output_of(self, name: str) -> str:
        m = self.manifest(self.spec.step(name))
        if not m or m.get("status") != "complete":
            raise LoopError(f"step {name} has not completed, so nothing it produces can be used yet")
        out = m["outputs"]
        return next(iter(out.values()))

    def _sub(self, obj: Any) -> Any:
        if isinstance(obj, str):
            return _REF.sub(lambda m: str(self.run_dir) if m[1] == "run" else self._output_of(m[1]), obj)
        if isinstance(obj, dict):
            return {k: self._sub(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._sub(v) for v in obj]
        return obj

    def resolve(self, step: Step) -> tuple[list[str], dict[str, Any] | None, dict[str, Any]]:
        """The step's argv (after ``assay``: the command line it is the same as, recorded and
        fingerprinted), its train config (train steps) and its expected outputs."""
        call = self.call(step)
        return call.argv, call.config, call.outputs

    def call(self, step: Step) -> StepCall:
        """What running ``step`` calls: the ``assay.pipelines.api`` function, its arguments and
        keywords (the step's options with the loop's settings), and the command line it equals."""
        args = [str(a) for a in self._sub(step.args)]
        options = dict(self._sub(step.options))
        config: dict[str, Any] | None = None
        outputs: dict[str, Any] = {}
        params = stage_options(step.run)
        options = {str(k).replace("_", "-"): v for k, v in options.items()}
        unknown = sorted(k for k in options if k not in params)
        if unknown:
            raise LoopError(
                f"step {step.name}: assay {step.run} has no option {', '.join('--' + k for k in unknown)} "
                f"(see assay {step.run} --help)"
            )
        for key, value in self.spec.settings.items():
            flag = key.replace("_", "-")
            if flag in params and flag not in options:
                options[flag] = value
        if step.run == "train":
            if isinstance(step.config, str):
                cfg_path = Path(self._sub(step.config))
                try:
                    config = yaml.safe_load(cfg_path.read_text())
                except (OSError, yaml.YAMLError) as e:
                    raise LoopError(f"step {step.name}: cannot read its config {cfg_path}: {e}") from e
            else:
                config = self._sub(step.config)
            if not isinstance(config, dict) or "output" not in config:
                raise LoopError(f"step {step.name}: the train config must be a mapping with `output`")
            args = [str(self.steps_dir / f"{step.name}.train.yaml")]
            outputs = {"train_dir": storage.absolute(config["output"])}
        elif step.run == "eval":
            options.setdefault("out", str(self.run_dir / "metrics" / f"{step.name}.json"))
            outputs = {"metrics": storage.absolute(options["out"])}
        elif len(args) < 2:
            raise LoopError(f"step {step.name}: `assay {step.run}` takes INPUT and OUT as its two args")
        elif step.run == "export":
            outputs = {"path": storage.absolute(args[1])}
        else:
            outputs = {"dataset": storage.absolute(args[1])}
        argv = [step.run, *args]
        for key, value in options.items():
            flag = "--" + key
            if value is True:
                argv.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, list):
                for v in value:
                    argv += [flag, str(v)]
            else:
                argv += [flag, str(value)]
        keywords = {k.replace("-", "_"): v for k, v in options.items()}
        return StepCall(STAGES[step.run], args, keywords, argv, config, outputs)

    def fingerprint(self, step: Step, argv: list[str], config: dict[str, Any] | None) -> str:
        upstream = {}
        for ref in sorted(set(_refs([step.args, step.options, step.config])) - {"run"}):
            m = self.manifest(self.spec.step(ref)) or {}
            upstream[ref] = m.get("fingerprint")
        blob = json.dumps({"argv": argv, "config": config, "upstream": upstream}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    # -- running

    def status(self) -> list[tuple[Step, str]]:
        """Each step with complete / output missing / stale / interrupted / failed / pending (--dry-run)."""
        out = []
        for step in self.spec.steps:
            m = self.manifest(step)
            if m is None:
                out.append((step, "pending"))
                continue
            state = m.get("status")
            if state == "complete":
                try:
                    argv, config, _ = self.resolve(step)
                    same = self.fingerprint(step, argv, config) == m.get("fingerprint")
                except LoopError:
                    same = False
                state = ("output missing" if _missing_outputs(m) else "complete") if same else "stale"
                out.append((step, state))
            else:
                out.append((step, "interrupted" if state == "running" else str(state)))
        return out

    def redo_from(self, name: str) -> None:
        """Forget ``name`` and every later step, and remove their outputs (inside the run dir only)."""
        start = self.spec.step(name).index
        for step in self.spec.steps[start:]:
            m = self.manifest(step)
            if m is None:
                continue
            for out in m.get("outputs", {}).values():
                self._remove(step, out)
            storage.remove_file(self.manifest_path(step))
            self.echo(f"{step.name}: forgotten; it will run again")

    def _remove(self, step: Step, out: str) -> None:
        path, run_dir = storage.absolute(out), str(self.run_dir)
        if not path.startswith(run_dir.rstrip("/") + "/"):
            raise LoopError(
                f"step {step.name}: its output {storage.display(path)} is outside the run directory "
                f"{storage.display(run_dir)}; remove it yourself before --from"
            )
        loc = storage.path(path)
        if step.run == "train" and loc.name.startswith("step-"):
            loc = loc.parent  # the final checkpoint: remove the whole training output
        if loc.is_dir():
            storage.remove_tree(loc)
        else:
            storage.remove_file(loc)

    def run(self, *, start: str | None = None, stop: str | None = None, report: bool = True) -> bool:
        """Run every step that is not complete; returns True when all (up to ``stop``) completed.

        The run directory is locked meanwhile (``curation.lock``): a second loop on it is refused."""
        last = self.spec.step(stop).index if stop else len(self.spec.steps) - 1
        with output_lock(self.run_dir, command=f"assay loop {self.spec.source}"):
            storage.makedirs(self.steps_dir)
            if start:
                self.redo_from(start)
            self._write_loop_record(finished=False)
            ok = True
            try:
                for step in self.spec.steps[: last + 1]:
                    if not self._run_step(step):
                        ok = False
                        break
            finally:
                if ok and last == len(self.spec.steps) - 1:
                    self._write_loop_record(finished=True)
                if report:
                    self.write_report()
        return ok

    def _run_step(self, step: Step) -> bool:
        call = self.call(step)
        argv, config, outputs = call.argv, call.config, call.outputs
        fp = self.fingerprint(step, argv, config)
        old = self.manifest(step)
        label = f"[{step.index + 1}/{len(self.spec.steps)}] {step.name}"
        gone = _missing_outputs(old) if old and old.get("status") == "complete" else []
        if gone and old.get("fingerprint") == fp:
            self.echo(f"{label}: complete, but its output {gone[0]} is gone: running it again")
            old = None
        if old and old.get("status") == "complete":
            if old.get("fingerprint") == fp:
                self.echo(f"{label}: complete, skipped ({old.get('seconds', 0):.1f} s when it ran)")
                return True
            raise LoopError(
                f"step {step.name} is complete but its definition (or a step it reads) has changed since; "
                f"rerun with --from {step.name} to redo it and every step after it"
            )
        if config is not None:
            atomic_write_bytes(argv[1], yaml.safe_dump(config, sort_keys=False).encode())
        resumed = old is not None and old.get("status") in ("running", "failed")
        seconds_before = float(old.get("seconds") or 0) if resumed else 0.0
        record = {
            "name": step.name,
            "index": step.index,
            "run": step.run,
            "argv": ["assay", *argv],
            "fingerprint": fp,
            "status": "running",
            "started": _now(),
            "finished": None,
            "seconds": seconds_before or None,
            "attempts": int(old.get("attempts", 0)) + 1 if resumed else 1,
            "outputs": outputs,
            "error": None,
        }
        self._write(step, record)
        self.echo(f"{label}: {'resuming' if resumed else 'running'}: assay {' '.join(argv)}")
        _release_ray_unless_needed(argv)
        t0 = time.perf_counter()
        try:
            self.results[step.name] = call.run()
            if step.run == "train":
                record["outputs"] = {"checkpoint": _final_checkpoint(outputs["train_dir"]), **outputs}
        except Exception as e:  # noqa: BLE001 - any failure of the step is recorded, then re-raised
            record.update(
                status="failed",
                finished=_now(),
                seconds=seconds_before + time.perf_counter() - t0,
                error=_describe(e),
            )
            self._write(step, record)
            self.echo(f"{label}: FAILED after {record['seconds']:.1f} s: {record['error']}")
            return False
        record.update(status="complete", finished=_now(), seconds=seconds_before + time.perf_counter() - t0)
        self._write(step, record)
        self.echo(f"{label}: complete in {record['seconds']:.1f} s")
        return True

    def write_report(self) -> Path | None:
        try:
            from assay.pipelines.report import build_report
        except ImportError:  # the report module is optional for the loop itself
            return None
        try:
            path = build_report(self.run_dir)
        except Exception as e:  # noqa: BLE001 - a broken report must not hide the loop's own result
            self.echo(f"report: could not be written: {_describe(e)}")
            return None
        self.echo(f"report: {path}")
        return path


def _release_ray_unless_needed(argv: list[str]) -> None:
    """Stop the local Ray runtime an earlier step started when this step does not use Ray: its idle
    workers would otherwise take CPU from training on a small machine. A later Ray step starts it
    again (a few seconds). A cluster connection (--ray-address) is left alone."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    if any(flag in argv for flag in ("--executor", "--ray-address", "--actors", "--workers")):
        return
    with contextlib.suppress(Exception):
        if ray.get_runtime_context().gcs_address and not _ray_is_local(ray):
            return
        ray.shutdown()


def _ray_is_local(ray: Any) -> bool:
    """Whether the connected Ray runtime was started by this process (not a cluster we joined)."""
    try:
        from ray._private import worker

        return bool(getattr(worker.global_worker.node, "is_head", lambda: False)())
    except Exception:  # noqa: BLE001 - private API; when unsure, treat it as a cluster and keep it
        return False


def _missing_outputs(record: dict[str, Any]) -> list[str]:
    """The outputs a completed step's record names that are no longer there (deleted by hand): a
    dataset folder (or an ingest's folder of splits), a checkpoint, a metrics or export file."""
    return [str(p) for p in (record.get("outputs") or {}).values() if not storage.path(p).exists()]


def _final_checkpoint(train_dir: str) -> str:
    train_dir = storage.path(train_dir)
    done = train_dir / "complete.json"
    if not done.exists():
        raise LoopError(f"training finished without {done}")
    final = json.loads(done.read_text()).get("final")
    if not final:
        raise LoopError(f"{done} names no final checkpoint")
    if storage.is_remote(final) or Path(final).is_absolute():
        return str(final)
    return storage.absolute(train_dir / final)


def _describe(e: BaseException) -> str:
    import click

    if isinstance(e, click.ClickException):
        return e.format_message()
    if isinstance(e, SystemExit):
        return f"exited with status {e.code}"
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


#: The ``assay.pipelines.api`` function each step kind calls (``eval`` is ``evaluate``).
STAGES = {run: ("evaluate" if run == "eval" else run) for run in COMMANDS}


def stage_options(run: str) -> set[str]:
    """The options of the stage a step runs, spelled as on the command line (``format``,
    ``ray-address``): the keyword parameters of its ``assay.pipelines.api`` function."""
    from assay.pipelines import api

    fn = getattr(api, STAGES[run])
    return {
        name.replace("_", "-")
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


@dataclass
class StepCall:
    """One step, resolved: ``api.<function>(*args, **keywords)``, and the command line it equals."""

    function: str
    args: list[str]
    keywords: dict[str, Any]
    argv: list[str]
    config: dict[str, Any] | None
    outputs: dict[str, Any]

    def run(self) -> Any:
        from assay.pipelines import api

        return getattr(api, self.function)(*self.args, **self.keywords)
