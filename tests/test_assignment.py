"""Tests of moescope.static.assignment: exact optimality against scipy, validity, determinism, fallbacks."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from moescope.static import assignment as A
from moescope.static.assignment import (
    Assignment,
    AssignmentInputError,
    linear_assignment,
    many_assignments,
)

NEEDS_NUMBA = pytest.mark.skipif(not A.compiled_available(), reason="numba kernels unavailable")


def scipy_total(c: np.ndarray, maximize: bool = True) -> float:
    """Optimal total according to scipy."""
    r, k = linear_sum_assignment(c, maximize=maximize)
    return float(np.asarray(c, np.float64)[r, k].sum())


def matrix(kind: str, n: int, m: int, seed: int, dtype=np.float32) -> np.ndarray:
    """Random test matrices: uniform, structured (noisy permutation / cosine of permuted experts), tie-heavy."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        c = rng.uniform(-1, 1, (n, m))
    elif kind == "permuted":  # close to a permutation matrix
        c = rng.normal(0, 0.05, (n, m))
        perm = rng.permutation(max(n, m))
        if n <= m:
            c[np.arange(n), perm[:n]] += 1.0
        else:
            c[perm[:m], np.arange(m)] += 1.0
    elif kind == "cosine":  # two "experts" sharing a permuted base, plus noise
        d = 32
        base = rng.normal(size=(max(n, m), d))
        a = base[:n] + 2.0 * rng.normal(size=(n, d))
        b = base[rng.permutation(max(n, m))[:m]] + 2.0 * rng.normal(size=(m, d))
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        c = a @ b.T
    elif kind == "ties":
        c = np.round(rng.uniform(-1, 1, (n, m)) * 2) / 2
    elif kind == "additive":  # every assignment is optimal: stresses the sparse graph's feasibility handling
        c = rng.uniform(-1, 1, (n, 1)) + rng.uniform(-1, 1, (1, m))
    elif kind == "constant":
        c = np.full((n, m), 0.25)
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(c, dtype=dtype)


def check_valid(res: Assignment, n: int, m: int) -> None:
    """Rows sorted 0..n-1 (or all rows hit when n > m), columns distinct and in range."""
    k = min(n, m)
    assert res.row_ind.shape == res.col_ind.shape == (k,)
    assert res.row_ind.dtype == res.col_ind.dtype == np.int64
    assert np.all(np.diff(res.row_ind) > 0) and res.row_ind.min() >= 0 and res.row_ind.max() < n
    assert len(np.unique(res.col_ind)) == k and res.col_ind.min() >= 0 and res.col_ind.max() < m
    if n <= m:
        np.testing.assert_array_equal(res.row_ind, np.arange(n))


def check_optimal(c: np.ndarray, res: Assignment, maximize: bool = True) -> None:
    """Total equals scipy's optimum within 1e-9 relative and matches the returned pairs."""
    ref = scipy_total(c, maximize)
    own = float(np.asarray(c, np.float64)[res.row_ind, res.col_ind].sum())
    assert res.total == pytest.approx(own, rel=1e-12, abs=1e-12)
    assert abs(res.total - ref) <= 1e-9 * max(1.0, abs(ref)), (res.total, ref, res.solver)


KINDS = ["uniform", "permuted", "cosine", "ties", "additive", "constant"]


@NEEDS_NUMBA
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 48), m=st.integers(2, 48), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_small_matches_scipy(n, m, kind, seed, dtype):
    c = matrix(kind, n, m, seed, dtype)
    res = linear_assignment(c, method="sparse")
    check_valid(res, n, m)
    check_optimal(c, res)
    assert res.solver == "sparse-certified" and res.certified and res.gap >= 0.0


@NEEDS_NUMBA
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(64, 400), extra=st.integers(0, 300), transpose=st.booleans(),
    kind=st.sampled_from(KINDS[:4]), seed=st.integers(0, 2**31 - 1),
)
def test_medium_matches_scipy(n, extra, transpose, kind, seed):
    shape = (n + extra, n) if transpose else (n, n + extra)
    c = matrix(kind, *shape, seed)
    res = linear_assignment(c, method="sparse")
    check_valid(res, *shape)
    check_optimal(c, res)
    assert res.certified


@NEEDS_NUMBA
@pytest.mark.parametrize(
    "kind,n,m",
    [("uniform", 1024, 1024), ("cosine", 1024, 1024), ("ties", 1024, 1024), ("permuted", 2048, 2048),
     ("cosine", 700, 1500), ("uniform", 1500, 700), ("additive", 600, 600)],
)
def test_large_matches_scipy(kind, n, m):
    c = matrix(kind, n, m, seed=n + m)
    res = linear_assignment(c)
    check_valid(res, n, m)
    check_optimal(c, res)
    assert res.solver in ("sparse-certified", "scipy")
    if kind != "additive":
        assert res.solver == "sparse-certified"


@NEEDS_NUMBA
@pytest.mark.parametrize("n,m", [(300, 300), (200, 450), (450, 200)])
def test_planted_permutation_recovered(n, m):
    rng = np.random.default_rng(7)
    k = min(n, m)
    rows = rng.permutation(n)[:k]
    cols = rng.permutation(m)[:k]
    c = rng.uniform(-0.3, 0.3, (n, m)).astype(np.float32)
    c[rows, cols] = 1.0
    res = linear_assignment(c, method="sparse")
    check_valid(res, n, m)
    got = dict(zip(res.row_ind.tolist(), res.col_ind.tolist(), strict=True))
    assert got == dict(zip(rows.tolist(), cols.tolist(), strict=True))


@NEEDS_NUMBA
@pytest.mark.parametrize("kind", ["ties", "cosine", "constant"])
def test_deterministic_across_calls_and_threads(kind):
    c = matrix(kind, 900, 900, seed=3)
    first = linear_assignment(c)
    again = linear_assignment(c.copy())
    old = A._threads_override
    try:
        A._threads_override = 1
        single = linear_assignment(c)
        A._threads_override = 2
        double = linear_assignment(c)
    finally:
        A._threads_override = old
    for other in (again, single, double):
        np.testing.assert_array_equal(first.col_ind, other.col_ind)
        assert first.total == other.total


def test_minimize_and_input_types():
    c = matrix("uniform", 40, 55, seed=1, dtype=np.float64)
    res = linear_assignment(c, maximize=False)
    check_valid(res, 40, 55)
    check_optimal(c, res, maximize=False)
    t = torch.from_numpy(c.T.copy())
    res_t = linear_assignment(t, maximize=False)
    check_valid(res_t, 55, 40)
    check_optimal(c.T, res_t, maximize=False)
    half = torch.from_numpy(c.astype(np.float32)).to(torch.bfloat16)
    res_h = linear_assignment(half)
    check_optimal(half.float().numpy(), res_h)
    ints = (c * 100).astype(np.int64)
    check_optimal(ints, linear_assignment(ints))
    check_optimal(c[:, :1], linear_assignment(c[:, :1]))
    listed = linear_assignment([[1.0, 2.0], [3.0, 1.0]])
    assert listed.col_ind.tolist() == [1, 0] and listed.total == 5.0


@NEEDS_NUMBA
def test_torch_input_sparse_path():
    c = matrix("cosine", 300, 420, seed=9)
    res = linear_assignment(torch.from_numpy(c).T, method="sparse")  # non-contiguous, n > m
    check_valid(res, 420, 300)
    check_optimal(c.T, res)
    assert res.solver == "sparse-certified"


def test_auto_small_uses_scipy_and_empty():
    res = linear_assignment(np.eye(3))
    assert res.solver == "scipy" and res.total == 3.0 and not res.certified
    forced = linear_assignment(np.eye(3), method="scipy")
    np.testing.assert_array_equal(forced.col_ind, [0, 1, 2])
    empty = linear_assignment(np.zeros((0, 5)))
    assert empty.row_ind.size == 0 and empty.total == 0.0


@pytest.mark.parametrize("bad", [np.array([[1.0, np.nan], [0.0, 1.0]]), np.array([[np.inf, 0.0], [0.0, 1.0]])])
@pytest.mark.parametrize("method", ["sparse", "scipy"])
def test_rejects_non_finite(bad, method):
    big = np.zeros((80, 80))
    big[:2, :2] = bad
    with pytest.raises(AssignmentInputError):
        linear_assignment(big, method=method)


def test_rejects_bad_shape_and_method():
    with pytest.raises(AssignmentInputError):
        linear_assignment(np.zeros(5))
    with pytest.raises(AssignmentInputError):
        linear_assignment(np.zeros((3, 3)), method="hungarian")
    with pytest.raises(AssignmentInputError):
        linear_assignment(np.array([["a", "b"]]))


def test_falls_back_to_scipy_without_kernels(monkeypatch):
    monkeypatch.setattr(A, "_load_kernels", lambda: None)
    c = matrix("cosine", 120, 150, seed=5)
    res = linear_assignment(c, method="sparse")
    assert res.solver == "scipy" and not res.certified and res.rounds == 0
    check_optimal(c, res)


@NEEDS_NUMBA
def test_falls_back_to_scipy_when_certification_does_not_converge(monkeypatch):
    monkeypatch.setattr(A, "_MAX_ROUNDS", 0)
    c = matrix("uniform", 100, 100, seed=2)
    res = linear_assignment(c, method="sparse")
    assert res.solver == "scipy"
    check_optimal(c, res)


@NEEDS_NUMBA
def test_widening_rows_the_sparse_graph_cannot_match(monkeypatch):
    # one candidate per row and none per column: most rows collide, so the solver must widen them
    monkeypatch.setattr(A, "_ROW_K", 1)
    monkeypatch.setattr(A, "_COL_K", 0)
    monkeypatch.setattr(A, "_FAIL_BUDGET", 10.0)
    c = matrix("additive", 150, 150, seed=4)
    res = linear_assignment(c, method="sparse")
    assert res.solver == "sparse-certified"
    check_optimal(c, res)


def test_many_assignments_serial_and_pool():
    mats = [matrix(k, 60 + 10 * i, 70, seed=i) for i, k in enumerate(["uniform", "cosine", "ties", "permuted"])]
    serial = many_assignments(mats, workers=1, progress=False, method="sparse")
    lazy = [functools.partial(matrix, k, 60 + 10 * i, 70, i) for i, k in enumerate(["uniform", "cosine"])]
    pooled = many_assignments(iter(mats + lazy), workers=2, progress=False, method="sparse")
    assert len(pooled) == len(mats) + len(lazy)
    np.testing.assert_array_equal(pooled[-1].col_ind, serial[1].col_ind)  # a callable is materialised in the worker
    pooled = pooled[: len(mats)]
    assert len(serial) == len(pooled) == len(mats)
    for c, a, b in zip(mats, serial, pooled, strict=True):
        check_optimal(c, a)
        np.testing.assert_array_equal(a.col_ind, b.col_ind)


@NEEDS_NUMBA
def test_falls_back_to_scipy_when_the_jit_fails(monkeypatch):
    from numba.core.errors import TypingError

    monkeypatch.setattr(A, "_kernels", A._kernels)  # restored after the test
    monkeypatch.setattr(A, "_kernels_error", A._kernels_error)

    def broken(work):
        raise TypingError("simulated compilation failure")

    monkeypatch.setattr(A, "_sparse_certified", broken)
    c = matrix("uniform", 600, 600, seed=8)
    with pytest.warns(UserWarning, match="numba kernels failed"):
        res = linear_assignment(c)
    assert res.solver == "scipy" and not A.compiled_available()
    check_optimal(c, res)
