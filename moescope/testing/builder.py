"""Build a tiny checkpoint of any supported family, deterministic from a seed, in the family's real layout.

Weights are structured so analyses have known answers: in every MoE layer the routed experts share a base
MLP whose neurons each expert holds in its own planted permutation, mixed with an expert-specific part:
``W_e = sqrt(1 - s^2) * P_e(W_base) + s * W_own_e`` with specificity ``s``. The permutations are the
ground truth (``ground_truth.json``): neuron i of expert e is base neuron ``perm[e][i]``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..arch.adapter import MoEModel
from ..arch.expr import evaluate
from ..arch.quant import dequantize_fp8_blocks, dequantize_mxfp4, quantize_fp8_blocks, quantize_mxfp4
from ..arch.registry import get_family
from ..arch.spec import MATRICES, MatrixSet, TensorSource
from ..writer import atomic_write_json, write_checkpoint
from .tokenizer import write_tokenizer

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPECIAL_TOKEN_KEYS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass
class BuiltCheckpoint:
    """A built checkpoint: its directory, config, the canonical tensors as stored, and the planted truth."""

    path: Path
    config: dict
    canonical: dict[tuple, torch.Tensor] = field(repr=False)
    truth: dict = field(repr=False)


def _set(config: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


def tiny_config(family: str, reference: str | None = None, sizes: Mapping[str, Any] | None = None) -> dict:
    """The real config.json of ``reference`` (default: the family's first) with the family's tiny sizes applied."""
    fam = get_family(family)
    reference = reference or next(iter(fam.reference_configs))
    config = copy.deepcopy(fam.reference_configs[reference])
    for key, value in {**fam.layout.get("tiny", {}), **(sizes or {})}.items():
        _set(config, key, value)
    for key, token_id in SPECIAL_TOKEN_KEYS.items():
        if isinstance(config.get(key), int):
            config[key] = token_id
    return config


class _Generator:
    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * scale

    def perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.gen)


def build_checkpoint(family: str, path: str | Path, *, reference: str | None = None, seed: int = 0,
                     sizes: Mapping[str, Any] | None = None, dtype: str | None = None, num_shards: int = 2,
                     specificity: float = 0.5, tokenizer: bool = True) -> BuiltCheckpoint:
    """Write a tiny ``family`` checkpoint to ``path`` and return what was written."""
    fam = get_family(family)
    layout = fam.layout
    path = Path(path)
    config = tiny_config(family, reference, sizes)
    model = MoEModel.from_config(config, fam)
    ns = {**model.namespace, **{k: evaluate(v, model.namespace) for k, v in layout.get("derived", {}).items()
                                if k not in model.namespace}}
    store_dtype = DTYPES[dtype or layout.get("dtype", "BF16")]
    weight_quant = layout.get("weight_quant") if dtype is None else None
    rng = _Generator(seed)
    canonical: dict[tuple, torch.Tensor] = {}
    stored: dict[str, torch.Tensor] = {}
    truth: dict[str, Any] = {"specificity": specificity, "permutations": {}}
    block = tuple(ns.get("quantization_config", {}).get("weight_block_size", [128, 128]))

    def store(name: str, value: torch.Tensor, quant: str | None = None) -> torch.Tensor:
        """Store ``value`` under ``name`` (quantised if asked); return what a reader gets back."""
        if quant == "fp8":
            q, scale = quantize_fp8_blocks(value, block)
            stored[name], stored[name + fam.fp8_scale_suffix] = q, scale
            return dequantize_fp8_blocks(q, scale, block)
        stored[name] = value.to(store_dtype)
        return stored[name]

    def plain(entries, layer: int | None) -> None:
        for entry in entries:
            name, shape_exprs, entry_dtype = (*entry, None)[:3]
            name = name.format(layer=layer)
            shape = [int(evaluate(s, ns)) for s in shape_exprs]
            value = torch.ones(shape) if _is_norm(name) else rng.normal(*shape, scale=0.02)
            if entry_dtype == "fp8" and weight_quant == "fp8":
                store(name, value, "fp8")
            elif entry_dtype in DTYPES:
                stored[name] = value.to(DTYPES[entry_dtype])
            else:
                store(name, value)

    plain(layout.get("global", []), None)
    num_extra = int(evaluate(layout.get("extra_layers", {}).get("count", 0), ns))
    for layer in range(model.num_layers + num_extra):
        plain(layout.get("layer", []), layer)
        if layer >= model.num_layers:
            plain(layout["extra_layers"].get("tensors", []), layer)
        if layer in model.moe_layers or layer >= model.num_layers:  # extra (MTP) layers are MoE layers too
            plain(layout.get("moe_layer", []), layer)
            record = canonical if layer < model.num_layers else {}
            _moe_layer(model, layer, rng, specificity, record, truth, store, stored, weight_quant)
        elif fam.dense is not None:
            plain(layout.get("dense_layer", []), layer)
            mats = _mlp(rng, model.dense_width, model.hidden_size)
            _encode(fam.dense, layer, {m: mats[m][None] for m in MATRICES}, canonical, ("dense", layer),
                    store, stored, weight_quant)
    fmt = layout.get("format", "safetensors")
    write_checkpoint(path, config, stored, fmt=fmt, num_shards=num_shards,
                     shard_name=layout.get("shard_name", "model-{index:05d}-of-{count:05d}.safetensors"),
                     index_name=layout.get("index_name", "model.safetensors.index.json"))
    atomic_write_json(path / "ground_truth.json", truth)
    if tokenizer:
        write_tokenizer(path, int(ns["vocab_size"]))
    return BuiltCheckpoint(path, config, canonical, truth)


def _is_norm(name: str) -> bool:
    return "norm" in name and (name.endswith(".weight") or name.endswith(".scale"))


def _mlp(rng: _Generator, width: int, hidden: int) -> dict[str, torch.Tensor]:
    return {"gate": rng.normal(width, hidden, scale=hidden ** -0.5),
            "up": rng.normal(width, hidden, scale=hidden ** -0.5),
            "down": rng.normal(hidden, width, scale=width ** -0.5)}


def _moe_layer(model: MoEModel, layer, rng, specificity, canonical, truth, store, stored, weight_quant) -> None:
    fam, E, H, I = model.family, model.num_experts, model.hidden_size, model.expert_width
    base = _mlp(rng, I, H)
    keep = math.sqrt(1.0 - specificity ** 2)
    perms = [rng.perm(I) for _ in range(E)]
    experts = {m: torch.stack([keep * _permute(base[m], p, m) + specificity * _mlp(rng, I, H)[m] for p in perms])
               for m in MATRICES}
    truth["permutations"][str(layer)] = [p.tolist() for p in perms]
    canonical[("router", layer)] = store(fam.router.name.format(layer=layer), rng.normal(E, H, scale=H ** -0.5))
    for key, src in (("router_bias", fam.router_bias), ("score_correction_bias", fam.score_correction_bias)):
        if src is not None:
            name = src.name.format(layer=layer)
            value = rng.normal(E, scale=0.1)
            if key == "score_correction_bias":
                stored[name] = value.float()  # kept in float32 on disk, like DeepSeek-V3
                canonical[(key, layer)] = stored[name]
            else:
                canonical[(key, layer)] = store(name, value)
    _encode(fam.experts, layer, experts, canonical, ("experts", layer), store, stored, weight_quant)
    for matrix in fam.experts.bias:
        canonical[("expert_bias", layer, matrix)] = rng.normal(E, H if matrix == "down" else I, scale=0.02)
    _encode_bias(fam.experts, layer, canonical, store)
    if fam.shared is not None:
        S, Is = model.num_shared_members, model.shared_width
        members = [_mlp(rng, Is, H) for _ in range(S)]
        merged = {m: torch.cat([mem[m] for mem in members], dim=-1 if m == "down" else -2)[None] for m in MATRICES}
        _encode(fam.shared, layer, merged, canonical, ("shared", layer), store, stored, weight_quant)
        for m in MATRICES:
            key = ("shared", layer, m)
            canonical[key] = torch.stack(canonical[key].chunk(S, dim=-1 if m == "down" else -2))
    if fam.shared_gate is not None:
        canonical[("shared_gate", layer)] = store(fam.shared_gate.name.format(layer=layer), rng.normal(1, H, scale=H ** -0.5))


def _permute(matrix: torch.Tensor, perm: torch.Tensor, which: str) -> torch.Tensor:
    return matrix[:, perm] if which == "down" else matrix[perm]


def _by_name(sources: dict[str, TensorSource]) -> dict[str, list[tuple[TensorSource, str]]]:
    """Sources grouped by the stored tensor they share (fused gate/up), each group in part order."""
    groups: dict[str, list[tuple[TensorSource, str]]] = {}
    for key, src in sources.items():
        groups.setdefault(src.name, []).append((src, key))
    return {name: sorted(parts, key=lambda p: p[0].part) for name, parts in groups.items()}


def _encode(mats: MatrixSet, layer: int, values: dict[str, torch.Tensor], canonical, key, store, stored,
            weight_quant) -> None:
    """Write canonical ``values[m]`` (``[n, rows, cols]``) through the sources (inverse of the adapter's decode)."""
    for parts in _by_name({m: mats.source(m) for m in MATRICES}).values():
        src0 = parts[0][0]
        merged = src0.fuse([values[m] for _, m in parts], dim=-2)
        per_expert = merged.transpose(-1, -2) if src0.transpose else merged
        read_back = _store_packed(src0, layer, per_expert, store, stored, weight_quant)  # stored orientation
        for src, m in parts:
            got = src.select(read_back)
            canonical[(*key, m)] = got if len(got) > 1 or key[0] == "experts" else got[0]


def _store_packed(src: TensorSource, layer: int, per_expert: torch.Tensor, store, stored, weight_quant):
    """Pack ``per_expert [n, r, c]`` as ``src.packing`` says; return the stored values as read back (``[n, r, c]``)."""
    if src.quant == "mxfp4":
        blocks, scales = quantize_mxfp4(per_expert)
        base = src.name.format(layer=layer)
        stored[f"{base}_blocks"] = blocks
        stored[f"{base}_scales"] = scales
        return dequantize_mxfp4(stored[f"{base}_blocks"], scales)
    quant = "fp8" if weight_quant == "fp8" else None
    if src.packing == "per_expert":
        return torch.stack([store(src.name.format(layer=layer, expert=e), w, quant) for e, w in enumerate(per_expert)])
    if src.packing == "single":
        return store(src.name.format(layer=layer), per_expert[0], quant)[None]
    if src.packing == "stacked":
        return store(src.name.format(layer=layer), per_expert)
    n = per_expert.shape[1]  # rows
    return store(src.name.format(layer=layer), per_expert.flatten(0, 1)).unflatten(0, (-1, n))


def _encode_bias(mats: MatrixSet, layer: int, canonical, store) -> None:
    """Biases of fused experts (gpt-oss): gate/up share one tensor, like their weights."""
    for name, parts in _by_name(dict(mats.bias)).items():
        got = store(name.format(layer=layer), parts[0][0].fuse(
            [canonical[("expert_bias", layer, m)] for _, m in parts], dim=-1))
        for src, m in parts:
            canonical[("expert_bias", layer, m)] = src.take_part(got, dim=-1)
