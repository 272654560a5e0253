"""Merge candidates: neuron-matched similarity of two experts, and the merge itself.

**Matching.** Neuron i of an expert is (row i of gate, row i of up, column i of down). Two experts' neurons are
matched one to one, exactly (``moescope.static.assignment.linear_assignment``), on the score
``S[i, j] = (cos(gate_a[i], gate_b[j]) + cos(up_a[i], up_b[j]) + cos(down_a[:, i], down_b[:, j])) / 3``, which is
the cosine of the concatenated neuron vectors ``[gate | up | downᵀ]`` after each of the three parts is scaled to
unit length (so no matrix dominates by its scale). One matching serves all three matrices, because a neuron must
move as a whole for the merged expert to compute anything.

**Similarity** of a pair = mean of ``S`` over the matched neurons (1 for an expert and a neuron permutation of it).
``weight_cosine`` = cosine of the flattened ``[gate | up | downᵀ]`` of a and of b aligned to a.

**Merge.** b's neurons are permuted to a's order, then ``W = (u_a W_a + u_b P(W_b)) / (u_a + u_b)`` for gate, up
and down, where ``u`` is each member's usage (its soft count on the calibration tokens, summed over the experts
already merged into it) or, with ``weighting="uniform"``, the number of original experts in it (a plain average of
them all). The router row (and router bias, where there is one) of the merged expert is the same weighted average
of the two rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..arch.spec import MATRICES
from ..static.assignment import linear_assignment
from ..static.similarity import cosine_matrix, neuron_vectors

Weights = dict[str, torch.Tensor]


@dataclass
class Member:
    """An expert of the edited layer: the original experts it holds and, once merged, its own weights.

    ``merge_weights[i]`` is the coefficient of original expert ``sources[i]`` in the (aligned) average; a kept
    expert has ``sources=(e,)``, ``merge_weights=(1.0,)`` and ``weights=None`` (its tensors are copied as stored).
    ``slot`` is its row in the layer's output bank (-1: outputs not computed).
    """

    sources: tuple[int, ...]
    merge_weights: tuple[float, ...]
    router: torch.Tensor
    bias: torch.Tensor | None
    usage: float
    weights: Weights | None = field(default=None, repr=False)
    slot: int = -1

    @property
    def merged(self) -> bool:
        return len(self.sources) > 1

    @property
    def anchor(self) -> int:
        """The original expert whose place (order, shard) the member takes."""
        return min(self.sources)


def neuron_scores(a: Weights, b: Weights) -> torch.Tensor:
    """``S [I_a, I_b]``: mean over gate, up and down of the neuron cosines (see the module docstring)."""
    total = None
    for m in MATRICES:
        c = cosine_matrix(neuron_vectors(a[m].float(), m), neuron_vectors(b[m].float(), m))
        total = c if total is None else total + c
    return total / len(MATRICES)


def match_neurons(a: Weights, b: Weights) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm [I], matched [I])``: b's neuron ``perm[i]`` is matched to a's neuron i with score ``matched[i]``."""
    scores = neuron_scores(a, b)
    if scores.shape[0] != scores.shape[1]:
        raise ValueError(f"experts of different widths ({scores.shape[0]} and {scores.shape[1]}) cannot be merged")
    found = linear_assignment(scores.double().cpu().numpy(), maximize=True)
    perm = torch.as_tensor(found.col_ind, dtype=torch.long, device=scores.device)
    return perm, scores[torch.arange(scores.shape[0], device=scores.device), perm]


def align(b: Weights, perm: torch.Tensor) -> Weights:
    """b's weights with its neurons reordered by ``perm`` (neuron i of the result is b's neuron ``perm[i]``)."""
    return {"gate": b["gate"][perm], "up": b["up"][perm], "down": b["down"][:, perm]}


def _flat(w: Weights) -> torch.Tensor:
    return torch.cat([w["gate"].flatten(), w["up"].flatten(), w["down"].T.flatten()]).double()


@dataclass(frozen=True)
class PairMatch:
    """The neuron matching of members a and b: b's permutation, and the pair's similarity scores."""

    perm: torch.Tensor
    similarity: float
    weight_cosine: float


def pair_match(a: Weights, b: Weights) -> PairMatch:
    perm, matched = match_neurons(a, b)
    fa, fb = _flat(a), _flat(align(b, perm))
    cosine = float(fa @ fb / (fa.norm() * fb.norm()).clamp_min(1e-300))
    return PairMatch(perm, float(matched.double().mean()), cosine)


def merge_members(a: Member, b: Member, match: PairMatch, load: Callable[[Member], Weights],
                  weighting: str = "usage") -> Member:
    """The merged member of a and b (b aligned to a by ``match``); ``load`` gives a member's weights."""
    if weighting not in ("usage", "uniform"):
        raise ValueError(f"weighting must be 'usage' or 'uniform', got {weighting!r}")
    ua, ub = (a.usage, b.usage) if weighting == "usage" else (float(len(a.sources)), float(len(b.sources)))
    if not ua + ub > 0:  # neither was ever routed: a plain average of the original experts
        ua, ub = float(len(a.sources)), float(len(b.sources))
    fa, fb = ua / (ua + ub), ub / (ua + ub)
    wa, wb = load(a), align(load(b), match.perm)
    weights = {m: fa * wa[m] + fb * wb[m] for m in MATRICES}
    scale_a = [fa * w for w in a.merge_weights]
    scale_b = [fb * w for w in b.merge_weights]
    bias = None if a.bias is None else fa * a.bias + fb * b.bias
    return Member(a.sources + b.sources, tuple(scale_a + scale_b), fa * a.router + fb * b.router, bias,
                  a.usage + b.usage, weights)
