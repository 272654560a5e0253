"""Numba kernels of the streamed matrix-level pass (imported lazily by stream.py).

A call handles a range of rows (and columns) of one chunk of N same-shape members, read in place in their
stored dtype (bf16 bits as uint16, float32 or float64: the readers' tensors, often views of the mmap-ed
checkpoint) and widened to float64 one block of ``BLOCK`` flat columns at a time (flat column d holds entry d
of every member's flattened matrix). Everything is summed in float64:

* ``gram += sum_d x_d x_d^T``: the Gram matrix of the flattened members;
* ``zgram += sum_d w_d c_d c_d^T`` with ``c_d = N x_d - sum(x_d)`` (N times the centred column) and
  ``w_d = (N - 1) / |c_d|^2``: the standardised Gram ``Z Z^T`` of matrix-level PCA (w_d c_d c_d^T = z_d z_d^T,
  z the column divided by its Bessel std), with no square root and no division by N. Each column's statistics
  come from its own N values (its sum first, then its centred squares), so this is exact whatever the
  chunking. A column whose entries are all equal is constant (w = 0, as in ``pca.standardize``);
* the sums behind the neuron-averaged vectors (column sums for gate/up, row sums for down);
* for the sign rule's pass (``largest_entries``), ``(c_d . u_j)^2 w_d``, the squared entry d of component j.

Exactness of the constant-column test: with bf16 or float32 entries (24 significant bits or fewer), ``N x`` and
every partial sum of N <= 2**29 equal values are exact in float64, so a constant column's ``c`` is exactly 0,
while two different entries give ``|c|^2 > 0``. float64 entries are tested explicitly (``_centre``).

Speed: products use 4 x 4 register tiles of members (16 accumulators, 10 on the diagonal), so each value
loaded feeds four multiply-adds; per-column passes take four members at a time. Every inner loop is a plain
loop over a block's columns that LLVM vectorises: rows are addressed through raw pointers (``_row``: no
reference counting, no negative-index handling), each loop writes one array (or rows of one array at constant
offsets), and ``error_model="numpy"`` drops the division-by-zero branches. Callers split a chunk between
threads (the kernels release the GIL), each with its own accumulators, summed in a fixed order.
"""
from __future__ import annotations

import llvmlite.ir as llvm_ir
import numba
import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

_FASTMATH = {"reassoc", "contract"}  # lets LLVM vectorise float64 reductions (order of additions only)
_OPTS = dict(nogil=True, error_model="numpy", fastmath=_FASTMATH)
BLOCK = 256  # flat columns widened at a time (a few N x 256 float64 arrays: L1/L2)
TILE = 4     # members per register tile


def padded(n: int) -> int:
    """Rows of the scratch and accumulator arrays for n members (a multiple of ``TILE``)."""
    return -(-n // TILE) * TILE


# -- helpers (inlined) -------------------------------------------------------------------------------------------

@intrinsic
def _pointer(typingctx, address, like):
    """int64 address -> pointer to ``like``'s dtype (the caller keeps the memory alive)."""
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, like), codegen


@intrinsic
def _bits_to_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())

    return types.float32(types.uint32), codegen


def _widen(value):  # pragma: no cover - replaced by the overload below in compiled code
    raise NotImplementedError


@overload(_widen, inline="always")
def _widen_impl(value):
    if isinstance(value, types.Integer):  # bfloat16 bits: the high half of a float32
        return lambda value: np.float64(_bits_to_float32(np.uint32(value) << np.uint32(16)))
    return lambda value: np.float64(value)


def _sums_exact(like):  # pragma: no cover - replaced by the overload below in compiled code
    raise NotImplementedError


@overload(_sums_exact, inline="always")
def _sums_exact_impl(like):
    exact = like.dtype != types.float64  # bf16 / float32 entries: 24 significant bits or fewer
    return lambda like: exact


@njit(nogil=True, inline="always")
def _row(a, i, start, nb):
    """a[i, start:start + nb] of a C-contiguous 2-D array, as a 1-D array without reference counting."""
    return numba.carray(_pointer(a.ctypes.data + (i * a.shape[1] + start) * a.itemsize, a), (nb,))


@njit(nogil=True, inline="always")
def _vec(a, nb):
    """a[:nb] of a 1-D array, without reference counting."""
    return numba.carray(_pointer(a.ctypes.data, a), (nb,))


@njit(nogil=True, inline="always")
def _source(addrs, like, a, start, nb):
    """Member a's flat entries start:start + nb, in their stored dtype."""
    return numba.carray(_pointer(addrs[a] + start * like.itemsize, like), (nb,))


# -- per-column passes ---------------------------------------------------------------------------------------

@njit(**_OPTS)
def _load(addrs, like, start, nb, x, s, rowsum, row_sums):
    """x[a, :nb] = member a's flat entries start:start + nb as float64 (a < N; rows past N stay 0);
    s = column sums; with ``row_sums`` also rowsum[a] += sum of x[a, :nb]."""
    n = addrs.shape[0]
    for a in range(n):
        src, xa = _source(addrs, like, a, start, nb), _row(x, a, 0, nb)
        if row_sums:
            total = 0.0
            for j in range(nb):
                v = _widen(src[j])
                xa[j] = v
                total += v
            rowsum[a] += total
        else:
            for j in range(nb):
                xa[j] = _widen(src[j])
    sv = _vec(s, nb)
    for j in range(nb):
        sv[j] = 0.0
    for a0 in range(0, x.shape[0], TILE):
        x0, x1, x2, x3 = _row(x, a0, 0, nb), _row(x, a0 + 1, 0, nb), _row(x, a0 + 2, 0, nb), _row(x, a0 + 3, 0, nb)
        for j in range(nb):
            sv[j] += (x0[j] + x1[j]) + (x2[j] + x3[j])


@njit(**_OPTS)
def _add_rows(x, n, nb, out, c0):
    """out[a, c0:c0 + nb] += x[a, :nb] for every member a < n (the column sums behind the averages)."""
    for a in range(n):
        acc, xa = _row(out, a, c0, nb), _row(x, a, 0, nb)
        for j in range(nb):
            acc[j] += xa[j]


@njit(**_OPTS)
def _weights(x, n, nb, s, w):
    """w = (n - 1) / |c|^2 per column, c = n x - column sum s (0 for a constant column, whose c is exactly 0)."""
    sv, wv = _vec(s, nb), _vec(w, nb)
    for j in range(nb):
        wv[j] = 0.0
    for a0 in range(0, n, TILE):
        f1 = 1.0 if a0 + 1 < n else 0.0  # rows past n are 0, but their c would be -s
        f2 = 1.0 if a0 + 2 < n else 0.0
        f3 = 1.0 if a0 + 3 < n else 0.0
        x0, x1, x2, x3 = _row(x, a0, 0, nb), _row(x, a0 + 1, 0, nb), _row(x, a0 + 2, 0, nb), _row(x, a0 + 3, 0, nb)
        for j in range(nb):
            sj = sv[j]
            c0, c1 = n * x0[j] - sj, (n * x1[j] - sj) * f1
            c2, c3 = (n * x2[j] - sj) * f2, (n * x3[j] - sj) * f3
            wv[j] += (c0 * c0 + c1 * c1) + (c2 * c2 + c3 * c3)
    for j in range(nb):
        wv[j] = (n - 1) / wv[j] if wv[j] > 0.0 else 0.0


@njit(**_OPTS)
def _centre(x, n, nb, s, c, w, spread):
    """float64 entries: c[a] = n x[a] - s for a < n, w as in ``_weights``; a column is constant when its c are
    all equal (exactly when its entries are: n x - s is monotone in x), and its c are then set to 0."""
    sv, wv, sp = _vec(s, nb), _vec(w, nb), _vec(spread, nb)
    for a in range(n):
        xa, ca = _row(x, a, 0, nb), _row(c, a, 0, nb)
        for j in range(nb):
            ca[j] = n * xa[j] - sv[j]
    first = _row(c, 0, 0, nb)
    for j in range(nb):
        wv[j] = 0.0
        sp[j] = 0.0
    for a in range(n):
        ca = _row(c, a, 0, nb)
        for j in range(nb):
            wv[j] += ca[j] * ca[j]
        for j in range(nb):
            sp[j] = max(sp[j], abs(ca[j] - first[j]))
    for a in range(n):
        ca = _row(c, a, 0, nb)
        for j in range(nb):
            ca[j] = ca[j] if sp[j] > 0.0 else 0.0
    for j in range(nb):
        wv[j] = (n - 1) / wv[j] if wv[j] > 0.0 and sp[j] > 0.0 else 0.0


@njit(**_OPTS)
def _column_sums(addrs, like, start, nb, s):
    """s[j] = sum_a of member a's flat entry start + j, read four members at a time."""
    n, sv = addrs.shape[0], _vec(s, nb)
    for j in range(nb):
        sv[j] = 0.0
    a0 = 0
    while a0 + TILE <= n:
        p0, p1 = _source(addrs, like, a0, start, nb), _source(addrs, like, a0 + 1, start, nb)
        p2, p3 = _source(addrs, like, a0 + 2, start, nb), _source(addrs, like, a0 + 3, start, nb)
        for j in range(nb):
            sv[j] += (_widen(p0[j]) + _widen(p1[j])) + (_widen(p2[j]) + _widen(p3[j]))
        a0 += TILE
    for a in range(a0, n):
        p0 = _source(addrs, like, a, start, nb)
        for j in range(nb):
            sv[j] += _widen(p0[j])


@njit(**_OPTS)
def _centred_sums(addrs, like, start, nb, s, u, g, acc):
    """Per column j, with c = n x - s computed on the fly from the members' entries (exact-sum dtypes):
    acc[j] = |c_j|^2 and acc[(1 + i) BLOCK + j] = sum_a u[a, g + i] c_aj for i < 3 (u has g + 3 columns or more).

    One pass, four members at a time; the four sums are rows of one array at constant offsets, so the
    compiler needs no overlap checks between them and vectorises the loop.
    """
    n, sv = addrs.shape[0], _vec(s, nb)
    for j in range(4 * BLOCK):
        acc[j] = 0.0
    for a0 in range(0, n, TILE):
        last = min(n, a0 + TILE) - 1  # a tile past n re-reads member ``last`` with weight 0
        p0, p1 = _source(addrs, like, a0, start, nb), _source(addrs, like, min(a0 + 1, last), start, nb)
        p2, p3 = _source(addrs, like, min(a0 + 2, last), start, nb), _source(addrs, like, min(a0 + 3, last), start, nb)
        f1 = 1.0 if a0 + 1 < n else 0.0
        f2 = 1.0 if a0 + 2 < n else 0.0
        f3 = 1.0 if a0 + 3 < n else 0.0
        u00, u10, u20, u30 = u[a0, g], u[min(a0 + 1, last), g], u[min(a0 + 2, last), g], u[min(a0 + 3, last), g]
        u01, u11 = u[a0, g + 1], u[min(a0 + 1, last), g + 1]
        u21, u31 = u[min(a0 + 2, last), g + 1], u[min(a0 + 3, last), g + 1]
        u02, u12 = u[a0, g + 2], u[min(a0 + 1, last), g + 2]
        u22, u32 = u[min(a0 + 2, last), g + 2], u[min(a0 + 3, last), g + 2]
        for j in range(nb):
            sj = sv[j]
            c0, c1 = n * _widen(p0[j]) - sj, (n * _widen(p1[j]) - sj) * f1
            c2, c3 = (n * _widen(p2[j]) - sj) * f2, (n * _widen(p3[j]) - sj) * f3
            acc[j] += (c0 * c0 + c1 * c1) + (c2 * c2 + c3 * c3)
            acc[BLOCK + j] += (u00 * c0 + u10 * c1) + (u20 * c2 + u30 * c3)
            acc[2 * BLOCK + j] += (u01 * c0 + u11 * c1) + (u21 * c2 + u31 * c3)
            acc[3 * BLOCK + j] += (u02 * c0 + u12 * c1) + (u22 * c2 + u32 * c3)


# -- products: 4 x 4 register tiles ----------------------------------------------------------------------------

@njit(nogil=True, error_model="numpy", fastmath=_FASTMATH, inline="always")
def _tile(p, a0, b0, nb, out, centred, n, s, w):
    """out[a0+i, b0+k] += sum_j p'[a0+i, j] p''[b0+k, j], i, k < 4 (16 accumulators): p' = p'' = p, or with
    ``centred`` p'' = n p - s and p' = p'' w (centred on the fly, weighted on one side)."""
    p0, p1, p2, p3 = _row(p, a0, 0, nb), _row(p, a0 + 1, 0, nb), _row(p, a0 + 2, 0, nb), _row(p, a0 + 3, 0, nb)
    r0, r1, r2, r3 = _row(p, b0, 0, nb), _row(p, b0 + 1, 0, nb), _row(p, b0 + 2, 0, nb), _row(p, b0 + 3, 0, nb)
    sv, wv = _vec(s, nb), _vec(w, nb)
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = 0.0
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = 0.0
    for j in range(nb):
        x0, x1, x2, x3 = p0[j], p1[j], p2[j], p3[j]
        y0, y1, y2, y3 = r0[j], r1[j], r2[j], r3[j]
        if centred:
            sj, wj = sv[j], wv[j]
            x0, x1, x2, x3 = (n * x0 - sj) * wj, (n * x1 - sj) * wj, (n * x2 - sj) * wj, (n * x3 - sj) * wj
            y0, y1, y2, y3 = n * y0 - sj, n * y1 - sj, n * y2 - sj, n * y3 - sj
        s00 += x0 * y0
        s01 += x0 * y1
        s02 += x0 * y2
        s03 += x0 * y3
        s10 += x1 * y0
        s11 += x1 * y1
        s12 += x1 * y2
        s13 += x1 * y3
        s20 += x2 * y0
        s21 += x2 * y1
        s22 += x2 * y2
        s23 += x2 * y3
        s30 += x3 * y0
        s31 += x3 * y1
        s32 += x3 * y2
        s33 += x3 * y3
    out[a0, b0] += s00
    out[a0, b0 + 1] += s01
    out[a0, b0 + 2] += s02
    out[a0, b0 + 3] += s03
    out[a0 + 1, b0] += s10
    out[a0 + 1, b0 + 1] += s11
    out[a0 + 1, b0 + 2] += s12
    out[a0 + 1, b0 + 3] += s13
    out[a0 + 2, b0] += s20
    out[a0 + 2, b0 + 1] += s21
    out[a0 + 2, b0 + 2] += s22
    out[a0 + 2, b0 + 3] += s23
    out[a0 + 3, b0] += s30
    out[a0 + 3, b0 + 1] += s31
    out[a0 + 3, b0 + 2] += s32
    out[a0 + 3, b0 + 3] += s33


@njit(nogil=True, error_model="numpy", fastmath=_FASTMATH, inline="always")
def _tile_diagonal(p, a0, nb, out, centred, n, s, w):
    """The upper triangle (10 accumulators) of the diagonal tile a0 of ``_tile``."""
    p0, p1, p2, p3 = _row(p, a0, 0, nb), _row(p, a0 + 1, 0, nb), _row(p, a0 + 2, 0, nb), _row(p, a0 + 3, 0, nb)
    sv, wv = _vec(s, nb), _vec(w, nb)
    s00 = s01 = s02 = s03 = s11 = s12 = s13 = s22 = s23 = s33 = 0.0
    for j in range(nb):
        y0, y1, y2, y3 = p0[j], p1[j], p2[j], p3[j]
        x0, x1, x2, x3 = y0, y1, y2, y3
        if centred:
            sj, wj = sv[j], wv[j]
            y0, y1, y2, y3 = n * y0 - sj, n * y1 - sj, n * y2 - sj, n * y3 - sj
            x0, x1, x2, x3 = y0 * wj, y1 * wj, y2 * wj, y3 * wj
        s00 += x0 * y0
        s01 += x0 * y1
        s02 += x0 * y2
        s03 += x0 * y3
        s11 += x1 * y1
        s12 += x1 * y2
        s13 += x1 * y3
        s22 += x2 * y2
        s23 += x2 * y3
        s33 += x3 * y3
    out[a0, a0] += s00
    out[a0, a0 + 1] += s01
    out[a0, a0 + 2] += s02
    out[a0, a0 + 3] += s03
    out[a0 + 1, a0 + 1] += s11
    out[a0 + 1, a0 + 2] += s12
    out[a0 + 1, a0 + 3] += s13
    out[a0 + 2, a0 + 2] += s22
    out[a0 + 2, a0 + 3] += s23
    out[a0 + 3, a0 + 3] += s33


@njit(**_OPTS)
def _gram(p, nb, out, centred, n, s, w):
    """Upper triangle of out += p p^T over the block (``centred``: the weighted Gram of c = n p - s)."""
    for a0 in range(0, p.shape[0], TILE):
        _tile_diagonal(p, a0, nb, out, centred, n, s, w)
        for b0 in range(a0 + TILE, p.shape[0], TILE):
            _tile(p, a0, b0, nb, out, centred, n, s, w)


# -- kernels -----------------------------------------------------------------------------------------------------

@njit(cache=True, **_OPTS)
def accumulate(addrs, like, cols, r0, r1, c0, c1, neuron_axis, gram, zgram, avg_cols, avg_rows, row0):
    """Add rows r0:r1, columns c0:c1 of one chunk (rows x ``cols`` of every member) to the sums.

    addrs: [N] int64 data addresses of the members' C-contiguous rows (``like``: an empty array of their
    dtype). gram, zgram: [M, M] float64 (M = padded(N)), entries a <= b < N hold the sums; avg_cols: [N, cols]
    column sums (neuron_axis 0); avg_rows: [N, all rows] row sums (neuron_axis 1, c0:c1 whole rows), this
    chunk's row 0 being row ``row0``. Releases the GIL: callers run disjoint ranges on threads, each with its
    own gram, zgram and avg_cols (row ranges: for neuron_axis 1, no two threads add to one row's average).
    """
    n, m = addrs.shape[0], gram.shape[0]
    x = np.zeros((m, BLOCK))
    c = np.zeros((m, BLOCK))
    s = np.empty(BLOCK)
    w = np.empty(BLOCK)
    spread = np.empty(BLOCK)
    rowsum = np.zeros(n)
    for r in range(r0, r1):
        for a in range(n):
            rowsum[a] = 0.0
        for b0 in range(c0, c1, BLOCK):
            nb = min(BLOCK, c1 - b0)
            _load(addrs, like, r * cols + b0, nb, x, s, rowsum, neuron_axis != 0)
            if neuron_axis == 0:
                _add_rows(x, n, nb, avg_cols, b0)
            _gram(x, nb, gram, False, n, s, w)
            if n < 2:
                continue
            if _sums_exact(like):
                _weights(x, n, nb, s, w)
                _gram(x, nb, zgram, True, n, s, w)
            else:  # float64 entries: c stored with constant columns zeroed, then weighted as c = 1 c - 0
                _centre(x, n, nb, s, c, w, spread)
                for j in range(nb):
                    s[j] = 0.0
                _gram(c, nb, zgram, True, 1, s, w)
        if neuron_axis != 0:
            for a in range(n):
                avg_rows[a, row0 + r] = rowsum[a]


@njit(cache=True, **_OPTS)
def largest_entries(addrs, like, cols, r0, r1, u, best, sign):
    """The sign rule's pass over rows r0:r1 of one chunk: per component j, the entry of largest magnitude of
    ``Z^T u[:, j]``, compared squared as ``(c . u_j)^2 w`` (the first on ties).

    u: [M, k], k a multiple of 3 (rows past N and padding columns 0). best, sign: [k], updated only where
    strictly larger, so that visiting row ranges in order keeps the first entry. Releases the GIL.
    """
    n, k = addrs.shape[0], u.shape[1]
    x = np.zeros((u.shape[0], BLOCK))
    c = np.zeros((u.shape[0], BLOCK))
    s = np.empty(BLOCK)
    w = np.empty(BLOCK)
    spread = np.empty(BLOCK)
    mag = np.empty(BLOCK)
    acc = np.empty(4 * BLOCK)
    rowsum = np.zeros(n)
    for r in range(r0, r1):
        for b0 in range(0, cols, BLOCK):
            nb = min(BLOCK, cols - b0)
            start = r * cols + b0
            exact = _sums_exact(like)
            if exact:  # straight from the members' entries: column sums, then one pass per 3 components
                _column_sums(addrs, like, start, nb, s)
            else:  # float64 entries: c stored with constant columns zeroed
                _load(addrs, like, start, nb, x, s, rowsum, False)
                _centre(x, n, nb, s, c, w, spread)
            for g in range(0, k, 3):
                if exact:
                    _centred_sums(addrs, like, start, nb, s, u, g, acc)
                    for j in range(nb):
                        w[j] = (n - 1) / acc[j] if acc[j] > 0.0 else 0.0
                else:
                    for i in range(3):
                        off = (1 + i) * BLOCK
                        for j in range(nb):
                            acc[off + j] = 0.0
                        for a in range(n):
                            ua, ca = u[a, g + i], _row(c, a, 0, nb)
                            for j in range(nb):
                                acc[off + j] += ua * ca[j]
                for i in range(3):
                    off = (1 + i) * BLOCK
                    top = 0.0
                    for j in range(nb):
                        mag[j] = acc[off + j] * acc[off + j] * w[j]
                        top = max(top, mag[j])
                    if top > best[g + i]:
                        for j in range(nb):
                            if mag[j] == top:
                                best[g + i] = top
                                sign[g + i] = -1.0 if acc[off + j] < 0.0 else 1.0
                                break


@njit(cache=True, **_OPTS)
def row_gram(a):
    """a a^T for a small float64 [n, d] (no BLAS threads woken)."""
    n = a.shape[0]
    out = np.empty((n, n))
    for i in range(n):
        for k in range(i, n):
            total = 0.0
            for j in range(a.shape[1]):
                total += a[i, j] * a[k, j]
            out[i, k] = out[k, i] = total
    return out
