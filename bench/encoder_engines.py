"""The float32 engines for the mining encoder on this CPU: torch (``precision="exact"``) against
OpenVINO (``precision="fast"`` with ``openvino`` installed, ``mining.openvino_text``).

Issue 19's fast target asks for a cold mine in half of sentence-transformers' time with >= 95% of
the queries keeping their exact negatives, and ``bench/mining_fast_recheck.py`` measures that an
encoder must stay within ~0.2x of bfloat16's error to keep that share: the fast mode has to be
float32 arithmetic, only faster. This script times the two float32 engines on the same rows
(assay's own length batches), alternating, ``--runs`` times each, and prints the largest
difference of a vector component. It also prints the float32 floor: the time the model's linear
layers alone take on these batches at the rate torch's float32 matrix product reaches here for the
same shapes (most of the model's work; no float32 engine goes below it).

The model is all-MiniLM-L6-v2; the rows the first ``--docs`` documents of
``bench/mining_vs_st.py``'s docstring pairs. The first OpenVINO run includes converting the model.

    python bench/encoder_engines.py            # 3,000 documents, 3 runs (~4 min)
    python bench/encoder_engines.py --docs 500 --runs 1

Last line: ``openvino_time_ratio=R max_abs_diff=D floor_ratio=F`` (R: the median over the runs of
OpenVINO / torch; F: the floor / torch's fastest run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def linear_floor(config, tokens: int, rows: int = 4096) -> float:
    """Seconds for a BERT-like model's linear layers over ``tokens`` (padded) tokens, at the rate
    torch's float32 matrix product reaches on this machine for each of their shapes."""
    import torch

    h, i = config.hidden_size, config.intermediate_size
    seconds_per_row = 0.0
    for k, n, count in ((h, h, 4), (h, i, 1), (i, h, 1)):  # q, k, v, out; up; down
        a, b = torch.randn(rows, k), torch.randn(k, n)
        torch.mm(a, b)
        best = min(_timed(torch.mm, a, b) for _ in range(5))
        seconds_per_row += count * best / rows
    return seconds_per_row * tokens * config.num_hidden_layers


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from assay.mining import openvino_text

    if not openvino_text.available():
        sys.exit("this benchmark needs OpenVINO: pip install 'assay[openvino]'")
    import openvino
    import torch
    from mining_vs_st import cpu_line, docstring_pairs

    from assay.mining.encoders import TOKENS_PER_ROW, length_batches, load_encoder

    os.environ["ASSAY_FAST_KIND"] = "openvino"
    print(cpu_line(), f"OpenVINO {openvino.__version__}, torch {torch.__version__}")
    exact = load_encoder("all-MiniLM-L6-v2", batch_size=64)
    fast = load_encoder("all-MiniLM-L6-v2", batch_size=64, precision="fast")
    rows = [{"text": d} for _, d in docstring_pairs(args.docs)]
    tokenizer, max_length = exact.tokenizer, exact.model.max_seq_length
    lengths = [len(t) for t in tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)["input_ids"]]  # fmt: skip
    padded = sum(len(b) * max(lengths[i] for i in b) for b in length_batches(lengths, 64 * TOKENS_PER_ROW))
    floor = linear_floor(exact.model[0].auto_model.config, padded)

    ratios, torch_times, diff = [], [], 0.0
    for run in range(args.runs):
        t0 = time.perf_counter()
        reference = exact.encode(rows, "candidate")
        torch_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        vectors = fast.encode(rows, "candidate")
        openvino_s = time.perf_counter() - t0
        diff = max(diff, float(np.abs(vectors - reference).max()))
        ratios.append(openvino_s / torch_s)
        torch_times.append(torch_s)
        print(
            f"run {run + 1}: torch {torch_s:.1f} s, OpenVINO {openvino_s:.1f} s, ratio {openvino_s / torch_s:.3f}"
        )
    floor_ratio = floor / min(torch_times)
    print(f"{len(rows)} documents, {sum(lengths)} tokens ({padded} padded)")
    print(f"float32 floor: the linear layers alone {floor:.1f} s at torch's matrix-product rate")
    print(
        f"openvino_time_ratio={float(np.median(ratios)):.3f} max_abs_diff={diff:.1e} floor_ratio={floor_ratio:.3f}"
    )


if __name__ == "__main__":
    main()
