"""The one generic adapter: any family's checkpoint -> canonical expert tensors, read lazily.

Canonical orientation (nn.Linear, ``[out, in]``): ``gate`` and ``up`` are ``[I, H]``, ``down`` is ``[H, I]``;
``experts(l, m)`` stacks them to ``[E, I, H]`` / ``[E, H, I]``; ``router(l)`` is ``[E, H]``. A neuron i is
(row i of gate, row i of up, column i of down).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..checkpoint import Checkpoint
from ..errors import ConfigError, ShapeMismatchError, UnsupportedDtypeError
from .expr import ExpressionError, evaluate
from .quant import FP8_DTYPES, dequantize_fp8_blocks, dequantize_mxfp4
from .registry import detect_family, get_family
from .spec import MATRICES, Family, TensorSource
from ..config_keys import MISSING, lookup



@dataclass(frozen=True)
class RoutingFacts:
    """Routing rule of a checkpoint, with config-dependent choices resolved."""

    top_k: int
    scoring: str
    renormalize: bool
    scaling: float
    group_limited: bool
    num_groups: int
    top_groups: int


class MoEModel:
    """A checkpoint seen through its family description. Nothing is read until a tensor is asked for."""

    def __init__(self, checkpoint: Checkpoint | None, family: Family | str | None = None,
                 config: Mapping[str, Any] | None = None):
        self.checkpoint = checkpoint
        self.config = dict(config if config is not None else checkpoint.config)
        if isinstance(family, str):
            family = get_family(family)
        self.family = family or detect_family(self.config)
        self.namespace = self._namespace()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], family: Family | str | None = None) -> "MoEModel":
        """An adapter over a config alone (layer rules, sizes, routing facts); reading tensors needs a checkpoint."""
        return cls(None, family, config)

    # -- configuration ------------------------------------------------------------------
    def _namespace(self) -> dict[str, Any]:
        ns: dict[str, Any] = {**self.family.defaults, **self.config}
        for canonical, aliases in self.family.config_keys.items():
            for alias in aliases:
                value = lookup(self.config, alias)
                if value is not MISSING and value is not None:
                    ns[canonical] = value
                    break
        for key in ("hidden_size", "num_layers"):
            if not isinstance(ns.get(key), int):
                raise ConfigError(
                    f"config.json of this {self.family.title} checkpoint lacks an integer "
                    f"'{key}' (tried keys {self.family.config_keys[key]}). Check that config.json is complete.")
        if self.family.is_moe:
            for key in ("num_experts", "top_k", "moe_intermediate_size"):
                if not isinstance(ns.get(key), int) or ns[key] <= 0:
                    raise ConfigError(
                        f"config.json of this {self.family.title} checkpoint needs a positive integer "
                        f"'{key}' (tried keys {self.family.config_keys[key]}), found {ns.get(key)!r}.")
        return ns

    def value(self, expression: str | int | float | bool) -> Any:
        """Evaluate a family-data expression against this checkpoint's config."""
        try:
            return evaluate(expression, self.namespace)
        except ExpressionError as exc:
            raise ConfigError(f"config.json of this {self.family.title} checkpoint: {exc}. "
                              "The config lacks a key this family needs.") from None

    @property
    def hidden_size(self) -> int:
        return self.namespace["hidden_size"]

    @property
    def num_layers(self) -> int:
        return self.namespace["num_layers"]

    @property
    def num_experts(self) -> int:
        return self.namespace.get("num_experts", 0) if self.family.is_moe else 0

    @property
    def expert_width(self) -> int:
        return self.namespace["moe_intermediate_size"]

    @cached_property
    def moe_layers(self) -> list[int]:
        if not self.family.is_moe:
            return []
        return [l for l in range(self.num_layers) if self.value_at(self.family.moe_layer, l)]

    @cached_property
    def dense_layers(self) -> list[int]:
        moe = set(self.moe_layers)
        return [l for l in range(self.num_layers) if l not in moe]

    def value_at(self, expression: str, layer: int) -> Any:
        return evaluate(expression, {**self.namespace, "layer": layer})

    @cached_property
    def routing(self) -> RoutingFacts | None:
        if not self.family.is_moe:
            return None
        r = self.family.routing
        return RoutingFacts(self.namespace["top_k"], r.scoring, bool(self.value(r.renormalize)),
                            float(self.value(r.scaling) or 1.0), bool(self.value(r.group_limited)),
                            int(self.namespace.get("n_group") or 1), int(self.namespace.get("topk_group") or 1))

    @cached_property
    def num_shared_members(self) -> int:
        return int(self.value(self.family.shared.members)) if self.family.shared else 0

    @cached_property
    def shared_width(self) -> int | None:
        shared = self.family.shared
        return int(self.value(shared.width)) if shared and shared.width else None

    @cached_property
    def dense_width(self) -> int | None:
        dense = self.family.dense
        return int(self.value(dense.width or "intermediate_size")) if dense else None

    # -- canonical tensors -------------------------------------------------------------------
    def router(self, layer: int) -> torch.Tensor:
        """Router (gate embedding) weight ``[E, H]``."""
        return self._read(self.family.router, layer, (self.num_experts, self.hidden_size), "router")

    def router_bias(self, layer: int) -> torch.Tensor | None:
        """Bias added to the router logits ``[E]`` (gpt-oss), or None."""
        src = self.family.router_bias
        return None if src is None else self._read(src, layer, (self.num_experts,), "router bias")

    def score_correction_bias(self, layer: int) -> torch.Tensor | None:
        """Selection-only score bias ``[E]`` (DeepSeek-V3 ``e_score_correction_bias``), or None."""
        src = self.family.score_correction_bias
        return None if src is None else self._read(src, layer, (self.num_experts,), "score correction bias")

    def experts(self, layer: int, matrix: str) -> torch.Tensor:
        """All routed experts' ``matrix`` of ``layer``: ``[E, I, H]`` for gate/up, ``[E, H, I]`` for down."""
        self._require_moe(layer)
        src = self.family.experts.source(matrix)
        shape = (self.num_experts, *_canonical(matrix, self.expert_width, self.hidden_size))
        if src.packing == "per_expert":
            return torch.stack([self.expert(layer, e, matrix) for e in range(self.num_experts)])
        return self._read(src, layer, shape, f"experts.{matrix}")

    def expert(self, layer: int, expert: int, matrix: str) -> torch.Tensor:
        """One routed expert's ``matrix`` (reads only that expert's bytes)."""
        self._require_moe(layer)
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} out of range: this checkpoint has {self.num_experts} experts")
        src = self.family.experts.source(matrix)
        shape = _canonical(matrix, self.expert_width, self.hidden_size)
        return self._read(src, layer, shape, f"expert {expert} {matrix}", expert=expert)

    def expert_bias(self, layer: int, matrix: str) -> torch.Tensor | None:
        """Per-expert bias ``[E, I]`` (gate/up) or ``[E, H]`` (down), where the family has one."""
        src = self.family.experts.bias.get(matrix) if self.family.experts else None
        if src is None:
            return None
        width = self.hidden_size if matrix == "down" else self.expert_width
        stored = src.take_part(self._raw(src, layer, None), dim=-1)
        return self._check(stored, (self.num_experts, width), f"experts.{matrix} bias", src.name.format(layer=layer))

    def shared_experts(self, layer: int, matrix: str) -> torch.Tensor | None:
        """Shared experts split into members: ``[S, Is, H]`` (gate/up) or ``[S, H, Is]`` (down); None if absent."""
        shared = self.family.shared
        if shared is None or layer not in self.moe_layers:
            return None
        members, width = self.num_shared_members, self.shared_width
        merged = self._read(shared.source(matrix), layer,
                            _canonical(matrix, members * width, self.hidden_size), f"shared {matrix}")
        axis = -1 if matrix == "down" else -2
        return torch.stack(merged.chunk(members, dim=axis))

    def shared_gate(self, layer: int) -> torch.Tensor | None:
        """Qwen-style sigmoid gate of the shared expert ``[1, H]``, or None."""
        src = self.family.shared_gate
        if src is None or layer not in self.moe_layers:
            return None
        return self._read(src, layer, (1, self.hidden_size), "shared expert gate")

    def dense_ffn(self, layer: int, matrix: str) -> torch.Tensor:
        """The dense FFN of a dense layer (or of a dense model): ``[I, H]`` / ``[H, I]``."""
        if self.family.dense is None or layer in self.moe_layers:
            raise ValueError(f"layer {layer} of this {self.family.title} checkpoint has no dense FFN")
        return self._read(self.family.dense.source(matrix), layer,
                          _canonical(matrix, self.dense_width, self.hidden_size), f"dense {matrix}")

    def member_labels(self, layer: int) -> list[str]:
        """Members of an MoE layer: routed experts ``e0..`` then shared members ``shared0..``."""
        self._require_moe(layer)
        return [f"e{i}" for i in range(self.num_experts)] + [f"shared{i}" for i in range(self.num_shared_members)]

    def member_widths(self, layer: int) -> list[int]:
        """Intermediate width (number of neurons) of each member, in ``member_labels`` order."""
        return [self.expert_width] * self.num_experts + [self.shared_width] * self.num_shared_members

    def member_rows(self, layer: int, member: str, matrix: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of one member's canonical ``matrix`` (member ``e3`` or ``shared1``).

        Gate/up rows are neurons, down rows are hidden units. Reads only those rows where the stored layout
        allows (one tensor per expert, not transposed or fused); otherwise reads the member and slices it.
        """
        self._require_moe(layer)
        shared = member.startswith("shared")
        src = (self.family.shared if shared else self.family.experts).source(matrix)
        index = int(member[6:] if shared else member[1:])
        width = self.shared_width if shared else self.expert_width
        offset, cols = (0, slice(index * width, (index + 1) * width)) if shared and matrix == "down" else \
            (index * width if shared else 0, None)
        if src.packing in ("per_expert", "single") and not src.transpose and src.parts == 1 and src.quant is None:
            rows = self._raw(src, layer, None if shared else index, slice(offset + start, offset + stop))
        else:
            full = self.shared_experts(layer, matrix)[index] if shared else self.expert(layer, index, matrix)
            rows, cols = full[start:stop], None
        return rows if cols is None else rows[:, cols]

    # -- validation without reading data -------------------------------------------------------
    def check(self) -> None:
        """Check from headers alone that every canonical tensor exists with the shape config.json implies."""
        for layer in range(self.num_layers):
            for name, (src, shape, expert) in self._expected(layer).items():
                self._check_shape(src, layer, shape, name, expert)

    def tensor_names(self, layer: int, matrices: Sequence[str] = MATRICES) -> list[str]:
        """The stored tensors the static analyses of ``matrices`` of ``layer`` read: router, routed and shared
        experts of an MoE layer, or the dense FFN of a dense layer, with their fp8 block scales where stored."""
        names = dict.fromkeys(n for src, _, expert in self._expected(layer, matrices).values()
                              for n in src.stored_names(layer, expert))
        scales = [n + self.family.fp8_scale_suffix for n in names]
        return [*names, *(n for n in scales if n in self.checkpoint)]

    def _expected(self, layer: int, matrices: Sequence[str] = MATRICES
                  ) -> dict[str, tuple[TensorSource, tuple[int, ...], int | None]]:
        H, E, out = self.hidden_size, self.num_experts, {}
        if layer in self.moe_layers:
            out["router"] = (self.family.router, (E, H), None)
            for m in matrices:
                src = self.family.experts.source(m)
                one = _canonical(m, self.expert_width, H)
                if src.packing == "per_expert":
                    out.update({f"expert {e} {m}": (src, one, e) for e in range(E)})
                else:
                    out[f"experts.{m}"] = (src, (E, *one), None)
                if self.family.shared:
                    width = self.num_shared_members * self.shared_width
                    out[f"shared {m}"] = (self.family.shared.source(m), _canonical(m, width, H), None)
        elif self.family.dense:
            for m in matrices:
                out[f"dense {m}"] = (self.family.dense.source(m), _canonical(m, self.dense_width, H), None)
        return out

    # -- reading ---------------------------------------------------------------------------
    def _require_moe(self, layer: int) -> None:
        if layer not in self.moe_layers:
            kind = "a dense layer" if 0 <= layer < self.num_layers else "out of range"
            raise ValueError(f"layer {layer} is {kind}; MoE layers of this checkpoint: {self.moe_layers}")

    def _read(self, src: TensorSource, layer: int, shape: tuple[int, ...], what: str,
              expert: int | None = None) -> torch.Tensor:
        rows = self._check_shape(src, layer, shape, what, expert)
        stored = self._raw(src, layer, expert if src.packing == "per_expert" else None, rows)
        if src.packing == "rows" and expert is None:
            stored = stored.unflatten(0, (self.num_experts, -1))
        return src.select(stored)

    def _check_shape(self, src: TensorSource, layer: int, shape: tuple[int, ...], what: str,
                     expert: int | None) -> int | slice | None:
        """Check the stored shape implies ``shape``; return the rows to read for ``expert``."""
        name = src.stored_names(layer, expert)[0]
        stored = self._stored_shape(src, name)
        rows: int | slice | None = None
        per_expert = stored
        if src.packing == "stacked":
            per_expert = stored[1:]
            if stored[0] != self.num_experts:
                per_expert = ()  # force the mismatch message below
            rows = expert
        elif src.packing == "rows":
            n, rest = divmod(stored[0], self.num_experts)
            per_expert = (n, *stored[1:]) if rest == 0 else ()
            if expert is not None:
                rows = slice(expert * n, (expert + 1) * n)
        canonical = src.select_shape(per_expert) if len(per_expert) >= 2 else tuple(per_expert)
        want = shape[1:] if (expert is None and src.packing in ("stacked", "rows")) else shape
        if tuple(canonical) != tuple(want):
            raise ShapeMismatchError(
                f"{what} of layer {layer}: tensor '{name}' has stored shape {list(stored)}, which does not give "
                f"the {list(shape)} that config.json implies (hidden_size={self.hidden_size}, "
                f"experts={self.num_experts}, expert width={self.namespace.get('moe_intermediate_size')}). "
                "config.json does not match these weights: use the config that came with the shards.")
        return rows

    def _stored_shape(self, src: TensorSource, name: str) -> tuple[int, ...]:
        shape = self.checkpoint.info(name).shape
        if src.quant == "mxfp4":  # [..., G, 16] packed bytes -> [..., G*32] values
            return (*shape[:-2], shape[-2] * shape[-1] * 2)
        return shape

    def _raw(self, src: TensorSource, layer: int, expert: int | None, rows=None) -> torch.Tensor:
        names = src.stored_names(layer, expert)
        if src.quant == "mxfp4":
            return dequantize_mxfp4(*(self.checkpoint.read(n, rows) for n in names))
        tensor = self.checkpoint.read(names[0], rows)
        if tensor.dtype in FP8_DTYPES:
            block = tuple(self.namespace.get("quantization_config", {}).get("weight_block_size", [128, 128]))
            scale_rows = rows
            if isinstance(rows, slice):  # a row range of a 2-D weight: the scales of its row blocks
                if rows.start % block[0]:
                    raise ValueError(f"fp8 row slices must start on a {block[0]}-row block boundary")
                scale_rows = slice(rows.start // block[0], -(-rows.stop // block[0]))
            scale = self.checkpoint.read(names[0] + self.family.fp8_scale_suffix, scale_rows)
            return dequantize_fp8_blocks(tensor, scale, block)
        if not tensor.is_floating_point():
            raise UnsupportedDtypeError(
                f"tensor '{names[0]}' is stored as {tensor.dtype}; moescope reads float weights (fp32, fp16, bf16), "
                "fp8 with block scales and MXFP4. Dequantise the checkpoint first.")
        return tensor

    @staticmethod
    def _check(tensor: torch.Tensor, shape: tuple[int, ...], what: str, name: str) -> torch.Tensor:
        if tuple(tensor.shape) != tuple(shape):
            raise ShapeMismatchError(f"{what}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)} "
                                     "from config.json. Use the config that came with the shards.")
        return tensor


def _canonical(matrix: str, width: int, hidden: int) -> tuple[int, int]:
    return (hidden, width) if matrix == "down" else (width, hidden)


def open_model(path_or_id: str | Path, family: str | None = None, *, download: bool = False,
               revision: str | None = None) -> MoEModel:
    """Open a checkpoint directory (or hub id: cached, or streamed with ``download`` at ``revision``) through its
    family adapter."""
    return MoEModel(Checkpoint(path_or_id, download=download, revision=revision), family)
