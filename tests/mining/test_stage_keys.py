"""The stage's vectorised keys equal the row-by-row definitions they stand for."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from assay.curation.content_key import content_key
from assay.mining.embed_cache import row_key, table_keys
from assay.mining.stage import _content_ids, _content_keys

# texts that exercise every branch: plain words, runs and kinds of whitespace (\x0b, \x1c: str.split
# separators), edges, case, NFKC-changed characters (fullwidth, ligatures), control characters
PIECES = st.sampled_from(
    [
        "a",
        "B",
        "word",
        "Hello",
        " ",
        "  ",
        "\t",
        "\n",
        "\x0b",
        "\x1c",
        "\x00",
        "\u00a0",
        "Ｈ",
        "ﬁ",
        "É",
        "ß",
        "é",
        "-",
        "",
    ]
)
TEXTS = st.one_of(st.none(), st.lists(PIECES, max_size=8).map("".join), st.text(max_size=12))


@settings(max_examples=100, deadline=None)
@given(st.lists(TEXTS, max_size=20))
def test_content_ids_group_rows_as_content_key_does(texts):
    rows = pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "image": pa.nulls(len(texts), pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        }
    )
    half = len(texts) // 2
    ids = _content_ids([_content_keys(rows.slice(0, half), "."), _content_keys(rows.slice(half), ".")])
    digests = [content_key(t, None, ".").digest for t in texts]
    for i in range(len(texts)):
        for j in range(len(texts)):
            assert (ids[i] == ids[j]) == (digests[i] == digests[j])


def test_content_ids_with_images(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "a.png").write_bytes(b"pixels")
    rows = pa.table(
        {
            "text": ["A cat", "a  cat", None, None, "x"],
            "image": pa.array(
                [None, None, {"bytes": b"pixels", "path": None}, {"bytes": None, "path": "a.png"}, None],
                image_type,
            ),
        }
    )
    ids = _content_ids([_content_keys(rows, tmp_path)])
    # equal texts, equal images (inline and by path): one id each; an image never equals a text
    assert ids[0] == ids[1] and ids[2] == ids[3] and len(set(ids.tolist())) == 3


class FakeEncoder:
    model_id = "fake@0123"
    template_id = "t-v1"
    dim = 4


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.one_of(st.none(), st.text(max_size=6)), TEXTS), max_size=10),
    st.sampled_from(["query", "candidate"]),
)
def test_table_keys_equal_row_keys(rows, side):
    table = pa.table(
        {"instruction": [i for i, _ in rows], "text": [t for _, t in rows]},
        schema=pa.schema([("instruction", pa.string()), ("text", pa.string())]),
    )
    want = [row_key(FakeEncoder(), side, {"instruction": i, "text": t}, None) for i, t in rows]
    assert table_keys(FakeEncoder(), side, table, None) == want


def test_table_keys_of_image_rows_equal_row_keys(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "a.png").write_bytes(b"pixels")
    cells = [{"bytes": b"raw", "path": None}, {"bytes": None, "path": "a.png"}, None]
    table = pa.table({"text": ["x", None, "y"], "image": pa.array(cells, image_type)})
    want = [
        row_key(FakeEncoder(), "candidate", {"text": t, "image": c}, tmp_path)
        for t, c in zip(["x", None, "y"], cells, strict=True)
    ]
    assert table_keys(FakeEncoder(), "candidate", table, tmp_path) == want
    assert want[1] == row_key(FakeEncoder(), "candidate", {"text": None, "image": {"bytes": b"pixels"}}, None)
    assert np.unique(want).size == 3
