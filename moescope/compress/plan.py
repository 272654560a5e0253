"""Which experts to prune or merge: greedy strategies over the simulated layers (``docs/compression.md``).

Every strategy removes ``count`` experts from each MoE layer (the config holds one expert count for all layers).
With ``per_layer=True`` each layer chooses by its own scores; with ``per_layer=False`` the same action (the same
expert index, or the same pair of member positions) is taken in every layer, chosen by the score averaged over
layers.

Pruning strategies: ``loss`` (greedy: remove the expert whose removal gives the smallest block-output error given
the experts already removed), ``frequency`` (the least often chosen, by top-k frequency, ties by soft count),
``weighted_norm`` (the smallest expected contribution ``mean_t w_e(t) ||E_e(x_t)||``), ``random`` (seeded).
Merging strategies: ``similarity`` (greedy average-linkage clustering: merge the pair of members whose original
experts have the highest mean pairwise neuron-matched similarity), ``output`` (greedy: merge the pair whose merge
gives the smallest block-output error), ``random`` (a seeded random pair at each step).
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import torch

from ..arch.adapter import MoEModel
from ..dynamic.experts import MemberWeights, activation, member_outputs
from .calibrate import LayerData, relative_error, simulate
from .candidates import Member, PairMatch, Weights, merge_members, pair_match
from .errors import CompressionError

PRUNE_STRATEGIES = ("loss", "frequency", "weighted_norm", "random")
MERGE_STRATEGIES = ("similarity", "output", "random")
DEFAULT_STRATEGY = {"prune": "loss", "merge": "similarity"}
NEEDS_CALIBRATION = {("prune", "loss"), ("prune", "frequency"), ("prune", "weighted_norm"), ("merge", "similarity"),
                     ("merge", "output")}


class LayerState:
    """The members of one MoE layer while it is being edited, with its calibration data (or None)."""

    def __init__(self, model: MoEModel, layer: int, data: LayerData | None, usage: Sequence[float] | None,
                 weighting: str = "usage", device: str = "cpu", router_merge: str = "average"):
        self.model, self.layer, self.data, self.weighting, self.device = model, layer, data, weighting, device
        self.router_merge = router_merge
        router = data.router if data is not None else model.router(layer).to(device, torch.float32)
        bias = data.router_bias if data is not None else model.router_bias(layer)
        bias = None if bias is None else bias.to(device, torch.float32)
        self.members = [Member((e,), (1.0,), router[e], None if bias is None else bias[e],
                               float(usage[e]) if usage is not None else 0.0, slot=e if data is not None else -1)
                        for e in range(model.num_experts)]
        self._initial = list(self.members)
        self._originals: dict[int, Weights] = {}
        self._matches: dict[tuple, PairMatch] = {}
        self._merged: dict[tuple, tuple[Member, torch.Tensor | None]] = {}
        self._glu = activation(model)

    # -- weights and matchings ------------------------------------------------------------------------------
    def weights(self, member: Member) -> Weights:
        if member.weights is not None:
            return member.weights
        e = member.sources[0]
        if e not in self._originals:
            self._originals[e] = {m: self.model.expert(self.layer, e, m).to(self.device, torch.float32)
                                  for m in ("gate", "up", "down")}
        return self._originals[e]

    def match(self, a: Member, b: Member) -> PairMatch:
        key = (a.sources, b.sources)
        if key not in self._matches:
            self._matches[key] = pair_match(self.weights(a), self.weights(b))
        return self._matches[key]

    def linkage(self, a: Member, b: Member) -> float:
        """Average-linkage similarity: mean neuron-matched similarity over pairs of original experts, one from
        each member (the members' own similarity for two original experts)."""
        sims = [self.match(self._initial[x], self._initial[y]).similarity for x in a.sources for y in b.sources]
        return float(np.mean(sims))

    def merged(self, i: int, j: int) -> tuple[Member, torch.Tensor | None]:
        """Members i and j merged (b aligned to a), and the merged expert's outputs (None without data)."""
        a, b = self.members[i], self.members[j]
        key = (a.sources, b.sources)
        if key not in self._merged:
            member = merge_members(a, b, self.match(a, b), self.weights, self.weighting)
            if self.router_merge == "fit" and self.data is not None:
                member.router = fit_router(self.model, self.data, a, b, member)
            out = None
            if self.data is not None:
                out = member_outputs(self.data.x, MemberWeights(**member.weights, bias={}), self._glu)
            self._merged[key] = (member, out)
        return self._merged[key]

    # -- simulated errors --------------------------------------------------------------------------------------
    def error(self, members: Sequence[Member], extra: torch.Tensor | None = None) -> float | None:
        """Relative block-output error of the layer holding ``members`` (slot -1 = ``extra``)."""
        if self.data is None:
            return None
        router = torch.stack([m.router for m in members])
        bias = None if members[0].bias is None else torch.stack([m.bias for m in members])
        slots = torch.tensor([m.slot for m in members], device=router.device)
        return relative_error(simulate(self.model, self.data, router, bias, slots, extra), self.data)

    def error_without(self, i: int) -> float | None:
        return self.error(self.members[:i] + self.members[i + 1:])

    def error_merged(self, i: int, j: int) -> float | None:
        if self.data is None:
            return None
        member, out = self.merged(i, j)
        member.slot = -1
        return self.error(self._replaced(i, j, member), out)

    def current_error(self) -> float | None:
        return self.error(self.members)

    # -- edits --------------------------------------------------------------------------------------------------
    def _replaced(self, i: int, j: int, member: Member) -> list[Member]:
        rest = [m for k, m in enumerate(self.members) if k not in (i, j)]
        return sorted(rest + [member], key=lambda m: m.anchor)

    def prune(self, i: int) -> None:
        del self.members[i]

    def merge(self, i: int, j: int) -> Member:
        member, out = self.merged(i, j)
        if out is not None:
            member.slot = self.data.add_output(out)
        gone = set(self.members[i].sources) | set(self.members[j].sources)
        self.members = self._replaced(i, j, member)
        self._merged = {k: v for k, v in self._merged.items() if not gone & set(k[0] + k[1])}
        return member


def fit_router(model: MoEModel, data: LayerData, a: Member, b: Member, merged: Member,
               ridge: float = 1e-3) -> torch.Tensor:
    """Router row of the merged expert fitted so that its logit carries the routing mass of both members.

    Target logit per calibration token: ``log(exp(l_a) + exp(l_b))`` for softmax routers (the merged expert's
    softmax score is then ``p_a + p_b`` and every other expert's score is unchanged), ``logit(σ(l_a) + σ(l_b))``
    (capped below 1) for sigmoid routers. Least squares over the tokens, with a ridge pull (``ridge`` times the mean
    eigenvalue of ``XᵀX``) towards the usage-weighted average row.
    """
    x = data.x.double()
    def logit(m: Member) -> torch.Tensor:
        z = x @ m.router.double()
        return z if m.bias is None else z + m.bias.double()
    la, lb = logit(a), logit(b)
    if model.routing.scoring == "sigmoid":
        s = (torch.sigmoid(la) + torch.sigmoid(lb)).clamp(max=1 - 1e-6)
        target = torch.log(s) - torch.log1p(-s)
    else:
        target = torch.logaddexp(la, lb)
    if merged.bias is not None:
        target = target - merged.bias.double()
    prior = merged.router.double()
    gram = x.T @ x
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    row = torch.linalg.solve(gram + lam * eye, x.T @ target + lam * prior)
    return row.to(merged.router.dtype)


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def _rng(seed: int, group: Sequence[int]) -> np.random.Generator:
    return np.random.default_rng([seed, *group])


def plan_prune(states: dict[int, LayerState], count: int, strategy: str, per_layer: bool = True,
               importance: dict[int, dict] | None = None, seed: int = 0) -> dict[int, list[dict]]:
    """Prune ``count`` experts in every layer of ``states``; return each layer's decisions (``states`` edited)."""
    if strategy not in PRUNE_STRATEGIES:
        raise CompressionError(f"unknown pruning strategy {strategy!r}; choose from {', '.join(PRUNE_STRATEGIES)}")
    decisions: dict[int, list[dict]] = {layer: [] for layer in states}
    for group in _groups(states, per_layer):
        rng = _rng(seed, group)
        for step in range(count):
            members = states[group[0]].members
            if strategy == "loss":
                errors = {i: [states[l].error_without(i) for l in group] for i in range(len(members))}
                scores = {i: _mean(v) for i, v in errors.items()}
                pick = min(scores, key=lambda i: (scores[i], i))
                score, name = scores[pick], "block_error_after"
            elif strategy == "random":
                pick, score, name = int(rng.integers(len(members))), None, None
            else:
                key = "topk_frequency" if strategy == "frequency" else "weighted_output_norm"
                scores = {i: (_mean([importance[l][key][m.sources[0]] for l in group]),
                              _mean([importance[l]["soft_count"][m.sources[0]] for l in group]))
                          for i, m in enumerate(members)}
                pick = min(scores, key=lambda i: (scores[i], i))
                score, name = scores[pick][0], key
            for layer in group:
                state = states[layer]
                expert = state.members[pick].sources[0]
                record = {"step": step + 1, "action": "prune", "expert": expert, "score_name": name, "score": score}
                if strategy == "loss":
                    record["scores"] = {str(m.sources[0]): scores[i] for i, m in enumerate(state.members)}
                    record["layer_error"] = errors[pick][group.index(layer)]
                state.prune(pick)
                decisions[layer].append(record)
    return decisions


def plan_merge(states: dict[int, LayerState], count: int, strategy: str, per_layer: bool = True,
               seed: int = 0) -> dict[int, list[dict]]:
    """Merge ``count`` times in every layer of ``states`` (each merge removes one expert); return decisions."""
    if strategy not in MERGE_STRATEGIES:
        raise CompressionError(f"unknown merging strategy {strategy!r}; choose from {', '.join(MERGE_STRATEGIES)}")
    decisions: dict[int, list[dict]] = {layer: [] for layer in states}
    for group in _groups(states, per_layer):
        rng = _rng(seed, group)
        for step in range(count):
            pairs = list(combinations(range(len(states[group[0]].members)), 2))
            if strategy == "similarity":
                sims = {p: _mean([states[l].linkage(*(states[l].members[k] for k in p)) for l in group])
                        for p in pairs}
                pick = max(pairs, key=lambda p: (sims[p], -p[0], -p[1]))
            elif strategy == "output":
                errs = {p: _mean([states[l].error_merged(*p) for l in group]) for p in pairs}
                pick = min(pairs, key=lambda p: (errs[p], p))
            else:
                pick = pairs[int(rng.integers(len(pairs)))]
            for layer in group:
                state = states[layer]
                a, b = (state.members[k] for k in pick)
                match = state.match(a, b)
                linkage = state.linkage(a, b)
                after = state.error_merged(*pick)
                merged = state.merge(*pick)
                decisions[layer].append({
                    "step": step + 1, "action": "merge", "members": [list(a.sources), list(b.sources)],
                    "into": list(merged.sources), "merge_weights": list(merged.merge_weights),
                    "similarity": match.similarity, "linkage": linkage, "weight_cosine": match.weight_cosine,
                    "block_error_after": after,
                    "score_name": {"similarity": "linkage", "output": "block_error_after"}.get(strategy),
                    "score": {"similarity": linkage, "output": after}.get(strategy)})
    return decisions


def merge_candidates(state: LayerState, limit: int | None = None) -> list[dict]:
    """Every pair of the layer's current members ranked by neuron-matched similarity (highest first); the first
    ``limit`` (all with None) also get ``block_error_after``: the block-output error when that pair alone is merged."""
    members = state.members
    rows = []
    for i, j in combinations(range(len(members)), 2):
        match = state.match(members[i], members[j])
        rows.append({"a": list(members[i].sources), "b": list(members[j].sources), "similarity": match.similarity,
                     "weight_cosine": match.weight_cosine, "pair": (i, j)})
    rows.sort(key=lambda r: (-r["similarity"], r["pair"]))
    for rank, row in enumerate(rows):
        pair = row.pop("pair")
        row["rank"] = rank + 1
        if state.data is not None and (limit is None or rank < limit):
            row["block_error_after"] = state.error_merged(*pair)
    return rows


def _groups(states: dict[int, LayerState], per_layer: bool) -> list[list[int]]:
    layers = sorted(states)
    return [[l] for l in layers] if per_layer else [layers]
