"""``moescope trace``: the dynamic analyses of PAPER.md for every MoE layer, from one forward pass."""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..arch.adapter import MoEModel, open_model
from ..errors import ConfigError, OptionsError
from ..memory import check_fits, dynamic_estimate
from ..results import Results, RunWriter, config_hash, load_results
from ..static.run import check_dense_model
from ..validate import check_finite_states, first_nonfinite_layer, output_health
from .experts import activation, layer_members, member_outputs
from .forward import LayerTrace, forward_pass
from .inputs import Document, context_length, documents_hash, encode_documents
from .loader import load_model, load_tokenizer, resolve_device, resolve_dtype
from .metrics import IntermediateSummary, NormScoreRanks, OutputSimilarity
from .routing import router_scores, select_experts
from .routing_stats import CrossLayerConsistency, LayerRoutingStats, top1_experts


@dataclass
class TraceOptions:
    """Options of the dynamic analyses (shared by the API and the CLI)."""

    layers: list[int] | None = None               # None: every MoE layer
    max_tokens: int | None = 2048                 # cap on tokens over all documents
    batch_size: int = 8
    dtype: str = "auto"                           # model dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | ...
    device: str = "auto"                          # auto | cpu | cuda | cuda:N | map (accelerate device_map)
    similarity_tokens: int = 64                   # per-token similarity matrices kept for the first N tokens
    intermediate_layers: list[int] | None = None  # full act(W_gate x) kept here; None: first, middle, last
    intermediate_tokens: int = 64                 # ... for the first N tokens
    chunk_tokens: int = 2048                      # tokens per expert matmul block
    stats: bool = True                            # routing statistics (load, entropy, co-activation, ...)
    bootstrap: int = 1000                         # bootstrap resamples (over documents) for their CIs
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise OptionsError("--batch-size and --max-tokens must be positive")


def default_intermediate_layers(moe_layers: Sequence[int]) -> list[int]:
    """First, middle and last MoE layer."""
    return sorted({moe_layers[0], moe_layers[len(moe_layers) // 2], moe_layers[-1]}) if moe_layers else []


def routing_of(model: MoEModel, trace: LayerTrace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores [T, E], weights [T, k], indices [T, k])``: the choice as the router module returned it, or
    recomputed from its logits by the family rule where the module returns logits alone."""
    logits = trace.router["logits"]
    scores = router_scores(logits, model.routing)
    if "indices" in trace.router:
        return scores, trace.router["weights"].float(), trace.router["indices"].long()
    weights, indices = select_experts(logits, model.routing)
    return scores, weights, indices


def reconstruct(model: MoEModel, layer: int, outputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
    """The MoE block output rebuilt from recomputed member outputs ``[M, T, H]`` and the routing choice:
    ``Σ_k w_k E_{i_k}(x)`` plus the shared members (Qwen: times ``σ(shared_gate · x)``)."""
    E, T = model.num_experts, outputs.shape[1]
    routed = (outputs[indices, torch.arange(T)[:, None]] * weights[..., None]).sum(1)
    shared = outputs[E:E + model.num_shared_members].sum(0)
    gate = model.shared_gate(layer)
    if gate is not None:
        shared = shared * torch.sigmoid(x @ gate.float().T)
    return routed + shared


def split_tables(data: Mapping[str, Any], prefix: str) -> tuple[dict, dict]:
    """Nested results -> (JSON tables, tensors keyed ``prefix.path``): arrays become tensors, the rest JSON."""
    tables, tensors = {}, {}
    for key, value in data.items():
        if isinstance(value, Mapping) and "value" not in value:
            tables[key], more = split_tables(value, f"{prefix}.{key}")
            tensors.update(more)
        elif isinstance(value, np.ndarray):
            tensors[f"{prefix}.{key}"] = torch.from_numpy(np.ascontiguousarray(value))
        else:
            tables[key] = value
    return tables, tensors


def layer_routing_stats(model: MoEModel, weights: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor,
                        token_ids: Sequence[int], offsets: Sequence[int], opts: TraceOptions) -> tuple[dict, dict]:
    """Routing statistics of one layer, documents as the resampling unit (see docs/routing_stats.md)."""
    stats = LayerRoutingStats(model.num_experts, model.routing.top_k, seed=opts.seed)
    ids = np.asarray(token_ids)
    for a, b in zip(offsets, offsets[1:]):
        stats.update(indices[a:b].numpy(), weights[a:b].numpy(), scores[a:b].numpy(), ids[a:b])
    return split_tables(stats.finalize(n_bootstrap=opts.bootstrap, seed=opts.seed), "stats")


def cross_layer_stats(choices: Mapping[int, tuple[torch.Tensor, torch.Tensor]], offsets: Sequence[int],
                      experts: int, opts: TraceOptions) -> dict[int, dict]:
    """Mutual information between a token's top-1 expert at each traced layer and at the next traced layer."""
    layers, out = sorted(choices), {}
    for layer, following in zip(layers, layers[1:]):
        top1, top1_next = (top1_experts(choices[l][1].numpy(), choices[l][0].numpy()) for l in (layer, following))
        acc = CrossLayerConsistency(experts, seed=opts.seed)
        for a, b in zip(offsets, offsets[1:]):
            acc.update(top1[a:b], top1_next[a:b])
        tables, _ = split_tables(acc.finalize(n_bootstrap=opts.bootstrap, seed=opts.seed), "")
        out[layer] = {"next_layer": following, **tables}
    return out


def analyse_layer(model: MoEModel, layer: int, trace: LayerTrace, opts: TraceOptions, keep_intermediate: bool,
                  dense: MoEModel | None = None, dense_trace: LayerTrace | None = None,
                  device: str = "cpu") -> tuple[dict, dict]:
    """Every member's output on the captured inputs, and the analyses of one layer: (tables, tensors)."""
    check_finite_states(trace.inputs, layer)
    members = layer_members(model, layer, dense, device)
    labels = [m.label for m in members]
    E, T = model.num_experts, trace.inputs.shape[0]
    summary = IntermediateSummary({m.label: m.width for m in members})
    kept: dict[str, torch.Tensor] = {}
    outputs = torch.empty(len(members), T, model.hidden_size)
    for i, member in enumerate(members):
        x = (dense_trace if member.label == "F" else trace).inputs.to(device)
        glu = activation(dense if member.label == "F" else model)

        def on_intermediate(start: int, act: torch.Tensor, label: str = member.label) -> None:
            summary.update(label, act)
            if keep_intermediate and start < opts.intermediate_tokens:
                kept[label] = torch.cat([kept.get(label, act[:0].cpu()), act[:opts.intermediate_tokens - start].cpu()])

        outputs[i] = member_outputs(x, member.load(), glu, opts.chunk_tokens, on_intermediate).cpu()
    scores, weights, indices = routing_of(model, trace)
    similarity = OutputSimilarity(len(members), opts.similarity_tokens)
    for start in range(0, T, opts.chunk_tokens):
        similarity.update(outputs[:, start:start + opts.chunk_tokens], start)
    norms = outputs.norm(dim=-1).T.contiguous()
    ranks = NormScoreRanks(E)
    ranks.update(norms[:, :E], scores)
    rebuilt = reconstruct(model, layer, outputs, weights, indices, trace.inputs)
    error = float((rebuilt - trace.output).norm() / trace.output.norm().clamp_min(1e-30))
    sim, rank, inter = similarity.finalize(), ranks.finalize(), summary.finalize()
    health = output_health(outputs, labels)   # a member whose output is zero or non-finite has no cosine
    health.warn(f"layer {layer}")
    sim = {k: health.mask(v) for k, v in sim.items()}
    routed_sim = sim["output_similarity"][:E, :E]
    off_diagonal = routed_sim[~torch.eye(E, dtype=torch.bool)]
    off_diagonal = off_diagonal[~off_diagonal.isnan()]
    tables = {"members": labels, "widths": [m.width for m in members], "tokens": T,
              "scoring": model.routing.scoring, "top_k": model.routing.top_k,
              "mean_routed_angular_similarity": float(off_diagonal.mean()) if off_diagonal.numel() else None,
              **health.table(),
              "reconstruction_error": error,
              **{k: v for k, v in rank.items() if k != "rank_counts"},
              "intermediate_near_zero_fraction": inter["near_zero_fraction"],
              "intermediate_top_neurons": inter["top_neurons"]}
    tensors = {"chosen_experts": indices, "chosen_weights": weights.float(), "router_logits": trace.router["logits"].float(),
               "router_scores": scores, "expert_norms": norms, "rank_counts": rank["rank_counts"], **sim,
               **{f"intermediate_mean_abs.{k}": v for k, v in inter["mean_abs"].items()},
               **{f"intermediate.{k}": v for k, v in kept.items()}}
    return tables, tensors


def _check_tokenizers(tokenizer, dense_tokenizer) -> None:
    if tokenizer.get_vocab() != dense_tokenizer.get_vocab():
        raise ConfigError("--dense: the dense model's tokenizer differs from the MoE model's, so the same text "
                          "gives different tokens and outputs cannot be compared token by token. Pass the dense "
                          "model that shares the tokenizer (e.g. Mistral-7B beside Mixtral-8x7B).")


def trace(path: str | Path, texts: Sequence[str], *, dense: str | Path | None = None,
          out: str | Path = "moescope-runs/trace", options: TraceOptions | None = None, source: str = "text",
          resume: bool = True, progress: bool = True, memory_check: bool = True) -> Results:
    """Run the dynamic analyses on ``texts`` (each text a document); write and return the results.

    Before the model is loaded, the run is refused (``InsufficientMemoryError``) when its estimated peak memory
    exceeds what is free on the CPU or the GPU (``memory_check=False`` or ``MOESCOPE_SKIP_MEMORY_CHECK=1`` skips
    that).
    """
    opts = options or TraceOptions()
    model = open_model(path)
    if not model.moe_layers:
        raise ConfigError(f"'{path}' is a dense {model.family.title} checkpoint: trace needs an MoE model "
                          "(pass a dense model with --dense beside an MoE model)")
    layers = model.moe_layers if opts.layers is None else opts.layers
    bad = [l for l in layers if l not in model.moe_layers]
    if bad:
        raise OptionsError(f"layers {bad} are not MoE layers of this checkpoint; MoE layers: {model.moe_layers}")
    model.check()
    tokenizer = load_tokenizer(model)
    documents = encode_documents(tokenizer, list(texts), context_length(model), opts.max_tokens)
    dense_model = open_model(dense) if dense is not None else None
    if dense_model is not None:
        check_dense_model(model, dense_model, layers)
        dense_model.check()
        _check_tokenizers(tokenizer, load_tokenizer(dense_model))
    device = resolve_device(opts.device)
    if memory_check:
        check_fits(dynamic_estimate(model, [len(d.ids) for d in documents], opts, device, layers, dense_model), device)
    compute = "cpu" if device == "map" else device
    checkpoint = {"path": str(model.checkpoint.path), "family": model.family.name,
                  "config_sha256": config_hash(model.config),
                  "dense": None if dense_model is None else {"path": str(dense_model.checkpoint.path),
                                                             "config_sha256": config_hash(dense_model.config)}}
    inputs = {"source": source, "documents_sha256": documents_hash(documents)}
    writer = RunWriter.open(out, "trace", {**asdict(opts), "layers": layers, "inputs": inputs}, checkpoint,
                            resume=resume)
    writer.write_json("inputs", _inputs_table(tokenizer, documents))
    todo = [l for l in layers if not writer.done(l)]
    if todo:
        _trace_layers(model, dense_model, layers, todo, documents, opts, device, compute, writer,
                      pad_id=tokenizer.pad_token_id or 0, progress=progress)
    results = load_results(writer.out)
    results.summary = writer.write_summary(_summary(results, model, documents))
    return results


def _trace_layers(model: MoEModel, dense_model: MoEModel | None, layers: list[int], todo: list[int],
                  documents: list[Document], opts: TraceOptions, device: str, compute: str, writer: RunWriter,
                  pad_id: int, progress: bool) -> None:
    """Analyse the ``todo`` layers (the cross-layer statistics need the routing of every traced layer)."""
    dtype = resolve_dtype(opts.dtype, device)
    offsets = np.cumsum([0] + [len(d.ids) for d in documents]).tolist()
    captured = layers if opts.stats else todo
    traces = _forward(model, captured, documents, opts, device, dtype, pad_id, True, progress)
    poisoned = first_nonfinite_layer({l: t.inputs for l, t in traces.items()})
    poisoned_inputs = None if poisoned is None else traces[poisoned].inputs
    clean = [l for l in captured if poisoned is None or l < poisoned]  # analyse these, then report the poisoned
    cross = cross_layer_stats({l: routing_of(model, traces[l])[1:] for l in clean}, offsets,
                              model.num_experts, opts) if opts.stats else {}
    layers = [l for l in todo if l in clean]
    dense_traces = None if dense_model is None else \
        _forward(dense_model, layers, documents, opts, device, dtype, pad_id, False, progress)
    keep = set(opts.intermediate_layers if opts.intermediate_layers is not None
               else default_intermediate_layers(model.moe_layers))
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    token_ids = [i for d in documents for i in d.ids]
    for layer in tqdm(layers, desc="experts", unit="layer", disable=not progress):
        trace = traces.pop(layer)
        tables, tensors = analyse_layer(model, layer, trace, opts, layer in keep, dense_model,
                                        None if dense_traces is None else dense_traces.pop(layer), compute)
        if opts.stats:
            stats, stat_tensors = layer_routing_stats(model, tensors["chosen_weights"], tensors["chosen_experts"],
                                                      tensors["router_scores"], token_ids, offsets, opts)
            shared = [l for l in tables["members"] if l.startswith("shared")]
            tables["stats"] = {**stats, "cross_layer": cross.get(layer),
                               "shared_experts": {"members": shared, "load": [1.0] * len(shared),
                                                  "note": "shared experts process every token (not routed)"}}
            tensors.update(stat_tensors)
        if tables["reconstruction_error"] > tolerance:
            warnings.warn(f"layer {layer}: the recomputed experts rebuild the model's MoE output only to a "
                          f"relative error of {tables['reconstruction_error']:.2g}; the family description may "
                          "not match this model's expert computation", stacklevel=2)
        writer.write_layer(layer, tables, tensors)
    if poisoned is not None:
        check_finite_states(poisoned_inputs, poisoned)


def _forward(model: MoEModel, layers: list[int], documents: list[Document], opts: TraceOptions, device: str,
             dtype: torch.dtype, pad_id: int, router: bool, progress: bool) -> dict[int, LayerTrace]:
    net = load_model(model, device, dtype)
    try:
        return forward_pass(net, model.family.execution, layers, documents, opts.batch_size, device, pad_id,
                            router, progress, desc=f"forward {model.family.name}")
    finally:
        del net


def _inputs_table(tokenizer, documents: list[Document]) -> dict:
    ids = [i for d in documents for i in d.ids]
    offsets = [0]
    for d in documents:
        offsets.append(offsets[-1] + len(d.ids))
    return {"token_ids": ids, "tokens": [tokenizer.decode([i]) for i in ids], "documents": offsets,
            "texts": [d.text for d in documents]}


def _summary(results: Results, model: MoEModel, documents: list[Document]) -> dict:
    layers = results.layers
    per_layer = {key: [results[f"layer{l}.{key}"] for l in layers]
                 for key in ("top1_largest_norm_fraction", "top1_second_norm_fraction",
                             "mean_routed_angular_similarity", "reconstruction_error")}
    top1 = per_layer["top1_largest_norm_fraction"]
    top1 = sum(top1) / len(top1) if top1 and None not in top1 else None
    return {"family": model.family.name, "moe_layers": model.moe_layers, "dense_layers": model.dense_layers,
            "layers_done": layers, "documents": len(documents), "tokens": sum(len(d.ids) for d in documents),
            "top1_largest_norm_fraction": top1, "per_layer": per_layer,
            "depth_trend": _depth_trend(dict(zip(layers, per_layer["mean_routed_angular_similarity"])))}


def _depth_trend(similarity: dict[int, float | None]) -> dict:
    """Slope of the routed experts' mean output similarity over layers (last layer excluded), and how far the
    last layer sits from the others (z-score): the study's "diversity grows with depth, last layer an outlier"."""
    points = sorted((l, v) for l, v in similarity.items() if v is not None)
    if len(points) < 3:
        return {"slope": None, "last_layer_outlier_z": None}
    body, (_, last) = points[:-1], points[-1]
    xs, ys = torch.tensor([p[0] for p in body], dtype=torch.float64), torch.tensor([p[1] for p in body],
                                                                                 dtype=torch.float64)
    slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
    spread = float(ys.std()) if len(body) > 1 else math.nan
    return {"slope": slope, "last_layer_outlier_z": (last - float(ys.mean())) / spread if spread > 0 else None}
