"""Calibration for compression: one traced forward pass, then each MoE layer's block input, block output, router
and every routed expert's output, and a simulator of the layer under an edited expert set.

The simulator recomputes the routing with the family's rule (``moescope.dynamic.routing.select_experts``: scores,
top-k, renormalisation and scaling exactly as the family does) from the block input ``x`` and an edited router,
then rebuilds the block output ``Σ_k w_k E_{i_k}(x) + shared(x)``. It never propagates an edit to later layers:
every layer is scored on the block inputs of the original model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..arch.adapter import MoEModel
from ..dynamic.experts import activation, layer_members, member_outputs
from ..dynamic.forward import LayerTrace, forward_pass
from ..dynamic.inputs import Document, context_length, documents_hash, encode_documents
from ..dynamic.loader import load_model, load_tokenizer, resolve_device, resolve_dtype
from ..dynamic.routing import router_scores, select_experts
from .errors import CalibrationError, UnsupportedLayoutError

MIN_CALIBRATION_TOKENS = 64


def check_routing(model: MoEModel) -> None:
    """Refuse models whose routing the simulator cannot recompute from the router weights."""
    if not model.family.is_moe:
        raise UnsupportedLayoutError(f"'{_where(model)}' is a dense {model.family.title} checkpoint: there are no "
                                     "experts to prune or merge")
    facts = model.routing
    if facts.group_limited:
        raise UnsupportedLayoutError(
            f"{model.family.title} routes within expert groups (n_group={facts.num_groups}, topk_group="
            f"{facts.top_groups}); removing experts would break the groups. moescope compress supports plain "
            "top-k routers (Mixtral, Qwen-MoE, OLMoE, DeepSeekMoE, Grok-1, DBRX, ...)")
    if facts.scoring == "sparsemixer":
        raise UnsupportedLayoutError(
            f"{model.family.title} uses SparseMixer routing, which moescope does not recompute; "
            "compress supports softmax, sigmoid and softmax-over-top-k routers")


def _where(model: MoEModel) -> str:
    return str(model.checkpoint.path) if model.checkpoint is not None else model.family.name


@dataclass
class Calibration:
    """The calibration documents and each MoE layer's trace (block input and output per token)."""

    documents: list[Document]
    traces: dict[int, LayerTrace]

    @property
    def tokens(self) -> int:
        return sum(len(d.ids) for d in self.documents)

    def describe(self) -> dict:
        return {"documents": len(self.documents), "tokens": self.tokens,
                "documents_sha256": documents_hash(self.documents)}


def model_context(model: MoEModel, context: int | None = None) -> int:
    """Longest document fed to the model: ``context`` if given, else its ``max_position_embeddings``."""
    if context is not None:
        if context < 2:
            raise CalibrationError(f"context must be at least 2 tokens, got {context}")
        return int(context)
    return context_length(model)


def encode_calibration(model: MoEModel, texts: Sequence[str] | None, max_tokens: int | None,
                       min_tokens: int = MIN_CALIBRATION_TOKENS, context: int | None = None) -> list[Document]:
    """Encode calibration texts (each a document, BOS first, split at ``context`` tokens); refuse too little text."""
    if texts is None or not [t for t in texts if t and t.strip()]:
        raise CalibrationError("no calibration text: this strategy scores experts on a forward pass over text. "
                               "Give calibration texts (e.g. --text FILE or --documents DIR), or use "
                               "strategy 'random', which needs none")
    tokenizer = load_tokenizer(model)
    documents = encode_documents(tokenizer, list(texts), model_context(model, context), max_tokens)
    tokens = sum(len(d.ids) for d in documents)
    if tokens < min_tokens:
        raise CalibrationError(
            f"the calibration text gives only {tokens} tokens; at least {min_tokens} are needed to score "
            f"{model.num_experts} experts per layer (a few thousand are better). Give more text"
            + (f" or raise max_tokens (now {max_tokens})" if max_tokens is not None and max_tokens < min_tokens
               else ""))
    return documents


def calibrate(model: MoEModel, texts: Sequence[str] | None, *, layers: Sequence[int] | None = None,
              max_tokens: int | None = 2048, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
              min_tokens: int = MIN_CALIBRATION_TOKENS, context: int | None = None,
              progress: bool = True) -> Calibration:
    """One forward pass over the calibration texts, capturing every MoE layer's block input and output.

    Documents longer than ``context`` tokens (default: the model's ``max_position_embeddings``) are split."""
    documents = encode_calibration(model, texts, max_tokens, min_tokens, context)
    device = resolve_device(device)
    net = load_model(model, device, resolve_dtype(dtype, device))
    try:  # padding is masked out, so any pad id will do
        traces = forward_pass(net, model.family.execution, list(layers or model.moe_layers), documents, batch_size,
                              device, pad_id=0, router=False, progress=progress, desc="calibrate")
    finally:
        del net
    return Calibration(documents, traces)


@dataclass
class LayerData:
    """What one MoE layer did on the calibration tokens (float32, on ``device``).

    ``outputs`` is the output bank: row e holds routed expert e's output on ``x``; merged experts' outputs are
    appended as new rows (see :meth:`add_output`). ``shared`` is the always-on part of the block (shared experts,
    times Qwen's sigmoid gate), zeros where the family has none. ``weights``/``indices``/``scores`` are the
    original routing recomputed by the family rule from ``x`` and the router.
    """

    layer: int
    x: torch.Tensor
    y: torch.Tensor
    router: torch.Tensor
    router_bias: torch.Tensor | None
    outputs: torch.Tensor
    shared: torch.Tensor
    weights: torch.Tensor = field(init=False)
    indices: torch.Tensor = field(init=False)
    scores: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.y_norm = float(self.y.double().norm())

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def add_output(self, output: torch.Tensor) -> int:
        """Append a member's output ``[T, H]`` to the bank; return its row."""
        self.outputs = torch.cat([self.outputs, output[None]])
        return self.outputs.shape[0] - 1


def layer_data(model: MoEModel, layer: int, trace: LayerTrace, device: str = "cpu",
               chunk_tokens: int = 2048) -> LayerData:
    """Recompute every routed and shared member's output on the traced block inputs of ``layer``."""
    x = trace.inputs.to(device=device, dtype=torch.float32)
    glu = activation(model)
    members = layer_members(model, layer, device=device)
    E = model.num_experts
    outputs = torch.empty(E, x.shape[0], model.hidden_size, device=device)
    shared = torch.zeros(x.shape[0], model.hidden_size, device=device)
    for i, member in enumerate(members):
        out = member_outputs(x, member.load(), glu, chunk_tokens)
        if i < E:
            outputs[i] = out
        else:
            shared += out
    gate = model.shared_gate(layer)
    if gate is not None:
        shared = shared * torch.sigmoid(x @ gate.to(device, torch.float32).T)
    bias = model.router_bias(layer)
    data = LayerData(layer, x, trace.output.to(device=device, dtype=torch.float32),
                     model.router(layer).to(device, torch.float32),
                     None if bias is None else bias.to(device, torch.float32), outputs, shared)
    data.scores, data.weights, data.indices = route(model, x, data.router, data.router_bias)
    return data


def route(model: MoEModel, x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores [T, E], weights [T, k], indices [T, k])`` of the family's rule for router rows ``router``."""
    logits = x @ router.T
    if bias is not None:
        logits = logits + bias
    weights, indices = select_experts(logits, model.routing)
    return router_scores(logits, model.routing), weights, indices


def simulate(model: MoEModel, data: LayerData, router: torch.Tensor, bias: torch.Tensor | None,
             slots: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """The block output ``[T, H]`` when the layer holds the experts whose router rows are ``router`` ``[E', H]``
    and whose outputs are bank rows ``slots`` ``[E']`` (slot -1: the output ``extra`` ``[T, H]``)."""
    if router.shape[0] < model.routing.top_k:
        raise ValueError(f"{router.shape[0]} experts cannot serve top-{model.routing.top_k} routing")
    _, weights, indices = route(model, data.x, router, bias)
    chosen = slots.to(indices.device)[indices]                        # [T, k] bank rows
    is_extra = chosen < 0
    rows = torch.arange(data.tokens, device=indices.device)[:, None]
    routed = (data.outputs[chosen.clamp_min(0), rows] * (weights * ~is_extra)[..., None]).sum(1)
    if extra is not None and bool(is_extra.any()):
        routed = routed + (weights * is_extra).sum(1, keepdim=True) * extra
    return routed + data.shared


def relative_error(rebuilt: torch.Tensor, data: LayerData) -> float:
    """``||rebuilt - y|| / ||y||`` against the block output captured in the original forward pass."""
    return float((rebuilt.double() - data.y.double()).norm() / max(data.y_norm, 1e-30))
