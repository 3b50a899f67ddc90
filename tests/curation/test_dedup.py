"""Dedup: exact and near duplicates, decontamination, pair rewriting, quarantine, resume, CLI."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.badrows import png as png_bytes
from PIL import Image

from assay.curation.content_key import content_key, iter_content_keys, normalize_text
from assay.curation.dataset import Dataset, DatasetError, write_dataset
from assay.curation.dedup import dedup
from assay.curation.executor import LocalExecutor
from assay.curation.hamming import _popcount_swar, greedy_near_duplicates, near_pairs, popcount
from assay.curation.near_image import image_signature
from assay.curation.quarantine import decode_record
from assay.curation.schema import CORPUS, PAIRS, QUERIES

# ------------------------------------------------------------------------------------------- helpers


def pic(seed: int, *, size: int = 32, pixel: tuple[int, int] | None = None, compress: int = 6) -> bytes:
    """A smooth random picture (8x8 colours scaled up); ``pixel`` turns that one pixel white."""
    rs = np.random.RandomState(seed)
    img = Image.fromarray((rs.rand(8, 8, 3) * 255).astype("uint8")).resize((size, size), Image.BILINEAR)
    if pixel is not None:
        img.putpixel(pixel, (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress)
    return buf.getvalue()


def bits_apart(a: bytes, b: bytes) -> int:
    return int(popcount(np.uint64(image_signature(a).phash) ^ np.uint64(image_signature(b).phash)))


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def smooth(seed: int, size: int = 64) -> Image.Image:
    rs = np.random.RandomState(seed)
    return Image.fromarray((rs.rand(8, 8, 3) * 255).astype("uint8")).resize((size, size), Image.BILINEAR)


def shape(colour, size: int = 64, box: tuple[int, int, int, int] = (20, 20, 44, 44)) -> Image.Image:
    """A coloured square on white: pictures of different colours have the same (grayscale) pHash."""
    im = Image.new("RGB", (size, size), "white")
    im.paste(Image.new("RGB", (box[2] - box[0], box[3] - box[1]), colour), box[:2])
    return im


def img(data: bytes | None = None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


def q(qid, text=None, image=None, subset="s1"):
    return {
        "query_id": qid,
        "subset": subset,
        "task": "retrieval",
        "instruction": "Find it.",
        "text": text,
        "image": image,
    }


def d(did, text=None, image=None, subset="s1"):
    return {"doc_id": did, "subset": subset, "instruction": None, "text": text, "image": image}


def p(qid, did, label="positive"):
    return {
        "query_id": qid,
        "doc_id": did,
        "label": label,
        "score": None,
        "rank": None,
        "judge_p_yes": None,
        "judge_verdict": None,
        "origin": "gold",
    }


def make(root: Path, queries=(), corpus=(), pairs=(), **kw) -> Dataset:
    return write_dataset(root, {QUERIES: list(queries), CORPUS: list(corpus), PAIRS: list(pairs)}, **kw)


def rows(ds_or_path, table: str) -> list[dict]:
    ds = ds_or_path if isinstance(ds_or_path, Dataset) else Dataset(ds_or_path)
    return [r for n in ds.shards(table) for r in ds.read_shard(table, n).to_pylist()]


def ids(ds_or_path, table: str) -> list[str]:
    col = {QUERIES: "query_id", CORPUS: "doc_id"}[table]
    return [r[col] for r in rows(ds_or_path, table)]


def quarantine(out: Path) -> list[dict]:
    qdir = Path(out) / "quarantine"
    return [r for f in sorted(qdir.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def reasons(out: Path) -> dict[str, str]:
    """id -> reason of what dedup quarantined."""
    return {r["id"]: r["reason"] for r in quarantine(out) if r["stage"] == "dedup"}


def parquet_contents(root: Path) -> dict[str, list[dict]]:
    """Every Parquet file of a finished dataset, by relative path, as rows."""
    return {
        str(f.relative_to(root)): pq.read_table(f).to_pylist()
        for f in sorted(Path(root).rglob("*.parquet"))
        if "_progress" not in f.parts
    }


# ------------------------------------------------------------------------------------ content keys


def test_normalize_text_nfkc_casefold_whitespace():
    assert normalize_text("  Hello\u00a0\t WORLD \n") == "hello world"
    assert normalize_text("ｈｅｌｌｏ") == "hello"  # full-width forms (NFKC)
    assert normalize_text("Straße") == normalize_text("STRASSE")  # casefold, not lower
    assert normalize_text("   ") is None and normalize_text(None) is None
    assert content_key("A  b", None, ".").digest == content_key("a B", None, ".").digest
    assert content_key("a", img(b"x"), ".").digest != content_key("a", None, ".").digest


# ----------------------------------------------------------------------------------- exact duplicates


def test_exact_text_duplicates_with_case_whitespace_and_unicode_variants(tmp_path):
    src = make(
        tmp_path / "src",
        queries=[
            q("q1", "Hello World"),
            q("q2", "  hello   WORLD "),
            q("q3", "HELLO\u00a0world"),
            q("q4", "ｈｅｌｌｏ world"),
            q("q5", "hello worlds"),
            q("q6", "Hello World", subset="s2"),  # same text, other subset: kept
        ],
        rows_per_shard=2,
    )
    m = dedup(src, tmp_path / "out")
    assert ids(tmp_path / "out", QUERIES) == ["q1", "q5", "q6"]
    assert reasons(tmp_path / "out") == {
        "q2": "exact_duplicate",
        "q3": "exact_duplicate",
        "q4": "exact_duplicate",
    }
    assert m.quarantine_reasons == {"dedup:exact_duplicate": 3}
    assert m.extra["dedup"]["queries"]["exact_duplicate"] == 3
    details = {r["id"]: r["detail"] for r in quarantine(tmp_path / "out")}
    assert "'q1'" in details["q4"]


def test_image_bytes_duplicates_inline_and_by_path(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    a, b = pic(1), pic(2)
    (media / "a.png").write_bytes(a)
    src = make(
        tmp_path / "src",
        corpus=[
            d("d1", image=img(a)),
            d("d2", image=img(path="a.png")),  # same bytes, by path: duplicate of d1
            d("d3", "a caption", image=img(a)),  # same image, other text: kept
            d("d4", image=img(b)),  # another picture: kept
            d("d5", image=img(path="missing.png")),  # unreadable: compared by path
            d("d6", image=img(path="missing.png")),
        ],
        data_root=str(media),
    )
    m = dedup(src, tmp_path / "out", near=False)
    assert ids(tmp_path / "out", CORPUS) == ["d1", "d3", "d4", "d5"]
    assert reasons(tmp_path / "out") == {"d2": "exact_duplicate", "d6": "exact_duplicate"}
    stats = m.extra["dedup"]["corpus"]
    assert stats["images_unreadable"] == 2 and "missing.png" in stats["notes"][0]
    # the whole row is in the quarantine, path and all
    rec = {r["id"]: decode_record(r["record"]) for r in quarantine(tmp_path / "out")}
    assert rec["d2"] == d("d2", image=img(path="a.png"))


# ------------------------------------------------------------------------------------ near duplicates


def test_near_duplicate_images_by_distance(tmp_path):
    base, one_pixel, other = pic(0), pic(0, pixel=(31, 31)), pic(3)
    reencoded = pic(0, compress=0)  # other bytes, same pixels: same pHash
    assert 1 <= bits_apart(base, one_pixel) <= 4 and bits_apart(base, other) > 10 and reencoded != base
    src = make(
        tmp_path / "src",
        corpus=[
            d("d1", "a photo", img(base)),
            d("d2", "A photo ", img(one_pixel)),  # one pixel changed, same normalised text
            d("d3", "a photo", img(other)),  # a different picture
            d("d4", "another text", img(one_pixel)),  # other text: never a near duplicate of d1
            d("d5", "a photo", img(reencoded)),
        ],
    )
    dedup(src, tmp_path / "d4", phash_distance=4)
    assert ids(tmp_path / "d4", CORPUS) == ["d1", "d3", "d4"]
    assert reasons(tmp_path / "d4") == {"d2": "near_duplicate_image", "d5": "near_duplicate_image"}
    detail = {r["id"]: r["detail"] for r in quarantine(tmp_path / "d4")}["d2"]
    assert "'d1'" in detail and "bits" in detail

    dedup(src, tmp_path / "d0", phash_distance=0)  # equal hashes only
    assert ids(tmp_path / "d0", CORPUS) == ["d1", "d2", "d3", "d4"]
    for off in ({"phash_distance": -1}, {"near": False}):
        dedup(src, tmp_path / "off", overwrite=True, **off)
        assert ids(tmp_path / "off", CORPUS) == ["d1", "d2", "d3", "d4", "d5"]


def test_exact_copy_of_a_near_duplicate_points_to_the_kept_row(tmp_path):
    """d2 is a near duplicate of d1, d3 an exact copy of d2: d3's pairs go to d1, the row kept."""
    variant = pic(0, pixel=(31, 31))
    src = make(
        tmp_path / "src",
        queries=[q("q1", "which one?")],
        corpus=[d("d1", image=img(pic(0))), d("d2", image=img(variant)), d("d3", image=img(variant))],
        pairs=[p("q1", "d3")],
    )
    dedup(src, tmp_path / "out")
    assert ids(tmp_path / "out", CORPUS) == ["d1"]
    assert [(r["query_id"], r["doc_id"]) for r in rows(tmp_path / "out", PAIRS)] == [("q1", "d1")]
    detail = {r["id"]: r["detail"] for r in quarantine(tmp_path / "out")}["d3"]
    assert "'d2'" in detail and "kept row: 'd1'" in detail


def test_near_duplicates_greedy_against_kept_rows(tmp_path):
    """c is within distance of b, b of a, but c not of a: a kept, b dropped, c kept (b was not kept)."""
    hashes = np.array([0, 0b111, 0b111111], dtype=np.uint64)
    assert greedy_near_duplicates(hashes, np.zeros(3, np.int64), 3).tolist() == [-1, 0, -1]


def test_banding_finds_exactly_the_brute_force_pairs():
    rng = np.random.default_rng(7)
    for distance in (0, 1, 3, 4, 8):
        centres = rng.integers(0, 2**63, size=60, dtype=np.uint64)
        hashes = []
        for c in rng.integers(0, len(centres), size=300):  # clusters: flip 0 to 8 random bits
            h = int(centres[c])
            for bit in rng.integers(0, 64, size=int(rng.integers(0, 9))):
                h ^= 1 << int(bit)
            hashes.append(h)
        h = np.array(hashes, dtype=np.uint64)
        g = rng.integers(0, 2, size=len(h))

        def near(x, y, gx, gy):
            return gx == gy and bin(int(x) ^ int(y)).count("1") <= distance  # noqa: B023

        i, j = near_pairs(h, distance, g)
        brute = {(a, b) for b in range(len(h)) for a in range(b) if near(h[a], h[b], g[a], g[b])}
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == brute and len(i) == len(brute)
        assert len(brute) > 0

        ev, eg = h[::7] ^ np.uint64(1 << 5), g[::7]
        i, j = near_pairs(h, distance, g, against=ev, against_groups=eg)
        brute = {(a, b) for b in range(len(h)) for a in range(len(ev)) if near(ev[a], h[b], eg[a], g[b])}
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == brute

        kept, expect = [], []
        for b in range(len(h)):
            w = [a for a in kept if near(h[a], h[b], g[a], g[b])]
            expect.append(min(w) if w else -1)
            if not w:
                kept.append(b)
        assert greedy_near_duplicates(h, g, distance).tolist() == expect
    x = rng.integers(0, 2**64 - 1, size=1000, dtype=np.uint64, endpoint=True)
    assert (_popcount_swar(x) == popcount(x)).all()


# ------------------------------------------------------------- near duplicates: colour and targets (issue 15)


def test_recoloured_copies_are_not_near_duplicates(tmp_path):
    """pHash sees grayscale structure only: six solid colours (and one square in six colours) hash
    alike. Before issue 15 dedup folded each set into one document."""
    colours = ["red", "green", "blue", "yellow", "black", "gray"]
    solid = [encode(Image.new("RGB", (64, 64), c)) for c in colours]
    squares = [encode(shape(c)) for c in colours]
    for pictures in (solid, squares):  # the pHashes are within a bit of one another: candidates all
        assert max(bits_apart(pictures[0], x) for x in pictures) <= 1
    src = make(
        tmp_path / "src",
        corpus=[d(f"solid-{c}", image=img(b)) for c, b in zip(colours, solid, strict=True)]
        + [d(f"square-{c}", "a square", img(b)) for c, b in zip(colours, squares, strict=True)],
    )
    m = dedup(src, tmp_path / "out")
    assert len(ids(tmp_path / "out", CORPUS)) == 12 and reasons(tmp_path / "out") == {}
    assert m.extra["dedup"]["corpus"]["near_duplicate_image"] == 0
    assert m.config["colour_distance"] == 32


def test_reencoded_and_slightly_resized_copies_still_go(tmp_path):
    base = smooth(0)
    jpeg = encode(base, "JPEG", quality=90)
    resized = encode(base.resize((60, 60), Image.BICUBIC))
    original = encode(base)
    assert bits_apart(original, jpeg) <= 4 and bits_apart(original, resized) <= 4
    src = make(
        tmp_path / "src",
        queries=[
            q("q1", "what is it?", img(original)),
            q("q2", "What is it?", img(jpeg)),
            q("q3", "what is it?", img(resized)),
        ],
        corpus=[d("d1", "a thing")],
        pairs=[p("q1", "d1"), p("q2", "d1"), p("q3", "d1")],
    )
    m = dedup(src, tmp_path / "out")
    assert ids(tmp_path / "out", QUERIES) == ["q1"]
    assert reasons(tmp_path / "out") == {
        "q2": "near_duplicate_image",
        "q3": "near_duplicate_image",
        "q2->d1": "duplicate_pair",  # rewritten to (q1, d1): the very pair q1 has
        "q3->d1": "duplicate_pair",
    }
    detail = {r["id"]: r["detail"] for r in quarantine(tmp_path / "out")}["q2"]
    assert "'q1'" in detail and "(colour)" in detail and "same text and targets" in detail
    assert m.extra["dedup"]["queries"]["near_duplicate_conflicts"] == 0
    # ...and --no-near (near=False) keeps them all
    dedup(src, tmp_path / "off", near=False)
    assert ids(tmp_path / "off", QUERIES) == ["q1", "q2", "q3"]


def test_same_question_other_answer_is_a_conflict_not_a_copy(tmp_path):
    """The same question about a picture and its re-encoded copy, answered yes and no: both rows stay
    (folding would tell training that the kept picture's answer is both), counted as a conflict."""
    picture = encode(smooth(5))
    copy = encode(smooth(5), "JPEG", quality=90)
    assert bits_apart(picture, copy) <= 4
    src = make(
        tmp_path / "src",
        queries=[
            q("q1", "Is it red?", img(picture)),
            q("q2", "is it red?", img(copy)),
            q("q3", "Is it red?", img(encode(smooth(5).resize((60, 60), Image.BICUBIC)))),
        ],
        corpus=[d("yes", "yes"), d("no", "no")],
        pairs=[p("q1", "yes"), p("q2", "no"), p("q3", "yes")],
    )
    m = dedup(src, tmp_path / "out")
    assert ids(tmp_path / "out", QUERIES) == ["q1", "q2"]  # q3 agrees with q1: a copy
    assert reasons(tmp_path / "out") == {"q3": "near_duplicate_image", "q3->yes": "duplicate_pair"}
    got = [(r["query_id"], r["doc_id"]) for r in rows(tmp_path / "out", PAIRS)]
    assert got == [("q1", "yes"), ("q2", "no")]
    stats = m.extra["dedup"]["queries"]
    assert stats["near_duplicate_conflicts"] == 1
    assert (
        "'q2' and 'q1'" in stats["conflict_examples"][0]
        and "other positive documents" in stats["conflict_examples"][0]
    )


def test_documents_told_apart_by_a_query_are_not_folded(tmp_path):
    """Two near-identical pictures in the corpus fold (their queries then name one copy), unless a
    query calls one relevant and the other irrelevant: then the pairs say they differ."""
    a, b = encode(smooth(3)), encode(smooth(3), "JPEG", quality=90)
    pairs = [p("q1", "a"), p("q2", "b")]
    src = make(
        tmp_path / "src",
        queries=[q("q1", "x"), q("q2", "y")],
        corpus=[d("a", image=img(a)), d("b", image=img(b))],
        pairs=pairs,
    )
    dedup(src, tmp_path / "folded")
    assert ids(tmp_path / "folded", CORPUS) == ["a"]
    assert [(r["query_id"], r["doc_id"]) for r in rows(tmp_path / "folded", PAIRS)] == [
        ("q1", "a"),
        ("q2", "a"),
    ]
    told_apart = make(
        tmp_path / "src2",
        queries=[q("q1", "x"), q("q2", "y")],
        corpus=[d("a", image=img(a)), d("b", image=img(b))],
        pairs=[*pairs, p("q1", "b", "hard_negative")],
    )
    m = dedup(told_apart, tmp_path / "kept")
    assert ids(tmp_path / "kept", CORPUS) == ["a", "b"]
    assert m.extra["dedup"]["corpus"]["near_duplicate_conflicts"] == 1


def test_a_recoloured_eval_picture_is_not_contamination(tmp_path):
    evalset = make(tmp_path / "eval", queries=[q("e1", "what colour?", img(encode(shape("red"))))])
    src = make(
        tmp_path / "src",
        queries=[
            q("t1", "what colour?", img(encode(shape("green")))),
            q("t2", "what colour?", img(encode(shape("red").resize((60, 60), Image.BICUBIC)))),
        ],
    )
    dedup(src, tmp_path / "out", against=[evalset])
    assert reasons(tmp_path / "out") == {"t2": "contaminated"}
    detail = {r["id"]: r["detail"] for r in quarantine(tmp_path / "out")}["t2"]
    assert "(colour)" in detail and "'e1'" in detail


def test_colour_distance_fits_the_picture_size():
    """A cell covers at least 4x4 pixels of the smaller picture: one changed pixel moves it by 1/16."""
    from assay.curation.near_image import colour_distance, fitting_grid, image_signature

    assert fitting_grid(np.array([7, 8, 16, 31, 32, 4000])).tolist() == [1, 2, 4, 4, 8, 8]
    for size in (8, 16, 32, 64):
        base = Image.new("RGB", (size, size), (0, 0, 0))
        dot = base.copy()
        dot.putpixel((0, 0), (255, 255, 255))
        x, y = image_signature(encode(base)), image_signature(encode(dot))
        assert x.phash is not None and colour_distance(x.thumb, y.thumb, x.side, y.side)[0] <= 16, size


def test_greedy_with_an_accept_rule_equals_the_brute_force_walk():
    """The fast path (banding, equal rows collapsed through ``same``) decides as a walk that compares
    every row with every kept row, when accept() refuses pairs (dedup: colour, targets)."""
    rng = np.random.default_rng(15)
    for distance in (0, 2, 4):
        centres = rng.integers(0, 2**63, size=20, dtype=np.uint64)
        h = centres[rng.integers(0, 20, size=400)]
        flips = rng.integers(0, 64, size=(400, 3))
        for k in range(3):
            h = np.where(rng.random(400) < 0.3, h ^ (np.uint64(1) << flips[:, k].astype(np.uint64)), h)
        g = rng.integers(0, 2, size=400)
        colour = rng.integers(0, 3, size=400)  # a stand-in for the thumbnail: equal colours accept

        def accept(a, b):
            return colour[a] == colour[b]  # noqa: B023

        got = greedy_near_duplicates(h, g, distance, accept=accept, same=[colour])
        kept, expect = [], []
        for j in range(len(h)):
            w = [
                i
                for i in kept
                if g[i] == g[j]
                and colour[i] == colour[j]
                and bin(int(h[i]) ^ int(h[j])).count("1") <= distance
            ]
            expect.append(min(w) if w else -1)
            if not w:
                kept.append(j)
        assert got.tolist() == expect and (got >= 0).sum() > 50


# ------------------------------------------------------------------------------------------- pairs


def test_pairs_rewritten_to_kept_rows_and_duplicate_pairs_quarantined(tmp_path):
    src = make(
        tmp_path / "src",
        queries=[q("q1", "red car"), q("q2", "Red  car")],
        corpus=[d("d1", "a red car"), d("d2", "A RED CAR"), d("d3", "a bus")],
        pairs=[p("q1", "d1"), p("q2", "d2", "hard_negative"), p("q2", "d3"), p("q1", "d3"), p("qX", "d2")],
        rows_per_shard=2,
    )
    m = dedup(src, tmp_path / "out")
    got = [(r["query_id"], r["doc_id"], r["label"]) for r in rows(tmp_path / "out", PAIRS)]
    assert got == [("q1", "d1", "positive"), ("q1", "d3", "positive"), ("qX", "d1", "positive")]
    quar = [r for r in quarantine(tmp_path / "out") if r["table"] == PAIRS]
    assert [r["reason"] for r in quar] == ["duplicate_pair", "duplicate_pair"]
    # the quarantined pairs are stored as they were, before rewriting
    assert [(decode_record(r["record"])["query_id"], decode_record(r["record"])["doc_id"]) for r in quar] == [
        ("q2", "d2"),
        ("q1", "d3"),
    ]
    assert m.extra["dedup"]["pairs"] == {
        "rows": 5,
        "rewritten": 2,
        "duplicate_pair": 2,
        "references_removed_row": 0,
    }
    assert m.counts[PAIRS] == 3


# ------------------------------------------------------------------------------------ decontamination


def test_decontamination_exact_and_near_corpus_off_by_default(tmp_path):
    a, e3 = pic(4), pic(5)
    evalset = make(
        tmp_path / "eval",
        queries=[
            q("e1", "What is shown?", img(a), subset="x"),
            q("e2", "a cat"),
            q("e3", "describe", img(e3)),
        ],
        corpus=[d("ec1", "tabby cat")],
    )
    train = [
        q("t1", "what is  SHOWN?", img(a)),  # exact, another subset
        q("t2", "A cat"),  # exact, text only
        q("t3", "describe", img(pic(5, pixel=(31, 31)))),  # near
        q("t4", "describe", img(pic(6))),  # clean
        q("t5", "what is shown?"),
    ]  # same text, no image: clean
    src = make(
        tmp_path / "src",
        queries=train,
        corpus=[d("c1", "Tabby cat"), d("c2", "dog")],
        pairs=[p("t1", "c1"), p("t4", "c2"), p("t3", "c2")],
    )
    m = dedup(src, tmp_path / "out", against=[evalset])
    assert ids(tmp_path / "out", QUERIES) == ["t4", "t5"]
    assert ids(tmp_path / "out", CORPUS) == ["c1", "c2"]  # corpus not checked by default
    got = {(r["table"], r["id"]): (r["reason"], r["detail"]) for r in quarantine(tmp_path / "out")}
    assert got[(QUERIES, "t1")][0] == "contaminated" and "'e1'" in got[(QUERIES, "t1")][1]
    assert "eval" in got[(QUERIES, "t1")][1]
    assert got[(QUERIES, "t2")][0] == "contaminated"
    assert got[(QUERIES, "t3")][0] == "contaminated" and "bits" in got[(QUERIES, "t3")][1]
    assert got[(PAIRS, "t1->c1")][0] == "references_removed_row"
    assert got[(PAIRS, "t3->c2")][0] == "references_removed_row"
    assert [(r["query_id"], r["doc_id"]) for r in rows(tmp_path / "out", PAIRS)] == [("t4", "c2")]
    assert m.quarantine_reasons == {"dedup:contaminated": 3, "dedup:references_removed_row": 2}
    # the whole row, image bytes included
    rec = decode_record(next(r["record"] for r in quarantine(tmp_path / "out") if r["id"] == "t1"))
    assert rec == train[0]

    dedup(src, tmp_path / "both", against=[evalset], decontaminate=("queries", "corpus"), phash_distance=-1)
    assert ids(tmp_path / "both", QUERIES) == ["t3", "t4", "t5"]  # near off: t3 stays
    assert ids(tmp_path / "both", CORPUS) == ["c2"]


def test_contaminated_row_is_not_a_dedup_target(tmp_path):
    """A duplicate of a contaminated row is contaminated too; its pairs are not redirected to it."""
    make(tmp_path / "eval", queries=[q("e1", "leak")])
    src = make(tmp_path / "src", queries=[q("t1", "leak"), q("t2", "LEAK"), q("t3", "fine")])
    dedup(src, tmp_path / "out", against=[tmp_path / "eval"])  # a path works as well as a Dataset
    assert reasons(tmp_path / "out") == {"t1": "contaminated", "t2": "contaminated"}


def test_errors_are_clear(tmp_path):
    src = make(tmp_path / "src", queries=[q("q1", "x")])
    with pytest.raises(ValueError, match="phash_distance"):
        dedup(src, tmp_path / "o1", phash_distance=40)
    with pytest.raises(ValueError, match="unknown table"):
        dedup(src, tmp_path / "o2", against=[src.root.parent / "src"], decontaminate="queries,pairs")
    with pytest.raises(ValueError, match="must not be the dataset being deduplicated"):
        dedup(src, tmp_path / "o3", against=[src])
    with pytest.raises(DatasetError, match="not an assay dataset"):
        dedup(src, tmp_path / "o4", against=[tmp_path / "nothing"])
    first = dedup(src, tmp_path / "o5")
    assert dedup(src, tmp_path / "o5").to_json() == first.to_json()  # finished: nothing to do
    with pytest.raises(DatasetError, match="other inputs or settings"):
        dedup(src, tmp_path / "o5", phash_distance=2)


def test_iter_content_keys_reads_images_from_the_data_root(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(pic(1))
    src = make(
        tmp_path / "src",
        corpus=[d("d1", "x", img(pic(1))), d("d2", " X", img(path="a.png"))],
        data_root=str(media),
    )
    keys = dict(iter_content_keys(src, CORPUS))
    assert keys["d1"].digest == keys["d2"].digest and keys["d2"].image_note is None


# -------------------------------------------------------------------------------------------- resume


class FailAfter:
    """An executor that runs ``n`` tasks in all, then fails like a killed worker."""

    name = "fail-after"

    def __init__(self, n: int):
        self.left = n

    def map(self, fn, tasks, desc):
        out = []
        for t in tasks:
            if self.left <= 0:
                self.desc = desc
                raise RuntimeError(f"killed during {desc}")
            self.left -= 1
            out.append(fn(t))
        return out


def _big_source(tmp_path: Path) -> tuple[Dataset, Dataset]:
    media = tmp_path / "media"
    media.mkdir()
    for s in range(6):
        (media / f"{s}.png").write_bytes(pic(s))
    queries = [q(f"q{i}", f"Question {i % 7}", img(pic(i % 5)) if i % 3 else None) for i in range(40)]
    corpus = [
        d(
            f"d{i}",
            None if i % 2 else f"doc {i % 5}",
            img(path=f"{i % 6}.png") if i % 4 == 0 else img(pic(i % 6, pixel=(31, 31) if i % 5 else None)),
        )
        for i in range(40)
    ]
    pairs = [p(f"q{i}", f"d{(i * 7) % 40}") for i in range(40)] + [p(f"q{i}", f"d{i}") for i in range(40)]
    src = make(tmp_path / "src", queries, corpus, pairs, rows_per_shard=6, data_root=str(media))
    ev = make(
        tmp_path / "eval",
        queries=[q("e1", "question 3", img(pic(3))), q("e2", "Question 5")],
        rows_per_shard=1,
    )
    return src, ev


@pytest.mark.parametrize("fail_after", [3, 20, 29, 30, 45, 57])
def test_resume_after_failure_equals_uninterrupted_run(tmp_path, fail_after):
    """Tasks: scan 28 (7 query, 7 corpus, 14 pair shards), eval scan 2, write 28. Fail in each
    phase (and at the very last task), rerun: the same Parquet files as a run never interrupted."""
    src, ev = _big_source(tmp_path)
    clean = dedup(src, tmp_path / "clean", against=[ev], executor=LocalExecutor(progress=False))
    failing = FailAfter(fail_after)
    with pytest.raises(RuntimeError, match="killed"):
        dedup(src, tmp_path / "out", against=[ev], executor=failing)
    assert (
        failing.desc
        == {
            3: "dedup: scan",
            20: "dedup: scan",
            29: "dedup: scan eval",
            30: "dedup: write",
            45: "dedup: write",
            57: "dedup: write",
        }[fail_after]
    )
    assert not (tmp_path / "out" / "manifest.json").exists()
    resumed = dedup(src, tmp_path / "out", against=[ev])
    assert parquet_contents(tmp_path / "out") == parquet_contents(tmp_path / "clean")
    assert resumed.counts == clean.counts and resumed.quarantine_reasons == clean.quarantine_reasons
    assert resumed.extra == clean.extra
    assert sum(clean.quarantine_reasons.values()) > 10  # the data does exercise every rule
    assert {
        "dedup:exact_duplicate",
        "dedup:near_duplicate_image",
        "dedup:contaminated",
        "dedup:duplicate_pair",
        "dedup:references_removed_row",
    } <= set(clean.quarantine_reasons)
    # nothing lost: every input row is either in the output or in the quarantine
    for table in (QUERIES, CORPUS, PAIRS):
        n_q = sum(1 for r in quarantine(tmp_path / "out") if r["table"] == table)
        assert resumed.counts[table] + n_q == src.num_rows(table)


def test_resume_with_other_settings_is_refused(tmp_path):
    src, ev = _big_source(tmp_path)
    with pytest.raises(RuntimeError):
        dedup(src, tmp_path / "out", executor=FailAfter(5))
    with pytest.raises(DatasetError, match="other inputs or settings"):
        dedup(src, tmp_path / "out", phash_distance=2)
    with pytest.raises(DatasetError, match="other inputs or settings"):
        dedup(src, tmp_path / "out", against=[ev])


# ----------------------------------------------------------------------------------------------- CLI


@pytest.mark.ray
def test_cli_with_ray_executor(tmp_path, ray_local):
    from click.testing import CliRunner

    from assay.pipelines.commands.dedup import command

    src, ev = _big_source(tmp_path)
    local = dedup(src, tmp_path / "local", against=[ev])
    result = CliRunner().invoke(
        command,
        [str(src.root), str(tmp_path / "out"), "--against", str(ev.root), "--executor", "ray"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "dedup: queries=" in result.output and "exact_duplicate" in result.output
    assert "contaminated" in result.output
    assert parquet_contents(tmp_path / "out") == parquet_contents(tmp_path / "local")
    assert Dataset(tmp_path / "out").manifest.counts == local.counts


def test_cli_help_and_errors(tmp_path):
    from click.testing import CliRunner

    from assay.pipelines.commands.dedup import command

    runner = CliRunner()
    help_text = runner.invoke(command, ["--help"]).output
    for word in ("--phash-distance", "--against", "--decontaminate", "class names", "quarantine", "resume"):
        assert word in help_text
    src = make(tmp_path / "src", queries=[q("q1", "x"), q("q2", "X")])
    (tmp_path / "plain").mkdir()
    r = runner.invoke(command, [str(tmp_path / "plain"), str(tmp_path / "o")])
    assert r.exit_code != 0 and "not an assay dataset" in r.output
    r = runner.invoke(command, [str(src.root), str(tmp_path / "o"), "--decontaminate", "corpus"])
    assert r.exit_code != 0 and "--against" in r.output
    r = runner.invoke(
        command, [str(src.root), str(tmp_path / "o"), "--phash-distance", "99", "--executor", "local"]
    )
    assert r.exit_code != 0 and "phash_distance" in r.output.replace("--phash-distance", "phash_distance")
    r = runner.invoke(command, [str(src.root), str(tmp_path / "o"), "--executor", "local"])
    assert r.exit_code == 0 and "exact_duplicate" in r.output and "queries=1" in r.output


def test_images_only_decontamination_spares_text_only_rows(tmp_path):
    img = png_bytes((0, 0, 255))
    train = write_dataset(
        tmp_path / "train",
        {
            "queries": [
                {"query_id": "t1", "subset": "r", "text": "a blue circle"},
                {"query_id": "t2", "subset": "c", "text": None, "image": {"bytes": img, "path": None}},
                {
                    "query_id": "t3",
                    "subset": "c",
                    "text": "other",
                    "image": {"bytes": png_bytes((1, 2, 3)), "path": None},
                },
            ]
        },
    )
    test = write_dataset(
        tmp_path / "test",
        {
            "queries": [
                {"query_id": "e1", "subset": "r", "text": "A blue  circle"},
                {"query_id": "e2", "subset": "c", "text": None, "image": {"bytes": img, "path": None}},
            ]
        },
    )
    dedup(train, tmp_path / "all", near=False, against=[test])
    dedup(train, tmp_path / "img", near=False, against=[test], decontaminate_text_only=False)
    kept = lambda root: {r["query_id"] for b in Dataset(root).iter_batches("queries") for r in b.to_pylist()}  # noqa: E731
    assert kept(tmp_path / "all") == {"t3"}
    assert kept(tmp_path / "img") == {"t1", "t3"}


def test_text_only_fast_scan_gives_the_row_by_row_keys(tmp_path):
    from assay.curation.dedup_scan import scan_shard

    texts = [
        "Hello  World",
        "  ÀBC\u00a0d ",
        None,
        "x\x1cy",
        "   ",
        "Straße",
        "ﬁne\tTAB",
        "a\x0bb\x85c",
        "ς end",
    ]
    ds = write_dataset(
        tmp_path / "ds", {"corpus": [{"doc_id": f"d{i}", "text": t} for i, t in enumerate(texts)]}
    )
    side = scan_shard(
        {
            "table": "corpus",
            "src": str(ds.shard_path("corpus", "part-00000.parquet")),
            "config": {"near": True},
            "data_root": str(tmp_path),
        }
    )
    for i, t in enumerate(texts):
        key = content_key(t, None, tmp_path)
        assert (side.column("key_a")[i].as_py(), side.column("key_b")[i].as_py()) == key.parts(), t
        assert side.column("text_key")[i].as_py() == key.text_key
    assert normalize_text("ﬁne\tTAB") == "fine tab"
