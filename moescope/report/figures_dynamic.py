"""Figures of the dynamic (running-text) analyses, from plain arrays: per-token output similarity, similarity
by depth, output norm vs router score, norm-rank tables, intermediate states and chosen-expert maps."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.colors import ListedColormap, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from . import style
from .style import show_token, to_numpy


def routed_indices(members: Sequence[str], num_routed: int | None = None) -> list[int]:
    """Positions of the routed experts (``e0..``) among ``members`` (else the first ``num_routed``)."""
    idx = [i for i, m in enumerate(members) if m.startswith("e") and m[1:].isdigit()]
    return idx if idx or num_routed is None else list(range(num_routed))


def routed_mean_similarity(similarity: np.ndarray, members: Sequence[str]) -> float:
    """Mean off-diagonal entry of ``similarity`` [M, M] among the routed experts."""
    idx = routed_indices(members, len(members))
    s = to_numpy(similarity, dtype=float)[np.ix_(idx, idx)]
    off = s[~np.eye(len(idx), dtype=bool)]
    return float(np.nanmean(off)) if off.size and np.isfinite(off).any() else float("nan")


def top1(chosen: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Top-1 expert per token from ``chosen`` [T, k] (the one with the largest weight when ``weights`` given)."""
    chosen = to_numpy(chosen).astype(int).reshape(len(chosen), -1)
    if weights is None:
        return chosen[:, 0]
    w = to_numpy(weights, dtype=float).reshape(chosen.shape)
    return chosen[np.arange(len(chosen)), np.argmax(w, axis=1)]


def token_similarity_grid(similarity: np.ndarray, members: Sequence[str], tokens: Sequence[str], *, layer: int,
                          token_indices: Sequence[int] | None = None, max_tokens: int = 12) -> Figure:
    """Per-token cosine between members' outputs: one member × member heatmap per token (titled by its text)."""
    sims = to_numpy(similarity, dtype=float)
    picks = list(token_indices) if token_indices is not None else list(range(min(len(sims), max_tokens)))
    side = style.panel_side(len(members), base=1.2, per_item=0.22)
    fig, axes = style.panel_grid(len(picks), (side, side), extra=(1.2, 0.9))
    norm = Normalize(-1.0, 1.0)
    image = None
    for ax, t in zip(axes, picks):
        image = style.heatmap(ax, sims[t], xlabels=members, ylabels=members, norm=norm, cmap=style.SIMILARITY_CMAP,
                              aspect="equal", annotate=len(members) <= 8, fmt="{:.1f}")
        ax.set_title(f"token {t}: {show_token(tokens[t])}", fontsize=9)
    style.outer_ticks_only(axes)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="cosine of member outputs")
    fig.suptitle(f"Per-token similarity of expert outputs · layer {layer}")
    return fig


def similarity_by_layer(layers: Sequence[int], series: Mapping[str, Sequence[float]] | Sequence[float], *,
                        title: str = "Average angular similarity between routed experts' outputs by layer") -> Figure:
    """Depth trend: one line per series of the mean angular similarity among routed experts vs layer."""
    if not isinstance(series, Mapping):
        series = {"routed experts": series}
    layers = list(layers)
    fig = Figure(figsize=(float(np.clip(3 + 0.3 * len(layers), 6, 14)), 4), dpi=style.DPI, layout="constrained")
    ax = fig.add_subplot()
    colors = style.categorical_cmap(max(len(series), 1))
    for i, (name, values) in enumerate(series.items()):
        ax.plot(layers, np.asarray(values, dtype=float), marker="o", color=colors(i), label=name)
    ax.set_xticks(layers[:: style.tick_step(len(layers))])
    ax.set_xlabel("layer")
    ax.set_ylabel("mean angular similarity (off-diagonal)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=11)
    return fig


def norm_score_bars(norms: np.ndarray, scores: np.ndarray, chosen: np.ndarray, members: Sequence[str],
                    tokens: Sequence[str], *, layer: int, token_indices: Sequence[int] | None = None,
                    max_tokens: int = 4) -> Figure:
    """For a few tokens: each routed expert's output norm (top row) and router score (bottom row); chosen
    experts in red."""
    norms, scores = to_numpy(norms, dtype=float), to_numpy(scores, dtype=float)
    chosen = to_numpy(chosen).astype(int).reshape(len(chosen), -1)
    e = scores.shape[1]
    idx = routed_indices(members, e)[:e]
    experts = [members[i] for i in idx]
    picks = list(token_indices) if token_indices is not None else list(range(min(len(scores), max_tokens)))
    width = style.panel_side(e, base=1.4, per_item=0.16, lo=2.6, hi=9)
    fig = Figure(figsize=(len(picks) * width + 0.4, 5.2), dpi=style.DPI, layout="constrained")
    axes = fig.subplots(2, len(picks), squeeze=False, sharex=True)
    x = np.arange(e)
    for col, t in enumerate(picks):
        colors = np.where(np.isin(x, chosen[t]), style.HIGHLIGHT, style.MUTED)
        for row, (values, what) in enumerate(((norms[t, idx], "output L2 norm"), (scores[t], "router score"))):
            ax = axes[row, col]
            ax.bar(x, values, color=colors)
            ax.set_ylabel(what if col == 0 else "", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(axis="y", alpha=0.3)
        axes[0, col].set_title(f"layer {layer} · token {t}: {show_token(tokens[t])}", fontsize=9)
        style.set_ticks(axes[1, col], "x", experts)
    style.category_legend(fig, ["chosen", "not chosen"], [style.HIGHLIGHT, style.MUTED])
    fig.suptitle(f"Expert output norm vs router score · layer {layer}")
    return fig


def norm_rank_rows(rank_counts: np.ndarray, top: int = 2) -> np.ndarray:
    """[top, E] from ``counts[score_rank][norm_rank]``: row j = how often the top-(j+1) scored expert has each
    norm rank, columns ordered from the largest norm (rank E-1) down."""
    c = to_numpy(rank_counts, dtype=float)
    e = c.shape[0]
    return np.stack([c[e - 1 - j, ::-1] for j in range(min(top, e))])


def norm_rank_table(rank_counts: Sequence[np.ndarray], layers: Sequence[int], *, top: int = 2,
                    total: bool = True) -> Figure:
    """Norm rank of the top-1 / top-2 scored expert, as annotated heatmaps of fractions (counts in cells when
    few): rows = layers (+ all layers), columns = norm rank 1 (largest) .. E."""
    rows = [norm_rank_rows(c, top) for c in rank_counts]   # each [top, E]
    labels = [f"layer {l}" for l in layers]
    if total and len(rows) > 1:
        rows.append(np.sum(rows, axis=0))
        labels.append("all layers")
    e = rows[0].shape[1]
    ncol = rows[0].shape[0]
    height = float(np.clip(0.3 * len(labels) + 1.6, 2.6, 14))
    fig, axes = style.panel_grid(ncol, (style.panel_side(e, base=1.4, per_item=0.45, hi=12), height),
                                 ncols=ncol, extra=(1.0, 0.8))
    image = None
    for j, ax in enumerate(axes):
        counts = np.stack([r[j] for r in rows])                      # [rows, E]
        frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = style.heatmap(ax, frac, xlabels=[str(r + 1) for r in range(e)], ylabels=labels,
                              cmap=style.COUNT_CMAP, vmin=0, vmax=1, annotate=e <= 16 and len(labels) <= 40,
                              fmt="{:.0%}")
        ax.set_xlabel("norm rank of its output (1 = largest)", fontsize=9)
        first = frac[:, 0]
        ax.set_title(f"top-{j + 1} scored expert: largest norm in {first[-1]:.0%}"
                     + (" (all layers)" if labels[-1] == "all layers" else f" ({labels[-1]})"), fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="fraction of tokens")
    fig.suptitle("Does the router pick the experts with the largest output norm?")
    return fig


def intermediate_heatmaps(intermediate: np.ndarray | Sequence[np.ndarray], members: Sequence[str],
                          tokens: Sequence[str], *, layer: int, max_tokens: int = 48,
                          max_neurons: int = 512) -> Figure:
    """act(W_gate x) per member: token × neuron heatmaps (one panel per member), one symmetric colour scale."""
    mats = [to_numpy(m, dtype=float)[:max_tokens, :max_neurons] for m in intermediate]
    bound = max((float(np.nanmax(np.abs(m))) for m in mats if m.size), default=1.0) or 1.0
    norm = TwoSlopeNorm(0.0, -bound, bound)
    t, n = mats[0].shape
    panel = (float(np.clip(1.5 + n / 40, 2.8, 7)), float(np.clip(1.0 + 0.16 * t, 2.4, 9)))
    fig, axes = style.panel_grid(len(mats), panel, max_cols=4, extra=(1.2, 0.8))
    labels = [show_token(x) for x in tokens[:t]]
    image = None
    for ax, m, member in zip(axes, mats, members):
        image = style.heatmap(ax, m, ylabels=labels, cmap=style.DIVERGING_CMAP, norm=norm, annotate=False)
        ax.set_xlabel("neuron", fontsize=8)
        ax.set_title(f"layer {layer} · {member}", fontsize=10)
    style.outer_ticks_only(axes)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="act(W_gate x)")
    fig.suptitle(f"Intermediate states act(W_gate x) per member · layer {layer}")
    return fig


def _token_layer_map(values: np.ndarray, layers: Sequence[int], tokens: Sequence[str], cmap, norm,
                     documents: Sequence[int] | None, title: str, annotate: bool = False) -> Figure:
    """Tokens (rows, token text on the axis) × layers (columns) map shared by the chosen-expert figures;
    document boundaries as lines, cell values written in when ``annotate``."""
    t, n = values.shape
    height = float(np.clip(1.2 + 0.2 * t, 3, 30))
    fig = Figure(figsize=(float(np.clip(2.2 + 0.35 * n, 5.4, 18)) + 1.6, height), dpi=style.DPI,
                 layout="constrained")
    ax = fig.add_subplot()
    style.heatmap(ax, values, xlabels=[str(l) for l in layers],
                  ylabels=[f"{show_token(x)} ({i})" for i, x in enumerate(tokens[:t])], cmap=cmap, norm=norm,
                  annotate=False, max_ticks=int(height * 72 / 8))      # every token while rows are ≥ 8 pt tall
    if annotate:
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6)
    for d in (documents or [])[1:-1]:
        if 0 < d < t:
            ax.axhline(d - 0.5, color="black", lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("token")
    fig.suptitle(title)
    return fig


def chosen_experts_map(top1_experts: np.ndarray, layers: Sequence[int], tokens: Sequence[str], *,
                       num_experts: int | None = None, documents: Sequence[int] | None = None,
                       title: str | None = None) -> Figure:
    """Tokens × layers, each cell coloured by its top-1 expert (``top1_experts`` [T, L]); legend e0..e{E-1}."""
    values = to_numpy(top1_experts).astype(int)
    e = num_experts or int(values.max()) + 1
    cmap = style.categorical_cmap(e)
    fig = _token_layer_map(values, layers, tokens, cmap, style.discrete_norm(e), documents,
                           title or "Top-1 chosen expert per token and layer", annotate=values.size <= 1600)
    style.category_legend(fig, [f"e{i}" for i in range(e)], [cmap(i) for i in range(e)], title="top-1 expert")
    return fig


def chosen_experts_diff(top1_a: np.ndarray, top1_b: np.ndarray, layers: Sequence[int], tokens: Sequence[str], *,
                        names: tuple[str, str] = ("base", "instruct"),
                        documents: Sequence[int] | None = None) -> Figure:
    """Tokens × layers: does run ``names[1]`` pick the same top-1 expert as ``names[0]``?"""
    a, b = to_numpy(top1_a).astype(int), to_numpy(top1_b).astype(int)
    if a.shape != b.shape:
        raise ValueError(f"the two runs cover different tokens/layers: {a.shape} vs {b.shape}")
    same = a == b
    colors = ["#dcefd9", "#e6550d"]                  # same, different
    fig = _token_layer_map((~same).astype(int), layers, tokens, ListedColormap(colors), style.discrete_norm(2),
                           documents, f"Top-1 expert, {names[0]} vs {names[1]}: same for {same.mean():.0%} "
                                      "of token-layers")
    style.category_legend(fig, ["same top-1", "different top-1"], colors)
    return fig
