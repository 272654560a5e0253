"""Shared look of every figure: colormaps, sizing, capped tick labels, the heatmap and panel-grid helpers, saving.

Figures are built with ``matplotlib.figure.Figure`` directly (never ``pyplot``), so no global figure registry,
backend choice or interactive state is touched and nothing needs closing.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, Colormap, ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

SIMILARITY_CMAP = "viridis"      # cosines / angular similarities (sequential)
DIVERGING_CMAP = "RdBu_r"        # signed activations (centred on 0)
COUNT_CMAP = "Blues"             # counts and fractions
NAN_COLOR = "#d0d0d0"            # cells without a value
HIGHLIGHT = "#d62728"            # chosen experts
MUTED = "#9aa5b1"                # experts not chosen
DPI = 100
MAX_TICKS = 32                   # at most this many tick labels per axis (64 experts: every 2nd)
ANNOTATE_MAX = 12                # annotate heatmap cells with values up to this many rows/columns


def to_numpy(x: Any, dtype=None) -> np.ndarray:
    """numpy array from a numpy array, list or (CPU/GPU, any dtype) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float() if str(x.dtype) in ("torch.bfloat16", "torch.float16") else x
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def show_token(token: str, limit: int = 14) -> str:
    """A token made printable for a label: whitespace made visible, long tokens shortened."""
    text = str(token).replace("\n", "\\n").replace("\t", "\\t").replace("Ġ", "␣").replace("▁", "␣")
    text = text.replace(" ", "␣").replace("$", r"\$")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def label_fontsize(n: int) -> float:
    """Tick-label font size for an axis holding ``n`` labels (shrinks, but stays legible)."""
    return float(np.clip(10 - n / 6, 6, 9))


def panel_side(n: int, *, base: float = 1.6, per_item: float = 0.24, lo: float = 2.6, hi: float = 8.0) -> float:
    """Side in inches of a panel that shows ``n`` items along an axis."""
    return float(np.clip(base + per_item * n, lo, hi))


def tick_step(n: int, max_ticks: int = MAX_TICKS) -> int:
    return max(1, math.ceil(n / max_ticks))


def set_ticks(ax, axis: str, labels: Sequence[str], *, max_ticks: int = MAX_TICKS, rotation: float | None = None,
              fontsize: float | None = None) -> None:
    """Label ``axis`` ('x' or 'y') of ``ax`` with ``labels`` at 0..n-1, showing at most ``max_ticks`` of them."""
    labels = [str(l) for l in labels]
    step = tick_step(len(labels), max_ticks)
    pos = list(range(0, len(labels), step))
    shown = [labels[i] for i in pos]
    size = fontsize or label_fontsize(len(pos))
    if axis == "x":
        crowded = len(pos) > 8 and max(map(len, shown)) > 3       # long labels, many of them: vertical
        ax.set_xticks(pos, shown, fontsize=size, rotation=90 if rotation is None and crowded else rotation or 0)
    else:
        ax.set_yticks(pos, shown, fontsize=size, rotation=rotation or 0)


def categorical_cmap(n: int) -> ListedColormap:
    """n clearly different colours (tab10 without its grey, tab20, then evenly spaced hues of turbo)."""
    if n <= 9:
        colors = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7][:n]
    elif n <= 20:
        colors = colormaps["tab20"].colors[:n]
    else:
        colors = colormaps["turbo"](np.linspace(0.05, 0.95, n))
    return ListedColormap(colors, name=f"categorical{n}")


_EXTRA_COLORS = ["#404040", "#7a6f00", "#6a1b6a", "#00466e"]   # shared experts: dark, unlike the routed palette


def member_colors(members: Sequence[str]) -> dict[str, Any]:
    """One colour per member label: routed experts the categorical colours, shared experts dark ones, F black."""
    routed = [m for m in members if not (m.startswith("shared") or m == "F")]
    cmap = categorical_cmap(max(len(routed), 1))
    colors = {m: cmap(i) for i, m in enumerate(routed)}
    extras = [m for m in members if m not in colors]
    for i, m in enumerate(extras):
        colors[m] = "#000000" if m == "F" else _EXTRA_COLORS[i % len(_EXTRA_COLORS)]
    return colors


def member_marker(member: str) -> str:
    """Scatter marker of a member: routed experts dots, shared experts squares, the dense FFN F a star."""
    return "*" if member == "F" else "s" if member.startswith("shared") else "o"


def similarity_cmap(name: str = SIMILARITY_CMAP) -> Colormap:
    return colormaps[name].with_extremes(bad=NAN_COLOR)


def heatmap(ax, data, *, xlabels: Sequence[str] | None = None, ylabels: Sequence[str] | None = None,
            cmap: str | Colormap = SIMILARITY_CMAP, norm: Normalize | None = None, vmin: float | None = None,
            vmax: float | None = None, annotate: bool | None = None, fmt: str = "{:.2f}", aspect: str = "auto",
            max_ticks: int = MAX_TICKS):
    """Draw ``data`` [rows, cols] on ``ax`` (NaN cells grey), label the axes, optionally write values in cells."""
    data = to_numpy(data, dtype=float)
    cmap = colormaps[cmap] if isinstance(cmap, str) else cmap
    cmap = cmap.with_extremes(bad=NAN_COLOR)
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm,
                      vmin=None if norm else vmin, vmax=None if norm else vmax, aspect=aspect,
                      interpolation="nearest")
    if xlabels is not None:
        set_ticks(ax, "x", xlabels, max_ticks=max_ticks)
    if ylabels is not None:
        set_ticks(ax, "y", ylabels, max_ticks=max_ticks)
    if annotate is None:
        annotate = max(data.shape) <= ANNOTATE_MAX
    if annotate:
        annotate_cells(ax, data, image, fmt)
    return image


def annotate_cells(ax, data: np.ndarray, image, fmt: str = "{:.2f}") -> None:
    """Write each finite value of ``data`` in its cell, dark or light against the cell colour."""
    size = float(np.clip(9 - max(data.shape) / 3, 5, 8))
    for (i, j), v in np.ndenumerate(data):
        if np.isfinite(v):
            r, g, b, _ = image.cmap(image.norm(v))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=size, color=color)


def panel_grid(n: int, panel_size: tuple[float, float], *, ncols: int | None = None, max_cols: int = 6,
               projection: str | None = None, extra: tuple[float, float] = (0.6, 0.9),
               sharex: bool = False, sharey: bool = False, min_width: float = 7.0) -> tuple[Figure, list]:
    """A constrained-layout figure with ``n`` panels of ``panel_size`` inches, ``extra`` inches for titles and
    legends, at least ``min_width`` inches wide (room for the title)."""
    ncols = max(1, min(ncols or math.ceil(math.sqrt(n)), max_cols, n))
    nrows = math.ceil(n / ncols)
    width = max(ncols * panel_size[0] + extra[0], min_width)
    fig = Figure(figsize=(width, nrows * panel_size[1] + extra[1]), dpi=DPI, layout="constrained")
    axes, first = [], None
    for i in range(n):
        kw: dict[str, Any] = {"projection": projection} if projection else {}
        if first is not None and sharex:
            kw["sharex"] = first
        if first is not None and sharey:
            kw["sharey"] = first
        ax = fig.add_subplot(nrows, ncols, i + 1, **kw)
        first = first or ax
        axes.append(ax)
    return fig, axes


def outer_ticks_only(axes: Sequence) -> None:
    """Keep tick labels only on the outer panels of a grid (panels sharing their labels): x on the lowest panel
    of each column, y on the first column."""
    ncols = axes[0].get_subplotspec().get_gridspec().ncols
    for i, ax in enumerate(axes):
        if i + ncols < len(axes):
            ax.tick_params(labelbottom=False)
            ax.set_xlabel("")
        if i % ncols:
            ax.tick_params(labelleft=False)
            ax.set_ylabel("")


def footnote(fig: Figure, text: str) -> None:
    """A small note under the whole figure (e.g. which dense layers were skipped)."""
    fig.supxlabel(text, fontsize=8, color="#555555")


def nan_legend(fig: Figure, note: str) -> None:
    """A figure legend saying what grey (NaN) cells mean."""
    fig.legend(handles=[Patch(facecolor=NAN_COLOR, edgecolor="black", linewidth=0.5, label=note)],
               loc="outside lower right", fontsize=8, frameon=False)


def category_legend(fig: Figure, labels: Sequence[str], colors: Sequence[Any], *, title: str | None = None,
                    markers: Sequence[str] | None = None) -> None:
    """A figure legend, outside on the right, one entry per category (patches, or ``markers``; several columns
    when many)."""
    from matplotlib.lines import Line2D

    handles = [Patch(facecolor=c, label=l) for l, c in zip(labels, colors)] if markers is None else \
        [Line2D([], [], marker=m, linestyle="", color=c, label=l) for l, c, m in zip(labels, colors, markers)]
    fig.legend(handles=handles, loc="outside right center", title=title, fontsize=label_fontsize(len(labels)),
               ncols=max(1, math.ceil(len(labels) / 24)), frameon=False)


def discrete_norm(n: int) -> BoundaryNorm:
    """Norm mapping integers 0..n-1 to the n colours of ``categorical_cmap(n)``."""
    return BoundaryNorm(np.arange(-0.5, n + 0.5), n)


def save_figure(fig: Figure, path_stem: str | os.PathLike, formats: Sequence[str] = ("png", "svg"), *,
                dpi: int = DPI) -> list[Path]:
    """Write ``fig`` as ``path_stem.<fmt>`` for each format, atomically (temp file + rename); return the paths.

    The image has exactly the figure's size (``fig.get_size_inches() * dpi`` pixels for PNG).
    """
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                fig.savefig(handle, format=fmt, dpi=dpi, metadata=_metadata(fmt))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths


def _metadata(fmt: str) -> dict | None:
    """Reproducible files: no creation date in SVG/PDF."""
    if fmt == "svg":
        return {"Date": None}
    if fmt == "pdf":
        return {"CreationDate": None}
    return None
