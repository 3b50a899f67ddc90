"""Training and embedding on a GPU: `device: cuda` trains in bf16 autocast with fp32 master weights.

Run where a GPU is: ``python -m pytest -m gpu tests/training/test_cuda.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.colours import TINY, colour_dataset

from assay.training.config import config_from_dict
from assay.training.evaluate import evaluate
from assay.training.model import load_embedder
from assay.training.trainer import LOG_FILE, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_stages_train_in_bf16_on_cuda_and_match_the_cpu_embeddings(tmp_path):
    data = colour_dataset(tmp_path / "ds")
    common = {
        "data": [str(data)],
        "batch_size": 8,
        "mini_batch": 4,
        "progress": False,
        "save_every": 100,
        "device": "cuda",
    }
    s1 = train(
        config_from_dict(
            {
                **common,
                "stage": "1",
                "output": str(tmp_path / "s1"),
                "tiny": TINY,
                "tokens_per_tile": 16,
                "lr": 3e-3,
                "epochs": 8,
            }
        )
    )
    log1 = [json.loads(line) for line in (s1.parent / LOG_FILE).read_text().splitlines()]
    assert {e["precision"] for e in log1} == {"bf16"}
    assert log1[-1]["loss"] < 0.75 * log1[0]["loss"]
    s2 = train(
        config_from_dict(
            {
                **common,
                "stage": "2",
                "output": str(tmp_path / "s2"),
                "init": str(s1),
                "lora": {"rank": 8},
                "lr": 2e-3,
                "epochs": 6,
            }
        )
    )
    gpu = load_embedder(s2, device="cuda")
    assert next(gpu.parameters()).dtype == torch.float32  # master weights stay fp32
    metrics = evaluate(data, gpu.encode_queries, gpu.encode_candidates, subsets=["vqa"])
    assert metrics["per_subset"]["vqa"]["p_at_1"] >= 0.5  # chance 0.25
    cpu = load_embedder(s2)
    rows = [{"instruction": "Answer the question.", "text": "What colour is it?", "image": None}]
    assert torch.allclose(gpu.encode_queries(rows), cpu.encode_queries(rows), atol=1e-3)
