"""Streamed kNN (mining/knn): exact == one search over the concatenation, ties included; padding;
approximate recall against exact; the torch path == faiss exact; errors; bounded memory."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import numpy as np
import pytest

pytest.importorskip("faiss")

from assay.mining.knn import KnnResult, estimate_recall, recall_at_k, search  # noqa: E402

# --- data ---------------------------------------------------------------------------------------


def dyadic(n, d, rng):
    """Entries in {-2..2}/4: every dot product is exact in float32, whatever the summation order,
    so every backend must agree bit for bit, and scores tie often."""
    return (rng.integers(-2, 3, size=(n, d)) / 4).astype(np.float32)


def unit(n, d, rng):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n, d, n_clusters, rng, spread=0.35):
    centres = unit(n_clusters, d, rng)
    x = centres[rng.integers(0, n_clusters, n)] + spread / np.sqrt(d) * rng.standard_normal((n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def as_shards(x, sizes):
    """(offset, fresh copy) pairs over consecutive slices of x (sizes may include 0)."""
    assert sum(sizes) == len(x)
    offset = 0
    for n in sizes:
        yield offset, x[offset : offset + n].copy()
        offset += n


def reference(q, x, k):
    """One exact search over the whole corpus: float64 scores, order (score desc, id asc)."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    ids = np.arange(len(x))
    top = np.array([np.lexsort((ids, -row))[:k] for row in s])
    return np.take_along_axis(s, top, 1).astype(np.float32), top


UNEVEN = [1, 7, 0, 500, 3, 1200, 289, 1000]  # sums to 3000


def simd_levels() -> list[str]:
    """The SIMD levels faiss can run here. faiss-cpu >= 1.13 wheels dispatch at run time
    (``faiss.SIMDConfig``); an older wheel picks one level at import (FAISS_OPT_LEVEL): "loaded"."""
    import faiss

    config = getattr(faiss, "SIMDConfig", None)
    if config is None or not config.has_dynamic_dispatch():
        return ["loaded"]
    names = sorted(n.removeprefix("SIMDLevel_") for n in dir(faiss) if n.startswith("SIMDLevel_"))
    return [
        n for n in names if n != "COUNT" and config.is_simd_level_available(getattr(faiss, f"SIMDLevel_{n}"))
    ]


@pytest.fixture(params=simd_levels())
def simd_level(request):
    """Runs the test under each SIMD level faiss can use on this CPU (the ordering contract must not
    depend on how one kernel rounds), then puts the level back."""
    import faiss

    if request.param == "loaded":
        yield request.param
        return
    before = faiss.SIMDConfig.get_level()
    faiss.SIMDConfig.set_level(getattr(faiss, f"SIMDLevel_{request.param}"))
    assert faiss.SIMDConfig.get_level_name() == request.param
    try:
        yield request.param
    finally:
        faiss.SIMDConfig.set_level(before)


@pytest.fixture(scope="module")
def tied():
    """Dyadic corpus with exact duplicates: a group of 301 copies spread over several shards and a
    group of 40 inside one shard; queries that hit those groups exactly."""
    rng = np.random.default_rng(0)
    x = dyadic(3000, 16, rng)
    x[100:400] = x[50]  # 301 copies of row 50, across shard boundaries (shards 0..511, 511..514, ...)
    x[2000:2040] = x[1999]
    q = dyadic(48, 16, rng)
    q[0], q[1], q[2] = x[50], x[1999], -x[50]
    return q, x


# --- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 64])
def test_streamed_exact_equals_argsort_of_concatenation_with_ties(tied, k, simd_level):
    q, x = tied
    ref_s, ref_i = reference(q, x, k)
    res = search(q, as_shards(x, UNEVEN), k, method="exact")
    assert isinstance(res, KnnResult) and res.method == "exact" and res.searched == len(x)
    assert res.scores.dtype == np.float32 and res.ids.dtype == np.int64
    np.testing.assert_array_equal(res.ids, ref_i)
    np.testing.assert_array_equal(res.scores, ref_s)
    # the tied groups are cut by k and come back in id order (faiss alone picks any of them)
    if k > 1:
        assert list(res.ids[0]) == [50, *range(100, 100 + k - 1)]
    # one shard or many: the same answer
    one = search(q, [(0, x)], k, method="exact")
    np.testing.assert_array_equal(one.ids, res.ids)
    np.testing.assert_array_equal(one.scores, res.scores)


def test_streamed_exact_equals_single_search_on_real_valued_data(simd_level):
    rng = np.random.default_rng(1)
    x, q = unit(3000, 32, rng), unit(64, 32, rng)
    k = 20
    streamed = search(q, as_shards(x, UNEVEN), k, method="exact")
    single = search(q, [(0, x)], k, method="exact")
    np.testing.assert_array_equal(streamed.ids, single.ids)  # bit for bit: same kernel per pair
    np.testing.assert_array_equal(streamed.scores, single.scores)
    ref_s, ref_i = reference(q, x, k)
    np.testing.assert_array_equal(streamed.ids, ref_i)
    np.testing.assert_allclose(streamed.scores, ref_s, atol=1e-5)
    assert np.all(np.diff(streamed.scores, axis=1) <= 0)
    # query batches and shuffled shard order change nothing
    batched = search(q, list(as_shards(x, UNEVEN))[::-1], k, method="exact", query_batch=7)
    np.testing.assert_array_equal(batched.ids, streamed.ids)
    np.testing.assert_array_equal(batched.scores, streamed.scores)


def test_duplicates_across_shards_keep_id_order_when_faiss_switches_kernels(simd_level):
    """400 queries x 384 dims: faiss scores this batch with BLAS but a handful of queries with its
    own SIMD loop, and the two round differently. A query whose tied group straddles k in one shard is
    searched again: unless that call has as many queries as the first, its copies in that shard get a
    score one ulp off the copy in the other shard, and the id order between equal rows breaks."""
    rng = np.random.default_rng(9)
    x, q = unit(3000, 384, rng), unit(400, 384, rng)
    for g in range(40):  # row g (shard 0) copied 8 times into shard 1; query g is that row
        x[1000 + 8 * g : 1008 + 8 * g] = x[g]
        q[g] = x[g]
    res = search(q, [(0, x[:1000].copy()), (1000, x[1000:].copy())], 5, method="exact")
    for g in range(40):
        assert list(res.ids[g]) == [g, *range(1000 + 8 * g, 1004 + 8 * g)], g
        assert len(set(res.scores[g])) == 1
    one = search(q, [(0, x)], 5, method="exact")
    np.testing.assert_array_equal(res.ids, one.ids)
    np.testing.assert_array_equal(res.scores, one.scores)


def test_fewer_rows_than_k_pads_with_minus_one_and_minus_inf():
    rng = np.random.default_rng(2)
    x, q = unit(5, 8, rng), unit(3, 8, rng)
    res = search(q, [(100, x[:2]), (7, x[2:])], 8)
    assert res.ids.shape == res.scores.shape == (3, 8)
    assert (res.ids[:, 5:] == -1).all() and np.isneginf(res.scores[:, 5:]).all()
    assert sorted(res.ids[0, :5]) == [7, 8, 9, 100, 101]
    assert np.isfinite(res.scores[:, :5]).all()
    empty = search(q, iter([]), 4)
    assert (empty.ids == -1).all() and np.isneginf(empty.scores).all() and empty.searched == 0


# --- approximate methods ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clusters():
    rng = np.random.default_rng(3)
    x = clustered(12_000, 32, 60, rng)
    q = clustered(200, 32, 60, np.random.default_rng(4))
    return q, x


@pytest.mark.parametrize(
    ("method", "params"),
    [("ivf", {"nlist": 64, "nprobe": 24}), ("hnsw", {"hnsw_m": 16, "ef_search": 128})],
)
def test_approximate_recall_against_exact(clusters, method, params):
    q, x = clusters
    k = 10
    sizes = [5000, 4000, 3000]
    res = search(q, as_shards(x, sizes), k, method=method, **params)
    assert res.method == method and res.searched == len(x)
    exact = search(q, as_shards(x, sizes), k, method="exact")
    recall = recall_at_k(res.ids, exact.ids)
    estimate = estimate_recall(q, lambda: as_shards(x, sizes), k, method, sample=64, **params)
    print(
        f"\n{method} {params}: recall@{k} = {recall:.4f} (all 200 queries), estimate on 64 = {estimate:.4f}"
    )
    assert recall > 0.9 and estimate > 0.9
    assert np.all(np.diff(res.scores, axis=1) <= 0)
    # deterministic: the same index, the same answer
    again = search(q, as_shards(x, sizes), k, method=method, **params)
    np.testing.assert_array_equal(again.ids, res.ids)
    np.testing.assert_array_equal(again.scores, res.scores)


def test_auto_chooses_exact_or_ivf_from_the_pool_size(clusters):
    q, x = clusters
    x = x[:4000]
    assert search(q, [(0, x[:2000]), (2000, x[2000:])], 5).method == "exact"
    assert search(q, [(0, x[:2000]), (2000, x[2000:])], 5, exact_max=3000).method == "ivf"  # total known
    # a stream: the total is unknown, each shard decides
    assert search(q, as_shards(x, [3500, 500]), 5, exact_max=3000).method == "ivf+exact"
    assert estimate_recall(q, lambda: as_shards(x, [2000, 2000]), 5, "auto") == 1.0


def test_recall_at_k_counts_exact_neighbours_found():
    exact = np.array([[1, 2, 3], [4, 5, -1]])
    approx = np.array([[3, 9, 1], [5, -1, -1]])
    assert recall_at_k(approx, exact) == pytest.approx(3 / 5)
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.full((2, 3), -1), np.full((2, 3), -1)) == 1.0


# --- the torch path -----------------------------------------------------------------------------


def test_torch_path_equals_faiss_exact(tied, simd_level):
    pytest.importorskip("torch")
    q, x = tied
    for k in (1, 9):
        t = search(q, as_shards(x, UNEVEN), k, method="torch", device="cpu")
        f = search(q, as_shards(x, UNEVEN), k, method="exact")
        assert t.method == "torch" and t.backend == "torch-cpu" and f.backend == "faiss-cpu"
        np.testing.assert_array_equal(t.ids, f.ids)  # dyadic data: exact, ties in id order
        np.testing.assert_array_equal(t.scores, f.scores)
    rng = np.random.default_rng(5)
    xr, qr = unit(2500, 48, rng), unit(30, 48, rng)
    t = search(qr, as_shards(xr, [1000, 1, 1499]), 25, method="torch", query_batch=8)
    f = search(qr, as_shards(xr, [1000, 1, 1499]), 25, method="exact")
    np.testing.assert_array_equal(t.ids, f.ids)
    np.testing.assert_allclose(t.scores, f.scores, atol=1e-5)  # different BLAS, same ranking


# --- the GPU dispatch, on the CPU ------------------------------------------------------------------


class FakeGpuFaiss:
    """faiss with a pretend GPU: "moving" an index to the GPUs returns it unchanged, so the faiss-gpu
    code path (one index reused across shards: add, search to depth <= 2048, reset) runs here."""

    def __init__(self):
        import faiss

        self._faiss = faiss
        self.moved = 0

    def __getattr__(self, name):
        return getattr(self._faiss, name)

    def get_num_gpus(self):
        return 1

    def GpuMultipleClonerOptions(self):  # noqa: N802 - faiss's name
        return type("Options", (), {})()

    def index_cpu_to_all_gpus(self, index, co=None, ngpu=-1):
        assert co.shard is True and co.useFloat16 in (True, False)
        self.moved += 1
        return index


def test_faiss_gpu_path_with_a_pretend_gpu(tied, monkeypatch, simd_level):
    import assay.mining.knn as knn

    fake = FakeGpuFaiss()
    monkeypatch.setattr(knn._Searcher, "faiss", property(lambda self: fake))
    monkeypatch.setattr(knn._Searcher, "torch_cuda", lambda self: False)
    q, x = tied
    ref_s, ref_i = reference(q, x, 9)
    res = search(q, as_shards(x, UNEVEN), 9, method="exact", device="cuda")
    assert res.backend == "faiss-gpu" and fake.moved == 1  # one GPU index for all the shards
    np.testing.assert_array_equal(res.ids, ref_i)
    np.testing.assert_array_equal(res.scores, ref_s)
    ivf = search(q, as_shards(x, [1500, 1500]), 9, method="ivf", device="cuda", nlist=8, nprobe=8)
    assert ivf.backend == "faiss-gpu" and fake.moved == 3
    # deeper than faiss-gpu's k and no CUDA torch: the CPU, with a warning
    with pytest.warns(RuntimeWarning, match="beyond faiss-gpu's limit"):
        deep = search(q[:2], as_shards(x, UNEVEN), 2048, method="exact", device="cuda")
    assert deep.backend == "faiss-cpu"
    np.testing.assert_array_equal(deep.ids, reference(q[:2], x, 2048)[1])


def exact_rescore(x):
    return lambda qq, ids: np.take_along_axis(qq @ x.T, ids, 1)


def test_ties_beyond_the_kernel_depth_limit_are_finished_by_the_fallback():
    from assay.mining.knn import _error_bound, _exact_topk

    rng = np.random.default_rng(8)
    x = dyadic(400, 4, rng)
    x[10:200] = x[5]  # 191 equal rows
    q = np.vstack([x[5], dyadic(5, 4, rng)])
    ref_s, ref_i = reference(q, x, 6)
    bound = _error_bound(4, x)

    def worst_ties(qq, depth):  # a kernel that keeps the LARGEST ids among equal scores
        s = qq @ x.T
        order = np.lexsort((-np.arange(len(x))[None, :].repeat(len(qq), 0), -s), axis=-1)[:, :depth]
        return np.take_along_axis(s, order, 1), order

    calls = []

    def fallback(qq, k):
        calls.append(len(qq))
        return _exact_topk(worst_ties, exact_rescore(x), qq, len(x), k, len(x), bound)

    for max_depth, want_calls in ((len(x), []), (16, [1])):
        calls.clear()
        s, i = _exact_topk(worst_ties, exact_rescore(x), q, len(x), 6, max_depth, bound, fallback=fallback)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(s, ref_s)
        assert calls == want_calls


@pytest.mark.parametrize("seed", range(4))
def test_a_kernel_that_rounds_by_row_position_cannot_change_the_result(seed):
    """A pretend kernel whose score of a pair is off by up to the proven error bound, depending on
    the row's position and the call (as BLAS tiles and SIMD levels do), and which cuts equal and
    near-equal scores anywhere: the result is still the reference's, ids and scores, because every
    candidate is rescored by one routine and a near tie at the cut is searched deeper."""
    from assay.mining.knn import _error_bound, _exact_topk

    rng = np.random.default_rng(seed)
    x = dyadic(600, 8, rng)
    x[100:160] = x[7]  # a group of 61 equal rows
    x[300:303] = x[8] + np.float32(2**-10)  # near, not equal: within the bound of row 8 for some queries
    q = np.vstack([x[7], x[8], dyadic(30, 8, rng)])
    bound = _error_bound(8, x)
    calls = [0]

    def noisy(qq, depth):
        calls[0] += 1
        noise = np.random.default_rng([seed, calls[0]]).uniform(-0.45, 0.45, (len(qq), len(x)))
        s = (qq @ x.T) + noise * bound * np.linalg.norm(qq, axis=1)[:, None]
        order = np.argsort(-s, axis=1)[:, :depth]
        return np.take_along_axis(s, order, 1).astype(np.float32), order

    for k in (1, 5, 40):
        ref_s, ref_i = reference(q, x, k)
        s, i = _exact_topk(noisy, exact_rescore(x), q, len(x), k, len(x), bound)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(s, ref_s)


def test_ties_deeper_than_the_memory_bound_are_searched_by_row_slices(tied, monkeypatch, simd_level):
    import assay.mining.knn as knn

    q, x = tied
    ref_s, ref_i = reference(q, x, 6)
    monkeypatch.setattr(knn, "_RESULT_BYTES", 12 * len(q) * 16)  # re-search depth <= 16: slices of 16 rows
    res = search(q, as_shards(x, UNEVEN), 6, method="exact")
    np.testing.assert_array_equal(res.ids, ref_i)
    np.testing.assert_array_equal(res.scores, ref_s)


# --- errors -------------------------------------------------------------------------------------


def test_clear_errors_for_bad_inputs():
    rng = np.random.default_rng(6)
    q, x = unit(4, 8, rng), unit(10, 8, rng)
    with pytest.raises(ValueError, match=r"shard 1 has dimension 9 but the queries have dimension 8"):
        search(q, [(0, x), (10, unit(3, 9, rng))], 3)
    with pytest.raises(ValueError, match="queries must be float32, got float64"):
        search(q.astype(np.float64), [(0, x)], 3)
    with pytest.raises(ValueError, match="shard 0 must be float32"):
        search(q, [(0, x.astype(np.float16))], 3)
    with pytest.raises(ValueError, match=r"queries must be 2-D"):
        search(q[0], [(0, x)], 3)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        search(q, [(0, x)], 0)
    with pytest.raises(ValueError, match="overlap"):
        search(q, [(0, x), (5, x)], 3)
    with pytest.raises(ValueError, match=r"expected an \(offset, array\) pair"):
        search(q, [x], 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        search(q, [(0, np.full((2, 8), np.nan, dtype=np.float32))], 3)
    with pytest.raises(ValueError, match="method must be one of"):
        search(q, [(0, x)], 3, method="annoy")
    with pytest.raises(ValueError, match="device must be"):
        search(q, [(0, x)], 3, device="tpu")


# --- memory -------------------------------------------------------------------------------------


def test_streamed_search_holds_at_most_two_shards():
    """A generator of fresh shards: at most two alive at once (the one being searched and the one
    being built), and numpy's peak allocation far below the corpus."""
    rng = np.random.default_rng(7)
    q = unit(16, 64, rng)
    n_shards, rows = 24, 2000
    alive, peak_alive = [0], [0]

    def gone():
        alive[0] -= 1

    def stream():
        for i in range(n_shards):
            x = unit(rows, 64, np.random.default_rng(100 + i))
            alive[0] += 1
            peak_alive[0] = max(peak_alive[0], alive[0])
            weakref.finalize(x, gone)
            yield i * rows, x

    corpus_bytes = n_shards * rows * 64 * 4
    gc.collect()
    tracemalloc.start()
    try:
        res = search(q, stream(), 10, method="exact")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.searched == n_shards * rows
    assert peak_alive[0] <= 2, f"{peak_alive[0]} shards alive at once"
    assert alive[0] == 0
    print(f"\npeak traced {peak / 2**20:.2f} MiB for a {corpus_bytes / 2**20:.1f} MiB corpus")
    assert peak < corpus_bytes / 4


@pytest.mark.parametrize("seed", range(20))
def test_ordering_a_kernels_sorted_rows_only_sorts_rows_with_ties(seed):
    from assay.mining.knn import _order, _order_ranked

    rng = np.random.default_rng(seed)
    n, depth = 50, int(rng.integers(1, 12))
    scores = rng.choice(np.float32([-np.inf, 0.0, 0.25, 0.5, 0.75, 1.0]), size=(n, depth)) + np.float32(
        rng.random((n, depth)) * (seed % 2)  # odd seeds: few ties
    )
    scores = -np.sort(-scores, axis=1)  # a kernel's rows: descending scores, ties in any id order
    ids = np.stack([rng.permutation(100)[:depth] for _ in range(n)]).astype(np.int64)
    for k in {1, max(1, depth // 2), depth}:
        want_s, want_i = _order(scores, ids, k)
        got_s, got_i = _order_ranked(scores, ids, k)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_s, want_s)
    shuffled = scores[:, rng.permutation(depth)]  # not sorted: the full sort
    np.testing.assert_array_equal(_order_ranked(shuffled, ids, depth)[1], _order(shuffled, ids, depth)[1])
