"""Numba kernels for the certified sparse assignment solver (imported lazily by assignment.py)."""
from __future__ import annotations

import numpy as np
from numba import njit

_INF = np.inf
_BIG_INDEX = np.iinfo(np.int32).max


@njit(cache=True, nogil=True, inline="always")
def _worse(av, ai, bv, bi):
    """True when (av, ai) ranks below (bv, bi): smaller value, or equal value and larger index."""
    return av < bv or (av == bv and ai > bi)


@njit(cache=True, nogil=True)
def _sift_down(vals, idx, k):
    """Restore a worst-at-root heap of size k after its root was replaced."""
    p = 0
    while True:
        c = 2 * p + 1
        if c >= k:
            return
        if c + 1 < k and _worse(vals[c + 1], idx[c + 1], vals[c], idx[c]):
            c += 1
        if _worse(vals[c], idx[c], vals[p], idx[p]):
            tv = vals[p]
            ti = idx[p]
            vals[p] = vals[c]
            idx[p] = idx[c]
            vals[c] = tv
            idx[c] = ti
            p = c
        else:
            return


@njit(cache=True, nogil=True)
def candidates_stripe(C, c0, c1, kr, kc, rv, ri, cv, ci, cthr):
    """Scan columns [c0, c1) of C once: top-kr per row (within the stripe) and top-kc per column.

    rv/ri: (n, kr) row heaps for this stripe; cv/ci: (m, kc) column heaps (only columns of the stripe are
    touched); cthr: (m,) root value of each column heap.  Heaps must come pre-filled with (-inf, BIG).
    Ranking is by (value desc, index asc), so the selected sets do not depend on how columns are striped.
    """
    n = C.shape[0]
    for i in range(n):
        rvi = rv[i]
        rii = ri[i]
        thr = rvi[0]
        for j in range(c0, c1):
            x = np.float64(C[i, j])
            if x > thr:
                rvi[0] = x
                rii[0] = j
                _sift_down(rvi, rii, kr)
                thr = rvi[0]
            if kc > 0 and x > cthr[j]:
                cv[j, 0] = x
                ci[j, 0] = i
                _sift_down(cv[j], ci[j], kc)
                cthr[j] = cv[j, 0]


@njit(cache=True, nogil=True)
def merge_row_heaps(rv, ri, kr):
    """Merge per-stripe row heaps rv/ri of shape (T, n, kr) into the global top-kr column indices (n, kr)."""
    T, n, _ = rv.shape
    out_v = np.empty(kr, np.float64)
    out_i = np.empty(kr, np.int32)
    res = np.empty((n, kr), np.int32)
    for i in range(n):
        for a in range(kr):
            out_v[a] = -_INF
            out_i[a] = _BIG_INDEX
        for t in range(T):
            for a in range(kr):
                x = rv[t, i, a]
                j = ri[t, i, a]
                if _worse(out_v[0], out_i[0], x, j):
                    out_v[0] = x
                    out_i[0] = j
                    _sift_down(out_v, out_i, kr)
        for a in range(kr):
            res[i, a] = out_i[a]
    return res


@njit(cache=True, nogil=True)
def build_csr(n, m, row_cand, col_cand, extra_rows, extra_cols):
    """CSR (indptr, indices) of the union of row candidates (n, kr), column candidates (m, kc) and extra edges.

    Entries equal to BIG or negative are ignored; each row's columns come out sorted and unique.
    """
    counts = np.zeros(n + 1, np.int64)
    kr = row_cand.shape[1]
    kc = col_cand.shape[1]
    for i in range(n):
        for a in range(kr):
            j = row_cand[i, a]
            if 0 <= j < m:
                counts[i + 1] += 1
    for j in range(m):
        for a in range(kc):
            i = col_cand[j, a]
            if 0 <= i < n:
                counts[i + 1] += 1
    for e in range(extra_rows.size):
        counts[extra_rows[e] + 1] += 1
    ptr = np.cumsum(counts)
    fill = ptr[:-1].copy()
    idx = np.empty(ptr[n], np.int32)
    for i in range(n):
        for a in range(kr):
            j = row_cand[i, a]
            if 0 <= j < m:
                idx[fill[i]] = j
                fill[i] += 1
    for j in range(m):
        for a in range(kc):
            i = col_cand[j, a]
            if 0 <= i < n:
                idx[fill[i]] = j
                fill[i] += 1
    for e in range(extra_rows.size):
        i = extra_rows[e]
        idx[fill[i]] = extra_cols[e]
        fill[i] += 1
    # sort + dedupe each row in place, then compact
    indptr = np.zeros(n + 1, np.int64)
    w = 0
    for i in range(n):
        seg = np.sort(idx[ptr[i]:ptr[i + 1]])
        last = -1
        for a in range(seg.size):
            if seg[a] != last:
                idx[w] = seg[a]
                w += 1
                last = seg[a]
        indptr[i + 1] = w
    return indptr, idx[:w].copy()


@njit(cache=True, nogil=True)
def gather_costs(C, indptr, indices, sign):
    """cost[e] = sign * C[i, indices[e]] as float64 for every CSR edge."""
    n = indptr.size - 1
    cost = np.empty(indices.size, np.float64)
    for i in range(n):
        for e in range(indptr[i], indptr[i + 1]):
            cost[e] = sign * np.float64(C[i, indices[e]])
    return cost


@njit(cache=True, nogil=True)
def _heap_up(heap, pos, d, p):
    """Move heap slot p up while its key (d, col) is smaller than its parent's."""
    j = heap[p]
    dj = d[j]
    while p > 0:
        q = (p - 1) >> 1
        k = heap[q]
        if d[k] < dj or (d[k] == dj and k < j):
            break
        heap[p] = k
        pos[k] = p
        p = q
    heap[p] = j
    pos[j] = p


@njit(cache=True, nogil=True)
def _heap_pop(heap, pos, d, size):
    """Remove and return the column with the smallest (d, col); size is the heap size before the pop."""
    top = heap[0]
    pos[top] = -1
    size -= 1
    if size == 0:
        return top
    j = heap[size]
    dj = d[j]
    p = 0
    while True:
        c = 2 * p + 1
        if c >= size:
            break
        a = heap[c]
        if c + 1 < size:
            b = heap[c + 1]
            if d[b] < d[a] or (d[b] == d[a] and b < a):
                c += 1
                a = b
        if d[a] < dj or (d[a] == dj and a < j):
            heap[p] = a
            pos[a] = p
            p = c
        else:
            break
    heap[p] = j
    pos[j] = p
    return top


@njit(cache=True, nogil=True)
def sap_solve(indptr, indices, cost, m, u, v, col4row, row4col, rows):
    """Shortest-augmenting-path (Hungarian/JV with potentials) on a sparse graph, minimisation form.

    Matches each row in `rows` (free on entry) in order, keeping u[i] + v[j] <= cost on every edge, equality on
    matched edges, and v[j] == 0 on columns never matched (v only decreases from 0).  State arrays are updated
    in place.  Returns -1 on success, else the position in `rows` of the first row with no augmenting path.
    """
    d = np.full(m, _INF)
    pred = np.empty(m, np.int32)
    done = np.zeros(m, np.bool_)
    heap = np.empty(m, np.int32)
    pos = np.full(m, -1, np.int32)
    touched = np.empty(m, np.int32)
    scanned = np.empty(m, np.int32)
    for t in range(rows.size):
        r = rows[t]
        lo = indptr[r]
        hi = indptr[r + 1]
        if hi == lo:
            return t
        # reset the row potential so every edge of r has non-negative reduced cost
        best = _INF
        for e in range(lo, hi):
            x = cost[e] - v[indices[e]]
            if x < best:
                best = x
        u[r] = best
        # fast path: a tight edge to a free column
        fast = -1
        for e in range(lo, hi):
            j = indices[e]
            if row4col[j] == -1 and cost[e] - v[j] == best:
                fast = j
                break
        if fast >= 0:
            row4col[fast] = r
            col4row[r] = fast
            continue
        # Dijkstra over reduced costs
        ntouched = 0
        nscanned = 0
        hsize = 0
        i = r
        base = 0.0
        sink = -1
        while True:
            ui = u[i]
            for e in range(indptr[i], indptr[i + 1]):
                j = indices[e]
                if done[j]:
                    continue
                nd = base + (cost[e] - ui - v[j])
                dj = d[j]
                if nd < dj:
                    if dj == _INF:
                        touched[ntouched] = j
                        ntouched += 1
                    d[j] = nd
                    pred[j] = i
                    p = pos[j]
                    if p < 0:
                        heap[hsize] = j
                        pos[j] = hsize
                        hsize += 1
                        _heap_up(heap, pos, d, hsize - 1)
                    else:
                        _heap_up(heap, pos, d, p)
            if hsize == 0:
                break
            j = _heap_pop(heap, pos, d, hsize)
            hsize -= 1
            done[j] = True
            scanned[nscanned] = j
            nscanned += 1
            if row4col[j] == -1:
                sink = j
                break
            i = row4col[j]
            base = d[j]
        if sink < 0:
            for a in range(ntouched):
                j = touched[a]
                d[j] = _INF
                done[j] = False
                pos[j] = -1
            return t
        dmin = d[sink]
        u[r] += dmin
        for a in range(nscanned):
            j = scanned[a]
            if j != sink:
                delta = dmin - d[j]
                v[j] -= delta
                u[row4col[j]] += delta
        # augment along the predecessor chain
        j = sink
        while True:
            i = pred[j]
            row4col[j] = i
            prev = col4row[i]
            col4row[i] = j
            if i == r:
                break
            j = prev
        for a in range(ntouched):
            j = touched[a]
            d[j] = _INF
            done[j] = False
            pos[j] = -1
    return -1


@njit(cache=True, nogil=True, fastmath=True)
def _row_max_minus(Ci, v):
    """max_j (Ci[j] - v[j]) in float64 (vectorisable reduction)."""
    best = -_INF
    for j in range(Ci.size):
        x = np.float64(Ci[j]) - v[j]
        best = max(best, x)
    return best


@njit(cache=True, nogil=True)
def check_rows(C, u, v, tau, cap, r0, r1, viol, vcols, vcount):
    """Reduced-cost check (maximisation form) of rows [r0, r1): viol[i] = max_j C[i,j] - u[i] - v[j].

    For rows with viol > tau, vcols[i] receives the up to `cap` most violated columns (ranked by reduced cost
    desc, column asc; -1 padded) and vcount[i] the total number of columns with reduced cost > tau.
    """
    hv = np.empty(cap, np.float64)
    hi = np.empty(cap, np.int32)
    for i in range(r0, r1):
        Ci = C[i]
        best = _row_max_minus(Ci, v) - u[i]
        viol[i] = best
        if not best > tau:
            continue
        for a in range(cap):
            hv[a] = -_INF
            hi[a] = _BIG_INDEX
        cnt = 0
        ui = u[i]
        for j in range(Ci.size):
            x = np.float64(Ci[j]) - ui - v[j]
            if x > tau:
                cnt += 1
                if x > hv[0]:
                    hv[0] = x
                    hi[0] = j
                    _sift_down(hv, hi, cap)
        vcount[i] = cnt
        for a in range(cap):
            vcols[i, a] = hi[a] if hv[a] > -_INF else -1
