"""Figures of the static (weights-only) analyses, from plain arrays: similarity heatmaps, gate-embedding
regression scatters, R² by layer and PCA scatters. Every function returns a ``matplotlib.figure.Figure``."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from . import style
from .style import to_numpy

KIND_TITLES = {
    "matrix_similarity": "matrix-level similarity",
    "neuron_avg_similarity": "neuron-level similarity (averaged)",
    "reordered_matrix_similarity": "neuron-level similarity (reordered)",
    "matched_neuron_similarity": "mean matched-neuron similarity",
    "kendall_tau": "Kendall τ of the neuron matching",
}


def _per_layer(value, n: int) -> list:
    """``value`` for each of ``n`` layers: a flat list of labels is shared by every layer."""
    if value and isinstance(value[0], str):
        return [list(value)] * n
    return [list(v) for v in value]


def similarity_grid(matrices: Sequence[np.ndarray], labels: Sequence[str] | Sequence[Sequence[str]],
                    layers: Sequence[int], *, matrix: str, kind: str = "matrix_similarity",
                    nan_note: str = "different width", vmin: float | None = None,
                    vmax: float | None = None) -> Figure:
    """Member × member similarity heatmaps, one panel per layer, one shared colour scale.

    ``matrices``: one [N, N] array per layer; ``labels``: member labels (one list, or one per layer);
    ``kind``: a key of ``KIND_TITLES`` or free text. NaN cells are grey, explained by ``nan_note``.
    """
    mats = [to_numpy(m, dtype=float) for m in matrices]
    labels = _per_layer(labels, len(mats))
    finite = np.concatenate([m[np.isfinite(m)] for m in mats] + [np.zeros(0)])
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    norm = Normalize(lo, hi if hi > lo else lo + 1e-9)
    n = max(m.shape[0] for m in mats)
    side = style.panel_side(n)
    fig, axes = style.panel_grid(len(mats), (side + 0.3, side + 0.3), extra=(1.2, 1.0))
    image = None
    for ax, m, labs, layer in zip(axes, mats, labels, layers):
        image = style.heatmap(ax, m, xlabels=labs, ylabels=labs, norm=norm, aspect="equal")
        ax.set_title(f"layer {layer} · {matrix}", fontsize=10)
    if all(labs == labels[0] for labs in labels):
        style.outer_ticks_only(axes)
    what = KIND_TITLES.get(kind, kind)
    fig.suptitle(f"{what[0].upper()}{what[1:]} of the {matrix} matrices (W_{matrix}) between members")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=what)
    if any(np.isnan(m).any() for m in mats):
        style.nan_legend(fig, nan_note)
    return fig


def _fit_line(x: np.ndarray, y: np.ndarray) -> dict:
    """Least-squares fit and R² of y on x (what ``moescope.static.regression`` stores)."""
    if x.size < 2 or np.ptp(x) == 0:
        return {"slope": np.nan, "intercept": np.nan, "r2": np.nan}
    slope, intercept = np.polyfit(x, y, 1)
    r = np.corrcoef(x, y)[0, 1] if np.ptp(y) > 0 else np.nan
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r * r)}


def pair_values(expert_sim: np.ndarray, gate_sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G, S) over the routed pairs a > b (``expert_sim`` sliced to the routed experts of ``gate_sim``)."""
    g = to_numpy(gate_sim, dtype=float)
    e = g.shape[0]
    s = to_numpy(expert_sim, dtype=float)[:e, :e]
    a, b = np.tril_indices(e, k=-1)
    return g[a, b], s[a, b]


def gate_scatter_grid(expert_sims: Sequence[np.ndarray], gate_sims: Sequence[np.ndarray], layers: Sequence[int],
                      *, matrix: str, kind: str = "matrix-level", fits: Sequence[Mapping] | None = None) -> Figure:
    """Expert similarity S vs gate-embedding similarity G over routed pairs, per layer, with fit line and R².

    ``fits``: saved ``{slope, intercept, r2}`` per layer (else fitted here).
    """
    side = 3.0
    fig, axes = style.panel_grid(len(layers), (side, side * 0.85), extra=(0.4, 0.8))
    for i, (ax, s, g, layer) in enumerate(zip(axes, expert_sims, gate_sims, layers)):
        x, y = pair_values(s, g)
        fit = dict(fits[i]) if fits is not None else _fit_line(x, y)
        ax.scatter(x, y, s=14, alpha=0.7, color="#1f77b4", edgecolor="none", label="expert pairs")
        if np.isfinite(fit.get("slope", np.nan)) and x.size:
            xs = np.array([x.min(), x.max()])
            ax.plot(xs, fit["slope"] * xs + fit["intercept"], color=style.HIGHLIGHT, lw=1.5, label="linear fit")
        r2 = fit.get("r2")
        ax.set_title(f"layer {layer} · {matrix}: R² = {np.nan if r2 is None else r2:.3f}", fontsize=10)
        ax.set_xlabel("gate-embedding cosine G", fontsize=9)
        ax.set_ylabel(f"expert similarity S ({kind})", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"Gate embedding vs expert similarity · {matrix} ({kind}), routed pairs")
    return fig


def r2_by_layer(layers: Sequence[int], series: Mapping[str, Sequence[float]], *, table: bool | None = None,
                title: str = "Gate-embedding regression R² by layer") -> Figure:
    """One line per series (e.g. ``"gate · matrix-level"``) of R² against the layer index, mean in the legend;
    with ``table`` (default: up to 16 layers) the values also as a table below."""
    layers = list(layers)
    table = len(layers) <= 16 if table is None else table
    width = float(np.clip(3 + 0.35 * len(layers), 6, 16))
    fig = Figure(figsize=(width, 4.2 + (0.25 * len(series) + 0.6 if table else 0)), dpi=style.DPI,
                 layout="constrained")
    if table:
        ax, tab = fig.subplots(2, 1, height_ratios=[3, 0.25 * len(series) + 0.6])
    else:
        ax, tab = fig.add_subplot(), None
    colors = style.categorical_cmap(max(len(series), 1))
    for i, (name, values) in enumerate(series.items()):
        v = np.asarray([np.nan if x is None else x for x in values], dtype=float)
        mean = np.nanmean(v) if np.isfinite(v).any() else np.nan
        ax.plot(layers, v, marker="o", color=colors(i), label=f"{name} (mean {mean:.3f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("R²")
    ax.set_xticks(layers[:: style.tick_step(len(layers))])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    if tab is not None:
        tab.axis("off")
        cells = [[f"{x:.3f}" if x is not None and np.isfinite(x) else "–" for x in values]
                 for values in series.values()]
        t = tab.table(cellText=cells, rowLabels=list(series), colLabels=[f"layer {l}" for l in layers],
                      loc="center", cellLoc="center")
        t.auto_set_font_size(False)
        t.set_fontsize(8)
    return fig


def pca_grid(coords: Sequence[np.ndarray], point_members: Sequence[Sequence[str]], layers: Sequence[int], *,
             matrix: str, level: str = "matrix-level", dims: int = 2,
             evr: Sequence[np.ndarray] | None = None) -> Figure:
    """PCA scatter per layer (2-D or 3-D), each point coloured by its member; one legend for all panels.

    ``coords``: [n, k≥dims] per layer; ``point_members``: the member label of each point (neuron-level: the
    member of each neuron, e.g. ``np.repeat(labels, widths)``); ``evr``: explained variance ratios per layer.
    """
    order = list(dict.fromkeys(m for pm in point_members for m in pm))
    colors = style.member_colors(order)
    side = 3.8 if dims == 3 else 3.0
    fig, axes = style.panel_grid(len(layers), (side, side), projection="3d" if dims == 3 else None,
                                 extra=(1.4, 0.8))
    markers = {m: style.member_marker(m) for m in order}
    for i, (ax, c, pm, layer) in enumerate(zip(axes, coords, point_members, layers)):
        c = to_numpy(c, dtype=float)
        pm = np.asarray(pm)
        many = len(pm) > 200
        for m in order:
            sel = pm == m
            if sel.any():
                big = 1.8 if markers[m] == "*" else 1.0
                ax.scatter(*(c[sel, d] for d in range(dims)), s=(4 if many else 30) * big, color=colors[m],
                           marker=markers[m], alpha=0.6 if many else 0.9, edgecolor="none", label=m,
                           rasterized=many)
        if not many and len(pm) <= 16:
            for j, m in enumerate(pm):
                ax.text(*(c[j, d] for d in range(dims)), f" {m}", fontsize=7)
        ratios = to_numpy(evr[i], dtype=float) if evr is not None else None
        names = [f"PC{d + 1}" + (f" ({ratios[d]:.1%})" if ratios is not None and d < ratios.size else "")
                 for d in range(dims)]
        ax.set_xlabel(names[0], fontsize=8)
        ax.set_ylabel(names[1], fontsize=8)
        if dims == 3:
            ax.set_zlabel(names[2], fontsize=8)
            ax.set_box_aspect(None, zoom=0.8)   # room for the axis labels inside the panel
        ax.tick_params(labelsize=7)
        ax.set_title(f"layer {layer} · {matrix}", fontsize=10)
    style.category_legend(fig, order, [colors[m] for m in order], title="member",
                          markers=[markers[m] for m in order])
    fig.suptitle(f"{level[0].upper()}{level[1:]} PCA of the {matrix} matrices ({dims}-D)")
    return fig
