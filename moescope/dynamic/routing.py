"""Router scores from logits, and the top-k choice for routers whose module returns logits only.

Scores are the distribution over all routed experts that the analyses use: softmax of the logits (plus the
router bias where the family has one), or the sigmoid scores of DeepSeek-V3-style routers.
"""
from __future__ import annotations

import torch

from ..arch.adapter import RoutingFacts


def router_scores(logits: torch.Tensor, facts: RoutingFacts) -> torch.Tensor:
    """``[T, E]`` float32 scores: sigmoid for sigmoid routers, else softmax over all routed experts.

    ``logits`` are what the router module returns (gpt-oss includes its router bias there)."""
    z = logits.float()
    return torch.sigmoid(z) if facts.scoring == "sigmoid" else torch.softmax(z, dim=-1)


def select_experts(logits: torch.Tensor, facts: RoutingFacts) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's plain top-k rule ``(weights [T, k], indices [T, k])``, for routers whose module returns
    the logits alone (DBRX, JetMoE). Group-limited routers always return their own choice."""
    if facts.group_limited:
        raise NotImplementedError("group-limited routers return their choice; it is captured, not recomputed")
    if facts.scoring == "softmax_topk":
        top, indices = torch.topk(logits.float(), facts.top_k, dim=-1)
        return torch.softmax(top, dim=-1) * facts.scaling, indices
    scores = router_scores(logits, facts)
    weights, indices = torch.topk(scores, facts.top_k, dim=-1)
    if facts.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * facts.scaling, indices
