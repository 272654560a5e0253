"""Importance of every routed expert of an MoE layer, from the calibration tokens (definitions:
``docs/compression.md``).

Over the T calibration tokens, with ``w_e(t)`` the routing weight of expert e at token t (0 when e is not among
the chosen top-k) and ``E_e(x_t)`` its output on the block input:

* ``top1_frequency``: share of tokens whose largest-weight chosen expert is e;
* ``topk_frequency``: share of tokens that choose e among their top-k;
* ``soft_count``: ``Σ_t w_e(t)`` (the routing mass e receives);
* ``mean_output_norm``: ``mean_t ||E_e(x_t)||`` over all tokens (chosen or not);
* ``weighted_output_norm``: ``mean_t w_e(t) ||E_e(x_t)||`` over all tokens (e's expected contribution);
* ``removal_error``: relative L2 error ``||y' - y|| / ||y||`` of the block output when e is removed: its router row
  is dropped, so the family's rule (scores over the remaining experts, top-k, renormalisation) reroutes its tokens
  to the next-best experts; ``y`` is the block output captured in the original forward pass.

``baseline_error`` is the same error with no expert removed (the simulator's own precision).
"""
from __future__ import annotations

import torch

from ..arch.adapter import MoEModel
from ..dynamic.routing_stats import top1_experts
from .calibrate import LayerData, relative_error, simulate

SCORES = ("top1_frequency", "topk_frequency", "soft_count", "mean_output_norm", "weighted_output_norm",
          "removal_error")


def routing_weight_matrix(data: LayerData) -> torch.Tensor:
    """``W [T, E]``: the routing weight of every expert at every token (0 where not chosen)."""
    W = torch.zeros(data.tokens, data.num_experts, dtype=torch.float64, device=data.x.device)
    return W.scatter_(1, data.indices, data.weights.double())


def expert_importance(model: MoEModel, data: LayerData) -> dict:
    """``{score name: [E floats], "baseline_error": float, "tokens": T}`` for one layer."""
    E, T = data.num_experts, data.tokens
    W = routing_weight_matrix(data)
    top1 = torch.as_tensor(top1_experts(data.indices.cpu().numpy(), data.weights.cpu().numpy()))
    norms = data.outputs[:E].double().norm(dim=-1)                       # [E, T]
    every = torch.arange(E, device=data.x.device)
    removal = []
    for e in range(E):
        keep = every[every != e]
        rebuilt = simulate(model, data, data.router[keep], _rows(data.router_bias, keep), keep)
        removal.append(relative_error(rebuilt, data))
    scores = {
        "top1_frequency": (torch.bincount(top1, minlength=E).double() / T).tolist(),
        "topk_frequency": (torch.bincount(data.indices.flatten().cpu(), minlength=E).double() / T).tolist(),
        "soft_count": W.sum(0).cpu().tolist(),
        "mean_output_norm": norms.mean(1).cpu().tolist(),
        "weighted_output_norm": (W.T * norms).mean(1).cpu().tolist(),
        "removal_error": removal,
    }
    baseline = relative_error(simulate(model, data, data.router, data.router_bias, every), data)
    return {**scores, "baseline_error": baseline, "tokens": T}


def _rows(bias: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias[keep]
