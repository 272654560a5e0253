"""Gate embedding vs expert similarity: does the router place similar experts close together?"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .similarity import cosine_matrix


@dataclass(frozen=True)
class RegressionResult:
    """Least-squares fit ``S = slope * G + intercept`` over the E(E-1)/2 routed-expert pairs a > b.

    ``r``: Pearson correlation of S and G, ``r2`` = r². NaN when G (or, for r, S) is constant over the pairs.
    ``gate_pairs`` / ``expert_pairs``: the G and S values of the pairs (float64, ``torch.tril_indices`` order).
    """

    r: float
    slope: float
    intercept: float
    r2: float
    n_pairs: int
    gate_pairs: Tensor
    expert_pairs: Tensor


def gate_embedding_similarity(router: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """G[a, b] = cosine of router weight rows a and b (``router`` [E, H]): [E, E]."""
    if router.ndim != 2:
        raise ValueError(f"router weight must be [E, H], got shape {tuple(router.shape)}")
    return cosine_matrix(router, dtype=dtype)


def similarity_regression(expert_sim: Tensor, gate_sim: Tensor) -> RegressionResult:
    """Pearson r, slope, intercept and R² of expert similarity S vs gate similarity G (both [E, E])."""
    if expert_sim.ndim != 2 or expert_sim.shape[0] != expert_sim.shape[1] or expert_sim.shape != gate_sim.shape:
        raise ValueError("expert and gate similarity must both be [E, E] over the routed experts, got "
                         f"{tuple(expert_sim.shape)} and {tuple(gate_sim.shape)} (slice shared/dense members off S)")
    e = expert_sim.shape[0]
    if e < 2:
        raise ValueError(f"need at least 2 routed experts, got {e}")
    a, b = torch.tril_indices(e, e, offset=-1, device=expert_sim.device)
    y = expert_sim[a, b].double()
    x = gate_sim.to(expert_sim.device)[a, b].double()
    if not bool(torch.isfinite(x).all() & torch.isfinite(y).all()):
        raise ValueError("similarity matrices hold NaN/inf for routed-expert pairs (members of different shapes?)")
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy, sxy = float(xc @ xc), float(yc @ yc), float(xc @ yc)
    slope = sxy / sxx if sxx > 0 else math.nan
    intercept = float(y.mean()) - slope * float(x.mean())
    r = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy))) if sxx > 0 and syy > 0 else math.nan
    return RegressionResult(r=r, slope=slope, intercept=intercept, r2=r * r, n_pairs=int(x.numel()),
                            gate_pairs=x, expert_pairs=y)


def gate_expert_regression(router: Tensor, expert_sim: Tensor, *,
                           dtype: torch.dtype = torch.float32) -> RegressionResult:
    """Regress the routed-expert similarity ``expert_sim`` [E, E] on the gate embedding cosine of ``router``."""
    return similarity_regression(expert_sim, gate_embedding_similarity(router, dtype=dtype))
