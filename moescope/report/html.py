"""``moescope report``: one self-contained HTML page (plus ``summary.json``) from saved results.

``report(run_dirs, out)`` takes a ``moescope weights`` run, a ``moescope trace`` run, or one of each of the same
model, and writes ``index.html`` with every figure embedded (PNG data URIs), the similarity matrices drawn by a
small inline canvas widget (hover tooltips, selectors, click-to-zoom) from embedded JSON, and no external
resource at all: a Content-Security-Policy forbids every load that is not inline or a ``data:`` URI, so the
page works offline from ``file://``. ``summary.json`` beside it holds the headline numbers;
``format_summary`` turns them into a one-screen text summary for the terminal.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .._version import __version__
from ..errors import MoescopeError
from ..results import Results, load_results
from . import style
from .style import to_numpy

SECTIONS: dict[str, str] = {
    "summary": "Summary",
    "static-similarity": "Expert weight similarity",
    "gate-regression": "Gate embedding vs expert similarity",
    "pca": "PCA of expert weights",
    "output-similarity": "Expert output similarity",
    "norm-vs-score": "Output norm vs router score",
    "intermediate": "Intermediate states",
    "chosen-experts": "Chosen experts",
    "routing-stats": "Routing statistics",
}
STATIC_SECTIONS = ("static-similarity", "gate-regression", "pca")
TRACE_SECTIONS = ("output-similarity", "norm-vs-score", "intermediate", "chosen-experts", "routing-stats")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
SUMMARY_SCHEMA = 1
ASSETS = Path(__file__).with_name("assets")

STATIC_KINDS = {  # key → menu text, in menu order
    "matrix_similarity": "matrix-level cosine",
    "neuron_avg_similarity": "neuron-level, averaged",
    "reordered_matrix_similarity": "neuron-level, reordered",
    "matched_neuron_similarity": "mean matched-neuron cosine",
    "kendall_tau": "Kendall τ of the neuron matching",
}
STATIC_BUDGET = 1_500_000      # numbers embedded for the static similarity widget
TOKEN_BUDGET = 400_000         # numbers embedded for the per-token similarity widget
ROUTING_KEYS = ("load_cv", "load_max_over_mean", "entropy", "entropy_normalised", "top1_consistency",
                "top1_baseline_permutation", "top1_baseline_load", "top1_excess", "jaccard",
                "jaccard_baseline_permutation", "jaccard_excess")
_ROUTING_SECTION = {"load_cv": "load", "load_max_over_mean": "load", "entropy": "entropy",
                    "entropy_normalised": "entropy"}


class ReportError(MoescopeError):
    """The runs given to ``report`` cannot make one report (not results, two of a kind, different models)."""


# ---------------------------------------------------------------------------------------------------------------
# small helpers

def json_safe(x: Any) -> Any:
    """``x`` with numpy/torch values made plain and every NaN/inf made None (strict JSON)."""
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if hasattr(x, "detach") or isinstance(x, np.ndarray):
        return json_safe(to_numpy(x).tolist())
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _get(results: Results | None, key: str, default: Any = None) -> Any:
    if results is None:
        return default
    try:
        return results[key]
    except KeyError:
        return default


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def fmt(x: Any, digits: int = 3, pct: bool = False) -> str:
    """A number for people: ``n/a`` for missing, percentages with ``pct``."""
    x = _num(x)
    if x is None:
        return "n/a"
    return f"{x:.{max(digits - 2, 0)}%}" if pct else f"{x:.{digits}f}"


def fmt_ci(stat: Mapping | None, digits: int = 3) -> str:
    """``value [low, high]`` of a ``{value, ci_low, ci_high}`` dict."""
    stat = stat or {}
    value, lo, hi = (_num(stat.get(k)) for k in ("value", "ci_low", "ci_high"))
    text = fmt(value, digits)
    return text + (f" [{fmt(lo, digits)}, {fmt(hi, digits)}]" if lo is not None and hi is not None else "")


def _mean(values: Iterable[Any]) -> float | None:
    vals = [v for v in (_num(x) for x in values) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _visible(token: str, limit: int = 24) -> str:
    """A token made readable in a menu: whitespace visible, long tokens shortened."""
    text = str(token).replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ranges(layers: Sequence[int]) -> str:
    layers = sorted(layers)
    if not layers:
        return "none"
    parts, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


def _routed(members: Sequence[str]) -> list[int]:
    return [i for i, m in enumerate(members) if m.startswith("e") and m[1:].isdigit()]


def _first_middle_last(layers: Sequence[int]) -> list[int]:
    layers = list(layers)
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]}) if layers else []


def _stops(cmap: str, n: int = 11) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    c = colormaps[cmap]
    return [to_hex(c(i / (n - 1))) for i in range(n)]


def _matrix(m: Any, digits: int = 4) -> list[list[float | None]]:
    a = np.round(to_numpy(m, dtype=float), digits)
    a = np.where(np.isfinite(a), a, np.nan)
    return [[v if math.isfinite(v) else None for v in row] for row in a.tolist()]


def _asset(name: str) -> str:
    path = ASSETS / name
    if not path.is_file():
        raise ReportError(f"the report asset '{path}' is missing: reinstall moescope (its package data must "
                          "include moescope/report/assets/*)")
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# page building blocks (shared with compare.py)

class HeatmapSet:
    """Collects interactive heatmaps: ``add(spec)`` returns the HTML of one widget (a div and its JSON)."""

    def __init__(self, prefix: str = "hm"):
        self.prefix, self.count = prefix, 0

    def add(self, *, controls: Sequence[tuple[str, str, Sequence[tuple[str, str]]]],
            entries: Mapping[str, Mapping[str, Any]], cmap: str = style.SIMILARITY_CMAP,
            value_name: str = "", nan_note: str = "no value", value_range: Sequence[float] | None = None,
            symmetric: bool = False, offdiag: bool = False, digits: int = 3, size: int = 520,
            defaults: Mapping[str, str] | None = None,
            caption: str = "") -> str:
        """``controls``: (name, label, [(value, text), ...]) in key order; ``entries``: key ('a|b|…') →
        ``{rows: [labels], cols: [labels] (default rows), values: matrix, more: {name: matrix}, note: text}``."""
        label_sets: list[list[str]] = []
        index: dict[tuple, int] = {}

        def label_id(labels: Sequence[str]) -> int:
            key = tuple(str(l) for l in labels)
            if key not in index:
                index[key] = len(label_sets)
                label_sets.append(list(key))
            return index[key]

        data = {}
        for key, e in entries.items():
            item: dict[str, Any] = {"r": label_id(e["rows"]), "v": _matrix(e["values"])}
            if e.get("cols") is not None:
                item["c"] = label_id(e["cols"])
            if e.get("more"):
                item["more"] = {k: _matrix(v) for k, v in e["more"].items()}
            if e.get("note"):
                item["note"] = str(e["note"])
            data[key] = item
        defaults = defaults or {}
        spec = {"controls": [{"name": n, "label": l, "options": [[str(v), str(t)] for v, t in opts],
                              **({"value": str(defaults[n])} if n in defaults else {})} for n, l, opts in controls],
                "key": [n for n, _, _ in controls], "labels": label_sets, "data": data, "colors": _stops(cmap),
                "range": list(value_range) if value_range is not None else None, "symmetric": symmetric,
                "offdiag": offdiag,
                "value_name": value_name, "nan_note": nan_note, "digits": digits, "size": size,
                "nan_color": style.NAN_COLOR}
        self.count += 1
        ident = f"{self.prefix}-{self.count}"
        blob = json.dumps(spec, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
        cap = f'<figcaption>{caption}</figcaption>' if caption else ""
        return (f'<figure class="hm" data-heatmap="{ident}"><noscript>This interactive figure needs '
                f'JavaScript.</noscript></figure>{cap}\n<script type="application/json" id="{ident}">{blob}</script>\n')


def embed_image(path: Path | str, title: str = "") -> str:
    """A figure element with the PNG (or SVG) file inlined as a data URI."""
    path = Path(path)
    data = path.read_bytes()
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<figure><img src="{uri}" alt="{_esc(title or path.stem)}" data-name="{_esc(path.stem)}"></figure>\n'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, left: int = 1, cls: str = "") -> str:
    """An HTML table; the first ``left`` columns left-aligned. Cells are escaped."""
    def cell(tag: str, i: int, v: Any) -> str:
        return f'<{tag}{" class=l" if i < left else ""}>{_esc(v)}</{tag}>'
    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>\n" for r in rows)
    return f'<table{f" class={cls}" if cls else ""}><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>\n'


def card(label: str, value: str, detail: str = "", key: str = "") -> str:
    k = f' data-key="{_esc(key)}"' if key else ""
    d = f'<div class="detail">{_esc(detail)}</div>' if detail else ""
    return f'<div class="card"{k}><div class="label">{_esc(label)}</div><div class="value">{_esc(value)}</div>{d}</div>'


def page(title: str, subtitle: str, toc: Sequence[tuple[str, str]], body: str) -> str:
    """The whole document: CSP, inline CSS, the error guard, the body, the heatmap widget and a ready marker."""
    nav = "\n".join(f'<a href="#{_esc(i)}">{_esc(t)}</a>' for i, t in toc)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="moescope {_esc(__version__)}">
<title>{_esc(title)}</title>
<style>
{_asset("report.css")}
</style>
<script>
{_asset("guard.js")}
</script>
</head>
<body>
<header class="top"><h1>{_esc(title)}</h1><div class="sub">{subtitle}</div></header>
<nav class="toc">{nav}</nav>
<main>
{body}
</main>
<script>
{_asset("heatmap.js")}
</script>
<script>document.documentElement.setAttribute('data-report-ready', '1');</script>
</body>
</html>
"""


def section(ident: str, title: str, explain: str, content: str) -> str:
    return (f'<section id="{_esc(ident)}">\n<h2>{_esc(title)}</h2>\n<p class="explain">{explain}</p>\n'
            f'{content}</section>\n')


def figures_html(records: Sequence[tuple[str, Path]], *, per_layer_label: str = "per-layer figures",
                 groups: Callable[[str], str | None] | None = None) -> str:
    """Across-layer figures shown; figures of single layers (``*_layer{N}``) folded into one details element;
    with ``groups`` (file stem → group name or None), grouped figures go into one details element per group,
    the first one open."""
    shown, folded, grouped = [], [], {}
    for title, path in records:
        stem = Path(path).stem
        group = groups(stem) if groups is not None else None
        if group is not None:
            grouped.setdefault(group, []).append((title, path))
        elif "_layer" in stem and stem.rsplit("_layer", 1)[1].isdigit():
            folded.append((title, path))
        else:
            shown.append((title, path))
    out = "".join(embed_image(p, t) for t, p in shown)
    for i, (group, recs) in enumerate(grouped.items()):
        out += (f"<details{' open' if i == 0 else ''}><summary>{_esc(group)} ({len(recs)} figure"
                f"{'s' if len(recs) > 1 else ''})</summary>\n" + "".join(embed_image(p, t) for t, p in recs)
                + "</details>\n")
    if folded:   # open when the section has no other figure
        out += (f"<details{'' if shown or grouped else ' open'}><summary>{_esc(per_layer_label)} ({len(folded)})"
                "</summary>\n"
                + "".join(embed_image(p, t) for t, p in folded) + "</details>\n")
    return out


def by_matrix(stem: str) -> str | None:
    """Group of a static figure: its matrix (``W_gate`` …), None for across-matrix figures."""
    match = re.search(r"(?:^|_)(gate|up|down)(?:_|$)", stem.replace("gate_regression", "regression", 1))
    return f"W_{match.group(1)}" if match else None


def render_safely(name: str, make: Callable[[], list], notes: list[str], quiet: bool = True) -> list:
    """Run a figure renderer; a failure becomes a note in the page (and a warning), not a failed report."""
    if not quiet:
        print(f"moescope report: rendering {name} …", file=sys.stderr, flush=True)
    try:
        return list(make())
    except Exception as exc:  # noqa: BLE001 - a broken figure must not lose the whole report
        warnings.warn(f"{name} could not be rendered: {type(exc).__name__}: {exc}", stacklevel=2)
        notes.append(f"{name} could not be rendered ({type(exc).__name__}: {exc}).")
        return []


def save(fig, directory: Path, name: str) -> tuple[str, Path]:
    from .figures import figure_title

    return figure_title(fig), style.save_figure(fig, Path(directory) / name, ("png",))[0]


# ---------------------------------------------------------------------------------------------------------------
# loading the runs

def _as_results(run: Any) -> Results:
    if isinstance(run, Results):
        return run
    return load_results(run)


def load_runs(run_dirs: Sequence[Any]) -> tuple[Results | None, Results | None]:
    """(weights results, trace results) from one or two run directories (or ``Results``) of the same model."""
    if isinstance(run_dirs, (str, Path, Results)):
        run_dirs = [run_dirs]
    runs = [_as_results(r) for r in run_dirs]
    if not 1 <= len(runs) <= 2:
        raise ReportError(f"a report takes one or two run directories (a weights run and/or a trace run of one "
                          f"model), got {len(runs)}. To put two runs side by side use `moescope compare`.")
    by_kind: dict[str, Results] = {}
    for r in runs:
        kind = r.manifest.get("analysis")
        if kind not in ("weights", "trace"):
            raise ReportError(f"'{r.path}' holds '{kind}' results; a report reads `moescope weights` and "
                              "`moescope trace` runs")
        if kind in by_kind:
            raise ReportError(f"'{by_kind[kind].path}' and '{r.path}' are both {kind} runs; a report takes at most "
                              f"one of each. To compare two {kind} runs use `moescope compare RUN_A RUN_B`.")
        by_kind[kind] = r
    w, t = by_kind.get("weights"), by_kind.get("trace")
    if w is not None and t is not None:
        cw, ct = w.manifest.get("checkpoint", {}), t.manifest.get("checkpoint", {})
        if cw.get("config_sha256") != ct.get("config_sha256") or cw.get("family") != ct.get("family"):
            raise ReportError(f"'{w.path}' ({cw.get('family')}, {cw.get('path')}) and '{t.path}' "
                              f"({ct.get('family')}, {ct.get('path')}) analyse different checkpoints (their "
                              "config.json differ); a report covers one model. Use `moescope compare` for two.")
    for r in (w, t):
        if r is not None and not r.layers:
            raise ReportError(f"'{r.path}' has no finished layer yet; run the analysis (it resumes) first")
    return w, t


# ---------------------------------------------------------------------------------------------------------------
# the numbers

def model_facts(weights: Results | None, trace: Results | None) -> dict:
    """What is known about the model from the saved results alone (and from the checkpoint when it is still
    there and unchanged: ``from_checkpoint``)."""
    first = trace if trace is not None else weights
    ck = first.manifest.get("checkpoint", {})
    summaries = [r.summary for r in (trace, weights) if r is not None]
    pick = lambda key: next((s[key] for s in summaries if s.get(key) is not None), None)  # noqa: E731
    moe, dense = pick("moe_layers"), pick("dense_layers")
    facts: dict[str, Any] = {
        "family": ck.get("family") or pick("family"), "family_title": None, "path": ck.get("path"),
        "dense_model": next(((r.manifest.get("checkpoint", {}).get("dense") or {}).get("path")
                             for r in (trace, weights) if r is not None
                             and (r.manifest.get("checkpoint", {}).get("dense") or {}).get("path")), None),
        "num_layers": None,
        "moe_layers": list(moe) if moe is not None else sorted(first.layers),
        "dense_layers": list(dense) if dense is not None else [], "num_experts": None, "top_k": None,
        "num_shared_experts": None, "scoring": None, "hidden_size": None, "expert_width": None,
        "total_params": None, "active_params": None, "from_checkpoint": False}
    if trace is not None:
        l0 = trace.layers[0]
        members = list(_get(trace, f"layer{l0}.members", []))
        scores = _get(trace, f"layer{l0}.router_scores")
        facts["num_experts"] = int(to_numpy(scores).shape[1]) if scores is not None else len(_routed(members))
        facts["top_k"] = _get(trace, f"layer{l0}.top_k")
        facts["scoring"] = _get(trace, f"layer{l0}.scoring")
        facts["num_shared_experts"] = sum(m.startswith("shared") for m in members)
        widths = _get(trace, f"layer{l0}.widths")
        facts["expert_width"] = int(widths[0]) if widths else None
    if weights is not None:
        l0 = weights.layers[0]
        labels = list(_get(weights, f"layer{l0}.labels", []))
        facts["num_experts"] = facts["num_experts"] or len(_routed(labels))
        if facts["num_shared_experts"] is None:
            facts["num_shared_experts"] = sum(m.startswith("shared") for m in labels)
        widths = _get(weights, f"layer{l0}.widths")
        facts["expert_width"] = facts["expert_width"] or (int(widths[0]) if widths else None)
    facts.update({k: v for k, v in _checkpoint_facts(ck).items() if v is not None and facts.get(k) is None})
    if facts["num_layers"] is None:
        facts["num_layers"] = len(set(facts["moe_layers"]) | set(facts["dense_layers"])) or None
    return facts


def _checkpoint_facts(ck: Mapping) -> dict:
    """Facts from the checkpoint itself when it is still on disk with the same config.json (headers only)."""
    path = ck.get("path")
    if not path or not Path(path).is_dir():
        return {}
    try:
        from ..arch import open_model
        from ..inspect import describe
        from ..results import config_hash

        model = open_model(path)
        if config_hash(model.config) != ck.get("config_sha256"):
            return {}
        f = describe(model)
    except Exception:  # noqa: BLE001 - the report must work from saved results alone
        return {}
    return {"family_title": f.family_title, "num_layers": f.num_layers, "num_experts": f.num_experts,
            "top_k": f.top_k, "scoring": f.scoring, "hidden_size": f.hidden_size, "expert_width": f.expert_width,
            "num_shared_experts": f.num_shared_experts, "total_params": f.total_params,
            "active_params": f.active_params, "from_checkpoint": True}


def _routing_stat(trace: Results, layer: int, key: str) -> dict | None:
    section = _ROUTING_SECTION.get(key, "consistency")
    stat = _get(trace, f"layer{layer}.stats.{section}.{key}")
    return json_safe(stat) if isinstance(stat, Mapping) else None


def headline(weights: Results | None, trace: Results | None) -> dict:
    """The numbers ``summary.json`` holds (every value read from the results, NaN as null)."""
    out: dict[str, Any] = {"schema_version": SUMMARY_SCHEMA, "moescope_version": __version__,
                           "runs": {"weights": str(weights.path) if weights is not None else None,
                                    "trace": str(trace.path) if trace is not None else None},
                           "model": model_facts(weights, trace), "static": None, "trace": None, "routing": None}
    if weights is not None:
        layers = weights.layers
        matrices = [m for m in weights.manifest.get("options", {}).get("matrices", ["gate", "up", "down"])
                    if _get(weights, f"layer{layers[0]}.{m}.gate_regression") is not None]
        out["static"] = {
            "layers": layers, "matrices": matrices,
            "gate_r2_mean": weights.summary.get("gate_r2_mean"),
            "gate_r2_by_layer": {m: {k: [_get(weights, f"layer{l}.{m}.gate_regression.{k}.r2") for l in layers]
                                     for k in ("flat", "averaged")} for m in matrices}}
    if trace is not None:
        s = trace.summary
        per_layer = s.get("per_layer", {})
        out["trace"] = {
            "layers": trace.layers, "tokens": s.get("tokens"), "documents": s.get("documents"),
            "input_source": trace.manifest.get("options", {}).get("inputs", {}).get("source"),
            "top1_largest_norm_fraction": s.get("top1_largest_norm_fraction"),
            "top1_second_norm_fraction": _mean(per_layer.get("top1_second_norm_fraction", [])),
            "chance_fraction": 1 / out["model"]["num_experts"] if out["model"]["num_experts"] else None,
            "depth_trend": {"slope": (s.get("depth_trend") or {}).get("slope"),
                            "last_layer_outlier_z": (s.get("depth_trend") or {}).get("last_layer_outlier_z")},
            "per_layer": {k: per_layer.get(k) for k in ("top1_largest_norm_fraction", "top1_second_norm_fraction",
                                                         "mean_routed_angular_similarity", "reconstruction_error")}}
        stat_layers = [l for l in trace.layers if isinstance(_get(trace, f"layer{l}.stats.load"), Mapping)]
        if stat_layers:
            per = {k: [_routing_stat(trace, l, k) for l in stat_layers] for k in ROUTING_KEYS}
            l0 = stat_layers[0]
            out["routing"] = {
                "layers": stat_layers,
                "n_bootstrap": _get(trace, f"layer{l0}.stats.n_bootstrap"),
                "confidence": _get(trace, f"layer{l0}.stats.confidence"),
                "per_layer": {**per,
                              "dead_experts": [_get(trace, f"layer{l}.stats.load.dead_experts") for l in stat_layers],
                              "rare_experts": [_get(trace, f"layer{l}.stats.load.rare_experts") for l in stat_layers],
                              "cross_layer_mi_normalised": [
                                  json_safe(_get(trace, f"layer{l}.stats.cross_layer.mi_normalised"))
                                  for l in stat_layers]},
                "mean": {k: _mean((v or {}).get("value") for v in per[k]) for k in ROUTING_KEYS}}
    return json_safe(out)


def format_summary(summary: Mapping, *, max_layers: int = 12) -> str:
    """A one-screen text summary of ``summary.json`` (what the CLI prints): model, headline numbers and the
    routing statistics of at most ``max_layers`` layers (first and last ones when there are more)."""
    m = summary.get("model", {})
    lines = [f"moescope report · {m.get('family_title') or m.get('family')} · {m.get('path')}"]
    if m.get("dense_model"):
        lines.append(f"  dense reference F: {m['dense_model']}")
    lines.append(f"  {m.get('num_layers') or '?'} layers (MoE {_ranges(m.get('moe_layers') or [])}; dense "
                 f"{_ranges(m.get('dense_layers') or [])}) · {m.get('num_experts') or '?'} routed experts, "
                 f"top-{m.get('top_k') or '?'}, {m.get('num_shared_experts') or 0} shared"
                 + (f" · {m['scoring']} router" if m.get("scoring") else ""))
    st = summary.get("static")
    if st:
        lines.append(f"static (weights, {len(st['layers'])} layer(s)): gate-embedding R², mean over layers")
        lines.append(f"  {'matrix':<8}{'matrix-level':>14}{'neuron-averaged':>18}")
        for mat in st["matrices"]:
            r2 = (st.get("gate_r2_mean") or {}).get(mat, {})
            lines.append(f"  {mat:<8}{fmt(r2.get('flat')):>14}{fmt(r2.get('averaged')):>18}")
    tr = summary.get("trace")
    if tr:
        lines.append(f"trace ({tr.get('tokens')} tokens, {tr.get('documents')} document(s), "
                     f"{tr.get('input_source') or 'text'}, {len(tr['layers'])} layer(s))")
        lines.append(f"  top-1 scored expert has the largest output norm: "
                     f"{fmt(tr.get('top1_largest_norm_fraction'), pct=True, digits=3)} of tokens (mean over layers; "
                     f"chance {fmt(tr.get('chance_fraction'), pct=True, digits=3)})")
        dt = tr.get("depth_trend") or {}
        lines.append(f"  routed experts' output similarity over depth: slope {fmt(dt.get('slope'), 4)} per layer"
                     + (" (needs ≥ 3 traced layers)" if dt.get("slope") is None else ""))
        lines.append(f"  last layer's outlier z-score: {fmt(dt.get('last_layer_outlier_z'), 2)}")
    ro = summary.get("routing")
    if ro:
        conf = _num(ro.get("confidence"))
        lines.append(f"routing statistics ({fmt(conf, pct=True, digits=2) if conf else '?'} CI over documents, "
                     f"{ro.get('n_bootstrap')} resamples)")
        lines.append(f"  {'layer':>5}  {'load CV':<22}{'entropy/log E':<22}{'top-1 consistency':<20}"
                     f"{'Jaccard':<16}")
        layers = ro["layers"]
        rows = list(range(len(layers)))
        if len(rows) > max_layers:
            half = max_layers // 2
            rows = rows[:half] + [None] + rows[-half:]
        per = ro["per_layer"]
        for i in rows:
            if i is None:
                lines.append(f"  {'…':>5}")
                continue
            cons = (per["top1_consistency"][i] or {}).get("value")
            base = (per["top1_baseline_permutation"][i] or {}).get("value")
            jac = (per["jaccard"][i] or {}).get("value")
            jb = (per["jaccard_baseline_permutation"][i] or {}).get("value")
            consistency, overlap = f"{fmt(cons, 2)} (base {fmt(base, 2)})", f"{fmt(jac, 2)} ({fmt(jb, 2)})"
            lines.append(f"  {layers[i]:>5}  {fmt_ci(per['load_cv'][i], 2):<22}"
                         f"{fmt_ci(per['entropy_normalised'][i], 2):<22}{consistency:<20}{overlap:<16}")
        mean = ro["mean"]
        consistency = f"{fmt(mean['top1_consistency'], 2)} (base {fmt(mean['top1_baseline_permutation'], 2)})"
        overlap = f"{fmt(mean['jaccard'], 2)} ({fmt(mean['jaccard_baseline_permutation'], 2)})"
        lines.append(f"  {'mean':>5}  {fmt(mean['load_cv'], 2):<22}{fmt(mean['entropy_normalised'], 2):<22}"
                     f"{consistency:<20}{overlap:<16}")
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------------------------
# sections

EXPLAIN = {
    "static-similarity": (
        "Each heatmap is a member × member matrix of one layer: rows and columns are the routed experts "
        "<code>e0…</code>, the shared experts <code>shared0…</code> and, when a dense model was given, its FFN "
        "<code>F</code>. A cell is the cosine similarity of the two members' weight matrix (pick gate, up or down): "
        "<em>matrix-level</em> compares the flattened matrices, <em>neuron-averaged</em> the mean neuron vector, "
        "<em>reordered</em> the matrices after matching each neuron of one member to its most similar neuron of "
        "the other. When reordering raises the similarity a lot, the experts hold similar neurons in a different "
        "order: the study's first observation, <strong>neurons act like fine-grained experts</strong>. "
        "Grey cells have no value (members of different width, or a pair that was not matched)."),
    "gate-regression": (
        "Each point is a pair of routed experts of one layer: x is the cosine between their gate embeddings "
        "(their rows of the router weight), y the similarity of their weight matrices. R² of the linear fit says "
        "how much the router's view of two experts predicts how alike their weights are; the study's Table 3 "
        "reports averages over layers of 0.33, 0.26, 0.40 and 0.15 for its four models (real weights). "
        "Random tiny checkpoints give R² near 0."),
    "pca": (
        "Principal components of the standardised weights. Matrix-level: one point per member (its flattened "
        "matrix). Neuron-level: one point per neuron, coloured by the member it belongs to. Members whose "
        "neurons form separate clouds are distinct; overlapping clouds mean the members are built from "
        "interchangeable neurons (observation 1). Axis labels give the explained variance of each component."),
    "output-similarity": (
        "All experts are applied to every token (whatever the router chose) and their outputs compared. "
        "Heatmaps: member × member mean angular similarity <code>1 − arccos(cos)/π</code> over all tokens "
        "(0.5 = orthogonal), per layer; the per-token view shows the cosine for single tokens. The line plot is the "
        "mean similarity among routed experts by layer. The study's third observation: <strong>expert diversity "
        "increases with depth</strong> (similarity falls, a negative slope), <strong>while the last layer is an "
        "outlier</strong> (a large |z| of the last layer against the others)."),
    "norm-vs-score": (
        "For every token, the routed experts are ranked by router score and by the L2 norm of their output. "
        "The table (and heatmaps) give how often the top-1 (top-2) scored expert has the largest, second-largest, "
        "… output norm; with a random router the top-1 expert would have the largest norm for 1/E of tokens. "
        "The study's second observation: <strong>the router usually selects experts with larger output "
        "norms</strong>. The bar charts show, for a few tokens, each expert's output norm and router score (chosen "
        "experts in red)."),
    "intermediate": (
        "The intermediate state <code>act(W_gate·x)</code> of every member, per token (rows) and neuron (columns), "
        "for the layers where it was kept in full. Most values sit near zero and a few neurons fire strongly, "
        "much like a router that picks a few experts: evidence for observation 1, neurons as fine-grained experts. "
        "The table gives, per layer, the fraction of activations with |a| < 1e-3."),
    "chosen-experts": (
        "The expert with the largest routing weight (top-1) for each token (rows) and layer (columns), the "
        "study's chosen-experts map; horizontal lines separate documents. Runs of the same colour down a column "
        "mean consecutive tokens share an expert. To compare two runs on the same tokens (e.g. base vs "
        "instruct) use <code>moescope compare</code>."),
    "routing-stats": (
        "How the router spreads tokens, with bootstrap confidence intervals over documents. Load: the share of "
        "tokens routed to each expert (dashed line: the uniform share k/E) and its coefficient of variation "
        "(0 = perfectly balanced). Entropy of the router scores ÷ log E (1 = uniform, no preference). "
        "Consecutive-token consistency: how often the next token keeps the same top-1 expert (and the Jaccard "
        "overlap of the top-k sets), against the same statistic with each document's tokens shuffled (a value "
        "above the baseline means routing follows local context). Co-activation: how often two experts are chosen "
        "together relative to independent routing with the same loads (0 on the log scale = as expected)."),
}


class _Builder:
    """Builds the sections of one report into HTML; figures go to ``tmp`` first and are inlined."""

    def __init__(self, weights: Results | None, trace: Results | None, summary: dict, tmp: Path,
                 detail_layers: Sequence[int] | None, static_grids: bool, quiet: bool, quick_figures: bool = False):
        self.w, self.t, self.summary, self.tmp = weights, trace, summary, tmp
        self.quiet, self.static_grids, self.quick_figures = quiet, static_grids, quick_figures
        self.hm = HeatmapSet()
        self.notes: list[str] = []
        if trace is not None:
            kept = [l for l in trace.layers if _get(trace, f"layer{l}.intermediate")]
            chosen = detail_layers if detail_layers is not None else (kept or _first_middle_last(trace.layers))
            self.detail = [l for l in trace.layers if l in set(chosen)] or trace.layers[:1]
        else:
            self.detail = []

    # --- figures -------------------------------------------------------------------------------------------
    def static_figures(self) -> dict[str, list]:
        from .figures import render_static

        kw = {"formats": ("png",), "pca_dims": (2,) if self.quick_figures else (2, 3)}
        if not self.static_grids:
            kw["kinds"] = ()
        records = render_safely("the static figures", lambda: render_static(
            self.w, self.tmp / "static", **_supported(render_static, kw)), self.notes, self.quiet)
        return _group(records, {"similarity_": "static-similarity", "gate_regression": "gate-regression",
                                "pca_": "pca"}, "gate-regression")

    def dynamic_figures(self) -> dict[str, list]:
        from .figures import render_dynamic

        kw = {"formats": ("png",), "detail_layers": self.detail, "token_grids": False}  # the widget shows them
        records = render_safely("the trace figures", lambda: render_dynamic(
            self.t, self.tmp / "dynamic", **_supported(render_dynamic, kw)), self.notes, self.quiet)
        return _group(records, {"token_similarity": "output-similarity", "output_similarity": "output-similarity",
                                "norm_vs_score": "norm-vs-score", "norm_rank": "norm-vs-score",
                                "intermediate": "intermediate", "chosen_experts": "chosen-experts"},
                      "chosen-experts")

    # --- summary ---------------------------------------------------------------------------------------------
    def summary_section(self, omitted: Mapping[str, str]) -> str:
        m = self.summary["model"]
        facts = [("family", m.get("family_title") or m.get("family")), ("checkpoint", m.get("path")),
                 ("dense reference F", m.get("dense_model") or "none"),
                 ("layers", m.get("num_layers") or "n/a"), ("MoE layers", _ranges(m.get("moe_layers") or [])),
                 ("dense layers (no experts, skipped)", _ranges(m.get("dense_layers") or [])),
                 ("routed experts per layer", m.get("num_experts") or "n/a"), ("top-k", m.get("top_k") or "n/a"),
                 ("shared experts", m.get("num_shared_experts") if m.get("num_shared_experts") is not None else "n/a"),
                 ("router scoring", m.get("scoring") or "n/a"),
                 ("expert width (neurons)", m.get("expert_width") or "n/a")]
        if m.get("hidden_size"):
            facts.append(("hidden size", m["hidden_size"]))
        if m.get("total_params"):
            facts.append(("parameters (total / active per token)",
                          f"{m['total_params']:,} / {m.get('active_params') or 0:,}"))
        runs = self.summary["runs"]
        facts += [("weights run", runs["weights"] or "not in this report"),
                  ("trace run", runs["trace"] or "not in this report")]
        if self.t is not None:
            tr = self.summary["trace"]
            facts.append(("traced input", f"{tr.get('tokens')} tokens, {tr.get('documents')} document(s), "
                                          f"{tr.get('input_source')}"))
        half = (len(facts) + 1) // 2
        model = ("<h3>Model</h3>\n<div class=\"row\">" + table(["fact", "value"], facts[:half], left=2, cls="facts")
                 + table(["fact", "value"], facts[half:], left=2, cls="facts") + "</div>\n")
        out = "<h3>Headline numbers</h3>\n<div class=\"cards\">\n"
        st = self.summary["static"]
        if st:
            for mat in st["matrices"]:
                r2 = (st.get("gate_r2_mean") or {}).get(mat, {})
                out += card(f"gate-embedding R² · {mat} (mean over layers)", fmt(r2.get("flat")),
                            f"matrix-level; neuron-averaged {fmt(r2.get('averaged'))}", key=f"gate_r2_mean.{mat}")
        tr = self.summary["trace"]
        if tr:
            out += card("top-1 scored expert has the largest output norm",
                        fmt(tr.get("top1_largest_norm_fraction"), digits=3, pct=True),
                        f"of tokens, mean over layers (chance {fmt(tr.get('chance_fraction'), pct=True)})",
                        key="top1_largest_norm_fraction")
            dt = tr["depth_trend"]
            out += card("expert-output similarity vs depth (slope per layer)", fmt(dt.get("slope"), 4),
                        "negative = experts grow more diverse with depth" if dt.get("slope") is not None
                        else "needs at least 3 traced layers", key="depth_trend.slope")
            out += card("last-layer outlier (z-score)", fmt(dt.get("last_layer_outlier_z"), 2),
                        "last layer's routed similarity against the other layers",
                        key="depth_trend.last_layer_outlier_z")
        ro = self.summary["routing"]
        if ro:
            per, layers = ro["per_layer"], ro["layers"]
            conf = fmt(ro.get("confidence"), pct=True, digits=2)
            out += card("load CV (0 = balanced)", fmt(ro["mean"]["load_cv"], 3),
                        _layer_ci_text(layers, per["load_cv"]) + f" ({conf} CI)", key="routing.load_cv")
            out += card("router entropy ÷ log E", fmt(ro["mean"]["entropy_normalised"], 3),
                        _layer_ci_text(layers, per["entropy_normalised"]), key="routing.entropy_normalised")
            out += card("next token keeps its top-1 expert", fmt(ro["mean"]["top1_consistency"], 3),
                        f"shuffled-token baseline {fmt(ro['mean']['top1_baseline_permutation'], 3)}; excess "
                        f"{fmt(ro['mean']['top1_excess'], 3)} (mean over layers)", key="routing.top1_consistency")
        out += "</div>\n" + model
        if omitted:
            out += "<p class=\"note omitted\">Not in this report: " + "; ".join(
                f"<strong>{_esc(SECTIONS[k])}</strong> ({_esc(v)})" for k, v in omitted.items()) + ".</p>\n"
        if self.notes:
            out += "".join(f'<p class="note">{_esc(n)}</p>\n' for n in self.notes)
        return (f'<section id="summary">\n<h2>Summary</h2>\n<p class="explain">moescope reproduces the analyses of '
                f'"A Closer Look into Mixture-of-Experts in Large Language Models" (Lo et al., arXiv 2406.18219). '
                f'Its three observations: (1) neurons act like fine-grained experts; (2) the router usually selects '
                f'experts with larger output norms; (3) expert diversity increases with depth, while the last '
                f'layer is an outlier. Each section below explains how to read its figures.</p>\n{out}</section>\n')

    # --- static ----------------------------------------------------------------------------------------------
    def static_similarity(self, figs: list) -> str:
        w = self.w
        layers = w.layers
        l0 = layers[0]
        matrices = [m for m in ("gate", "up", "down") if _get(w, f"layer{l0}.{m}.matrix_similarity") is not None]
        kinds = [k for k in STATIC_KINDS if _get(w, f"layer{l0}.{matrices[0]}.{k}") is not None]
        n = len(_get(w, f"layer{l0}.labels", []))
        shown_layers = layers
        note = ""
        cost = lambda ls, ks: len(ls) * len(matrices) * len(ks) * n * n  # noqa: E731
        if cost(shown_layers, kinds) > STATIC_BUDGET:
            kinds = [k for k in kinds if k in ("matrix_similarity", "neuron_avg_similarity",
                                               "reordered_matrix_similarity")]
        if cost(shown_layers, kinds) > STATIC_BUDGET:
            keep = max(1, STATIC_BUDGET // max(cost([0], kinds), 1))
            idx = np.unique(np.linspace(0, len(layers) - 1, keep).round().astype(int))
            shown_layers = [layers[i] for i in idx]
            note = (f"<p class=\"note\">{len(shown_layers)} of {len(layers)} layers are embedded to keep the page "
                    f"small; all layers are in the run directory.</p>\n")
        entries = {}
        for l in shown_layers:
            labels = list(w[f"layer{l}.labels"])
            g = _get(w, f"layer{l}.router_similarity")
            for m in matrices:
                for k in kinds:
                    value = _get(w, f"layer{l}.{m}.{k}")
                    if value is not None:
                        entries[f"{l}|{m}|{k}"] = {"rows": labels, "values": value,
                                                   "note": f"layer {l} · W_{m} · {STATIC_KINDS[k]}"}
                if g is not None:
                    routed = [labels[i] for i in _routed(labels)][: to_numpy(g).shape[0]]
                    entries[f"{l}|{m}|router"] = {"rows": routed, "values": g,
                                                  "note": f"layer {l} · gate-embedding cosine G (router rows)"}
        options = [(k, STATIC_KINDS[k]) for k in kinds] + [("router", "gate-embedding cosine G")]
        widget = self.hm.add(controls=[("layer", "layer", [(l, l) for l in shown_layers]),
                                       ("matrix", "matrix", [(m, f"W_{m}") for m in matrices]),
                                       ("kind", "measure", options)],
                             entries=entries, value_name="cosine similarity", offdiag=True,
                             nan_note="no value (different width, or pair not matched)")
        rows = []
        for l in layers:
            labels = list(w[f"layer{l}.labels"])
            idx = _routed(labels)
            row: list[Any] = [l]
            for m in matrices:
                for k in ("matrix_similarity", "reordered_matrix_similarity"):
                    value = _get(w, f"layer{l}.{m}.{k}")
                    row.append(fmt(_offdiag_mean(value, idx)) if value is not None else "n/a")
            rows.append(row)
        header = ["layer"] + [f"{m}: {t}" for m in matrices for t in ("matrix-level", "reordered")]
        content = (widget + note + "<h3>Mean similarity among routed experts</h3>\n"
                   + table(header, rows) + figures_html(figs, groups=by_matrix))
        return section("static-similarity", SECTIONS["static-similarity"], EXPLAIN["static-similarity"], content)

    def gate_regression(self, figs: list) -> str:
        st = self.summary["static"]
        header = ["layer"] + [f"{m}: {k}" for m in st["matrices"] for k in ("matrix-level", "neuron-avg")]
        rows = []
        for i, l in enumerate(st["layers"]):
            rows.append([l] + [fmt(st["gate_r2_by_layer"][m][k][i]) for m in st["matrices"]
                               for k in ("flat", "averaged")])
        rows.append(["mean"] + [fmt((st["gate_r2_mean"] or {}).get(m, {}).get(k)) for m in st["matrices"]
                                for k in ("flat", "averaged")])
        content = "<h3>R² by layer</h3>\n" + table(header, rows) + figures_html(figs, groups=by_matrix)
        return section("gate-regression", SECTIONS["gate-regression"], EXPLAIN["gate-regression"], content)

    def pca(self, figs: list) -> str:
        w = self.w
        rows = []
        for l in w.layers:
            for m in ("gate", "up", "down"):
                for level in ("matrix", "neuron"):
                    evr = _get(w, f"layer{l}.{m}.pca_{level}_evr")
                    if evr is not None:
                        rows.append([l, m, level] + [fmt(v, 3, pct=False) for v in to_numpy(evr, dtype=float)[:3]])
        content = ""
        if rows:
            k = max(len(r) for r in rows) - 3
            content += ("<details><summary>explained variance ratios</summary>\n"
                        + table(["layer", "matrix", "level"] + [f"PC{i + 1}" for i in range(k)], rows, left=3)
                        + "</details>\n")
        content += figures_html(sorted(figs, key=lambda r: Path(r[1]).stem.endswith("3d")), groups=by_matrix)
        return section("pca", SECTIONS["pca"], EXPLAIN["pca"], content)

    # --- trace -----------------------------------------------------------------------------------------------
    def tokens(self) -> list[str]:
        tokens = _get(self.t, "inputs.tokens")
        if tokens is None:
            n = len(to_numpy(self.t[f"layer{self.t.layers[0]}.chosen_experts"]))
            tokens = [str(i) for i in range(n)]
        return [str(x) for x in tokens]

    def output_similarity(self, figs: list) -> str:
        t, tr = self.t, self.summary["trace"]
        layers = [l for l in t.layers if _get(t, f"layer{l}.output_similarity") is not None]
        dt = tr["depth_trend"]
        content = "<div class=\"cards\">" + card("slope of routed similarity over depth", fmt(dt.get("slope"), 4),
                                                 "per layer, last layer excluded") \
            + card("last-layer outlier z", fmt(dt.get("last_layer_outlier_z"), 2)) + "</div>\n"
        if layers:
            entries = {}
            for l in layers:
                members = list(t[f"layer{l}.members"])
                for key, name in (("output_similarity", "angular"), ("output_cosine", "cosine")):
                    value = _get(t, f"layer{l}.{key}")
                    if value is not None:
                        entries[f"{l}|{name}"] = {"rows": members, "values": value,
                                                  "note": f"layer {l}: mean over {tr.get('tokens')} tokens"}
            content += "<h3>Mean similarity of member outputs, per layer</h3>\n" + self.hm.add(
                controls=[("layer", "layer", [(l, l) for l in layers]),
                          ("measure", "measure", [("angular", "angular similarity 1 − arccos(cos)/π"),
                                                  ("cosine", "cosine")])],
                entries=entries, value_name="similarity over tokens", offdiag=True)
        content += self.token_similarity()
        rows = [[l, fmt(v, 4)] for l, v in zip(tr["layers"], tr["per_layer"].get("mean_routed_angular_similarity")
                                               or [])]
        if rows:
            content += ("<details><summary>mean angular similarity among routed experts, by layer</summary>\n"
                        + table(["layer", "mean routed angular similarity"], rows) + "</details>\n")
        content += figures_html(figs, per_layer_label="per-token similarity figures")
        return section("output-similarity", SECTIONS["output-similarity"], EXPLAIN["output-similarity"], content)

    def token_similarity(self) -> str:
        t = self.t
        layers = [l for l in t.layers if _get(t, f"layer{l}.token_similarity") is not None]
        if not layers:
            return ""
        sims = {l: to_numpy(t[f"layer{l}.token_similarity"], dtype=float) for l in layers}
        ts, m = sims[layers[0]].shape[:2]
        n_tok = min(ts, 64)
        order = self.detail + [l for l in layers if l not in self.detail]
        order = [l for l in order if l in sims]
        while n_tok * m * m * len(order) > TOKEN_BUDGET and n_tok > 16:
            n_tok //= 2
        while n_tok * m * m * len(order) > TOKEN_BUDGET and len(order) > 1:
            order.pop()
        shown = sorted(order)
        tokens = self.tokens()
        entries = {}
        for l in shown:
            members = list(t[f"layer{l}.members"])
            chosen = _get(t, f"layer{l}.chosen_experts")
            weights = _get(t, f"layer{l}.chosen_weights")
            for i in range(min(n_tok, len(sims[l]))):
                note = f"layer {l} · token {i} {tokens[i]!r}" if i < len(tokens) else f"layer {l} · token {i}"
                if chosen is not None:
                    ids = to_numpy(chosen)[i].tolist()
                    ws = to_numpy(weights, dtype=float)[i].tolist() if weights is not None else [None] * len(ids)
                    note += ": router chose " + ", ".join(f"e{e}" + (f" ({w:.2f})" if w is not None else "")
                                                          for e, w in zip(ids, ws))
                entries[f"{l}|{i}"] = {"rows": members, "values": sims[l][i], "note": note}
        options = [(i, f"{i}: {_visible(tokens[i]) if i < len(tokens) else ''}") for i in range(n_tok)]
        extra = "" if len(shown) == len(layers) and n_tok == ts else \
            (f"<p class=\"note\">Embedded: the first {n_tok} tokens of layer(s) {_ranges(shown)} (the run keeps "
             f"{ts} tokens of {len(layers)} layers).</p>\n")
        return ("<h3>Per-token similarity of member outputs</h3>\n" + self.hm.add(
            controls=[("layer", "layer", [(l, l) for l in shown]), ("token", "token", options)], entries=entries,
            value_name="cosine of member outputs", value_range=(-1.0, 1.0)) + extra)

    def norm_vs_score(self, figs: list) -> str:
        t, tr = self.t, self.summary["trace"]
        keys = ("top1_largest_norm_fraction", "top1_second_norm_fraction", "top2_largest_norm_fraction",
                "top2_second_norm_fraction")
        rows = [[l] + [fmt(_get(t, f"layer{l}.{k}"), 3, pct=True) for k in keys] for l in t.layers]
        rows.append(["mean"] + [fmt(_mean(_get(t, f"layer{l}.{k}") for l in t.layers), 3, pct=True) for k in keys])
        content = ("<div class=\"cards\">" + card("top-1 scored expert has the largest output norm",
                                                  fmt(tr.get("top1_largest_norm_fraction"), 3, pct=True),
                                                  f"of tokens, mean over layers; chance "
                                                  f"{fmt(tr.get('chance_fraction'), pct=True)}")
                   + "</div>\n" + table(["layer", "top-1 → largest norm", "top-1 → 2nd largest",
                                         "top-2 → largest", "top-2 → 2nd largest"], rows) + figures_html(figs))
        return section("norm-vs-score", SECTIONS["norm-vs-score"], EXPLAIN["norm-vs-score"], content)

    def intermediate(self, figs: list) -> str:
        t = self.t
        rows = []
        for l in t.layers:
            nz = _get(t, f"layer{l}.intermediate_near_zero_fraction") or {}
            if not isinstance(nz, Mapping) or not nz:
                continue
            routed = [v for k, v in nz.items() if k.startswith("e") and k[1:].isdigit()]
            shared = [v for k, v in nz.items() if k.startswith("shared")]
            rows.append([l, fmt(_mean(routed), 3, pct=True), fmt(_mean(shared), 3, pct=True) if shared else "–",
                         fmt(nz.get("F"), 3, pct=True) if "F" in nz else "–"])
        content = ""
        if rows:
            content += ("<h3>Fraction of near-zero activations (|a| &lt; 1e-3)</h3>\n"
                        + table(["layer", "routed experts (mean)", "shared experts", "dense F"], rows))
        content += figures_html(figs, per_layer_label="intermediate-state heatmaps")
        return section("intermediate", SECTIONS["intermediate"], EXPLAIN["intermediate"], content)

    def chosen_experts(self, figs: list) -> str:
        return section("chosen-experts", SECTIONS["chosen-experts"], EXPLAIN["chosen-experts"], figures_html(figs))

    def routing_stats(self) -> str:
        from . import figures_stats as fs

        t, ro = self.t, self.summary["routing"]
        layers = ro["layers"]
        stats = [{part: _get(t, f"layer{l}.stats.{part}") or {} for part in ("load", "entropy", "consistency")}
                 for l in layers]   # (``t["layerL.stats"]`` alone gives only the co-activation tensors)
        top_k = int(self.summary["model"].get("top_k") or _get(t, f"layer{layers[0]}.top_k") or 1)
        conf = float(ro.get("confidence") or 0.95)
        per = ro["per_layer"]
        rows = []
        for i, l in enumerate(layers):
            dead = (per["dead_experts"][i] or [])
            mi = per["cross_layer_mi_normalised"][i]
            rows.append([l, fmt_ci(per["load_cv"][i], 3), fmt_ci(per["load_max_over_mean"][i], 2),
                         ", ".join(f"e{e}" for e in dead) or "none", fmt_ci(per["entropy_normalised"][i], 3),
                         fmt_ci(per["top1_consistency"][i], 3), fmt((per["top1_baseline_permutation"][i] or {})
                                                                     .get("value"), 3),
                         fmt_ci(per["jaccard"][i], 3),
                         fmt((per["jaccard_baseline_permutation"][i] or {}).get("value"), 3),
                         fmt_ci(mi, 3) if isinstance(mi, Mapping) else "–"])
        header = ["layer", "load CV", "max/mean load", "dead experts", "entropy ÷ log E", "top-1 consistency",
                  "shuffled baseline", "top-k Jaccard", "shuffled baseline", "MI with next layer (normalised)"]
        content = (f"<p class=\"note\">{conf:.0%} percentile intervals from {ro.get('n_bootstrap')} bootstrap "
                   f"resamples of the documents.</p>\n" + table(header, rows))
        figs: list = []
        tmp = self.tmp / "stats"
        figs += render_safely("routing statistics by layer", lambda: [
            save(fs.routing_by_layer(layers, stats, confidence=conf), tmp, "routing_by_layer")], self.notes,
            self.quiet)
        detail = [l for l in layers if l in set(self.detail)] or layers[:1]
        figs += render_safely("expert load bars", lambda: [save(fs.load_bars(
            [t[f"layer{l}.stats.load"] for l in detail], detail, top_k=top_k, confidence=conf), tmp, "load_bars")],
            self.notes, self.quiet)
        if len(layers) > len(detail):
            loads = np.asarray([t[f"layer{l}.stats.load.topk_load.value"] for l in layers], dtype=float)
            figs += render_safely("load by layer", lambda: [save(fs.load_by_layer(loads, layers, top_k=top_k), tmp,
                                                                 "load_by_layer")], self.notes, self.quiet)
        lift_layers = [l for l in detail if _get(t, f"layer{l}.stats.coactivation.lift") is not None
                       and _get(t, f"layer{l}.stats.coactivation.baseline_lift") is not None]
        if lift_layers:
            figs += render_safely("co-activation lift", lambda: [save(fs.lift_heatmaps(
                [t[f"layer{l}.stats.coactivation.lift"] for l in lift_layers],
                [t[f"layer{l}.stats.coactivation.baseline_lift"] for l in lift_layers], lift_layers), tmp,
                "coactivation_lift")], self.notes, self.quiet)
        content += figures_html(figs)
        entries = {}
        for l in layers:
            lift = _get(t, f"layer{l}.stats.coactivation.lift")
            base = _get(t, f"layer{l}.stats.coactivation.baseline_lift")
            if lift is None:
                continue
            lift = to_numpy(lift, dtype=float)
            labels = [f"e{i}" for i in range(lift.shape[0])]
            more = {"lift": lift}
            if base is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.log2(lift / to_numpy(base, dtype=float))
                more["independent-routing lift"] = base
                entries[f"{l}|ratio"] = {"rows": labels, "values": ratio, "more": more,
                                         "note": f"layer {l}: log2(lift ÷ independent-routing lift)"}
            with np.errstate(divide="ignore"):
                entries[f"{l}|lift"] = {"rows": labels, "values": np.log2(lift), "more": more,
                                        "note": f"layer {l}: log2 lift = log2 P(a,b) / (P(a) P(b))"}
        if entries and len(layers) > len(lift_layers):   # the figure above already shows every layer otherwise
            content += "<h3>Co-activation of expert pairs, every layer</h3>\n" + self.hm.add(
                controls=[("layer", "layer", [(l, l) for l in layers if f"{l}|lift" in entries]),
                          ("measure", "measure", [("ratio", "log2 lift ÷ independent routing"),
                                                  ("lift", "log2 lift")])],
                entries=entries, cmap=style.DIVERGING_CMAP, symmetric=True, value_name="log2",
                nan_note="diagonal, or never chosen together")
        return section("routing-stats", SECTIONS["routing-stats"], EXPLAIN["routing-stats"], content)


def _supported(fn: Callable, kwargs: Mapping[str, Any]) -> dict:
    """The keyword arguments ``fn`` accepts (the figure renderers' optional keywords may change)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _offdiag_mean(matrix: Any, idx: Sequence[int]) -> float | None:
    a = to_numpy(matrix, dtype=float)
    idx = [i for i in idx if i < a.shape[0]]
    if len(idx) < 2:
        return None
    s = a[np.ix_(idx, idx)][~np.eye(len(idx), dtype=bool)]
    return float(np.nanmean(s)) if np.isfinite(s).any() else None


def _layer_ci_text(layers: Sequence[int], stats: Sequence[Mapping | None], limit: int = 3) -> str:
    """'layer 0: v [lo, hi]; layer 1: …' for few layers, else the lowest and highest layer."""
    pairs = [(l, s) for l, s in zip(layers, stats) if s and _num(s.get("value")) is not None]
    if len(pairs) > limit:
        pairs = sorted(pairs, key=lambda p: p[1]["value"])
        pairs = [pairs[0], pairs[-1]]
        (lo_layer, lo), (hi_layer, hi) = pairs
        return f"lowest layer {lo_layer}: {fmt_ci(lo, 2)}; highest layer {hi_layer}: {fmt_ci(hi, 2)}"
    return "; ".join(f"layer {l}: {fmt_ci(s, 2)}" for l, s in pairs)


def _group(records: Sequence[tuple[str, Path]], prefixes: Mapping[str, str], fallback: str) -> dict[str, list]:
    """Figure records grouped by section, by the file name's prefix."""
    out: dict[str, list] = {}
    for title, path in records:
        stem = Path(path).stem
        key = next((s for p, s in prefixes.items() if stem.startswith(p)), fallback)
        out.setdefault(key, []).append((title, path))
    return out


# ---------------------------------------------------------------------------------------------------------------
# entry points

def _out_file(out: str | Path | None, first_run: Path) -> Path:
    if out is None:
        return Path(first_run) / "report" / "index.html"
    out = Path(out)
    return out if out.suffix.lower() in (".html", ".htm") else out / "index.html"


def report(run_dirs: Sequence[str | Path] | str | Path, out: str | Path | None = None, *, quiet: bool = True,
           detail_layers: Sequence[int] | None = None, static_grids: bool = False, quick: bool = False) -> Path:
    """Write one self-contained ``index.html`` (and ``summary.json`` beside it) for one weights run, one trace
    run, or one of each of the same model; return the HTML path.

    ``out``: an ``.html`` file or a directory (default ``<first run>/report/index.html``). ``quiet=False``
    prints progress to stderr. ``detail_layers``: layers that get per-layer trace figures (default: the layers
    whose intermediate states were kept, else first/middle/last). ``static_grids``: also embed the static
    similarity grids as images (the interactive heatmaps show the same numbers). ``quick``: 2-D PCA only."""
    if isinstance(run_dirs, (str, Path, Results)):
        run_dirs = [run_dirs]
    weights, trace = load_runs(run_dirs)
    first = run_dirs[0].path if isinstance(run_dirs[0], Results) else run_dirs[0]
    target = _out_file(out, Path(first))
    summary = headline(weights, trace)
    with tempfile.TemporaryDirectory(prefix="moescope-report-") as tmp:
        b = _Builder(weights, trace, summary, Path(tmp), detail_layers, static_grids, quiet, quick)
        present, omitted = _sections(weights, trace, summary)
        body = []
        if weights is not None:
            figs = b.static_figures()
            if "static-similarity" in present:
                body.append(b.static_similarity(figs.get("static-similarity", [])))
            if "gate-regression" in present:
                body.append(b.gate_regression(figs.get("gate-regression", [])))
            if "pca" in present:
                body.append(b.pca(figs.get("pca", [])))
        if trace is not None:
            figs = b.dynamic_figures()
            for ident, make in (("output-similarity", b.output_similarity), ("norm-vs-score", b.norm_vs_score),
                                ("intermediate", b.intermediate), ("chosen-experts", b.chosen_experts)):
                if ident in present:
                    body.append(make(figs.get(ident, [])))
            if "routing-stats" in present:
                body.append(b.routing_stats())
        head = b.summary_section(omitted)
        m = summary["model"]
        runs = " + ".join(k for k in ("weights", "trace") if summary["runs"][k])
        title = f"moescope report · {m.get('family_title') or m.get('family')}"
        subtitle = _esc(f"{m.get('path')} · {runs} run(s) · moescope {__version__}")
        toc = [("summary", "Summary")] + [(s, SECTIONS[s]) for s in SECTIONS if s in present]
        text = page(title, subtitle, toc, head + "".join(body))
    summary["sections"] = {s: (True if s in present or s == "summary" else omitted.get(s, False)) for s in SECTIONS}
    summary["report"] = str(target)
    _write(target, text)
    _write(target.with_name("summary.json"), json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    return target


def _sections(weights: Results | None, trace: Results | None, summary: Mapping) -> tuple[list[str], dict[str, str]]:
    """Sections with data, and a reason for each section left out."""
    present, omitted = [], {}
    if weights is None:
        omitted.update({s: "needs a `moescope weights` run of this model" for s in STATIC_SECTIONS})
    else:
        l0 = weights.layers[0]
        has = lambda suffix: any(_get(weights, f"layer{l0}.{m}.{suffix}") is not None  # noqa: E731
                                 for m in ("gate", "up", "down"))
        for ident, ok, why in (("static-similarity", has("matrix_similarity"), "no similarity matrices saved"),
                               ("gate-regression", has("gate_regression"), "no gate regression saved"),
                               ("pca", has("pca_matrix") or has("pca_neuron"), "no PCA saved")):
            (present.append(ident) if ok else omitted.__setitem__(ident, why))
    if trace is None:
        omitted.update({s: "needs a `moescope trace` run of this model" for s in TRACE_SECTIONS})
    else:
        ls = trace.layers
        checks = {
            "output-similarity": (any(_get(trace, f"layer{l}.output_similarity") is not None for l in ls),
                                  "no output similarity saved"),
            "norm-vs-score": (any(_get(trace, f"layer{l}.rank_counts") is not None for l in ls), "no norm ranks saved"),
            "intermediate": (any(_get(trace, f"layer{l}.intermediate_near_zero_fraction") is not None
                                 or _get(trace, f"layer{l}.intermediate") for l in ls), "no intermediate states saved"),
            "chosen-experts": (any(_get(trace, f"layer{l}.chosen_experts") is not None for l in ls),
                               "no chosen experts saved"),
            "routing-stats": (summary.get("routing") is not None,
                              "the trace run has no routing statistics (it was made with --no-stats)"),
        }
        for ident, (ok, why) in checks.items():
            (present.append(ident) if ok else omitted.__setitem__(ident, why))
    return present, omitted


def _write(path: Path, text: str) -> None:
    from ..writer import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)     # a page to share: readable like any file written with open()


def read_json_beside(path: str | Path, name: str) -> dict:
    """The JSON file ``name`` of a page (give the page's HTML file, its directory or the JSON itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    elif path.suffix.lower() in (".html", ".htm"):
        path = path.with_name(name)
    return json.loads(path.read_text())


def read_summary(path: str | Path) -> dict:
    """``summary.json`` of a report (give the report's HTML file, its directory or the JSON itself)."""
    return read_json_beside(path, "summary.json")
