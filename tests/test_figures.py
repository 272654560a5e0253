"""Paper-style figures: rendered from saved static results of tiny checkpoints and from synthetic trace arrays;
files exist with the right pixel size, titles and tick labels name the right layers and members."""
import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from moescope.report import (chosen_experts_diff, chosen_experts_map, figure_title, gate_scatter_grid,
                             intermediate_heatmaps, norm_rank_rows, norm_rank_table, norm_score_bars, pca_grid,
                             r2_by_layer, render_dynamic, render_static, routed_mean_similarity, save_figure,
                             similarity_by_layer, similarity_grid, token_similarity_grid, top1)
from moescope.report.style import DPI, show_token
from moescope.results import load_results
from moescope.static.run import WeightsOptions, weights
from moescope.testing.builder import build_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUTED = [f"e{i}" for i in range(8)]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG file."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def check_saved(fig: Figure, tmp_path: Path, name: str) -> None:
    """save_figure writes a PNG of exactly the figure's size and a non-empty SVG, and nothing else."""
    png, svg = save_figure(fig, tmp_path / name)
    assert (png.name, svg.name) == (f"{name}.png", f"{name}.svg")
    w, h = fig.get_size_inches() * DPI
    assert png_size(png) == (round(w), round(h))
    assert png.stat().st_size > 1000 and svg.read_bytes().lstrip().startswith(b"<?xml")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def main_axes(fig: Figure, n: int) -> list:
    """The first ``n`` axes (panels; colorbars come after)."""
    return fig.axes[:n]


def ticks(ax, axis="x") -> list[str]:
    return [t.get_text() for t in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels())]


# ---------------------------------------------------------------- static

@pytest.fixture(scope="module")
def static_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    moe = build_checkpoint("mixtral", root / "mixtral", dtype="float32")
    dense = build_checkpoint("mistral", root / "mistral", dtype="float32")
    opts = WeightsOptions(matrices=("gate",), pairs="sample:20", pca_components=3)
    weights(moe.path, dense=dense.path, out=root / "run", options=opts, progress=False)
    return load_results(root / "run")


def test_render_static(static_run, tmp_path):
    records = render_static(static_run, tmp_path / "static", formats=("png",))  # SVG: see check_saved
    names = {p.stem for _, p in records}
    assert names == {"similarity_gate_matrix", "similarity_gate_neuron_avg", "similarity_gate_reordered_matrix",
                     "gate_regression_gate_flat", "gate_regression_gate_averaged", "gate_regression_r2_by_layer",
                     "pca_gate_matrix_2d", "pca_gate_matrix_3d", "pca_gate_neuron_2d", "pca_gate_neuron_3d"}
    for title, png in records:
        assert title and png.suffix == ".png"
        w, h = png_size(png)
        assert w >= 400 and h >= 300 and png.stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "static").iterdir()) == sorted(f"{n}.png" for n in names)
    titles = dict((p.stem, t) for t, p in records)
    assert "gate" in titles["similarity_gate_matrix"] and "Matrix-level" in titles["similarity_gate_matrix"]
    assert "reordered" in titles["similarity_gate_reordered_matrix"]


def test_similarity_grid_names_layers_matrix_and_members(static_run, tmp_path):
    layers = static_run.layers
    labels = static_run[f"layer{layers[0]}.labels"]
    assert labels == ROUTED + ["F"]
    mats = [static_run[f"layer{l}.gate.reordered_matrix_similarity"] for l in layers]
    fig = similarity_grid(mats, labels, layers, matrix="gate", kind="reordered_matrix_similarity",
                          nan_note="pair not matched")
    axes = main_axes(fig, len(layers))
    for ax, layer in zip(axes, layers):
        assert ax.get_title() == f"layer {layer} · gate"
        assert ticks(ax, "x") == labels          # one row of panels: every panel shows its x labels
    assert ticks(axes[0], "y") == labels and ticks(axes[1], "y") == []   # y labels on the first column only
    assert "gate" in fig.get_suptitle() and "reordered" in fig.get_suptitle()
    # sample:20 of 36 pairs: unmatched pairs are NaN, explained by the legend
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["pair not matched"]


def test_similarity_grid_nan_cells_and_many_members(tmp_path):
    n = 66                                   # 64 routed experts + 2 shared: tick labels capped
    labels = [f"e{i}" for i in range(64)] + ["shared0", "shared1"]
    m = np.random.default_rng(0).uniform(-1, 1, (n, n))
    m[-2:, :-2] = m[:-2, -2:] = np.nan
    fig = similarity_grid([m], labels, [5], matrix="down")
    ax = fig.axes[0]
    shown = ticks(ax, "x")
    assert len(shown) <= 33 and shown[:2] == ["e0", "e3"] and ax.get_title() == "layer 5 · down"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["different width"]
    assert not fig.axes[0].texts             # too many cells to annotate
    check_saved(fig, tmp_path, "wide")


def test_gate_scatter_and_r2(static_run, tmp_path):
    layers = static_run.layers
    fits = [static_run[f"layer{l}.gate.gate_regression.flat"] for l in layers]
    fig = gate_scatter_grid([static_run[f"layer{l}.gate.matrix_similarity"] for l in layers],
                            [static_run[f"layer{l}.router_similarity"] for l in layers], layers, matrix="gate",
                            fits=fits)
    for ax, layer, fit in zip(main_axes(fig, len(layers)), layers, fits):
        assert ax.get_title() == f"layer {layer} · gate: R² = {fit['r2']:.3f}"
        xy = ax.collections[0].get_offsets()
        assert len(xy) == 28                 # E(E-1)/2 routed pairs, F left out
        line = ax.lines[0].get_ydata()
        assert np.allclose(line, fit["slope"] * ax.lines[0].get_xdata() + fit["intercept"])
    # without saved fits the same line is fitted here
    refit = gate_scatter_grid([static_run[f"layer{l}.gate.matrix_similarity"] for l in layers],
                              [static_run[f"layer{l}.router_similarity"] for l in layers], layers, matrix="gate")
    assert [a.get_title() for a in main_axes(refit, len(layers))] == \
        [a.get_title() for a in main_axes(fig, len(layers))]
    r2 = r2_by_layer(layers, {"gate · matrix-level": [f["r2"] for f in fits]})
    assert [int(t) for t in r2.axes[0].get_xticks()] == layers
    assert "gate · matrix-level" in r2.axes[0].get_legend().get_texts()[0].get_text()


@pytest.mark.parametrize("dims", [2, 3])
def test_pca_grid_colours_members(static_run, tmp_path, dims):
    layers = static_run.layers
    widths = static_run[f"layer{layers[0]}.gate.pca_neuron_members"]
    members = [np.repeat(list(widths), list(widths.values()))] * len(layers)
    fig = pca_grid([static_run[f"layer{l}.gate.pca_neuron"] for l in layers], members, layers, matrix="gate",
                   level="neuron-level", dims=dims, evr=[static_run[f"layer{l}.gate.pca_neuron_evr"] for l in layers])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ROUTED + ["F"]
    ax = fig.axes[0]
    assert ax.get_title() == f"layer {layers[0]} · gate" and ax.get_xlabel().startswith("PC1 (")
    assert len(ax.collections) == 9 and ax.name == ("3d" if dims == 3 else "rectilinear")
    assert f"{dims}-D" in fig.get_suptitle()
    if dims == 3:
        check_saved(fig, tmp_path, "pca3")


# ---------------------------------------------------------------- dynamic (synthetic trace arrays)

E, K, T, TS, TI, I = 8, 2, 20, 6, 4, 16
MEMBERS = ROUTED + ["shared0", "F"]
TOKENS = ["<s>", "▁As", "▁an", "▁open", "\n", "$x$"] + [f"tok{i}" for i in range(T - 6)]


class FakeTrace:
    """Results-like: ``layers`` and dotted keys (KeyError when missing), as the trace schema describes."""

    def __init__(self, seed: int, layers=(0, 3)):
        rng = np.random.default_rng(seed)
        self.layers = list(layers)
        self.data = {"tokens": TOKENS, "documents": [0, 12, T]}
        m = len(MEMBERS)
        for l in layers:
            scores = rng.dirichlet(np.ones(E), size=T)
            chosen = np.argsort(-scores, axis=1)[:, :K]
            sim = rng.uniform(-1, 1, (TS, m, m))
            sim = (sim + sim.transpose(0, 2, 1)) / 2
            sim[:, np.arange(m), np.arange(m)] = 1
            out = np.full((m, m), 0.5 + 0.1 * l)
            np.fill_diagonal(out, 1)
            counts = rng.integers(0, 10, (E, E))
            self.data.update({
                f"layer{l}.members": MEMBERS, f"layer{l}.chosen_experts": chosen,
                f"layer{l}.chosen_weights": np.take_along_axis(scores, chosen, 1),
                f"layer{l}.router_scores": scores, f"layer{l}.expert_norms": rng.uniform(0, 3, (T, m)),
                f"layer{l}.token_similarity": sim, f"layer{l}.output_similarity": out,
                f"layer{l}.rank_counts": counts})
        self.data[f"layer{layers[1]}.intermediate"] = rng.normal(size=(m, TI, I))

    def __getitem__(self, key):
        return self.data[key]


def test_render_dynamic(tmp_path):
    run, other = FakeTrace(0), FakeTrace(1)
    records = render_dynamic(run, tmp_path / "dyn", compare=other, names=("base", "instruct"))
    names = [p.stem for _, p in records]
    assert names == ["token_similarity_layer0", "norm_vs_score_layer0", "token_similarity_layer3",
                     "norm_vs_score_layer3", "intermediate_layer3", "output_similarity_by_layer", "norm_rank_table",
                     "chosen_experts_map", "chosen_experts_compare"]
    for title, png in records:
        assert title
        w, h = png_size(png)
        assert w >= 400 and h >= 250 and png.with_suffix(".svg").stat().st_size > 1000
    titles = dict((p.stem, t) for t, p in records)
    assert titles["intermediate_layer3"].endswith("layer 3")
    assert "base vs instruct" in titles["chosen_experts_compare"]
    assert sorted(p.name for p in (tmp_path / "dyn").iterdir()) == sorted(f"{n}.{f}" for n in names
                                                                           for f in ("png", "svg"))


def test_token_similarity_grid_titles_are_tokens(tmp_path):
    run = FakeTrace(0)
    fig = token_similarity_grid(run["layer3.token_similarity"], MEMBERS, TOKENS, layer=3)
    axes = main_axes(fig, TS)
    assert [ax.get_title() for ax in axes] == [f"token {t}: {show_token(TOKENS[t])}" for t in range(TS)]
    assert axes[4].get_title() == "token 4: \\n" and axes[1].get_title() == "token 1: ␣As"
    # 6 panels in a 2 × 3 grid: member labels on the outer panels only
    assert ticks(axes[3], "x") == MEMBERS and ticks(axes[3], "y") == MEMBERS
    assert ticks(axes[0], "x") == [] and ticks(axes[0], "y") == MEMBERS and ticks(axes[5], "y") == []
    assert "layer 3" in fig.get_suptitle()


def test_similarity_by_layer_is_routed_mean():
    s = np.array([[1, 0.2, 0.4, 0.9], [0.2, 1, 0.6, 0.9], [0.4, 0.6, 1, 0.9], [0.9, 0.9, 0.9, 1]])
    assert routed_mean_similarity(s, ["e0", "e1", "e2", "F"]) == pytest.approx(0.4)
    fig = similarity_by_layer([0, 1, 3], [0.4, 0.5, 0.6])
    ax = fig.axes[0]
    assert [int(t) for t in ax.get_xticks()] == [0, 1, 3] and ax.get_xlabel() == "layer"
    assert list(ax.lines[0].get_ydata()) == [0.4, 0.5, 0.6]


def test_norm_score_bars_highlight_chosen(tmp_path):
    run = FakeTrace(0)
    fig = norm_score_bars(run["layer3.expert_norms"], run["layer3.router_scores"], run["layer3.chosen_experts"],
                          MEMBERS, TOKENS, layer=3, token_indices=[1, 2])
    top, bottom = fig.axes[0], fig.axes[2]    # subplots [2, 2]: row-major
    assert top.get_title() == "layer 3 · token 1: ␣As"
    assert ticks(bottom, "x") == ROUTED       # routed experts only: shared0 and F have no score
    red = [i for i, p in enumerate(bottom.patches) if p.get_facecolor()[:3] == pytest.approx((214 / 255, 39 / 255, 40 / 255))]
    assert sorted(red) == sorted(run["layer3.chosen_experts"][1].tolist())
    assert np.allclose([p.get_height() for p in bottom.patches], run["layer3.router_scores"][1])


def test_norm_rank_table_rows(tmp_path):
    counts = np.arange(16).reshape(4, 4)      # counts[score_rank][norm_rank], ascending ranks
    rows = norm_rank_rows(counts)
    assert rows.tolist() == [[15, 14, 13, 12], [11, 10, 9, 8]]   # top-1, top-2 by norm rank 1 = largest
    fig = norm_rank_table([counts, counts * 0 + np.eye(4, dtype=int)], [2, 7])
    a1, a2 = fig.axes[:2]
    assert ticks(a1, "y") == ["layer 2", "layer 7", "all layers"]
    assert ticks(a1, "x") == ["1", "2", "3", "4"]
    assert a1.get_title().startswith("top-1 scored expert") and a2.get_title().startswith("top-2 scored expert")
    # layer 2, top-1: 15 of 54 tokens have the largest norm
    assert a1.texts[0].get_text() == f"{15 / 54:.0%}"


def test_intermediate_heatmaps(tmp_path):
    run = FakeTrace(0)
    fig = intermediate_heatmaps(run["layer3.intermediate"], MEMBERS, TOKENS, layer=3)
    axes = main_axes(fig, len(MEMBERS))
    assert [ax.get_title() for ax in axes] == [f"layer 3 · {m}" for m in MEMBERS]
    assert ticks(axes[0], "y") == [show_token(t) for t in TOKENS[:TI]] and ticks(axes[1], "y") == []
    assert axes[0].images[0].get_array().shape == (TI, I)


def test_chosen_experts_maps(tmp_path):
    a, b = FakeTrace(0), FakeTrace(1)
    layers = a.layers
    t1a = np.stack([top1(a[f"layer{l}.chosen_experts"], a[f"layer{l}.chosen_weights"]) for l in layers], 1)
    t1b = np.stack([top1(b[f"layer{l}.chosen_experts"], b[f"layer{l}.chosen_weights"]) for l in layers], 1)
    assert (t1a[:, 0] == np.argmax(a["layer0.router_scores"], axis=1)).all()
    fig = chosen_experts_map(t1a, layers, TOKENS, num_experts=E, documents=[0, 12, T])
    ax = fig.axes[0]
    assert ticks(ax, "x") == ["0", "3"] and ax.get_xlabel() == "layer"
    assert ticks(ax, "y")[1] == "␣As (1)"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ROUTED
    assert np.array_equal(ax.images[0].get_array(), t1a) and len(ax.lines) == 1   # one document boundary
    check_saved(fig, tmp_path, "map")
    diff = chosen_experts_diff(t1a, t1b, layers, TOKENS, names=("base", "instruct"))
    same = (t1a == t1b).mean()
    assert diff.get_suptitle() == f"Top-1 expert, base vs instruct: same for {same:.0%} of token-layers"
    assert np.array_equal(diff.axes[0].images[0].get_array(), t1a != t1b)
    assert [t.get_text() for t in diff.legends[0].get_texts()] == ["same top-1", "different top-1"]
    with pytest.raises(ValueError):
        chosen_experts_diff(t1a, t1b[:-1], layers, TOKENS)


def test_figure_functions_leave_no_pyplot_state():
    import sys
    before = sys.modules.get("matplotlib.pyplot")
    fig = similarity_grid([np.eye(3)], ["e0", "e1", "e2"], [0], matrix="up")
    assert isinstance(fig, Figure) and figure_title(fig)
    if before is None:
        assert "matplotlib.pyplot" not in sys.modules
    else:
        assert before.get_fignums() == []
