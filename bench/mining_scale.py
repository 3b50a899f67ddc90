"""Streamed exact kNN over a 2M x 384 corpus against holding the whole corpus in memory.

The corpus is random (standard normal rows, L2-normalised, float32), generated shard by shard from
seeded generators (shard i from ``default_rng([seed, i])``), so the streamed side never has it all
in memory and both sides see the same rows. 1,000 queries (normalised, their own seed), k=100,
inner product, exact. Two measurements, each in its own fresh subprocess so that peaks do not mix:

- streamed: ``mining.knn.search(queries, shards, k, method="exact")`` over a generator that
  yields one shard at a time (faiss ``IndexFlatIP`` per shard, running top-k merged);
- in memory, "ST's approach": what ``sentence_transformers.util.mine_hard_negatives`` does with
  ``use_faiss=True``: every corpus embedding in one (N, d) array, one ``faiss.IndexFlatIP`` over
  all of it (``index.add`` copies the array), one search. It runs at the largest size that fits
  comfortably: the full corpus unless array + index copy would exceed --in-memory-fraction of the
  available memory, in which case a smaller multiple of the shard size (and the note says so).

Peak memory is the process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), the whole
process (interpreter, numpy, faiss included); the RSS before the search is printed too. Queries/s is
the search time alone: generating the shards (done inside the stream on the streamed side) is timed
and subtracted, and printed. The top-k ids of both sides are compared.

    nice python bench/mining_scale.py                    # a few minutes on 2 cores, ~6.5 GiB free RAM
    python bench/mining_scale.py --rows 200000           # quick

The last line is ``peak_rss_ratio_streamed_vs_in_memory=X qps_streamed=Y qps_in_memory=Z``.
Needs numpy and faiss (faiss-cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="corpus rows")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--in-memory-fraction",
        type=float,
        default=0.6,
        help="the in-memory run's array + index copy may use at most this fraction of MemAvailable",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "streamed" | "in-memory:ROWS"
    ap.add_argument("--dump", default=None, help=argparse.SUPPRESS)  # where a worker saves its top-k
    return ap.parse_args(argv)


# --- one measurement (in a fresh process) -------------------------------------------------------


def rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def make_queries(args: argparse.Namespace):
    import numpy as np

    q = np.random.default_rng([args.seed, 1 << 30]).standard_normal(
        (args.queries, args.dim), dtype=np.float32
    )
    q /= np.sqrt(np.einsum("ij,ij->i", q, q))[:, None]
    return q


def fill_shard(args: argparse.Namespace, i: int, out) -> None:
    """Rows of shard i, normalised in place (no temporary of the shard's size)."""
    import numpy as np

    np.random.default_rng([args.seed, i]).standard_normal(out=out, dtype=np.float32)
    out /= np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]


def shard_bounds(args: argparse.Namespace, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + args.shard_rows, rows)) for a in range(0, rows, args.shard_rows)]


def worker(args: argparse.Namespace) -> dict:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import faiss

    from assay.mining.knn import search

    q = make_queries(args)
    if args.worker == "streamed":
        gen_time = [0.0]

        def stream():
            for i, (a, b) in enumerate(shard_bounds(args, args.rows)):
                t = time.perf_counter()
                x = np.empty((b - a, args.dim), dtype=np.float32)
                fill_shard(args, i, x)
                gen_time[0] += time.perf_counter() - t
                yield a, x

        before = rss_bytes()
        t0 = time.perf_counter()
        res = search(q, stream(), args.k, method="exact")
        wall = time.perf_counter() - t0
        peak = rss_bytes()
        ids, scores, rows, gen = res.ids, res.scores, res.searched, gen_time[0]
        search_time = wall - gen  # the stream builds shards while the search runs
    else:
        rows = int(args.worker.split(":")[1])
        t = time.perf_counter()
        corpus = np.empty((rows, args.dim), dtype=np.float32)  # every embedding in one array
        for i, (a, b) in enumerate(shard_bounds(args, rows)):
            fill_shard(args, i, corpus[a:b])
        gen = time.perf_counter() - t
        before = rss_bytes()
        t0 = time.perf_counter()
        index = faiss.IndexFlatIP(args.dim)  # sentence_transformers' use_faiss=True path
        index.add(corpus)
        scores, ids = index.search(q, args.k)
        wall = time.perf_counter() - t0
        peak = rss_bytes()
        search_time = wall  # index.add (a copy of the array) + the search, as ST does
    np.save(Path(args.dump) / "ids.npy", np.asarray(ids, dtype=np.int64))
    np.save(Path(args.dump) / "scores.npy", np.asarray(scores, dtype=np.float32))
    return {
        "side": args.worker.split(":")[0],
        "rows": rows,
        "before": before,
        "peak": peak,
        "search_s": search_time,
        "gen_s": gen,
        "qps": args.queries / search_time,
        "faiss_threads": faiss.omp_get_max_threads(),
    }


# --- driver -------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, worker_arg: str, dump: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *sys.argv[1:],
        "--worker",
        worker_arg,
        "--dump",
        dump,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{worker_arg}: the measuring process failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace, streamed_dir: Path, in_memory_dir: Path) -> None:
    """The two top-k: identical, or different only where plain faiss ordered equal scores its way."""
    import numpy as np

    s_ids, m_ids = np.load(streamed_dir / "ids.npy"), np.load(in_memory_dir / "ids.npy")
    s_sc, m_sc = np.load(streamed_dir / "scores.npy"), np.load(in_memory_dir / "scores.npy")
    same = (s_ids == m_ids).all(axis=1)
    order = np.lexsort((m_ids, -m_sc), axis=-1)  # plain faiss's result with equal scores in id order
    m_ids_o, m_sc_o = np.take_along_axis(m_ids, order, 1), np.take_along_axis(m_sc, order, 1)
    same_tied = (s_ids == m_ids_o).all(axis=1) & (s_sc == m_sc_o).all(axis=1)
    same_scores = (s_sc == m_sc).all(axis=1)
    print(
        f"top-{args.k} ids identical (same order) for {same.sum():,}/{args.queries:,} queries; "
        f"{same_tied.sum():,}/{args.queries:,} once plain faiss's equal scores are put in id order; "
        f"scores identical for {same_scores.sum():,}/{args.queries:,}"
    )


def mem_available() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def mib(x: float) -> str:
    return f"{x / 2**20:.1f} MiB"


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    row_bytes = args.dim * 4
    n_shards = len(shard_bounds(args, args.rows))
    print(
        f"corpus {args.rows:,} x {args.dim} float32 ({gib(args.rows * row_bytes)}), random normalised rows, "
        f"{n_shards} shards of <= {args.shard_rows:,} rows (seed {args.seed}); {args.queries:,} queries, "
        f"k={args.k}, exact inner product (faiss IndexFlatIP); each side in a fresh process"
    )

    # the in-memory side: array + IndexFlatIP's copy of it must fit comfortably
    budget = args.in_memory_fraction * mem_available()
    mem_rows = args.rows
    if 2 * mem_rows * row_bytes > budget:
        mem_rows = max(args.shard_rows, int(budget // (2 * row_bytes)) // args.shard_rows * args.shard_rows)
        print(
            f"note: the in-memory run needs {gib(2 * args.rows * row_bytes)} (array + index copy), more "
            f"than {args.in_memory_fraction:.0%} of the available {gib(mem_available())}: it runs on the "
            f"first {mem_rows:,} rows"
        )

    tmp = tempfile.TemporaryDirectory()
    dumps = [Path(tmp.name) / side for side in ("streamed", "in-memory")]
    for path in dumps:
        path.mkdir()
    streamed = run_child(args, "streamed", str(dumps[0]))
    print(
        f"streamed  ({streamed['rows']:,} rows, mining.knn.search over a generator of shards): "
        f"search {streamed['search_s']:.1f} s -> {streamed['qps']:.1f} queries/s "
        f"(+ {streamed['gen_s']:.1f} s generating the shards, not counted); "
        f"peak RSS {mib(streamed['peak'])} (before the search {mib(streamed['before'])})"
    )
    in_memory = run_child(args, f"in-memory:{mem_rows}", str(dumps[1]))
    print(
        f"in memory ({in_memory['rows']:,} rows, ST's approach: one array + one IndexFlatIP + one search): "
        f"search {in_memory['search_s']:.1f} s -> {in_memory['qps']:.1f} queries/s "
        f"(+ {in_memory['gen_s']:.1f} s generating the array, not counted); "
        f"peak RSS {mib(in_memory['peak'])} (before the search, array built: {mib(in_memory['before'])})"
    )
    if in_memory["rows"] == streamed["rows"]:
        compare(args, *dumps)
    tmp.cleanup()
    print(f"faiss threads: {streamed['faiss_threads']}")
    ratio = streamed["peak"] / in_memory["peak"]
    print(
        f"peak_rss_ratio_streamed_vs_in_memory={ratio:.3f} "
        f"qps_streamed={streamed['qps']:.1f} qps_in_memory={in_memory['qps']:.1f}"
    )


if __name__ == "__main__":
    main()
