"""The fault harness (issue 7): SIGKILL each `assay` command at seeded random moments, rerun it into
the same folder until it completes, and find what an uninterrupted run gives.

For validate, dedup, judge, mine, train and loop, ``helpers.fault.kill_trials`` runs the command
once (the reference), then SIGKILLs its process group at moments drawn (seeded) uniformly over the
reference's work window (from when its output first appears to when it exits; a draw after the
process had exited is drawn again), reruns it into the same folder until it exits 0, and compares;
the slow version adds kills at file triggers (mid-checkpoint, a first shard marker...):

- datasets: the same Parquet files holding equal tables, row for row; per table, no reference row
  missing and no row key (id, or pair) repeated beyond the reference's count;
- judge and mine: also the caches (the same judgments / vectors); when a cache differs by float
  noise only (see OUTPUT_ATOL), the output must equal an uninterrupted replay from the trial's cache;
  judge: also the failures file, and the rerun judged exactly the pairs the cache still lacked;
- train: the rerun resumed at the step of the last complete checkpoint the kill left (or started
  afresh when there was none), left no unfinished checkpoint save behind, ended at the reference's
  final step with the same kept checkpoints and the same weights (bit for bit in all but rare
  trials; see WEIGHT_ATOL), and its log holds every step once with the reference's losses;
- loop: every step complete, the datasets of its steps, the eval metrics and the final weights equal.

The quick tests (default suite) land one kill per command on small inputs (train's at its first
checkpoint save); the slow ones land ten drawn kills per command, plus the file triggers, on larger
inputs, and ten on validate as a Ray Data job. ``ASSAY_FAULT_REPORT=FILE`` appends one JSON summary per command to FILE
(docs/RELIABILITY.md tabulates a full run); ``ASSAY_FAULT_SEED`` changes the draws.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.badrows import make_fuzz_rows, queries_table
from helpers.colours import COLOURS, TINY, colour_dataset, png
from helpers.dedup_data import dedup_inputs
from helpers.fault import (
    Comparison,
    assay_cmd,
    compare_datasets,
    dataset_phase,
    kill_trials,
    manifest_counts,
    run_once,
)

from assay.curation.dataset import write_dataset

pytest.importorskip("torch")

# Sizes: (quick, full). Each is big enough that the command works for seconds after its output
# appears (so a kill lands mid-run). The quick subset's floor is its 12 torch processes (3 per
# torch command), ~6-8 s of imports each on a 2-core machine: ~2.5 min when the machine is quiet.
SIZES = {
    "validate": (3000, 10000),  # good rows (and an eighth as many bad ones)
    "dedup": (320, 1280),  # queries = corpus = pairs rows, in 8 shards each
    "judge": (60, 300),  # queries; 3 pairs each are judged
    "mine": (160, 800),  # queries = docs, two subsets
    "train": (4, 18),  # steps (a checkpoint every 2 / 3)
    "loop": (4, 12),  # stage-2 steps of the loop (a checkpoint every 2)
}


def _size(name: str, mode: str) -> int:
    return SIZES[name][0 if mode == "quick" else 1]


# ---------------------------------------------------------------- inputs


_WORD_TEXT = "red green blue yellow circle square triangle small large bright dark shape colour picture photo"
WORDS = _WORD_TEXT.split(" ") + ["answer", "question", "left", "right", "striped", "dotted", "plain"]


def text_dataset(root: Path, n: int, negatives: int = 2, shard: int = 100, seed: int = 0) -> Path:
    """n queries and n docs of word salad in two subsets; every fourth query has a colour image.
    Pairs: each query's positive, and ``negatives`` hard negatives (docs of nearby queries)."""
    rng = np.random.RandomState(seed)
    images = [png(c) for c in COLOURS.values()]
    queries, corpus, pairs = [], [], []
    for i in range(n):
        subset = f"s{i % 2}"
        words = " ".join(rng.choice(WORDS, size=rng.randint(3, 9)))
        q = {
            "query_id": f"q{i}",
            "subset": subset,
            "task": "retrieval",
            "text": f"{words} {i}",
            "instruction": "Find the document.",
        }
        if i % 4 == 0:
            q["image"] = {"bytes": images[(i // 4) % 4], "path": None}
        queries.append(q)
        corpus.append({"doc_id": f"d{i}", "subset": subset, "text": f"{words} document {i % 97}"})
        pairs.append({"query_id": f"q{i}", "doc_id": f"d{i}", "label": "positive"})
        for k in range(negatives):
            pairs.append(
                {"query_id": f"q{i}", "doc_id": f"d{(i + 2 * (k + 1)) % n}", "label": "hard_negative"}
            )
    write_dataset(root, {"queries": queries, "corpus": corpus, "pairs": pairs}, rows_per_shard=shard)
    return root


_TINY_DIR: list[Path] = []  # set by the module's `tiny_dir` fixture: one tiny model for all cases


def tiny_checkpoint() -> Path:
    """A tiny randomly initialised assay embedder (also a judge: its LM head reads yes / no); built
    once per test module, read-only for the commands (judge model, mining encoder, train init)."""
    from assay.training.model import MMEmbedder
    from assay.training.tiny import build_tiny

    path = _TINY_DIR[0] / "tiny"
    if not (path / "config.json").is_file():
        settings = {k: v for k, v in TINY.items() if k != "seed"}
        texts = [*WORDS, "Find the document.", "document", "What colour is it?"]
        model, processor = build_tiny(texts, tokens_per_tile=16, seed=1, **settings)
        MMEmbedder(model, processor).save_pretrained(path)
    return path


# ---------------------------------------------------------------- checks


def is_dataset(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def check_dataset(ref: Path, got: Path, label: str) -> Comparison:
    c = compare_datasets(ref, got, label)
    if is_dataset(ref) and is_dataset(got) and manifest_counts(ref) != manifest_counts(got):
        c.problem(f"{label}: manifest counts {manifest_counts(got)} != reference {manifest_counts(ref)}")
    return c


def _judgments(db: Path) -> int:
    if not db.is_file():
        return 0
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM judgments WHERE error IS NULL").fetchone()[0]
    except sqlite3.OperationalError:  # killed before the table was made
        return 0
    finally:
        con.close()


def _vectors(cache: Path) -> int:
    n = 0
    for db in cache.glob("*.sqlite"):
        con = sqlite3.connect(db)
        try:
            n += con.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        except sqlite3.OperationalError:
            pass
        finally:
            con.close()
    return n


def _cache_rows(db: Path, sql: str) -> dict:
    con = sqlite3.connect(db)
    try:
        return {tuple(r[:-1]): r[-1] for r in con.execute(sql)}
    finally:
        con.close()


def vector_diff(ref: Path, got: Path) -> tuple[int, float]:
    """(keys in one embedding cache only, largest |difference| of a vector held by both)."""
    a = {
        k: v
        for db in ref.glob("*.sqlite")
        for k, v in _cache_rows(db, "SELECT key, vec FROM vectors").items()
    }
    b = {
        k: v
        for db in got.glob("*.sqlite")
        for k, v in _cache_rows(db, "SELECT key, vec FROM vectors").items()
    }
    diff = max(
        (
            float(np.abs(np.frombuffer(a[k], np.float32) - np.frombuffer(b[k], np.float32)).max())
            for k in a.keys() & b.keys()
        ),
        default=0.0,
    )
    return len(a.keys() ^ b.keys()), diff


def judgment_diff(ref: Path, got: Path) -> tuple[int, float]:
    """(judgments in one cache only, largest |difference| of a margin held by both)."""
    sql = "SELECT model_id, prompt_id, query_id, doc_id, content, margin FROM judgments WHERE error IS NULL"
    a, b = _cache_rows(ref, sql), _cache_rows(got, sql)
    diff = max((abs(a[k] - b[k]) for k in a.keys() & b.keys()), default=0.0)
    return len(a.keys() ^ b.keys()), diff


#: Model outputs (embeddings, judge margins) computed in two processes are bit-identical in almost
#: every trial; rarely (twice in ~100 torch processes, on a 2-core machine loaded by other jobs) a
#: batch came out 1 ulp apart (~1e-7), which is enough to flip near-tied kNN ranks of the random
#: tiny encoder. Such a trial is judged by replaying: the same command, uninterrupted, into a fresh
#: folder holding a copy of the trial's cache (so nothing is computed again) must give the trial's
#: output exactly. Then the resume is right and only the float noise differs.
OUTPUT_ATOL = 1e-5


def replay_explains(c: Comparison, root: Path, command, cache: str, diff: float, label: str) -> Comparison:
    """``c`` (trial vs reference) when it holds; else, if the caches differ by float noise only, the
    comparison of the trial with an uninterrupted replay from a copy of the trial's cache."""
    if c.identical or diff == 0.0 or diff > OUTPUT_ATOL:
        return c
    replay = root.parent / f"{root.name}-replay"
    shutil.rmtree(replay, ignore_errors=True)
    replay.mkdir(parents=True)
    src = root / cache
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, replay / cache)
    r = run_once(command(replay), replay / "logs" / "run.log", timeout=600)
    if r.returncode != 0:
        c.problems.append(f"{label}: the replay from the trial's cache failed: {r.output[-800:]}")
        return c
    again = compare_datasets(replay / "out", root / "out", f"{label} vs its replay")
    shutil.rmtree(replay, ignore_errors=True)
    if not again.identical:
        c.problems += again.problems
        return c
    # explained: not lost, not duplicated, just other floats in; leftovers stay problems
    kept = [p for p in c.problems if "left behind" in p or "manifest.json" in p or "caches:" in p]
    out = Comparison(rows=c.rows, identical=not kept, exact=False, problems=kept, info=dict(c.info))
    out.info[f"{label}_float_noise"] = (
        f"caches differ by {diff:.3g}; the output follows from the trial's cache"
    )
    return out


#: Problems that float noise upstream explains (other rows mined or judged, other weights, losses,
#: metrics); leftovers, lost steps, a wrong resume step never are.
_NOISE_PROBLEMS = ("differs from the reference", "rows lost", "weights differ", "losses differ",
                   "manifest counts", "eval metrics differ")  # fmt: skip


def _as_noise(c: Comparison, label: str, noise: dict) -> Comparison:
    """``c`` with the differences float noise in an upstream cache explains recorded, not failed."""
    if c.identical or not noise or c.duplicated:
        return c
    explained = [p for p in c.problems if any(k in p for k in _NOISE_PROBLEMS)]
    rest = [p for p in c.problems if p not in explained]
    out = Comparison(rows=c.rows, identical=not rest, exact=False, problems=rest, info=dict(c.info))
    out.info[f"{label}_float_noise"] = f"follows caches that differ by {noise['caches_max_abs_diff']:.3g}"
    return out


def _weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


#: Weights of a resumed run are bit-identical in almost every trial; in rare trials (1 in ~20 loop
#: trials on a loaded 2-core machine) a stage run in another process than the reference's differed
#: in the last bits of its first loss (CPU kernels' float summation order) and by ~1e-5 after 12
#: steps; once (a CI-like loaded run, the loop's stage 1 restarted from step 0: nothing to resume)
#: by 1.4e-4 after 4 steps at lr 3e-3, with every logged loss equal within LOSS_RTOL. Adam turns a
#: last-bit gradient difference on a near-zero gradient into a fraction of a step. A wrong resume (a
#: step lost or repeated, optimizer state lost) moves weights by about one Adam step, ~lr per weight,
#: so the tolerance is a tenth of the stage's lr (at least WEIGHT_ATOL); whether a stage was bit for
#: bit is recorded.
WEIGHT_ATOL = 1e-4
WEIGHT_LR_FRACTION = 0.1
LOSS_RTOL = 1e-5


def weight_tolerance(checkpoint: Path) -> float:
    """The largest weight difference from the reference that counts as float noise for this stage."""
    cfg = checkpoint / "training_config.json"
    lr = float(json.loads(cfg.read_text()).get("lr") or 0.0) if cfg.is_file() else 0.0
    return max(WEIGHT_ATOL, WEIGHT_LR_FRACTION * lr)


def compare_weights(ref: Path, got: Path, label: str) -> Comparison:
    import torch

    c = Comparison()
    a, b = _weights(ref), _weights(got)
    if a.keys() != b.keys():
        c.problem(f"{label}: weight names differ")
        return c
    diff = max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)
    c.info[f"{label}_max_abs_diff"] = diff
    c.info[f"{label}_bit_identical"] = all(torch.equal(a[k], b[k]) for k in a)
    if not c.info[f"{label}_bit_identical"]:
        c.exact = False
        atol = weight_tolerance(ref)
        if diff > atol:
            c.problem(
                f"{label}: final weights differ from the reference (max abs diff {diff:.3g} > {atol:.3g})"
            )
    return c


def _log_entries(train_dir: Path) -> list[dict]:
    f = train_dir / "train_log.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def check_train_dir(ref: Path, got: Path, label: str) -> Comparison:
    """The same final step and weights, the same kept checkpoints, and a log holding every step
    once with the reference's loss (rows: log steps; lost / duplicated: steps missing / repeated)."""
    c = Comparison()
    done_a, done_b = ref / "complete.json", got / "complete.json"
    if not done_b.is_file():
        c.problem(f"{label}: no complete.json")
        return c
    a, b = json.loads(done_a.read_text()), json.loads(done_b.read_text())
    if (a["final"], a["steps"]) != (b["final"], b["steps"]):
        c.problem(
            f"{label}: complete.json says {b['final']} ({b['steps']} steps), the reference {a['final']}"
        )
    c.add(compare_weights(ref / a["final"], got / b["final"], label))
    steps_a = sorted(p.name for p in ref.iterdir() if p.name.startswith("step-"))
    steps_b = sorted(p.name for p in got.iterdir() if p.name.startswith("step-"))
    if steps_a != steps_b:
        c.problem(f"{label}: checkpoints {steps_b}, the reference kept {steps_a}")
    hidden = sorted(p.name for p in got.iterdir() if p.name.startswith("."))
    if hidden:
        c.problem(f"{label}: left behind {hidden}")
    log_a, log_b = _log_entries(ref), _log_entries(got)
    loss_a = {e["step"]: e["loss"] for e in log_a}
    seen: dict[int, int] = {}
    for e in log_b:
        seen[e["step"]] = seen.get(e["step"], 0) + 1
    c.rows += len(log_b)
    c.lost += len(set(loss_a) - set(seen))
    c.duplicated += sum(n - 1 for n in seen.values())
    c.extra += len(set(seen) - set(loss_a)) + c.duplicated
    if c.lost or c.duplicated or c.extra:
        c.problem(f"{label}: log steps {sorted(seen)} (repeats {c.duplicated}) vs {sorted(loss_a)}")
    elif [e["loss"] for e in log_b] != [e["loss"] for e in log_a]:
        c.exact = False
        worst = max(
            abs(x["loss"] - y["loss"]) / max(1.0, abs(y["loss"])) for x, y in zip(log_b, log_a, strict=True)
        )
        if worst > LOSS_RTOL:
            c.problem(f"{label}: the log's losses differ from the reference's (relative {worst:.3g})")
    return c


def train_phase(out: Path) -> dict:
    """The last complete checkpoint a kill left (what the rerun must resume from)."""
    from assay.training.checkpoint import latest_checkpoint

    if (out / "complete.json").is_file():
        return {"complete": True}
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    partial = sorted(p.name for p in out.glob(".tmp-*")) if out.is_dir() else []
    return {
        "checkpoint_step": int(ckpt.name.split("-")[1]) if ckpt else 0,
        **({"partial": partial} if partial else {}),
    }


RESUMING = re.compile(r"resuming at step (\d+) from step-(\d+)")


def check_resumed(output: str, phase: dict, label: str) -> Comparison:
    """The rerun resumed at the step of the checkpoint the kill left (a fresh start if none)."""
    c = Comparison()
    if phase.get("complete"):
        return c
    m = RESUMING.search(output)
    want = phase.get("checkpoint_step", 0)
    got = int(m.group(1)) if m else 0
    c.info[f"{label}_resumed_at"] = got
    if got != want:
        c.problem(f"{label}: the rerun resumed at step {got}, but the kill left a checkpoint at step {want}")
    return c


# ---------------------------------------------------------------- the six commands


def case_validate(work: Path, mode: str, executor: str = "local"):
    n = _size("validate", mode)
    inp = work / "input"
    queries, corpus, pairs, expected = make_fuzz_rows(
        inp / "root", inp / "outside", n_good=n, n_bad=n // 8, seed=11, max_text_chars=1000
    )
    ds = write_dataset(
        inp / "ds",
        {"queries": queries_table(queries), "corpus": corpus, "pairs": pairs},
        rows_per_shard=200,
        data_root=str(inp / "root"),
    )
    n_bad = len(expected)

    def command(root: Path) -> list[str]:
        return assay_cmd(
            "validate", str(ds.root), str(root / "out"), "--max-text-chars", "1000",
            "--executor", executor, "--num-cpus", "2",
        )  # fmt: skip

    def check(ref: Path, root: Path, kill, reruns) -> Comparison:
        c = check_dataset(ref / "out", root / "out", "out")
        if is_dataset(root / "out") and manifest_counts(root / "out")["quarantine"] != n_bad:
            c.problem(f"quarantine holds {manifest_counts(root / 'out')['quarantine']} rows, not {n_bad}")
        return c

    tries = f"{n + n // 8} rows x 3 tables ({n // 8} bad), 200-row shards, --executor {executor}"
    return tries, command, dict(watch=lambda r: r / "out", complete=lambda r: is_dataset(r / "out"),
                                check=check, phase=lambda r: dataset_phase(r / "out"),
                                triggers=[("out/_progress/scan/queries/part-*.parquet", 3),
                                          ("out/_progress/done/pairs/*.json", 1)])  # fmt: skip


def case_dedup(work: Path, mode: str):
    n = _size("dedup", mode)
    src, ev = (d.root for d in dedup_inputs(work / "input", n))

    def command(root: Path) -> list[str]:
        return assay_cmd("dedup", str(src), str(root / "out"), "--against", str(ev), "--executor", "local")

    def check(ref: Path, root: Path, kill, reruns) -> Comparison:
        c = check_dataset(ref / "out", root / "out", "out")
        if is_dataset(root / "out"):
            counts = manifest_counts(root / "out")
            total = sum(counts[t] for t in ("queries", "corpus", "pairs", "quarantine"))
            if total != 3 * n:  # every input row is in the output or the quarantine, once
                c.problem(f"{total} rows out of {3 * n} in")
        return c

    tries = f"{n} rows x 3 tables with images (8 shards each), exact/near duplicates, --against an eval set"
    return tries, command, dict(watch=lambda r: r / "out", complete=lambda r: is_dataset(r / "out"),
                                check=check, phase=lambda r: dataset_phase(r / "out"),
                                triggers=[("out/_progress/eval-scan/*/queries/part-*.parquet", 1),
                                          ("out/_progress/done/corpus/*.json", 2)])  # fmt: skip


def case_judge(work: Path, mode: str):
    n = _size("judge", mode)
    ds = text_dataset(work / "input" / "ds", n, shard=max(n // 4, 1))
    model = tiny_checkpoint()

    def command(root: Path) -> list[str]:
        return assay_cmd(
            "judge", str(ds), str(root / "out"), "--model", str(model), "--cache", str(root / "j.sqlite"),
            "--labels", "positive,hard_negative", "--batch-size", "16", "--device", "cpu", "--no-progress",
        )  # fmt: skip

    def phase(root: Path) -> dict:
        return {**dataset_phase(root / "out"), "cached": _judgments(root / "j.sqlite")}

    def check(ref: Path, root: Path, kill, reruns) -> Comparison:
        c = check_dataset(ref / "out", root / "out", "out")
        missing, diff = judgment_diff(ref / "j.sqlite", root / "j.sqlite")
        c.info["margins_max_abs_diff"] = diff
        if missing or diff > OUTPUT_ATOL:
            c.problem(f"judgment caches: {missing} judgments in one only, margins differ by {diff:.3g}")
        c = replay_explains(c, root, command, "j.sqlite", diff, "out")
        fa, fb = ref / "out" / "judge_failures.parquet", root / "out" / "judge_failures.parquet"
        if fa.exists() != fb.exists():
            c.problem("judge_failures.parquet: present in one output only")
        # a rerun judges exactly what the cache lacked: nothing twice, nothing skipped
        m = re.search(r"judged (\d+) pairs .*?, (\d+) from the cache", reruns[-1].output)
        if kill.landed and not m:
            c.problem("the rerun printed no 'judged N pairs ... M from the cache' line")
        elif kill.landed:
            scored, cached = int(m.group(1)), int(m.group(2))
            if cached != kill.phase["cached"] or scored + cached != 3 * n:
                c.problem(
                    f"rerun judged {scored} and took {cached} from the cache; the kill left "
                    f"{kill.phase['cached']} judged of {3 * n}"
                )
        return c

    tries = f"{3 * n} pairs ({n} queries with images every 4th), tiny reranker judge, batches of 16"
    return tries, command, dict(watch=lambda r: r / "out", complete=lambda r: is_dataset(r / "out"),
                                check=check, phase=phase,
                                triggers=[("out/_progress/done/pairs/*.json", 1)])  # fmt: skip


def case_mine(work: Path, mode: str):
    n = _size("mine", mode)
    ds = text_dataset(work / "input" / "ds", n, negatives=0, shard=max(n // 8, 1))
    encoder = tiny_checkpoint()

    def command(root: Path) -> list[str]:
        return assay_cmd(
            "mine", str(ds), str(root / "out"), "--encoder", str(encoder), "--rules", "top:3",
            "--cache", str(root / "cache"), "--batch-size", "32", "--no-progress",
        )  # fmt: skip

    def phase(root: Path) -> dict:
        return {**dataset_phase(root / "out"), "vectors": _vectors(root / "cache")}

    def check(ref: Path, root: Path, kill, reruns) -> Comparison:
        c = check_dataset(ref / "out", root / "out", "out")
        missing, diff = vector_diff(ref / "cache", root / "cache")
        c.info["vectors_max_abs_diff"] = diff
        if missing or diff > OUTPUT_ATOL:
            c.problem(f"embedding caches: {missing} vectors in one only, vectors differ by {diff:.3g}")
        return replay_explains(c, root, command, "cache", diff, "out")

    tries = f"{n} queries x {n} docs in 2 subsets, tiny assay encoder, top:3, cache commits of 32 rows"
    return tries, command, dict(watch=lambda r: r / "out", complete=lambda r: is_dataset(r / "out"),
                                check=check, phase=phase,
                                triggers=[("out/_progress/mined/*.parquet", 1),
                                          ("out/_progress/done/pairs/*.json", 1)])  # fmt: skip


def case_train(work: Path, mode: str):
    steps = _size("train", mode)
    every = 2 if mode == "quick" else 3
    ds = text_dataset(work / "input" / "ds", 200, shard=50)
    init = tiny_checkpoint()
    config = {
        "stage": "2",
        "data": [str(ds)],
        "init": str(init),
        "lora": {"rank": 4},
        "lr": 1e-3,
        "temperature": 0.1,
        "batch_size": 16,
        "mini_batch": 8,
        "num_negatives": 2,
        "max_steps": steps,
        "epochs": 10,  # max_steps ends it first
        "save_every": every,
        "keep_checkpoints": 2,
        "progress": False,
    }

    def command(root: Path) -> list[str]:
        root.mkdir(parents=True, exist_ok=True)
        (root / "train.yaml").write_text(yaml.safe_dump({**config, "output": str(root / "out")}))
        return assay_cmd("train", str(root / "train.yaml"), "--no-progress")

    def check(ref: Path, root: Path, kill, reruns) -> Comparison:
        c = check_train_dir(ref / "out", root / "out", "train")
        return c.add(check_resumed(reruns[0].output, kill.phase, "train"))

    tries = f"stage 2, LoRA rank 4, {steps} steps, a checkpoint every {every} (2 kept), 200 units"
    return tries, command, dict(watch=lambda r: r / "out", complete=lambda r: (r / "out" / "complete.json").is_file(),
                                check=check, phase=lambda r: train_phase(r / "out"),
                                triggers=[("out/.tmp-*", 1), ("out/step-*", 2)],
                                quick_trigger=("out/.tmp-*", 1))  # fmt: skip


def loop_steps(source: Path, stage2_steps: int, judge: bool = True) -> list[dict]:
    """validate -> stage1 -> mine -> (judge ->) stage2 -> eval, on the colours, all tiny."""
    common = {"progress": False, "batch_size": 8, "mini_batch": 8, "epochs": 20}
    steps = [
        {"name": "valid", "run": "validate", "args": [str(source), "{run}/valid"]},
        {
            "name": "stage1",
            "run": "train",
            "config": {
                "stage": "1", "data": ["{valid}"], "output": "{run}/stage1", "tiny": TINY,
                "tokens_per_tile": 16, "lr": 3e-3, "max_steps": 4, "save_every": 2, **common,
            },
        },
        {
            "name": "mine",
            "run": "mine",
            "args": ["{valid}", "{run}/mined"],
            "options": {"encoder": "{stage1}", "rules": "top:3", "cache": "{run}/cache", "no-progress": True},
        },
        {
            "name": "judge",
            "run": "judge",
            "args": ["{mine}", "{run}/judged"],
            "options": {
                "model": "{stage1}", "labels": "hard_negative", "cache": "{run}/judgments.sqlite",
                "rule": "threshold:0.9", "no-progress": True,
            },
        },
        {
            "name": "stage2",
            "run": "train",
            "config": {
                "stage": "2", "data": ["{judge}"], "output": "{run}/stage2", "init": "{stage1}",
                "lora": None, "lr": 1e-3, "temperature": 0.1, "negatives": "judged", "num_negatives": 2,
                "max_steps": stage2_steps, "save_every": 2, **common,
            },
        },
        {"name": "eval", "run": "eval", "args": ["{stage2}", "{valid}"]},
    ]  # fmt: skip
    if not judge:  # stage 2 on the mined negatives straight away
        steps = [s for s in steps if s["name"] != "judge"]
        steps[-2]["config"].update(data=["{mine}"], negatives="mined")
    return steps


def case_loop(work: Path, mode: str):
    colours = colour_dataset(work / "input" / "colours")
    judge = mode != "quick"  # the quick loop skips the judge step (a model load less per run)
    steps = loop_steps(colours, _size("loop", mode), judge=judge)
    names = [s["name"] for s in steps]

    def command(root: Path) -> list[str]:
        root.mkdir(parents=True, exist_ok=True)
        f = root / "loop.yaml"
        f.write_text(yaml.safe_dump({"run_dir": str(root / "run"), "executor": "local", "steps": steps}))
        return assay_cmd("loop", str(f), "--no-report")

    def complete(root: Path) -> bool:
        f = root / "run" / "loop.json"
        try:
            return f.is_file() and json.loads(f.read_text()).get("finished") is not None
        except json.JSONDecodeError:
            return False

    def phase(root: Path) -> dict:
        run = root / "run"
        states = {}
        for s in steps:
            f = run / "steps" / f"{s['name']}.json"
            states[s["name"]] = json.loads(f.read_text())["status"] if f.is_file() else "-"
        running = next((n for n, s in states.items() if s == "running"), None)
        out: dict = {"running": running}
        if running in ("stage1", "stage2"):
            out.update(train_phase(run / running))
        elif running in ("valid", "mine", "judge"):
            out.update(dataset_phase(run / {"valid": "valid", "mine": "mined", "judge": "judged"}[running]))
        return out

    def check(ref: Path, root: Path, kill, reruns) -> Comparison:
        a, b = ref / "run", root / "run"
        c = Comparison()
        for s in steps:
            rec = json.loads((b / "steps" / f"{s['name']}.json").read_text())
            if rec["status"] != "complete":
                c.problem(f"step {s['name']} is {rec['status']}")
        if not complete(root):
            c.problem("loop.json says the loop has not finished")
        running = kill.phase.get("running")
        # Float noise in a cache (see OUTPUT_ATOL; the mine and judge cases replay it) propagates:
        # mined / judged rows, then stage 2 and eval follow the other floats. Then those differences
        # are recorded as noise, not failures; any other difference fails.
        # Stage 1's weights can differ by float noise too (see WEIGHT_ATOL): then the encoder's
        # cache keys (its weights' hash) and everything after it follow the other weights.
        noise = {}
        s1 = check_train_dir(a / "stage1", b / "stage1", "stage1")
        if s1.identical and not s1.info.get("stage1_bit_identical", True):
            noise["caches_max_abs_diff"] = s1.info["stage1_max_abs_diff"]
        missing, diff = vector_diff(a / "cache", b / "cache")
        if "judge" in names:
            j_missing, j_diff = judgment_diff(a / "judgments.sqlite", b / "judgments.sqlite")
            missing, diff = missing + j_missing, max(diff, j_diff)
        if (missing and not noise) or diff > OUTPUT_ATOL:
            c.problem(f"caches: {missing} entries in one only, values differ by {diff:.3g}")
        elif diff or missing:
            noise["caches_max_abs_diff"] = max(diff, noise.get("caches_max_abs_diff", 0.0))
        for step, sub in (("valid", "valid"), ("mine", "mined"), ("judge", "judged")):
            if step not in names:
                continue
            d = check_dataset(a / sub, b / sub, sub)
            c.add(_as_noise(d, sub, noise) if sub != "valid" else d)
        c.add(s1)
        c.add(_as_noise(check_train_dir(a / "stage2", b / "stage2", "stage2"), "stage2", noise))
        if running in ("stage1", "stage2"):
            c.add(check_resumed(reruns[0].output, kill.phase, running))
        ma = json.loads((a / "metrics" / "eval.json").read_text())
        mb = json.loads((b / "metrics" / "eval.json").read_text())
        if (ma["per_subset"], ma["overall"]) != (mb["per_subset"], mb["overall"]):
            e = Comparison()
            e.problem("eval metrics differ from the reference's")
            c.add(_as_noise(e, "eval", noise))
        return c

    tries = " -> ".join(names) + f" (stage1 4 steps, stage2 {_size('loop', mode)}), --executor local"
    return (
        tries,
        command,
        dict(
            watch=lambda r: r / "run" / "steps",
            complete=complete,
            check=check,
            phase=phase,
            triggers=[
                ("run/mined/_progress/mined/*.parquet", 1),
                ("run/judged/_progress/done/pairs/*.json", 1),
                ("run/stage2/.tmp-*", 1),
            ],
        ),
    )


CASES = {
    "validate": case_validate,
    "dedup": case_dedup,
    "judge": case_judge,
    "mine": case_mine,
    "train": case_train,
    "loop": case_loop,
}


def run_case(name: str, tmp_path: Path, mode: str, kills: int, **kw):
    tries, command, hooks = CASES[name](tmp_path, mode, **kw)
    triggers = hooks.pop("triggers", [])
    quick_trigger = hooks.pop("quick_trigger", None)
    if mode == "quick":  # one drawn kill, or, where the case names one, a kill at that file instead
        triggers = [quick_trigger] if quick_trigger else []
        kills = 0 if quick_trigger else kills
    label = name if not kw else f"{name} ({', '.join(f'{k}={v}' for k, v in kw.items())})"
    if triggers:
        tries += f"; + file triggers {', '.join(f'{p} >= {n}' for p, n in triggers)}"
    summary = kill_trials(
        label,
        tries,
        tmp_path / "trials",
        command,
        kills=kills,
        triggers=triggers,
        mode=mode,
        window="work" if mode == "quick" else "run",
        **hooks,
    )
    summary.assert_ok(kills, len(triggers))
    return summary


@pytest.fixture(scope="module", autouse=True)
def tiny_dir(tmp_path_factory):
    _TINY_DIR[:] = [tmp_path_factory.mktemp("tiny")]
    yield _TINY_DIR[0]
    _TINY_DIR.clear()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_kill_harness_quick(name, tmp_path):
    """One kill per command, on small inputs."""
    run_case(name, tmp_path, "quick", kills=1)


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("name", list(CASES))
def test_kill_harness_full(name, tmp_path):
    """Ten kills per command landed mid-run, at seeded random moments of the reference's work."""
    run_case(name, tmp_path, "full", kills=10)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(2400)
def test_kill_harness_full_validate_on_ray(tmp_path):
    """validate as a Ray Data job on a local Ray the command starts (killed with its Ray)."""
    run_case("validate", tmp_path, "full", kills=10, executor="ray")


def test_a_kill_between_the_manifest_and_its_cleanup_leaves_no_progress_behind(tmp_path):
    """SIGKILL `assay validate` the moment its manifest appears, while _progress/ (scans, plans,
    markers of ~140 shards) is being removed; the rerun must leave a clean dataset."""
    queries, corpus, pairs, _ = make_fuzz_rows(
        tmp_path / "root", tmp_path / "outside", n_good=1200, n_bad=150, seed=3, max_text_chars=1000
    )
    ds = write_dataset(
        tmp_path / "ds",
        {"queries": queries_table(queries), "corpus": corpus, "pairs": pairs},
        rows_per_shard=30,
        data_root=str(tmp_path / "root"),
    )

    def cmd(out: Path) -> list[str]:
        return assay_cmd(
            "validate", str(ds.root), str(out), "--max-text-chars", "1000", "--executor", "local"
        )

    for attempt in range(6):
        out = tmp_path / f"out-{attempt}"
        seen: dict = {}
        first = run_once(
            cmd(out),
            tmp_path / "logs" / f"{attempt}.log",
            kill_when=lambda out=out: (out / "manifest.json").exists(),
            before_kill=lambda out=out, seen=seen: seen.update(progress=(out / "_progress").exists()),
            timeout=300,
        )
        if first.killed and seen.get("progress"):
            break
    else:
        pytest.skip("no kill landed between manifest.json and the removal of _progress/ in 6 tries")
    rerun = run_once(cmd(out), tmp_path / "logs" / "rerun.log", timeout=300)
    assert rerun.returncode == 0, rerun.output
    assert (out / "manifest.json").is_file()
    assert not (out / "_progress").exists(), "the rerun left the killed run's _progress/ in the dataset"
