"""Static (weights-only) analyses: pure math on weight tensors, tensors in -> numbers out."""
from .pca import PCAResult, matrix_pca, neuron_pca, neuron_points, pca_points, standardize
from .regression import RegressionResult, gate_embedding_similarity, gate_expert_regression, similarity_regression
from .reorder import ReorderResult, kendall_tau_b, reorder_pair, solve_assignment
from .similarity import (averaged_similarity, averaged_vectors, cosine_matrix, matrix_similarity, member_similarity,
                         neuron_cosine, neuron_vectors)

__all__ = [
    "PCAResult", "RegressionResult", "ReorderResult",
    "averaged_similarity", "averaged_vectors", "cosine_matrix", "gate_embedding_similarity", "gate_expert_regression",
    "kendall_tau_b", "matrix_pca", "matrix_similarity", "member_similarity", "neuron_cosine", "neuron_pca",
    "neuron_points", "neuron_vectors", "pca_points", "reorder_pair", "similarity_regression", "solve_assignment",
    "standardize",
]
