"""A tiny training dataset that a 1-layer model learns in a few steps: solid colours.

Subsets: ``vqa`` (image + "what colour is it?" -> the colour's name), ``retrieval`` (the colour's
name -> every image of that colour). Images are inline 16x16 PNGs in four shades per colour.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from assay.curation.dataset import write_dataset

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 30)}
#: Tiny model settings for tests: a 16 x 16 grid (patch 1 on 16 px), one layer, one 32-wide head.
TINY = {"hidden_size": 32, "num_layers": 1, "image_size": 16, "patch_size": 1, "vocab_size": 300, "seed": 0}


def png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buf, format="PNG")
    return buf.getvalue()


def colour_dataset(root: str | Path, shades: int = 4, extra_pairs: list[dict] | None = None) -> Path:
    queries, corpus, pairs = [], [], []
    for name, (r, g, b) in COLOURS.items():
        corpus.append(
            {
                "doc_id": f"ans-{name}",
                "subset": "vqa",
                "text": name,
                "image": None,
                "instruction": "Represent the answer.",
            }
        )
        queries.append(
            {
                "query_id": f"find-{name}",
                "subset": "retrieval",
                "task": "retrieval",
                "text": f"a {name} image",
                "image": None,
                "instruction": "Find the image.",
            }
        )
        for k in range(shades):
            shade = (max(0, r - 12 * k), max(0, g - 12 * k), max(0, b - 12 * k))
            image = {"bytes": png(shade), "path": None}
            qid, did = f"q-{name}-{k}", f"img-{name}-{k}"
            queries.append(
                {
                    "query_id": qid,
                    "subset": "vqa",
                    "task": "vqa",
                    "text": "What colour is it?",
                    "image": image,
                    "instruction": "Answer the question.",
                }
            )
            corpus.append(
                {
                    "doc_id": did,
                    "subset": "retrieval",
                    "text": None,
                    "image": image,
                    "instruction": "Represent the image.",
                }
            )
            pairs.append({"query_id": qid, "doc_id": f"ans-{name}", "label": "positive"})
            pairs.append({"query_id": f"find-{name}", "doc_id": did, "label": "positive"})
    pairs += extra_pairs or []
    write_dataset(root, {"queries": queries, "corpus": corpus, "pairs": pairs})
    return Path(root)


def train_loop_steps(source: str | Path) -> list[dict]:
    """A short loop over the colour dataset ``source``: validate, stage 1, a warm-up, mine with it,
    stage 2 on the mined negatives, eval (the loop tests' recipe)."""
    common = {"progress": False, "batch_size": 8, "mini_batch": 8, "epochs": 20}
    tiny = {"tiny": TINY, "tokens_per_tile": 16, **common}
    return [
        {"name": "valid", "run": "validate", "args": [str(source), "{run}/valid"]},
        {
            "name": "stage1",
            "run": "train",
            "config": {
                "stage": "1",
                "data": ["{valid}"],
                "output": "{run}/stage1",
                "lr": 3e-3,
                "max_steps": 12,
                "save_every": 100,
                **tiny,
            },
        },
        {
            "name": "warmup",
            "run": "train",
            "config": {
                "stage": "2",
                "data": ["{valid}"],
                "output": "{run}/warmup",
                "init": "{stage1}",
                "lora": None,
                "lr": 1e-3,
                "temperature": 0.1,
                "max_steps": 8,
                "save_every": 100,
                **common,
            },
        },
        {
            "name": "mine",
            "run": "mine",
            "args": ["{valid}", "{run}/mined"],
            "options": {"encoder": "{warmup}", "rules": "top:3", "cache": "{run}/cache", "no-progress": True},
        },
        {
            "name": "stage2",
            "run": "train",
            "config": {
                "stage": "2",
                "data": ["{mine}"],
                "output": "{run}/stage2",
                "init": "{warmup}",
                "lora": None,
                "lr": 1e-3,
                "temperature": 0.1,
                "negatives": "mined",
                "num_negatives": 2,
                "max_steps": 60,
                "save_every": 5,
                **common,
            },
        },
        {"name": "eval", "run": "eval", "args": ["{stage2}", "{valid}"]},
    ]
