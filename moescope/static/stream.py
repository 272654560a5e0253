"""A layer's statistics computed in bounded memory, whatever the layer's size.

Cosines of flattened matrices, neuron-averaged vectors and the standardised Gram matrix behind matrix-level
PCA are all sums over rows, so they accumulate chunk by chunk (in float64) and never need a whole layer, or
even a whole member, in memory. Neuron-level work holds a few members at a time (``MemberCache``), and
neuron-level PCA accumulates its hidden x hidden covariance member by member.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .pca import leading_eigen, sign_of_largest
from .similarity import neuron_vectors

RowReader = Callable[[int, int], torch.Tensor]   # (start, stop) -> rows [stop-start, cols] of one member


@dataclass
class StreamedLayer:
    """Matrix-level similarity, neuron-averaged similarity and matrix-level PCA of same-shape members."""

    matrix_similarity: torch.Tensor       # [N, N] float64
    averaged_similarity: torch.Tensor     # [N, N] float64
    pca_coords: torch.Tensor | None       # [N, k] float64 (None with fewer than 2 members)
    pca_evr: torch.Tensor | None          # [k]


def chunk_rows(total: int, row_bytes: int, budget_bytes: int, align: int = 128) -> list[tuple[int, int]]:
    """Split ``total`` rows into chunks of at most ``budget_bytes`` (a multiple of ``align`` rows when possible)."""
    rows = max(1, budget_bytes // max(row_bytes, 1))
    if rows >= align:
        rows -= rows % align
    return [(s, min(s + rows, total)) for s in range(0, total, rows)]


def _cosine(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    return gram / norms[:, None] / norms[None, :]


def _inverse_variance(block: torch.Tensor) -> torch.Tensor:
    """1 / (Bessel variance over the N members) of each column of ``block`` [N, D]; 0 for constant columns.

    The standardised Gram is then ``C (X diag(w) X^T) C`` (C centres over members), and a component
    ``Z^T u = diag(sqrt(w)) X^T u`` for eigenvectors u orthogonal to the ones vector: no standardised copy.
    Column sums are products with a ones vector (BLAS), not strided reductions.
    """
    n = block.shape[0]
    ones = block.new_ones(1, n)
    total, squares = (ones @ block)[0], (ones @ block.square())[0]
    var = (squares - total.square() / n) / (n - 1)
    constant = var <= 1e-12 * squares / n  # equal entries up to rounding
    return torch.where(constant, 0.0, 1.0 / var.clamp_min(1e-300))


_BLOCK = 1 << 15  # columns of a chunk converted to float64 at a time (N x 256 KiB: stays in cache)


def _float64_blocks(flat: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, flat.shape[1], _BLOCK):
        yield flat[:, start:start + _BLOCK].double()


def _read_chunks(readers: Sequence[RowReader], chunks: list[tuple[int, int]], cols: int,
                 buffers: list[torch.Tensor]) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, members' rows as float32 [N, rows*cols]); the next chunk is read while one is used."""

    def read(index: int) -> torch.Tensor:
        start, stop = chunks[index]
        out = buffers[index % 2][:, : (stop - start) * cols]
        for member, reader in enumerate(readers):
            out[member].copy_(reader(start, stop).reshape(-1))
        return out

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, 0)
        for index, (start, stop) in enumerate(chunks):
            flat = pending.result()
            if index + 1 < len(chunks):
                pending = pool.submit(read, index + 1)
            yield start, stop, flat


def stream_layer(readers: Sequence[RowReader], rows: int, cols: int, neuron_axis: int, *, k: int = 3,
                 budget_bytes: int = 2 << 30, device: str | torch.device = "cpu") -> StreamedLayer:
    """Stream ``rows`` x ``cols`` canonical matrices of N same-shape members through the accumulators.

    ``neuron_axis`` is 0 for gate/up ([I, H]: average over rows) and 1 for down ([H, I]: average over columns).
    The budget covers two float32 chunks of all members (one being read while the other is used) and one
    member's rows as stored; products accumulate in float64, block by block.
    """
    n = len(readers)
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    zgram = torch.zeros_like(gram)
    averaged = torch.zeros(n, cols if neuron_axis == 0 else rows, dtype=torch.float64, device=device)
    chunks = chunk_rows(rows, (8 * n + 4) * cols, budget_bytes * 7 // 8)  # 1/8 left for small temporaries
    most = max(stop - start for start, stop in chunks)
    buffers = [torch.empty(n, most * cols, dtype=torch.float32, device=device) for _ in range(2)]
    for start, stop, flat in _read_chunks(readers, chunks, cols, buffers):
        x = flat.view(n, stop - start, cols)
        # float32 sums (torch sums pairwise: no float64 copy of the chunk), accumulated in float64 across chunks
        if neuron_axis == 0:
            averaged += x.sum(1).double()
        else:
            averaged[:, start:stop] = x.sum(2).double() / cols
        for block in _float64_blocks(flat):
            gram += block @ block.T
            if n >= 2:
                zgram += (block * _inverse_variance(block)) @ block.T
    if neuron_axis == 0:
        averaged /= rows
    centre = torch.eye(n, dtype=torch.float64, device=device) - 1.0 / n
    zgram = centre @ zgram @ centre
    pca = _pca_from_gram(zgram, readers, chunks, cols, buffers, k) if n >= 2 else (None, None)
    return StreamedLayer(_cosine(gram), _cosine(averaged @ averaged.T), *pca)


def _pca_from_gram(zgram: torch.Tensor, readers: Sequence[RowReader], chunks, cols: int,
                   buffers: list[torch.Tensor], k: int):
    """PCA scores from the standardised Gram Z Z^T; a second pass finds each component's largest entry for its sign."""
    evals, evecs, total = leading_eigen(zgram, min(k, zgram.shape[0] - 1))
    best = torch.full((evals.numel(),), -1.0, dtype=torch.float64, device=zgram.device)
    sign = torch.ones_like(best)
    for _, _, flat in _read_chunks(readers, chunks, cols, buffers):
        for block in _float64_blocks(flat):  # component j is proportional to Z^T u_j = Y^T u_j (u ⟂ ones)
            v = (evecs.T @ block) * _inverse_variance(block).sqrt()      # [k, D]
            idx = v.abs().argmax(1)
            top = v.gather(1, idx[:, None])[:, 0]
            better = top.abs() > best
            best = torch.where(better, top.abs(), best)
            sign = torch.where(better, torch.where(top < 0, -1.0, 1.0).double(), sign)
    coords = evecs * evals.sqrt() * sign
    return coords, evals / total if total > 0 else evals * float("nan")


class MemberCache:
    """Members loaded on demand and kept while they fit in ``budget_bytes`` (least recently used leave first)."""

    def __init__(self, load: Callable[[int], torch.Tensor], budget_bytes: int):
        self.load, self.budget = load, budget_bytes
        self._kept: dict[int, torch.Tensor] = {}

    def __getitem__(self, index: int) -> torch.Tensor:
        member = self._kept.pop(index, None)
        if member is None:
            member = self.load(index)
        self._kept[index] = member  # most recent last
        while len(self._kept) > 2 and sum(t.numel() * t.element_size() for t in self._kept.values()) > self.budget:
            self._kept.pop(next(iter(self._kept)))
        return member


def streamed_neuron_pca(members: Callable[[int], torch.Tensor], count: int, matrix: str, k: int = 3):
    """Neuron-level PCA (one point per neuron, member-major) reading one member at a time.

    Column statistics and ``Z^T Z`` (hidden x hidden) accumulate in float64 over members; the components are its
    leading eigenvectors (entry of largest magnitude made positive) and a second pass projects every neuron.
    Returns (coords [sum I, k], explained variance ratio [k]).
    """
    total = cross = points = 0
    for i in range(count):
        v = neuron_vectors(members(i), matrix).double()
        total, cross, points = total + v.sum(0), cross + v.T @ v, points + v.shape[0]
    mean = total / points
    cov = (cross - points * torch.outer(mean, mean)) / (points - 1)
    var = cov.diagonal()
    constant = var <= 1e-12 * (cross.diagonal() / points)
    inv_std = torch.where(constant, 0.0, var.clamp_min(1e-300).rsqrt())
    ztz = cov * torch.outer(inv_std, inv_std) * (points - 1)
    evals, evecs, trace = leading_eigen(ztz, k)
    evecs = evecs * sign_of_largest(evecs)
    coords = torch.cat([((neuron_vectors(members(i), matrix).double() - mean) * inv_std) @ evecs
                        for i in range(count)])
    return coords, evals / trace
