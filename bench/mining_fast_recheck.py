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

    python bench/mining_fast_recheck.py                 # 10,000 pairs (~5 min: encodes both ways)
    python bench/mining_fast_recheck.py --pairs 2000

Prints one line per ``delta``; the last line: ``fast_identical=F recheck_docs_share=S`` at the
smallest delta that brings the identical share to >= 0.95 (S near 1.0: re-encoding costs all the
time fast mode saves).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=10_000)
    args = ap.parse_args()
    from mining_vs_st import cpu_line, docstring_pairs

    from assay.mining.encoders import load_encoder

    pairs = docstring_pairs(args.pairs)
    print(cpu_line())
    vecs, seconds = {}, {}
    for precision in ("exact", "fast"):
        enc = load_encoder("all-MiniLM-L6-v2", batch_size=64, precision=precision)
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
    same = np.mean([exact[i] == fast[i] for i in with_negs])
    print(f"fast mode alone: identical sets {same:.4f} of {len(with_negs)} queries with negatives")
    found = None
    for delta in (5e-4, 1e-3, 2e-3, 3e-3):
        doubt, need = doubtful(pos, top, scores, delta)
        mixed = [exact[i] if doubt[i] else fast[i] for i in range(len(pairs))]
        ident = np.mean([exact[i] == mixed[i] for i in with_negs])
        share = len(need) / len(pairs)
        print(f"delta {delta:.0e}: queries in doubt {doubt.mean():.3f}, documents to re-encode {share:.3f}, identical sets after {ident:.4f}")  # fmt: skip
        if found is None and ident >= 0.95:
            found = share
    print(f"fast_identical={same:.4f} recheck_docs_share={found if found is not None else float('nan'):.3f}")


if __name__ == "__main__":
    main()
