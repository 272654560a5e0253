"""Render every figure of a saved run into a directory: ``render_static`` (``moescope weights`` results) and
``render_dynamic`` (trace results). Each returns ``[(title, path), ...]``, one record per figure; ``path`` is
the file of the first format, the other formats sit next to it under the same stem."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

from .figures_dynamic import (chosen_experts_diff, chosen_experts_map, intermediate_heatmaps, norm_rank_table,
                              norm_score_bars, routed_indices, routed_mean_similarity, similarity_by_layer,
                              token_similarity_grid, top1)
from .figures_static import gate_scatter_grid, pca_grid, r2_by_layer, similarity_grid
from .style import footnote, save_figure, to_numpy

Record = tuple[str, Path]
STATIC_KINDS = ("matrix_similarity", "neuron_avg_similarity", "reordered_matrix_similarity")
_NAN_NOTES = {"matrix_similarity": "different width", "neuron_avg_similarity": "different width"}
_REGRESSION_KINDS = {"flat": ("matrix_similarity", "matrix-level"),
                     "averaged": ("neuron_avg_similarity", "neuron-averaged")}


def figure_title(fig: Figure) -> str:
    """The figure's suptitle, else its first axes' title."""
    title = fig.get_suptitle()
    return title or next((ax.get_title() for ax in fig.axes if ax.get_title()), "")


def _get(results: Any, key: str, default: Any = None) -> Any:
    try:
        return results[key]
    except KeyError:
        return default


class _Renderer:
    """Saves figures under ``out_dir`` and collects the (title, path) records."""

    def __init__(self, out_dir, formats: Sequence[str], note: str | None = None):
        self.out_dir, self.formats, self.note, self.records = Path(out_dir), tuple(formats), note, []

    def __call__(self, name: str, make: Callable[[], Figure]) -> None:
        fig = make()
        if self.note:
            footnote(fig, self.note)
        paths = save_figure(fig, self.out_dir / name, self.formats)
        self.records.append((figure_title(fig), paths[0]))


def render_static(results: Any, out_dir: str | Path, *, formats: Sequence[str] = ("png", "svg"),
                  kinds: Sequence[str] = STATIC_KINDS, max_points: int = 20000,
                  pca_dims: Sequence[int] = (2, 3)) -> list[Record]:
    """Every static figure of a ``moescope weights`` run: similarity grids per matrix and kind, gate-regression
    scatters and R² by layer, matrix- and neuron-level PCA in 2-D (and 3-D when 3 components were saved).
    Dense layers of the checkpoint (no experts) are named in a footnote."""
    layers = list(results.layers)
    if not layers:
        return []
    skipped = _get(results, f"layer{layers[0]}.dense_layers_skipped") or []
    render = _Renderer(out_dir, formats, note=f"dense layers without experts, skipped: "
                                              f"{', '.join(map(str, skipped))}" if skipped else None)
    options = getattr(results, "manifest", {}).get("options", {})
    matrices = [m for m in options.get("matrices", ("gate", "up", "down"))
                if _get(results, f"layer{layers[0]}.{m}.matrix_similarity") is not None]
    labels = [list(results[f"layer{l}.labels"]) for l in layers]
    r2: dict[str, list] = {}
    for m in matrices:
        for kind in kinds:
            mats = [_get(results, f"layer{l}.{m}.{kind}") for l in layers]
            if all(x is not None for x in mats):
                render(f"similarity_{m}_{kind.removesuffix('_similarity')}", lambda: similarity_grid(
                    mats, labels, layers, matrix=m, kind=kind, nan_note=_NAN_NOTES.get(kind, "pair not matched")))
        gates = [results[f"layer{l}.router_similarity"] for l in layers]
        for reg, (key, kind_name) in _REGRESSION_KINDS.items():
            fits = [_get(results, f"layer{l}.{m}.gate_regression.{reg}", {}) for l in layers]
            r2[f"{m} · {kind_name}"] = [f.get("r2") for f in fits]
            render(f"gate_regression_{m}_{reg}", lambda: gate_scatter_grid(
                [results[f"layer{l}.{m}.{key}"] for l in layers], gates, layers, matrix=m, kind=kind_name,
                fits=fits if all("slope" in f for f in fits) else None))
        for level in ("matrix", "neuron"):
            coords = [_get(results, f"layer{l}.{m}.pca_{level}") for l in layers]
            if any(c is None for c in coords):
                continue
            members = [_pca_members(results, l, m, level) for l in layers]
            evr = [results[f"layer{l}.{m}.pca_{level}_evr"] for l in layers]
            coords, members = _subsample(coords, members, max_points)
            for dims in pca_dims:
                if min(to_numpy(c).shape[1] for c in coords) >= dims:
                    render(f"pca_{m}_{level}_{dims}d", lambda: pca_grid(
                        coords, members, layers, matrix=m, level=f"{level}-level", dims=dims, evr=evr))
    if r2:
        render("gate_regression_r2_by_layer", lambda: r2_by_layer(layers, r2))
    return render.records


def _pca_members(results: Any, layer: int, matrix: str, level: str) -> np.ndarray:
    """Member label of each PCA point (neuron-level: one per neuron, member-major)."""
    if level == "matrix":
        return np.asarray(results[f"layer{layer}.{matrix}.pca_matrix_members"])
    widths = results[f"layer{layer}.{matrix}.pca_neuron_members"]
    return np.repeat(list(widths), list(widths.values()))


def _subsample(coords: list, members: list, max_points: int) -> tuple[list, list]:
    """At most ``max_points`` evenly spaced points per layer (member-major order keeps every member)."""
    out_c, out_m = [], []
    for c, pm in zip(coords, members):
        c = to_numpy(c, dtype=float)
        keep = np.unique(np.linspace(0, len(c) - 1, max_points).astype(int)) if len(c) > max_points else slice(None)
        out_c.append(c[keep])
        out_m.append(np.asarray(pm)[keep])
    return out_c, out_m


def _tokens(results: Any, layer: int) -> list[str]:
    for key in ("inputs.tokens", "tokens", "summary.tokens"):
        value = _get(results, key)
        if value is not None:
            return [str(t) for t in value]
    n = len(to_numpy(results[f"layer{layer}.chosen_experts"]))
    return [str(i) for i in range(n)]


def _documents(results: Any) -> list[int] | None:
    docs = _get(results, "inputs.documents", _get(results, "documents"))
    return None if docs is None else [int(d) for d in to_numpy(docs).ravel()]


def _intermediate_members(members: Sequence[str], saved: dict, routed: int = 8) -> list[str]:
    """Members whose intermediate states are drawn: the first ``routed`` routed experts, shared members and F."""
    kept = [m for m in members if m in saved]
    return [m for m in kept if m.startswith("e")][:routed] + [m for m in kept if not m.startswith("e")]


def top1_matrix(results: Any, layers: Sequence[int]) -> np.ndarray:
    """[T, L] top-1 chosen expert (largest routing weight) per token and layer."""
    cols = [top1(results[f"layer{l}.chosen_experts"], _get(results, f"layer{l}.chosen_weights")) for l in layers]
    return np.stack(cols, axis=1)


def render_dynamic(results: Any, out_dir: str | Path, *, formats: Sequence[str] = ("png", "svg"),
                   detail_layers: Sequence[int] | None = None, compare: Any = None,
                   names: tuple[str, str] = ("run", "compare"), max_map_tokens: int = 128,
                   token_grids: bool = True) -> list[Record]:
    """Every dynamic figure of a trace run. Per layer in ``detail_layers`` (default all): per-token output
    similarity, norm vs score bars, intermediate states (where saved). Across layers: similarity by depth,
    the norm-rank table, the chosen-experts map, and with ``compare`` (another run over the same tokens) the
    same/different top-1 map labelled by ``names``."""
    render = _Renderer(out_dir, formats)
    layers = list(results.layers)
    if not layers:
        return render.records
    tokens = _tokens(results, layers[0])
    members = {l: list(_get(results, f"layer{l}.members", [])) for l in layers}
    for l in layers if detail_layers is None else [l for l in layers if l in set(detail_layers)]:
        sim = _get(results, f"layer{l}.token_similarity") if token_grids else None
        if sim is not None:
            render(f"token_similarity_layer{l}", lambda: token_similarity_grid(sim, members[l], tokens, layer=l))
        norms, scores = _get(results, f"layer{l}.expert_norms"), _get(results, f"layer{l}.router_scores")
        if norms is not None and scores is not None:
            render(f"norm_vs_score_layer{l}", lambda: norm_score_bars(
                norms, scores, results[f"layer{l}.chosen_experts"], members[l], tokens, layer=l))
        inter = _get(results, f"layer{l}.intermediate")
        if inter is not None:
            inter = inter if isinstance(inter, dict) else dict(zip(members[l], inter))
            shown = _intermediate_members(members[l], inter)
            render(f"intermediate_layer{l}", lambda: intermediate_heatmaps([inter[m] for m in shown], shown, tokens,
                                                                           layer=l))
    with_sim = [l for l in layers if _get(results, f"layer{l}.output_similarity") is not None]
    if with_sim:
        values = [routed_mean_similarity(results[f"layer{l}.output_similarity"], members[l]) for l in with_sim]
        render("output_similarity_by_layer", lambda: similarity_by_layer(with_sim, values))
    with_counts = [l for l in layers if _get(results, f"layer{l}.rank_counts") is not None]
    if with_counts:
        render("norm_rank_table", lambda: norm_rank_table(
            [results[f"layer{l}.rank_counts"] for l in with_counts], with_counts))
    with_chosen = [l for l in layers if _get(results, f"layer{l}.chosen_experts") is not None]
    if with_chosen:
        n = min(max_map_tokens, len(tokens))
        chosen = top1_matrix(results, with_chosen)[:n]
        scores = _get(results, f"layer{with_chosen[0]}.router_scores")
        e = to_numpy(scores).shape[1] if scores is not None else len(routed_indices(members[with_chosen[0]])) or None
        docs = _documents(results)
        render("chosen_experts_map", lambda: chosen_experts_map(chosen, with_chosen, tokens[:n], num_experts=e,
                                                                documents=docs))
        if compare is not None:
            other = top1_matrix(compare, with_chosen)[:n]
            render("chosen_experts_compare", lambda: chosen_experts_diff(chosen, other, with_chosen, tokens[:n],
                                                                         names=names, documents=docs))
    return render.records
