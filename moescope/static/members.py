"""The members of one MoE layer for one matrix: routed experts, shared experts (split), and a dense model's FFN."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.adapter import MoEModel


@dataclass
class LayerMembers:
    """Member labels (``e0..``, ``shared0..``, ``F``) and their canonical matrices, in that order."""

    matrix: str
    labels: list[str]
    matrices: list[torch.Tensor]
    num_routed: int

    @property
    def widths(self) -> list[int]:
        """Each member's number of neurons (its intermediate width)."""
        return [m.shape[-1] if self.matrix == "down" else m.shape[0] for m in self.matrices]


def gather_members(model: MoEModel, layer: int, matrix: str, dense: MoEModel | None = None,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LayerMembers:
    """Read every member's ``matrix`` of ``layer`` (dense model's FFN at the same layer index as ``F``)."""
    experts = model.experts(layer, matrix).to(device=device, dtype=dtype)
    labels = [f"e{i}" for i in range(len(experts))]
    mats = list(experts.unbind(0))
    shared = model.shared_experts(layer, matrix)
    if shared is not None:
        labels += [f"shared{i}" for i in range(len(shared))]
        mats += list(shared.to(device=device, dtype=dtype).unbind(0))
    if dense is not None:
        if layer >= dense.num_layers:
            raise ValueError(f"the dense model has {dense.num_layers} layers; layer {layer} has no F to compare")
        if dense.hidden_size != model.hidden_size:
            raise ValueError(f"the dense model's hidden size {dense.hidden_size} differs from the MoE model's "
                             f"{model.hidden_size}: their FFNs cannot be compared")
        labels.append("F")
        mats.append(dense.dense_ffn(layer, matrix).to(device=device, dtype=dtype))
    return LayerMembers(matrix, labels, mats, len(experts))
