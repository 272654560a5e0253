"""Numba kernels for the certified sparse assignment solver (imported lazily by assignment.py).

Conventions: the solver works in minimisation form on cost = -C with row potentials u and column potentials v
(u[i] + v[j] <= cost[i, j] on every edge, equality on matched edges, v <= 0 and v == 0 on unmatched columns);
the graph is CSR (indptr, indices) with per-edge costs.  Dense passes read C through order-preserving integer
keys of its bits.  Every kernel is deterministic: ties are broken by index or by a fixed hash, never by timing.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

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
        seg = idx[ptr[i]:ptr[i + 1]]
        if seg.size <= 64:  # insertion sort: rows are short and np.sort allocates
            for a in range(1, seg.size):
                x = seg[a]
                b = a - 1
                while b >= 0 and seg[b] > x:
                    seg[b + 1] = seg[b]
                    b -= 1
                seg[b + 1] = x
        else:
            seg.sort()
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


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True, inline="always")
def _push(hk, hv, size, key, val):
    """Push (key, val) onto the lazy binary min-heap (hk, hv) holding `size` entries."""
    p = size
    while p > 0:
        q = (p - 1) >> 1
        if hk[q] < key or (hk[q] == key and hv[q] < val):
            break
        hk[p] = hk[q]
        hv[p] = hv[q]
        p = q
    hk[p] = key
    hv[p] = val

@njit(cache=True, nogil=True, inline="always")
def _pop(hk, hv, size):
    """Drop the root of the lazy min-heap holding `size` entries (read hk[0], hv[0] first)."""
    size -= 1
    key = hk[size]
    val = hv[size]
    p = 0
    while True:
        c = 2 * p + 1
        if c >= size:
            break
        if c + 1 < size and (hk[c + 1] < hk[c] or (hk[c + 1] == hk[c] and hv[c + 1] < hv[c])):
            c += 1
        if hk[c] < key or (hk[c] == key and hv[c] < val):
            hk[p] = hk[c]
            hv[p] = hv[c]
            p = c
        else:
            break
    hk[p] = key
    hv[p] = val

@njit(cache=True, nogil=True)
def sap_solve(indptr, indices, cost, m, u, v, col4row, row4col, rows):
    """Shortest-augmenting-path (Hungarian/JV with potentials) on a sparse graph, minimisation form.

    Matches each row in `rows` (free on entry) in order by Dijkstra over reduced costs (lazy binary heap, ties
    broken by column), keeping u[i] + v[j] <= cost on every edge, equality on matched edges, and v[j] == 0 on
    columns never matched (v only decreases from 0).  State arrays are updated in place.  Returns the rows (left
    free) that have no augmenting path in the sparse graph.
    """
    failed = np.empty(rows.size, np.int32)
    nfailed = 0
    d = np.full(m, _INF)
    pred = np.empty(m, np.int32)
    done = np.zeros(m, np.bool_)
    cap = indices.size + m + 1
    hk = np.empty(cap)
    hv = np.empty(cap, np.int32)
    touched = np.empty(m, np.int32)
    scanned = np.empty(m, np.int32)
    for t in range(rows.size):
        r = rows[t]
        lo = indptr[r]
        hi = indptr[r + 1]
        if hi == lo:
            failed[nfailed] = r
            nfailed += 1
            continue
        # reset the row potential so every edge of r has non-negative reduced cost
        best = _INF
        for e in range(lo, hi):
            best = min(best, cost[e] - v[indices[e]])
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
                nd = base + (cost[e] - ui - v[j])
                dj = d[j]
                if nd < dj and not done[j]:
                    if dj == _INF:
                        touched[ntouched] = j
                        ntouched += 1
                    d[j] = nd
                    pred[j] = i
                    _push(hk, hv, hsize, nd, j)
                    hsize += 1
            j = -1
            while hsize > 0:
                jj = hv[0]
                kk = hk[0]
                _pop(hk, hv, hsize)
                hsize -= 1
                if not done[jj] and kk == d[jj]:
                    j = jj
                    break
            if j < 0:
                break
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
            failed[nfailed] = r
            nfailed += 1
            continue
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
    return failed[:nfailed].copy()


# ---------------------------------------------------------------------------------------------------------------
# Dense passes.  Floats are compared through order-preserving integer keys (k = bits ^ ((bits >> 63|31) & MAX)):
# integer max reductions vectorise in LLVM where float ones do not, and keys rank -0.0 below +0.0 deterministically.
# ---------------------------------------------------------------------------------------------------------------


def _key(x):  # pragma: no cover - replaced by the numba overload below inside compiled code
    """Order-preserving integer key of the raw bits x of an IEEE float (an involution)."""
    raise NotImplementedError


@overload(_key, inline="always")
def _key_impl(x):
    """Numba implementation of _key for int32 (float32 bits) and int64 (float64 bits)."""
    if isinstance(x, types.Integer) and x.bitwidth == 32:
        return lambda x: np.int32(x ^ ((x >> 31) & 0x7FFFFFFF))
    return lambda x: np.int64(x ^ ((x >> 63) & 0x7FFFFFFFFFFFFFFF))


@njit(cache=True, nogil=True, inline="always")
def _mix(i, j):
    """Deterministic 31-bit hash of an (row, column) pair: spreads ties so candidates do not pile onto low indices."""
    x = (np.int64(i) * np.int64(0x9E3779B97F4A7C15)) ^ (np.int64(j) * np.int64(0x6A09E667F3BCC909))
    return (x * np.int64(0x2545F4914F6CDD1D)) >> np.int64(33) & np.int64(0x7FFFFFFF)


@njit(cache=True, nogil=True, inline="always")
def _worse_k(ak, ah, ai, bk, bh, bi):
    """True when (ak, ah, ai) ranks below (bk, bh, bi): smaller key, then larger hash, then larger index."""
    if ak != bk:
        return ak < bk
    if ah != bh:
        return ah > bh
    return ai > bi


@njit(cache=True, nogil=True, inline="always")
def _sift_down_k(keys, hs, idx, k):
    """Restore a worst-at-root heap (keys, hs, idx) of size k after its root was replaced."""
    p = 0
    while True:
        c = 2 * p + 1
        if c >= k:
            return
        if c + 1 < k and _worse_k(keys[c + 1], hs[c + 1], idx[c + 1], keys[c], hs[c], idx[c]):
            c += 1
        if _worse_k(keys[c], hs[c], idx[c], keys[p], hs[p], idx[p]):
            tk = keys[p]
            th = hs[p]
            ti = idx[p]
            keys[p] = keys[c]
            hs[p] = hs[c]
            idx[p] = idx[c]
            keys[c] = tk
            hs[c] = th
            idx[c] = ti
            p = c
        else:
            return


@njit(cache=True, nogil=True, inline="always")
def _offer(keys, hs, idx, k, key, h, i):
    """Insert (key, h, i) into the worst-at-root heap of size k if it ranks above the root."""
    if key >= keys[0] and _worse_k(keys[0], hs[0], idx[0], key, h, i):
        keys[0] = key
        hs[0] = h
        idx[0] = i
        _sift_down_k(keys, hs, idx, k)


@njit(cache=True, nogil=True)
def dense_pass(Ck, r0, r1, B, RB, kr, cm, row_out, lohi, kmin):
    """One pass over rows [r0, r1) of the key-viewed matrix Ck (r0 a multiple of RB).

    row_out[i] = kr columns holding the kr largest values of row i (ties broken by a fixed hash, so the choice
    never depends on threading); cm[i // RB, j] = max key over the rows of row block i // RB in column j (cm rows
    pre-filled with kmin); lohi[0]/lohi[1] = min/max key.  The candidates are picked from the top-kr interleaved
    column blocks {b, b + nb, b + 2nb, ...} (nb = ceil(m / B)) by block maximum, which must hold kr largest
    values; block maxima over interleaved blocks are element-wise and vectorise.
    """
    m = Ck.shape[1]
    nb = (m + B - 1) // B
    kb = min(kr, nb)
    kbuf = np.empty(m, Ck.dtype)
    bmax = np.empty(nb, Ck.dtype)
    bk = np.empty(kb, Ck.dtype)
    bh = np.empty(kb, np.int64)
    bi = np.empty(kb, np.int32)
    hk = np.empty(kr, Ck.dtype)
    hh = np.empty(kr, np.int64)
    hi = np.empty(kr, np.int32)
    lo = lohi[0]
    top = lohi[1]
    for i in range(r0, r1):
        row = Ck[i]
        for j in range(m):
            kbuf[j] = _key(row[j])
        for j in range(m):
            lo = min(lo, kbuf[j])
        crow = cm[i // RB]
        for j in range(m):
            x = kbuf[j]
            if x > crow[j]:  # noqa: PLR1730 - this form vectorises, max() does not
                crow[j] = x
        for b in range(nb):
            bmax[b] = kbuf[b]
        for s in range(1, B):
            seg = kbuf[s * nb:min(m, (s + 1) * nb)]
            for b in range(seg.size):
                x = seg[b]
                if x > bmax[b]:  # noqa: PLR1730 - this form vectorises, max() does not
                    bmax[b] = x
        for a in range(kb):
            bk[a] = kmin
            bh[a] = _BIG_INDEX
            bi[a] = _BIG_INDEX
        for b in range(nb):
            x = bmax[b]
            if x >= bk[0]:
                _offer(bk, bh, bi, kb, x, _mix(i, b), b)
        for a in range(kr):
            hk[a] = kmin
            hh[a] = _BIG_INDEX
            hi[a] = _BIG_INDEX
        # the kr chosen blocks each hold an entry >= the smallest chosen block maximum, so the kr largest
        # entries are all >= it: skip everything below
        floor = bk[0] if kb == kr else kmin
        for a in range(kb):
            b = bi[a]
            for j in range(b, m, nb):
                x = kbuf[j]
                if x >= floor and x >= hk[0]:
                    _offer(hk, hh, hi, kr, x, _mix(i, j), j)
        for a in range(kr):
            row_out[i, a] = hi[a]
            top = max(top, hk[a])
    lohi[0] = lo
    lohi[1] = top


@njit(cache=True, nogil=True)
def col_topk(Ck, cm, B, kc, kmin, c0, c1, out):
    """out[j] = kc rows holding the kc largest values of column j, for columns [c0, c1) (ties broken by a fixed
    hash); only the top-kc row blocks of each column (by the column-block maxima cm) are scanned."""
    n = Ck.shape[0]
    nrb = cm.shape[0]
    kb = min(kc, nrb)
    w = c1 - c0
    bk = np.full((w, kb), kmin, Ck.dtype)
    bh = np.full((w, kb), _BIG_INDEX, np.int64)
    bi = np.full((w, kb), _BIG_INDEX, np.int32)
    for rb in range(nrb):
        crow = cm[rb]
        for t in range(w):
            x = crow[c0 + t]
            if x >= bk[t, 0]:
                _offer(bk[t], bh[t], bi[t], kb, x, _mix(rb, c0 + t), rb)
    # group (column, block) selections by block so each block's rows are read once, row by row
    cnt = np.zeros(nrb + 1, np.int64)
    for t in range(w):
        for a in range(kb):
            cnt[bi[t, a] + 1] += 1
    ptr = np.cumsum(cnt)
    fill = ptr[:-1].copy()
    cols = np.empty(ptr[nrb], np.int32)
    for t in range(w):
        for a in range(kb):
            b = bi[t, a]
            cols[fill[b]] = t
            fill[b] += 1
    hk = np.full((w, kc), kmin, Ck.dtype)
    hh = np.full((w, kc), _BIG_INDEX, np.int64)
    hi = np.full((w, kc), _BIG_INDEX, np.int32)
    floor = np.full(w, kmin, Ck.dtype)  # kc chosen blocks: the kc largest entries are >= the smallest maximum
    if kb == kc:
        for t in range(w):
            floor[t] = bk[t, 0]
    for rb in range(nrb):
        for i in range(rb * B, min(n, (rb + 1) * B)):
            row = Ck[i]
            for e in range(ptr[rb], ptr[rb + 1]):
                t = cols[e]
                x = _key(row[c0 + t])
                if x >= floor[t] and x >= hk[t, 0]:
                    _offer(hk[t], hh[t], hi[t], kc, x, _mix(i, c0 + t), i)
    for t in range(w):
        for a in range(kc):
            out[c0 + t, a] = hi[t, a]


@njit(cache=True, nogil=True)
def check_rows(C, kproto, u, v, vcast, col4row, indptr, indices, margin, tau, cap, rows, viol, slack, vcols, vcount):
    """Dual check (maximisation form) of the given rows against the columns outside the sparse graph.

    Edges of the graph (indptr, indices) satisfy the duals by construction, so only the other columns are
    examined: a vectorised pass in C's dtype bounds their reduced costs C[i,j] - u[i] - v[j]; rows that may come
    within `margin` of zero are recomputed exactly in float64.  viol[i] = max(reduced cost off the graph, reduced
    cost of the matched edge); slack[i] = a lower bound on -(reduced cost) off the graph.  For rows with
    viol > tau, vcols[i] receives the up to `cap` most violated columns (-1 padded) and vcount[i] the number of
    columns with reduced cost > tau.
    """
    m = C.shape[1]
    buf = np.empty(m, C.dtype)
    kb = buf.view(kproto.dtype)
    ingraph = np.zeros(m, np.bool_)
    hv = np.empty(cap, np.float64)
    hi = np.empty(cap, np.int32)
    one = np.empty(1, kproto.dtype)
    onef = one.view(C.dtype)
    for t in range(rows.size):
        i = rows[t]
        Ci = C[i]
        for j in range(m):
            buf[j] = Ci[j] - vcast[j]
        for e in range(indptr[i], indptr[i + 1]):
            buf[indices[e]] = -np.inf
        mx = _key(kb[0])
        for j in range(m):
            mx = max(mx, _key(kb[j]))
        one[0] = _key(mx)  # the key map is an involution
        off = np.float64(onef[0])  # -inf when the graph holds the whole row
        ui = u[i]
        jm = col4row[i]
        tight = np.float64(Ci[jm]) - ui - v[jm]
        if off - ui <= -margin:
            viol[i] = tight
            slack[i] = (ui - off) - margin
            continue
        for e in range(indptr[i], indptr[i + 1]):
            ingraph[indices[e]] = True
        other = -np.inf
        cnt = 0
        for a in range(cap):
            hv[a] = -np.inf
            hi[a] = _BIG_INDEX
        for j in range(m):
            if ingraph[j]:
                continue
            x = np.float64(Ci[j]) - ui - v[j]
            other = max(other, x)
            if x > tau:
                cnt += 1
                if x > hv[0] or (x == hv[0] and j < hi[0]):
                    hv[0] = x
                    hi[0] = j
                    _sift_down(hv, hi, cap)
        for e in range(indptr[i], indptr[i + 1]):
            ingraph[indices[e]] = False
        viol[i] = max(other, tight)
        slack[i] = -other
        vcount[i] = cnt
        for a in range(cap):
            vcols[i, a] = hi[a] if hv[a] > -np.inf else -1


@njit(cache=True, nogil=True)
def reduce_rows(indptr, indices, cost, m, u, v, col4row, row4col, rows, passes):
    """Jonker-Volgenant augmenting row reduction on a sparse graph (minimisation form); returns the rows left free.

    Each free row takes a column of minimum reduced cost c - v, lowering that column's v so the row's reduced
    cost rises to its second minimum; a displaced row is processed next.  Every matched row stays matched to a
    column of minimum reduced cost and v only decreases on matched columns (unmatched ones keep v = 0), so the
    state is a valid start for sap_solve.  u of every matched row it touched is set to the (tight) reduced cost.
    """
    free = rows.copy()
    nfree = free.size
    touched = np.zeros(indptr.size - 1, np.bool_)
    budget = 64 * (indices.size + rows.size) + 1024  # guards against long price wars
    for _ in range(passes):
        k = 0
        prev = nfree
        nfree = 0
        while k < prev:
            i = free[k]
            k += 1
            touched[i] = True
            lo = indptr[i]
            hi = indptr[i + 1]
            if lo == hi:
                free[nfree] = i
                nfree += 1
                continue
            umin = np.inf
            usub = np.inf
            j1 = -1
            j2 = -1
            for e in range(lo, hi):
                j = indices[e]
                h = cost[e] - v[j]
                if h < usub:
                    if h >= umin:
                        usub = h
                        j2 = j
                    else:
                        usub = umin
                        j2 = j1
                        umin = h
                        j1 = j
            i0 = row4col[j1]
            strict = umin < usub < np.inf and budget > 0
            budget -= hi - lo
            if strict:
                v[j1] -= usub - umin
            elif umin == usub and i0 >= 0:  # tie: the second column is just as cheap, and may be free
                j1 = j2
                i0 = row4col[j2]
            elif i0 >= 0:  # single edge or budget spent: only a free minimum column may be taken
                free[nfree] = i
                nfree += 1
                continue
            col4row[i] = j1
            row4col[j1] = i
            if i0 >= 0:
                col4row[i0] = -1
                if strict:
                    k -= 1
                    free[k] = i0
                else:
                    free[nfree] = i0
                    nfree += 1
    for i in range(touched.size):
        j = col4row[i]
        if touched[i] and j >= 0:
            for e in range(indptr[i], indptr[i + 1]):
                if indices[e] == j:
                    u[i] = cost[e] - v[j]
                    break
    return free[:nfree].copy()


@njit(cache=True, nogil=True)
def lower_prices(indptr, indices, cost, m, u, v, col4row, row4col):
    """Move the duals of an optimal sparse solution (minimisation form, all rows matched) to the optimal dual with
    the highest column potentials (v <= 0, i.e. the lowest maximisation prices), keeping feasibility and
    tightness: v_j += dist_j, where dist_j is the shortest alternating-path distance to column j from a column
    k with initial label -v_k, over reduced costs.  Unmatched columns keep v = 0.
    """
    d = np.empty(m)
    heap = np.empty(m, np.int32)
    pos = np.full(m, -1, np.int32)
    done = np.zeros(m, np.bool_)
    hsize = 0
    for j in range(m):
        d[j] = -v[j]
        heap[hsize] = j
        pos[j] = hsize
        hsize += 1
        _heap_up(heap, pos, d, hsize - 1)
    while hsize > 0:
        k = _heap_pop(heap, pos, d, hsize)
        hsize -= 1
        done[k] = True
        i = row4col[k]
        if i < 0:
            continue
        base = d[k]
        ui = u[i]
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            if done[j]:
                continue
            nd = base + (cost[e] - ui - v[j])
            if nd < d[j]:
                d[j] = nd
                _heap_up(heap, pos, d, pos[j])
    for j in range(m):
        if row4col[j] >= 0:
            v[j] += d[j]
    for i in range(indptr.size - 1):
        j = col4row[i]
        for e in range(indptr[i], indptr[i + 1]):
            if indices[e] == j:
                u[i] = cost[e] - v[j]
                break


@njit(cache=True, nogil=True)
def tight_augment(indptr, indices, cost, m, u, v, col4row, row4col, rows, max_phases):
    """Match free rows along zero-reduced-cost alternating paths (minimisation form); returns the rows left free.

    Sets u[r] = min_j cost - v for each free row, then repeats depth-first phases over tight edges
    (cost - v == u exactly) until a phase finds no augmenting path.  Zero-length augmentations keep every dual
    invariant, so this is a cheap prefix of the shortest-path phase; it matters most when values tie.
    """
    n = indptr.size - 1
    for t in range(rows.size):
        r = rows[t]
        best = _INF
        for e in range(indptr[r], indptr[r + 1]):
            best = min(best, cost[e] - v[indices[e]])
        u[r] = best
    stamp = np.zeros(m, np.int32)
    srow = np.empty(n + 1, np.int32)
    sedge = np.empty(n + 1, np.int64)
    scol = np.empty(n + 1, np.int32)
    free = rows.copy()
    nfree = free.size
    for phase in range(1, max_phases + 1):
        found = 0
        for t in range(nfree):
            r = free[t]
            if col4row[r] >= 0:
                continue
            top = 0
            srow[0] = r
            sedge[0] = indptr[r]
            while top >= 0:
                i = srow[top]
                ui = u[i]
                e = sedge[top]
                end = indptr[i + 1]
                nxt = -1
                while e < end:
                    j = indices[e]
                    e += 1
                    if stamp[j] == phase or cost[e - 1] - v[j] != ui:
                        continue
                    stamp[j] = phase
                    nxt = j
                    break
                sedge[top] = e
                if nxt < 0:
                    top -= 1
                    continue
                scol[top] = nxt
                k = row4col[nxt]
                if k < 0:
                    for a in range(top + 1):
                        col4row[srow[a]] = scol[a]
                        row4col[scol[a]] = srow[a]
                    found += 1
                    break
                top += 1
                srow[top] = k
                sedge[top] = indptr[k]
        w = 0
        for t in range(nfree):
            if col4row[free[t]] < 0:
                free[w] = free[t]
                w += 1
        nfree = w
        if found == 0 or nfree == 0:
            break
    return free[:nfree].copy()
