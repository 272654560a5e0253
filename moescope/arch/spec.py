"""Family descriptions (data files in ``arch/families/``) parsed into small frozen dataclasses."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

MATRICES = ("gate", "up", "down")

# canonical name -> config keys to try, in order (dotted paths reach into nested dicts).
# A family file may override any entry in its "config_keys".
CONFIG_KEY_ALIASES: dict[str, list[str]] = {
    "hidden_size": ["hidden_size", "d_model", "n_embd"],
    "num_layers": ["num_hidden_layers", "n_layers", "num_layers", "n_layer"],
    "num_experts": ["num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts",
                    "ffn_config.moe_num_experts"],
    "top_k": ["num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_top_k",
              "ffn_config.moe_top_k"],
    "moe_intermediate_size": ["moe_intermediate_size", "ffn_config.ffn_hidden_size", "ffn_hidden_size",
                              "intermediate_size"],
    "intermediate_size": ["intermediate_size", "ffn_hidden_size"],
    "vocab_size": ["vocab_size"],
}


@dataclass(frozen=True)
class TensorSource:
    """Where one canonical matrix lives on disk and how to turn the stored tensor into it.

    ``packing``: ``per_expert`` (name holds ``{expert}``), ``stacked`` (``[E, ...]``), ``rows``
    (``[E*n, ...]``, expert e = rows ``e*n:(e+1)*n``) or ``single`` (one matrix).
    Per expert, the stored matrix is transposed if ``transpose``, then part ``part`` of ``parts`` is taken
    along axis 0 (contiguous chunks, or every ``parts``-th row from ``part`` if ``interleaved``).
    ``quant``: ``mxfp4`` reads ``{name}_blocks`` / ``{name}_scales``; fp8 tensors are found by dtype.
    """

    name: str
    packing: str = "single"
    transpose: bool = False
    part: int = 0
    parts: int = 1
    interleaved: bool = False
    quant: str | None = None

    @classmethod
    def parse(cls, data: str | Mapping[str, Any]) -> "TensorSource":
        data = {"name": data} if isinstance(data, str) else dict(data)
        data.setdefault("packing", "per_expert" if "{expert}" in data["name"] else "single")
        return cls(**data)

    def stored_names(self, layer: int, expert: int | None = None) -> list[str]:
        """On-disk tensor names (two for mxfp4: blocks and scales)."""
        base = self.name.format(layer=layer, expert=expert)
        return [f"{base}_blocks", f"{base}_scales"] if self.quant == "mxfp4" else [base]

    def select(self, stored: torch.Tensor) -> torch.Tensor:
        """Per-expert stored matrix -> canonical matrix (works on the last two axes)."""
        return self.take_part(stored.transpose(-1, -2) if self.transpose else stored, dim=-2)

    def take_part(self, fused: torch.Tensor, dim: int) -> torch.Tensor:
        """This source's part of a tensor that fuses ``parts`` parts along ``dim``."""
        if self.parts == 1:
            return fused
        if self.interleaved:
            index = [slice(None)] * fused.ndim
            index[dim] = slice(self.part, None, self.parts)
            return fused[tuple(index)]
        return fused.chunk(self.parts, dim=dim)[self.part]

    def fuse(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Inverse of ``take_part``: the fused tensor holding ``parts`` (in part order) along ``dim``."""
        if len(parts) == 1:
            return parts[0]
        if self.interleaved:  # a new axis after ``dim`` alternates the parts, then merges into ``dim``
            if dim >= 0:
                raise ValueError("fuse takes a negative dim")
            return torch.stack(parts, dim=dim).flatten(dim - 1, dim)
        return torch.cat(parts, dim=dim)

    def select_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The canonical shape ``select`` returns for a stored per-expert shape."""
        rows, cols = (shape[-1], shape[-2]) if self.transpose else (shape[-2], shape[-1])
        return (*shape[:-2], rows // self.parts, cols)


@dataclass(frozen=True)
class MatrixSet:
    """gate / up / down sources of one kind of MLP (routed experts, shared experts or dense FFN)."""

    gate: TensorSource
    up: TensorSource
    down: TensorSource
    members: str | int = 1          # shared experts: how many members the stored MLP splits into
    width: str | None = None        # expression for one member's intermediate width
    bias: Mapping[str, TensorSource] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> "MatrixSet | None":
        if data is None:
            return None
        bias = {m: TensorSource.parse(s) for m, s in data.get("bias", {}).items()}
        return cls(*(TensorSource.parse(data[m]) for m in MATRICES), members=data.get("members", 1),
                   width=data.get("width"), bias=bias)

    def source(self, matrix: str) -> TensorSource:
        return getattr(self, matrix)


@dataclass(frozen=True)
class Routing:
    """How the router turns logits into scores and choices (documented in docs/families.md)."""

    scoring: str = "softmax"            # softmax | sigmoid | softmax_topk (softmax over the chosen logits) | sparsemixer
    renormalize: bool | str = False     # constant, or an expression over config (e.g. "norm_topk_prob")
    scaling: float | str = 1.0          # constant or expression (e.g. "routed_scaling_factor")
    group_limited: bool | str = False   # n_group / topk_group selection (DeepSeek-V2/V3); constant or expression
    note: str = ""


@dataclass(frozen=True)
class Execution:
    """Where ``moescope trace`` finds things in the loaded model (module paths relative to a decoder layer).

    ``model_class``: a transformers class name, or ``moescope:<family>`` for a clean-room implementation in
    ``moescope.modeling``. ``router_outputs`` gives the position of ``logits`` / ``weights`` / ``indices`` in
    the tuple the router module returns (``logits: null`` when it returns the logits tensor alone); what a
    router does not return is recomputed from the family's routing rule.
    """

    model_class: str = ""
    layers: str = "model.layers"
    block: str = "mlp"
    router: str = "mlp.gate"
    router_outputs: Mapping[str, int | None] = field(
        default_factory=lambda: {"logits": 0, "weights": 1, "indices": 2})


@dataclass(frozen=True)
class Family:
    """One family of checkpoints, as described by its data file."""

    name: str
    title: str
    models: tuple[str, ...]
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    activation: str
    routing: Routing
    execution: Execution
    moe_layer: str                      # expression over `layer` and config values
    config_keys: Mapping[str, list[str]]
    defaults: Mapping[str, Any]
    router: TensorSource | None
    router_bias: TensorSource | None
    score_correction_bias: TensorSource | None
    experts: MatrixSet | None
    shared: MatrixSet | None
    shared_gate: TensorSource | None
    dense: MatrixSet | None
    fp8_scale_suffix: str
    layout: Mapping[str, Any]
    reference_configs: Mapping[str, Mapping[str, Any]]
    source_file: Path

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

    @classmethod
    def load(cls, path: Path) -> "Family":
        data = json.loads(path.read_text())
        tensors = data.get("tensors", {})
        optional = lambda key: TensorSource.parse(tensors[key]) if key in tensors else None  # noqa: E731
        return cls(
            name=data["family"], title=data["title"], models=tuple(data.get("models", ())),
            architectures=tuple(data["match"].get("architectures", ())),
            model_types=tuple(data["match"].get("model_type", ())),
            activation=data.get("activation", "silu"), routing=Routing(**data.get("routing", {})),
            execution=Execution(**{"model_class": data["match"].get("architectures", [""])[0],
                                   **data.get("execution", {})}),
            moe_layer=data.get("moe_layer", "True"),
            config_keys={**CONFIG_KEY_ALIASES, **data.get("config_keys", {})},
            defaults=data.get("defaults", {}),
            router=optional("router"), router_bias=optional("router_bias"),
            score_correction_bias=optional("score_correction_bias"),
            experts=MatrixSet.parse(tensors.get("experts")), shared=MatrixSet.parse(tensors.get("shared")),
            shared_gate=optional("shared_gate"), dense=MatrixSet.parse(tensors.get("dense")),
            fp8_scale_suffix=data.get("fp8_scale_suffix", "_scale_inv"),
            layout=data.get("layout", {}), reference_configs=data.get("reference_configs", {}),
            source_file=path,
        )
