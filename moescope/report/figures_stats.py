"""Figures of the routing statistics (``layer{L}.stats.*`` of a trace run) and of run comparisons, from plain
arrays and the statistics' ``{value, ci_low, ci_high}`` dicts: expert load with confidence intervals, load by
layer, co-activation lift against independent routing, routing statistics by layer against their baselines,
routing agreement and load shift between two runs. Same look as the other figure modules (``style``)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from . import style
from .style import to_numpy


def _ci(stat: Mapping | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, low, high) as float arrays from a ``{value, ci_low, ci_high}`` dict (None → NaN)."""
    stat = stat or {}
    conv = lambda x: np.asarray([np.nan if v is None else v for v in np.atleast_1d(x)], dtype=float)  # noqa: E731
    value = conv(stat.get("value", np.nan))
    return value, conv(stat.get("ci_low", np.nan)) * np.ones_like(value), \
        conv(stat.get("ci_high", np.nan)) * np.ones_like(value)


def _yerr(value: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray | None:
    """Asymmetric error bars from a percentile interval (which need not contain the value): never negative."""
    if not (np.isfinite(low).any() and np.isfinite(high).any()):
        return None
    return np.stack([np.clip(np.nan_to_num(value - low), 0, None), np.clip(np.nan_to_num(high - value), 0, None)])


def load_bars(loads: Sequence[Mapping], layers: Sequence[int], *, top_k: int, confidence: float = 0.95) -> Figure:
    """Top-k load of each routed expert (fraction of tokens that route to it, sums to k) with its bootstrap
    interval, one panel per layer; the dashed line is the uniform share k/E. ``loads``: ``stats.load`` dicts."""
    values = [_ci(l.get("topk_load")) for l in loads]
    e = max(len(v[0]) for v in values)
    side = style.panel_side(e, base=1.8, per_item=0.18, lo=3.0, hi=10)
    fig, axes = style.panel_grid(len(layers), (side, 2.6), max_cols=3, extra=(0.6, 0.9), sharey=True)
    uniform = top_k / e
    for ax, (v, lo, hi), stat, layer in zip(axes, values, loads, layers):
        x = np.arange(len(v))
        dead = set(stat.get("dead_experts") or []) | set(stat.get("rare_experts") or [])
        colors = [style.HIGHLIGHT if i in dead else "#4c78a8" for i in x]
        ax.bar(x, v, color=colors, yerr=_yerr(v, lo, hi), capsize=2 if e <= 16 else 0,
               error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
        ax.axhline(uniform, color="#555555", ls="--", lw=1)
        cv, cv_lo, cv_hi = (float(a[0]) for a in _ci(stat.get("load_cv")))
        ax.set_title(f"layer {layer} · load CV {cv:.2f}" + (f" [{cv_lo:.2f}, {cv_hi:.2f}]"
                                                           if np.isfinite(cv_lo) else ""), fontsize=9)
        style.set_ticks(ax, "x", [f"e{i}" for i in x])
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("top-k load (fraction of tokens)", fontsize=9)
    style.outer_ticks_only(axes)
    handles = ["uniform share k/E", f"{confidence:.0%} bootstrap interval"]
    style.category_legend(fig, handles + (["dead or rare expert"]), ["#555555", "#333333", style.HIGHLIGHT])
    fig.suptitle("Expert load: share of tokens routed to each expert")
    return fig


def load_by_layer(loads: np.ndarray, layers: Sequence[int], *, top_k: int) -> Figure:
    """Layers × experts heatmap of the top-k load relative to the uniform share (1 = uniform)."""
    loads = to_numpy(loads, dtype=float)
    e = loads.shape[1]
    rel = loads / (top_k / e)
    hi = max(float(np.nanmax(rel)) if np.isfinite(rel).any() else 2.0, 1.01)
    fig = Figure(figsize=(float(np.clip(2.5 + 0.28 * e, 6, 16)), float(np.clip(1.6 + 0.28 * len(layers), 3, 14))),
                 dpi=style.DPI, layout="constrained")
    ax = fig.add_subplot()
    image = style.heatmap(ax, rel, xlabels=[f"e{i}" for i in range(e)], ylabels=[str(l) for l in layers],
                          cmap=style.DIVERGING_CMAP, norm=TwoSlopeNorm(1.0, 0.0, hi), aspect="auto", fmt="{:.1f}")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, shrink=0.8, label="top-k load ÷ uniform share k/E")
    fig.suptitle("Expert load by layer (1 = uniform)")
    return fig


def lift_heatmaps(lifts: Sequence[np.ndarray], baselines: Sequence[np.ndarray], layers: Sequence[int]) -> Figure:
    """Co-activation lift of expert pairs relative to independent routing with the same loads
    (lift ÷ baseline lift, log scale, 1 = as often as independent routing predicts), one panel per layer."""
    ratios = []
    for lift, base in zip(lifts, baselines):
        with np.errstate(divide="ignore", invalid="ignore"):
            r = to_numpy(lift, dtype=float) / to_numpy(base, dtype=float)
            ratios.append(np.log2(np.where(r > 0, r, np.nan)))
    e = max(r.shape[0] for r in ratios)
    finite = np.concatenate([r[np.isfinite(r)] for r in ratios] + [np.zeros(1)])
    bound = max(float(np.abs(finite).max()), 0.1)
    side = style.panel_side(e)
    fig, axes = style.panel_grid(len(layers), (side + 0.3, side + 0.3), extra=(1.2, 1.0))
    image = None
    labels = [f"e{i}" for i in range(e)]
    for ax, r, layer in zip(axes, ratios, layers):
        image = style.heatmap(ax, r, xlabels=labels, ylabels=labels, cmap=style.DIVERGING_CMAP,
                              norm=TwoSlopeNorm(0.0, -bound, bound), aspect="equal", fmt="{:+.1f}")
        ax.set_title(f"layer {layer}", fontsize=10)
    style.outer_ticks_only(axes)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="log2(lift ÷ independent-routing lift)")
    style.nan_legend(fig, "diagonal, or pair never chosen together")
    fig.suptitle("Co-activation of expert pairs relative to independent routing (0 = as expected)")
    return fig


def routing_by_layer(layers: Sequence[int], stats: Sequence[Mapping], *, confidence: float = 0.95) -> Figure:
    """Routing statistics by layer with bootstrap intervals: load CV, normalised router entropy, top-1
    consecutive-token consistency and top-k Jaccard of consecutive tokens against their permutation baselines.
    ``stats``: one ``layer{L}.stats`` dict per layer."""
    layers = list(layers)
    x = np.asarray(layers, dtype=float)
    fig, axes = style.panel_grid(4, (float(np.clip(2.6 + 0.15 * len(layers), 3.6, 8)), 2.6), ncols=2,
                                 extra=(0.6, 0.9))

    def series(ax, section: str, key: str, label: str, color, marker="o", ls="-"):
        v, lo, hi = (np.concatenate(a) for a in zip(*[_ci((s.get(section) or {}).get(key)) for s in stats]))
        ax.errorbar(x, v, yerr=_yerr(v, lo, hi), color=color, marker=marker, ls=ls, ms=4, capsize=2, lw=1.2,
                    label=label)

    blue, grey, orange = "#1f77b4", "#7f7f7f", "#ff7f0e"
    series(axes[0], "load", "load_cv", "load CV", blue)
    axes[0].set_title("Load imbalance (CV of top-k load; 0 = uniform)", fontsize=9)
    series(axes[1], "entropy", "entropy_normalised", "router entropy ÷ log E", blue)
    series(axes[1], "entropy", "topk_entropy_normalised", "top-k weight entropy ÷ log k", orange, marker="s")
    axes[1].set_title("Router entropy (1 = uniform scores)", fontsize=9)
    series(axes[2], "consistency", "top1_consistency", "next token keeps top-1", blue)
    series(axes[2], "consistency", "top1_baseline_permutation", "baseline: tokens shuffled", grey, "s", "--")
    series(axes[2], "consistency", "top1_baseline_load", "baseline: independent, same load", orange, "^", ":")
    axes[2].set_title("Consecutive-token top-1 consistency", fontsize=9)
    series(axes[3], "consistency", "jaccard", "Jaccard of consecutive top-k sets", blue)
    series(axes[3], "consistency", "jaccard_baseline_permutation", "baseline: tokens shuffled", grey, "s", "--")
    axes[3].set_title("Consecutive-token top-k overlap", fontsize=9)
    for ax in axes:
        ax.set_xticks(layers[:: style.tick_step(len(layers), 16)])
        ax.set_xlabel("layer", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Routing statistics by layer ({confidence:.0%} bootstrap intervals over documents)")
    return fig


def agreement_by_layer(layers: Sequence[int], series: Mapping[str, Sequence[float]], *,
                       names: tuple[str, str] = ("a", "b")) -> Figure:
    """Token-by-token routing agreement of two runs by layer: one line per series (top-1 equal fraction, top-k
    Jaccard, chance levels), y in [0, 1]."""
    layers = list(layers)
    fig = Figure(figsize=(float(np.clip(3 + 0.3 * len(layers), 6, 14)), 4), dpi=style.DPI, layout="constrained")
    ax = fig.add_subplot()
    colors = style.categorical_cmap(max(len(series), 1))
    for i, (name, values) in enumerate(series.items()):
        chance = name.startswith("chance")
        ax.plot(layers, np.asarray(values, dtype=float), marker="" if chance else "o", ls="--" if chance else "-",
                color=colors(i), label=name)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(layers[:: style.tick_step(len(layers))])
    ax.set_xlabel("layer")
    ax.set_ylabel("agreement over tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Routing agreement, {names[0]} vs {names[1]}, token by token", fontsize=11)
    return fig


def load_shift(loads_a: np.ndarray, loads_b: np.ndarray, layers: Sequence[int], *,
               names: tuple[str, str] = ("a", "b")) -> Figure:
    """Layers × experts heatmap of the top-k load difference b − a (fraction of tokens)."""
    a, b = to_numpy(loads_a, dtype=float), to_numpy(loads_b, dtype=float)
    diff = b - a
    bound = max(float(np.nanmax(np.abs(diff))) if diff.size else 0.0, 1e-6)
    e = diff.shape[1]
    fig = Figure(figsize=(float(np.clip(2.5 + 0.28 * e, 6, 16)), float(np.clip(1.6 + 0.28 * len(layers), 3, 14))),
                 dpi=style.DPI, layout="constrained")
    ax = fig.add_subplot()
    image = style.heatmap(ax, diff, xlabels=[f"e{i}" for i in range(e)], ylabels=[str(l) for l in layers],
                          cmap=style.DIVERGING_CMAP, norm=TwoSlopeNorm(0.0, -bound, bound), aspect="auto",
                          fmt="{:+.2f}")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"top-k load, {names[1]} − {names[0]}")
    fig.suptitle(f"Expert load shift: {names[1]} − {names[0]}")
    return fig


def lines_by_layer(layers: Sequence[int], series: Mapping[str, Sequence[float]], *, ylabel: str,
                   title: str) -> Figure:
    """One line per series against the layer index (e.g. mean |difference| of two runs per matrix)."""
    layers = list(layers)
    fig = Figure(figsize=(float(np.clip(3 + 0.3 * len(layers), 6, 14)), 4), dpi=style.DPI, layout="constrained")
    ax = fig.add_subplot()
    colors = style.categorical_cmap(max(len(series), 1))
    for i, (name, values) in enumerate(series.items()):
        ax.plot(layers, np.asarray([np.nan if v is None else v for v in values], dtype=float), marker="o",
                color=colors(i), label=name)
    ax.set_xticks(layers[:: style.tick_step(len(layers))])
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=11)
    return fig
