"""The one forward pass of ``moescope trace``: documents in batches (right-padded, masked), every chosen MoE
layer's block input, block output and router outputs gathered per token in document order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..arch.spec import Execution
from .capture import capture_blocks
from .inputs import Document


@dataclass
class LayerTrace:
    """One layer over all tokens of all documents (token axis = documents concatenated in order)."""

    inputs: torch.Tensor                    # [T, H] block input
    output: torch.Tensor                    # [T, H] block output
    router: dict[str, torch.Tensor] = field(default_factory=dict)   # logits [T, E], weights / indices [T, k]


def batches(documents: Sequence[Document], batch_size: int) -> list[list[Document]]:
    """Consecutive groups of ``batch_size`` documents."""
    return [list(documents[i:i + batch_size]) for i in range(0, len(documents), batch_size)]


def forward_pass(net: torch.nn.Module, execution: Execution, layers: Sequence[int], documents: Sequence[Document],
                 batch_size: int = 8, device: str = "cpu", pad_id: int = 0, router: bool = True,
                 progress: bool = True, desc: str = "forward") -> dict[int, LayerTrace]:
    """Run every document through ``net`` once; return each layer's trace, padding removed."""
    parts: dict[int, dict[str, list[torch.Tensor]]] = {layer: {} for layer in layers}
    input_device = "cpu" if device == "map" else device
    bar = tqdm(total=sum(len(d.ids) for d in documents), desc=desc, unit="tok", disable=not progress)
    with capture_blocks(net, execution, layers, router=router) as store, torch.inference_mode():
        for group in batches(documents, batch_size):
            width = max(len(d.ids) for d in group)
            ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, doc in enumerate(group):
                ids[row, :len(doc.ids)] = torch.tensor(doc.ids)
                mask[row, :len(doc.ids)] = 1
            net(input_ids=ids.to(input_device), attention_mask=mask.to(input_device), use_cache=False)
            for layer in layers:
                _harvest(parts[layer], store[layer], group, width)
            bar.update(int(mask.sum()))
    bar.close()
    return {layer: _concat(p) for layer, p in parts.items()}


def _harvest(parts: dict[str, list[torch.Tensor]], capture, group: list[Document], width: int) -> None:
    """Append the real (unpadded) tokens of each document of the batch, in order."""
    named = {"inputs": capture.inputs, "output": capture.output,
             **{k: v.reshape(len(group), width, -1) for k, v in capture.router.items()}}
    for name, value in named.items():
        parts.setdefault(name, []).extend(value[row, :len(doc.ids)] for row, doc in enumerate(group))


def _concat(parts: dict[str, list[torch.Tensor]]) -> LayerTrace:
    joined = {k: torch.cat(v) for k, v in parts.items()}
    return LayerTrace(joined.pop("inputs"), joined.pop("output"), joined)
