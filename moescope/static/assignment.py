"""Exact maximum-weight one-to-one assignment between the rows and columns of a score matrix.

The default engine ("sparse-certified") solves the problem on a sparse candidate graph (the top entries of
every row and column) with a shortest-augmenting-path solver that keeps LP dual potentials, then certifies the
result against the full dense matrix: with maximisation duals u (rows) and v >= 0 (columns, 0 on unmatched
ones), every entry must satisfy C[i, j] <= u[i] + v[j].  Violating entries are added to the graph and the
problem is re-solved until the certificate holds; the certified duality gap bounds how far the total can be
from the optimum.  Without numba, or if certification does not converge, scipy's dense solver is used.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MoescopeError

__all__ = ["Assignment", "AssignmentInputError", "assignment_memory", "compiled_available", "linear_assignment",
           "many_assignments"]

_BIG_INDEX = np.iinfo(np.int32).max
_METHODS = ("auto", "sparse", "scipy")
_SMALL = 512 * 512  # below this many entries "auto" just calls scipy (fast there, and no JIT compile)
_ROW_K = 16  # candidates per row
_COL_K = 4  # candidates per column (keeps every column reachable)
_MAX_ROUNDS = 12  # certification rounds before falling back to scipy
_ARR_PASSES = 3  # Jonker-Volgenant augmenting row reduction passes before the shortest-path phase
_TIGHT_PHASES = 64  # most depth-first phases of zero-length augmentations (they matter when values tie)
_LOWER_PRICES = True  # move to the lowest optimal column prices before a full check (fewer violations)
_FAIL_K = 64  # pseudo-random columns given to a row the sparse graph cannot match
_FAIL_BUDGET = 4.0  # widening would add more edges than this many times the graph: fall back to scipy
_VIOL_CAP = 32  # most-violated entries added per row per round
_TAU = 1e-12  # violation tolerance, relative to the problem's scale
_threads_override: int | None = None
_kernels: Any = None
_kernels_error: str | None = None
_kernels_lock = threading.Lock()


class AssignmentInputError(MoescopeError, ValueError):
    """The score matrix is not a finite 2-D real matrix."""


@dataclass(frozen=True, eq=False)
class Assignment:
    """One-to-one assignment: row_ind[k] is matched to col_ind[k] (rows ascending); total = sum of the scores."""

    row_ind: np.ndarray  # int64, ascending
    col_ind: np.ndarray  # int64, distinct
    total: float  # float64 sum of score[row_ind, col_ind]
    solver: str  # "sparse-certified", "scipy" or "trivial" (empty input)
    certified: bool  # True when a dual certificate proved optimality (sparse-certified)
    rounds: int  # sparse solve + dense check rounds (0 for scipy)
    gap: float = float("nan")  # certified bound on optimum - total (in the maximised sense); nan for scipy


def _load_kernels() -> Any:
    """Import (and JIT-load) the numba kernels once; None when numba is unavailable."""
    global _kernels, _kernels_error
    if _kernels is not None or _kernels_error is not None:
        return _kernels
    with _kernels_lock:
        if _kernels is None and _kernels_error is None:
            try:
                from . import _lap_numba

                _kernels = _lap_numba
            except Exception as exc:  # noqa: BLE001 - numba missing or broken (any import error): use scipy
                _kernels_error = f"{type(exc).__name__}: {exc}"
    return _kernels


def _disable_kernels(exc: BaseException) -> None:
    """Stop using the numba kernels after a compilation failure, with a warning."""
    global _kernels, _kernels_error
    import warnings

    _kernels, _kernels_error = None, f"{type(exc).__name__}: {exc}"
    warnings.warn(f"moescope: numba kernels failed ({_kernels_error}); using scipy instead", stacklevel=3)


def compiled_available() -> bool:
    """True when the numba-compiled sparse solver can be used."""
    return _load_kernels() is not None


def _n_threads() -> int:
    """Threads used by the dense passes (candidate selection and certificate check)."""
    if _threads_override is not None:
        return _threads_override
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _as_matrix(score: Any) -> np.ndarray:
    """Convert numpy/torch/array-like input to a C-contiguous float32/float64 numpy matrix, validating it."""
    if type(score).__module__.startswith("torch"):
        t = score.detach()
        if t.is_floating_point() and t.dtype.itemsize < 4:
            t = t.float()
        score = t.cpu().numpy()
    arr = np.asarray(score)
    if arr.ndim != 2:
        raise AssignmentInputError(f"expected a 2-D score matrix, got shape {arr.shape}; pass one matrix")
    if arr.dtype.kind == "f" and arr.dtype.itemsize < 4:
        arr = arr.astype(np.float32)
    elif arr.dtype not in (np.float32, np.float64):
        if arr.dtype.kind not in "biuf":
            raise AssignmentInputError(f"expected a real-valued score matrix, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    return np.ascontiguousarray(arr)


def linear_assignment(score: Any, *, maximize: bool = True, method: str = "auto") -> Assignment:
    """Optimal one-to-one assignment of score (n x m, numpy or torch), like scipy's linear_sum_assignment."""
    if method not in _METHODS:
        raise AssignmentInputError(f"method must be one of {_METHODS}, got {method!r}")
    C = _as_matrix(score)
    n, m = C.shape
    if n == 0 or m == 0:
        empty = np.zeros(0, np.int64)
        return Assignment(empty, empty.copy(), 0.0, "trivial", True, 0, 0.0)
    transposed = n > m
    work = _transpose(C) if transposed else C
    if not maximize:
        work = np.negative(work, out=work if transposed else None)
    use_sparse = method == "sparse" or (method == "auto" and n * m >= _SMALL)
    result = None
    if use_sparse and _load_kernels() is not None:
        try:
            result = _sparse_certified(work)
        except Exception as exc:
            if not type(exc).__module__.startswith("numba"):
                raise
            _disable_kernels(exc)  # the JIT failed on this platform: use scipy from now on
    if result is None:
        rows, cols, solver, certified, rounds, gap = *_scipy_solve(work), "scipy", False, 0, float("nan")
    else:
        rows, cols, solver, certified, rounds, gap = result
    if transposed:
        rows, cols = cols, rows
        order = np.argsort(rows, kind="stable")
        rows, cols = rows[order], cols[order]
    total = float(C[rows, cols].sum(dtype=np.float64))
    return Assignment(rows.astype(np.int64), cols.astype(np.int64), total, solver, certified, rounds, gap)


def assignment_memory(rows: int, cols: int, itemsize: int = 8) -> int:
    """Rough peak bytes ``linear_assignment`` needs beyond a ``rows`` x ``cols`` score matrix of ``itemsize``-byte
    floats: a transposed copy when rows > cols, then either the sparse engine's work (column-block maxima of the
    candidate pass, the candidate graph with the entries certification adds, per-row and per-column arrays) or,
    where scipy solves it (small problems, no numba), scipy's negated float64 copy. A fallback to scipy after a
    failed certification (rare) would need that copy too."""
    n, m = min(rows, cols), max(rows, cols)
    transposed = n * m * itemsize if rows > cols else 0
    if n * m < _SMALL or not compiled_available():
        return transposed + n * m * (8 if itemsize == 8 else itemsize + 8)
    kr, kc = min(_ROW_K, m), min(_COL_K, n)
    block_rows = min(16, max(4, n // (8 * max(kc, 1))))  # as in _candidates
    block_maxima = -(-n // block_rows) * m * itemsize
    edges = 2 * (n * kr + m * kc) + n * _VIOL_CAP       # candidates, widened rows and added violations
    graph = edges * (4 + 8 + 2 * 4)                      # CSR indices, costs, and the extra (row, col) lists
    per_line = n * (4 * _VIOL_CAP + 64) + m * 32         # checker state, potentials, matchings
    return transposed + block_maxima + (n * kr + m * kc) * 4 + graph + per_line


def _transpose(C: np.ndarray) -> np.ndarray:
    """C-contiguous copy of C.T (torch's blocked, multi-threaded copy beats numpy's by ~2x)."""
    try:
        import torch

        return torch.from_numpy(C).T.contiguous().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency; numpy is the safety net
        return np.ascontiguousarray(C.T)


def _scipy_solve(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense maximisation with scipy.optimize.linear_sum_assignment."""
    from scipy.optimize import linear_sum_assignment

    if not np.isfinite(C).all():
        raise AssignmentInputError("score matrix contains NaN or infinite values; replace them before matching")
    r, c = linear_sum_assignment(C, maximize=True)
    return np.asarray(r, np.int64), np.asarray(c, np.int64)


def _parallel(fn: Callable[[int], None], parts: int) -> None:
    """Run fn(0..parts-1) on a thread pool (the numba kernels release the GIL)."""
    if parts == 1:
        fn(0)
        return
    with ThreadPoolExecutor(max_workers=parts) as pool:
        for f in [pool.submit(fn, p) for p in range(parts)]:
            f.result()


_BLOCK = 64  # block width of the dense candidate pass


def _key_dtype(C: np.ndarray) -> type:
    """Integer dtype whose view of C's bits gives order-preserving keys."""
    return np.int32 if C.dtype == np.float32 else np.int64


def _keys_to_floats(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Invert the order-preserving key map (it is an involution)."""
    keys = np.asarray(keys)
    mask = np.int64(0x7FFFFFFF) if keys.dtype == np.int32 else np.int64(0x7FFFFFFFFFFFFFFF)
    bits = np.where(keys < 0, keys ^ keys.dtype.type(mask), keys).astype(keys.dtype)
    return bits.view(dtype)


def _splits(total: int, parts: int, align: int = 1) -> np.ndarray:
    """parts+1 boundaries splitting range(total) into near-equal pieces aligned to multiples of align."""
    units = -(-total // align)
    b = np.linspace(0, units, parts + 1).astype(np.int64) * align
    b[-1] = total
    return np.minimum(b, total)


def _candidates(K: Any, C: np.ndarray, kr: int, kc: int, threads: int):
    """Top-kr columns of every row and top-kc rows of every column, plus the min and max entry of C."""
    n, m = C.shape
    B = int(min(_BLOCK, max(4, m // (4 * kr))))  # interleaved column blocks: keep ~4 kr blocks per row at least
    RB = int(min(16, max(4, n // (8 * max(kc, 1)))))  # rows per block of the column-block maxima
    ik = _key_dtype(C)
    Ck = C.view(ik)
    kmin, kmax = np.iinfo(ik).min, np.iinfo(ik).max
    nrb = -(-n // RB)
    cm = np.full((nrb, m), kmin, ik)
    row_cand = np.empty((n, kr), np.int32)
    T = max(1, min(threads, nrb, (n * m) // (1 << 18)))
    bounds = _splits(n, T, RB)
    lohi = np.empty((T, 2), ik)
    lohi[:, 0], lohi[:, 1] = kmax, kmin
    _parallel(lambda t: K.dense_pass(Ck, bounds[t], bounds[t + 1], B, RB, kr, cm, row_cand, lohi[t], ik(kmin)), T)
    lo, hi = _keys_to_floats(np.array([lohi[:, 0].min(), lohi[:, 1].max()], ik), C.dtype)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise AssignmentInputError("score matrix contains NaN or infinite values; replace them before matching")
    col_cand = np.empty((m, kc), np.int32)
    if kc > 0:
        Tc = max(1, min(threads, m // 1024))
        cb = _splits(m, Tc)
        _parallel(lambda t: K.col_topk(Ck, cm, RB, kc, ik(kmin), cb[t], cb[t + 1], col_cand), Tc)
    return row_cand, col_cand, float(lo), float(hi)


class _Checker:
    """Dense dual check of selected rows, split over threads; keeps per-row results between rounds."""

    def __init__(self, K: Any, C: np.ndarray, threads: int, cabs: float):
        n, m = C.shape
        self.K, self.C, self.threads, self.cabs = K, C, threads, cabs
        self.Ck_proto = np.zeros(1, _key_dtype(C))
        self.cap = min(_VIOL_CAP, m)
        self.viol = np.zeros(n)
        self.slack = np.zeros(n)  # -(largest reduced cost off the matched column) at the last check
        self.u_checked = np.zeros(n)  # row potential at the last check
        self.vcols = np.full((n, self.cap), -1, np.int32)
        self.vcount = np.zeros(n, np.int64)
        self.ulp = 2.0**-22 if C.dtype == np.float32 else 2.0**-50

    def run(self, rows: np.ndarray, uu: np.ndarray, vv: np.ndarray, col4row: np.ndarray, tau: float,
            indptr: np.ndarray, indices: np.ndarray) -> None:
        """Recompute viol/slack/vcols/vcount for `rows` against duals (uu, vv), off the sparse graph."""
        m = self.C.shape[1]
        vcast = vv.astype(self.C.dtype)
        margin = self.ulp * (2.0 * float(np.abs(vv).max(initial=0.0)) + float(np.abs(uu).max()) + self.cabs)
        margin = max(margin, tau)
        T = max(1, min(self.threads, (rows.size * m) // (1 << 20)))
        bounds = _splits(rows.size, T)
        self.vcols[rows] = -1
        self.vcount[rows] = 0
        K, C, proto = self.K, self.C, self.Ck_proto
        _parallel(
            lambda t: K.check_rows(C, proto, uu, vv, vcast, col4row, indptr, indices, margin, tau, self.cap,
                                   rows[bounds[t]:bounds[t + 1]], self.viol, self.slack, self.vcols, self.vcount),
            T,
        )
        self.u_checked[rows] = uu[rows]

    def stale(self, uu: np.ndarray, vv: np.ndarray, col4row: np.ndarray, tau: float) -> np.ndarray:
        """Rows whose last check no longer bounds their violations; refresh viol of the others (a valid bound).

        Column potentials only rise between checks of a warm-started square problem, so a row whose potential
        fell by delta since its check can have reduced cost at most delta - slack off the sparse graph.
        """
        n = uu.size
        drop = self.u_checked - uu
        bound = drop - self.slack
        tight = self.C[np.arange(n), col4row].astype(np.float64) - uu - vv[col4row]
        self.viol = np.maximum(bound, tight)
        return np.flatnonzero(bound > tau)


def _sparse_certified(C: np.ndarray):
    """Sparse shortest-augmenting-path solve + dense dual certificate; None if it must fall back to scipy."""
    K = _load_kernels()
    n, m = C.shape  # n <= m
    threads = _n_threads()
    square = n == m
    kr, kc = min(_ROW_K, m), min(_COL_K, n)
    row_cand, col_cand, cmin, cmax = _candidates(K, C, kr, kc, threads)
    cabs = max(abs(cmin), abs(cmax))
    checker = _Checker(K, C, threads, cabs)
    extra_r: list[np.ndarray] = []
    extra_c: list[np.ndarray] = []
    u = np.zeros(n)
    v = np.zeros(m)
    col4row = np.full(n, -1, np.int32)
    row4col = np.full(m, -1, np.int32)
    todo = np.arange(n, dtype=np.int32)
    recheck = np.arange(n, dtype=np.int64)
    rows = np.arange(n)
    failures = np.zeros(n, np.int32)
    added = 0
    for rounds in range(1, _MAX_ROUNDS + 1):
        er = np.concatenate(extra_r) if extra_r else np.zeros(0, np.int32)
        ec = np.concatenate(extra_c) if extra_c else np.zeros(0, np.int32)
        indptr, indices = K.build_csr(n, m, row_cand, col_cand, er, ec)
        cost = K.gather_costs(C, indptr, indices, -1.0)
        if _ARR_PASSES and todo.size:
            todo = K.reduce_rows(indptr, indices, cost, m, u, v, col4row, row4col, todo, _ARR_PASSES)
        if _TIGHT_PHASES and todo.size:
            todo = K.tight_augment(indptr, indices, cost, m, u, v, col4row, row4col, todo, _TIGHT_PHASES)
        while todo.size:
            todo = K.sap_solve(indptr, indices, cost, m, u, v, col4row, row4col, todo)
            if todo.size == 0:
                break
            # rows with no augmenting path in the sparse graph: widen them (pseudo-random columns first, then
            # whole rows), unless that makes the graph too dense to be worth it
            whole = failures[todo] > 0
            added += int((~whole).sum()) * min(_FAIL_K, m) + int(whole.sum()) * m
            if added > _FAIL_BUDGET * max(indices.size, 1024):
                return None
            failures[todo] += 1
            rng = np.random.default_rng([n, m, added])
            extra_r.append(np.repeat(todo[~whole], _FAIL_K))
            extra_c.append(rng.integers(0, m, size=int((~whole).sum()) * _FAIL_K).astype(np.int32))
            extra_r.append(np.repeat(todo[whole], m))
            extra_c.append(np.tile(np.arange(m, dtype=np.int32), int(whole.sum())))
            indptr, indices = K.build_csr(n, m, row_cand, col_cand, np.concatenate(extra_r), np.concatenate(extra_c))
            cost = K.gather_costs(C, indptr, indices, -1.0)
        if _LOWER_PRICES and recheck.size == n:  # full check ahead: first move to the lowest optimal prices
            K.lower_prices(indptr, indices, cost, m, u, v, col4row, row4col)
        # maximisation duals: C[i, j] <= uu[i] + vv[j], vv >= 0 (rectangular), vv = 0 on unmatched columns
        uu = -u
        vv = -v if square else np.maximum(-v, 0.0)
        if not square:
            vv[row4col < 0] = 0.0
        scale = max(cabs, float(np.abs(uu).max()), float(np.abs(vv).max()))
        tau = _TAU * scale
        if rounds > 1 and square:  # warm start: only re-solved rows and rows whose potential fell too far
            recheck = np.union1d(recheck, checker.stale(uu, vv, col4row, tau))
        checker.run(recheck.astype(np.int64), uu, vv, col4row, tau, indptr, indices)
        viol = checker.viol
        primal = float(C[rows, col4row].sum(dtype=np.float64))
        dual = float(uu.sum() + np.maximum(viol, 0.0).sum() + vv.sum())
        gap = dual - primal
        if gap <= n * tau + 1e-12 * abs(primal):
            return rows.astype(np.int64), col4row.astype(np.int64), "sparse-certified", True, rounds, max(gap, 0.0)
        bad = np.flatnonzero(viol > tau)
        if bad.size == 0:
            break  # gap not explained by violations (numerical trouble): fall back
        sel = checker.vcols[bad]
        mask = sel >= 0
        extra_r.append(np.repeat(bad.astype(np.int32), mask.sum(axis=1)))
        extra_c.append(sel[mask].astype(np.int32))
        if square:  # warm start: free the rows that gained edges; the solver resets their potentials
            row4col[col4row[bad]] = -1
            col4row[bad] = -1
            todo = bad.astype(np.int32)
            recheck = bad.astype(np.int64)
        else:  # rectangular: freed columns would keep v > 0, so re-solve from scratch
            u[:] = 0.0
            v[:] = 0.0
            col4row[:] = -1
            row4col[:] = -1
            todo = np.arange(n, dtype=np.int32)
            recheck = np.arange(n, dtype=np.int64)
    return None


def _set_worker_threads() -> None:
    """Process-pool initialiser: one thread per worker process."""
    global _threads_override
    _threads_override = 1
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency, but the solver does not need it
        return
    torch.set_num_threads(1)


def _solve_one(item: Any, maximize: bool, method: str) -> Assignment:
    """Worker body: materialise the matrix (calling it if it is a callable) and solve it."""
    if callable(item):
        item = item()
    return linear_assignment(item, maximize=maximize, method=method)


def many_assignments(
    matrices: Iterable[Any] | Sequence[Any],
    workers: int | None = None,
    progress: bool = True,
    *,
    maximize: bool = True,
    method: str = "auto",
) -> list[Assignment]:
    """Solve many problems (matrices or picklable zero-argument callables returning one) in order, in parallel."""
    from tqdm.auto import tqdm

    total = len(matrices) if hasattr(matrices, "__len__") else None  # type: ignore[arg-type]
    workers = _n_threads() if workers is None else int(workers)
    bar = tqdm(total=total, disable=not progress, desc="assignments", unit="pair")
    results: list[Assignment] = []
    try:
        if workers <= 1:
            for item in matrices:
                results.append(_solve_one(item, maximize, method))
                bar.update(1)
            return results
        import multiprocessing as mp

        pending: dict[int, Any] = {}
        done: dict[int, Assignment] = {}
        next_out = 0
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_set_worker_threads) as pool:
            def drain(limit: int) -> None:
                nonlocal next_out
                while len(pending) > limit:
                    idx = min(pending)
                    done[idx] = pending.pop(idx).result()
                    bar.update(1)
                while next_out in done:
                    results.append(done.pop(next_out))
                    next_out += 1

            for idx, item in enumerate(matrices):
                if not callable(item):
                    item = _as_matrix(item)
                pending[idx] = pool.submit(_solve_one, item, maximize, method)
                drain(2 * workers)
            drain(0)
        return results
    finally:
        bar.close()
