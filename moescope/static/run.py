"""``moescope weights``: every static analysis for every MoE layer, streamed layer by layer, resumable."""
from __future__ import annotations

import math
import random
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..arch.adapter import MoEModel, open_model
from ..arch.spec import MATRICES
from ..errors import ConfigError, OptionsError
from ..memory import check_fits, static_estimate
from ..parallel import check_workers, process_pool, worker_threads
from ..results import RunWriter, config_hash, load_results, Results
from ..validate import MemberHealth, scan_layer
from .regression import gate_embedding_similarity, similarity_regression
from .reorder import Matching, ReorderResult, apply_matching, match_members, release_host_buffers, reorder_pair
from .stream import MemberCache, stream_layer, streamed_neuron_pca


@dataclass
class WeightsOptions:
    """Options of the static analyses (shared by the API and the CLI)."""

    layers: list[int] | None = None          # None: every MoE layer
    matrices: Sequence[str] = MATRICES
    neuron_level: bool = True                # neuron matching (the expensive part)
    pairs: str = "all"                       # all | sample:N | top:K (by matrix-level similarity)
    pca_components: int = 3
    seed: int = 0
    match: str = "each"                      # each: match every matrix separately (the study); gate | up |
                                             # down: match once on that matrix; concat: once on all matrices
    dtype: str = "float64"                   # accumulation dtype of neuron-level analyses
    memory_budget: int = 2 << 30             # bytes for one streamed chunk of a layer (matrix level) and for
                                             # the similarity matrices of pairs matched at once

    def __post_init__(self) -> None:
        bad = [m for m in self.matrices if m not in MATRICES]
        if bad:
            raise OptionsError(f"unknown matrices {bad}; choose from {list(MATRICES)}")
        if self.match not in ("each", "concat", *MATRICES):
            raise OptionsError(f"--match must be 'each', 'concat' or one of {list(MATRICES)}, got {self.match!r}")
        kind, _, n = self.pairs.partition(":")
        if kind not in ("all", "sample", "top") or (kind != "all" and not n.isdigit()):
            raise OptionsError(f"--pairs must be 'all', 'sample:N' or 'top:K', got {self.pairs!r}")


def select_pairs(similarity: torch.Tensor, spec: str, seed: int = 0) -> list[tuple[int, int]]:
    """Member pairs (a < b) to match: all, a seeded sample of N, or the top K by matrix-level similarity."""
    n = similarity.shape[0]
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    kind, _, count = spec.partition(":")
    if kind == "sample":
        return sorted(random.Random(seed).sample(pairs, min(int(count), len(pairs))))
    if kind == "top":
        key = lambda p: -float(similarity[p]) if not math.isnan(float(similarity[p])) else math.inf  # noqa: E731
        return sorted(sorted(pairs, key=key)[: int(count)])
    return pairs


def _member_readers(model: MoEModel, layer: int, matrix: str, labels: list[str],
                    dense_matrix: torch.Tensor | None) -> list:
    """A row reader per member: routed and shared members read their rows from disk, F from memory."""
    def reader(label: str):
        if label == "F":
            return lambda start, stop: dense_matrix[start:stop]
        return lambda start, stop: model.member_rows(layer, label, matrix, start, stop)
    return [reader(label) for label in labels]


def _matrix_level(model: MoEModel, layer: int, matrix: str, labels: list[str], widths: list[int],
                  dense_matrix: torch.Tensor | None, opts: WeightsOptions, device) -> tuple[dict, dict]:
    """Matrix-level and neuron-averaged similarity (+ matrix-level PCA of the routed group), streamed."""
    n, H = len(labels), model.hidden_size
    flat, avg = (torch.full((n, n), math.nan, dtype=torch.float64) for _ in range(2))
    readers = _member_readers(model, layer, matrix, labels, dense_matrix)
    tensors, tables = {}, {}
    for width in dict.fromkeys(widths):  # one group per width, routed experts' first
        idx = [i for i, w in enumerate(widths) if w == width]
        rows, cols = (H, width) if matrix == "down" else (width, H)
        streamed = stream_layer([readers[i] for i in idx], rows, cols, 1 if matrix == "down" else 0,
                                k=opts.pca_components, budget_bytes=opts.memory_budget, device=device)
        ix = torch.tensor(idx)
        flat[ix[:, None], ix[None, :]] = streamed.matrix_similarity.cpu()
        avg[ix[:, None], ix[None, :]] = streamed.averaged_similarity.cpu()
        if width == widths[0] and streamed.pca_coords is not None:
            tensors.update(pca_matrix=streamed.pca_coords, pca_matrix_evr=streamed.pca_evr)
            tables["pca_matrix_members"] = [labels[i] for i in idx]
    tensors.update(matrix_similarity=flat, neuron_avg_similarity=avg)
    return tables, tensors


def _neuron_level(labels: list[str], widths: list[int], load, flat: torch.Tensor, matrix: str,
                  opts: WeightsOptions, dtype, shared: "SharedMatcher | None") -> tuple[dict, dict]:
    """Neuron matching of the chosen member pairs and neuron-level PCA, holding few members at a time.
    With ``shared``, every pair's matching comes from it instead of this matrix's own neuron cosines."""
    if shared is None:
        def solve(a, b, wa, wb):
            return reorder_pair(wa, wb, matrix, dtype=dtype)
    else:
        def solve(a, b, wa, wb):
            return apply_matching(wa, wb, matrix, shared(labels[a], labels[b]), dtype=dtype)
    n = len(labels)
    cache = MemberCache(load, opts.memory_budget)
    reordered, matched, tau = (torch.full((n, n), math.nan, dtype=torch.float64) for _ in range(3))
    for i in range(n):
        reordered[i, i] = matched[i, i] = tau[i, i] = 1.0
    tensors, sides, solvers = {}, {}, {}
    pairs = select_pairs(flat, opts.pairs, opts.seed)
    for (a, b), r in zip(pairs, _match_pairs(pairs, cache, solve, _pair_workers(pairs, widths, opts))):
        reordered[a, b] = reordered[b, a] = r.cosine
        matched[a, b] = matched[b, a] = r.mean_matched
        tau[a, b] = tau[b, a] = r.tau
        pair = f"{labels[a]}-{labels[b]}"
        tensors[f"permutations.{pair}"] = r.col
        sides[pair] = labels[a] if r.side == "a" else labels[b]
        solvers[pair] = {"solver": r.solver, "certified": r.certified, "matched_on": opts.match}
    coords, evr = streamed_neuron_pca(cache.__getitem__, n, matrix, k=opts.pca_components)
    tensors.update(reordered_matrix_similarity=reordered, matched_neuron_similarity=matched, kendall_tau=tau,
                   pca_neuron=coords, pca_neuron_evr=evr)
    return {"permutation_side": sides, "assignment": solvers}, tensors


def _match_pairs(pairs: list[tuple[int, int]], cache: MemberCache, solve,
                 workers: int) -> Iterator[ReorderResult]:
    """``solve(a, b, member a, member b)`` of every pair, in order, ``workers`` pairs at once in threads (the
    assignment solver releases the GIL and is serial at its core); members are fetched in this thread."""
    try:
        if workers == 1:
            yield from (solve(a, b, cache[a], cache[b]) for a, b in pairs)
            return
        with ThreadPoolExecutor(workers) as pool:
            pending: deque = deque()
            for a, b in pairs:
                pending.append(pool.submit(solve, a, b, cache[a], cache[b]))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        release_host_buffers()


class SharedMatcher:
    """Neuron matchings of member pairs on ``opts.match`` (one matrix, or every analysed matrix with
    ``concat``), each computed once per layer and applied to all matrices."""

    def __init__(self, model: MoEModel, dense_model: MoEModel | None, layer: int, opts: WeightsOptions, device,
                 dtype):
        labels, widths = _layer_members(model, dense_model, layer)
        on = list(opts.matrices) if opts.match == "concat" else [opts.match]
        self.index = {label: i for i, label in enumerate(labels)}
        self.dense = {m: _dense_matrix(dense_model, layer, m, device) for m in on}  # F's matrices, read once
        self.caches = {m: MemberCache(_member_loader(model, layer, m, labels, widths, self.dense[m], device),
                                      opts.memory_budget // len(on)) for m in on}
        self.dtype, self.lock, self.found = dtype, threading.Lock(), {}

    def loader(self, matrix: str, labels: list[str]):
        """index into ``labels`` -> that member's ``matrix``, from this matcher's cache (no second read)."""
        def load(index: int) -> torch.Tensor:
            with self.lock:
                return self.caches[matrix][self.index[labels[index]]]
        return load

    def __call__(self, label_a: str, label_b: str) -> Matching:
        key = (label_a, label_b)
        if key not in self.found:
            with self.lock:  # members are read one pair at a time
                pairs = [(cache[self.index[label_a]], cache[self.index[label_b]], m)
                         for m, cache in self.caches.items()]
            self.found[key] = match_members(pairs, dtype=self.dtype)
        return self.found[key]


def _layer_members(model: MoEModel, dense_model: MoEModel | None, layer: int) -> tuple[list[str], list[int]]:
    """Labels and widths of a layer's members, with the dense model's FFN as F when given."""
    labels, widths = model.member_labels(layer), model.member_widths(layer)
    if dense_model is None:
        return labels, widths
    return labels + ["F"], widths + [dense_model.dense_width]


def _dense_matrix(dense_model: MoEModel | None, layer: int, matrix: str, device) -> torch.Tensor | None:
    return None if dense_model is None else dense_model.dense_ffn(layer, matrix).to(device)


def _pair_workers(pairs: list[tuple[int, int]], widths: list[int], opts: WeightsOptions) -> int:
    if not pairs:
        return 1
    return pairs_at_once(max(widths[a] * widths[b] for a, b in pairs), opts, torch.cuda.is_available())


def pairs_at_once(entries: int, opts: WeightsOptions, gpu: bool) -> int:
    """Pairs matched at once when the largest similarity matrix has ``entries`` entries: as many as fit in the
    memory budget (on a GPU each has a page-locked host copy too), with two of torch's threads per pair on a GPU
    and four on the CPU, at most 8."""
    largest = entries * getattr(torch, opts.dtype).itemsize * (2 if gpu else 1)
    cores = torch.get_num_threads() // (2 if gpu else 4)
    return max(1, min(8, cores, opts.memory_budget // largest))


def _member_loader(model: MoEModel, layer: int, matrix: str, labels: list[str], widths: list[int],
                   dense_matrix: torch.Tensor | None, device):
    """index -> that member's whole canonical matrix (float32, on ``device``), read when asked for."""
    readers = _member_readers(model, layer, matrix, labels, dense_matrix)

    def load(index: int) -> torch.Tensor:
        rows = model.hidden_size if matrix == "down" else widths[index]
        return readers[index](0, rows).to(device=device, dtype=torch.float32)
    return load


def check_dense_model(model: MoEModel, dense: MoEModel, layers: list[int]) -> None:
    """The dense model's FFN joins layer i as member F: it needs a dense FFN there and the same hidden size."""
    if dense.family.dense is None or dense.moe_layers:
        raise ConfigError(f"--dense must be a dense model (like Mistral-7B); '{dense.checkpoint.path}' is a "
                          f"{dense.family.title} checkpoint with MoE layers {dense.moe_layers}.")
    if dense.hidden_size != model.hidden_size:
        raise ConfigError(f"the dense model's hidden size {dense.hidden_size} differs from the MoE model's "
                          f"{model.hidden_size}: their FFNs cannot be compared. Pass the matching dense model.")
    beyond = [l for l in layers if l >= dense.num_layers]
    if beyond:
        raise ConfigError(f"the dense model has {dense.num_layers} layers, so layers {beyond} have no F to compare; "
                          "choose --layers below that or another dense model.")


def compute_device() -> str:
    """Where the static analyses compute: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _regression(expert_sim: torch.Tensor, router_sim: torch.Tensor) -> dict:
    fit = similarity_regression(expert_sim, router_sim)
    return {"r": fit.r, "r2": fit.r2, "slope": fit.slope, "intercept": fit.intercept, "n_pairs": fit.n_pairs}


def analyse_layer(model: MoEModel, dense_model: MoEModel | None, layer: int, opts: WeightsOptions,
                  on_matrix=None) -> tuple[dict, dict]:
    """Every static analysis of one MoE layer: (JSON tables, tensors)."""
    dtype = getattr(torch, opts.dtype)
    device = compute_device()
    router_sim = gate_embedding_similarity(model.router(layer).to(device), dtype=dtype)
    tables: dict = {"dense_layers_skipped": model.dense_layers}
    tensors = {"router_similarity": router_sim.cpu()}
    shared = SharedMatcher(model, dense_model, layer, opts, device, dtype) \
        if opts.neuron_level and opts.match != "each" else None
    for m in opts.matrices:
        labels, widths = _layer_members(model, dense_model, layer)
        reuse = shared is not None and m in shared.caches  # the matcher already reads this matrix
        dense_matrix = shared.dense[m] if reuse else _dense_matrix(dense_model, layer, m, device)
        health, t, x = _checked_matrix_level(model, layer, m, labels, widths, dense_matrix, opts, device)
        keep = health.keep
        kept_labels, kept_widths = [labels[i] for i in keep], [widths[i] for i in keep]
        E = model.num_experts
        routed = [j for j, i in enumerate(keep) if i < E]          # kept routed experts, as positions in keep
        experts = torch.tensor([i for i in keep if i < E], dtype=torch.long)
        router_kept = router_sim.cpu()[experts[:, None], experts[None, :]]
        t["gate_regression"] = {kind: _regression(x[key][routed][:, routed], router_kept) for kind, key in
                                (("flat", "matrix_similarity"), ("averaged", "neuron_avg_similarity"))}
        if opts.neuron_level:
            load = shared.loader(m, kept_labels) if reuse else \
                _member_loader(model, layer, m, kept_labels, kept_widths, dense_matrix, device)
            t2, x2 = _neuron_level(kept_labels, kept_widths, load, x["matrix_similarity"], m, opts, dtype,
                                   shared)
            t.update(t2)
            x.update(x2)
        for key in ("matrix_similarity", "neuron_avg_similarity", "reordered_matrix_similarity",
                    "matched_neuron_similarity", "kendall_tau"):
            if key in x:
                x[key] = health.expand(x[key])
        t.update(health.table())
        t["pca_neuron_members"] = dict(zip(kept_labels, kept_widths))
        tables.update(labels=labels, widths=widths)
        tables[m] = t
        tensors.update({f"{m}.{k}": v.detach().cpu() for k, v in x.items()})
        if on_matrix is not None:
            on_matrix(layer, m)
    return tables, tensors


def _checked_matrix_level(model: MoEModel, layer: int, matrix: str, labels: list[str], widths: list[int],
                          dense_matrix: torch.Tensor | None, opts: WeightsOptions,
                          device) -> tuple[MemberHealth, dict, dict]:
    """The matrix-level pass, plus which members take part. Only when the pass shows a problem (a member's
    self-similarity is not 1: non-finite or all-zero weights) is the layer scanned; such members are then
    reported with a warning and left out, and the pass is redone without them."""
    try:
        t, x = _matrix_level(model, layer, matrix, labels, widths, dense_matrix, opts, device)
        diagonal = x["matrix_similarity"].diagonal()
        if bool(((diagonal - 1).abs() < 1e-6).all()):
            return MemberHealth(list(labels)), t, x
    except (RuntimeError, ValueError):  # non-finite values break the PCA eigendecomposition (torch or numpy)
        pass
    health = scan_layer(model, layer, matrix, labels, widths, dense_matrix, budget_bytes=opts.memory_budget)
    health.warn(f"layer {layer} {matrix}")
    keep = health.keep
    t, x = _matrix_level(model, layer, matrix, [labels[i] for i in keep], [widths[i] for i in keep],
                         dense_matrix, opts, device)
    return health, t, x


def _layer_task(job: tuple) -> int:
    """Worker side of a parallel run: analyse one layer and write its files; return the layer."""
    path, dense, out, manifest, layer, opts, threads = job
    torch.set_num_threads(threads)
    model = open_model(**path)
    dense_model = open_model(**dense) if dense is not None else None
    RunWriter(Path(out), manifest).write_layer(layer, *analyse_layer(model, dense_model, layer, opts))
    return layer


def _reopen_args(model: MoEModel) -> dict:
    """``open_model`` arguments that open ``model`` again in a worker: its directory, or the hub repo and commit
    it streams."""
    if model.checkpoint.hub is not None:
        repo_id, commit = model.checkpoint.hub
        return {"path_or_id": repo_id, "download": True, "revision": commit}
    return {"path_or_id": str(model.checkpoint.path)}


def weights(path: str | Path, *, dense: str | Path | None = None, out: str | Path = "moescope-runs/weights",
            options: WeightsOptions | None = None, resume: bool = True, progress: bool = True,
            workers: int = 1, ray: str | None = None, download: bool = False, evict: bool = False,
            memory_check: bool = True) -> Results:
    """Run the static analyses of PAPER.md on every MoE layer of ``path``; write and return the results.

    ``workers`` > 1 analyses layers in parallel processes (each streaming its own layers; ``ray`` runs them on a
    Ray cluster instead); every layer is written as it finishes, so any run can be resumed.
    ``download`` streams hub ids (``path``, ``dense``): each shard is downloaded into the Hugging Face cache when
    a layer first reads it; ``evict`` then deletes every shard it downloaded once no remaining layer needs it
    (``moescope.hub_stream``). Before any layer, the run is refused (``InsufficientMemoryError``) when its
    estimated peak memory exceeds what is free here (``memory_check=False`` or ``MOESCOPE_SKIP_MEMORY_CHECK=1``
    skips that).
    """
    opts = options or WeightsOptions()
    model = open_model(path, download=download)
    model.check()
    dense_model = open_model(dense, download=download) if dense is not None else None
    if dense_model is not None:
        dense_model.check()
    if evict:
        _check_evict([model, dense_model], workers)
    layers = model.moe_layers if opts.layers is None else opts.layers
    bad = [l for l in layers if l not in model.moe_layers]
    if bad:
        raise OptionsError(f"layers {bad} are not MoE layers of this checkpoint; MoE layers: {model.moe_layers}")
    check_workers(workers, ray)
    if dense_model is not None:
        check_dense_model(model, dense_model, layers)
    if memory_check and ray in (None, "local"):  # (a remote Ray cluster's machines are not this one)
        check_fits(static_estimate(model, opts, dense_model, compute_device(), min(workers, len(layers))),
                   compute_device())
    checkpoint = {"path": str(model.checkpoint.path), "family": model.family.name,
                  "config_sha256": config_hash(model.config),
                  "dense": None if dense_model is None else {"path": str(dense_model.checkpoint.path),
                                                             "config_sha256": config_hash(dense_model.config)}}
    writer = RunWriter.open(out, "weights", {**asdict(opts), "layers": layers, "matrices": list(opts.matrices)},
                            checkpoint, resume=resume)
    todo = [l for l in layers if not writer.done(l)]
    read = tuple(m for m in MATRICES if m in opts.matrices or m == opts.match)  # --match may read another
    evictor = _evictor([model, dense_model], todo, read) if evict else None
    if workers > 1 and len(todo) > 1:
        threads = worker_threads(workers)
        jobs = [(_reopen_args(model), None if dense is None else _reopen_args(dense_model),
                 str(writer.out), writer.manifest, layer, opts, threads) for layer in todo]
        with process_pool(min(workers, len(todo)), ray) as pool:
            for _ in tqdm(pool.imap_unordered(_layer_task, jobs), total=len(jobs), desc="weights", unit="layer",
                          disable=not progress):
                pass
    else:
        with tqdm(total=len(todo) * len(opts.matrices), desc="weights", unit="matrix", disable=not progress) as bar:
            for layer in todo:
                bar.set_postfix(layer=layer)
                writer.write_layer(layer, *analyse_layer(model, dense_model, layer, opts, lambda l, m: bar.update()))
                if evictor is not None:
                    evictor.layer_done(layer)
    results = load_results(writer.out)
    results.summary = writer.write_summary(_summary(results, model, opts))
    return results


def _check_evict(models: list[MoEModel | None], workers: int) -> None:
    """``--evict`` deletes only what ``--download`` fetches, and needs the one process that reads the shards."""
    local = [str(m.checkpoint.path) for m in models if m is not None and not m.checkpoint.streamed]
    if local:
        raise OptionsError(f"--evict deletes shards that --download fetches from the hub, but '{local[0]}' is read "
                           "from disk (a local directory, or --download is missing) and moescope never deletes "
                           "those files. Add --download with a hub id, or drop --evict.")
    if workers > 1:
        raise OptionsError("--evict works with --workers 1: parallel workers read shards the main process cannot "
                           "track. Drop --workers, or drop --evict if the disk holds the whole model.")


def _evictor(models: list[MoEModel | None], layers: list[int], matrices: Sequence[str]):
    """The ``--evict`` bookkeeping: which shards each remaining layer still reads."""
    from ..hub_stream import ShardEvictor

    return ShardEvictor(models, layers, matrices)


def _summary(results: Results, model: MoEModel, opts: WeightsOptions) -> dict:
    r2 = {m: {kind: _mean([results[f"layer{l}.{m}.gate_regression.{kind}.r2"] for l in results.layers])
              for kind in ("flat", "averaged")} for m in opts.matrices}
    return {"family": model.family.name, "moe_layers": model.moe_layers, "dense_layers": model.dense_layers,
            "layers_done": results.layers, "gate_r2_mean": r2}


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None
