"""Streamed top-k inner-product search over a corpus that arrives shard by shard.

Queries and corpus rows are float32 embeddings (L2-normalised in practice, so inner product =
cosine). The corpus is an iterable of ``(offset, array)`` shards: the rows of a shard are the global
ids ``offset .. offset + len(array) - 1``. Each shard is searched on its own and its top-k is merged
into a running top-k, so peak memory follows the shard size, not the corpus size: a shard is dropped
before the next one is asked for (at most two shards are alive at once, the current one and the one
the producer is building).

Ordering contract. Results are sorted by descending score, ties broken by the smaller global id. For
``method="exact"`` (and ``"torch"``) the streamed result is exactly what one exact search over the
concatenated corpus gives, ids and order, whatever the shard boundaries: the global top-k under the
total order (score desc, id asc) is contained in the union of the per-shard top-k under the same
order, and each shard's top-k is made exact under that order even when a group of equal scores
straddles the k-th place (faiss and ``torch.topk`` pick an arbitrary subset of tied rows there):
every shard is searched a little deeper than k (``TIE_MARGIN``), and a query whose scores near its
k-th run past that depth (duplicated rows, near ties) is searched again deeper (doubling) until no
row left out can reach its top k; then the smallest ids win.

Equal scores are equal by construction. A search kernel (faiss's BLAS or SIMD loop, cuBLAS,
torch's matmul) rounds a (query, row) score differently depending on where the row sits in the
block it computes and on the CPU's SIMD level, so two copies of one row in two shards can come back
one ulp apart and swap places. The kernel therefore only proposes candidates; every candidate is then
rescored by one routine whose result depends on nothing but the two vectors (``rescore``: faiss's
``fvec_inner_products_by_idx``, one fixed-order loop per pair; on the torch path, float64 products
summed on the device), and the order, the ties and the merge across shards use those scores. A row
the kernel left out cannot outrank the k-th rescored candidate: both scores of a pair lie within a
proven bound of the exact inner product (``_error_bound``: gamma_d |q| |x| for each, plus float16
storage on a GPU), and a query whose last candidate is within that bound of its k-th is searched
deeper. Scores are float32 as the rescoring routine computes them (on one machine: the same value
for the same pair, whatever the shard, batch or kernel).
When the corpus has fewer than k rows the tail is padded with id -1 and score -inf.

Methods:

- ``exact``: faiss ``IndexFlatIP`` per shard (on all GPUs with faiss-gpu, see ``device``);
- ``ivf``: faiss ``IndexIVFFlat`` (inner product) trained on each shard, ``nlist`` ~ 4 sqrt(n);
- ``hnsw``: faiss ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT`` per shard;
- ``torch``: exact, a matmul per query chunk + ``torch.topk`` (the GPU path of faiss-less
  installs; with ``device="cpu"`` the same code runs on the CPU);
- ``auto``: ``exact`` when the corpus (or the shard, when the total is unknown: a generator) has at
  most ``exact_max`` rows, else ``ivf``.

Approximate methods (``ivf``, ``hnsw``) are deterministic too (IVF training is seeded; the HNSW graph
is built on one thread, see ``hnsw_build_threads``), and ``estimate_recall`` measures them against
exact on a sample of queries.

GPU (``device="cuda"``): with faiss-gpu (``faiss.get_num_gpus() > 0``) the per-shard flat index is
sharded across all GPUs (``index_cpu_to_all_gpus``, float16 storage when ``fp16``); faiss-gpu's k is
limited to 2048, so deeper searches take the torch path. Without faiss-gpu but with a CUDA torch, the
torch path runs on the GPU (any depth; float16 matmul when ``fp16``). faiss and torch are imported
lazily: neither is needed to import this module.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

__all__ = ["EXACT_MAX", "FAISS_GPU_MAX_K", "KnnResult", "estimate_recall", "recall_at_k", "search"]

METHODS = ("auto", "exact", "ivf", "hnsw", "torch")
EXACT_MAX = 200_000
FAISS_GPU_MAX_K = 2048  # faiss-gpu's largest k (and nprobe)
FAISS_QUERY_BATCH = 1024  # default queries per faiss call
TIE_MARGIN = 16  # exact search goes this deep past k, so that small groups of equal scores need no re-search
_TORCH_SCORE_BYTES = {"cpu": 256 * 2**20, "cuda": 1024 * 2**20}  # one (query chunk, shard) score block
_RESULT_BYTES = 256 * 2**20  # one faiss call's (batch, depth) result arrays, for deep tie re-searches
_RESCORE_BYTES = 256 * 2**20  # one torch rescoring block (rows, depth, d) in float64
_F32_ROUNDOFF = 2.0**-24  # unit roundoff of float32
_F16_ROUNDOFF = 2.0**-11  # unit roundoff of float16 (GPU storage / matmul with fp16)


@dataclass(frozen=True)
class KnnResult:
    """Top-k per query: ``scores`` (nq, k) float32 and ``ids`` (nq, k) int64 (global corpus ids),
    sorted by descending score then ascending id, padded with -inf / -1. ``method``: the method used
    ("exact", "ivf", "hnsw", "torch"; "exact+ivf" when ``auto`` chose per shard); ``searched``: the
    corpus rows searched; ``backend``: where ("faiss-cpu", "faiss-gpu", "torch-cpu", "torch-cuda",
    joined by "+" when shards differed)."""

    scores: np.ndarray
    ids: np.ndarray
    method: str
    searched: int
    backend: str = ""


# --- validation ---------------------------------------------------------------------------------


def _check_matrix(name: str, x: object, d: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {x.shape}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {x.dtype} (cast with .astype(np.float32))")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has dimension 0")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} has dimension {x.shape[1]} but the queries have dimension {d}")
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return np.ascontiguousarray(x)


def _check_int(name: str, v: object, minimum: int, allow_none: bool = False) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


class _IdRanges:
    """Rejects shards whose id ranges overlap: ids must be unique for the merge to be exact."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, i: int, offset: object, n: int) -> int:
        if isinstance(offset, bool) or not isinstance(offset, int | np.integer) or offset < 0:
            raise ValueError(f"shard {i}: offset must be an integer >= 0, got {offset!r}")
        offset = int(offset)
        if n:
            j = bisect.bisect_right(self.starts, offset)
            if (j and self.ends[j - 1] > offset) or (j < len(self.starts) and self.starts[j] < offset + n):
                raise ValueError(f"shard {i}: ids {offset}..{offset + n - 1} overlap another shard's ids")
            self.starts.insert(j, offset)
            self.ends.insert(j, offset + n)
        return offset


def _checked_shards(shards: Iterable, d: int) -> Iterator[tuple[int, np.ndarray]]:
    """Validates the shards one at a time, holding none of them beyond its turn."""
    ranges = _IdRanges()
    for i, item in enumerate(shards):
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ValueError(f"shard {i}: expected an (offset, array) pair, got {type(item).__name__}")
        offset, x = item
        del item
        x = _check_matrix(f"shard {i}", x, d)
        yield ranges.add(i, offset, len(x)), x
        del x


def _known_total(shards: Iterable) -> int | None:
    """The corpus size when the shards are a sequence (a list of pairs); None for a stream."""
    if not isinstance(shards, Sequence):
        return None
    try:
        return sum(len(item[1]) for item in shards)
    except (TypeError, IndexError, KeyError):
        return None  # malformed: the shard checks say what is wrong


# --- ordering and merging -----------------------------------------------------------------------


def _order(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first k under (score desc, id asc)."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _order_ranked(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``_order`` of a kernel's output, whose rows come sorted by descending score: a row without two
    equal scores is in order already, so only rows holding ties are sorted (by id within a tie)."""
    if scores.shape[1] < 2:
        return scores[:, :k], ids[:, :k]
    if not (scores[:, 1:] <= scores[:, :-1]).all():  # not sorted after all (NaN, another kernel)
        return _order(scores, ids, k)
    tied = np.flatnonzero((scores[:, 1:] == scores[:, :-1]).any(axis=1))
    out_s, out_i = scores[:, :k].copy(), ids[:, :k].copy()
    if tied.size:
        out_s[tied], out_i[tied] = _order(scores[tied], ids[tied], k)
    return out_s, out_i


def _clean(scores: np.ndarray, ids: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Local ids -> global ids; faiss's "not found" (-1) -> id -1, score -inf."""
    ids = ids.astype(np.int64, copy=False)
    missing = ids < 0
    ids = np.where(missing, -1, ids + offset)
    scores = np.where(missing, np.float32(-np.inf), scores).astype(np.float32, copy=False)
    return scores, ids


def _batch_size(nq: int, query_batch: int | None) -> int:
    """Rows per faiss call: query_batch, else chunks of <= 1024 of equal size."""
    if nq == 0:
        return 1
    if query_batch is not None:
        return min(nq, query_batch)
    chunks = -(-nq // FAISS_QUERY_BATCH)
    return -(-nq // chunks)


def _batched(search_fn: Callable, q: np.ndarray, depth: int, batch: int):
    """search_fn over q in calls of at most ``batch`` rows (bounds one call's result arrays)."""
    if len(q) <= batch:
        return search_fn(q, depth)
    parts = [search_fn(q[start : start + batch], depth) for start in range(0, len(q), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _error_bound(d: int, x: np.ndarray, fp16: bool = False) -> float:
    """A bound, per unit of query norm, on |kernel score - rescored score| for any row of ``x``.

    Both are float32 evaluations of one exact inner product, and any summation order (blocked, SIMD,
    fused or not) lands within gamma_d * sum|q_i x_i| <= gamma_d |q| |x| of it (Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1), gamma_d = d u / (1 - d u); each result is rounded to
    float32 once more. float16 storage or output (a GPU with ``fp16``) adds a relative 2^-11 for q,
    for x and for the output. Multiplied by |q| it is the slack ``_exact_topk`` keeps; the 1.01
    covers the rounding of the norms themselves."""
    u = _F32_ROUNDOFF
    gamma = d * u / (1 - d * u)
    rel = 2 * gamma + 4 * u + (6 * _F16_ROUNDOFF if fp16 else 0.0)
    x_norm = float(np.sqrt(np.max(np.einsum("ij,ij->i", x, x)))) if len(x) else 0.0
    return 1.01 * rel * x_norm


def _exact_topk(
    search_fn: Callable,
    rescore: Callable,
    q: np.ndarray,
    n: int,
    k: int,
    max_depth: int,
    bound: float,
    fallback: Callable | None = None,
):
    """Exact top-k of one shard under (rescored score desc, local id asc).

    ``search_fn(q, depth) -> (scores, ids)`` is a kernel that returns ``depth`` rows sorted by its
    own scores, which may be a little off the rescored ones (``_error_bound``) and may cut a group of
    equal scores anywhere. ``rescore(q, ids)`` gives each candidate its one true score. The shard is
    searched TIE_MARGIN deeper than k; a query is complete when the kernel's last score plus the
    slack (``bound`` * |q|) is below its k-th rescored score: no row left out can reach the top k
    then. The others (near ties at the cut, duplicated rows) are searched again, doubling the depth,
    until complete or the whole shard came back. ``max_depth`` (>= k+1) is the deepest search allowed
    (faiss-gpu: 2048; the CPU: a memory bound); ``fallback(q, k)`` finishes the queries still open
    there. Returns (nq, min(n, k)) rescored scores and ids."""
    depth = min(n, k + TIE_MARGIN, max(k + 1, max_depth))
    kernel, ids = search_fn(q, depth)
    out_s, out_i = _order(rescore(q, ids), ids, k)
    if depth >= n:  # the whole shard came back
        return out_s, out_i
    slack = bound * np.linalg.norm(q, axis=1).astype(np.float64)
    pending = np.flatnonzero(kernel[:, -1] + slack >= out_s[:, k - 1])
    while pending.size:
        qq = np.ascontiguousarray(q[pending])
        if depth >= max_depth:
            out_s[pending], out_i[pending] = fallback(qq, k)
            break
        depth = min(n, 2 * depth, max_depth)
        kernel, ids = search_fn(qq, depth)
        s2, i2 = _order(rescore(qq, ids), ids, k)
        done = (kernel[:, -1] + slack[pending] < s2[:, k - 1]) | (depth == n)
        out_s[pending[done]], out_i[pending[done]] = s2[done], i2[done]
        pending = pending[~done]
    return out_s, out_i


def _faiss_rescore(faiss, x: np.ndarray) -> Callable:
    """``rescore(q, ids)``: <q_i, x[ids[i, j]]> for each candidate by faiss's one-pair routine
    (``fvec_inner_products_by_idx``: a fixed-order loop over the two vectors, so the score depends on
    their contents only); id -1 scores -inf."""

    def rescore(q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty(ids.shape, np.float32)
        if out.size:
            faiss.fvec_inner_products_by_idx(
                faiss.swig_ptr(out),
                faiss.swig_ptr(q),
                faiss.swig_ptr(x),
                faiss.swig_ptr(ids),
                q.shape[1],
                len(q),
                ids.shape[1],
            )
        return out

    return rescore


@contextmanager
def _omp_threads(faiss, n: int | None):
    """faiss's OpenMP thread count set to n for the block, then put back (None: left alone)."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


# --- one search call's backends -----------------------------------------------------------------


class _Searcher:
    """Per-call state: the queries (and their device copy), lazily imported faiss/torch, the GPU
    index reused from shard to shard. Nothing outlives the call."""

    def __init__(self, q, k, device, fp16, query_batch, nlist, nprobe, hnsw_m, ef_search, hnsw_threads):
        self.q, self.k, self.d = q, k, q.shape[1]
        self.device, self.fp16, self.query_batch = device, fp16, query_batch
        self.nlist, self.nprobe, self.hnsw_m, self.ef_search = nlist, nprobe, hnsw_m, ef_search
        self.hnsw_threads = hnsw_threads
        self.batch = _batch_size(len(q), query_batch)
        self._faiss = None
        self._torch = None
        self._q_torch = None
        self._gpu_flat = None
        self._mm_out_dtype = True  # try torch.mm(..., out_dtype=float32) for fp16 on CUDA first
        self._warned: set[str] = set()

    # imports

    @property
    def faiss(self):
        if self._faiss is None:
            try:
                import faiss
            except ImportError as e:  # pragma: no cover - faiss is installed in dev
                raise ImportError("this method needs faiss: pip install faiss-cpu (or faiss-gpu)") from e
            self._faiss = faiss
        return self._faiss

    @property
    def torch(self):
        if self._torch is None:
            import torch

            self._torch = torch
        return self._torch

    def faiss_gpus(self) -> int:
        try:
            return self.faiss.get_num_gpus()
        except (ImportError, AttributeError):
            return 0

    def torch_cuda(self) -> bool:
        try:
            return bool(self.torch.cuda.is_available())
        except ImportError:
            return False

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # dispatch

    def exact_backend(self, method: str) -> str:
        cuda = self.device.startswith("cuda")
        if method == "torch":
            if cuda and not self.torch_cuda():
                raise RuntimeError(f"device={self.device!r} but torch sees no CUDA device")
            return "torch-cuda" if cuda else "torch-cpu"
        if not cuda:
            return "faiss-cpu"
        gpus = self.faiss_gpus()
        if gpus > 0 and self.k + 1 <= FAISS_GPU_MAX_K:
            return "faiss-gpu"
        if self.torch_cuda():
            return "torch-cuda"
        if gpus > 0:
            self.warn_once(
                "deep-k",
                f"k={self.k} is beyond faiss-gpu's limit and torch has no CUDA: searching on the CPU",
            )
            return "faiss-cpu"
        raise RuntimeError(f"device={self.device!r} but neither faiss nor torch sees a GPU")

    def run(self, method: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """Top-k of shard ``x`` (local ids), (nq, <= k) arrays, and the backend used."""
        if method in ("exact", "torch"):
            backend = self.exact_backend(method)
            if backend == "faiss-cpu":
                return (*self.faiss_cpu_exact(x, self.q, self.k), backend)
            if backend == "faiss-gpu":
                return (*self.faiss_gpu_exact(x), backend)
            return (*self.torch_exact(x), backend)
        if method == "ivf":
            return self.ivf(x)
        return self.hnsw(x)

    # exact: faiss

    def faiss_cpu_exact(self, x: np.ndarray, q: np.ndarray, k: int):
        faiss = self.faiss
        n, batch = len(x), self.batch
        # near ties re-searched at most this deep (one call's result arrays stay under _RESULT_BYTES)
        max_depth = max(k + 1, _RESULT_BYTES // (12 * batch))
        bound = _error_bound(self.d, x)

        def by_slices(qq: np.ndarray, kk: int):
            """Queries whose near ties run deeper than max_depth: the shard in slices of max_depth
            rows, each slice exact (rescored the same way, so slices merge exactly)."""
            run_s = run_i = None
            for lo in range(0, n, max_depth):
                xs = x[lo : lo + max_depth]
                s_, i_ = _exact_topk(
                    lambda a, depth, xs=xs: _batched(
                        lambda b, dd: faiss.knn(b, xs, dd, metric=faiss.METRIC_INNER_PRODUCT), a, depth, batch
                    ),
                    _faiss_rescore(faiss, xs),
                    qq,
                    len(xs),
                    kk,
                    len(xs),
                    bound,
                )
                i_ = i_ + lo
                if run_s is None:
                    run_s, run_i = s_, i_
                else:
                    run_s, run_i = _order(np.concatenate([run_s, s_], 1), np.concatenate([run_i, i_], 1), kk)
            return run_s, run_i

        index = faiss.IndexFlatIP(self.d)
        index.add(x)
        try:
            return _exact_topk(
                lambda qq, depth: _batched(index.search, qq, depth, batch),
                _faiss_rescore(faiss, x),
                q,
                n,
                k,
                max_depth,
                bound,
                by_slices,
            )
        finally:
            index.reset()

    def faiss_gpu_exact(self, x: np.ndarray):
        faiss = self.faiss
        if self._gpu_flat is None:
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True  # rows split across the GPUs (one GPU: a plain GpuIndexFlat)
            co.useFloat16 = bool(self.fp16)
            self._gpu_flat = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(self.d), co=co)
        index = self._gpu_flat
        index.add(x)  # IndexShards (successive ids) takes one add per reset: one per shard
        try:
            return _exact_topk(
                lambda qq, depth: _batched(index.search, qq, depth, self.batch),
                _faiss_rescore(faiss, x),  # on the CPU, where the shard is
                self.q,
                len(x),
                self.k,
                FAISS_GPU_MAX_K,
                _error_bound(self.d, x, fp16=bool(self.fp16)),
                fallback=lambda qq, k: self.faiss_cpu_exact(x, qq, k),
            )
        finally:
            index.reset()

    # exact: torch

    def torch_exact(self, x: np.ndarray):
        """The shard on the device; the kernel is a matmul per query chunk + ``torch.topk``, the
        rescoring float64 products summed on the device (a fixed-order reduction per pair)."""
        torch = self.torch
        dev = torch.device(self.device)
        half = bool(self.fp16) and dev.type == "cuda"
        xt = torch.from_numpy(x).to(dev)  # the CPU: shares the array's memory
        xh = xt.half() if half else xt
        n, d = len(x), self.d
        batch = self.query_batch or max(1, _TORCH_SCORE_BYTES[dev.type] // (4 * n))

        def queries(qq: np.ndarray):
            if qq is self.q:  # the whole query set: moved to the device once per search
                if self._q_torch is None:
                    self._q_torch = torch.from_numpy(self.q).to(dev)
                qt = self._q_torch
            else:
                qt = torch.from_numpy(qq).to(dev)
            return qt.half() if half else qt

        def kernel(qq: np.ndarray, depth: int):
            qt = queries(qq)
            out_s, out_i = [], []
            with torch.inference_mode():
                for start in range(0, len(qq), batch):
                    scores = self._mm(qt[start : start + batch], xh)  # (b, n) float32
                    vals, idx = torch.topk(scores, depth, dim=1, largest=True, sorted=True)
                    out_s.append(vals.float().cpu().numpy())
                    out_i.append(idx.cpu().numpy())
                    del scores, vals, idx
            return np.concatenate(out_s), np.concatenate(out_i).astype(np.int64)

        def rescore(qq: np.ndarray, ids: np.ndarray) -> np.ndarray:
            rows = max(1, _RESCORE_BYTES // (8 * d * max(1, ids.shape[1])))
            out = []
            with torch.inference_mode():
                for start in range(0, len(qq), rows):
                    qd = torch.from_numpy(qq[start : start + rows]).to(dev, torch.float64)
                    it = torch.from_numpy(ids[start : start + rows]).to(dev)
                    cand = xt[it.clamp(min=0)].to(torch.float64)  # (rows, depth, d)
                    s = (qd[:, None, :] * cand).sum(-1).float()
                    s[it < 0] = -torch.inf
                    out.append(s.cpu().numpy())
            return np.concatenate(out) if out else np.empty(ids.shape, np.float32)

        return _exact_topk(kernel, rescore, self.q, n, self.k, n, _error_bound(d, x, fp16=half))

    def _mm(self, a, b):
        torch = self.torch
        if a.dtype == torch.float16:
            if self._mm_out_dtype:
                try:  # fp16 inputs, fp32 accumulation and output (cuBLAS GemmEx)
                    return torch.mm(a, b.T, out_dtype=torch.float32)
                except (TypeError, RuntimeError, NotImplementedError):
                    self._mm_out_dtype = False
            return torch.mm(a, b.T).float()
        return torch.mm(a, b.T)

    # approximate

    def _to_gpus(self, index, method: str):
        """Moves a CPU IVF index to all GPUs when faiss-gpu can search it; else leaves it."""
        if not self.device.startswith("cuda"):
            return index, "faiss-cpu"
        if self.faiss_gpus() > 0 and self.k <= FAISS_GPU_MAX_K and index.nprobe <= FAISS_GPU_MAX_K:
            co = self.faiss.GpuMultipleClonerOptions()
            co.shard = True
            co.useFloat16 = bool(self.fp16)
            return self.faiss.index_cpu_to_all_gpus(index, co=co), "faiss-gpu"
        self.warn_once(method, f"{method} on device={self.device!r}: faiss-gpu cannot run it, using the CPU")
        return index, "faiss-cpu"

    def ivf(self, x: np.ndarray):
        faiss = self.faiss
        n = len(x)
        # default: ~4 sqrt(n) lists, but >= 39 training points per list (faiss's minimum, else it warns)
        nlist = max(1, min(round(4 * math.sqrt(n)), n // 39)) if self.nlist is None else min(self.nlist, n)
        quantizer = faiss.IndexFlatIP(self.d)
        index = faiss.IndexIVFFlat(quantizer, self.d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234  # faiss's default, stated: k-means is seeded, the index deterministic
        index.train(x)
        index.add(x)
        index.nprobe = min(self.nprobe, nlist)
        index, backend = self._to_gpus(index, "ivf")
        _, ids = _batched(index.search, self.q, min(self.k, n), self.batch)
        return (*_order(_faiss_rescore(faiss, x)(self.q, ids), ids, self.k), backend)

    def hnsw(self, x: np.ndarray):
        faiss = self.faiss
        if self.device.startswith("cuda"):
            self.warn_once("hnsw", "hnsw has no faiss-gpu index: searching on the CPU")
        index = faiss.IndexHNSWFlat(self.d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        with _omp_threads(faiss, self.hnsw_threads):  # concurrent inserts make the graph vary
            index.add(x)
        index.hnsw.efSearch = max(self.ef_search, self.k)
        _, ids = _batched(index.search, self.q, min(self.k, len(x)), self.batch)
        return (*_order(_faiss_rescore(faiss, x)(self.q, ids), ids, self.k), "faiss-cpu")


# --- public API ---------------------------------------------------------------------------------


def search(
    queries: np.ndarray,
    shards: Iterable[tuple[int, np.ndarray]],
    k: int,
    *,
    method: str = "auto",
    device: str = "cpu",
    exact_max: int = EXACT_MAX,
    nlist: int | None = None,
    nprobe: int = 32,
    hnsw_m: int = 32,
    ef_search: int = 128,
    fp16: bool = True,
    query_batch: int | None = None,
    hnsw_build_threads: int | None = 1,
) -> KnnResult:
    """Top-``k`` corpus rows by inner product for each query, the corpus searched shard by shard.

    ``queries``: (nq, d) float32. ``shards``: an iterable (a generator is fine: it is consumed once,
    and no shard is kept after its turn) of ``(offset, array)`` pairs, each array (n, d) float32,
    its rows the global ids offset..offset+n-1 (id ranges must not overlap). ``method``: "auto",
    "exact", "ivf", "hnsw" or "torch" (see the module docstring); ``auto`` picks exact when the
    total (known when ``shards`` is a sequence) or else each shard has at most ``exact_max`` rows.
    ``device``: "cpu" or "cuda" (faiss-gpu on all GPUs, else torch on the GPU). ``nlist`` (default
    ~4 sqrt(n) per shard) and ``nprobe``: ivf; ``hnsw_m``, ``ef_search`` (raised to k when below)
    and ``hnsw_build_threads`` (1: deterministic graph; None: faiss's threads, faster): hnsw.
    ``fp16``: float16 storage/matmul on the GPU (ignored on the CPU). ``query_batch``: queries per
    kernel call (None: equal chunks of <= 1024 for faiss; score blocks of ~256 MiB (CPU) / 1 GiB
    (GPU) for torch). A query re-searched for near ties costs one such call.

    Returns a ``KnnResult``: (nq, k) scores and global ids, by descending score then ascending id;
    every score is the rescored one (see the module docstring), so a pair scores the same wherever
    it is found; exact methods return exactly what one exact search over the concatenated corpus
    returns (ids, order and scores). Fewer than k rows: padded with id -1, score -inf.
    """
    q = _check_matrix("queries", queries)
    k = _check_int("k", k, 1)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    exact_max = _check_int("exact_max", exact_max, 0)
    nlist = _check_int("nlist", nlist, 1, allow_none=True)
    nprobe = _check_int("nprobe", nprobe, 1)
    hnsw_m = _check_int("hnsw_m", hnsw_m, 2)
    ef_search = _check_int("ef_search", ef_search, 1)
    query_batch = _check_int("query_batch", query_batch, 1, allow_none=True)
    hnsw_build_threads = _check_int("hnsw_build_threads", hnsw_build_threads, 1, allow_none=True)

    nq, d = q.shape
    total = _known_total(shards) if method == "auto" else None
    searcher = _Searcher(
        q, k, device, fp16, query_batch, nlist, nprobe, hnsw_m, ef_search, hnsw_build_threads
    )
    run_s = np.full((nq, k), -np.inf, dtype=np.float32)
    run_i = np.full((nq, k), -1, dtype=np.int64)
    methods: list[str] = []
    backends: list[str] = []
    searched = 0
    for offset, x in _checked_shards(shards, d):
        n = len(x)
        if n:
            used = method
            if method == "auto":
                used = "exact" if (total if total is not None else n) <= exact_max else "ivf"
            searched += n
            if nq:
                s, i, backend = searcher.run(used, x)
                s, i = _clean(s, i, offset)
                if searched == n:  # the first shard: nothing to merge with, only ties to order
                    pad = k - s.shape[1]
                    if pad > 0:
                        s = np.concatenate([s, np.full((nq, pad), -np.inf, np.float32)], 1)
                        i = np.concatenate([i, np.full((nq, pad), -1, np.int64)], 1)
                    run_s, run_i = _order_ranked(s, i, k)
                else:
                    run_s, run_i = _order(np.concatenate([run_s, s], 1), np.concatenate([run_i, i], 1), k)
                del s, i
                if backend not in backends:
                    backends.append(backend)
            if used not in methods:
                methods.append(used)
        del x  # before the next shard is produced: at most two shards alive
    if not methods:
        methods.append("exact" if method == "auto" else method)
    return KnnResult(run_s, run_i, "+".join(methods), searched, "+".join(backends))


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the exact neighbours (ids >= 0; -1 is padding) that the approximate search
    found, over all queries: |approx ∩ exact| / |exact|. 1.0 when there is nothing to find."""
    a = np.asarray(approx_ids)
    e = np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or len(a) != len(e):
        raise ValueError(
            f"approx_ids and exact_ids must be (nq, k) arrays with the same nq, got {a.shape}, {e.shape}"
        )
    hits = total = 0
    chunk = max(1, 2**22 // max(1, a.shape[1] * e.shape[1]))
    for start in range(0, len(e), chunk):
        ec, ac = e[start : start + chunk], a[start : start + chunk]
        valid = ec >= 0
        found = (ec[:, :, None] == ac[:, None, :]).any(axis=2) & valid
        hits += int(found.sum())
        total += int(valid.sum())
    return 1.0 if total == 0 else hits / total


def estimate_recall(
    queries: np.ndarray,
    shards_factory: Callable[[], Iterable[tuple[int, np.ndarray]]],
    k: int,
    method: str,
    *,
    sample: int = 256,
    seed: int = 0,
    **search_kwargs,
) -> float:
    """Recall@k of ``method`` against exact search on ``sample`` queries (drawn with ``seed``).

    ``shards_factory()`` returns a fresh iterable of shards (called once per search). Exact methods
    (and ``auto`` when it chose exact for every shard) have recall 1.0 without a second pass.
    ``search_kwargs`` go to the approximate search; the exact reference takes ``device`` and
    ``query_batch`` from them and runs in float32."""
    q = _check_matrix("queries", queries)
    k = _check_int("k", k, 1)
    sample = _check_int("sample", sample, 1)
    if len(q) > sample:
        q = q[np.sort(np.random.default_rng(seed).choice(len(q), size=sample, replace=False))]
    approx = search(q, shards_factory(), k, method=method, **search_kwargs)
    if set(approx.method.split("+")) <= {"exact", "torch"}:
        return 1.0
    ref_kwargs = {key: search_kwargs[key] for key in ("device", "query_batch") if key in search_kwargs}
    exact = search(q, shards_factory(), k, method="exact", fp16=False, **ref_kwargs)
    return recall_at_k(approx.ids, exact.ids)
