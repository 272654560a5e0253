"""Routing statistics of MoE layers as mergeable accumulators with document-level bootstrap intervals.

Every accumulator takes one **document** (a text encoded on its own) per ``update``, ``merge`` returns a new
accumulator holding both inputs' documents, and ``finalize`` turns the sufficient statistics into a dict of
JSON-friendly floats and lists (plus numpy arrays for matrices). Statistics that get a confidence interval keep
their sufficient statistics per document (a sparse row of a few numbers); ``finalize`` resamples documents with
replacement ``n_bootstrap`` times (seeded), recomputes each statistic from the resampled sums and reports
``{"value", "ci_low", "ci_high"}`` (percentile interval). Documents are put in a canonical order (by a digest of
their statistics) before anything is summed, so ``finalize`` does not depend on the order of updates and merges.
Definitions and formulas: ``docs/routing_stats.md``.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any, Iterable, Mapping, TypeVar

import numpy as np
import scipy.sparse as sp
from scipy.special import entr

from ..errors import MoescopeError

__all__ = [
    "CoActivation", "ConsecutiveConsistency", "CrossLayerConsistency", "ExpertLoad", "LayerRoutingStats",
    "RouterEntropy", "RoutingAccumulator", "RoutingDataError", "VocabularySpecialisation",
    "cross_layer_statistics", "independent_pair_probabilities", "routing_statistics", "top1_experts",
]

_A = TypeVar("_A", bound="RoutingAccumulator")
_CHUNK_ELEMENTS = 1 << 22   # bootstrap work arrays stay around 32 MiB
_COMPACT_AT = 1 << 22       # pending sparse entries before they are summed


class RoutingDataError(MoescopeError, ValueError):
    """Routing arrays of a document have the wrong shape, dtype or values, or accumulators do not match."""


# ---------------------------------------------------------------- input checks and small helpers
def _int_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """``x`` as int64 with ``ndim`` dimensions (an empty float array is accepted)."""
    a = np.asarray(x)
    if a.ndim != ndim:
        raise RoutingDataError(f"{name} must have {ndim} dimension(s), got shape {a.shape}.")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise RoutingDataError(f"{name} must hold integers, got dtype {a.dtype}.")
    return a.astype(np.int64, copy=False)


def _check_experts(a: np.ndarray, name: str, num_experts: int) -> None:
    """Every entry of ``a`` is an expert id in ``[0, num_experts)``."""
    if a.size and (a.min() < 0 or a.max() >= num_experts):
        raise RoutingDataError(f"{name} must hold expert ids in [0, {num_experts}), found {a.min()}..{a.max()}.")


def _indices(indices: Any, num_experts: int, top_k: int) -> np.ndarray:
    """Checked ``[T, k]`` int64 expert choices: ids in range and distinct within a token."""
    idx = _int_array(indices, "indices", 2)
    if idx.shape[1] != top_k:
        raise RoutingDataError(f"indices must be [T, {top_k}] (top_k={top_k}), got shape {idx.shape}.")
    _check_experts(idx, "indices", num_experts)
    if top_k > 1 and len(idx):
        s = np.sort(idx, axis=1)
        if (s[:, 1:] == s[:, :-1]).any():
            raise RoutingDataError("indices must name k distinct experts per token; a token repeats an expert.")
    return idx


def _weights(weights: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Checked float64 routing weights of ``shape``: finite and non-negative."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != shape:
        raise RoutingDataError(f"weights must have the shape of indices {shape}, got {w.shape}.")
    if not np.isfinite(w).all() or (w < 0).any():
        raise RoutingDataError("weights must be finite and non-negative.")
    return w


def _token_ids(token_ids: Any, n: int) -> np.ndarray:
    """Checked ``[T]`` int64 token ids."""
    tok = _int_array(token_ids, "token_ids", 1)
    if len(tok) != n:
        raise RoutingDataError(f"token_ids must have one entry per token ({n}), got {len(tok)}.")
    if tok.size and tok.min() < 0:
        raise RoutingDataError("token_ids must be non-negative.")
    return tok


def _positive_int(value: int, name: str, minimum: int = 1) -> int:
    """``value`` as an int, checked to be an integer >= ``minimum``."""
    if int(value) != value or value < minimum:
        raise RoutingDataError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def top1_experts(indices: Any, weights: Any | None = None) -> np.ndarray:
    """Top-1 expert per token: the chosen expert of largest weight (first on ties; column 0 without weights)."""
    idx = _int_array(indices, "indices", 2)
    if weights is None or idx.shape[1] == 1:
        return idx[:, 0].copy()
    w = _weights(weights, idx.shape)
    return idx[np.arange(len(idx)), np.argmax(w, axis=1)]


def _document_rng(seed: int, *arrays: np.ndarray) -> np.random.Generator:
    """A generator seeded by ``seed`` and the document's content, so a document's draws never depend on order."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return np.random.default_rng([seed, int.from_bytes(h.digest(), "little")])


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis`` (0 log 0 = 0)."""
    return entr(p).sum(axis=axis)


def _jsonable(x: Any) -> Any:
    """0-d -> float, 1-d -> list of floats, larger -> float64 ndarray."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        return float(a)
    return a.tolist() if a.ndim == 1 else a


# ---------------------------------------------------------------- the common base
class RoutingAccumulator:
    """Common base: per-document sufficient statistics (bootstrap), summed totals, sparse counts, merge."""

    def __init__(self) -> None:
        self.n_documents = 0
        self._docs: list[tuple[bytes, np.ndarray, np.ndarray]] = []   # (digest, nonzero columns, values)
        self._totals: dict[str, np.ndarray] = {}
        self._sparse: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    # -- hooks for subclasses
    def _config(self) -> dict[str, Any]:
        """Constructor arguments; accumulators merge only with equal configurations."""
        raise NotImplementedError

    def _layout(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each per-document sufficient statistic (empty: nothing to bootstrap)."""
        return {}

    def _estimates(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Statistics from summed sufficient statistics with a leading batch axis (one row per resample)."""
        return {}

    # -- storage
    def _add_document(self, record: Mapping[str, Any]) -> None:
        """Store one document's sufficient statistics as a sparse row, keyed by a digest of its content."""
        flat = np.concatenate([np.asarray(record[name], dtype=np.float64).ravel() for name in self._layout()])
        cols = np.flatnonzero(flat)
        vals = flat[cols]
        digest = hashlib.blake2b(cols.tobytes() + vals.tobytes(), digest_size=16).digest()
        self._docs.append((digest, cols, vals))

    def _add_totals(self, **arrays: Any) -> None:
        """Add to the summed (not bootstrapped) totals."""
        for name, value in arrays.items():
            value = np.asarray(value)
            self._totals[name] = self._totals[name] + value if name in self._totals else value.copy()

    def _add_sparse(self, name: str, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add integer counts at sorted unique int64 keys to the sparse table ``name``."""
        pending = self._sparse.setdefault(name, [])
        pending.append((keys.astype(np.int64), counts.astype(np.int64)))
        if sum(len(k) for k, _ in pending) > _COMPACT_AT:
            self._sparse[name] = [self._sparse_table(name)]

    def _sparse_table(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique keys and their summed counts of the sparse table ``name``."""
        pending = self._sparse.get(name, [])
        if len(pending) <= 1:
            return pending[0] if pending else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        keys = np.concatenate([k for k, _ in pending])
        counts = np.concatenate([c for _, c in pending])
        uniq, inverse = np.unique(keys, return_inverse=True)
        summed = np.zeros(len(uniq), np.int64)
        np.add.at(summed, inverse, counts)
        return uniq, summed

    def _total(self, name: str, shape: tuple[int, ...] = ()) -> np.ndarray:
        """Summed total ``name`` (zeros before any update)."""
        return self._totals.get(name, np.zeros(shape, np.int64))

    # -- merge
    def merge(self: _A, other: _A) -> _A:
        """A new accumulator holding the documents of both (associative and order-independent)."""
        if type(other) is not type(self) or other._config() != self._config():
            raise RoutingDataError(
                f"cannot merge {type(self).__name__}({self._config()}) with "
                f"{type(other).__name__}({getattr(other, '_config', dict)()}): configurations differ.")
        out = type(self)(**self._config())
        out.n_documents = self.n_documents + other.n_documents
        out._docs = self._docs + other._docs
        out._totals = {k: self._totals.get(k, 0) + other._totals.get(k, 0)
                       for k in self._totals.keys() | other._totals.keys()}
        out._sparse = {k: self._sparse.get(k, []) + other._sparse.get(k, [])
                       for k in self._sparse.keys() | other._sparse.keys()}
        return out

    # -- bootstrap
    def _unpack(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Split ``[b, F]`` rows into the named sufficient statistics ``[b, *shape]``."""
        out, start = {}, 0
        for name, shape in self._layout().items():
            size = int(np.prod(shape, dtype=np.int64))
            out[name] = flat[:, start:start + size].reshape(len(flat), *shape)
            start += size
        return out

    def _bootstrap(self, n_bootstrap: int, confidence: float,
                   seed: int) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
        """Point estimates with percentile intervals over resampled documents, and the summed statistics."""
        if not 0 < confidence < 1:
            raise RoutingDataError(f"confidence must be in (0, 1), got {confidence!r}.")
        n_bootstrap = _positive_int(n_bootstrap, "n_bootstrap", minimum=0)
        if not self._docs:
            raise RoutingDataError(f"{type(self).__name__} has no documents: call update() before finalize().")
        width = sum(int(np.prod(s, dtype=np.int64)) for s in self._layout().values())
        docs = sorted(self._docs, key=lambda d: d[0])
        n_docs = len(docs)
        indptr = np.cumsum([0] + [len(c) for _, c, _ in docs])
        matrix = sp.csr_matrix((np.concatenate([v for _, _, v in docs]), np.concatenate([c for _, c, _ in docs]),
                                indptr), shape=(n_docs, width))
        total = np.asarray(matrix.sum(axis=0)).reshape(1, width)
        with np.errstate(divide="ignore", invalid="ignore"):
            point = self._estimates(self._unpack(total))
            draws: dict[str, list[np.ndarray]] = {name: [] for name in point}
            rng = np.random.default_rng(seed)
            columns = matrix.T.tocsr()
            chunk = max(1, min(n_bootstrap, _CHUNK_ELEMENTS // max(n_docs, width, 1)))
            for start in range(0, n_bootstrap, chunk):
                b = min(chunk, n_bootstrap - start)
                pick = rng.integers(0, n_docs, size=(b, n_docs)) + (np.arange(b) * n_docs)[:, None]
                weights = np.bincount(pick.ravel(), minlength=b * n_docs).reshape(b, n_docs).astype(np.float64)
                resampled = np.asarray(columns @ weights.T).T
                for name, value in self._estimates(self._unpack(resampled)).items():
                    draws[name].append(value)
        q = [50.0 * (1.0 - confidence), 50.0 * (1.0 + confidence)]
        stats = {}
        for name, value in point.items():
            if n_bootstrap:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN slices: statistic undefined
                    low, high = np.nanpercentile(np.concatenate(draws[name]), q, axis=0)
            else:
                low = high = np.full(value.shape[1:], np.nan)
            stats[name] = {"value": _jsonable(value[0]), "ci_low": _jsonable(low), "ci_high": _jsonable(high)}
        return stats, {k: v[0] for k, v in self._unpack(total).items()}

    def _header(self, sums: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Document and token counts reported by every accumulator."""
        n = int(round(float(sums["n"][0]))) if sums is not None else int(self._total("n"))
        return {"n_documents": self.n_documents, "n_tokens": n}


# ---------------------------------------------------------------- 1. expert load
class ExpertLoad(RoutingAccumulator):
    """Top-1 and top-k load per expert, load imbalance (CV, max/mean), dead and rare experts."""

    def __init__(self, num_experts: int, top_k: int, rare_fraction: float = 0.1) -> None:
        super().__init__()
        self.num_experts = _positive_int(num_experts, "num_experts", 2)
        self.top_k = _positive_int(top_k, "top_k")
        self.rare_fraction = float(rare_fraction)

    def _config(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "rare_fraction": self.rare_fraction}

    def _layout(self) -> dict[str, tuple[int, ...]]:
        return {"n": (1,), "top1": (self.num_experts,), "topk": (self.num_experts,)}

    def update(self, indices: Any, weights: Any | None = None) -> None:
        """Add one document: ``indices`` [T, k] chosen experts, ``weights`` [T, k] (picks the top-1)."""
        idx = _indices(indices, self.num_experts, self.top_k)
        top1 = top1_experts(idx, weights)
        E = self.num_experts
        self._add_document({"n": [len(idx)], "top1": np.bincount(top1, minlength=E),
                            "topk": np.bincount(idx.ravel(), minlength=E)})
        self.n_documents += 1

    def _estimates(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = sums["n"]
        topk = sums["topk"] / n
        mean = topk.mean(axis=1)
        return {"top1_load": sums["top1"] / n, "topk_load": topk,
                "load_cv": topk.std(axis=1) / mean, "load_max_over_mean": topk.max(axis=1) / mean}

    def finalize(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """Loads with bootstrap intervals; dead experts (never chosen) and rare ones (0 < load < fraction·k/E)."""
        stats, sums = self._bootstrap(n_bootstrap, confidence, seed)
        load = np.asarray(stats["topk_load"]["value"])
        rare = (load > 0) & (load < self.rare_fraction * self.top_k / self.num_experts)
        return {**self._header(sums), **stats,
                "dead_experts": np.flatnonzero(sums["topk"] == 0).tolist(),
                "rare_experts": np.flatnonzero(rare).tolist()}


# ---------------------------------------------------------------- 2. router entropy
class _ExpertsTopK(RoutingAccumulator):
    """An accumulator configured by the number of experts and k alone."""

    def __init__(self, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts = _positive_int(num_experts, "num_experts", 2)
        self.top_k = _positive_int(top_k, "top_k")

    def _config(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "top_k": self.top_k}


class RouterEntropy(_ExpertsTopK):
    """Mean per-token entropy of the normalised router scores and of the renormalised top-k weights; confidence."""

    def _layout(self) -> dict[str, tuple[int, ...]]:
        return {"n": (1,), "entropy": (1,), "topk_entropy": (1,), "margin": (1,)}

    def update(self, scores: Any, weights: Any) -> None:
        """Add one document: ``scores`` [T, E] router scores (softmax or sigmoid), ``weights`` [T, k]."""
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 2 or s.shape[1] != self.num_experts:
            raise RoutingDataError(f"scores must be [T, {self.num_experts}], got shape {s.shape}.")
        total = s.sum(axis=1, keepdims=True)
        if not np.isfinite(s).all() or (s < 0).any() or (total <= 0).any():
            raise RoutingDataError("scores must be finite, non-negative and not all zero for a token.")
        w = _weights(weights, (len(s), self.top_k))
        wsum = w.sum(axis=1, keepdims=True)
        if (wsum <= 0).any():
            raise RoutingDataError("a token's top-k weights sum to zero.")
        p = s / total
        top2 = np.partition(p, self.num_experts - 2, axis=1)[:, -2:]
        self._add_document({"n": [len(s)], "entropy": [_entropy(p, 1).sum()],
                            "topk_entropy": [_entropy(w / wsum, 1).sum()],
                            "margin": [np.abs(top2[:, 1] - top2[:, 0]).sum()]})
        self.n_documents += 1

    def _estimates(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = sums["n"][:, 0]
        h = sums["entropy"][:, 0] / n
        hk = sums["topk_entropy"][:, 0] / n
        log_k = np.log(self.top_k) if self.top_k > 1 else np.nan
        return {"entropy": h, "entropy_normalised": h / np.log(self.num_experts),
                "topk_entropy": hk, "topk_entropy_normalised": hk / log_k,
                "confidence": sums["margin"][:, 0] / n}

    def finalize(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """Mean entropies (nats and normalised) and mean top-1 − top-2 margin, with bootstrap intervals."""
        stats, sums = self._bootstrap(n_bootstrap, confidence, seed)
        return {**self._header(sums), **stats}


# ---------------------------------------------------------------- 3. co-activation
def _esp_prefix(w: np.ndarray, k: int) -> np.ndarray:
    """``out[i]`` = coefficients of z^0..z^k of prod_{j<i} (1 + w_j z) (elementary symmetric polynomials)."""
    out = np.zeros((len(w) + 1, k + 1))
    out[0, 0] = 1.0
    for i, wi in enumerate(w):
        out[i + 1] = out[i]
        out[i + 1, 1:] += wi * out[i, :-1]
    return out


def _cps_moments(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Inclusion probabilities, pairwise inclusion probabilities and log normaliser of conditional Poisson
    sampling (a k-subset S drawn with probability ∝ prod_{e∈S} w_e), from products of positive polynomials."""
    E = len(w)
    pre = _esp_prefix(w, k)
    suf = _esp_prefix(w[::-1], k)[::-1]            # suf[i]: prod over j >= i
    ek = pre[-1, k]
    single = w * np.einsum("aj,aj->a", pre[:-1, :k], suf[1:, k - 1::-1]) / ek
    pair = np.zeros((E, E))
    if k >= 2:
        q = np.zeros((E, k - 1))                   # q[a] = pre[a] * prod_{a<i<b} (1 + w_i z), for a < b
        for b in range(E):
            if b:
                pair[:b, b] = q[:b] @ suf[b + 1, k - 2::-1]
                q[:b, 1:] = q[:b, 1:] + w[b] * q[:b, :-1]
            q[b] = pre[b, :k - 1]
        pair = (pair + pair.T) * np.outer(w, w) / ek
    return single, pair, float(np.log(ek))


def _fit_cps(p: np.ndarray, k: int, tol: float = 1e-12, max_iter: int = 100) -> np.ndarray:
    """Weights of the conditional Poisson design whose inclusion probabilities are ``p`` (0 < p < 1, Σp = k):
    Newton's method on the concave log-likelihood θ·p − log e_k(e^θ), with backtracking."""
    theta = np.log(p / (1 - p))
    theta -= theta.max()
    for _ in range(max_iter):
        pi, pair, log_z = _cps_moments(np.exp(theta), k)
        grad = p - pi
        if np.abs(grad).max() < tol:
            break
        cov = pair - np.outer(pi, pi)
        np.fill_diagonal(cov, pi * (1 - pi))
        r = np.sqrt(pi)                            # symmetric scaling; sqrt(pi) spans the null space of cov
        scaled = cov / np.outer(r, r) + np.outer(r, r) / k
        try:
            step_dir = np.linalg.solve(scaled, grad / r) / r
        except np.linalg.LinAlgError:
            step_dir = np.linalg.lstsq(scaled, grad / r, rcond=None)[0] / r
        old = theta @ p - log_z
        step = 1.0
        while True:
            trial = theta + step * step_dir
            trial -= trial.max()
            if trial @ p - np.log(_esp_prefix(np.exp(trial), k)[-1, k]) >= old - 1e-12 or step < 1e-8:
                break
            step /= 2
        theta = trial
    return np.exp(theta)


def independent_pair_probabilities(load: Any, top_k: int) -> np.ndarray:
    """P(a and b chosen) [E, E] under independent routing with top-k loads ``load`` (Σ load = k): independent
    per-expert choices conditioned on exactly k experts per token (conditional Poisson / maximum entropy).
    The diagonal holds the loads; experts with load 1 are always chosen, experts with load 0 never."""
    p = np.asarray(load, dtype=np.float64)
    k = _positive_int(top_k, "top_k")
    if p.ndim != 1 or (p < -1e-12).any() or (p > 1 + 1e-12).any() or abs(p.sum() - k) > 1e-9 * max(k, 1):
        raise RoutingDataError(f"load must be a vector in [0, 1] summing to top_k={k}, got sum {p.sum()}.")
    forced = p >= 1 - 1e-12
    free = (p > 0) & ~forced
    pair = np.zeros((len(p), len(p)))
    k_free = k - int(forced.sum())
    if free.any() and k_free >= 1:
        pf = p[free] * (k_free / p[free].sum())
        pair[np.ix_(free, free)] = _cps_moments(_fit_cps(pf, k_free), k_free)[1]
    pair[np.ix_(forced, free)] = p[free][None, :]
    pair[np.ix_(free, forced)] = p[free][:, None]
    pair[np.ix_(forced, forced)] = 1.0
    np.fill_diagonal(pair, np.clip(p, 0, 1))
    return pair


class CoActivation(_ExpertsTopK):
    """E×E counts of expert pairs chosen for the same token; lift and PMI against independent routing."""

    def update(self, indices: Any) -> None:
        """Add one document: ``indices`` [T, k] chosen experts."""
        idx = _indices(indices, self.num_experts, self.top_k)
        E = self.num_experts
        pairs = (idx[:, :, None] * E + idx[:, None, :]).ravel()
        self._add_totals(counts=np.bincount(pairs, minlength=E * E).reshape(E, E), n=np.int64(len(idx)))
        self.n_documents += 1

    def finalize(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """Counts, lift, PMI, their independent-routing baselines and PMI excess (matrices; diagonal NaN)."""
        E = self.num_experts
        counts = self._total("counts", (E, E))
        n = int(self._total("n"))
        if n == 0:
            raise RoutingDataError("CoActivation has no tokens: call update() before finalize().")
        load = np.diag(counts) / n
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = np.outer(load, load)
            lift = counts / n / expected
            baseline = independent_pair_probabilities(load, self.top_k) / expected
            for m in (lift, baseline):
                np.fill_diagonal(m, np.nan)
            pmi, baseline_pmi = np.log(lift), np.log(baseline)
            excess = pmi - baseline_pmi
        return {**self._header(), "counts": counts.astype(np.int64), "topk_load": load.tolist(), "lift": lift,
                "pmi": pmi, "baseline_lift": baseline, "baseline_pmi": baseline_pmi, "excess_pmi": excess}


# ---------------------------------------------------------------- 4. consecutive-token consistency
class ConsecutiveConsistency(RoutingAccumulator):
    """Agreement of consecutive tokens' top-1 experts and top-k sets within documents, with baselines."""

    def __init__(self, num_experts: int, top_k: int, n_permutations: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.num_experts = _positive_int(num_experts, "num_experts", 2)
        self.top_k = _positive_int(top_k, "top_k")
        self.n_permutations = _positive_int(n_permutations, "n_permutations")
        self.seed = _positive_int(seed, "seed", 0)

    def _config(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "n_permutations": self.n_permutations,
                "seed": self.seed}

    def _layout(self) -> dict[str, tuple[int, ...]]:
        return {"n": (1,), "pairs": (1,), "top1": (self.num_experts,), "same_top1": (1,), "perm_top1": (1,),
                "jaccard": (1,), "perm_jaccard": (1,)}

    @staticmethod
    def _jaccard_sum(idx: np.ndarray) -> np.ndarray:
        """Σ_t J(S_t, S_{t+1}) over consecutive tokens along the second-to-last axis (distinct experts per row)."""
        k = idx.shape[-1]
        inter = (idx[..., 1:, :, None] == idx[..., :-1, None, :]).sum(axis=(-1, -2))
        return (inter / (2 * k - inter)).sum(axis=-1)

    def update(self, indices: Any, weights: Any | None = None) -> None:
        """Add one document: ``indices`` [T, k] in position order, ``weights`` [T, k] (picks the top-1)."""
        idx = _indices(indices, self.num_experts, self.top_k)
        top1 = top1_experts(idx, weights)
        T = len(idx)
        counts = np.bincount(top1, minlength=self.num_experts)
        record = {"n": [T], "pairs": [max(T - 1, 0)], "top1": counts, "same_top1": [0], "perm_top1": [0],
                  "jaccard": [0], "perm_jaccard": [0]}
        if T >= 2:
            rng = _document_rng(self.seed, idx, top1)
            perms = rng.permuted(np.broadcast_to(np.arange(T), (self.n_permutations, T)), axis=1)
            record.update(same_top1=[np.count_nonzero(top1[1:] == top1[:-1])],
                          perm_top1=[(counts * (counts - 1.0)).sum() / T],
                          jaccard=[self._jaccard_sum(idx)],
                          perm_jaccard=[self._jaccard_sum(idx[perms]).mean()])
        self._add_document(record)
        self.n_documents += 1

    def _estimates(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = sums["pairs"][:, 0]
        p1 = sums["top1"] / sums["n"]
        top1 = sums["same_top1"][:, 0] / pairs
        perm1 = sums["perm_top1"][:, 0] / pairs
        jac = sums["jaccard"][:, 0] / pairs
        perm_jac = sums["perm_jaccard"][:, 0] / pairs
        return {"top1_consistency": top1, "top1_baseline_load": (p1 ** 2).sum(axis=1),
                "top1_baseline_permutation": perm1, "top1_excess": top1 - perm1,
                "jaccard": jac, "jaccard_baseline_permutation": perm_jac, "jaccard_excess": jac - perm_jac}

    def finalize(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """Consistencies, load and within-document permutation baselines, excesses, with bootstrap intervals."""
        stats, sums = self._bootstrap(n_bootstrap, confidence, seed)
        return {**self._header(sums), "n_pairs": int(round(float(sums["pairs"][0]))), **stats}


# ---------------------------------------------------------------- 5. cross-layer consistency
class CrossLayerConsistency(RoutingAccumulator):
    """Mutual information between a token's top-1 expert at one layer and at the next."""

    def __init__(self, num_experts: int, num_experts_next: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.num_experts = _positive_int(num_experts, "num_experts", 2)
        self.num_experts_next = _positive_int(num_experts if num_experts_next is None else num_experts_next,
                                              "num_experts_next", 2)
        self.seed = _positive_int(seed, "seed", 0)

    def _config(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "num_experts_next": self.num_experts_next, "seed": self.seed}

    def _layout(self) -> dict[str, tuple[int, ...]]:
        shape = (self.num_experts, self.num_experts_next)
        return {"n": (1,), "joint": shape, "joint_permuted": shape}

    def update(self, top1: Any, top1_next: Any) -> None:
        """Add one document: top-1 experts [T] at layer l and [T] at layer l+1 (see ``top1_experts``)."""
        a = _int_array(top1, "top1", 1)
        b = _int_array(top1_next, "top1_next", 1)
        if len(a) != len(b):
            raise RoutingDataError(f"top1 and top1_next must have one entry per token, got {len(a)} and {len(b)}.")
        _check_experts(a, "top1", self.num_experts)
        _check_experts(b, "top1_next", self.num_experts_next)
        E, F = self.num_experts, self.num_experts_next
        shuffled = _document_rng(self.seed, a, b).permutation(b)
        self._add_document({"n": [len(a)], "joint": np.bincount(a * F + b, minlength=E * F),
                            "joint_permuted": np.bincount(a * F + shuffled, minlength=E * F)})
        self.n_documents += 1

    @staticmethod
    def _mutual_information(joint: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MI, H(row) and H(column) in nats of joint counts [b, E, F], batched."""
        p = joint / joint.sum(axis=(1, 2), keepdims=True)
        h_a, h_b = _entropy(p.sum(axis=2)), _entropy(p.sum(axis=1))
        mi = np.clip(h_a + h_b - _entropy(p.reshape(len(p), -1)), 0.0, np.minimum(h_a, h_b))
        return mi, h_a, h_b

    def _estimates(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mi, h_a, h_b = self._mutual_information(sums["joint"])
        mi_perm = self._mutual_information(sums["joint_permuted"])[0]
        return {"mutual_information": mi, "mi_normalised": mi / np.minimum(h_a, h_b), "entropy": h_a,
                "entropy_next": h_b, "mi_baseline_permutation": mi_perm, "mi_excess": mi - mi_perm}

    def finalize(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """MI (nats), MI / min entropy, entropies, within-document permutation baseline, with intervals."""
        stats, sums = self._bootstrap(n_bootstrap, confidence, seed)
        return {**self._header(sums), **stats, "joint_counts": np.rint(sums["joint"]).astype(np.int64)}


# ---------------------------------------------------------------- 6. vocabulary specialisation
class VocabularySpecialisation(RoutingAccumulator):
    """Per expert: tokens routed to it most often relative to their frequency, and KL(P(v|e) || P(v))."""

    def __init__(self, num_experts: int, top_k: int, min_count: int = 10, top_n: int = 20, seed: int = 0) -> None:
        super().__init__()
        self.num_experts = _positive_int(num_experts, "num_experts", 2)
        self.top_k = _positive_int(top_k, "top_k")
        self.min_count = _positive_int(min_count, "min_count")
        self.top_n = _positive_int(top_n, "top_n")
        self.seed = _positive_int(seed, "seed", 0)

    def _config(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "min_count": self.min_count,
                "top_n": self.top_n, "seed": self.seed}

    def update(self, indices: Any, token_ids: Any) -> None:
        """Add one document: ``indices`` [T, k] chosen experts, ``token_ids`` [T]."""
        idx = _indices(indices, self.num_experts, self.top_k)
        tok = _token_ids(token_ids, len(idx))
        shuffled = _document_rng(self.seed, idx, tok).permutation(tok)
        for name, ids in (("pairs", tok), ("pairs_permuted", shuffled)):
            self._add_sparse(name, *np.unique((ids[:, None] * self.num_experts + idx).ravel(), return_counts=True))
        self._add_sparse("tokens", *np.unique(tok, return_counts=True))
        self._add_totals(n=np.int64(len(tok)))
        self.n_documents += 1

    def _kl(self, keys: np.ndarray, counts: np.ndarray, token_keys: np.ndarray, token_counts: np.ndarray,
            n: int) -> np.ndarray:
        """Per expert KL(P(v|e) || P(v)) in nats from sparse (v·E + e) counts; NaN for unused experts."""
        E = self.num_experts
        expert = keys % E
        per_expert = np.bincount(expert, weights=counts, minlength=E)
        p_v = token_counts[np.searchsorted(token_keys, keys // E)] / n
        with np.errstate(divide="ignore", invalid="ignore"):
            p_ve = counts / per_expert[expert]
            kl = np.bincount(expert, weights=p_ve * np.log(p_ve / p_v), minlength=E)
            return np.where(per_expert > 0, kl, np.nan)

    def finalize(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """Specialisation per expert with its permutation baseline, and top tokens (no bootstrap: args unused)."""
        E = self.num_experts
        n = int(self._total("n"))
        if n == 0:
            raise RoutingDataError("VocabularySpecialisation has no tokens: call update() before finalize().")
        self._sparse = {name: [self._sparse_table(name)] for name in self._sparse}   # compact (same content)
        keys, counts = self._sparse_table("pairs")
        token_keys, token_counts = self._sparse_table("tokens")
        kl = self._kl(keys, counts, token_keys, token_counts, n)
        kl_perm = self._kl(*self._sparse_table("pairs_permuted"), token_keys, token_counts, n)
        expert, token = keys % E, keys // E
        load = np.bincount(expert, weights=counts, minlength=E) / n
        token_count = token_counts[np.searchsorted(token_keys, token)]
        share = counts / token_count
        keep = token_count >= self.min_count
        order = np.lexsort((token, -counts, -share, expert))
        order = order[keep[order]]
        bounds = np.searchsorted(expert[order], np.arange(E + 1))
        top_tokens = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for e in range(E):
                sel = order[bounds[e]:bounds[e + 1]][:self.top_n]
                top_tokens.append({"token_ids": token[sel].tolist(), "counts": counts[sel].tolist(),
                                   "token_counts": token_count[sel].tolist(),
                                   "p_expert_given_token": share[sel].tolist(),
                                   "lift": (share[sel] / load[e]).tolist()})
        return {**self._header(), "vocabulary_size": len(token_keys), "specialisation": kl.tolist(),
                "specialisation_baseline": kl_perm.tolist(), "specialisation_excess": (kl - kl_perm).tolist(),
                "top_tokens": top_tokens}


# ---------------------------------------------------------------- one layer, all statistics
class LayerRoutingStats:
    """All single-layer statistics of one MoE layer: load, entropy, co-activation, consistency, vocabulary."""

    _PARTS = ("load", "entropy", "coactivation", "consistency", "vocabulary")

    def __init__(self, num_experts: int, top_k: int, *, rare_fraction: float = 0.1, n_permutations: int = 4,
                 min_count: int = 10, top_n: int = 20, seed: int = 0) -> None:
        self.load = ExpertLoad(num_experts, top_k, rare_fraction)
        self.entropy = RouterEntropy(num_experts, top_k)
        self.coactivation = CoActivation(num_experts, top_k)
        self.consistency = ConsecutiveConsistency(num_experts, top_k, n_permutations, seed)
        self.vocabulary = VocabularySpecialisation(num_experts, top_k, min_count, top_n, seed)
        self._kw = {"num_experts": num_experts, "top_k": top_k, "rare_fraction": rare_fraction,
                    "n_permutations": n_permutations, "min_count": min_count, "top_n": top_n, "seed": seed}

    @property
    def n_documents(self) -> int:
        """Documents added so far."""
        return self.load.n_documents

    def update(self, indices: Any, weights: Any, scores: Any, token_ids: Any) -> None:
        """Add one document: indices [T, k], weights [T, k], scores [T, E], token_ids [T] (all checked first)."""
        k = self.load.top_k
        idx = _indices(indices, self.load.num_experts, k)
        w = _weights(weights, (len(idx), k))
        s = np.asarray(scores, dtype=np.float64)
        if s.shape[:1] != (len(idx),):
            raise RoutingDataError(f"scores must have one row per token ({len(idx)}), got shape {s.shape}.")
        tok = _token_ids(token_ids, len(idx))
        self.entropy.update(s, w)
        self.load.update(idx, w)
        self.coactivation.update(idx)
        self.consistency.update(idx, w)
        self.vocabulary.update(idx, tok)

    def merge(self, other: LayerRoutingStats) -> LayerRoutingStats:
        """A new accumulator holding the documents of both (associative and order-independent)."""
        if not isinstance(other, LayerRoutingStats) or other._kw != self._kw:
            raise RoutingDataError("cannot merge LayerRoutingStats with different configurations.")
        out = LayerRoutingStats(**self._kw)
        for part in self._PARTS:
            setattr(out, part, getattr(self, part).merge(getattr(other, part)))
        return out

    def finalize(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """Dict: n_documents, n_tokens, n_bootstrap, confidence and each part's finalize() under its name."""
        out: dict[str, Any] = {"n_documents": self.n_documents, "n_tokens": int(self.coactivation._total("n")),
                               "n_bootstrap": n_bootstrap, "confidence": confidence}
        for part in self._PARTS:
            out[part] = getattr(self, part).finalize(n_bootstrap, confidence, seed)
        return out


def routing_statistics(docs: Iterable[Mapping[str, Any]], num_experts: int, top_k: int | None = None, *,
                       n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                       **options: Any) -> dict[str, Any]:
    """Finalised ``LayerRoutingStats`` of per-document dicts with keys indices, weights, scores, token_ids."""
    stats: LayerRoutingStats | None = None
    for doc in docs:
        if stats is None:
            k = top_k if top_k is not None else np.shape(doc["indices"])[1]
            stats = LayerRoutingStats(num_experts, k, seed=seed, **options)
        stats.update(doc["indices"], doc["weights"], doc["scores"], doc["token_ids"])
    if stats is None:
        raise RoutingDataError("routing_statistics needs at least one document.")
    return stats.finalize(n_bootstrap, confidence, seed)


def cross_layer_statistics(docs: Iterable[Mapping[str, Any]], docs_next: Iterable[Mapping[str, Any]],
                           num_experts: int, num_experts_next: int | None = None, *, n_bootstrap: int = 1000,
                           confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Finalised ``CrossLayerConsistency`` of two layers' per-document dicts (indices, optional weights)."""
    acc = CrossLayerConsistency(num_experts, num_experts_next, seed)
    for a, b in zip(docs, docs_next, strict=True):
        acc.update(top1_experts(a["indices"], a.get("weights")), top1_experts(b["indices"], b.get("weights")))
    return acc.finalize(n_bootstrap, confidence, seed)
