"""Mergeable accumulators of the dynamic analyses: ``update`` on token blocks, ``merge``, ``finalize``.

Every accumulator is a sum over tokens (plus the first few tokens kept by global position), so shards of
documents processed anywhere, in any order, merge to the same result as one pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def token_cosines(outputs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-token cosine between members: outputs ``[M, T, H]`` -> ``[T, M, M]`` (float64)."""
    o = outputs.double()
    o = o / o.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.einsum("mth,nth->tmn", o, o).clamp(-1.0, 1.0)


def angular_similarity(cos: torch.Tensor) -> torch.Tensor:
    """``1 - arccos(cos) / π``: 1 for identical directions, 0.5 for orthogonal, 0 for opposite."""
    return 1.0 - torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def ascending_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row, 0 = smallest (ties by position)."""
    return torch.argsort(torch.argsort(values, dim=-1, stable=True), dim=-1, stable=True)


def _keep_first(kept: dict[int, torch.Tensor], start: int, block: torch.Tensor, limit: int) -> None:
    """Keep rows of ``block`` (which starts at global token ``start``) whose position is below ``limit``."""
    if start < limit:
        kept[start] = block[: limit - start].cpu().clone()


def _kept(kept: dict[int, torch.Tensor], limit: int, empty: torch.Tensor) -> torch.Tensor:
    rows = [kept[s] for s in sorted(kept)]
    return torch.cat(rows)[:limit] if rows else empty


@dataclass
class OutputSimilarity:
    """Mean angular similarity and mean cosine between members' outputs over tokens; the per-token cosine
    matrices of the first ``keep`` tokens."""

    members: int
    keep: int = 64
    angular_sum: torch.Tensor = None
    cosine_sum: torch.Tensor = None
    tokens: int = 0
    kept: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        zeros = lambda: torch.zeros(self.members, self.members, dtype=torch.float64)  # noqa: E731
        self.angular_sum = zeros() if self.angular_sum is None else self.angular_sum
        self.cosine_sum = zeros() if self.cosine_sum is None else self.cosine_sum

    def update(self, outputs: torch.Tensor, start: int) -> None:
        """``outputs`` ``[M, T, H]`` of tokens ``start .. start+T`` (global positions)."""
        cos = token_cosines(outputs)
        self.angular_sum += angular_similarity(cos).sum(0)
        self.cosine_sum += cos.sum(0)
        self.tokens += cos.shape[0]
        _keep_first(self.kept, start, cos.float(), self.keep)

    def merge(self, other: "OutputSimilarity") -> "OutputSimilarity":
        return OutputSimilarity(self.members, self.keep, self.angular_sum + other.angular_sum,
                                self.cosine_sum + other.cosine_sum, self.tokens + other.tokens,
                                {**self.kept, **other.kept})

    def finalize(self) -> dict[str, torch.Tensor]:
        n = max(self.tokens, 1)
        return {"output_similarity": self.angular_sum / n, "output_cosine": self.cosine_sum / n,
                "token_similarity": _kept(self.kept, self.keep, torch.zeros(0, self.members, self.members))}


@dataclass
class NormScoreRanks:
    """``counts[score_rank][norm_rank]`` over tokens and routed experts (ascending ranks)."""

    experts: int
    counts: torch.Tensor = None

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = torch.zeros(self.experts, self.experts, dtype=torch.int64)

    def update(self, norms: torch.Tensor, scores: torch.Tensor) -> None:
        """Routed experts' output norms and router scores, both ``[T, E]``."""
        E = self.experts
        flat = (ascending_ranks(scores) * E + ascending_ranks(norms)).flatten()
        self.counts += torch.bincount(flat, minlength=E * E).view(E, E)

    def merge(self, other: "NormScoreRanks") -> "NormScoreRanks":
        return NormScoreRanks(self.experts, self.counts + other.counts)

    def finalize(self) -> dict:
        """The table and its headline: how often the top-1 (top-2) scored expert has the largest norms."""
        E, counts = self.experts, self.counts
        tokens = max(int(counts[E - 1].sum()), 1)
        share = lambda s, n: float(counts[E - 1 - s, E - 1 - n]) / tokens if E > n and E > s else None  # noqa: E731
        return {"rank_counts": counts.clone(), "tokens": int(counts[E - 1].sum()),
                "top1_largest_norm_fraction": share(0, 0), "top1_second_norm_fraction": share(0, 1),
                "top2_largest_norm_fraction": share(1, 0), "top2_second_norm_fraction": share(1, 1)}


@dataclass
class IntermediateSummary:
    """Per member and neuron: mean |act(W_gate x)| over tokens; fraction of values with |a| below ``tol``; the
    states themselves for the first ``keep`` tokens."""

    widths: dict[str, int]
    tol: float = 1e-3
    abs_sum: dict = field(default_factory=dict)
    near_zero: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    keep: int = 0
    kept: dict = field(default_factory=dict)     # label -> {start: rows}

    def update(self, label: str, act: torch.Tensor, start: int = 0) -> None:
        """``act`` ``[T, I]`` of one member for tokens ``start .. start+T`` (global positions)."""
        a = act.abs().double()
        self.abs_sum[label] = self.abs_sum.get(label, 0) + a.sum(0).cpu()
        self.near_zero[label] = self.near_zero.get(label, 0) + int((a < self.tol).sum())
        self.tokens[label] = self.tokens.get(label, 0) + act.shape[0]
        _keep_first(self.kept.setdefault(label, {}), start, act, self.keep)

    def merge(self, other: "IntermediateSummary") -> "IntermediateSummary":
        add = lambda x, y: {k: x.get(k, 0) + y.get(k, 0) for k in {**x, **y}}  # noqa: E731
        kept = {k: {**self.kept.get(k, {}), **other.kept.get(k, {})} for k in {**self.kept, **other.kept}}
        return IntermediateSummary(self.widths, self.tol, add(self.abs_sum, other.abs_sum),
                                   add(self.near_zero, other.near_zero), add(self.tokens, other.tokens),
                                   self.keep, kept)

    def finalize(self, top: int = 10) -> dict:
        mean_abs = {k: (self.abs_sum[k] / max(self.tokens[k], 1)).float() for k in self.abs_sum}
        return {"mean_abs": mean_abs,
                "near_zero_fraction": {k: self.near_zero[k] / max(self.tokens[k] * self.widths[k], 1)
                                       for k in self.near_zero},
                "top_neurons": {k: torch.topk(v, min(top, v.numel())).indices.tolist() for k, v in mean_abs.items()},
                "kept": {k: _kept(v, self.keep, None) for k, v in self.kept.items() if v}}
