"""Validate + exact dedup of N synthetic text pairs: assay's Ray path against plain polars.

Both sides do the same work on the same data: the row checks of `assay validate` that apply to text
(ids, content, blank and over-long text, labels, values), duplicate ids, pairs naming unknown ids,
then exact dedup on normalised text per subset with pairs rewritten to the kept rows and duplicate
pairs removed; both write their kept rows and their refused rows to Parquet. The polars side is a
single process holding everything in memory; assay's side is two resumable, sharded stages run as
Ray Data jobs on a local Ray with --num-cpus workers. The kept and refused counts must agree, or
the benchmark fails.

    python bench/curation_vs_polars.py --rows 1000000

Prints rows/s of each side and, last, ``ray_vs_polars_time_ratio=X`` (assay time / polars time;
lower is better, the target here is X <= 3). Ray's start-up is timed separately and included.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from assay.curation.dataset import Dataset, write_dataset  # noqa: E402
from assay.curation.schema import LABELS  # noqa: E402
from assay.curation.validate import ValidateConfig  # noqa: E402

MAX_TEXT = 2000


def make_data(n: int, root: Path, rows_per_shard: int, seed: int = 0) -> Dataset:
    """n queries, n documents, n pairs, with a few percent of every kind of problem mixed in."""
    rng = np.random.default_rng(seed)
    subsets = np.array(["alpha", "beta", "gamma"])
    qid = np.array([f"q{i}" for i in range(n)], dtype=object)
    did = np.array([f"d{i}" for i in range(n)], dtype=object)
    qtext = np.array([f"what is item {i} made of?" for i in range(n)], dtype=object)
    words = ["Cotton", "linen", "wool", "silk", "denim", "felt", "nylon", "jute"]
    dtext = np.array(
        [f"item {i} is made of {words[i % 8]} and {words[(i * 7) % 8]}" for i in range(n)], dtype=object
    )
    qsub = subsets[rng.integers(0, 3, n)]
    dsub = qsub.copy()

    def pick(frac: float) -> np.ndarray:
        return rng.choice(n, size=int(n * frac), replace=False)

    qtext[pick(0.004)] = "   "  # empty_text
    qid[pick(0.002)] = None  # missing_id
    dup = pick(0.002)
    qid[dup] = qid[(dup + 1) % n]  # duplicate_id (a later or earlier row)
    qtext[pick(0.001)] = "x" * (MAX_TEXT + 5)  # text_too_long
    near = pick(0.01)  # exact duplicates after normalisation
    src = (near + 17) % n
    dtext[near] = [f"  {t.upper()}\t" for t in dtext[src]]
    dsub[near] = dsub[src]
    pq_id = qid.copy()
    pq_id = np.array([f"q{i}" for i in range(n)], dtype=object)
    pq_id[pick(0.003)] = "q-missing"  # unknown_query_id
    labels = np.full(n, "positive", dtype=object)
    labels[pick(0.002)] = "Positive"  # invalid_label
    tables = {
        "queries": pa.table(
            {
                "query_id": pa.array(qid, pa.string()),
                "subset": pa.array(qsub),
                "task": pa.array(np.full(n, "retrieval")),
                "text": pa.array(qtext, pa.string()),
            }
        ),
        "corpus": pa.table(
            {
                "doc_id": pa.array(did, pa.string()),
                "subset": pa.array(dsub),
                "text": pa.array(dtext, pa.string()),
            }
        ),
        "pairs": pa.table(
            {
                "query_id": pa.array(pq_id, pa.string()),
                "doc_id": pa.array(did, pa.string()),
                "label": pa.array(labels, pa.string()),
                "score": pa.array(rng.random(n), pa.float32()),
            }
        ),
    }
    full = {}
    from assay.curation.schema import SCHEMAS

    for name, t in tables.items():
        cols = {
            f.name: (t.column(f.name) if f.name in t.column_names else pa.nulls(n, f.type))
            for f in SCHEMAS[name]
        }
        full[name] = pa.table(cols).cast(SCHEMAS[name])
    return write_dataset(root, full, rows_per_shard=rows_per_shard, overwrite=True)


def normalised(col: pl.Expr) -> pl.Expr:
    return col.str.normalize("NFKC").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def polars_pipeline(src: Path, out: Path) -> Counter:
    """The same checks, single process, in polars; writes kept and refused rows; returns counts."""
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    refused = []
    kept_ids = {}
    kept = {}
    for table, id_col in (("queries", "query_id"), ("corpus", "doc_id")):
        df = pl.read_parquet(src / table / "*.parquet").with_row_index("order")
        blank_id = pl.col(id_col).is_null() | (pl.col(id_col).str.strip_chars() == "")
        reason = (
            pl.when(blank_id)
            .then(pl.lit("missing_id"))
            .when(pl.col("text").is_null() & pl.col("image").is_null())
            .then(pl.lit("missing_content"))
            .when(pl.col("text").str.strip_chars() == "")
            .then(pl.lit("empty_text"))
            .when(pl.col("text").str.len_chars() > MAX_TEXT)
            .then(pl.lit("text_too_long"))
        )
        df = df.with_columns(reason.alias("reason"))
        ok = df.filter(pl.col("reason").is_null())
        first = pl.col(id_col).is_first_distinct()
        refused.append(
            df.filter(pl.col("reason").is_not_null())
            .select("order", id_col, "reason")
            .rename({id_col: "id"})
            .with_columns(pl.lit(table).alias("table"))
        )
        refused.append(
            ok.filter(~first)
            .select("order", pl.col(id_col).alias("id"))
            .with_columns(pl.lit("duplicate_id").alias("reason"), pl.lit(table).alias("table"))
        )
        ok = ok.filter(first)
        kept_ids[table] = ok.get_column(id_col)
        kept[table] = ok
    pairs = pl.read_parquet(src / "pairs" / "*.parquet").with_row_index("order")
    reason = (
        pl.when(
            pl.col("query_id").is_null()
            | (pl.col("query_id").str.strip_chars() == "")
            | pl.col("doc_id").is_null()
            | (pl.col("doc_id").str.strip_chars() == "")
        )
        .then(pl.lit("missing_id"))
        .when(~pl.col("label").is_in(list(LABELS)) | pl.col("label").is_null())
        .then(pl.lit("invalid_label"))
        .when(pl.col("score").is_nan())
        .then(pl.lit("invalid_value"))
        .when((pl.col("judge_p_yes") < 0) | (pl.col("judge_p_yes") > 1))
        .then(pl.lit("invalid_value"))
        .when(~pl.col("query_id").is_in(kept_ids["queries"].implode()))
        .then(pl.lit("unknown_query_id"))
        .when(~pl.col("doc_id").is_in(kept_ids["corpus"].implode()))
        .then(pl.lit("unknown_doc_id"))
    )
    pairs = pairs.with_columns(reason.alias("reason"))
    refused.append(
        pairs.filter(pl.col("reason").is_not_null())
        .select("order", pl.format("{}->{}", "query_id", "doc_id").alias("id"), "reason")
        .with_columns(pl.lit("pairs").alias("table"))
    )
    pairs = pairs.filter(pl.col("reason").is_null())
    # exact dedup: first occurrence of (subset, normalised text) wins; pairs follow the kept row
    remap = {}
    for table, id_col in (("queries", "query_id"), ("corpus", "doc_id")):
        df = kept[table].with_columns(normalised(pl.col("text")).alias("key"))
        df = df.with_columns(
            pl.col(id_col).first().over(["subset", "key"], order_by="order").alias("canonical")
        )
        dups = df.filter(pl.col(id_col) != pl.col("canonical"))
        refused.append(
            dups.select("order", pl.col(id_col).alias("id")).with_columns(
                pl.lit("exact_duplicate").alias("reason"), pl.lit(table).alias("table")
            )
        )
        remap[id_col] = dups.select(pl.col(id_col).alias("from"), pl.col("canonical").alias("to"))
        kept[table] = df.filter(pl.col(id_col) == pl.col("canonical")).drop(
            "key", "canonical", "reason", "order"
        )
    for col, m in remap.items():
        pairs = (
            pairs.join(m, left_on=col, right_on="from", how="left", maintain_order="left")
            .with_columns(pl.coalesce("to", col).alias(col))
            .drop("to")
        )
    first_pair = pl.struct("query_id", "doc_id").is_first_distinct()
    refused.append(
        pairs.filter(~first_pair)
        .select("order", pl.format("{}->{}", "query_id", "doc_id").alias("id"))
        .with_columns(pl.lit("duplicate_pair").alias("reason"), pl.lit("pairs").alias("table"))
    )
    kept["pairs"] = pairs.filter(first_pair).drop("reason", "order")
    for table, df in kept.items():
        df.write_parquet(out / f"{table}.parquet")
        counts[table] = df.height
    quarantine = pl.concat(refused, how="diagonal")
    quarantine.write_parquet(out / "quarantine.parquet")
    for r in quarantine.get_column("reason").to_list():
        counts[f"q:{r}"] += 1
    return counts


def assay_counts(ds: Dataset) -> Counter:
    c = Counter({t: ds.manifest.counts[t] for t in ("queries", "corpus", "pairs")})
    for k, v in ds.manifest.quarantine_reasons.items():
        c[f"q:{k.split(':', 1)[1]}"] += v
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rows-per-shard", type=int, default=100_000)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/assay-bench-curation"))
    args = ap.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    t = time.perf_counter()
    src = make_data(args.rows, args.workdir / "src", args.rows_per_shard)
    n_rows = sum(src.manifest.counts[x] for x in ("queries", "corpus", "pairs"))
    print(
        f"data: {args.rows:,} pairs ({n_rows:,} rows in queries+corpus+pairs), made in {time.perf_counter() - t:.1f}s"
    )

    t = time.perf_counter()
    ref = polars_pipeline(src.root, args.workdir / "polars")
    t_polars = time.perf_counter() - t
    print(f"polars (1 process):  {t_polars:7.2f}s  {n_rows / t_polars:>12,.0f} rows/s")

    import ray

    from assay.curation.dedup import dedup
    from assay.curation.validate import validate
    from assay.pipelines.executors import RayExecutor

    t0 = time.perf_counter()
    executor = RayExecutor(num_cpus=args.num_cpus)
    executor._init()
    t_init = time.perf_counter() - t0
    t = time.perf_counter()
    validate(src, args.workdir / "valid", ValidateConfig(max_text_chars=MAX_TEXT), executor=executor)
    t_validate = time.perf_counter() - t
    m = dedup(Dataset(args.workdir / "valid"), args.workdir / "dedup", near=False, executor=executor)
    t_stages = time.perf_counter() - t
    t_ray = t_init + t_stages
    ray.shutdown()
    got = assay_counts(Dataset(args.workdir / "dedup"))
    print(
        f"assay Ray path:      {t_ray:7.2f}s  {n_rows / t_ray:>12,.0f} rows/s  "
        f"(ray start {t_init:.1f}s, validate {t_validate:.1f}s, dedup {t_stages - t_validate:.1f}s, "
        f"{args.num_cpus} CPUs, {len(src.shards('queries'))} shards per table)"
    )
    print(f"without Ray start:   {t_stages:7.2f}s  ratio {t_stages / t_polars:.2f}")
    if got != ref:
        print("MISMATCH between assay and polars counts:")
        for k in sorted(set(got) | set(ref)):
            print(f"  {k:<24} assay={got.get(k, 0):>9} polars={ref.get(k, 0):>9}")
        sys.exit(1)
    print("counts agree: " + ", ".join(f"{k}={v}" for k, v in sorted(got.items())))
    del m
    print(f"ray_vs_polars_time_ratio={t_ray / t_polars:.2f}")


if __name__ == "__main__":
    main()
