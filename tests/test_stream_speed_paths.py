"""The compiled matrix-level pass (moescope/static/_stream_kernels.py) against numpy float64 and the torch path.

Every combination that takes a different code path is covered: stored dtypes (bf16 bits, float32, float64,
fp16 and mixed members converted), member counts around the kernels' tiles of four, gate/up and down
orientation, chunks of a few rows (tight budget) and of many, several threads, constant columns and ties in
the sign rule.
"""
import numpy as np
import pytest
import torch

from moescope.static import stream


def np_reference(mats, neuron_axis, k):
    """Cosines, averaged cosines and matrix-level PCA (standardised columns, sign rule) in numpy float64."""
    x = np.stack([np.asarray(m, float).ravel() for m in mats])
    norms = np.linalg.norm(x, axis=1)
    flat = x @ x.T / np.outer(norms, norms)
    avg = np.stack([np.asarray(m, float).mean(axis=neuron_axis) for m in mats])
    anorm = np.linalg.norm(avg, axis=1)
    averaged = avg @ avg.T / np.outer(anorm, anorm)
    if len(mats) < 2:
        return flat, averaged, None, None
    sd = x.std(axis=0, ddof=1)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1)
    z[:, sd == 0] = 0
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    k = min(k, len(mats) - 1)
    coords = u[:, :k] * s[:k]
    for j in range(k):  # the component's (Z^T u_j) entry of largest magnitude, first on ties, made positive
        v = z.T @ u[:, j]
        if v[np.argmax(np.abs(v))] < 0:
            coords[:, j] *= -1
    return flat, averaged, coords, (s ** 2 / (s ** 2).sum())[:k]


def members(n, rows, cols, dtype, seed, constant_columns=True):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mats = [(0.6 * base + torch.randn(rows, cols, generator=g, dtype=torch.float64)) / 10 for _ in range(n)]
    if constant_columns and rows > 2 and cols > 5:
        for m in mats:  # equal entries in every member (constant columns of the flattened matrices)
            m[1, 3] = 0.25
            m[2, :5] = -0.125
    dtypes = dtype if isinstance(dtype, list) else [dtype] * n
    return [m.to(d) for m, d in zip(mats, dtypes)]


def run(mats, neuron_axis, k=3, budget=1 << 20, compiled=True, monkeypatch=None):
    rows, cols = mats[0].shape
    readers = [lambda a, b, m=m: m[a:b] for m in mats]
    if not compiled:
        monkeypatch.setattr(stream, "USE_KERNELS", False)
    try:
        return stream.stream_layer(readers, rows, cols, neuron_axis, k=k, budget_bytes=budget)
    finally:
        if not compiled:
            monkeypatch.setattr(stream, "USE_KERNELS", True)


def check(res, mats, neuron_axis, k=3, tol=1e-9):
    flat, averaged, coords, evr = np_reference([m.double().numpy() for m in mats], neuron_axis, k)
    np.testing.assert_allclose(res.matrix_similarity.numpy(), flat, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.averaged_similarity.numpy(), averaged, rtol=0, atol=1e-12)
    if coords is None:
        assert res.pca_coords is None and res.pca_evr is None
        return
    got = res.pca_coords.numpy()
    if len(mats) == 2:  # every non-constant column has the same magnitude: rounding alone picks the sign
        got, coords = np.abs(got), np.abs(coords)
    np.testing.assert_allclose(got, coords, rtol=0, atol=tol * max(1.0, np.abs(coords).max()))
    np.testing.assert_allclose(res.pca_evr.numpy(), evr, rtol=0, atol=tol)


def test_kernels_are_in_use():
    assert stream.warm_up()  # numba is a dependency: the compiled path must load


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("neuron_axis", [0, 1])
def test_compiled_pass_matches_numpy(dtype, n, neuron_axis):
    mats = members(n, 37, 300, dtype, seed=n)  # 300 columns: a full block of 256 and a partial one
    check(run(mats, neuron_axis), mats, neuron_axis)


@pytest.mark.parametrize("budget", [2000, 40_000, 1 << 30])  # a row per chunk, a few rows, one chunk
@pytest.mark.parametrize("threads", [1, 3])
def test_chunking_and_threads_give_the_same_numbers(budget, threads):
    mats = members(6, 131, 70, torch.bfloat16, seed=7)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for axis in (0, 1):
            check(run(mats, axis, budget=budget), mats, axis)
    finally:
        torch.set_num_threads(before)


def test_mixed_dtypes_and_non_contiguous_rows():
    mats = members(4, 40, 64, [torch.bfloat16, torch.float32, torch.bfloat16, torch.float16], seed=3)
    check(run(mats, 0), mats, 0)
    transposed = [m.T.contiguous().T for m in mats]  # column-major storage: rows are strided views
    check(run(transposed, 1), mats, 1)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-8), (torch.float64, 1e-5)])  # torch: float32 chunks
def test_compiled_and_torch_paths_agree(dtype, tol, monkeypatch):
    mats = members(8, 96, 200, dtype, seed=11)
    for axis in (0, 1):
        fast, slow = run(mats, axis), run(mats, axis, compiled=False, monkeypatch=monkeypatch)
        for key in ("matrix_similarity", "averaged_similarity", "pca_coords", "pca_evr"):
            torch.testing.assert_close(getattr(fast, key), getattr(slow, key), rtol=0, atol=tol)


def test_sign_rule_ties_keep_the_first_entry():
    # columns 1 and 2 are exact negatives: every component has equal magnitudes there; the first one decides
    col = torch.tensor([0.5, -0.25, 0.125, 0.0, 0.375])
    mats = []
    for a in range(5):
        m = torch.zeros(2, 3)
        m[0, 1], m[0, 2] = col[a], -col[a]
        m[1, 0] = 1.0  # constant column
        m[1, 1] = col[(a + 2) % 5]  # a third, less weighty column
        mats.append(m)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        typed = [m.to(dtype) for m in mats]
        check(run(typed, 0, k=2), typed, 0, k=2)


def test_all_equal_members_and_zero_member():
    same = members(1, 8, 16, torch.float32, seed=5)[0]
    res = run([same, same.clone(), same.clone()], 0)
    assert torch.allclose(res.matrix_similarity, torch.ones(3, 3, dtype=torch.float64))
    assert torch.equal(res.pca_evr.isnan(), torch.ones(2, dtype=torch.bool))  # nothing to explain: NaN ratios
    mats = members(3, 8, 16, torch.bfloat16, seed=6) + [torch.zeros(8, 16, dtype=torch.bfloat16)]
    res = run(mats, 1)
    assert torch.equal(res.matrix_similarity[3], torch.zeros(4, dtype=torch.float64))  # as the torch path


def test_a_reader_of_the_wrong_shape_is_an_error():
    mats = members(2, 8, 16, torch.bfloat16, seed=1)
    readers = [lambda a, b: mats[0][a:b], lambda a, b: mats[1][a:b, :15]]
    with pytest.raises(ValueError, match="shape"):
        stream.stream_layer(readers, 8, 16, 0)


def test_a_numba_failure_falls_back_to_torch(monkeypatch):
    kern = stream._kernels()

    class NumbaLikeError(Exception):
        pass

    NumbaLikeError.__module__ = "numba.core.errors"

    def broken(*args):
        raise NumbaLikeError("no compiler")

    monkeypatch.setattr(kern, "accumulate", broken)
    monkeypatch.setattr(stream, "_kernels_error", None)
    mats = members(3, 8, 16, torch.bfloat16, seed=2)
    with pytest.warns(UserWarning, match="using torch"):
        check(run(mats, 0), mats, 0)
    assert stream._kernels() is None  # disabled from then on (monkeypatch restores it after the test)


def test_mmap_read_checkpoint_gives_the_numbers_and_leaves_normal_read_ahead(tiny):
    from moescope.arch import open_model
    from moescope.static.run import _member_readers

    built = tiny("mixtral")  # bf16 safetensors: the readers return views of the mmap-ed shards
    model = open_model(built.path)
    labels, width, hidden = model.member_labels(0), model.member_widths(0)[0], model.hidden_size
    for matrix, axis in (("gate", 0), ("down", 1)):
        readers = _member_readers(model, 0, matrix, labels, None)
        rows, cols = (hidden, width) if matrix == "down" else (width, hidden)
        res = stream.stream_layer(readers, rows, cols, axis, budget_bytes=rows * cols)  # several chunks
        check(res, [r(0, rows) for r in readers], axis)
    flags = []  # the shards' mappings are no longer MADV_RANDOM ("rr") after the pass
    with open("/proc/self/smaps") as smaps:
        current = None
        for line in smaps:
            if "-" in line.split(" ", 1)[0]:
                current = line.rstrip().split()[-1]
            elif line.startswith("VmFlags") and current and current.endswith(".safetensors"):
                flags.append(line.split()[1:])
    assert flags and not any("rr" in f for f in flags)
