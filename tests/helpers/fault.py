"""A fault harness: SIGKILL an `assay` command at seeded random moments, rerun it, compare.

``kill_trials`` runs a command once uninterrupted (the reference) and measures it: when its real
work starts (the first moment a watched path exists: the output folder, the first checkpoint...)
and when it exits. Then, for each kill, it starts the same command into a fresh trial folder,
sends SIGKILL to its whole process group (the command and any local Ray it started) at a moment
drawn from a seeded RNG uniformly over the reference's work window (stratified: one moment in each
of ``kills`` equal slices of it, so the kills spread over its phases), counted from the moment the
trial's own work starts (its start-up takes a different time on every run), reruns the same command
line into the same folder until it exits 0, and hands the trial folder to a ``check`` that
compares it with the reference. Optional file triggers add kills at moments a clock rarely hits.

Every draw is recorded:

- the process had already exited at the drawn moment: no kill was tried, the draw is made again;
- the process was alive but its output already complete (a kill during interpreter shutdown):
  a kill tried, not landed mid-run; it is still rerun and compared, then a new draw is made;
- the process was alive and its output incomplete: a kill landed mid-run.

Draws go on until ``kills`` kills landed mid-run (or ``max_draws`` is reached). A summary (kills
tried, landed, reruns, rows compared / lost / duplicated, identical, seconds) is returned and, when
the environment names a file in ``ASSAY_FAULT_REPORT``, appended to it as one JSON line.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from assay.curation.schema import CORPUS, PAIRS, QUARANTINE, QUERIES

REPORT_ENV = "ASSAY_FAULT_REPORT"
SEED_ENV = "ASSAY_FAULT_SEED"
TABLES = (QUERIES, CORPUS, PAIRS, QUARANTINE)
#: What identifies a row of each table: two output rows with the same key are a duplicate.
ROW_KEY = {
    QUERIES: ("query_id",),
    CORPUS: ("doc_id",),
    PAIRS: ("query_id", "doc_id", "label", "origin"),
    QUARANTINE: ("table", "id", "reason", "stage", "source"),
}


def assay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "assay.pipelines.cli", *args]


# ---------------------------------------------------------------- running and killing


@dataclass
class Run:
    """One process: how long it ran, how it ended, what it printed."""

    seconds: float
    returncode: int | None
    killed: bool
    output: str
    work_start: float | None = None  # seconds until the watched path appeared
    done_at: float | None = None  # seconds until ``done()`` first said the output is complete
    survivors: int = 0  # processes of the killed group still alive 5 s after the SIGKILL


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole session the command leads (the command, a local Ray it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``, from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(d))
    return out


def _spawn(cmd: list[str], log: Path) -> tuple[subprocess.Popen, Any]:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "wb")  # noqa: SIM115 - closed by the caller once the process is gone
    proc = subprocess.Popen(
        cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True, cwd=os.getcwd()
    )
    return proc, fh


def run_once(
    cmd: list[str],
    log: Path,
    *,
    kill_at: float | None = None,
    watch: Path | None = None,
    timeout: float = 600,
    before_kill: Callable[[], None] | None = None,
    done: Callable[[], bool] | None = None,
    kill_when: Callable[[], bool] | None = None,
    kill_after_start: float | None = None,
) -> Run:
    """Run ``cmd`` (output to ``log``); with ``kill_at``, SIGKILL its process group that many seconds
    after the start if it is still running. ``watch``: note when that path first exists; ``done``:
    when the output is first complete. ``kill_when``: SIGKILL as soon as it says so (a file trigger,
    polled every few milliseconds). ``kill_after_start``: SIGKILL that many seconds after ``watch``
    first exists (a moment in the work itself, whatever the start-up took this time).
    ``before_kill`` is called just before the signal, while the process still runs."""
    proc, fh = _spawn(cmd, log)
    t0 = time.monotonic()
    work_start = done_at = None
    killed = False
    survivors = 0
    polls = 0
    try:
        while True:
            now = time.monotonic() - t0
            if watch is not None and work_start is None and watch.exists():
                work_start = now
            polls += 1
            if done is not None and done_at is None and polls % 5 == 0 and done():
                done_at = now
            if proc.poll() is not None:
                break
            due = (kill_at is not None and now >= kill_at) or (kill_when is not None and kill_when())
            if kill_after_start is not None and work_start is not None:
                due = due or now >= work_start + kill_after_start
            if due:
                if before_kill is not None:
                    before_kill()
                _kill_group(proc)
                proc.wait(timeout=60)
                killed = proc.returncode == -signal.SIGKILL
                # a SIGKILLed group is gone at once; anything still there escaped the signal
                deadline = time.monotonic() + 5
                while group_members(proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                survivors = len(group_members(proc.pid))
                break
            if now > timeout:
                _kill_group(proc)
                proc.wait(timeout=60)
                raise TimeoutError(f"{' '.join(cmd)} ran over {timeout}s; see {log}")
            time.sleep(0.002 if kill_when is not None else 0.01)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        _kill_group(proc)  # whatever the command left in its session (Ray's workers), even after exit
        fh.close()
    seconds = time.monotonic() - t0
    if done is not None and done_at is None and proc.returncode == 0:
        done_at = seconds
    output = log.read_text(errors="replace")
    return Run(seconds, proc.returncode, killed, output, work_start, done_at, survivors)


# ---------------------------------------------------------------- comparing datasets


@dataclass
class Comparison:
    """How a resumed output compares with the reference."""

    rows: int = 0  # rows (or log steps, for training) compared
    lost: int = 0  # reference rows missing from the resumed output
    duplicated: int = 0  # resumed rows whose key occurs more often than in the reference
    extra: int = 0  # resumed rows not in the reference (duplicates included)
    identical: bool = True  # equal within the stated tolerance (data: exactly)
    exact: bool = True  # and bit for bit (weights and losses too)
    problems: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, other: Comparison) -> Comparison:
        self.rows += other.rows
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.extra += other.extra
        self.identical = self.identical and other.identical
        self.exact = self.exact and other.exact
        self.problems += other.problems
        self.info.update(other.info)
        return self

    def problem(self, text: str) -> None:
        self.identical = self.exact = False
        self.problems.append(text)


def dataset_files(root: Path) -> dict[str, Path]:
    files = {}
    for sub in TABLES:
        d = root / sub
        if d.is_dir():
            for p in sorted(d.iterdir()):
                files[f"{sub}/{p.name}"] = p
    return files


def _hashable(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, float) and v != v:
        return "NaN"
    return v


def _rows(files: list[Path]) -> pa.Table | None:
    parts = [pq.read_table(p) for p in files]
    return pa.concat_tables(parts, promote_options="default") if parts else None


def compare_datasets(ref: Path, got: Path, label: str = "") -> Comparison:
    """Row for row: the same files holding equal tables; and, counted per table over all its files,
    the reference rows missing (lost) and the rows whose key is repeated beyond the reference's
    count, or beyond once for a key the reference lacks (duplicated). Leftovers of a killed run
    (``.tmp-*``, ``_progress``) are problems too."""
    c = Comparison()
    where = f"{label}: " if label else ""
    if not (got / "manifest.json").is_file():
        c.problem(f"{where}{got} has no manifest.json (the rerun did not finish it)")
    leftovers = [p.relative_to(got).as_posix() for p in got.rglob(".tmp-*")]
    if (got / "_progress").exists():
        leftovers.append("_progress/")
    if leftovers:
        c.problem(f"{where}left behind: {leftovers[:5]}")
    fa, fb = dataset_files(ref), dataset_files(got)
    if sorted(fa) != sorted(fb):
        c.problem(f"{where}file lists differ: {sorted(set(fa) ^ set(fb))[:6]}")
    for rel in sorted(set(fa) & set(fb)):
        if not pq.read_table(fa[rel]).equals(pq.read_table(fb[rel])):
            c.problem(f"{where}{rel} differs from the reference")
    for table in TABLES:
        ta = _rows([fa[k] for k in sorted(fa) if k.startswith(f"{table}/")])
        tb = _rows([fb[k] for k in sorted(fb) if k.startswith(f"{table}/")])
        ra = [_hashable(r) for r in ta.to_pylist()] if ta is not None else []
        rb = [_hashable(r) for r in tb.to_pylist()] if tb is not None else []
        c.rows += len(rb)
        ca, cb = collections.Counter(ra), collections.Counter(rb)
        lost = sum((ca - cb).values())
        extra = sum((cb - ca).values())
        key_cols = ROW_KEY[table]

        def keys(t: pa.Table | None, cols=key_cols) -> collections.Counter:
            if t is None:
                return collections.Counter()
            cols = [k for k in cols if k in t.column_names]
            return collections.Counter(zip(*(t.column(k).to_pylist() for k in cols), strict=True))

        # a key repeated beyond the reference's count, or beyond once where the reference lacks it
        # (one row under a key the reference lacks is extra, not duplicated)
        ka, kb = keys(ta), keys(tb)
        dup = sum(max(0, n - max(ka[k], 1)) for k, n in kb.items())
        if lost or extra or dup:
            c.problem(f"{where}{table}: {lost} rows lost, {extra} extra, {dup} duplicated")
        c.lost += lost
        c.extra += extra
        c.duplicated += dup
    return c


def manifest_counts(root: Path) -> dict[str, int]:
    return json.loads((root / "manifest.json").read_text())["counts"]


# ---------------------------------------------------------------- the trials


@dataclass
class Kill:
    """One drawn moment, and what came of it."""

    at: float  # seconds after the start (the drawn moment, or when the trigger fired)
    tried: bool  # the process was still running when the signal went
    trigger: str | None = None  # a file trigger ("PATTERN >= N") instead of a drawn moment
    landed: bool = False  # ... and its output was not complete yet
    phase: dict[str, Any] = field(default_factory=dict)
    reruns: int = 0
    rerun_failures: list[str] = field(default_factory=list)
    rerun_seconds: float = 0.0
    identical: bool | None = None
    exact: bool | None = None  # bit for bit (identical may allow a float tolerance: see the check)
    rows: int = 0
    lost: int = 0
    duplicated: int = 0
    extra: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class Summary:
    command: str
    tries: str
    mode: str
    seed: int
    reference_seconds: float
    work_start: float  # kills are drawn uniformly over [work_start, window_end)
    window_end: float
    kills_tried: int = 0
    kills_landed: int = 0
    draws_after_exit: int = 0
    reruns: int = 0
    rerun_failures: int = 0
    rows_compared: int = 0
    rows_lost: int = 0
    rows_duplicated: int = 0
    rows_extra: int = 0
    identical: bool = True
    not_bit_identical: int = 0  # kills whose result was equal only within the float tolerance
    killed_in_cleanup: int = 0  # kills between a dataset's manifest and its removal of _progress/
    seconds: float = 0.0
    kills: list[Kill] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = []
        for i, k in enumerate(self.kills):
            out += [f"kill {i} at {k.at:.2f}s ({k.phase}): {p}" for p in k.problems + k.rerun_failures]
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = self.problems[:20]
        return d

    @property
    def drawn_landed(self) -> int:
        return sum(k.landed and k.trigger is None for k in self.kills)

    def assert_ok(self, want_landed: int, triggers: int = 0) -> None:
        assert self.drawn_landed >= want_landed, (
            f"{self.command}: only {self.drawn_landed} of {want_landed} kills landed mid-run "
            f"({self.kills_tried} tried, {self.draws_after_exit} drawn after it had exited): make the work bigger"
        )
        fired = [k.trigger for k in self.kills if k.trigger]
        assert len(fired) == triggers, f"{self.command}: of {triggers} file triggers only {fired} fired"
        assert not self.problems, f"{self.command}: " + "\n".join(self.problems)
        assert self.identical and self.rows_lost == 0 and self.rows_duplicated == 0


def write_report(summary: Summary, path: str | os.PathLike | None = None) -> None:
    path = path or os.environ.get(REPORT_ENV)
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(summary.to_json(), default=str) + "\n")


def seed_for(name: str) -> int:
    base = int(os.environ.get(SEED_ENV, "7"))
    return base * 1_000_003 + zlib.crc32(name.encode())


def kill_trials(
    name: str,
    tries: str,
    workdir: Path,
    command: Callable[[Path], list[str]],
    *,
    watch: Callable[[Path], Path],
    complete: Callable[[Path], bool],
    check: Callable[[Path, Path, Kill, list[Run]], Comparison],
    phase: Callable[[Path], dict[str, Any]] = lambda root: {},
    kills: int = 10,
    triggers: list[tuple[str, int]] = (),
    mode: str = "full",
    seed: int | None = None,
    max_draws: int | None = None,
    max_reruns: int = 3,
    window: str = "run",
    timeout: float = 600,
    keep_failed: bool = True,
) -> Summary:
    """Reference run, then kills until ``kills`` landed mid-run (see the module docstring).

    ``command(root)`` prepares a trial folder (configs, fresh caches) and returns the command line
    writing into it; ``watch(root)`` is the path whose appearance marks the start of real work;
    ``complete(root)`` says whether the output is finished; ``phase(root)`` describes how far a
    killed run got (read after the kill); ``check(reference_root, root, kill, reruns)`` compares.
    ``window``: "run" draws kill moments from when the reference's work started to when it exited
    (a few land after the output was complete, during the exit); "work" to when its output was
    complete (fewer draws wasted, for quick runs). ``triggers``: after the drawn kills, one more
    trial per (glob pattern under the trial folder, count), killed as soon as that many files
    match (the moments a clock rarely hits: mid-rename, mid-checkpoint).
    """
    t_all = time.monotonic()
    seed = seed_for(name) if seed is None else seed
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    ref_root = workdir / "reference"
    ref = run_once(
        command(ref_root),
        ref_root / "logs" / "run.log",
        watch=watch(ref_root),
        done=lambda: complete(ref_root),
        timeout=timeout,
    )
    assert ref.returncode == 0, f"{name}: the reference run failed:\n{ref.output[-3000:]}"
    assert complete(ref_root), f"{name}: the reference run exited 0 but its output is not complete"
    start = ref.work_start if ref.work_start is not None else 0.0
    end = ref.seconds if window == "run" else (ref.done_at or ref.seconds)
    summary = Summary(name, tries, mode, seed, round(ref.seconds, 2), round(start, 2), round(end, 2))
    max_draws = max_draws if max_draws is not None else 3 * kills + 5
    draw = 0

    def trial(root: Path, at: float | None, trigger: tuple[str, int] | None) -> float | None:
        """One kill and its reruns. Returns a moment by which this trial's work was already over
        when the kill came too late (it had exited, or its output was complete), else None."""
        shutil.rmtree(root, ignore_errors=True)
        seen: dict[str, Any] = {}
        fire = None
        if trigger is not None:
            pattern, count = trigger
            fire = lambda: len(list(root.glob(pattern))) >= count  # noqa: E731
        first = run_once(
            command(root),
            root / "logs" / "run-0.log",
            watch=watch(root),
            kill_at=at if ref.work_start is None else None,
            kill_after_start=None if at is None or ref.work_start is None else at - start,
            kill_when=fire,
            timeout=timeout,
            before_kill=lambda: seen.update(done=complete(root)),
            done=lambda: complete(root),
        )
        if not first.killed:
            summary.draws_after_exit += 1
            assert first.returncode == 0, f"{name}: an uninterrupted run failed:\n{first.output[-3000:]}"
            shutil.rmtree(root, ignore_errors=True)
            over = first.seconds if window == "run" or first.done_at is None else first.done_at
            # on the reference's clock: this trial's work, from its own start
            return None if first.work_start is None else start + over - first.work_start
        kill = Kill(
            at=round(at if at is not None else first.seconds, 3),
            tried=True,
            trigger=f"{trigger[0]} >= {trigger[1]}" if trigger else None,
            landed=not seen.get("done", False),
        )
        kill.phase = phase(root)
        if first.survivors:
            kill.problems.append(f"{first.survivors} processes of the killed group outlived the SIGKILL")
        summary.kills_tried += 1
        summary.kills_landed += kill.landed
        reruns: list[Run] = []
        while kill.reruns < max_reruns:
            kill.reruns += 1
            r = run_once(command(root), root / "logs" / f"run-{kill.reruns}.log", timeout=timeout)
            reruns.append(r)
            kill.rerun_seconds += r.seconds
            if r.returncode == 0:
                break
            kill.rerun_failures.append(f"rerun {kill.reruns} exited {r.returncode}: {r.output[-1500:]}")
        if reruns and reruns[-1].returncode == 0:
            try:
                c = check(ref_root, root, kill, reruns)
            except Exception as e:  # noqa: BLE001 - a check that cannot even read the output is a finding
                c = Comparison(identical=False, problems=[f"check failed: {type(e).__name__}: {e}"])
        else:
            c = Comparison(identical=False, problems=["never completed"])
        kill.identical, kill.exact, kill.rows, kill.lost = c.identical, c.exact, c.rows, c.lost
        summary.not_bit_identical += c.identical and not c.exact
        summary.killed_in_cleanup += killed_in_cleanup(kill.phase)
        kill.duplicated, kill.extra = c.duplicated, c.extra
        kill.problems += c.problems
        kill.rerun_seconds = round(kill.rerun_seconds, 2)
        if c.info:
            kill.phase = {**kill.phase, **c.info}
        summary.kills.append(kill)
        summary.reruns += kill.reruns
        summary.rerun_failures += len(kill.rerun_failures)
        summary.rows_compared += c.rows
        summary.rows_lost += c.lost
        summary.rows_duplicated += c.duplicated
        summary.rows_extra += c.extra
        summary.identical = summary.identical and c.identical and not kill.rerun_failures
        if (c.identical and not kill.rerun_failures and not kill.problems) or not keep_failed:
            shutil.rmtree(root, ignore_errors=True)
        return None if kill.landed or at is None or window == "run" else at

    # Stratified: the first `kills` moments are one uniform draw in each tenth (for ten) of the
    # window, in shuffled order, so that kills spread over the phases of the work; a moment that did
    # not land mid-run is replaced by a uniform draw over the whole window. A trial whose work was
    # over before its kill came (a reference slowed by a busy machine makes the window too long)
    # ends the window there, so later draws fall inside the work these trials really do.
    slices = list(range(kills))
    rng.shuffle(slices)
    floor = start + 0.25 * (end - start)
    while summary.drawn_landed < kills and draw < max_draws:
        width = (end - start) / max(kills, 1)
        at = start + width * (slices[draw] + rng.random()) if draw < kills else rng.uniform(start, end)
        over_by = trial(workdir / f"kill-{draw:02d}", at, None)
        if over_by is not None and over_by < end:
            end = max(over_by, floor)
            summary.window_end = round(end, 2)
        draw += 1
    for i, trig in enumerate(triggers):
        trial(workdir / f"trigger-{i:02d}", None, trig)
    summary.seconds = round(time.monotonic() - t_all, 1)
    write_report(summary)
    return summary


# ---------------------------------------------------------------- how far a killed run got


def dataset_phase(root: Path) -> dict[str, Any]:
    """Counts of a (possibly unfinished) dataset folder: scans, plans, finished shards, manifest."""
    prog = root / "_progress"

    def count(sub: str) -> int:
        d = prog / sub
        return sum(1 for p in d.rglob("*") if p.is_file() and not p.name.startswith(".")) if d.is_dir() else 0

    out: dict[str, Any] = {}
    if not root.exists():
        return {"state": "not started"}
    for sub in ("scan", "eval-scan", "plan", "mined", "done"):
        n = count(sub)
        if n:
            out[sub] = n
    out["manifest"] = (root / "manifest.json").is_file()
    if out["manifest"] and prog.exists():
        out["progress_left"] = True  # killed between the manifest and the removal of _progress/
    return out


def killed_in_cleanup(phase: dict[str, Any]) -> bool:
    """Whether ``dataset_phase`` saw a dataset killed between its manifest and its cleanup."""
    return bool(phase.get("manifest") and phase.get("progress_left"))


# ---------------------------------------------------------------- the table of a report


def markdown_table(report: str | os.PathLike) -> str:
    """The summaries of an ``ASSAY_FAULT_REPORT`` file as a markdown table, one row per command
    (the last summary of each command and mode wins)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for line in Path(report).read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            rows[(d["command"], d["mode"])] = d
    head = (
        "| command | what it tries | kills tried | landed mid-run | reruns | rows compared | rows lost "
        "| rows duplicated | identical | wall s |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    out = [head]
    for d in rows.values():
        triggers = sum(1 for k in d["kills"] if k.get("trigger"))
        landed = f"{d['kills_landed']}" + (f" ({triggers} by file trigger)" if triggers else "")
        same = "yes" if d["identical"] and not d["problems"] else "NO"
        n = len(d["kills"])
        if same == "yes" and d.get("not_bit_identical"):
            same = f"yes ({n - d['not_bit_identical']} of {n} bit for bit, the rest within tolerance)"
        if d.get("killed_in_cleanup"):
            same += f"; {d['killed_in_cleanup']} kill(s) between manifest and cleanup"
        out.append(
            f"| {d['command']} | {d['tries']} | {d['kills_tried']} | {landed} | {d['reruns']} "
            f"| {d['rows_compared']} | {d['rows_lost']} | {d['rows_duplicated']} "
            f"| {same} | {d['seconds']:.0f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_table(sys.argv[1]))
