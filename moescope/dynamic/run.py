"""``moescope trace``: the dynamic analyses of PAPER.md for every MoE layer, from one forward pass."""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..arch.adapter import MoEModel, open_model
from ..errors import ConfigError, OptionsError
from ..memory import check_fits, dynamic_estimate
from ..parallel import LOCAL, check_workers, process_pool, worker_threads
from ..results import Results, RunWriter, config_hash, load_results
from ..static.run import check_dense_model
from ..validate import first_nonfinite_layer, nonfinite_tokens, poisoned_states_error
from .forward import LayerTrace, forward_pass
from .inputs import Document, context_length, documents_hash, encode_documents
from .loader import load_model, load_tokenizer, resolve_device, resolve_dtype
from .shards import (LayerAccumulators, Shard, accumulate_layer, cross_layer_accumulators, layer_results,
                     routing_of, split_shards)


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


def _check_tokenizers(tokenizer, dense_tokenizer) -> None:
    if tokenizer.get_vocab() != dense_tokenizer.get_vocab():
        raise ConfigError("--dense: the dense model's tokenizer differs from the MoE model's, so the same text "
                          "gives different tokens and outputs cannot be compared token by token. Pass the dense "
                          "model that shares the tokenizer (e.g. Mistral-7B beside Mixtral-8x7B).")


def trace(path: str | Path, texts: Sequence[str], *, dense: str | Path | None = None,
          out: str | Path = "moescope-runs/trace", options: TraceOptions | None = None, source: str = "text",
          resume: bool = True, progress: bool = True, memory_check: bool = True, workers: int = 1,
          ray: str | None = None) -> Results:
    """Run the dynamic analyses on ``texts`` (each text a document); write and return the results.

    ``workers`` > 1 splits the documents into that many shards of whole forward batches, traced by parallel
    processes (``ray``: on a Ray cluster, "local" or an address); their accumulators merge into the results of
    one process (docs/results.md says what is bit-identical).

    Before the model is loaded, the run is refused (``InsufficientMemoryError``) when its estimated peak memory
    (local workers: each with its model and shard) exceeds what is free on the CPU or the GPU
    (``memory_check=False`` or ``MOESCOPE_SKIP_MEMORY_CHECK=1`` skips that).
    """
    opts = options or TraceOptions()
    check_workers(workers, ray)
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
    shards = split_shards(documents, opts.batch_size, workers)
    if memory_check and ray in (None, LOCAL):  # (a remote Ray cluster's machines are not this one)
        device, largest = resolve_device(opts.device), max(shards, key=lambda shard: shard.tokens)
        check_fits(dynamic_estimate(model, [len(d.ids) for d in largest.documents], opts, device, layers, dense_model,
                                    workers=len(shards)), device)
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
        pad_id = tokenizer.pad_token_id or 0
        if len(shards) == 1:
            poisoned = _trace_here(model, dense_model, layers, todo, shards[0], opts, writer, pad_id, progress)
        else:
            poisoned = _trace_sharded(model, dense_model, layers, todo, shards, opts, writer, pad_id, progress, ray)
        if poisoned is not None:
            raise poisoned_states_error(*poisoned, sum(len(d.ids) for d in documents))
    results = load_results(writer.out)
    results.summary = writer.write_summary(_summary(results, model, documents))
    return results


class ShardTrace:
    """The forward pass over one shard's documents; then ``accumulate(layer)`` for each of ``layers`` (the todo
    layers before the first whose block input is non-finite, given with its count of such tokens in
    ``poisoned``). The cross-layer statistics need the routing of every traced layer, so all are captured."""

    def __init__(self, model: MoEModel, dense_model: MoEModel | None, layers: list[int], todo: list[int],
                 shard: Shard, opts: TraceOptions, pad_id: int, progress: bool) -> None:
        device = resolve_device(opts.device)
        dtype = resolve_dtype(opts.dtype, device)
        self.model, self.dense_model, self.shard, self.opts = model, dense_model, shard, opts
        self.compute = "cpu" if device == "map" else device
        traces = _forward(model, layers if opts.stats else todo, shard.documents, opts, device, dtype, pad_id, True,
                          progress)
        poisoned = first_nonfinite_layer({l: t.inputs for l, t in traces.items()})
        self.poisoned = None if poisoned is None else (poisoned, nonfinite_tokens(traces[poisoned].inputs))
        clean = [l for l in traces if poisoned is None or l < poisoned]
        self.cross = cross_layer_accumulators({l: routing_of(model, traces[l])[1:] for l in clean}, shard,
                                              model.num_experts, opts.seed) if opts.stats else {}
        self.layers = [l for l in todo if l in clean]
        self.traces = {l: traces[l] for l in self.layers}
        self.dense_traces = None if dense_model is None else \
            _forward(dense_model, self.layers, shard.documents, opts, device, dtype, pad_id, False, progress)
        self.keep = set(opts.intermediate_layers if opts.intermediate_layers is not None
                        else default_intermediate_layers(model.moe_layers))

    def accumulate(self, layer: int) -> LayerAccumulators:
        """One layer's accumulators (its captured states are dropped)."""
        return accumulate_layer(self.model, layer, self.traces.pop(layer), self.shard, self.opts, layer in self.keep,
                                self.dense_model, None if self.dense_traces is None else self.dense_traces.pop(layer),
                                self.compute, self.cross.get(layer))


def _trace_here(model: MoEModel, dense_model: MoEModel | None, layers: list[int], todo: list[int], shard: Shard,
                opts: TraceOptions, writer: RunWriter, pad_id: int, progress: bool) -> tuple[int, int] | None:
    """Trace every document in this process, writing each layer as it is done; return ``poisoned``."""
    traced = ShardTrace(model, dense_model, layers, todo, shard, opts, pad_id, progress)
    for layer in tqdm(traced.layers, desc="experts", unit="layer", disable=not progress):
        _write_layer(writer, model, traced.accumulate(layer), opts)
    return traced.poisoned


def _shard_task(job: tuple) -> tuple[dict[int, LayerAccumulators], tuple[int, int] | None]:
    """Worker side of a sharded trace: one shard's forward pass and its layers' accumulators."""
    path, dense, layers, todo, shard, opts, pad_id, threads = job
    torch.set_num_threads(threads)
    model, dense_model = open_model(path), (open_model(dense) if dense is not None else None)
    traced = ShardTrace(model, dense_model, layers, todo, shard, opts, pad_id, progress=False)
    return {layer: traced.accumulate(layer) for layer in traced.layers}, traced.poisoned


def _trace_sharded(model: MoEModel, dense_model: MoEModel | None, layers: list[int], todo: list[int],
                   shards: list[Shard], opts: TraceOptions, writer: RunWriter, pad_id: int, progress: bool,
                   ray: str | None) -> tuple[int, int] | None:
    """Trace the shards in parallel workers, merge each layer's accumulators in document order and write it once
    all shards are in; return ``poisoned`` over all shards (the first such layer, its non-finite tokens)."""
    dense = None if dense_model is None else str(dense_model.checkpoint.path)
    threads = worker_threads(len(shards))
    jobs = [(str(model.checkpoint.path), dense, layers, todo, shard, opts, pad_id, threads) for shard in shards]
    with process_pool(len(shards), ray) as pool:
        parts = list(tqdm(pool.imap(_shard_task, jobs), total=len(jobs), desc="shards", unit="shard",
                          disable=not progress))
    for layer in todo:
        if all(layer in accumulators for accumulators, _ in parts):   # before the first poisoned layer
            _write_layer(writer, model, functools.reduce(LayerAccumulators.merge, [p[0][layer] for p in parts]), opts)
    poisoned = [p for _, p in parts if p is not None]
    if not poisoned:
        return None
    first = min(layer for layer, _ in poisoned)
    return first, sum(count for layer, count in poisoned if layer == first)


def _write_layer(writer: RunWriter, model: MoEModel, acc: LayerAccumulators, opts: TraceOptions) -> None:
    tables, tensors = layer_results(model, acc, opts)
    tolerance = 1e-3 if resolve_dtype(opts.dtype, resolve_device(opts.device)) == torch.float32 else 5e-2
    if tables["reconstruction_error"] > tolerance:
        warnings.warn(f"layer {acc.layer}: the recomputed experts rebuild the model's MoE output only to a "
                      f"relative error of {tables['reconstruction_error']:.2g}; the family description may "
                      "not match this model's expert computation", stacklevel=3)
    writer.write_layer(acc.layer, tables, tensors)


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
