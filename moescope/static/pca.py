"""PCA of expert weights: one point per member (flattened matrix) or one point per neuron.

Columns are standardised (mean 0, std with Bessel's correction; constant columns stay 0), the points are
projected on the first k principal components, and each component's entry of largest magnitude is made
positive. The eigen-decomposition uses the smaller of the two Gram matrices (points x points when there
are fewer points than features, as for flattened matrices; features x features otherwise): exact and cheap.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .similarity import Members, as_members, check_dtype, column_blocks, gram64, neuron_vectors


@dataclass(frozen=True)
class PCAResult:
    """PCA projection: ``coords`` [N, k], ``explained_variance_ratio`` [k] (float64) and ``member`` [N].

    ``member`` is the index of each point's member (matrix-level: 0..M-1; None for ``pca_points``).
    """

    coords: Tensor
    explained_variance_ratio: Tensor
    member: Tensor | None = None


def standardize(points: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Columns of ``points`` [N, D] centred and divided by their Bessel std; constant columns become 0."""
    if points.ndim != 2 or points.shape[0] < 2:
        raise ValueError(f"standardize needs points [N, D] with N >= 2, got shape {tuple(points.shape)}")
    x = points.to(check_dtype(dtype))
    constant = x.amax(0) == x.amin(0)
    z = x.sub_(x.mean(0)) if x.data_ptr() != points.data_ptr() else x - x.mean(0)  # in place only on our copy
    std = torch.linalg.vector_norm(z, dim=0) / (x.shape[0] - 1) ** 0.5
    z /= torch.where(constant, torch.ones_like(std), std)
    z[:, constant] = 0
    return z


def pca_points(points: Tensor, k: int = 2, *, dtype: torch.dtype = torch.float32) -> PCAResult:
    """Standardise ``points`` [N, D] and project them on their first ``k`` principal components."""
    z = standardize(points, dtype=dtype)
    n, d = z.shape
    if not 1 <= k <= min(n - 1, d):
        raise ValueError(f"k must be between 1 and min(N-1, D) = {min(n - 1, d)} for {n} points of dimension {d}, "
                         f"got {k}")
    gram = gram64(z) if n <= d else gram64(z.T)  # [n, n] or [d, d], float64
    evals, evecs, total = leading_eigen(gram, k)
    if total <= 0:
        raise ValueError("PCA: every column is constant, there is no variance to explain")
    if n <= d:  # evecs are left singular vectors u_j: coords = u_j * s_j, component v_j ∝ Z^T u_j
        coords = (evecs * evals.sqrt()).to(dtype)
        signs = _max_entry_signs(z, evecs)
    else:  # evecs are the components v_j themselves
        coords = z @ evecs.to(dtype)
        signs = sign_of_largest(evecs)
    return PCAResult(coords=coords * signs.to(dtype), explained_variance_ratio=evals / total)


def leading_eigen(gram: Tensor, k: int) -> tuple[Tensor, Tensor, float]:
    """The ``k`` largest eigenvalues (clamped at 0) and eigenvectors of a symmetric Gram matrix, and its trace."""
    evals, evecs = torch.linalg.eigh(gram)
    return evals.flip(0)[:k].clamp(min=0), evecs.flip(1)[:, :k], float(gram.diagonal().sum())


def sign_of_largest(v: Tensor) -> Tensor:
    """Per column of ``v`` [D, k], the sign (+1 for 0) of its entry of largest magnitude (first on ties)."""
    top = v.gather(0, v.abs().argmax(0, keepdim=True))[0]
    return torch.where(top < 0, -1.0, 1.0).to(dtype=torch.float64, device=v.device)


def _max_entry_signs(z: Tensor, u: Tensor) -> Tensor:
    """Sign of the largest-magnitude entry of each component Z^T u_j (u [n, k] float64), in column blocks of Z."""
    best = torch.full((u.shape[1],), -1.0, dtype=torch.float64, device=u.device)
    sign = torch.ones_like(best)
    for cols in column_blocks(z.shape[1], z.shape[0]):
        v = z[:, cols].double().T @ u
        mag = v.abs().amax(0)
        better = mag > best  # strict: on ties the first entry wins, as in argmax
        best = torch.where(better, mag, best)
        sign = torch.where(better, sign_of_largest(v), sign)
    return sign


def matrix_pca(members: Members, k: int = 2, *, dtype: torch.dtype = torch.float32) -> PCAResult:
    """PCA with one point per member (its flattened matrix); members must all have the same shape."""
    mats = as_members(members)
    shapes = {tuple(m.shape) for m in mats}
    if len(shapes) != 1:
        raise ValueError(f"matrix-level PCA needs members of one shape, got {sorted(shapes)}; "
                         "leave members of another width out (they are not comparable)")
    points = torch.stack([m.reshape(-1) for m in mats])
    res = pca_points(points, k, dtype=dtype)
    return dataclasses.replace(res, member=torch.arange(len(mats), device=res.coords.device))


def neuron_points(members: Members, matrix: str) -> tuple[Tensor, Tensor]:
    """All neuron vectors of all members, member-major: points [sum I_m, H] and member index [sum I_m]."""
    vecs = [neuron_vectors(m, matrix) for m in as_members(members)]
    if len({v.shape[1] for v in vecs}) != 1:
        raise ValueError(f"{matrix} members have different hidden sizes: {[tuple(v.shape) for v in vecs]}")
    member = torch.cat([torch.full((v.shape[0],), i, dtype=torch.int64, device=v.device) for i, v in enumerate(vecs)])
    return torch.cat(vecs), member


def neuron_pca(members: Members, matrix: str, k: int = 2, *, dtype: torch.dtype = torch.float32) -> PCAResult:
    """PCA with one point per neuron of all members (member-major order); widths may differ."""
    points, member = neuron_points(members, matrix)
    return dataclasses.replace(pca_points(points, k, dtype=dtype), member=member)
