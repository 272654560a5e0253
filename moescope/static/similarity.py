"""Weight similarity of experts: matrix-level, neuron-averaged and neuron-by-neuron cosines.

Canonical orientation (nn.Linear ``[out, in]``): gate/up are ``[I, H]``, down is ``[H, I]``; a stack of
members is ``[M, I, H]`` / ``[M, H, I]``. Neuron i is row i of gate/up and column i of down.
A zero vector has cosine 0 with every vector (itself included), as with ``torch.nn.functional.cosine_similarity``.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Union

import torch
from torch import Tensor

# axis holding the neurons in one canonical matrix (gate/up: rows, down: columns)
NEURON_AXIS = {"gate": 0, "up": 0, "down": 1}
COMPUTE_DTYPES = (torch.float32, torch.float64)
DIRECT_K = 8192  # dot products longer than this are accumulated in float64 blocks (flattened matrices)
BLOCK_ELEMS = 1 << 24  # elements per float64 block

Members = Union[Tensor, Sequence[Tensor]]


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return ``dtype`` if it is a supported compute dtype (float32 / float64), else raise ValueError."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def check_matrix(matrix: str) -> int:
    """Return the neuron axis of a single ``matrix`` ('gate', 'up' or 'down'), else raise ValueError."""
    if matrix not in NEURON_AXIS:
        raise ValueError(f"matrix must be one of {sorted(NEURON_AXIS)}, got {matrix!r}")
    return NEURON_AXIS[matrix]


def as_members(members: Members) -> list[Tensor]:
    """Turn a stack ``[M, ...]`` or a sequence of tensors into a list of per-member tensors."""
    if isinstance(members, Tensor):
        if members.ndim < 2:
            raise ValueError(f"a stack of members needs shape [M, ...], got {tuple(members.shape)}")
        return list(members.unbind(0))
    out = list(members)
    if not out or not all(isinstance(m, Tensor) for m in out):
        raise ValueError("members must be a non-empty stacked tensor or a sequence of tensors")
    return out


def cosine_matrix(x: Tensor, y: Tensor | None = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Cosine of every row of ``x`` [N, D] with every row of ``y`` [N', D]: [N, N'].

    With ``y`` omitted (``y = x``) the result is exactly symmetric with a unit diagonal. Norms are accumulated in
    float64; dot products longer than ``DIRECT_K`` (flattened matrices) too, in blocks.
    """
    check_dtype(dtype)
    if x.ndim != 2 or (y is not None and (y.ndim != 2 or y.shape[1] != x.shape[1])):
        raise ValueError("cosine_matrix needs 2-D inputs [N, D] and [N', D] with the same D, got "
                         f"{tuple(x.shape)} and {None if y is None else tuple(y.shape)}")
    nx = _row_norms(x)
    ny = nx if y is None else _row_norms(y)
    zero_x, nx, ny = nx == 0, _nonzero(nx), _nonzero(ny)
    if x.shape[1] <= DIRECT_K:
        xn = x.to(dtype) / nx.to(dtype)[:, None]
        out = xn @ (xn if y is None else y.to(dtype) / ny.to(dtype)[:, None]).T
    else:
        out = (gram64(x, y) / (nx[:, None] * ny[None, :])).to(dtype)
    if y is not None:
        return out.clamp_(-1.0, 1.0)
    out = (out + out.T).mul_(0.5).clamp_(-1.0, 1.0)  # exactly symmetric
    out.diagonal().copy_((~zero_x).to(dtype))  # self-similarity exactly 1 (0 for a zero row)
    return out


def cosine_matrix_memory(rows_x: int, rows_y: int, dim: int, itemsize: int) -> tuple[int, int]:
    """Bytes of ``cosine_matrix``'s [rows_x, rows_y] result in a dtype of ``itemsize`` bytes, and of the
    temporaries it holds beside the result at its peak: the normalised copies of both inputs, or, for long
    vectors (``dim`` > ``DIRECT_K``), the float64 product (cast afterwards) and its float64 column blocks."""
    result = rows_x * rows_y * itemsize
    if dim <= DIRECT_K:
        return result, (rows_x + rows_y) * dim * itemsize
    return result, (rows_x * rows_y * 8 if itemsize != 8 else 0) + 2 * BLOCK_ELEMS * 8


def _nonzero(norm: Tensor) -> Tensor:
    """Norms with zeros replaced by 1, so that a zero vector gets cosine 0."""
    return torch.where(norm > 0, norm, torch.ones_like(norm))


def _row_norms(x: Tensor) -> Tensor:
    """L2 norm of each row of ``x`` [N, D] (float64), accumulated in float64 blocks."""
    sq = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for cols in column_blocks(x.shape[1], x.shape[0]):
        sq += x[:, cols].double().square().sum(dim=1)
    return sq.sqrt()


def row_products(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For rows of ``x`` and ``y`` [N, D]: (x_i . y_i, |x_i|^2, |y_i|^2), accumulated in float64 in one pass."""
    out = [torch.zeros(x.shape[0], dtype=torch.float64, device=x.device) for _ in range(3)]
    for cols in column_blocks(x.shape[1], 2 * x.shape[0]):
        bx, by = x[:, cols].double(), y[:, cols].double()
        for acc, (u, v) in zip(out, ((bx, by), (bx, bx), (by, by))):
            acc += torch.linalg.vecdot(u, v)
    return out[0], out[1], out[2]


def cosine_from_products(dot: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    """Cosine from a dot product and squared norms (0 where a vector is zero), clamped to [-1, 1]."""
    return (dot / (_nonzero(xx.sqrt()) * _nonzero(yy.sqrt()))).clamp(-1.0, 1.0)


def column_blocks(length: int, rows: int) -> Iterator[slice]:
    """Slices cutting an axis of ``length`` into blocks of about ``BLOCK_ELEMS`` elements (``rows`` wide)."""
    step = max(1, BLOCK_ELEMS // max(rows, 1))
    return (slice(start, start + step) for start in range(0, length, step))


def gram64(a: Tensor, b: Tensor | None = None) -> Tensor:
    """``a @ b.T`` (default ``b = a``) for [p, K] and [q, K], accumulated in float64 over blocks of K: [p, q]."""
    q = a.shape[0] if b is None else b.shape[0]
    out = torch.zeros(a.shape[0], q, dtype=torch.float64, device=a.device)
    for cols in column_blocks(a.shape[1], a.shape[0] + q):
        blk = a[:, cols].double()
        out.addmm_(blk, (blk if b is None else b[:, cols].double()).T)
    return out


def matrix_similarity(stack: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Cosine of the flattened matrices of all member pairs of ``stack`` [M, ...]: [M, M]."""
    if stack.ndim < 2:
        raise ValueError(f"matrix_similarity needs a stack [M, ...], got {tuple(stack.shape)}")
    return cosine_matrix(stack.reshape(stack.shape[0], -1), dtype=dtype)


def averaged_vectors(stack: Tensor, matrix: str, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Mean over the neuron axis of each member of ``stack`` ([M, I, H] or [M, H, I] for down): [M, H]."""
    axis = check_matrix(matrix)
    check_dtype(dtype)
    if stack.ndim != 3:
        raise ValueError(f"averaged_vectors needs a stack [M, I, H] (down: [M, H, I]), got {tuple(stack.shape)}")
    return stack.mean(dim=1 + axis, dtype=dtype)


def averaged_similarity(stack: Tensor, matrix: str, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Cosine of the neuron-averaged vectors of all member pairs: [M, M]."""
    return cosine_matrix(averaged_vectors(stack, matrix, dtype=dtype), dtype=dtype)


def member_similarity(members: Members, matrix: str, *, averaged: bool = False,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Matrix-level (or neuron-averaged) cosine [M, M] of members of any shapes; NaN = not comparable.

    Only members of equal shape are compared (a wider shared expert or a dense FFN of another width has
    no matrix-level or averaged cosine with the routed experts): those pairs are NaN, meaning "not comparable".
    """
    check_matrix(matrix)
    mats = as_members(members)
    if any(m.ndim != 2 for m in mats):
        raise ValueError("member_similarity needs 2-D member matrices, got shapes "
                         f"{[tuple(m.shape) for m in mats]}")
    out = torch.full((len(mats), len(mats)), float("nan"), dtype=check_dtype(dtype), device=mats[0].device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault(tuple(m.shape), []).append(i)
    for idx in groups.values():
        stack = torch.stack([mats[i] for i in idx])
        sim = averaged_similarity(stack, matrix, dtype=dtype) if averaged else matrix_similarity(stack, dtype=dtype)
        ix = torch.tensor(idx, device=out.device)
        out[ix[:, None], ix[None, :]] = sim
    return out


def neuron_vectors(w: Tensor, matrix: str) -> Tensor:
    """Neuron vectors of one matrix as rows: gate/up ``w`` [I, H] as is, down ``w`` [H, I] transposed: [I, H]."""
    axis = check_matrix(matrix)
    if w.ndim != 2:
        raise ValueError(f"neuron_vectors needs one 2-D {matrix} matrix, got shape {tuple(w.shape)}")
    return w.T if axis == 1 else w


def neuron_pair(wa: Tensor, wb: Tensor, matrix: str) -> tuple[Tensor, Tensor]:
    """Neuron vectors [I_a, H] and [I_b, H] of members a and b, checking that their hidden sizes agree."""
    va, vb = neuron_vectors(wa, matrix), neuron_vectors(wb, matrix)
    if va.shape[1] != vb.shape[1]:
        raise ValueError(f"{matrix} matrices of shapes {tuple(wa.shape)} and {tuple(wb.shape)} have different "
                         "hidden sizes (gate/up must be [I, H], down [H, I])")
    return va, vb


def neuron_cosine(wa: Tensor, wb: Tensor, matrix: str, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """C[i, r] = cosine of neuron i of member a and neuron r of member b for ``matrix``: [I_a, I_b]."""
    return cosine_matrix(*neuron_pair(wa, wb, matrix), dtype=dtype)
