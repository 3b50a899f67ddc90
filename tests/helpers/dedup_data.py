"""Inputs for the dedup kill tests (tests/pipelines/test_kill_dedup.py and the fault harness)."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image

from assay.curation.dataset import Dataset, write_dataset


@functools.cache
def _png(seed: int, size: int = 64, pixel: bool = False) -> bytes:
    rs = np.random.RandomState(seed)
    img = Image.fromarray((rs.rand(8, 8, 3) * 255).astype("uint8")).resize((size, size), Image.BILINEAR)
    if pixel:
        img.putpixel((size - 1, size - 1), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def dedup_inputs(root: Path, n: int, *, size: int = 64, distinct_docs: int = 400) -> tuple[Dataset, Dataset]:
    """A source of n rows per table in 8 shards, every row with an image (some by path), with exact
    and near-duplicate images and pairs to rewrite, and an eval set that some queries copy.

    Images are `size` pixels square; corpus rows draw from `distinct_docs` images, so fewer distinct
    images mean more exact duplicates."""
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    for s in range(20):
        (media / f"{s}.png").write_bytes(_png(s, size))
    queries = [
        {
            "query_id": f"q{i}",
            "subset": f"s{i % 2}",
            "task": "retrieval",
            "text": f"Question {i % 90}",
            "image": {"bytes": _png(1000 + i % 150, size, pixel=i % 7 == 0), "path": None},
        }
        for i in range(n)
    ]
    corpus = [
        {
            "doc_id": f"d{i}",
            "subset": "s0",
            "text": None,
            "image": (
                {"bytes": None, "path": f"{i % 20}.png"}
                if i % 5 == 0
                else {"bytes": _png(i % distinct_docs, size, pixel=i % 3 == 0), "path": None}
            ),
        }
        for i in range(n)
    ]
    pairs = [{"query_id": f"q{i}", "doc_id": f"d{(i * 13) % n}", "label": "positive"} for i in range(n)]
    src = write_dataset(
        root / "src",
        {"queries": queries, "corpus": corpus, "pairs": pairs},
        rows_per_shard=n // 8,
        data_root=str(media),
    )
    evals = [
        {
            "query_id": f"e{i}",
            "subset": "eval",
            "task": "retrieval",
            "text": f"question {i}",
            "image": {"bytes": _png(1000 + i, size), "path": None},
        }
        for i in range(0, 40, 3)
    ]
    ev = write_dataset(root / "eval", {"queries": evals}, rows_per_shard=4)
    return src, ev
