"""Shared fixtures: small datasets built in memory, images made with Pillow, one Ray per session."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers importable as `helpers`

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def png_bytes(color=(255, 0, 0), size=(16, 16), shape: str | None = None) -> bytes:
    """A small PNG; `shape='box'` draws a black box so near-duplicates can differ in one pixel."""
    img = Image.new("RGB", size, color)
    if shape == "box":
        for x in range(size[0] // 4, size[0] // 2):
            for y in range(size[1] // 4, size[1] // 2):
                img.putpixel((x, y), (0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def make_png():
    return png_bytes


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray runtime shared by every test that asks for it (starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
