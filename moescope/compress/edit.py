"""``compress``: prune or merge routed experts and write a new checkpoint in the family's own on-disk layout.

The new checkpoint keeps every tensor name, packing (one tensor per expert, stacked ``[E, ...]``, ``[E*n, ...]``
rows, fused gate/up, transposed), dtype, shard file name and format (safetensors or ``.bin``) of the original. It is
written shard by shard, streaming one original shard at a time; only the edited MoE tensors are recomputed, and
every other tensor is copied unchanged. Kept experts are copied bit for bit; merged experts are re-encoded
through the family's tensor sources. config.json gets the new expert count under every expert-count key the
family reads (top-k unchanged); tokenizer files are copied; ``compression.json`` records every decision.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..arch.adapter import MoEModel, open_model
from ..arch.spec import MATRICES, TensorSource
from ..checkpoint import Checkpoint
from ..dynamic.loader import resolve_device
from ..results import config_hash
from ..writer import atomic_write_json, write_checkpoint
from .calibrate import MIN_CALIBRATION_TOKENS, calibrate, check_routing, layer_data
from .candidates import Member
from .errors import CompressionError, ExpertCountError, UnsupportedLayoutError
from .importance import expert_importance
from .plan import (
    DEFAULT_STRATEGY,
    MERGE_STRATEGIES,
    NEEDS_CALIBRATION,
    PRUNE_STRATEGIES,
    LayerState,
    merge_candidates,
    plan_merge,
    plan_prune,
)

RECORD_NAME = "compression.json"
INDEX_NAMES = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}
# files copied next to the new weights (tokenizer and generation settings); anything else is left behind
SIDE_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "generation_config.json", "vocab.*",
              "merges.txt", "*.tiktoken", "chat_template*")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")


# ---------------------------------------------------------------------------------------------- checks
def check_writable(model: MoEModel) -> None:
    """Refuse checkpoints whose experts cannot be rewritten faithfully (with the reason and what to do)."""
    fam, ckpt = model.family, model.checkpoint
    what = f"this {fam.title} checkpoint"
    if not fam.is_moe:
        check_routing(model)
    quantised = [m for m in MATRICES if fam.experts.source(m).quant]
    if quantised or model.config.get("quantization_config"):
        kind = fam.experts.source(quantised[0]).quant.upper() if quantised else \
            model.config["quantization_config"].get("quant_method", "quantised")
        raise UnsupportedLayoutError(
            f"{what} stores its weights quantised ({kind}); moescope compress writes only float layouts (fp32, "
            "fp16, bf16). Dequantise the checkpoint first (e.g. to bfloat16) and compress that")
    if fam.experts.bias:
        raise UnsupportedLayoutError(f"{what} has per-expert biases (gpt-oss layout); moescope compress does not "
                                     "rewrite it")
    for layer in model.moe_layers[:1]:
        names = [fam.router.name.format(layer=layer)]
        for m in MATRICES:
            names.append(fam.experts.source(m).stored_names(layer, 0)[0])
        for name in names:
            code = ckpt.info(name).dtype
            if code not in ("F32", "F16", "BF16", "F64"):
                raise UnsupportedLayoutError(
                    f"{what} stores '{name}' as {code}; moescope compress writes only float layouts (fp32, fp16, "
                    "bf16). Dequantise the checkpoint first")
    check_routing(model)
    for layer in range(model.num_layers, model.num_layers + 8):
        if fam.router.name.format(layer=layer) in ckpt:
            raise UnsupportedLayoutError(
                f"{what} holds MoE layers beyond num_hidden_layers (multi-token-prediction layer {layer}); "
                "moescope compress does not rewrite them")
    if fam.router.parts != 1 or fam.router.packing != "single" or fam.router.transpose:
        raise UnsupportedLayoutError(f"{what} packs its router in a way moescope compress does not rewrite")


def expert_count(amount: int | float, num_experts: int) -> int:
    """Experts to remove per layer: an integer count, or a fraction in (0, 1) of the experts (rounded)."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise ExpertCountError(f"the number of experts to remove must be an integer or a fraction, got {amount!r}")
    if isinstance(amount, float) and not amount.is_integer():
        if not 0 < amount < 1:
            raise ExpertCountError(f"a fraction of experts must lie in (0, 1), got {amount}")
        return int(round(amount * num_experts))
    return int(amount)


def parse_amount(text: str) -> int | float:
    """A command-line amount of experts: ``2`` (a count), ``25%`` or ``0.25`` (a fraction of the experts)."""
    value = text.strip()
    try:
        if value.endswith("%"):
            return float(value[:-1]) / 100
        return int(value) if value.lstrip("+-").isdigit() else float(value)
    except ValueError:
        raise ExpertCountError(f"expected a number of experts (e.g. 2) or a fraction (e.g. 25% or 0.25), "
                               f"got {text!r}") from None


def check_count(count: int, model: MoEModel, mode: str) -> None:
    E, k = model.num_experts, model.routing.top_k
    verb = "prune" if mode == "prune" else "merge away"
    if count < 1:
        raise ExpertCountError(f"asked to {verb} {count} experts per layer: give at least 1 (the model has {E})")
    if count >= E:
        raise ExpertCountError(f"cannot {verb} {count} experts per layer: each MoE layer has only {E}")
    if E - count < k:
        raise ExpertCountError(
            f"{verb} {count} of {E} experts would leave {E - count} per layer, fewer than the {k} experts every "
            f"token is routed to (top-k={k}, kept unchanged). Remove at most {E - k}")


# ---------------------------------------------------------------------------------------------- compress
def compress(path: str | Path, out: str | Path | None, *, prune: int | float | None = None,
             merge: int | float | None = None, strategy: str | None = None, per_layer: bool = True,
             calibration_texts: Sequence[str] | None = None, max_tokens: int | None = 2048, batch_size: int = 8,
             device: str = "auto", dtype: str = "auto", seed: int = 0, weighting: str = "usage",
             router_merge: str = "average", candidates: int | None = 10,
             min_calibration_tokens: int = MIN_CALIBRATION_TOKENS, context: int | None = None,
             overwrite: bool = False, dry_run: bool = False, progress: bool = True) -> dict:
    """Prune (``prune=N``) or merge away (``merge=N``) N routed experts in every MoE layer and write the result.

    N is a count per layer or a fraction in (0, 1) of the experts. ``strategy``: pruning ``loss`` (default),
    ``frequency``, ``weighted_norm``, ``random``; merging ``similarity`` (default), ``output``, ``random``.
    ``calibration_texts`` (documents, at most ``max_tokens`` tokens in all) are traced once to score the experts;
    only ``random`` runs without them; documents longer than ``context`` tokens (default: the model's
    ``max_position_embeddings``) are split. ``candidates``: merge candidates per layer recorded with their block-output
    change (None: all pairs, 0: none). ``dry_run``: decide and return the record, write nothing.
    Returns the record written to ``out/compression.json``.
    """
    if (prune is None) == (merge is None):
        raise CompressionError("give exactly one of prune=N or merge=N (experts to remove per layer)")
    mode, amount = ("prune", prune) if prune is not None else ("merge", merge)
    model = open_model(path)
    check_writable(model)
    count = expert_count(amount, model.num_experts)
    check_count(count, model, mode)
    strategy = strategy or DEFAULT_STRATEGY[mode]
    allowed = PRUNE_STRATEGIES if mode == "prune" else MERGE_STRATEGIES
    if strategy not in allowed:
        raise CompressionError(f"unknown {mode} strategy {strategy!r}; choose from {', '.join(allowed)}")
    if weighting not in ("usage", "uniform"):
        raise CompressionError(f"weighting must be 'usage' or 'uniform', got {weighting!r}")
    if router_merge not in ("fit", "average"):
        raise CompressionError(f"router_merge must be 'fit' or 'average', got {router_merge!r}")
    model.check()
    if not dry_run:
        out = _check_out(model, out, overwrite)
    needs = (mode, strategy) in NEEDS_CALIBRATION
    calib = None
    if needs or calibration_texts is not None:
        calib = calibrate(model, calibration_texts, max_tokens=max_tokens, batch_size=batch_size, device=device,
                          dtype=dtype, min_tokens=min_calibration_tokens, context=context, progress=progress)
    compute = resolve_device(device)
    compute = "cpu" if compute == "map" else compute
    layers = model.moe_layers
    E = model.num_experts
    record_layers: dict[int, dict] = {l: {} for l in layers}
    importance: dict[int, dict] = {}

    def prepare(layer: int) -> LayerState:
        data = layer_data(model, layer, calib.traces.pop(layer), compute) if calib is not None else None
        if data is not None:
            importance[layer] = expert_importance(model, data)
            record_layers[layer]["importance"] = importance[layer]
        state = LayerState(model, layer, data, importance[layer]["soft_count"] if data is not None else None,
                           weighting, compute, router_merge)
        if mode == "merge" and candidates != 0:
            record_layers[layer]["candidates"] = merge_candidates(state, candidates)
        return state

    def decide(states: dict[int, LayerState]) -> None:
        if mode == "prune":
            decisions = plan_prune(states, count, strategy, per_layer, importance, seed)
        else:
            decisions = plan_merge(states, count, strategy, per_layer, seed)
        for layer, state in states.items():
            record_layers[layer].update(_layer_result(state, decisions[layer], mode, E))
            state.data = None  # free the output bank; the members keep what writing needs

    groups = [[l] for l in layers] if per_layer else [layers]
    members: dict[int, list[Member]] = {}
    for group in tqdm(groups, desc=mode, unit="layer" if per_layer else "model", disable=not progress):
        states = {l: prepare(l) for l in group}
        decide(states)
        members.update({l: s.members for l, s in states.items()})
    new_config, keys = updated_config(model, E - count)
    record = {
        "source": str(model.checkpoint.path), "family": model.family.name,
        "source_config_sha256": config_hash(model.config), "mode": mode, "strategy": strategy,
        "requested": amount, "removed_per_layer": count, "per_layer": per_layer, "seed": seed,
        "weighting": (weighting if calib is not None else "uniform") if mode == "merge" else None,
        "router_merge": (router_merge if calib is not None else "average") if mode == "merge" else None,
        "num_experts": {"before": E, "after": E - count}, "top_k": model.routing.top_k,
        "config_keys_updated": keys,
        "calibration": None if calib is None else {**calib.describe(), "max_tokens": max_tokens,
                                                   "context": context},
        "layers": {str(l): record_layers[l] for l in layers},
    }
    if not dry_run:
        _clear_out(out)
        write_compressed(model, out, members, new_config, progress=progress)
        atomic_write_json(out / RECORD_NAME, record)
        written = open_model(out)
        written.check()
        if written.num_experts != E - count:
            raise CompressionError(f"internal error: wrote {written.num_experts} experts, expected {E - count}")
        record["path"] = str(out)
    return record


def _layer_result(state: LayerState, decisions: list[dict], mode: str, E: int) -> dict:
    kept = [m for m in state.members]
    experts = [{"index": j, "sources": list(m.sources), "merge_weights": list(m.merge_weights)}
               for j, m in enumerate(kept)]
    result: dict[str, Any] = {"decisions": decisions, "experts": experts, "block_error": state.current_error()}
    if mode == "prune":
        present = {m.sources[0] for m in kept}
        result["pruned"] = [e for e in range(E) if e not in present]
    else:
        result["merged"] = [list(m.sources) for m in kept if m.merged]
    return result


def _check_out(model: MoEModel, out: str | Path | None, overwrite: bool) -> Path:
    """The output directory, checked before any work is done (created only when writing starts)."""
    if out is None:
        raise CompressionError("give an output directory for the compressed checkpoint (or use dry_run)")
    out = Path(out)
    if out.resolve() == Path(model.checkpoint.path).resolve():
        raise CompressionError(f"the output directory '{out}' is the source checkpoint; write somewhere else")
    if out.exists() and not out.is_dir():
        raise CompressionError(f"'{out}' is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CompressionError(f"'{out}' exists and is not empty; choose a new directory or pass overwrite")
    return out


def _clear_out(out: Path) -> None:
    """Remove old weight files, index and record (overwrite), so no stale shard survives; create the directory."""
    if out.is_dir():
        for pattern in _WEIGHT_PATTERNS + (RECORD_NAME,):
            for old in out.glob(pattern):
                old.unlink()
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------- config
_MISSING = object()


def _lookup(config: Mapping, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, Mapping) or part not in config:
            return _MISSING
        config = config[part]
    return config


def _set(config: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


def updated_config(model: MoEModel, num_experts: int) -> tuple[dict, list[str]]:
    """config.json with the expert count replaced under every key the family reads it from; the keys changed."""
    config = copy.deepcopy(model.checkpoint.config)
    keys = []
    for alias in model.family.config_keys["num_experts"]:
        value = _lookup(config, alias)
        if value is not _MISSING and not isinstance(value, bool) and value == model.num_experts:
            _set(config, alias, num_experts)
            keys.append(alias)
    if not keys:
        raise UnsupportedLayoutError(f"config.json of this {model.family.title} checkpoint has no expert-count key "
                                     f"moescope can update (tried {model.family.config_keys['num_experts']})")
    return config, keys


# ---------------------------------------------------------------------------------------------- writing
def _expert_groups(model: MoEModel) -> dict[str, list[tuple[TensorSource, str]]]:
    """Expert sources grouped by the stored tensor they share (fused gate/up), each group in part order."""
    groups: dict[str, list[tuple[TensorSource, str]]] = {}
    for m in MATRICES:
        src = model.family.experts.source(m)
        groups.setdefault(src.name, []).append((src, m))
    return {name: sorted(parts, key=lambda p: p[0].part) for name, parts in groups.items()}


def _roles(model: MoEModel) -> dict[str, tuple]:
    """Stored tensor name -> what it is, for every tensor the edit rewrites."""
    fam, roles = model.family, {}
    for layer in model.moe_layers:
        roles[fam.router.name.format(layer=layer)] = ("router", layer)
        for key, src in (("vector", fam.router_bias), ("vector", fam.score_correction_bias)):
            if src is not None:
                roles[src.name.format(layer=layer)] = (key, layer)
        for template, parts in _expert_groups(model).items():
            if parts[0][0].packing == "per_expert":
                for e in range(model.num_experts):
                    roles[template.format(layer=layer, expert=e)] = ("expert", layer, template, e)
            else:
                roles[template.format(layer=layer)] = ("packed", layer, template)
    return roles


def _encode(member: Member, parts: list[tuple[TensorSource, str]], like: torch.Tensor) -> torch.Tensor:
    """A merged member's stored per-expert tensor for a group of sources (inverse of ``TensorSource.select``)."""
    src0 = parts[0][0]
    fused = src0.fuse([member.weights[m] for _, m in parts], dim=-2)
    stored = fused.T if src0.transpose else fused
    if tuple(stored.shape) != tuple(like.shape):
        raise CompressionError(f"internal error: re-encoded expert has shape {tuple(stored.shape)}, the stored "
                               f"experts {tuple(like.shape)}")
    return stored.to(like.dtype).contiguous()


def _new_tensors(model: MoEModel, ckpt: Checkpoint, name: str, role: tuple, members: dict[int, list[Member]],
                 groups: dict[str, list]) -> list[tuple[str, torch.Tensor]]:
    kind, layer = role[0], role[1]
    layer_members = members[layer]
    if kind == "router":
        raw = ckpt.read(name)
        rows = [raw[m.anchor] if not m.merged else m.router.to(raw.dtype).cpu() for m in layer_members]
        return [(name, torch.stack(rows).contiguous())]
    if kind == "vector":
        raw = ckpt.read(name)
        rows = [raw[m.anchor] if not m.merged else
                sum(w * raw[s].double() for s, w in zip(m.sources, m.merge_weights)).to(raw.dtype)
                for m in layer_members]
        return [(name, torch.stack(rows).contiguous())]
    template = role[2]
    parts = groups[template]
    if kind == "expert":
        e = role[3]
        for j, m in enumerate(layer_members):
            if m.anchor == e:
                raw = ckpt.read(name)
                value = _encode(m, parts, raw) if m.merged else raw
                return [(template.format(layer=layer, expert=j), value)]
        return []  # pruned, or merged into another expert's place
    raw = ckpt.read(name)
    packing = parts[0][0].packing
    per_expert = raw.unflatten(0, (model.num_experts, -1)) if packing == "rows" else raw
    stacked = torch.stack([_encode(m, parts, per_expert[m.anchor]) if m.merged else per_expert[m.anchor]
                           for m in layer_members])
    return [(name, (stacked.flatten(0, 1) if packing == "rows" else stacked).contiguous())]


def write_compressed(model: MoEModel, out: Path, members: Mapping[int, list[Member]], config: Mapping,
                     progress: bool = True) -> list[Path]:
    """Write the edited checkpoint to ``out``: same shard files, names, packing and dtypes as the original."""
    ckpt = model.checkpoint
    roles, groups = _roles(model), _expert_groups(model)
    by_file: dict[Path, list[str]] = {f: [] for f in ckpt.files}
    for name in ckpt.keys():
        by_file[ckpt.info(name).file].append(name)
    weight_map, total, files = {}, 0, []
    for file in tqdm(ckpt.files, desc="write", unit="shard", disable=not progress):
        shard: dict[str, torch.Tensor] = {}
        for name in by_file[file]:
            role = roles.get(name)
            if role is None:
                shard[name] = ckpt.read(name)
            else:
                shard.update(_new_tensors(model, ckpt, name, role, members, groups))
        ckpt.close()  # release the shard's mapping before the next
        if not shard:  # every tensor of this shard belonged to removed experts
            continue
        write_checkpoint(out, config, shard, fmt=ckpt.format, num_shards=1, shard_name=_literal(file.name),
                         index_name=None)
        files.append(out / file.name)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update({n: file.name for n in shard})
    index = INDEX_NAMES[ckpt.format]
    if (Path(ckpt.path) / index).is_file():
        atomic_write_json(out / index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic_write_json(out / "config.json", dict(config))
    for pattern in SIDE_FILES:
        for side in sorted(Path(ckpt.path).glob(pattern)):
            if side.is_file():
                shutil.copy2(side, out / side.name)
    return files


def _literal(name: str) -> str:
    """A file name made safe for ``str.format`` (the writer formats shard names)."""
    return re.sub(r"([{}])", r"\1\1", name)


def format_summary(record: Mapping) -> str:
    """A few lines on what ``compress`` did, for the command line."""
    n = record["num_experts"]
    head = (f"{record['mode']} ({record['strategy']}): {n['before']} -> {n['after']} experts per MoE layer "
            f"of this {record['family']} checkpoint")
    lines = [head + (f"; wrote {record['path']}" if record.get("path") else " (dry run, nothing written)")]
    lines.append("  layer  removed / merged                     simulated block-output error")
    for layer, rec in record["layers"].items():
        what = rec.get("pruned") if record["mode"] == "prune" else rec.get("merged")
        error = rec.get("block_error")
        lines.append(f"  {layer:>5}  {str(what):<36} {'n/a' if error is None else f'{error:.4f}'}")
    return "\n".join(lines)


def read_record(path: str | Path) -> dict:
    """The ``compression.json`` of a compressed checkpoint."""
    return json.loads((Path(path) / RECORD_NAME).read_text())
