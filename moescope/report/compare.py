"""``moescope compare``: the one place two runs are compared.

Two trace runs over the same tokens (e.g. a base and an instruct model, or two checkpoints of one model): per
layer, token-by-token routing agreement (top-1 expert equal, Jaccard of the top-k sets, with chance levels),
the top-1 agreement matrix, the chosen-experts maps of both runs and where they differ, and the shift of each
expert's load. Two weights runs of the same family and shapes: the differences a − b of every similarity matrix
per layer and matrix. Numbers go to ``compare.json``, figures into a self-contained ``compare.html`` (same rules
as the report: everything inline, no network).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .._version import __version__
from ..errors import MoescopeError
from ..results import Results
from . import style
from .html import (HeatmapSet, read_json_beside, _as_results, _esc, _get, _mean, _write, card, embed_image, fmt, json_safe, page,
                   render_safely, save, section, table)
from .style import to_numpy

COMPARE_SCHEMA = 1
WEIGHT_KINDS = ("matrix_similarity", "neuron_avg_similarity", "reordered_matrix_similarity",
                "matched_neuron_similarity", "kendall_tau")
KIND_NAMES = {"matrix_similarity": "matrix-level cosine", "neuron_avg_similarity": "neuron-level, averaged",
              "reordered_matrix_similarity": "neuron-level, reordered",
              "matched_neuron_similarity": "mean matched-neuron cosine", "kendall_tau": "Kendall τ of the matching",
              "router_similarity": "gate-embedding cosine G"}


class CompareError(MoescopeError):
    """Two runs that cannot be compared (different analyses, families, layers or shapes)."""


class TokenMismatchError(CompareError):
    """Two trace runs over different tokens: routing cannot be compared token by token."""


# ---------------------------------------------------------------------------------------------------------------
# numbers

def top1_of(chosen: Any, weights: Any = None) -> np.ndarray:
    """Top-1 expert per token: the chosen expert with the largest routing weight (first on ties)."""
    c = to_numpy(chosen).astype(np.int64).reshape(len(chosen), -1)
    if weights is None:
        return c[:, 0]
    w = to_numpy(weights, dtype=float).reshape(c.shape)
    return c[np.arange(len(c)), np.argmax(w, axis=1)]


def routing_agreement(chosen_a: Any, chosen_b: Any, weights_a: Any = None, weights_b: Any = None,
                      num_experts: int | None = None) -> dict:
    """Token-by-token agreement of two routings of the same tokens (``chosen`` [T, k] each).

    ``top1_agreement``: fraction of tokens with the same top-1 expert; ``topk_jaccard``: mean over tokens of
    |A ∩ B| / |A ∪ B| of the top-k sets; ``topk_overlap``: mean |A ∩ B| / k_a; ``top1_agreement_chance``:
    Σ_e p_a(e) p_b(e) with p the top-1 loads (agreement of independent routings with these loads);
    ``top1_confusion`` [E, E]: fraction of tokens with top-1 e in a and e' in b."""
    a = to_numpy(chosen_a).astype(np.int64).reshape(len(chosen_a), -1)
    b = to_numpy(chosen_b).astype(np.int64).reshape(len(chosen_b), -1)
    if len(a) != len(b):
        raise CompareError(f"the two routings cover {len(a)} and {len(b)} tokens")
    e = int(num_experts or max(a.max(initial=0), b.max(initial=0)) + 1)
    t1a, t1b = top1_of(a, weights_a), top1_of(b, weights_b)
    n = len(a)
    ma, mb = np.zeros((n, e), dtype=bool), np.zeros((n, e), dtype=bool)
    rows = np.arange(n)[:, None]
    ma[rows, a] = True
    mb[rows, b] = True
    inter, union = (ma & mb).sum(1), (ma | mb).sum(1)
    pa, pb = np.bincount(t1a, minlength=e) / max(n, 1), np.bincount(t1b, minlength=e) / max(n, 1)
    confusion = np.zeros((e, e))
    np.add.at(confusion, (t1a, t1b), 1.0)
    return {"tokens": n, "top1_agreement": float(np.mean(t1a == t1b)) if n else None,
            "topk_jaccard": float(np.mean(inter / np.maximum(union, 1))) if n else None,
            "topk_overlap": float(np.mean(inter / a.shape[1])) if n else None,
            "top1_agreement_chance": float(pa @ pb),
            "topk_load_a": (ma.sum(0) / max(n, 1)).tolist(), "topk_load_b": (mb.sum(0) / max(n, 1)).tolist(),
            "top1_confusion": confusion / max(n, 1)}


def _describe(r: Results, name: str) -> dict:
    ck = r.manifest.get("checkpoint", {})
    return {"name": name, "path": str(r.path), "analysis": r.manifest.get("analysis"), "family": ck.get("family"),
            "checkpoint": ck.get("path"), "config_sha256": ck.get("config_sha256"),
            "input_source": r.manifest.get("options", {}).get("inputs", {}).get("source")}


def _names(a: Results, b: Results, names: Sequence[str] | None) -> tuple[str, str]:
    if names is not None:
        if len(names) != 2 or str(names[0]) == str(names[1]):
            raise CompareError(f"names must be two different labels, got {names!r}")
        return str(names[0]), str(names[1])
    na, nb = Path(a.path).name, Path(b.path).name
    if na == nb:
        na, nb = f"{Path(a.path).parent.name}/{na}", f"{Path(b.path).parent.name}/{nb}"
    return (na, nb) if na != nb else ("A", "B")


def _check_pair(a: Results, b: Results) -> str:
    ka, kb = a.manifest.get("analysis"), b.manifest.get("analysis")
    if ka != kb:
        raise CompareError(f"'{a.path}' is a {ka} run and '{b.path}' a {kb} run; compare two trace runs (routing) "
                           "or two weights runs (similarity matrices)")
    if ka not in ("trace", "weights"):
        raise CompareError(f"'{a.path}' holds '{ka}' results; compare reads trace and weights runs")
    fa, fb = a.manifest.get("checkpoint", {}).get("family"), b.manifest.get("checkpoint", {}).get("family")
    if fa != fb:
        raise CompareError(f"'{a.path}' is a {fa} model and '{b.path}' a {fb} model; compare needs two runs of the "
                           "same family (same experts, same shapes)")
    return ka


def _common_layers(a: Results, b: Results) -> list[int]:
    layers = sorted(set(a.layers) & set(b.layers))
    if not layers:
        raise CompareError(f"'{a.path}' has layers {a.layers} and '{b.path}' layers {b.layers}: none in common")
    return layers


def _check_tokens(a: Results, b: Results, names: tuple[str, str]) -> None:
    ta, tb = _get(a, "inputs.token_ids"), _get(b, "inputs.token_ids")
    if ta is None or tb is None:
        missing = a.path if ta is None else b.path
        raise CompareError(f"'{missing}' has no inputs.json (token ids); re-run `moescope trace` to compare it")
    ta, tb = list(map(int, ta)), list(map(int, tb))
    if ta != tb:
        first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        toks_a, toks_b = _get(a, "inputs.tokens") or [], _get(b, "inputs.tokens") or []
        at = lambda toks, ids: repr(toks[first]) if first < len(toks) else ("(end)" if first >= len(ids)  # noqa: E731
                                                                           else f"id {ids[first]}")
        src = lambda r: r.manifest.get("options", {}).get("inputs", {}).get("source", "?")  # noqa: E731
        raise TokenMismatchError(
            f"the two trace runs were made on different tokens: {names[0]} ({a.path}) has {len(ta)} tokens from "
            f"{src(a)}, {names[1]} ({b.path}) has {len(tb)} tokens from {src(b)}; they first differ at position "
            f"{first} ({at(toks_a, ta)} vs {at(toks_b, tb)}). Routing can only be compared token by token on the "
            "same input: trace both models on the same text (and with tokenizers that agree).")
    da, db = _get(a, "inputs.documents"), _get(b, "inputs.documents")
    if da is not None and db is not None and list(da) != list(db):
        raise TokenMismatchError(
            f"the two trace runs have the same tokens split into different documents ({names[0]}: offsets "
            f"{list(da)[:6]}…, {names[1]}: {list(db)[:6]}…), so each token saw a different context. Trace both on "
            "the same documents (the same --text / --documents input and --max-tokens).")


def trace_differences(a: Results, b: Results, names: tuple[str, str] = ("a", "b")) -> dict:
    """Per layer routing agreement and load shift of two trace runs over the same tokens (``compare.json``)."""
    _check_tokens(a, b, names)
    layers = _common_layers(a, b)
    per: dict[str, list] = {k: [] for k in ("top1_agreement", "topk_jaccard", "topk_overlap",
                                            "top1_agreement_chance", "topk_load_a", "topk_load_b", "load_shift",
                                            "load_shift_total_variation", "top1_confusion")}
    for l in layers:
        ca, cb = a[f"layer{l}.chosen_experts"], b[f"layer{l}.chosen_experts"]
        ea, eb = _experts(a, l), _experts(b, l)
        if ea != eb:
            raise CompareError(f"layer {l}: {names[0]} has {ea} routed experts and {names[1]} {eb}; routing of "
                               "models with different experts cannot be compared expert by expert")
        r = routing_agreement(ca, cb, _get(a, f"layer{l}.chosen_weights"), _get(b, f"layer{l}.chosen_weights"),
                              num_experts=ea)
        ka, kb = to_numpy(ca).reshape(len(ca), -1).shape[1], to_numpy(cb).reshape(len(cb), -1).shape[1]
        shift = np.asarray(r["topk_load_b"]) - np.asarray(r["topk_load_a"])
        for key in ("top1_agreement", "topk_jaccard", "topk_overlap", "top1_agreement_chance", "topk_load_a",
                    "topk_load_b", "top1_confusion"):
            per[key].append(r[key])
        per["load_shift"].append(shift.tolist())
        per["load_shift_total_variation"].append(
            0.5 * float(np.abs(np.asarray(r["topk_load_a"]) / ka - np.asarray(r["topk_load_b"]) / kb).sum()))
    headline = {}
    for key in ("top1_largest_norm_fraction",):
        headline[key] = {names[0]: a.summary.get(key), names[1]: b.summary.get(key)}
    sims = {n: (r.summary.get("per_layer") or {}).get("mean_routed_angular_similarity") for n, r in zip(names, (a, b))}
    out = {"schema_version": COMPARE_SCHEMA, "moescope_version": __version__, "analysis": "trace",
           "runs": {"a": _describe(a, names[0]), "b": _describe(b, names[1])}, "names": list(names),
           "tokens": len(_get(a, "inputs.token_ids")), "layers": layers, "per_layer": per,
           "mean": {k: _mean(per[k]) for k in ("top1_agreement", "topk_jaccard", "topk_overlap",
                                               "top1_agreement_chance", "load_shift_total_variation")},
           "headline": {**headline, "mean_routed_angular_similarity": sims,
                        "depth_trend": {names[0]: a.summary.get("depth_trend"),
                                        names[1]: b.summary.get("depth_trend")}}}
    return out


def _experts(r: Results, layer: int) -> int:
    scores = _get(r, f"layer{layer}.router_scores")
    if scores is not None:
        return int(to_numpy(scores).shape[1])
    members = _get(r, f"layer{layer}.members") or []
    return sum(1 for m in members if m.startswith("e") and m[1:].isdigit())


def weights_differences(a: Results, b: Results, names: tuple[str, str] = ("a", "b")) -> dict:
    """Differences a − b of every similarity matrix of two weights runs (same family, layers, members and
    shapes), per layer and matrix, with their mean and max |difference| (``compare.json``)."""
    layers = _common_layers(a, b)
    diffs: dict[str, Any] = {}
    summary: dict[str, dict] = {}
    for l in layers:
        la, lb = list(a[f"layer{l}.labels"]), list(b[f"layer{l}.labels"])
        if la != lb:
            raise CompareError(f"layer {l}: the runs have different members ({names[0]}: {la}, {names[1]}: {lb}); "
                               "run both with the same options (and the same --dense model or none)")
        entry: dict[str, Any] = {"labels": la}
        ra, rb = _get(a, f"layer{l}.router_similarity"), _get(b, f"layer{l}.router_similarity")
        if ra is not None and rb is not None:
            entry["router_similarity"] = _difference(ra, rb, l, "router_similarity", names)
        for m in ("gate", "up", "down"):
            for kind in WEIGHT_KINDS:
                x, y = _get(a, f"layer{l}.{m}.{kind}"), _get(b, f"layer{l}.{m}.{kind}")
                if x is None or y is None:
                    continue
                entry.setdefault(m, {})[kind] = _difference(x, y, l, f"{m}.{kind}", names)
        diffs[str(l)] = entry
    for l in layers:
        entry = diffs[str(l)]
        for m in ("gate", "up", "down"):
            for kind, d in entry.get(m, {}).items():
                summary.setdefault(f"{m}.{kind}", {"mean_abs": [], "max_abs": []})
                summary[f"{m}.{kind}"]["mean_abs"].append(_mean_abs(d))
                summary[f"{m}.{kind}"]["max_abs"].append(_max_abs(d))
        if "router_similarity" in entry:
            summary.setdefault("router_similarity", {"mean_abs": [], "max_abs": []})
            summary["router_similarity"]["mean_abs"].append(_mean_abs(entry["router_similarity"]))
            summary["router_similarity"]["max_abs"].append(_max_abs(entry["router_similarity"]))
    r2 = {n: r.summary.get("gate_r2_mean") for n, r in zip(names, (a, b))}
    return {"schema_version": COMPARE_SCHEMA, "moescope_version": __version__, "analysis": "weights",
            "runs": {"a": _describe(a, names[0]), "b": _describe(b, names[1])}, "names": list(names),
            "layers": layers, "difference": "a - b", "summary": summary, "gate_r2_mean": r2, "layers_detail": diffs}


def _difference(x: Any, y: Any, layer: int, what: str, names: tuple[str, str]) -> np.ndarray:
    x, y = to_numpy(x, dtype=float), to_numpy(y, dtype=float)
    if x.shape != y.shape:
        raise CompareError(f"layer {layer} {what}: shapes {x.shape} ({names[0]}) and {y.shape} ({names[1]}) differ; "
                           "compare needs two checkpoints of the same shapes")
    return x - y


def _offdiag(d: np.ndarray) -> np.ndarray:
    return d[~np.eye(*d.shape, dtype=bool)] if d.ndim == 2 and d.shape[0] == d.shape[1] else d.ravel()


def _mean_abs(d: np.ndarray) -> float | None:
    v = np.abs(_offdiag(d))
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def _max_abs(d: np.ndarray) -> float | None:
    v = np.abs(d)
    return float(np.nanmax(v)) if np.isfinite(v).any() else None


def compare_numbers(run_a: Any, run_b: Any, *, names: Sequence[str] | None = None) -> dict:
    """Everything ``compare.json`` holds for two runs (trace or weights), without writing anything."""
    a, b = _as_results(run_a), _as_results(run_b)
    kind = _check_pair(a, b)
    labels = _names(a, b, names)
    return trace_differences(a, b, labels) if kind == "trace" else weights_differences(a, b, labels)


# ---------------------------------------------------------------------------------------------------------------
# text and page

def format_compare(numbers: Mapping) -> str:
    """A one-screen text summary of ``compare.json`` (what the CLI prints)."""
    na, nb = numbers["names"]
    runs = numbers["runs"]
    lines = [f"moescope compare · {numbers['analysis']} · {na} ({runs['a']['path']}) vs {nb} ({runs['b']['path']})"]
    if numbers["analysis"] == "trace":
        lines.append(f"  {numbers['tokens']} tokens, {len(numbers['layers'])} common layer(s)")
        lines.append(f"  {'layer':>5}  {'top-1 same':>10}  {'(chance)':>8}  {'top-k Jaccard':>13}  "
                     f"{'load shift (TV)':>15}")
        per = numbers["per_layer"]
        rows = list(range(len(numbers["layers"])))
        if len(rows) > 12:
            rows = rows[:6] + [None] + rows[-6:]
        for i in rows:
            if i is None:
                lines.append(f"  {'…':>5}")
                continue
            lines.append(f"  {numbers['layers'][i]:>5}  {fmt(per['top1_agreement'][i]):>10}  "
                         f"{fmt(per['top1_agreement_chance'][i]):>8}  {fmt(per['topk_jaccard'][i]):>13}  "
                         f"{fmt(per['load_shift_total_variation'][i]):>15}")
        m = numbers["mean"]
        lines.append(f"  {'mean':>5}  {fmt(m['top1_agreement']):>10}  {fmt(m['top1_agreement_chance']):>8}  "
                     f"{fmt(m['topk_jaccard']):>13}  {fmt(m['load_shift_total_variation']):>15}")
    else:
        lines.append(f"  {len(numbers['layers'])} common layer(s); differences {na} − {nb}, "
                     "mean |Δ| off the diagonal")
        for key, s in numbers["summary"].items():
            lines.append(f"  {key:<40} mean |Δ| {fmt(_mean(s['mean_abs']), 4)}   max |Δ| "
                         f"{fmt(max((v for v in s['max_abs'] if v is not None), default=None), 4)}")
    if numbers.get("html"):
        lines.append(f"compare: {numbers['html']}")
    return "\n".join(lines)


EXPLAIN = {
    "routing-agreement": (
        "Both models routed the very same tokens. Per layer: the fraction of tokens whose top-1 expert (largest "
        "routing weight) is the same in both runs, the mean Jaccard overlap of the two top-k sets, and the "
        "agreement two independent routers with these loads would reach by chance. Agreement far above chance "
        "means the second model kept the first one's routing (as the study found for Mixtral base vs instruct); "
        "near chance means the experts are used differently (or are numbered differently: see the agreement "
        "matrix, where a permutation shows up as one bright cell per row)."),
    "chosen-experts-compare": (
        "The study's chosen-experts map for both runs (top-1 expert per token and layer, first tokens), and "
        "a map of where the two runs pick a different top-1 expert."),
    "load-shift": (
        "Each expert's top-k load (fraction of tokens routed to it) in the second run minus the first, per layer; "
        "the total-variation distance between the two load distributions summarises a layer."),
    "weights-difference": (
        "Differences a − b of the similarity matrices of the two weights runs, per layer, matrix and measure "
        "(matrix-level, neuron-averaged, reordered, …, and the gate-embedding cosine of the router rows). Hover "
        "a cell for both values. Zero everywhere means the two checkpoints have the same expert geometry."),
}


def _header_cards(numbers: Mapping) -> str:
    na, nb = numbers["names"]
    rows = [[n, r["analysis"], r["family"], r["checkpoint"], r["path"], r.get("input_source") or "–"]
            for n, r in ((na, numbers["runs"]["a"]), (nb, numbers["runs"]["b"]))]
    out = table(["run", "analysis", "family", "checkpoint", "results", "input"], rows, left=6)
    if numbers["analysis"] == "trace":
        m = numbers["mean"]
        out += "<div class=\"cards\">" + card("top-1 expert the same (mean over layers)", fmt(m["top1_agreement"]),
                                              f"chance {fmt(m['top1_agreement_chance'])}", key="top1_agreement")
        out += card("top-k Jaccard (mean over layers)", fmt(m["topk_jaccard"]), key="topk_jaccard")
        out += card("load shift (total variation, mean)", fmt(m["load_shift_total_variation"]),
                    "0 = identical expert loads", key="load_shift_total_variation")
        h = numbers["headline"]["top1_largest_norm_fraction"]
        out += card("top-1 scored expert has the largest norm",
                    f"{fmt(h[na], 3, pct=True)} vs {fmt(h[nb], 3, pct=True)}", f"{na} vs {nb}")
        out += "</div>\n"
    else:
        s = numbers["summary"]
        out += "<div class=\"cards\">"
        for key in ("gate.matrix_similarity", "gate.reordered_matrix_similarity", "router_similarity"):
            if key in s:
                out += card(f"mean |Δ| {key}", fmt(_mean(s[key]["mean_abs"]), 4),
                            f"max |Δ| {fmt(max((v for v in s[key]['max_abs'] if v is not None), default=None), 4)}")
        out += "</div>\n"
    return out


def _trace_page(a: Results, b: Results, numbers: dict, tmp: Path, notes: list[str], quiet: bool) -> tuple[list, str]:
    from . import figures_stats as fs
    from .figures import top1_matrix
    from .figures_dynamic import chosen_experts_diff, chosen_experts_map

    na, nb = numbers["names"]
    layers, per = numbers["layers"], numbers["per_layer"]
    tokens = [str(t) for t in (_get(a, "inputs.tokens") or [str(i) for i in range(numbers["tokens"])])]
    docs = _get(a, "inputs.documents")
    docs = [int(d) for d in docs] if docs is not None else None
    e = _experts(a, layers[0])
    n = min(128, len(tokens))
    hm = HeatmapSet("cmp")
    body = []
    figs = render_safely("agreement by layer", lambda: [save(fs.agreement_by_layer(layers, {
        "top-1 expert the same": per["top1_agreement"], "top-k Jaccard": per["topk_jaccard"],
        "chance: top-1 the same": per["top1_agreement_chance"]}, names=(na, nb)), tmp, "agreement_by_layer")],
        notes, quiet)
    rows = [[l, fmt(per["top1_agreement"][i]), fmt(per["top1_agreement_chance"][i]), fmt(per["topk_jaccard"][i]),
             fmt(per["topk_overlap"][i]), fmt(per["load_shift_total_variation"][i])] for i, l in enumerate(layers)]
    content = table(["layer", "top-1 the same", "chance", "top-k Jaccard", "top-k overlap", "load shift (TV)"], rows)
    content += "".join(embed_image(p, t) for t, p in figs)
    labels = [f"e{i}" for i in range(e)]
    entries = {str(l): {"rows": labels, "cols": labels, "values": np.asarray(per["top1_confusion"][i]),
                        "note": f"layer {l}: rows = top-1 expert in {na}, columns = top-1 expert in {nb}; "
                                "cells = fraction of tokens"} for i, l in enumerate(layers)}
    content += "<h3>Top-1 agreement matrix</h3>\n" + hm.add(
        controls=[("layer", "layer", [(l, l) for l in layers])], entries=entries, cmap=style.COUNT_CMAP,
        value_name="fraction of tokens", digits=3)
    body.append(section("routing-agreement", "Routing agreement", EXPLAIN["routing-agreement"], content))

    ta, tb = top1_matrix(a, layers)[:n], top1_matrix(b, layers)[:n]
    maps = render_safely("chosen-experts maps", lambda: [
        save(chosen_experts_map(ta, layers, tokens[:n], num_experts=e, documents=docs,
                                title=f"Top-1 chosen expert per token and layer · {na}"), tmp, "chosen_experts_a"),
        save(chosen_experts_map(tb, layers, tokens[:n], num_experts=e, documents=docs,
                                title=f"Top-1 chosen expert per token and layer · {nb}"), tmp, "chosen_experts_b"),
        save(chosen_experts_diff(ta, tb, layers, tokens[:n], names=(na, nb), documents=docs), tmp,
             "chosen_experts_diff")], notes, quiet)
    content = ""
    if maps:
        content = "<div class=\"row\">" + "".join(embed_image(p, t) for t, p in maps) + "</div>\n"
    body.append(section("chosen-experts-compare", "Chosen experts", EXPLAIN["chosen-experts-compare"], content))

    shift = render_safely("load shift", lambda: [save(fs.load_shift(np.asarray(per["topk_load_a"]),
                                                                    np.asarray(per["topk_load_b"]), layers,
                                                                    names=(na, nb)), tmp, "load_shift")],
                          notes, quiet)
    body.append(section("load-shift", "Expert load shift", EXPLAIN["load-shift"],
                        "".join(embed_image(p, t) for t, p in shift)))
    toc = [("compare-summary", "Summary"), ("routing-agreement", "Routing agreement"),
           ("chosen-experts-compare", "Chosen experts"), ("load-shift", "Load shift")]
    return toc, "".join(body)


def _weights_page(numbers: dict, a: Results, b: Results, tmp: Path, notes: list[str], quiet: bool) -> tuple[list, str]:
    from . import figures_stats as fs

    na, nb = numbers["names"]
    layers = numbers["layers"]
    hm = HeatmapSet("cmp")
    entries, kinds, matrices = {}, [], []
    for l in layers:
        entry = numbers["layers_detail"][str(l)]
        labels = entry["labels"]
        for m in ("gate", "up", "down"):
            for kind, d in entry.get(m, {}).items():
                matrices += [m] if m not in matrices else []
                kinds += [kind] if kind not in kinds else []
                entries[f"{l}|{m}|{kind}"] = {"rows": labels, "values": d, "more": {
                    na: a[f"layer{l}.{m}.{kind}"], nb: b[f"layer{l}.{m}.{kind}"]},
                    "note": f"layer {l} · W_{m} · {KIND_NAMES.get(kind, kind)}: {na} − {nb}"}
            if "router_similarity" in entry:
                routed = [x for x in labels if x.startswith("e") and x[1:].isdigit()]
                g = entry["router_similarity"]
                entries[f"{l}|{m}|router_similarity"] = {
                    "rows": routed[: g.shape[0]], "values": g,
                    "more": {na: a[f"layer{l}.router_similarity"], nb: b[f"layer{l}.router_similarity"]},
                    "note": f"layer {l} · gate-embedding cosine G: {na} − {nb}"}
    if any(k.endswith("|router_similarity") for k in entries):
        kinds.append("router_similarity")
    content = hm.add(controls=[("layer", "layer", [(l, l) for l in layers]),
                               ("matrix", "matrix", [(m, f"W_{m}") for m in matrices]),
                               ("kind", "measure", [(k, KIND_NAMES.get(k, k)) for k in kinds])],
                     entries=entries, cmap=style.DIVERGING_CMAP, symmetric=True,
                     value_name=f"difference {na} − {nb}", nan_note="no value in one of the runs", digits=4)
    series = {k: v["mean_abs"] for k, v in numbers["summary"].items() if k.endswith("matrix_similarity")
              or k == "router_similarity"}
    figs = render_safely("mean |difference| by layer", lambda: [save(fs.lines_by_layer(
        layers, series, ylabel="mean |a − b| (off-diagonal)", title=f"Similarity differences {na} − {nb} by layer"),
        tmp, "difference_by_layer")], notes, quiet) if series else []
    rows = [[k, fmt(_mean(v["mean_abs"]), 4), fmt(max((x for x in v["max_abs"] if x is not None), default=None), 4)]
            for k, v in numbers["summary"].items()]
    content += table(["matrix.measure", "mean |Δ| (mean over layers)", "max |Δ|"], rows)
    content += "".join(embed_image(p, t) for t, p in figs)
    r2 = numbers["gate_r2_mean"]
    if all(r2.values()):
        rows = [[m, k, fmt(r2[na].get(m, {}).get(k)), fmt(r2[nb].get(m, {}).get(k))]
                for m in r2[na] for k in ("flat", "averaged")]
        content += ("<h3>Gate-embedding R² (mean over layers)</h3>\n"
                    + table(["matrix", "similarity", na, nb], rows, left=2))
    body = section("weights-difference", "Similarity differences", EXPLAIN["weights-difference"], content)
    return [("compare-summary", "Summary"), ("weights-difference", "Similarity differences")], body


def compare(run_a: Any, run_b: Any, out: str | Path | None = None, *, names: Sequence[str] | None = None,
            quiet: bool = True) -> Path:
    """Compare two trace runs over the same tokens, or two weights runs of the same family and shapes; write
    ``compare.json`` and a self-contained ``compare.html`` into ``out`` (a directory, default
    ``<run_a>/compare``; an ``.html`` path names the page) and return the HTML path.

    Raises ``TokenMismatchError`` for trace runs over different tokens, ``CompareError`` for runs that cannot be
    compared (different analyses, families, members or shapes)."""
    a, b = _as_results(run_a), _as_results(run_b)
    kind = _check_pair(a, b)
    labels = _names(a, b, names)
    numbers = trace_differences(a, b, labels) if kind == "trace" else weights_differences(a, b, labels)
    if out is None:
        target = Path(a.path) / "compare" / "compare.html"
    else:
        out = Path(out)
        target = out if out.suffix.lower() in (".html", ".htm") else out / "compare.html"
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="moescope-compare-") as tmp:
        if kind == "trace":
            toc, body = _trace_page(a, b, numbers, Path(tmp), notes, quiet)
        else:
            toc, body = _weights_page(numbers, a, b, Path(tmp), notes, quiet)
    head = _header_cards(numbers) + "".join(f'<p class="note">{_esc(n)}</p>\n' for n in notes)
    head = section("compare-summary", "Summary",
                   f"Comparison of two {kind} runs: <strong>{_esc(labels[0])}</strong> (a) and "
                   f"<strong>{_esc(labels[1])}</strong> (b). Differences are b against a unless stated (a − b for "
                   "similarity matrices).", head)
    family = numbers["runs"]["a"]["family"]
    text = page(f"moescope compare · {family} · {labels[0]} vs {labels[1]}",
                _esc(f"{kind} runs · {a.path} vs {b.path} · moescope {__version__}"), toc, head + body)
    numbers["html"] = str(target)
    _write(target, text)
    _write(target.with_name("compare.json"), json.dumps(json_safe(numbers), indent=1, allow_nan=False) + "\n")
    return target


def read_compare(path: str | Path) -> dict:
    """``compare.json`` of a comparison (give its HTML file, its directory or the JSON itself)."""
    return read_json_beside(path, "compare.json")
