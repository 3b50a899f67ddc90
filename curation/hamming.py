"""Near-duplicate search over 64-bit hashes (pHash) without comparing every pair.

Pigeonhole banding: split the 64 bits into ``distance + 1`` bands. Two hashes that differ in at most
``distance`` bits cannot differ in every band, so they agree exactly on at least one: candidates are
the hashes that share a band value (found by sorting, never by an all-pairs loop), and each candidate
is then checked exactly (same group, popcount of the XOR <= distance). Rows are compared only within
their group (dedup: the same subset and normalised text).

``near_pairs`` finds every pair within distance; ``greedy_near_duplicates`` walks rows in order and
drops a row when it is within distance of an earlier row that was kept. Memory is a few arrays of
8-byte integers per hash; time is a sort per band plus the work on candidate pairs.

Example::

    >>> import numpy as np
    >>> h = np.array([0b1111, 0b1110, 0xFFFF0000], dtype=np.uint64)
    >>> greedy_near_duplicates(h, np.zeros(3, np.int64), distance=1).tolist()
    [-1, 0, -1]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

#: Bigger distances make bands of a few bits, so nearly everything becomes a candidate (and random
#: 64-bit hashes are about 32 bits apart anyway): the useful range for pHash is 0 to 10 or so.
MAX_DISTANCE = 16

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


def popcount(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64 (a small unsigned integer type)."""
    x = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _popcount_swar(x)


def _popcount_swar(x: np.ndarray) -> np.ndarray:
    """popcount for numpy < 2.0: the classic SWAR bit count on uint64."""
    x = np.asarray(x, dtype=np.uint64)
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads (group, band) keys so one sort handles every group at once."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def bands(distance: int) -> list[tuple[int, int]]:
    """``(shift, bits)`` of the ``distance + 1`` bands covering 64 bits, as equal as possible."""
    if not 0 <= distance <= MAX_DISTANCE:
        raise ValueError(f"Hamming distance must be between 0 and {MAX_DISTANCE}, got {distance}")
    n = distance + 1
    out, shift = [], 0
    for b in range(n):
        bits = 64 // n + (1 if b < 64 % n else 0)
        out.append((shift, bits))
        shift += bits
    return out


def _band_keys(hashes: np.ndarray, groups: np.ndarray, b: int, shift: int, bits: int) -> np.ndarray:
    mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    vals = (hashes >> np.uint64(shift)) & mask
    salt = np.uint64((b + 1) * 0x9E3779B97F4A7C15 % (1 << 64))
    # Equal (group, band value) always gives an equal key; an unequal one that collides only adds a
    # candidate, which the exact check below rejects.
    return _mix(_mix(vals ^ salt) ^ groups.astype(np.uint64))


def near_pairs(
    hashes: np.ndarray,
    distance: int,
    groups: np.ndarray | None = None,
    *,
    against: np.ndarray | None = None,
    against_groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair within ``distance`` bits, as arrays ``(i, j)`` sorted by (j, i).

    Without ``against``: pairs of ``hashes`` with i < j and equal group. With ``against``: pairs with
    i indexing ``against`` and j indexing ``hashes``, equal groups. Groups are integers (default: one
    group).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    groups = np.zeros(len(hashes), np.int64) if groups is None else np.asarray(groups)
    self_join = against is None
    ref = hashes if self_join else np.asarray(against, dtype=np.uint64)
    ref_groups = (
        groups
        if self_join
        else (np.zeros(len(ref), np.int64) if against_groups is None else np.asarray(against_groups))
    )
    empty = np.zeros(0, np.int64)
    if len(hashes) == 0 or len(ref) == 0:
        return empty, empty
    found_i, found_j = [], []
    for b, (shift, bits) in enumerate(bands(distance)):
        ref_keys = _band_keys(ref, ref_groups, b, shift, bits)
        order = np.argsort(ref_keys, kind="stable")
        sorted_keys = ref_keys[order]
        del ref_keys
        sorted_h, sorted_g = ref[order], ref_groups[order]
        # Each query gets a run [lo, lo + count) of sorted positions sharing its band key.
        if self_join:
            # A stable sort keeps equal keys in index order: the candidates of the row at sorted
            # position p are the entries from the start of its run up to p (earlier rows only).
            n = len(order)
            new_run = np.ones(n, bool)
            new_run[1:] = sorted_keys[1:] != sorted_keys[:-1]
            run_start = np.maximum.accumulate(np.where(new_run, np.arange(n), 0))
            q_pos = np.flatnonzero(~new_run)
            lo, count = run_start[q_pos], q_pos - run_start[q_pos]
            q_idx, q_h, q_g = order[q_pos], sorted_h[q_pos], sorted_g[q_pos]
        else:
            q_keys = _band_keys(hashes, groups, b, shift, bits)
            by_key = np.argsort(q_keys, kind="stable")  # ascending lo: reads of sorted_h stay sequential
            lo = np.searchsorted(sorted_keys, q_keys[by_key], side="left")
            count = np.searchsorted(sorted_keys, q_keys[by_key], side="right") - lo
            keep = count > 0
            q_idx = by_key[keep]
            lo, count, q_h, q_g = lo[keep], count[keep], hashes[q_idx], groups[q_idx]
        # Step k compares every query that has more than k candidates with its k-th candidate, then
        # drops the queries that have no more: a few vector operations per candidate pair.
        k = 0
        while len(lo):
            cand = lo + k
            ok = np.flatnonzero(popcount(sorted_h[cand] ^ q_h) <= distance)
            if len(ok):
                same = sorted_g[cand[ok]] == q_g[ok]
                found_i.append(order[cand[ok[same]]])
                found_j.append(q_idx[ok[same]])
            k += 1
            more = count > k
            lo, count, q_idx, q_h, q_g = lo[more], count[more], q_idx[more], q_h[more], q_g[more]
    if not found_i:
        return empty, empty
    i = np.concatenate(found_i).astype(np.int64)
    j = np.concatenate(found_j).astype(np.int64)
    # A pair agreeing on several bands is found once per band.
    order = np.lexsort((i, j))
    i, j = i[order], j[order]
    first = np.ones(len(i), bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[first], j[first]


def first_occurrence(*columns: np.ndarray) -> np.ndarray:
    """For each row, the index of the first row with the same values in every column.

    Sorts one mixed 64-bit key (much faster than a lexsort over several columns) and checks that
    rows with equal keys are equal in every column; on a mixing collision it falls back to lexsort.
    """
    n = len(columns[0]) if columns else 0
    if n == 0:
        return np.zeros(0, np.int64)
    cols = [np.asarray(c) for c in columns]
    key = np.zeros(n, np.uint64)
    for c in cols:
        key = _mix(key ^ _mix(c.astype(np.uint64)))
    order = np.argsort(key, kind="stable")  # stable: equal rows stay in index order
    same = key[order][1:] == key[order][:-1]
    for c in cols:
        s = c[order]
        if not np.array_equal(s[1:][same], s[:-1][same]):
            order = np.lexsort(cols[::-1])
            same = np.ones(n - 1, bool)
            for c2 in cols:
                s2 = c2[order]
                same &= s2[1:] == s2[:-1]
            break
    new = np.r_[True, ~same]
    starts = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    out = np.empty(n, np.int64)
    out[order] = order[starts]
    return out


def greedy_near_duplicates(
    hashes: np.ndarray,
    groups: np.ndarray,
    distance: int,
    *,
    accept: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    same: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """Walk rows in index order; a row within ``distance`` of an earlier KEPT row of its group is
    dropped. Returns, per row, the index of the earliest such kept row, or -1 for kept rows.

    ``accept(i, j)`` (row index arrays, i < j) may refuse candidate pairs within distance, for what
    the hash does not see (dedup: colour, targets); refused pairs are not near. Rows equal in group,
    hash and every ``same`` column are taken as near without asking: ``same`` must hold whatever makes
    ``accept`` true for equal rows (dedup: the colour thumbnail)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    groups = np.asarray(groups)
    n = len(hashes)
    witness = np.full(n, -1, np.int64)
    if n == 0:
        return witness
    # Rows equal to an earlier row share its fate: drop them before the search, so that thousands of
    # identical hashes (blank images) cost a sort, not a quadratic candidate list.
    rep = first_occurrence(groups, hashes, *same)
    uniq = np.flatnonzero(rep == np.arange(n))
    i, j = near_pairs(hashes[uniq], distance, groups[uniq])
    if accept is not None and len(i):
        ok = np.asarray(accept(uniq[i], uniq[j]), bool)
        i, j = i[ok], j[ok]
    w_u = np.full(len(uniq), -1, np.int64)
    if len(j):
        # Pairs come sorted by j: walk the rows that have earlier neighbours, in order.
        starts = np.flatnonzero(np.r_[True, j[1:] != j[:-1]])
        ends = np.r_[starts[1:], len(j)]
        kept = np.ones(len(uniq), bool)
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            prev = i[s:e]
            prev = prev[kept[prev]]
            if prev.size:
                row = int(j[s])
                kept[row] = False
                w_u[row] = int(prev.min())
    witness[uniq] = np.where(w_u >= 0, uniq[np.maximum(w_u, 0)], -1)
    followers = np.flatnonzero(rep != np.arange(n))
    r = rep[followers]
    witness[followers] = np.where(witness[r] >= 0, witness[r], r)
    return witness
