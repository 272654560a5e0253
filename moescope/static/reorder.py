"""Neuron-level reordering of two members: best one-to-one neuron matching and what it reveals."""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import Tensor

from .assignment import Assignment, AssignmentInputError, linear_assignment
from .similarity import check_dtype, cosine_from_products, cosine_matrix, neuron_pair, row_products


def solve_assignment(score_matrix: Tensor, maximize: bool = True) -> tuple[Tensor, Tensor]:
    """Exact linear assignment of ``score_matrix`` [R, C]: (row_ind, col_ind), int64 on its device.

    Every one of the min(R, C) rows (or columns) gets a distinct partner; with R <= C, ``row_ind`` is
    ``0..R-1`` and ``col_ind[i]`` is the partner of row i. Solved by ``linear_assignment`` (sparse candidates
    certified optimal with dual potentials, scipy as the fallback).
    """
    found = _assign(score_matrix, maximize)
    dev = score_matrix.device
    return torch.as_tensor(found.row_ind, device=dev), torch.as_tensor(found.col_ind, device=dev)


def _assign(score_matrix: Tensor, maximize: bool = True) -> Assignment:
    if score_matrix.ndim != 2 or 0 in score_matrix.shape:
        raise ValueError(f"solve_assignment needs a non-empty 2-D score matrix, got {tuple(score_matrix.shape)}")
    try:  # linear_assignment takes float32 or float64 as they are and rejects NaN / inf itself
        with host_copy(score_matrix.detach()) as host:
            return linear_assignment(host.numpy(), maximize=maximize)
    except AssignmentInputError as exc:
        raise ValueError(f"solve_assignment: {exc}") from None


_free_pinned: list[Tensor] = []  # page-locked byte buffers, reused from pair to pair
_pinned_lock = threading.Lock()


@contextmanager
def host_copy(t: Tensor) -> Iterator[Tensor]:
    """``t`` on the CPU. A GPU matrix is copied into reused page-locked memory: a pageable copy of a large
    similarity matrix is ~30x slower and serialises the threads that match pairs at once."""
    if t.device.type != "cuda":
        yield t.cpu()
        return
    nbytes = t.numel() * t.element_size()
    buffer = take_host_buffer(nbytes)
    try:
        yield buffer[:nbytes].view(t.dtype).view(t.shape).copy_(t)
    finally:
        with _pinned_lock:
            _free_pinned.append(buffer)


def take_host_buffer(nbytes: int) -> Tensor:
    """The smallest free kept buffer of at least ``nbytes`` bytes, else a new one (page-locked with CUDA)."""
    with _pinned_lock:  # by position: tensors do not compare as values
        fits = [i for i, b in enumerate(_free_pinned) if b.numel() >= nbytes]
        if fits:
            return _free_pinned.pop(min(fits, key=lambda i: _free_pinned[i].numel()))
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())


def release_host_buffers() -> None:
    """Free the page-locked buffers kept by ``host_copy``."""
    with _pinned_lock:
        _free_pinned.clear()


def kendall_tau_b(x: Tensor | np.ndarray, y: Tensor | np.ndarray | None = None) -> float:
    """Kendall's tau-b between ``x`` and ``y`` (default ``0..n-1``); NaN when n < 2 or either is constant."""
    xs = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x).ravel()
    ys = np.arange(xs.size) if y is None else np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y).ravel()
    if xs.size != ys.size:
        raise ValueError(f"kendall_tau_b needs inputs of equal length, got {xs.size} and {ys.size}")
    if xs.size < 2 or np.all(xs == xs[0]) or np.all(ys == ys[0]):
        return math.nan
    return float(kendalltau(xs, ys, variant="b").statistic)


@dataclass(frozen=True)
class ReorderResult:
    """Best neuron matching of members a and b for one matrix.

    ``side`` is the member whose every neuron is matched: 'a' when n_a <= n_b, else 'b'. ``col[i]`` is the
    partner, in the other member, of neuron i of ``side``; ``matched_cos[i]`` = C[i, col[i]] with C oriented
    the same way. ``cosine``: cosine of the flattened matrices after permuting the other member's neurons by
    ``col`` (only matched neurons when widths differ); ``mean_matched``: mean of ``matched_cos``;
    ``tau``: Kendall's tau-b between ``col`` and ``0..n-1`` (NaN for a single neuron).
    """

    side: str
    n_a: int
    n_b: int
    col: Tensor
    matched_cos: Tensor
    cosine: float
    mean_matched: float
    tau: float
    solver: str = "scipy"
    certified: bool = False


@dataclass(frozen=True)
class Matching:
    """One-to-one neuron matching of two members: ``col[i]`` is the partner of neuron i of ``side`` ('a' when
    n_a <= n_b, else 'b'), found by ``solver`` (``certified``: proved optimal by dual potentials)."""

    side: str
    col: Tensor
    solver: str
    certified: bool


def match_members(pairs: Sequence[tuple[Tensor, Tensor, str]], *, dtype: torch.dtype = torch.float32) -> Matching:
    """Best neuron matching of members a and b on one or more matrices, given as ``(wa, wb, matrix)``.

    The score of neurons (i, r) is their cosine averaged over the matrices: the cosine of neuron vectors
    made by concatenating each matrix's unit neuron vector. With one matrix it is the study's matching.
    """
    score, side = None, None
    for wa, wb, matrix in pairs:
        va, vb = neuron_pair(wa, wb, matrix)
        side = "a" if va.shape[0] <= vb.shape[0] else "b"
        small, large = (va, vb) if side == "a" else (vb, va)
        c = cosine_matrix(small, large, dtype=dtype)
        score = c if score is None else score.add_(c)
    if len(pairs) > 1:
        score /= len(pairs)
    found = _assign(score, maximize=True)
    return Matching(side, torch.as_tensor(found.col_ind, device=score.device), found.solver, found.certified)


def apply_matching(wa: Tensor, wb: Tensor, matrix: str, matching: Matching, *,
                   dtype: torch.dtype = torch.float32) -> ReorderResult:
    """What ``matching`` reveals for one ``matrix`` of members a and b (see ``ReorderResult``)."""
    va, vb = neuron_pair(wa, wb, matrix)
    small, large = (va, vb) if matching.side == "a" else (vb, va)
    dot, xx, yy = row_products(small, large[matching.col])
    matched_cos = cosine_from_products(dot, xx, yy).to(check_dtype(dtype))
    cosine = cosine_from_products(dot.sum(), xx.sum(), yy.sum())  # of the flattened matrices, matched rows
    return ReorderResult(side=matching.side, n_a=va.shape[0], n_b=vb.shape[0], col=matching.col.clone(),
                         matched_cos=matched_cos, cosine=float(cosine), mean_matched=float(matched_cos.double().mean()),
                         tau=kendall_tau_b(matching.col), solver=matching.solver, certified=matching.certified)


def reorder_pair(wa: Tensor, wb: Tensor, matrix: str, *, dtype: torch.dtype = torch.float32) -> ReorderResult:
    """Match the neurons of members a and b (one ``matrix`` each, canonical orientation) one to one."""
    return apply_matching(wa, wb, matrix, match_members([(wa, wb, matrix)], dtype=dtype), dtype=dtype)
