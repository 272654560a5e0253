"""Paper-style figures from saved results: pure figure functions on numpy arrays, ``save_figure``, and
``render_static`` / ``render_dynamic`` that draw every figure of a run into a directory."""
from .figures import figure_title, render_dynamic, render_static, top1_matrix
from .figures_dynamic import (chosen_experts_diff, chosen_experts_map, intermediate_heatmaps, norm_rank_rows,
                              norm_rank_table, norm_score_bars, routed_mean_similarity, similarity_by_layer,
                              token_similarity_grid, top1)
from .figures_static import gate_scatter_grid, pair_values, pca_grid, r2_by_layer, similarity_grid
from .style import save_figure

__all__ = ["chosen_experts_diff", "chosen_experts_map", "figure_title", "gate_scatter_grid", "intermediate_heatmaps",
           "norm_rank_rows", "norm_rank_table", "norm_score_bars", "pair_values", "pca_grid", "r2_by_layer",
           "render_dynamic", "render_static", "routed_mean_similarity", "save_figure", "similarity_by_layer",
           "similarity_grid", "token_similarity_grid", "top1", "top1_matrix"]
