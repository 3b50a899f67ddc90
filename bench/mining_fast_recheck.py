"""Could ``--fast`` keep the exact negatives by re-encoding only the doubtful rows exactly?

The question behind issue 19's missed target (fast mode, same negatives >= 0.95): a lower-precision
encoder moves every score by ~1e-3, and a top-3 under a margin changes with it. A fix would encode
everything fast, find the queries whose picks a score error of ``delta`` could change (a candidate
within 2 delta of the margin threshold, or the 3rd and 4th eligible candidates within 2 delta of
each other) and encode exactly only what those queries need (the query, its positive and every
candidate that could enter its exact top 3). This script measures what that would cost on the
benchmark's pairs (``bench/mining_vs_st.py``'s 10,000 docstring pairs, all-MiniLM-L6-v2, rules
``margin:0.05,top:3``): the score error of the fast vectors, the share of queries in doubt and the
share of documents they need re-encoded, for a few ``delta``.

Two more measurements say how accurate any fast encoder would have to be:

- the error scale: vectors with ``t`` times the fast vectors' error (``exact + t * (fast - exact)``,
  normalised) and the identical share each keeps, for t from 0.01 to 1: the largest t that keeps
  0.95 is the accuracy a fast mode needs, whatever its arithmetic;
- the model with its linear layers' weights rounded to bfloat16, run in float32: the error a
  two-term bfloat16 product (activations split into a high and a low bfloat16 part, weights rounded
  once) would leave, the cheapest split that keeps part of bfloat16's speed.

    python bench/mining_fast_recheck.py                 # 10,000 pairs (~5 min: encodes both ways)
    python bench/mining_fast_recheck.py --pairs 2000

Prints one line per ``delta`` and per error scale; the last line: ``fast_identical=F
recheck_docs_share=S error_scale_095=T rounded_weights_identical=W``: S is the share of documents
to re-encode at the smallest delta that brings the identical share to >= 0.95 (S near 1.0:
re-encoding costs all the time fast mode saves), T the largest error scale that keeps >= 0.95.
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
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MARGIN, TOP, DEPTH = 0.05, 3, 40


def picks(q: np.ndarray, d: np.ndarray):
    """Each query's top-3 negatives under the margin (query i's positive is document i), its
    positive's score and its candidates (ids and scores, best first, the positive left out)."""
    s = q @ d.T
    n = len(q)
    pos = s[np.arange(n), np.arange(n)].copy()
    s[np.arange(n), np.arange(n)] = -np.inf
    top = np.argsort(-s, axis=1, kind="stable")[:, :DEPTH]
    scores = np.take_along_axis(s, top, 1)
    eligible = scores < (pos[:, None] - MARGIN)
    chosen = [frozenset(top[i][eligible[i]][:TOP].tolist()) for i in range(n)]
    return chosen, pos, top, scores


def doubtful(pos, top, scores, delta):
    """Queries whose picks a score error of ``delta`` could change, and the documents they need."""
    threshold = pos - MARGIN
    doubt = np.zeros(len(pos), bool)
    need: set[int] = set()
    for i in range(len(pos)):
        f = scores[i]
        eligible = np.flatnonzero(f < threshold[i])
        cut = eligible[TOP] + 1 if len(eligible) > TOP else DEPTH
        near_threshold = (np.abs(f[:cut] - threshold[i]) < 2 * delta).any()
        near_tie = len(eligible) > TOP and f[eligible[TOP - 1]] - f[eligible[TOP]] < 2 * delta
        if near_threshold or near_tie:
            doubt[i] = True
            low = (f[eligible[min(TOP, len(eligible) - 1)]] if len(eligible) else threshold[i]) - 2 * delta
            need.update(top[i][f >= low].tolist())
            need.add(i)  # the positive
    return doubt, need


def identical(exact, other, with_negs) -> float:
    return float(np.mean([exact[i] == other[i] for i in with_negs]))


def round_linear_weights(encoder) -> None:
    """Round every linear layer's weight of ``encoder``'s model to bfloat16, kept in float32."""
    import torch

    with torch.no_grad():
        for module in encoder.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.to(torch.bfloat16).to(torch.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=10_000)
    args = ap.parse_args()
    from mining_vs_st import cpu_line, docstring_pairs

    from assay.mining.encoders import load_encoder

    pairs = docstring_pairs(args.pairs)
    print(cpu_line())
    vecs, seconds = {}, {}
    for precision in ("exact", "fast", "rounded-weights"):
        enc = load_encoder(
            "all-MiniLM-L6-v2", batch_size=64, precision="fast" if precision == "fast" else "exact"
        )
        if precision == "rounded-weights":
            round_linear_weights(enc)
        t0 = time.perf_counter()
        vecs[precision] = [enc.encode([{"text": p[k]} for p in pairs], side) for k, side in ((0, "query"), (1, "candidate"))]  # fmt: skip
        seconds[precision] = time.perf_counter() - t0
        print(f"{precision} ({enc.model_id}): encoded {len(pairs)} pairs in {seconds[precision]:.1f} s")
    exact = picks(*vecs["exact"])[0]
    fast, pos, top, scores = picks(*vecs["fast"])
    qe, de = vecs["exact"]
    err = np.abs(np.einsum("id,ikd->ik", qe, de[top[:, :10]]) - scores[:, :10])
    print(
        f"fast score error on each query's 10 best candidates: p99 {np.quantile(err, 0.99):.1e}, max {err.max():.1e}"
    )
    with_negs = [i for i in range(len(pairs)) if exact[i] or fast[i]]
    same = identical(exact, fast, with_negs)
    print(f"fast mode alone: identical sets {same:.4f} of {len(with_negs)} queries with negatives")
    qf, df = vecs["fast"]
    scale_095 = 0.0
    for t in (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0):
        q, d = (e + t * (f - e) for e, f in ((qe, qf), (de, df)))
        scaled = picks(
            q / np.linalg.norm(q, axis=1, keepdims=True), d / np.linalg.norm(d, axis=1, keepdims=True)
        )[0]
        ident = identical(exact, scaled, [i for i in range(len(pairs)) if exact[i] or scaled[i]])
        print(f"error scale {t:<4}: identical sets {ident:.4f}")
        if ident >= 0.95:
            scale_095 = t
    rounded = picks(*vecs["rounded-weights"])[0]
    rounded_same = identical(exact, rounded, [i for i in range(len(pairs)) if exact[i] or rounded[i]])
    print(f"weights rounded to bfloat16, float32 arithmetic: identical sets {rounded_same:.4f}")
    found = None
    for delta in (5e-4, 1e-3, 2e-3, 3e-3):
        doubt, need = doubtful(pos, top, scores, delta)
        mixed = [exact[i] if doubt[i] else fast[i] for i in range(len(pairs))]
        ident = np.mean([exact[i] == mixed[i] for i in with_negs])
        share = len(need) / len(pairs)
        print(f"delta {delta:.0e}: queries in doubt {doubt.mean():.3f}, documents to re-encode {share:.3f}, identical sets after {ident:.4f}")  # fmt: skip
        if found is None and ident >= 0.95:
            found = share
    print(
        f"fast_identical={same:.4f} recheck_docs_share={found if found is not None else float('nan'):.3f} "
        f"error_scale_095={scale_095} rounded_weights_identical={rounded_same:.4f}"
    )


if __name__ == "__main__":
    main()
