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
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import MoescopeError

__all__ = ["Assignment", "AssignmentInputError", "linear_assignment", "many_assignments", "compiled_available"]

_BIG_INDEX = np.iinfo(np.int32).max
_METHODS = ("auto", "sparse", "scipy")
_SMALL = 64 * 64  # below this many entries "auto" just calls scipy
_ROW_K = 16  # candidates per row
_COL_K = 4  # candidates per column (keeps every column reachable)
_MAX_ROUNDS = 8
_VIOL_CAP = 32  # most-violated entries added per row per round
_TAU = 1e-12  # violation tolerance, relative to the problem's scale
_threads_override: int | None = None
_kernels: Any = None
_kernels_error: str | None = None
_kernels_lock = threading.Lock()


class AssignmentInputError(MoescopeError, ValueError):
    """The score matrix is not a finite 2-D real matrix."""


@dataclass(frozen=True)
class Assignment:
    """One-to-one assignment: row_ind[k] is matched to col_ind[k]; rows sorted; total in float64."""

    row_ind: np.ndarray
    col_ind: np.ndarray
    total: float
    solver: str
    certified: bool
    rounds: int
    gap: float = float("nan")


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
            except Exception as exc:  # numba missing or broken: fall back to scipy
                _kernels_error = f"{type(exc).__name__}: {exc}"
    return _kernels


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
    arr = np.ascontiguousarray(arr)
    if arr.size and not np.isfinite(arr).all():
        raise AssignmentInputError("score matrix contains NaN or infinite values; replace them before matching")
    return arr


def linear_assignment(score: Any, *, maximize: bool = True, method: str = "auto") -> Assignment:
    """Optimal one-to-one assignment of score (n x m, numpy or torch), like scipy's linear_sum_assignment."""
    if method not in _METHODS:
        raise AssignmentInputError(f"method must be one of {_METHODS}, got {method!r}")
    C = _as_matrix(score)
    n, m = C.shape
    if n == 0 or m == 0:
        empty = np.zeros(0, np.int64)
        return Assignment(empty, empty.copy(), 0.0, "trivial", True, 0, 0.0)
    work = C if maximize else np.negative(C)
    transposed = n > m
    if transposed:
        work = np.ascontiguousarray(work.T)
    use_sparse = method == "sparse" or (method == "auto" and n * m >= _SMALL)
    result = None
    if use_sparse and _load_kernels() is not None:
        result = _sparse_certified(work)
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


def _scipy_solve(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense maximisation with scipy.optimize.linear_sum_assignment."""
    from scipy.optimize import linear_sum_assignment

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


def _candidates(K: Any, C: np.ndarray, kr: int, kc: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-kr columns of every row and top-kc rows of every column, in one pass over C."""
    n, m = C.shape
    T = max(1, min(threads, m // 512))
    rv = np.full((T, n, kr), -np.inf)
    ri = np.full((T, n, kr), _BIG_INDEX, np.int32)
    cv = np.full((m, kc), -np.inf)
    ci = np.full((m, kc), _BIG_INDEX, np.int32)
    cthr = np.full(m, -np.inf)
    bounds = np.linspace(0, m, T + 1).astype(np.int64)
    _parallel(lambda t: K.candidates_stripe(C, bounds[t], bounds[t + 1], kr, kc, rv[t], ri[t], cv, ci, cthr), T)
    row_cand = K.merge_row_heaps(rv, ri, kr) if T > 1 else ri[0]
    return row_cand, ci


def _check(K: Any, C: np.ndarray, u: np.ndarray, v: np.ndarray, tau: float, threads: int):
    """Per-row maximum reduced cost and the most violated columns of each violating row."""
    n, m = C.shape
    T = max(1, min(threads, (n * m) // (1 << 18)))
    viol = np.empty(n)
    cap = min(_VIOL_CAP, m)
    vcols = np.full((n, cap), -1, np.int32)
    vcount = np.zeros(n, np.int64)
    bounds = np.linspace(0, n, T + 1).astype(np.int64)
    _parallel(lambda t: K.check_rows(C, u, v, tau, cap, bounds[t], bounds[t + 1], viol, vcols, vcount), T)
    return viol, vcols, vcount


def _sparse_certified(C: np.ndarray):
    """Sparse shortest-augmenting-path solve + dense dual certificate; None if it must fall back to scipy."""
    K = _load_kernels()
    n, m = C.shape  # n <= m
    threads = _n_threads()
    square = n == m
    kr, kc = min(_ROW_K, m), min(_COL_K, n)
    row_cand, col_cand = _candidates(K, C, kr, kc, threads)
    extra_r: list[np.ndarray] = []
    extra_c: list[np.ndarray] = []
    u = np.zeros(n)
    v = np.zeros(m)
    col4row = np.full(n, -1, np.int32)
    row4col = np.full(m, -1, np.int32)
    todo = np.arange(n, dtype=np.int32)
    for rounds in range(1, _MAX_ROUNDS + 1):
        er = np.concatenate(extra_r) if extra_r else np.zeros(0, np.int32)
        ec = np.concatenate(extra_c) if extra_c else np.zeros(0, np.int32)
        indptr, indices = K.build_csr(n, m, row_cand, col_cand, er, ec)
        cost = K.gather_costs(C, indptr, indices, -1.0)
        while todo.size:
            failed = K.sap_solve(indptr, indices, cost, m, u, v, col4row, row4col, todo)
            if failed < 0:
                break
            r = int(todo[failed])  # no augmenting path in the sparse graph: give this row every column
            extra_r.append(np.full(m, r, np.int32))
            extra_c.append(np.arange(m, dtype=np.int32))
            todo = todo[failed:]
            indptr, indices = K.build_csr(n, m, row_cand, col_cand, np.concatenate(extra_r), np.concatenate(extra_c))
            cost = K.gather_costs(C, indptr, indices, -1.0)
        # maximisation duals: C[i, j] <= uu[i] + vv[j], vv >= 0 (rectangular), vv = 0 on unmatched columns
        uu = -u
        vv = -v if square else np.maximum(-v, 0.0)
        if not square:
            vv[row4col < 0] = 0.0
        scale = max(float(np.abs(cost).max(initial=0.0)), float(np.abs(uu).max()), float(np.abs(vv).max()))
        tau = _TAU * scale
        viol, vcols, vcount = _check(K, C, uu, vv, tau, threads)
        rows = np.arange(n)
        primal = float(C[rows, col4row].sum(dtype=np.float64))
        dual = float(uu.sum() + np.maximum(viol, 0.0).sum() + vv.sum())
        gap = dual - primal
        if gap <= n * tau + 1e-12 * abs(primal):
            return rows.astype(np.int64), col4row.astype(np.int64), "sparse-certified", True, rounds, max(gap, 0.0)
        bad = np.flatnonzero(viol > tau)
        if bad.size == 0:
            break  # gap not explained by violations (numerical trouble): fall back
        sel = vcols[bad]
        mask = sel >= 0
        extra_r.append(np.repeat(bad.astype(np.int32), mask.sum(axis=1)))
        extra_c.append(sel[mask].astype(np.int32))
        if square:  # warm start: free the rows that gained edges; the solver resets their potentials
            row4col[col4row[bad]] = -1
            col4row[bad] = -1
            todo = bad.astype(np.int32)
        else:  # rectangular: freed columns would keep v > 0, so re-solve from scratch
            u[:] = 0.0
            v[:] = 0.0
            col4row[:] = -1
            row4col[:] = -1
            todo = np.arange(n, dtype=np.int32)
    return None


def _set_worker_threads() -> None:
    """Process-pool initialiser: one thread per worker process."""
    global _threads_override
    _threads_override = 1
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # pragma: no cover - torch is a dependency, but the solver does not need it
        pass


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
