"""Factories of malformed rows, each tagged with the quarantine reason it must get.

Used by the validate fuzz test (and meant for the bad-input corpus of later issues). Every bad row
carries a unique marker (its id, or its text when the id itself is what is wrong) so a test can
find it in the quarantine and check the reason. Two kinds reuse an id: ``duplicate_id`` gives a
row again, the same content under the same id (the repeat is refused, its marker is the id, which
the kept first row shares), and ``conflicting_id`` gives an id to two rows of different content,
each with its own pair to another document: both rows and both pairs must go (which row a pair
meant cannot be told), so no pair comes to state what no input row said (``stated_pairs``).
"""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from pathlib import Path

from PIL import Image


def png(color=(10, 120, 200), size=(12, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG signature and IHDR chunk claiming width x height, and no pixel data:
    the decompression-bomb shape (decoding it would allocate ~30 GB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    idat = b"IDAT" + zlib.compress(b"\0" * 64)
    body += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + body


def truncated_png(size: int = 64) -> bytes:
    """A real size x size noise PNG (enough pixel data to need several reads) cut in the middle."""
    rng = random.Random(0)
    img = Image.new("RGB", (size, size))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size * size)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def bad_utf8(text: str) -> str:
    """A str that, written to Arrow without validation, holds invalid UTF-8 (see to_arrow_strings)."""
    return text + "\udcff"  # a lone surrogate: encodes with surrogateescape to the byte 0xff


QUERY_KINDS = [
    "missing_id",
    "duplicate_id",
    "conflicting_id",
    "missing_content",
    "empty_text",
    "text_too_long",
    "invalid_utf8",
    "unreadable_image",
    "truncated_image",
    "image_too_large",
    "image_path_outside_root",
    "image_not_found",
    "symlink_outside_root",
]
PAIR_KINDS = ["unknown_query_id", "unknown_doc_id", "invalid_label", "invalid_value", "missing_pair_id"]
#: the quarantine reason each kind must get
REASON = {k: k for k in QUERY_KINDS + PAIR_KINDS}
REASON.update({"symlink_outside_root": "image_path_outside_root", "missing_pair_id": "missing_id"})


def make_fuzz_rows(
    data_root: Path,
    outside: Path,
    n_good: int,
    n_bad: int,
    seed: int,
    max_text_chars: int,
    with_statements: bool = False,
):
    """Good and bad rows mixed in random order.

    Returns (queries, corpus, pairs, expected) where expected maps a marker -> (table, reason) for
    every row that must be refused, and the good rows are those whose marker is not in expected
    (but for the first row of a ``duplicate_id`` repeat, kept, whose marker is its id). Images by
    path are written under ``data_root``; ``outside`` is a folder outside it (for escapes). With
    ``with_statements``, a fifth value: ``stated_pairs`` of what the input rows state.
    """
    rng = random.Random(seed)
    data_root.mkdir(parents=True, exist_ok=True)
    (data_root / "img").mkdir(exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(png((1, 2, 3)))
    link = data_root / "img" / "escape.png"
    if not link.exists():
        os.symlink(outside / "secret.png", link)
    good_png = png()
    (data_root / "img" / "good.png").write_bytes(good_png)

    queries, corpus, pairs, expected = [], [], [], {}
    repeats: list[dict] = []  # duplicate_id rows, placed after the rows they repeat
    statements: set[tuple] = set()  # (query content, doc content) of every input pair with a query row
    corpus.append({"doc_id": "d-good", "subset": "s", "text": "a good document"})
    corpus.append({"doc_id": "d-other", "subset": "s", "text": "another good document"})
    docs = {d["doc_id"]: d for d in corpus}

    def state(query: dict, doc_id: str) -> None:
        statements.add((query_content(query), doc_content(docs[doc_id])))

    for i in range(n_good):
        qid = f"q-good-{i}"
        if i % 3 == 0:
            queries.append(
                {
                    "query_id": qid,
                    "subset": "s",
                    "task": "vqa",
                    "text": f"question {i}",
                    "image": {"bytes": None, "path": "img/good.png"},
                }
            )
        elif i % 3 == 1:
            queries.append(
                {
                    "query_id": qid,
                    "subset": "s",
                    "task": "vqa",
                    "text": None,
                    "image": {"bytes": good_png, "path": None},
                }
            )
        else:
            queries.append({"query_id": qid, "subset": "s", "task": "retrieval", "text": f"text {i}"})
        pairs.append({"query_id": qid, "doc_id": "d-good", "label": "positive", "score": 1.0})
        state(queries[-1], "d-good")
    kinds = QUERY_KINDS + PAIR_KINDS
    for j in range(n_bad):
        kind = kinds[j % len(kinds)] if j < len(kinds) else rng.choice(kinds)
        mark = f"bad-{j}-{kind}"
        q = {"query_id": mark, "subset": "s", "task": "vqa", "text": f"text of {mark}", "image": None}
        if kind in PAIR_KINDS:
            p = {
                "query_id": f"q-good-{rng.randrange(n_good)}",
                "doc_id": "d-good",
                "label": "negative",
                "score": 0.5,
                "origin": mark,
            }
            if kind == "unknown_query_id":
                p["query_id"] = f"nope-{mark}"
            elif kind == "unknown_doc_id":
                p["doc_id"] = f"nope-{mark}"
            elif kind == "invalid_label":
                p["label"] = rng.choice(["Positive", "pos", "", "hardneg"])
            elif kind == "invalid_value":
                p["judge_p_yes"] = rng.choice([1.5, -0.1, float("nan")])
            elif kind == "missing_pair_id":
                p[rng.choice(["query_id", "doc_id"])] = rng.choice([None, "", "  "])
            pairs.append(p)
            expected[mark] = ("pairs", REASON[kind])
            continue
        if kind == "duplicate_id":
            # the same row twice: the repeat is refused, its pair (the same statement) is kept
            first = {"query_id": f"q-dup-{j}", "subset": "s", "task": "vqa", "text": f"question dup {j}"}
            queries.append(first)
            repeats.append(dict(first))
            pairs.append({"query_id": first["query_id"], "doc_id": "d-good", "label": "positive"})
            pairs.append(
                {"query_id": first["query_id"], "doc_id": "d-good", "label": "positive", "origin": mark}
            )
            state(first, "d-good")
            expected[first["query_id"]] = ("queries", REASON[kind])
            continue
        if kind == "conflicting_id":
            # one id, two contents, each row with a pair to its own document (issue 15, point 4)
            for side, doc_id in (("a", "d-good"), ("b", "d-other")):
                row = {**q, "query_id": f"q-clash-{j}", "text": f"text of {mark}-{side}"}
                queries.append(row)
                pairs.append(
                    {
                        "query_id": row["query_id"],
                        "doc_id": doc_id,
                        "label": "positive",
                        "origin": f"{mark}-{side}-pair",
                    }
                )
                state(row, doc_id)
                expected[f"{mark}-{side}"] = ("queries", REASON[kind])
                expected[f"{mark}-{side}-pair"] = ("pairs", REASON[kind])
            continue
        if kind == "missing_id":
            q["query_id"] = rng.choice([None, "", " \t"])
        elif kind == "missing_content":
            q["text"] = None
            q["image"] = rng.choice([None, {"bytes": None, "path": None}])
        elif kind == "empty_text":
            q["text"] = rng.choice(["", " ", "\n\t ", "\u3000"])
        elif kind == "text_too_long":
            q["text"] = mark + "x" * (max_text_chars + 1)
        elif kind == "invalid_utf8":
            q["text"] = bad_utf8(q["text"])
        elif kind == "unreadable_image":
            q["image"] = {
                "bytes": rng.choice([b"", b"GIF89a broken", b"%PDF-1.4 not an image", b"\x00" * 50]),
                "path": None,
            }
        elif kind == "truncated_image":
            q["image"] = {"bytes": truncated_png(), "path": None}
        elif kind == "image_too_large":
            q["image"] = {"bytes": huge_png_header(), "path": None}
        elif kind == "image_path_outside_root":
            q["image"] = {
                "bytes": None,
                "path": rng.choice(["../outside/secret.png", str(outside / "secret.png")]),
            }
        elif kind == "image_not_found":
            q["image"] = {"bytes": None, "path": f"img/missing-{j}.png"}
        elif kind == "symlink_outside_root":
            q["image"] = {"bytes": None, "path": "img/escape.png"}
        queries.append(q)
        expected[mark] = ("queries", REASON[kind])
    rng.shuffle(queries)
    rng.shuffle(pairs)
    # A repeat comes after the row it repeats: the first occurrence is the one kept.
    queries += repeats
    if with_statements:
        return queries, corpus, pairs, expected, statements
    return queries, corpus, pairs, expected


def _image_key(image: dict | None) -> tuple | None:
    if not image or (image.get("bytes") is None and image.get("path") is None):
        return None
    return (image.get("bytes"), image.get("path"))


def query_content(row: dict) -> tuple:
    """What a query row says, without its id (input rows and dataset rows alike)."""
    return (
        row.get("subset"),
        row.get("task"),
        row.get("instruction"),
        row.get("text"),
        _image_key(row.get("image")),
    )


def doc_content(row: dict) -> tuple:
    return (row.get("subset"), row.get("instruction"), row.get("text"), _image_key(row.get("image")))


def stated_pairs(queries: list[dict], corpus: list[dict], pairs: list[dict]) -> set[tuple]:
    """(query content, doc content) of every pair of a dataset, through its ids: each must be one that
    an input row stated (``make_fuzz_rows(..., with_statements=True)``)."""
    q = {r["query_id"]: query_content(r) for r in queries}
    d = {r["doc_id"]: doc_content(r) for r in corpus}
    return {(q[p["query_id"]], d[p["doc_id"]]) for p in pairs}


def queries_table(rows: list[dict]):
    """Queries as an Arrow table; texts holding lone surrogates become invalid UTF-8 bytes."""
    import pyarrow as pa

    from assay.curation.schema import QUERIES_SCHEMA

    texts = [None if r.get("text") is None else r["text"].encode("utf-8", "surrogateescape") for r in rows]
    clean = [{**r, "text": None} for r in rows]
    table = pa.Table.from_pylist(clean, schema=QUERIES_SCHEMA)
    text = pa.array(texts, pa.binary()).view(pa.string())
    return table.set_column(table.column_names.index("text"), "text", text)


def marker_of(table: str, row: dict) -> str | None:
    """The marker of a (decoded) quarantined or kept row."""
    if table == "pairs":
        return row.get("origin") or f"{row.get('query_id')}->{row.get('doc_id')}"
    qid = row.get("query_id")
    text = row.get("text")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if isinstance(text, str) and text.startswith("text of bad-"):
        return text[len("text of ") :].split("\ufffd")[0].split("\udcff")[0]
    if isinstance(text, str) and text.startswith("bad-"):
        return text.split("x" * 10)[0].rstrip("x")
    return qid
