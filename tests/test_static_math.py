"""Static-analysis math checked against independent numpy implementations of the definitions."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moescope.static import (averaged_similarity, averaged_vectors, cosine_matrix, gate_embedding_similarity,
                             gate_expert_regression, kendall_tau_b, matrix_pca, matrix_similarity, member_similarity,
                             neuron_cosine, neuron_pca, neuron_points, neuron_vectors, pca_points, reorder_pair,
                             similarity_regression, solve_assignment, standardize)
import moescope.static.similarity as similarity_module

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------- independent numpy references
def np_cos(u: np.ndarray, v: np.ndarray) -> float:
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    return 0.0 if nu == 0 or nv == 0 else float(np.dot(u.ravel(), v.ravel()) / (nu * nv))


def np_cos_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([[np_cos(a, b) for b in y] for a in x])


def np_neurons(w: np.ndarray, matrix: str) -> np.ndarray:
    return w.T if matrix == "down" else w


def np_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    iu = np.triu_indices(n, 1)
    dx, dy = np.sign(x[:, None] - x[None, :])[iu], np.sign(y[:, None] - y[None, :])[iu]
    n0 = n * (n - 1) / 2
    denom = math.sqrt((n0 - np.sum(dx == 0)) * (n0 - np.sum(dy == 0)))
    return float(np.sum(dx * dy) / denom) if denom > 0 else math.nan


def brute_assignment(c: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """Best injective map rows -> columns (rows <= columns) by enumeration."""
    best = max(itertools.permutations(range(c.shape[1]), c.shape[0]),
               key=lambda p: sum(c[i, p[i]] for i in range(c.shape[0])))
    return sum(c[i, best[i]] for i in range(c.shape[0])), best


def np_pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    std = x.std(0, ddof=1)
    const = x.max(0) == x.min(0)
    std[const] = 1.0
    z = (x - x.mean(0)) / std
    z[:, const] = 0.0
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    coords = z @ vt[:k].T
    for j in range(k):
        if vt[j, np.argmax(np.abs(vt[j]))] < 0:
            coords[:, j] *= -1
    return coords, s[:k] ** 2 / np.sum(s**2)


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def make_matrix(neurons: np.ndarray, matrix: str) -> np.ndarray:
    """Canonical matrix from neuron vectors [n, H]: gate/up [n, H], down [H, n]."""
    return neurons.T.copy() if matrix == "down" else neurons


# ---------------------------------------------------------------- similarity
@SETTINGS
@given(seeds, st.integers(1, 5), st.integers(1, 5), st.integers(1, 7))
def test_cosine_matrix_matches_numpy(seed, n, m, d):
    rng = np.random.default_rng(seed)
    x, y = rand(rng, n, d), rand(rng, m, d)
    np.testing.assert_allclose(cosine_matrix(t(x), t(y), dtype=F64).numpy(), np_cos_matrix(x, y), atol=1e-12)
    own = cosine_matrix(t(x), dtype=F64).numpy()
    np.testing.assert_allclose(own, np_cos_matrix(x, x), atol=1e-12)
    np.testing.assert_allclose(np.diag(own), 1.0, atol=1e-12)
    np.testing.assert_array_equal(own, own.T)


def test_cosine_zero_vector_is_zero_and_float32_default():
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    c = cosine_matrix(x)
    assert c.dtype == torch.float32
    assert c[0].tolist() == [0.0, 0.0] and c[1, 1] == pytest.approx(1.0)
    y = torch.tensor([[3.0, 4.0]])
    cosine_matrix(y.double(), y)
    assert y.tolist() == [[3.0, 4.0]]  # inputs are never normalised in place


@SETTINGS
@given(seeds, st.integers(1, 5), st.integers(1, 6), st.integers(1, 6), st.sampled_from(["gate", "up", "down"]))
def test_matrix_and_averaged_similarity(seed, m, i, h, matrix):
    rng = np.random.default_rng(seed)
    stack = rand(rng, m, *((h, i) if matrix == "down" else (i, h)))
    sim = matrix_similarity(t(stack), dtype=F64).numpy()
    np.testing.assert_allclose(sim, np_cos_matrix(stack.reshape(m, -1), stack.reshape(m, -1)), atol=1e-12)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-12)
    np.testing.assert_array_equal(sim, sim.T)
    avg = np.stack([np_neurons(w, matrix).mean(0) for w in stack])  # mean over neurons -> [m, h]
    np.testing.assert_allclose(averaged_vectors(t(stack), matrix, dtype=F64).numpy(), avg, atol=1e-12)
    np.testing.assert_allclose(averaged_similarity(t(stack), matrix, dtype=F64).numpy(), np_cos_matrix(avg, avg),
                               atol=1e-12)


def test_similarity_float32_close_to_float64_and_bfloat16_input():
    rng = np.random.default_rng(0)
    stack = rand(rng, 4, 64, 48)
    ref = np_cos_matrix(stack.reshape(4, -1), stack.reshape(4, -1))
    got = matrix_similarity(t(stack).float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-5)
    bf = t(stack).bfloat16()
    ref_bf = bf.double().reshape(4, -1).numpy()
    np.testing.assert_allclose(matrix_similarity(bf, dtype=F64).numpy(), np_cos_matrix(ref_bf, ref_bf), atol=1e-12)


def test_long_dot_products_accumulate_in_float64_blocks(monkeypatch):
    rng = np.random.default_rng(2)
    x = rand(rng, 3, 50)
    monkeypatch.setattr(similarity_module, "DIRECT_K", 10)
    monkeypatch.setattr(similarity_module, "BLOCK_ELEMS", 20)  # blocks of 3-4 columns
    np.testing.assert_allclose(cosine_matrix(t(x), t(x[:2]), dtype=F64).numpy(), np_cos_matrix(x, x[:2]), atol=1e-12)
    monkeypatch.undo()
    big = torch.from_numpy(rand(rng, 4, 2_000_000)).float()  # 4 flattened 1000 x 2000 matrices
    big[1] = big[0] + 0.1 * big[1]
    c = cosine_matrix(big, big.clone())  # one plain float32 GEMM is off by ~1e-4 here
    ref = matrix_similarity(big, dtype=F64).numpy()
    np.testing.assert_allclose(c.double().numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(np.diag(c.double().numpy()), 1.0, atol=1e-6)


def test_member_similarity_marks_other_shapes_not_comparable():
    rng = np.random.default_rng(1)
    mats = [rand(rng, 4, 3), rand(rng, 4, 3), rand(rng, 8, 3), rand(rng, 4, 3), rand(rng, 8, 3)]
    for averaged in (False, True):
        sim = member_similarity([t(m) for m in mats], "gate", averaged=averaged, dtype=F64).numpy()
        for a, b in itertools.product(range(5), repeat=2):
            if mats[a].shape != mats[b].shape:
                assert math.isnan(sim[a, b])
            else:
                u, v = (mats[a].mean(0), mats[b].mean(0)) if averaged else (mats[a], mats[b])
                assert sim[a, b] == pytest.approx(np_cos(u, v), abs=1e-12)


@SETTINGS
@given(seeds, st.integers(1, 6), st.integers(1, 6), st.integers(1, 5), st.sampled_from(["gate", "down"]))
def test_neuron_cosine_matches_numpy(seed, na, nb, h, matrix):
    rng = np.random.default_rng(seed)
    va, vb = rand(rng, na, h), rand(rng, nb, h)
    wa, wb = make_matrix(va, matrix), make_matrix(vb, matrix)
    np.testing.assert_array_equal(neuron_vectors(t(wa), matrix).numpy(), va)
    np.testing.assert_allclose(neuron_cosine(t(wa), t(wb), matrix, dtype=F64).numpy(), np_cos_matrix(va, vb),
                               atol=1e-12)


def test_shape_errors():
    with pytest.raises(ValueError, match="matrix must be one of"):
        neuron_vectors(torch.zeros(2, 3), "w1")
    with pytest.raises(ValueError, match="hidden sizes"):
        neuron_cosine(torch.zeros(4, 3), torch.zeros(4, 5), "gate")
    with pytest.raises(ValueError, match=r"\[M, I, H\]"):
        averaged_vectors(torch.zeros(4, 3), "up")
    with pytest.raises(ValueError, match="same D"):
        cosine_matrix(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="compute dtype"):
        matrix_similarity(torch.zeros(2, 3, 3), dtype=torch.float16)
    with pytest.raises(ValueError, match="2-D"):
        reorder_pair(torch.zeros(2, 3, 3), torch.zeros(2, 3), "gate")


# ---------------------------------------------------------------- assignment and Kendall tau-b
@SETTINGS
@given(seeds, st.integers(1, 4), st.integers(0, 2))
def test_solve_assignment_is_optimal(seed, n, extra):
    c = np.random.default_rng(seed).standard_normal((n, n + extra))
    rows, cols = solve_assignment(t(c))
    assert rows.tolist() == list(range(n)) and len(set(cols.tolist())) == n
    best, perm = brute_assignment(c)
    assert c[rows.numpy(), cols.numpy()].sum() == pytest.approx(best, abs=1e-12)
    assert tuple(cols.tolist()) == perm  # random scores: the optimum is unique
    _, cols_min = solve_assignment(t(-c), maximize=False)
    assert cols_min.tolist() == cols.tolist()


def test_solve_assignment_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        solve_assignment(torch.tensor([[1.0, float("nan")]]))


@SETTINGS
@given(st.lists(st.integers(0, 4), min_size=2, max_size=30), st.randoms(use_true_random=False))
def test_kendall_tau_b_with_ties_matches_numpy(xs, rnd):
    ys = [rnd.randint(0, 3) for _ in xs]
    for y in (ys, None):
        ref = np_tau_b(np.array(xs), np.arange(len(xs)) if y is None else np.array(y))
        got = kendall_tau_b(np.array(xs), None if y is None else np.array(y))
        assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref, abs=1e-12)


def test_kendall_tau_extremes():
    assert kendall_tau_b(torch.arange(6)) == pytest.approx(1.0)
    assert kendall_tau_b(torch.arange(6).flip(0)) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau_b(torch.tensor([3])))


# ---------------------------------------------------------------- reordering
@SETTINGS
@given(seeds, st.integers(2, 12), st.sampled_from(["gate", "up", "down"]))
def test_reorder_recovers_planted_permutation(seed, n, matrix):
    rng = np.random.default_rng(seed)
    va = rand(rng, n, 32)
    perm = rng.permutation(n)
    vb = va[perm] + 1e-3 * rand(rng, n, 32)  # neuron r of b is neuron perm[r] of a
    res = reorder_pair(t(make_matrix(va, matrix)), t(make_matrix(vb, matrix)), matrix, dtype=F64)
    inv = np.argsort(perm)
    assert res.side == "a" and (res.n_a, res.n_b) == (n, n)
    assert res.col.tolist() == inv.tolist()
    assert res.tau == pytest.approx(np_tau_b(inv, np.arange(n)), abs=1e-12)
    c = np_cos_matrix(va, vb)
    np.testing.assert_allclose(res.matched_cos.numpy(), c[np.arange(n), inv], atol=1e-12)
    assert res.mean_matched == pytest.approx(c[np.arange(n), inv].mean(), abs=1e-12)
    b_perm = make_matrix(vb[inv], matrix)  # b's neurons permuted into a's order, canonical orientation
    assert res.cosine == pytest.approx(np_cos(make_matrix(va, matrix), b_perm), abs=1e-12)
    assert res.cosine > 0.999


@SETTINGS
@given(seeds, st.integers(1, 6), st.integers(1, 6), st.sampled_from(["gate", "down"]))
def test_reorder_rectangular_both_sides(seed, n_small, extra, matrix):
    rng = np.random.default_rng(seed)
    wide = rand(rng, n_small + extra, 24)
    sel = rng.choice(n_small + extra, n_small, replace=False)
    narrow = wide[sel] + 1e-3 * rand(rng, n_small, 24)
    for a, b, side in ((narrow, wide, "a"), (wide, narrow, "b")):
        res = reorder_pair(t(make_matrix(a, matrix)), t(make_matrix(b, matrix)), matrix, dtype=F64)
        assert res.side == side and (res.n_a, res.n_b) == (len(a), len(b))
        assert res.col.tolist() == sel.tolist()
        assert res.cosine == pytest.approx(np_cos(narrow, wide[sel]), abs=1e-12)
        ref_tau = np_tau_b(sel, np.arange(n_small))
        assert (math.isnan(res.tau) and math.isnan(ref_tau)) or res.tau == pytest.approx(ref_tau, abs=1e-12)


@SETTINGS
@given(seeds, st.integers(1, 4), st.integers(0, 2))
def test_reorder_random_is_brute_force_optimum(seed, n, extra):
    rng = np.random.default_rng(seed)
    va, vb = rand(rng, n, 5), rand(rng, n + extra, 5)
    res = reorder_pair(t(va), t(vb), "up", dtype=F64)
    best, perm = brute_assignment(np_cos_matrix(va, vb))
    assert res.mean_matched == pytest.approx(best / n, abs=1e-12)
    assert tuple(res.col.tolist()) == perm


def test_reorder_float32_default():
    rng = np.random.default_rng(3)
    va = rand(rng, 40, 16)
    perm = rng.permutation(40)
    res = reorder_pair(t(va).float(), t(va[perm]).float(), "gate")
    assert res.col.tolist() == np.argsort(perm).tolist()
    assert res.cosine == pytest.approx(1.0, abs=1e-5) and res.mean_matched == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- gate embedding regression
@SETTINGS
@given(seeds, st.integers(3, 9), st.integers(2, 6))
def test_regression_matches_numpy(seed, e, h):
    rng = np.random.default_rng(seed)
    router, experts = rand(rng, e, h), rand(rng, e, 6, h)
    g = np_cos_matrix(router, router)
    np.testing.assert_allclose(gate_embedding_similarity(t(router), dtype=F64).numpy(), g, atol=1e-12)
    s = matrix_similarity(t(experts), dtype=F64)
    res = gate_expert_regression(t(router), s, dtype=F64)
    a, b = zip(*[(a, b) for a in range(e) for b in range(e) if a > b])
    x, y = g[a, b], s.numpy()[a, b]
    slope, intercept = np.polyfit(x, y, 1)
    r = np.corrcoef(x, y)[0, 1]
    assert res.n_pairs == e * (e - 1) // 2
    assert sorted(res.gate_pairs.tolist()) == pytest.approx(sorted(x.tolist()), abs=1e-12)
    assert res.r == pytest.approx(r, abs=1e-9) and res.r2 == pytest.approx(r**2, abs=1e-9)
    assert res.slope == pytest.approx(slope, rel=1e-7, abs=1e-9)
    assert res.intercept == pytest.approx(intercept, rel=1e-7, abs=1e-9)


def test_regression_degenerate_and_errors():
    g = torch.ones(3, 3, dtype=F64)
    s = torch.rand(3, 3, dtype=F64)
    res = similarity_regression(s, g)  # G constant over the pairs: no fit
    assert math.isnan(res.r) and math.isnan(res.slope) and math.isnan(res.r2)
    res = similarity_regression(torch.ones(4, 4), torch.rand(4, 4))  # S constant: slope 0, r undefined
    assert res.slope == pytest.approx(0.0) and res.intercept == pytest.approx(1.0) and math.isnan(res.r)
    with pytest.raises(ValueError, match="slice"):
        similarity_regression(torch.rand(5, 5), torch.rand(4, 4))
    bad = torch.rand(3, 3)
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        similarity_regression(bad, torch.rand(3, 3))
    with pytest.raises(ValueError, match=r"\[E, H\]"):
        gate_embedding_similarity(torch.rand(3))


# ---------------------------------------------------------------- PCA
@SETTINGS
@given(seeds, st.integers(3, 12), st.integers(4, 12), st.integers(1, 3), st.booleans())
def test_pca_matches_numpy_svd(seed, n, d, k, with_constant):
    # >= 3 non-constant columns and >= 3 points: with two standardised columns (or two points) every
    # component's largest |entry| is tied, which leaves the sign convention to rounding
    if k > min(n - 1, d):
        k = min(n - 1, d)
    rng = np.random.default_rng(seed)
    x = rand(rng, n, d) * rng.uniform(0.5, 3.0, d) + rng.standard_normal(d)
    if with_constant:
        x[:, 0] = 0.7
    res = pca_points(t(x), k, dtype=F64)
    coords, ratio = np_pca(x, k)
    np.testing.assert_allclose(res.coords.numpy(), coords, atol=1e-8)
    np.testing.assert_allclose(res.explained_variance_ratio.numpy(), ratio, atol=1e-10)
    assert res.explained_variance_ratio.sum() <= 1 + 1e-12
    assert torch.all(res.explained_variance_ratio[:-1] >= res.explained_variance_ratio[1:])


def test_standardize_matches_numpy_and_constant_columns_stay_zero():
    rng = np.random.default_rng(5)
    x = rand(rng, 6, 4)
    x[:, 2] = 0.1  # constant, and not exactly representable: must not be divided by a rounding residue
    x32 = t(x).float()
    before = x32.clone()
    z = standardize(x32)
    assert torch.equal(x32, before)  # the input is never centred in place
    standardize(t(x), dtype=F64)
    assert torch.all(z[:, 2] == 0)
    ref = (x - x.mean(0)) / x.std(0, ddof=1)
    np.testing.assert_allclose(z.double().numpy()[:, [0, 1, 3]], ref[:, [0, 1, 3]], atol=1e-5)
    np.testing.assert_allclose(z.double().numpy()[:, [0, 1, 3]].std(0, ddof=1), 1.0, atol=1e-5)


def test_pca_points_gram_route_with_blocked_signs(monkeypatch):
    rng = np.random.default_rng(6)
    x = rand(rng, 5, 3000)
    coords, ratio = np_pca(x, 3)
    full = pca_points(t(x), 3, dtype=F64)
    monkeypatch.setattr(similarity_module, "BLOCK_ELEMS", 7)  # blocks of one column
    blocked = pca_points(t(x), 3, dtype=F64)
    for res in (full, blocked):
        np.testing.assert_allclose(res.coords.numpy(), coords, atol=1e-8)
        np.testing.assert_allclose(res.explained_variance_ratio.numpy(), ratio, atol=1e-10)
    f32 = pca_points(t(x).float(), 3)
    assert f32.coords.dtype == torch.float32
    np.testing.assert_allclose(f32.coords.double().numpy(), coords, atol=1e-3)


def test_matrix_pca_one_point_per_member():
    rng = np.random.default_rng(7)
    stack = rand(rng, 6, 5, 4)
    res = matrix_pca(t(stack), 2, dtype=F64)
    coords, ratio = np_pca(stack.reshape(6, -1), 2)
    np.testing.assert_allclose(res.coords.numpy(), coords, atol=1e-8)
    np.testing.assert_allclose(res.explained_variance_ratio.numpy(), ratio, atol=1e-10)
    assert res.member.tolist() == list(range(6))
    with pytest.raises(ValueError, match="one shape"):
        matrix_pca([t(stack[0]), torch.zeros(7, 4, dtype=F64)])


@pytest.mark.parametrize("matrix, block", [("gate", None), ("down", 13)])
def test_neuron_pca_member_major_with_mixed_widths(matrix, block, monkeypatch):
    if block:
        monkeypatch.setattr(similarity_module, "BLOCK_ELEMS", block)  # features-Gram accumulated over 2-point blocks
    rng = np.random.default_rng(8)
    neurons = [rand(rng, 5, 6), rand(rng, 5, 6), rand(rng, 9, 6)]  # last: a wider shared expert
    mats = [t(make_matrix(v, matrix)) for v in neurons]
    points, member = neuron_points(mats, matrix)
    np.testing.assert_array_equal(points.numpy(), np.concatenate(neurons))
    assert member.tolist() == [0] * 5 + [1] * 5 + [2] * 9
    res = neuron_pca(mats, matrix, 3, dtype=F64)
    coords, ratio = np_pca(np.concatenate(neurons), 3)
    np.testing.assert_allclose(res.coords.numpy(), coords, atol=1e-8)
    np.testing.assert_allclose(res.explained_variance_ratio.numpy(), ratio, atol=1e-10)
    assert res.member.tolist() == member.tolist()


def test_pca_errors():
    with pytest.raises(ValueError, match="N >= 2"):
        pca_points(torch.rand(1, 4))
    with pytest.raises(ValueError, match="k must be"):
        pca_points(torch.rand(3, 4), 3)
    with pytest.raises(ValueError, match="constant"):
        pca_points(torch.ones(4, 3))


def test_host_buffers_are_reused_smallest_first():
    from moescope.static import reorder

    reorder.release_host_buffers()
    kept = [reorder.take_host_buffer(n) for n in (100, 10, 50)]
    reorder._free_pinned.extend(kept)
    assert reorder.take_host_buffer(40) is kept[2]
    assert reorder.take_host_buffer(40) is kept[0]
    assert reorder.take_host_buffer(40) is not kept[1] and len(reorder._free_pinned) == 1
    reorder.release_host_buffers()
    assert reorder._free_pinned == []
