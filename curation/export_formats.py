"""Row layouts of the grouped export formats, as polars lazy queries over the flat pair view.

Every function takes the flat view (one row per pair, the columns of ``curation.export.FLAT_COLUMNS``
with images as path strings, plus ``_pair_idx``, the pair's position in the dataset) and returns the
output rows as a LazyFrame, in a deterministic order, plus the counts of what it had to leave out.
Nothing here reads or writes files; curation.export runs the queries with the streaming engine.

Negatives of a query are its ``hard_negative`` pairs, then its ``negative`` pairs, each by ``rank``
(missing ranks last), then ``doc_id``; ``false_negative`` pairs (judged relevant though not gold) are
never negatives. ``num_negatives`` keeps the first N of them per query.
"""

from __future__ import annotations

import polars as pl

IMAGE_TOKEN = "<|image_1|>"
POSITIVE = "positive"
NEGATIVE_LABELS = ("hard_negative", "negative")


def _present(col: str) -> pl.Expr:
    """The column, with empty strings as null."""
    c = pl.col(col)
    return pl.when(c.str.len_chars() > 0).then(c)


def joined_text(instruction: str | None, text: str) -> pl.Expr:
    """``"{instruction} {text}"`` (either may be missing), or just the text without ``instruction``."""
    if instruction is None:
        return pl.col(text).fill_null("")
    return pl.concat_str([_present(instruction), _present(text)], separator=" ", ignore_nulls=True)


def vlm2vec_text(instruction: str, text: str, image: str) -> pl.Expr:
    """The VLM2Vec text of one side: ``"<|image_1|>\\n{instruction} {text}"`` when it has an image,
    ``"{instruction} {text}"`` when not (the MMEB-train convention)."""
    body = joined_text(instruction, text)
    return pl.when(pl.col(image).is_not_null()).then(pl.lit(IMAGE_TOKEN + "\n") + body).otherwise(body)


def _negatives(view: pl.LazyFrame, num_negatives: int | None, values: dict[str, pl.Expr]) -> pl.LazyFrame:
    """One row per query with a list column per entry of ``values``: its negatives, in order."""
    neg = view.filter(pl.col("label").is_in(pl.Series(NEGATIVE_LABELS).implode()))
    neg = neg.with_columns(_hard=(pl.col("label") != "hard_negative").cast(pl.Int8), **values)
    order = ["_hard", "rank", "doc_id"]

    def ordered(name: str) -> pl.Expr:
        e = pl.col(name).sort_by(order, nulls_last=True)
        return (e.head(num_negatives) if num_negatives is not None else e).alias(name)

    return neg.group_by("query_id").agg([ordered(name) for name in values])


def _count(lf: pl.LazyFrame) -> int:
    return int(lf.select(pl.len()).collect(engine="streaming").item())


def _queries_without_positive(view: pl.LazyFrame) -> int:
    return _count(
        view.group_by("query_id")
        .agg(_p=(pl.col("label") == POSITIVE).any())
        .filter(~pl.col("_p").fill_null(False))
    )


def vlm2vec(view: pl.LazyFrame, num_negatives: int | None) -> tuple[pl.LazyFrame, dict[str, int]]:
    """One row per (query, positive): qry, qry_image_path, pos_text, pos_image_path, neg_text,
    neg_image_path (lists), query_id, subset. Missing image paths are ""."""
    pos = view.filter(pl.col("label") == POSITIVE).select(
        "_pair_idx",
        "query_id",
        "subset",
        qry=vlm2vec_text("query_instruction", "query_text", "query_image"),
        qry_image_path=pl.col("query_image").fill_null(""),
        pos_text=vlm2vec_text("doc_instruction", "doc_text", "doc_image"),
        pos_image_path=pl.col("doc_image").fill_null(""),
    )
    negs = _negatives(
        view,
        num_negatives,
        {
            "neg_text": vlm2vec_text("doc_instruction", "doc_text", "doc_image"),
            "neg_image_path": pl.col("doc_image").fill_null(""),
        },
    )
    empty = pl.lit([], dtype=pl.List(pl.String))
    rows = (
        pos.join(negs, on="query_id", how="left")
        .with_columns(pl.col("neg_text").fill_null(empty), pl.col("neg_image_path").fill_null(empty))
        .sort("_pair_idx")
        .select(
            "qry",
            "qry_image_path",
            "pos_text",
            "pos_image_path",
            "neg_text",
            "neg_image_path",
            "query_id",
            "subset",
        )
    )
    skipped = {
        "queries without a positive pair": _queries_without_positive(view),
        "false_negative pairs (never negatives)": _count(view.filter(pl.col("label") == "false_negative")),
    }
    return rows, skipped


def _st_view(view: pl.LazyFrame, with_instruction: bool) -> tuple[pl.LazyFrame, int]:
    """Add ``_anchor`` and ``_doc`` texts; drop (and count) rows without text on either side."""
    qi, di = ("query_instruction", "doc_instruction") if with_instruction else (None, None)
    v = view.with_columns(_anchor=joined_text(qi, "query_text"), _doc=joined_text(di, "doc_text"))
    empty = (pl.col("_anchor").str.len_chars() == 0) | (pl.col("_doc").str.len_chars() == 0)
    return v.filter(~empty), _count(v.filter(empty))


def sentence_transformers(
    view: pl.LazyFrame, fmt: str, num_negatives: int | None, with_instruction: bool = False
) -> tuple[pl.LazyFrame, dict[str, int]]:
    """The sentence-transformers layouts (the shapes of ``mine_hard_negatives``'s output formats):

    - ``triplet``: anchor, positive, negative; one row per (query, positive, negative);
    - ``n-tuple``: anchor, positive, negative_1 .. negative_N; one row per (query, positive); queries
      with fewer than N negatives are left out;
    - ``labeled-pair``: sentence1, sentence2, label (1.0 positive, 0.0 negative); one row per pair;
    - ``labeled-list``: query, docs (positives then negatives), labels (1 / 0); one row per query.
    """
    v, no_text = _st_view(view, with_instruction)
    skipped = {"rows without text": no_text}
    skipped["false_negative pairs (never negatives)"] = _count(v.filter(pl.col("label") == "false_negative"))
    if fmt != "labeled-pair":  # a labeled pair needs no positive: a query's negatives stand alone
        skipped["queries without a positive pair"] = _queries_without_positive(v)
    pos = v.filter(pl.col("label") == POSITIVE).select("_pair_idx", "query_id", "_anchor", "_doc")
    negs = _negatives(v, num_negatives, {"_neg": pl.col("_doc")})
    if fmt in ("triplet", "n-tuple"):
        joined = pos.join(negs, on="query_id", how="left").with_columns(
            _n=pl.col("_neg").list.len().fill_null(0)
        )
        if fmt == "triplet":
            skipped["positives whose query has no negative"] = _count(joined.filter(pl.col("_n") == 0))
            rows = (
                joined.filter(pl.col("_n") > 0)
                .sort("_pair_idx")
                .explode("_neg")
                .select(anchor="_anchor", positive="_doc", negative="_neg")
            )
            return rows, skipped
        if num_negatives is None or num_negatives < 1:
            raise ValueError("the n-tuple format needs num_negatives >= 1 (the number of negative columns)")
        short = joined.filter(pl.col("_n") < num_negatives)
        skipped[f"positives whose query has fewer than {num_negatives} negatives"] = _count(short)
        skipped[f"queries with fewer than {num_negatives} negatives"] = _count(
            short.select("query_id").unique()
        )
        rows = (
            joined.filter(pl.col("_n") >= num_negatives)
            .sort("_pair_idx")
            .select(
                anchor="_anchor",
                positive="_doc",
                **{f"negative_{i + 1}": pl.col("_neg").list.get(i) for i in range(num_negatives)},
            )
        )
        return rows, skipped

    # ordering of the per-query formats: the queries in order of their first pair
    first = v.group_by("query_id").agg(_q=pl.col("_pair_idx").min(), _a=pl.col("_anchor").first())
    if fmt == "labeled-pair":
        p = pos.select(
            "query_id",
            sentence1="_anchor",
            sentence2="_doc",
            label=pl.lit(1.0),
            _k=pl.lit(0, pl.Int8),
            _i=pl.col("_pair_idx").cast(pl.Int64),
        )
        n = (
            negs.with_columns(_i=pl.int_ranges(0, pl.col("_neg").list.len(), dtype=pl.Int64))
            .explode(["_neg", "_i"])
            .join(first, on="query_id", how="inner")
            .select(
                "query_id",
                sentence1="_a",
                sentence2="_neg",
                label=pl.lit(0.0),
                _k=pl.lit(1, pl.Int8),
                _i="_i",
            )
        )
        rows = (
            pl.concat([p, n], how="vertical")
            .join(first.select("query_id", "_q"), on="query_id", how="inner")
            .sort(["_q", "_k", "_i"])
            .select("sentence1", "sentence2", "label")
        )
        return rows, skipped
    if fmt == "labeled-list":
        plist = pos.group_by("query_id").agg(
            _pdocs=pl.col("_doc").sort_by("_pair_idx"),
            _q=pl.col("_pair_idx").min(),
            query=pl.col("_anchor").first(),
        )
        empty = pl.lit([], dtype=pl.List(pl.String))
        rows = (
            plist.join(negs, on="query_id", how="left")
            .with_columns(pl.col("_neg").fill_null(empty))
            .with_columns(
                docs=pl.concat_list([pl.col("_pdocs"), pl.col("_neg")]),
                labels=pl.concat_list(
                    [
                        pl.lit(1, pl.Int64).repeat_by(pl.col("_pdocs").list.len()),
                        pl.lit(0, pl.Int64).repeat_by(pl.col("_neg").list.len()),
                    ]
                ),
            )
            .sort("_q")
            .select("query", "docs", "labels")
        )
        return rows, skipped
    raise ValueError(f"unknown sentence-transformers format {fmt!r}")
