"""Scoped capture of what enters and leaves each MoE block during a normal forward pass.

``capture_blocks`` hooks, for the chosen layers, the MoE block's input (the hidden state after the norm that
precedes it), its output, and the router module's output, and removes every hook on exit. Hooks only copy
tensors; they never change what the model computes.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..arch.spec import Execution


@dataclass
class BlockCapture:
    """What one forward call showed of one MoE block: block input/output ``[B, S, H]`` and the router's
    outputs, as the router module returned them (``logits`` ``[B*S, E]``, ``weights``/``indices`` ``[B*S, k]``)."""

    inputs: torch.Tensor | None = None
    output: torch.Tensor | None = None
    router: dict[str, torch.Tensor] = field(default_factory=dict)


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float32, copy=True)


def decoder_layers(model: torch.nn.Module, execution: Execution) -> torch.nn.ModuleList:
    """The model's list of decoder layers (``model.layers`` for most families)."""
    return model.get_submodule(execution.layers)


@contextmanager
def capture_blocks(model: torch.nn.Module, execution: Execution, layers: Sequence[int],
                   router: bool = True) -> Iterator[dict[int, BlockCapture]]:
    """Within the ``with`` block, every forward call fills ``{layer: BlockCapture}`` (the latest call wins)."""
    store = {layer: BlockCapture() for layer in layers}
    handles = []
    blocks = decoder_layers(model, execution)
    for layer in layers:
        entry = store[layer]
        block = blocks[layer].get_submodule(execution.block)

        def on_input(module, args, kwargs, entry=entry):
            entry.inputs = _copy(args[0] if args else kwargs["hidden_states"])

        def on_output(module, args, output, entry=entry):
            entry.output = _copy(_first(output))

        handles += [block.register_forward_pre_hook(on_input, with_kwargs=True),
                    block.register_forward_hook(on_output)]
        if router:
            def on_router(module, args, output, entry=entry):
                outputs = output if isinstance(output, (tuple, list)) else (output,)
                for name, position in execution.router_outputs.items():
                    value = outputs[position or 0]
                    entry.router[name] = value.detach().reshape(-1, value.shape[-1]).cpu()
            handles.append(blocks[layer].get_submodule(execution.router).register_forward_hook(on_router))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
