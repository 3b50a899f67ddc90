"""Validate + dedup of N text pairs with input and output on a local S3 server, against the same on
local disk: one process, the same data, measured back to back.

The data: ``--rows`` pairs (default 1,000,000) over ``rows // 4`` queries and ``rows // 4``
documents (so 1.5M rows in all at the default), four pairs per query, text only, written with
``write_dataset``'s default 50,000 rows per shard, once to a local folder and once to a bucket of a
moto S3 server this script starts on 127.0.0.1 (``tests/helpers/s3_server.py``). A few percent of
the rows give both stages work: blank, over-long and missing ids, duplicate ids, pairs naming an
unknown query, invalid labels (validate), and texts that repeat another after normalisation plus
repeated pairs (dedup). Building the input is not timed.

Each side runs ``assay.validate`` then ``assay.dedup`` (the Python API, so the output lock is taken
as a user's run takes it; executor ``local``: the stage's tasks run in this process, one after
another). The two outputs must be equal, table by table and row by row, or the script fails.

    python bench/object_store.py                  # 1,000,000 pairs, a few minutes
    python bench/object_store.py --rows 20000     # a quick run

The machine this runs on may be shared, so both sides run ``--repeat`` times (default 3), back to
back in each round, the order alternating; the best total of each side counts. Prints each round's
stage times, the S3 requests of each S3 run (by s3fs method), moto's own time per request (a PUT
and a GET of a shard-sized object, measured before the rounds) and, last,
``s3_vs_local_time_ratio=X`` (best S3 total / best local total; the target is X <= 1.5).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers.s3_server import s3_server  # noqa: E402  (moto's server, as the tests start it)

MAX_TEXT = 2000
TABLES = ("queries", "corpus", "pairs", "quarantine")


def make_tables(n_pairs: int, seed: int = 0) -> dict[str, pa.Table]:
    """n_pairs pairs over n_pairs // 4 queries and as many documents, problems mixed in."""
    from assay.curation.schema import SCHEMAS

    rng = np.random.default_rng(seed)
    n = max(n_pairs // 4, 8)  # queries, and documents
    subsets = np.array(["alpha", "beta", "gamma"])

    def pick(size: int, frac: float) -> np.ndarray:
        return rng.choice(size, size=max(int(size * frac), 1), replace=False)

    qid = np.array([f"q{i}" for i in range(n)], dtype=object)
    qtext = np.array([f"what is item {i} made of?" for i in range(n)], dtype=object)
    qsub = subsets[rng.integers(0, 3, n)]
    qtext[pick(n, 0.004)] = "   "  # empty_text
    qid[pick(n, 0.002)] = None  # missing_id
    dup = pick(n, 0.002)
    qid[dup] = qid[(dup + 1) % n]  # duplicate_id
    qtext[pick(n, 0.001)] = "x" * (MAX_TEXT + 5)  # text_too_long
    same = pick(n, 0.01)  # the same question as another, in another case and spacing: dedup
    qtext[same] = [f"  {t.upper()}\t" for t in qtext[(same + 11) % n]]
    qsub[same] = qsub[(same + 11) % n]

    words = ["Cotton", "linen", "wool", "silk", "denim", "felt", "nylon", "jute"]
    did = np.array([f"d{i}" for i in range(n)], dtype=object)
    dtext = np.array(
        [f"item {i} is made of {words[i % 8]} and {words[(i * 7) % 8]}" for i in range(n)], dtype=object
    )
    dsub = qsub.copy()
    dtext[pick(n, 0.003)] = ""  # empty_text
    same = pick(n, 0.01)
    dtext[same] = [f"{t.upper()}  " for t in dtext[(same + 17) % n]]
    dsub[same] = dsub[(same + 17) % n]

    j = np.arange(n_pairs)
    q = j % n
    d = (q + (j // n) * 1009) % n  # the first pair of a query is its own document
    pq = np.array([f"q{i}" for i in q], dtype=object)
    pd = np.array([f"d{i}" for i in d], dtype=object)
    labels = np.where(j < n, "positive", "negative").astype(object)
    pq[pick(n_pairs, 0.003)] = "q-missing"  # unknown_query_id
    labels[pick(n_pairs, 0.002)] = "Positive"  # invalid_label
    rep = pick(n_pairs, 0.005)  # a pair repeated: duplicate_pair
    pq[rep], pd[rep], labels[rep] = (
        pq[(rep + 3) % n_pairs],
        pd[(rep + 3) % n_pairs],
        labels[(rep + 3) % n_pairs],
    )
    score = rng.random(n_pairs).astype(np.float32)

    raw = {
        "queries": {"query_id": qid, "subset": qsub, "task": np.full(n, "retrieval"), "text": qtext},
        "corpus": {"doc_id": did, "subset": dsub, "text": dtext},
        "pairs": {"query_id": pq, "doc_id": pd, "label": labels, "score": score},
    }
    tables = {}
    for name, cols in raw.items():
        schema = SCHEMAS[name]
        rows = len(next(iter(cols.values())))
        tables[name] = pa.table(
            {
                f.name: pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(rows, f.type)
                for f in schema
            },
            schema=schema,
        )
    return tables


def read_all(root: str) -> dict[str, pa.Table]:
    """Every table of a dataset, its files in the manifest's order, and the manifest's counts."""
    from assay.curation.dataset import Dataset

    ds = Dataset(root)
    out = {}
    for t in TABLES:
        files = ds.quarantine_files() if t == "quarantine" else ds.shards(t)
        out[t] = pa.concat_tables([ds.read_shard(t, f) for f in files]) if files else None
    out["_counts"] = dict(ds.manifest.counts)
    out["_reasons"] = dict(ds.manifest.quarantine_reasons)
    return out


class RequestCounter:
    """Counts the S3 calls s3fs makes (``_call_s3``: every request of fsspec's S3 filesystem)."""

    def __init__(self) -> None:
        import s3fs

        self.counts: collections.Counter = collections.Counter()
        original = s3fs.S3FileSystem._call_s3
        counts = self.counts

        async def counted(fs, method, *args, **kwargs):
            counts[method if isinstance(method, str) else getattr(method, "__name__", str(method))] += 1
            return await original(fs, method, *args, **kwargs)

        s3fs.S3FileSystem._call_s3 = counted

    def take(self) -> dict[str, int]:
        got = dict(self.counts)
        self.counts.clear()
        return got


def run_side(src: str, work: str, executor: str) -> dict[str, float]:
    """validate then dedup, as ``assay validate`` and ``assay dedup`` run them; seconds per stage."""
    import assay

    run = {"executor": executor, "num_cpus": 2 if executor == "ray" else None}
    times = {}
    t = time.perf_counter()
    assay.validate(src, f"{work}/valid", max_text_chars=MAX_TEXT, **run)
    times["validate"] = time.perf_counter() - t
    t = time.perf_counter()
    assay.dedup(f"{work}/valid", f"{work}/dedup", **run)
    times["dedup"] = time.perf_counter() - t
    return times


def moto_floor(bucket: str, sample: bytes, n: int = 40) -> dict[str, float]:
    """Milliseconds per request of this S3 server through s3fs (the client the stages use): PUT and
    GET of a shard-sized object, PUT of a marker-sized one. Not part of the timed stages."""
    import s3fs

    fs = s3fs.S3FileSystem()
    base = f"{bucket[len('s3://') :]}/_floor"
    out = {}
    for name, fn in (
        ("put_shard", lambda i: fs.pipe_file(f"{base}/s{i}", sample)),
        ("get_shard", lambda i: fs.cat_file(f"{base}/s{i}", start=-(8 << 20))),
        ("put_marker", lambda i: fs.pipe_file(f"{base}/m{i}.json", b"x" * 300)),
    ):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        out[name] = (time.perf_counter() - t) / n * 1000
    fs.rm(base, recursive=True)
    return out


def same_output(local: str, s3: str) -> dict[str, pa.Table]:
    """Both outputs, checked equal (manifest counts and reasons, every table row by row)."""
    a, b = read_all(local), read_all(s3)
    for key in ("_counts", "_reasons", *TABLES):
        x, y = a[key], b[key]
        if key.startswith("_"):
            same = x == y
        else:
            same = (x is None and y is None) or (x is not None and y is not None and x.equals(y))
        if not same:
            print(f"MISMATCH between the local output {local} and the S3 output in {key}")
            sys.exit(1)
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rows", type=int, default=1_000_000, help="pairs (queries and documents: rows // 4 each)"
    )
    ap.add_argument("--rows-per-shard", type=int, default=50_000)
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds, local and S3 back to back in each (the order alternates); the best of each side counts",
    )
    ap.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: each stage's tasks one after another in this process; ray: a local Ray runtime "
        "of 2 CPUs (the command line's default executor); S3 requests are counted with local only",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="local side's folder (default: a temp dir)")
    ap.add_argument("--profile", type=Path, default=None, help="write a cProfile of the S3 side here")
    args = ap.parse_args()

    from assay.curation.dataset import write_dataset

    local_root = Path(args.workdir or tempfile.mkdtemp(prefix="assay-bench-os-"))
    shutil.rmtree(local_root, ignore_errors=True)
    local_root.mkdir(parents=True)
    best: dict[str, dict[str, float]] = {}
    try:
        with s3_server() as server:
            os.environ.update(server.env)
            bucket = server.bucket(f"assay-bench-{uuid.uuid4().hex[:8]}")
            counter = RequestCounter()

            t = time.perf_counter()
            tables = make_tables(args.rows)
            n_rows = sum(x.num_rows for x in tables.values())
            write_dataset(local_root / "src", tables, rows_per_shard=args.rows_per_shard)
            write_dataset(f"{bucket}/src", tables, rows_per_shard=args.rows_per_shard)
            shards = {t: -(-x.num_rows // args.rows_per_shard) for t, x in tables.items()}
            print(
                f"data: {args.rows:,} pairs over {tables['queries'].num_rows:,} queries and "
                f"{tables['corpus'].num_rows:,} documents ({n_rows:,} rows; {args.rows_per_shard:,} rows per "
                f"shard: {shards['queries']} + {shards['corpus']} + {shards['pairs']} shards), written to "
                f"disk and to S3 in {time.perf_counter() - t:.1f}s (not timed); executor {args.executor}"
            )
            del tables
            sample = (local_root / "src" / "pairs" / "part-00000.parquet").read_bytes()
            floor = moto_floor(bucket, sample)
            counter.take()
            print(
                f"moto through s3fs, per request: PUT of a shard ({len(sample) / 1e6:.2f} MB) "
                f"{floor['put_shard']:.1f} ms, GET of it {floor['get_shard']:.1f} ms, PUT of a marker "
                f"{floor['put_marker']:.1f} ms"
            )

            def side(name: str, r: int) -> None:
                if name == "local":
                    src, work = str(local_root / "src"), str(local_root / f"r{r}")
                else:
                    src, work = f"{bucket}/src", f"{bucket}/r{r}"
                if name == "s3" and args.profile and r == 0:
                    import cProfile

                    prof = cProfile.Profile()
                    times = prof.runcall(run_side, src, work, args.executor)
                    prof.dump_stats(str(args.profile))
                else:
                    times = run_side(src, work, args.executor)
                extra = ""
                if name == "s3":
                    req = counter.take()
                    extra = f"  {sum(req.values()):,} requests: " + ", ".join(
                        f"{k} {v:,}" for k, v in sorted(req.items(), key=lambda kv: -kv[1])
                    )
                total = sum(times.values())
                print(
                    f"round {r + 1} {name:<5}  validate {times['validate']:6.2f}s  dedup {times['dedup']:6.2f}s"
                    f"  total {total:6.2f}s{extra}"
                )
                if name not in best or total < sum(best[name].values()):
                    best[name] = times

            for r in range(args.repeat):
                for name in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
                    side(name, r)
                out = same_output(str(local_root / f"r{r}" / "dedup"), f"{bucket}/r{r}/dedup")
                counter.take()  # the check's own reads are no stage's requests
            counts = out["_counts"]
            print(
                "outputs equal in every round (manifest counts, every table row by row): "
                + ", ".join(f"{t}={counts.get(t, 0):,}" for t in TABLES)
                + "; quarantined per reason: "
                + ", ".join(f"{k}={v:,}" for k, v in sorted(out["_reasons"].items()))
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(local_root, ignore_errors=True)
    for name in ("local", "s3"):
        t = best[name]
        print(
            f"best of {args.repeat}, {name:<5}: validate {t['validate']:6.2f}s  dedup {t['dedup']:6.2f}s  "
            f"total {sum(t.values()):6.2f}s"
        )
    print(f"s3_vs_local_time_ratio={sum(best['s3'].values()) / sum(best['local'].values()):.3f}")


if __name__ == "__main__":
    main()
