"""Every member's output on the captured block inputs: ``W_down · (act(W_gate x) ⊙ (W_up x))``.

Members are the routed experts ``e0..``, the shared members ``shared0..`` and the dense model's FFN ``F``.
Their weights come from the checkpoint through the family adapter (the same canonical view as the static
analyses), one member at a time, so memory holds one member's matrices plus the outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..arch.adapter import MoEModel

Glu = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _plain(act: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Mapping], Glu]:
    def make(config: Mapping) -> Glu:
        def glu(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a = act(gate)
            return a, a * up
        return glu
    return make


def _swiglu_oai(config: Mapping) -> Glu:
    """gpt-oss: clamped gate and up, ``gate · σ(α gate)``, times ``up + 1``."""
    alpha, limit = float(config.get("swiglu_alpha", 1.702)), float(config.get("swiglu_limit", 7.0))

    def glu(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = gate.clamp(max=limit)
        a = gate * torch.sigmoid(alpha * gate)
        return a, a * (up.clamp(-limit, limit) + 1)
    return glu


ACTIVATIONS: dict[str, Callable[[Mapping], Glu]] = {
    "silu": _plain(F.silu),
    "gelu": _plain(F.gelu),
    "gelu_tanh": _plain(lambda x: F.gelu(x, approximate="tanh")),
    "swiglu_oai": _swiglu_oai,
}


def activation(model: MoEModel) -> Glu:
    """The family's gated activation: ``(gate_pre, up_pre) -> (act(gate_pre), act(gate_pre) ⊙ up')``."""
    return ACTIVATIONS[model.family.activation](model.config)


@dataclass
class MemberWeights:
    """One member's canonical matrices (gate/up ``[I, H]``, down ``[H, I]``) and optional biases."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    bias: Mapping[str, torch.Tensor]

    def forward(self, x: torch.Tensor, glu: Glu) -> tuple[torch.Tensor, torch.Tensor]:
        """``(act(W_gate x) [T, I], member output [T, H])`` for block inputs ``x`` ``[T, H]``."""
        g, u = x @ self.gate.T, x @ self.up.T
        if self.bias:
            g, u = g + self.bias["gate"], u + self.bias["up"]
        a, h = glu(g, u)
        out = h @ self.down.T
        return a, (out + self.bias["down"] if self.bias else out)


@dataclass
class Member:
    """A member of an MoE layer, its weights read when ``load`` is called."""

    label: str
    width: int
    load: Callable[[], MemberWeights]


def layer_members(model: MoEModel, layer: int, dense: MoEModel | None = None, device="cpu",
                  dtype=torch.float32) -> list[Member]:
    """Routed experts, shared members and (with ``dense``) the dense model's FFN ``F`` at the same layer."""
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731

    def routed(e: int) -> MemberWeights:
        mats = {m: cast(model.expert(layer, e, m)) for m in ("gate", "up", "down")}
        biases = {m: model.expert_bias(layer, m) for m in ("gate", "up", "down")}
        bias = {m: cast(b[e]) for m, b in biases.items() if b is not None}
        return MemberWeights(**mats, bias=bias)

    def shared(s: int) -> MemberWeights:
        return MemberWeights(**{m: cast(model.shared_experts(layer, m)[s]) for m in ("gate", "up", "down")}, bias={})

    def ffn() -> MemberWeights:
        return MemberWeights(**{m: cast(dense.dense_ffn(layer, m)) for m in ("gate", "up", "down")}, bias={})

    labels, widths = model.member_labels(layer), model.member_widths(layer)
    members = [Member(label, width, (lambda i=i: routed(i)) if label.startswith("e") else
                      (lambda i=i - model.num_experts: shared(i)))
               for i, (label, width) in enumerate(zip(labels, widths))]
    if dense is not None:
        members.append(Member("F", dense.dense_width, ffn))
    return members


def member_outputs(x: torch.Tensor, weights: MemberWeights, glu: Glu, chunk_tokens: int = 4096,
                   on_intermediate: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """One member's output ``[T, H]`` on ``x`` ``[T, H]``, computed in token chunks; ``on_intermediate(start,
    act)`` sees each chunk's ``act(W_gate x)`` (so callers can summarise it without keeping it)."""
    out = torch.empty(x.shape[0], weights.down.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_tokens):
        a, out[start:start + chunk_tokens] = weights.forward(x[start:start + chunk_tokens], glu)
        if on_intermediate is not None:
            on_intermediate(start, a)
    return out
