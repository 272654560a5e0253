"""Matrix-level statistics of a layer's members streamed over row chunks, in bounded memory.

Cosines of flattened matrices, neuron-averaged vectors and the standardised Gram matrix behind matrix-level
PCA are all sums over rows, so they accumulate chunk by chunk (in float64) and never need a whole layer, or
even a whole member, in memory: peak memory is set by ``budget_bytes``, not by the layer's size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

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


def _scaled(flat: torch.Tensor) -> torch.Tensor:
    """Columns of ``flat`` [N, D] divided by their Bessel std over the N members (constant columns -> 0).

    Centring is left out: ``C (Y Y^T) C`` with the centring matrix C gives the standardised Gram afterwards,
    and components ``Z^T u = Y^T u`` for eigenvectors u orthogonal to the ones vector.
    """
    n = flat.shape[0]
    total, squares = flat.sum(0), flat.square().sum(0)
    var = (squares - total.square() / n) / (n - 1)
    constant = var <= 1e-12 * squares / n  # equal entries up to rounding
    return flat * torch.where(constant, 0.0, var.clamp_min(1e-300).rsqrt())


def stream_layer(readers: Sequence[RowReader], rows: int, cols: int, neuron_axis: int, *, k: int = 3,
                 budget_bytes: int = 2 << 30, device: str | torch.device = "cpu") -> StreamedLayer:
    """Stream ``rows`` x ``cols`` canonical matrices of N same-shape members through the accumulators.

    ``neuron_axis`` is 0 for gate/up ([I, H]: average over rows) and 1 for down ([H, I]: average over columns).
    The budget covers the float64 chunk of all members plus its standardised copy.
    """
    n = len(readers)
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    zgram = torch.zeros_like(gram)
    averaged = torch.zeros(n, cols if neuron_axis == 0 else rows, dtype=torch.float64, device=device)
    chunks = chunk_rows(rows, 3 * n * cols * 8, budget_bytes)
    for start, stop in chunks:
        x = torch.stack([r(start, stop).to(device=device, dtype=torch.float64) for r in readers])  # [N, r, c]
        if neuron_axis == 0:
            averaged += x.sum(1)
        else:
            averaged[:, start:stop] = x.mean(2)
        flat = x.flatten(1)
        del x
        gram += flat @ flat.T
        if n >= 2:
            y = _scaled(flat)
            zgram += y @ y.T
    if neuron_axis == 0:
        averaged /= rows
    centre = torch.eye(n, dtype=torch.float64, device=device) - 1.0 / n
    zgram = centre @ zgram @ centre
    pca = _pca_from_gram(zgram, readers, chunks, k, device) if n >= 2 else (None, None)
    return StreamedLayer(_cosine(gram), _cosine(averaged @ averaged.T), *pca)


def _pca_from_gram(zgram: torch.Tensor, readers: Sequence[RowReader], chunks, k: int, device):
    """PCA scores from the standardised Gram Z Z^T; a second pass finds each component's largest entry for its sign."""
    k = min(k, zgram.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(zgram)
    total = float(evals.clamp_min(0).sum())
    evals, evecs = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k]
    best = torch.full((k,), -1.0, dtype=torch.float64, device=device)
    sign = torch.ones(k, dtype=torch.float64, device=device)
    for start, stop in chunks:  # component j is proportional to Z^T u_j: find its entry of largest magnitude
        flat = torch.stack([r(start, stop).to(device=device, dtype=torch.float64) for r in readers]).flatten(1)
        v = _scaled(flat).T @ evecs                         # [c, k]: Z^T u = Y^T u as u ⟂ ones
        idx = v.abs().argmax(0)
        mag = v.abs().gather(0, idx[None])[0]
        better = mag > best
        best = torch.where(better, mag, best)
        top = v.gather(0, idx[None])[0]
        sign = torch.where(better, torch.where(top < 0, -1.0, 1.0).double(), sign)
    coords = evecs * evals.sqrt() * sign
    return coords, evals / total if total > 0 else evals * float("nan")
