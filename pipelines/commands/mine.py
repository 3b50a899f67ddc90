"""`assay mine DATASET OUT --encoder CKPT`: hard negatives per query, against the current checkpoint."""

from __future__ import annotations

from typing import Any

import click

from assay.pipelines.commands.common import Location, friendly_errors, print_counts, writing


def format_stats(stats: dict[str, dict]) -> str:
    """Positive vs mined-negative cosine per subset, as a table."""
    head = f"{'subset':<18}{'queries':>8}{'negs':>7}  {'positive mean/p50':>18}  {'negative mean/p10/p50/p90':>27}"
    lines = [head, "-" * len(head)]
    for subset, s in sorted(stats.items()):
        p, n = s.get("positive_score", {}), s.get("negative_score", {})
        pos = f"{p['mean']:.3f}/{p['p50']:.3f}" if p else "-"
        neg = f"{n['mean']:.3f}/{n['p10']:.3f}/{n['p50']:.3f}/{n['p90']:.3f}" if n else "-"
        lines.append(f"{subset or '(none)':<18}{s['queries']:>8}{s['negatives']:>7}  {pos:>18}  {neg:>27}")
        if s.get("search_cached"):
            lines.append(f"{'':<18}search: from the search cache (the same vectors were searched before)")
        if s.get("recall_at_depth") is not None:
            lines.append(
                f"{'':<18}index {s['index']}: recall@depth {s['recall_at_depth']:.4f} against exact search"
            )
    return "\n".join(lines)


def format_pool(p: dict, out: str) -> str:
    """What one corpus pool gave: documents searched, left out and why, negatives, copies."""
    parts = [f"{p['documents']} documents", f"{p['searched']} searched"]
    if p["same_doc"]:
        parts.append(f"{p['same_doc']} already there under the same id (the same documents)")
    for key, what in (("not_mined", "subsets not chosen"), ("ignored", "subsets not in the dataset")):
        if p[key]:
            parts.append(f"{sum(p[key].values())} {key.replace('_', ' ')} ({what}: {', '.join(p[key])})")
    return (
        f"corpus {p['path']}: {', '.join(parts)}; {p['negatives']} negatives from it, "
        f"{p['added']} documents copied into {out}"
    )


@click.command("mine", short_help="Mine hard negatives per query against a checkpoint (kNN per subset).")
@click.argument("dataset", type=Location(exists=True, file_okay=False))
@click.argument("out", type=Location(file_okay=False))
@click.option(
    "--encoder",
    required=True,
    help="An assay checkpoint, a sentence-transformers model directory (a folder, or a URI such as "
    "s3://bucket/ckpt: safetensors only, copied once to $ASSAY_CACHE_DIR/models), or all-MiniLM-L6-v2 "
    "(shipped).",
)
@click.option(
    "--rules",
    default="stage2",
    show_default=True,
    help="Selection rules, e.g. 'ranks:50-100,sample:random:2', 'top:20', "
    "'percent:0.95,sample:top:4', 'margin:0.05,min:0.2,max:0.9'; presets: stage2 (the paper's ranks "
    "50-100, 2 sampled), stage3 (top 20).",
)
@click.option(
    "--depth", type=click.IntRange(min=1), default=None, help="kNN depth (default: from the rules)."
)
@click.option("--subset", multiple=True, metavar="NAME", help="Mine only this subset (repeatable).")
@click.option(
    "--corpus",
    multiple=True,
    metavar="POOL",
    type=Location(exists=True, file_okay=False),
    help="An assay dataset whose corpus holds extra documents to mine from (repeatable; e.g. a "
    "documents-only ingest). They join the pool of their subset (documents of subsets DATASET lacks "
    "are ignored and counted); a doc id already used must name the same document, else it is an "
    "error; the pool documents OUT's pairs name are copied into OUT's corpus.",
)
@click.option(
    "--index",
    type=click.Choice(["auto", "exact", "ivf", "hnsw"]),
    default="auto",
    show_default=True,
    help="auto: exact inner product up to 200k vectors per pool, IVF above.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Rows per encode."
)
@click.option(
    "--cache",
    type=Location(file_okay=False),
    default=None,
    help="Embedding cache folder (default: $ASSAY_CACHE_DIR/embeddings or ~/.cache/assay/embeddings).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random sampling rules.")
@click.option(
    "--judge",
    default=None,
    metavar="MODEL",
    help="Judge the mined candidates with this model (transformers backend; see `assay judge`): "
    "verdict yes -> false_negative, no -> hard_negative.",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    help="With --judge: keep up to N judged hard negatives per query, best-ranked first.",
)
@click.option(
    "--judge-cache", type=Location(dir_okay=False), default=None, help="Judgment cache (see `assay judge`)."
)
@click.option(
    "--instructions", is_flag=True, help="sentence-transformers encoders: prefix each row's instruction."
)
@click.option(
    "--fast",
    is_flag=True,
    help="Encode faster: a sentence-transformers text model on the CPU runs on OpenVINO in float32 "
    "when openvino is installed (pip install 'assay[openvino]'; the exact negatives); else bfloat16 "
    "where the hardware has it (CUDA, CPUs with AVX512-BF16/AMX), else int8 dynamic quantisation "
    "(ASSAY_FAST_KIND=openvino|bf16|int8 picks). Cached apart from exact vectors. bf16 and int8 "
    "change negatives: bf16 kept the same set for 87% of queries on docstring pairs, int8 for 9% "
    "(docs/BENCHMARKS.md).",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    default=None,
    metavar="TOKENS",
    help="Cut each text at this many tokens before encoding (sentence-transformers' max_seq_length; "
    "default: the model's own). Mine at the length you train at.",
)
@click.option(
    "--no-search-cache",
    is_flag=True,
    help="Search even when the search cache (CACHE/search) holds this search's result: the same "
    "query and document vectors, method and depth (kept by default; see mining/search_cache.py).",
)
@click.option(
    "--trust-remote-code", is_flag=True, help="Allow a model directory's own code (off by default)."
)
@click.option("--no-progress", is_flag=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds a dataset or another run.")
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDRESS",
    help="Run the mining as one task on this Ray cluster (one CPU; one GPU with --device cuda). "
    "Its nodes share no disk: give DATASET, OUT, --encoder and --cache as URIs (s3://...).",
)
@friendly_errors
def command(dataset: str, out: str, **options: Any) -> None:
    """Mine hard negatives for the queries of DATASET with ENCODER; write DATASET plus them to OUT.

    \b
    Per subset: queries and documents are embedded (cached by encoder weights, template and
    content: re-mining with the same checkpoint encodes nothing), the corpus is searched block by
    block (at most 65,536 vectors or 64 MiB in memory; the result is cached by the vectors, so
    re-mining with other rules searches nothing), gold positives and documents with a positive's content are
    dropped, and the rules pick the negatives. They are written as pairs labelled hard_negative with
    score, rank and origin (mined:<encoder>:<rules>); an earlier round's mined pairs are replaced.
    --corpus adds the documents of other datasets to the pools (the ones picked are copied to OUT).
    With --judge, the mined dataset goes to OUT.unjudged and the judged one to OUT.
    """
    from assay.pipelines import api

    with writing(out, "mine"):
        result = api.mine(dataset, out, **options)
    mined = result.parts.get("mine", result)
    d = result.details
    print_counts(mined)
    click.echo(f"encoder {d['encoder']}; rules {d['rules']}; depth {d['depth']}")
    click.echo(format_stats(d["stats"]))
    for pool in d["corpus"]:
        click.echo(format_pool(pool, str(mined.out)))
    if "judge" in result.parts:
        judged = result.parts["judge"]
        j = judged.details
        print_counts(judged)
        click.echo(
            f"judged {j['scored']} mined pairs ({j['cached']} cached): {j['verdicts'].get('no', 0)} hard "
            f"negatives, {j['relabelled']} false negatives; {j['trimmed']} beyond --keep dropped"
        )
