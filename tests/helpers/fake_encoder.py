"""A stand-in encoder for mining tests that are about the stage, not the model: each content (image
bytes or text) gets a fixed random unit vector, seeded by its sha256, so equal contents get equal
vectors and the run needs no model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


class ContentEncoder:
    """A fixed random unit vector per content (image bytes or text); ``dim`` 16."""

    model_id = "content-fake@0"
    template_id = "fake-v1"
    dim = 16

    def encode(self, rows, side):
        out = []
        for r in rows:
            image = r.get("image")
            data = (image.get("bytes") or Path(image["path"]).read_bytes()) if image else r["text"].encode()
            seed = int.from_bytes(hashlib.sha256(data).digest()[:4], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, np.float32)
