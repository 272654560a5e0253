"""One MoE layer over a shard of documents: mergeable accumulators, then the layer's tables and tensors.

A shard is a run of consecutive whole forward batches. Experts are recomputed on each batch's tokens (cut every
``chunk_tokens``), so a token goes through the same computations whether the documents are traced in one
process or in shards by several workers. ``LayerAccumulators`` keeps what the results need and no hidden
states: per-token routing and norms, sums over tokens, per-document routing statistics and the first tokens'
states. Merging shards in document order and calling ``layer_results`` gives the single-process results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from ..arch.adapter import MoEModel
from ..validate import MemberHealth, check_finite_states, output_health
from .experts import activation, layer_members
from .forward import LayerTrace, batches
from .inputs import Document
from .metrics import IntermediateSummary, NormScoreRanks, OutputSimilarity
from .routing import router_scores, select_experts
from .routing_stats import CrossLayerConsistency, LayerRoutingStats, top1_experts

if TYPE_CHECKING:
    from .run import TraceOptions

PER_TOKEN = ("chosen_experts", "chosen_weights", "router_logits", "router_scores", "expert_norms")


@dataclass
class Shard:
    """Consecutive whole forward batches of a run's documents; ``start``: the run position of its first token."""

    documents: list[Document]
    batch_size: int
    start: int = 0

    @property
    def offsets(self) -> list[int]:
        """Where each document starts (and the last one ends) among the shard's tokens."""
        return np.cumsum([0] + [len(d.ids) for d in self.documents]).tolist()

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def spans(self, chunk_tokens: int) -> list[tuple[int, int]]:
        """Token ranges the experts are recomputed on: each forward batch, cut every ``chunk_tokens`` tokens."""
        out, start = [], 0
        for group in batches(self.documents, self.batch_size):
            stop = start + sum(len(d.ids) for d in group)
            out += [(a, min(a + chunk_tokens, stop)) for a in range(start, stop, chunk_tokens)]
            start = stop
        return out


def split_shards(documents: Sequence[Document], batch_size: int, count: int) -> list[Shard]:
    """At most ``count`` shards of consecutive whole batches with about equal numbers of tokens."""
    groups = batches(documents, batch_size)
    count = max(1, min(count, len(groups)))
    ends = np.cumsum([sum(len(d.ids) for d in g) for g in groups])
    cuts = [0]
    for k in range(1, count):
        cut = int(np.searchsorted(ends, k * ends[-1] / count)) + 1     # batches before it: about k/count of tokens
        cuts.append(min(max(cut, cuts[-1] + 1), len(groups) - (count - k)))
    cuts.append(len(groups))
    return [Shard([d for g in groups[a:b] for d in g], batch_size, int(ends[a - 1]) if a else 0)
            for a, b in zip(cuts, cuts[1:])]


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


@dataclass
class LayerAccumulators:
    """One layer over a shard: what its results are computed from, without the hidden states."""

    layer: int
    members: list[str]
    widths: list[int]
    per_token: dict[str, torch.Tensor]      # PER_TOKEN tensors, token axis first
    similarity: OutputSimilarity
    ranks: NormScoreRanks
    intermediate: IntermediateSummary
    health: MemberHealth
    squared_error: float = 0.0              # Σ ||rebuilt − block output||² (float64)
    squared_output: float = 0.0             # Σ ||block output||²
    stats: LayerRoutingStats | None = None
    cross: tuple[int, CrossLayerConsistency] | None = None   # (next traced layer, top-1 agreement with it)

    def merge(self, other: "LayerAccumulators") -> "LayerAccumulators":
        """Both shards together; ``other``'s documents follow this shard's."""
        cross = None
        if self.cross is not None and other.cross is not None:
            cross = (self.cross[0], self.cross[1].merge(other.cross[1]))
        return LayerAccumulators(
            self.layer, self.members, self.widths,
            {k: torch.cat([v, other.per_token[k]]) for k, v in self.per_token.items()},
            self.similarity.merge(other.similarity), self.ranks.merge(other.ranks),
            self.intermediate.merge(other.intermediate), self.health.merge(other.health),
            self.squared_error + other.squared_error, self.squared_output + other.squared_output,
            None if self.stats is None else self.stats.merge(other.stats), cross)


def accumulate_layer(model: MoEModel, layer: int, trace: LayerTrace, shard: Shard, opts: TraceOptions,
                     keep_intermediate: bool, dense: MoEModel | None = None, dense_trace: LayerTrace | None = None,
                     device: str = "cpu", cross: tuple[int, CrossLayerConsistency] | None = None
                     ) -> LayerAccumulators:
    """Every member's output on the captured inputs of ``shard``, summarised into mergeable accumulators."""
    check_finite_states(trace.inputs, layer)
    members = layer_members(model, layer, dense, device)
    labels, widths = [m.label for m in members], [m.width for m in members]
    E, T = model.num_experts, trace.inputs.shape[0]
    spans = shard.spans(opts.chunk_tokens)
    summary = IntermediateSummary(dict(zip(labels, widths)), keep=opts.intermediate_tokens if keep_intermediate else 0)
    outputs = torch.empty(len(members), T, model.hidden_size)
    for i, member in enumerate(members):
        x = (dense_trace if member.label == "F" else trace).inputs.to(device)
        weights, glu = member.load(), activation(dense if member.label == "F" else model)
        for a, b in spans:
            act, out = weights.forward(x[a:b], glu)
            outputs[i, a:b] = out.cpu()
            summary.update(member.label, act, shard.start + a)
    scores, weights, indices = routing_of(model, trace)
    similarity = OutputSimilarity(len(members), opts.similarity_tokens)
    squared_error = squared_output = 0.0
    for a, b in spans:
        similarity.update(outputs[:, a:b], shard.start + a)
        rebuilt = reconstruct(model, layer, outputs[:, a:b], weights[a:b], indices[a:b], trace.inputs[a:b])
        squared_error += float(((rebuilt - trace.output[a:b]).double() ** 2).sum())
        squared_output += float((trace.output[a:b].double() ** 2).sum())
    norms = outputs.norm(dim=-1).T.contiguous()
    ranks = NormScoreRanks(E)
    ranks.update(norms[:, :E], scores)
    per_token = dict(zip(PER_TOKEN, (indices, weights.float(), trace.router["logits"].float(), scores, norms)))
    return LayerAccumulators(layer, labels, widths, per_token, similarity, ranks, summary,
                             output_health(outputs, labels), squared_error, squared_output,
                             _routing_stats(model, per_token, shard, opts) if opts.stats else None, cross)


def _routing_stats(model: MoEModel, per_token: Mapping[str, torch.Tensor], shard: Shard,
                   opts: TraceOptions) -> LayerRoutingStats:
    """Routing statistics of one layer, documents as the resampling unit (see docs/routing_stats.md)."""
    stats = LayerRoutingStats(model.num_experts, model.routing.top_k, seed=opts.seed)
    indices, weights, scores = (per_token[k].numpy() for k in ("chosen_experts", "chosen_weights", "router_scores"))
    ids = np.asarray([i for d in shard.documents for i in d.ids])
    offsets = shard.offsets
    for a, b in zip(offsets, offsets[1:]):
        stats.update(indices[a:b], weights[a:b], scores[a:b], ids[a:b])
    return stats


def cross_layer_accumulators(choices: Mapping[int, tuple[torch.Tensor, torch.Tensor]], shard: Shard,
                             experts: int, seed: int) -> dict[int, tuple[int, CrossLayerConsistency]]:
    """Per traced layer: the next traced layer, and the agreement of a token's top-1 expert at both."""
    layers, out, offsets = sorted(choices), {}, shard.offsets
    for layer, following in zip(layers, layers[1:]):
        top1, top1_next = (top1_experts(choices[l][1].numpy(), choices[l][0].numpy()) for l in (layer, following))
        acc = CrossLayerConsistency(experts, seed=seed)
        for a, b in zip(offsets, offsets[1:]):
            acc.update(top1[a:b], top1_next[a:b])
        out[layer] = (following, acc)
    return out


def layer_results(model: MoEModel, acc: LayerAccumulators, opts: TraceOptions) -> tuple[dict, dict]:
    """The layer's results from its accumulators: (JSON tables, tensors)."""
    E = model.num_experts
    sim, rank, inter = acc.similarity.finalize(), acc.ranks.finalize(), acc.intermediate.finalize()
    acc.health.warn(f"layer {acc.layer}")   # a member whose output is zero or non-finite has no cosine
    sim = {k: acc.health.mask(v) for k, v in sim.items()}
    routed_sim = sim["output_similarity"][:E, :E]
    off_diagonal = routed_sim[~torch.eye(E, dtype=torch.bool)]
    off_diagonal = off_diagonal[~off_diagonal.isnan()]
    tables = {"members": acc.members, "widths": acc.widths, "tokens": len(acc.per_token["chosen_experts"]),
              "scoring": model.routing.scoring, "top_k": model.routing.top_k,
              "mean_routed_angular_similarity": float(off_diagonal.mean()) if off_diagonal.numel() else None,
              **acc.health.table(),
              "reconstruction_error": math.sqrt(acc.squared_error) / max(math.sqrt(acc.squared_output), 1e-30),
              **{k: v for k, v in rank.items() if k != "rank_counts"},
              "intermediate_near_zero_fraction": inter["near_zero_fraction"],
              "intermediate_top_neurons": inter["top_neurons"]}
    tensors = {**acc.per_token, "rank_counts": rank["rank_counts"], **sim,
               **{f"intermediate_mean_abs.{k}": v for k, v in inter["mean_abs"].items()},
               **{f"intermediate.{k}": v for k, v in inter["kept"].items()}}
    if acc.stats is not None:
        stats, stat_tensors = split_tables(acc.stats.finalize(n_bootstrap=opts.bootstrap, seed=opts.seed), "stats")
        shared = [label for label in acc.members if label.startswith("shared")]
        tables["stats"] = {**stats, "cross_layer": _cross_table(acc.cross, opts),
                           "shared_experts": {"members": shared, "load": [1.0] * len(shared),
                                              "note": "shared experts process every token (not routed)"}}
        tensors.update(stat_tensors)
    return tables, tensors


def _cross_table(cross: tuple[int, CrossLayerConsistency] | None, opts: TraceOptions) -> dict | None:
    if cross is None:
        return None
    following, acc = cross
    tables, _ = split_tables(acc.finalize(n_bootstrap=opts.bootstrap, seed=opts.seed), "")
    return {"next_layer": following, **tables}
