"""What a run needs in memory, and whether it fits here: decided before any heavy work.

An ``Estimate`` is a run's phases, steps that follow one another (what one holds is freed before the next);
each phase lists the parts it holds at once, where (CPU or GPU memory) and what would make them smaller. A
run's peak is its largest phase. Sizes come from config.json, the shard headers and the options; each part
follows the code that allocates it (named beside it) and is meant to be roughly right, not exact. The Python
process itself (interpreter, torch, numba: a few hundred MB) is not counted: it is already running when the
check compares the estimate with the memory available.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .arch.adapter import MoEModel
from .errors import InsufficientMemoryError
from .inspect import logical_params

SKIP_ENV = "MOESCOPE_SKIP_MEMORY_CHECK"
CPU, GPU = "cpu", "gpu"
_CAPTURED_BYTES = 4  # trace's hooks copy block inputs and outputs to the CPU in float32 (dynamic/capture.py)
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc serves allocations below this from its heap, which keeps them once freed
_KEPT_TEMPORARIES = 10  # freed heap temporaries still resident at the neuron level's peak (measured, see below)
_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # trace's --dtype choices
_LOADER_STATE = 100 << 20  # transformers' modeling code and loading state (measured, transformers 5)


@dataclass(frozen=True)
class Part:
    """One allocation of a phase: ``key`` (stable, for JSON), what it is, its bytes, where it lives (``CPU`` or
    ``GPU``) and what makes it smaller."""

    key: str
    label: str
    bytes: int
    where: str
    remedy: str = ""


@dataclass(frozen=True)
class Phase:
    """A step of a run and the parts it holds at once."""

    key: str
    name: str
    parts: tuple[Part, ...]

    def total(self, where: str | None = None) -> int:
        """Bytes held in ``where`` (``CPU``, ``GPU``; None: both)."""
        return sum(p.bytes for p in self.parts if where in (None, p.where))


@dataclass(frozen=True)
class Estimate:
    """The memory a run needs: its phases, the largest of which is its peak."""

    run: str
    phases: tuple[Phase, ...]

    def peak(self, where: str | None = None) -> tuple[int, Phase | None]:
        """The largest phase's bytes in ``where`` (None: CPU and GPU together) and that phase."""
        if not self.phases:
            return 0, None
        phase = max(self.phases, key=lambda p: p.total(where))
        return phase.total(where), phase

    def largest(self, prefix: str, where: str | None = None) -> int:
        """Bytes of the largest phase whose key starts with ``prefix``."""
        return max((p.total(where) for p in self.phases if p.key.startswith(prefix)), default=0)

    def part(self, key: str) -> int:
        """Bytes of the largest part named ``key`` in any phase."""
        return max((part.bytes for p in self.phases for part in p.parts if part.key == key), default=0)



def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``640 MiB``, ``0.99 GiB``, ``12 KiB``, ``100 B`` (binary units, at most three digits)."""
    unit = "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1000:
            break
        n, unit = n / 1024, bigger
    return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.3g} {unit}"


def _gpu(device: str | torch.device) -> bool:
    return str(device).startswith("cuda")


# -- static pass (moescope weights) ---------------------------------------------------------------------------

def static_estimate(model: MoEModel, opts, dense: MoEModel | None = None, device: str = "cpu",
                    workers: int = 1) -> Estimate:
    """Per MoE layer of ``moescope weights`` (``opts``: ``WeightsOptions``), ``workers`` layers at a time.

    Matrix level: the streamed chunks the memory budget bounds (``stream.pass_memory``). Neuron level, for the
    widest pair of members: the members held (``MemberCache``: the budget, at least two members, plus the one
    being loaded; float32), the n_a x n_b similarity matrix in ``opts.dtype`` with the normalised copies
    ``cosine_matrix`` makes, then the assignment solver's work (``assignment_memory``); on a GPU the members
    and the similarity matrix live there and the solver works on a CPU copy. Then neuron-level PCA.
    """
    if not model.moe_layers:
        return Estimate("moescope weights", ())
    layer = model.moe_layers[0]  # every MoE layer of a checkpoint has the same members
    widths = model.member_widths(layer) + ([dense.dense_width] if dense is not None else [])
    phases = [_matrix_level(model.hidden_size, widths, opts, device)]
    if opts.neuron_level and len(widths) >= 2:
        phases += _neuron_level(model.hidden_size, widths, opts, device)
    return Estimate("moescope weights", tuple(_times(p, workers) for p in phases))


def _matrix_level(hidden: int, widths: list[int], opts, device: str) -> Phase:
    from .static.stream import pass_memory

    worst = max(pass_memory(widths.count(w), *((hidden, w) if m == "down" else (w, hidden)), opts.memory_budget,
                            device) for m in opts.matrices for w in set(widths))
    part = Part("matrix_chunks", "streamed chunks and sums", worst, GPU if _gpu(device) else CPU,
                f"--memory-budget below {format_bytes(opts.memory_budget)}")
    return Phase("matrix_level", "matrix level (streamed)", (part,))


def _neuron_level(hidden: int, widths: list[int], opts, device: str) -> list[Phase]:
    from .static.assignment import assignment_memory
    from .static.run import pairs_at_once
    from .static.similarity import cosine_matrix_memory

    where, itemsize = (GPU if _gpu(device) else CPU), getattr(torch, opts.dtype).itemsize
    member = [w * hidden * 4 for w in widths]  # float32 (static/run.py: _member_loader)
    held = min(sum(member), max(opts.memory_budget, 2 * max(member)) + max(member))
    n_a, n_b = sorted(widths)[-2:]
    similarity, normalised = cosine_matrix_memory(n_a, n_b, hidden, itemsize)
    shape = f"{n_a} x {n_b} {opts.dtype}"
    members = (Part("members", "members held (float32)", held, where,
                    f"--memory-budget below {format_bytes(opts.memory_budget)}"), *_shared_matching(member, opts, where))
    sim = Part("similarity", f"neuron similarity matrix {shape}", similarity, where,
               ("WeightsOptions(dtype='float32'), half the size, or " if itemsize > 4 else "") + "--no-neuron-level")
    solve = [Part("solver", "assignment solver work", assignment_memory(n_a, n_b, itemsize), CPU, "--no-neuron-level")]
    if where == GPU:
        solve.append(Part("similarity_copy", f"CPU copy of the similarity matrix {shape}", similarity, CPU,
                          "--no-neuron-level"))
    kept = (Part("allocator", "freed temporaries the C allocator keeps", _allocator_slack(max(member) * 2), CPU),) \
        if where == CPU else ()
    at_once = pairs_at_once(n_a * n_b, opts, where == GPU)  # pairs matched in parallel threads
    pair = (sim, Part("normalised", "normalised neuron vectors", normalised, where))
    if opts.match == "concat" and len(opts.matrices) > 1:  # match_members: a running sum beside each matrix's C
        pair += (Part("score", f"summed similarity of the matrices {shape}", similarity, where, "--match each"),)
    return [Phase("neuron_similarity", f"neuron level: similarity of the widest pair ({n_a} x {n_b})",
                  (*members, *_several(pair, at_once), *kept)),
            Phase("neuron_assignment", f"neuron level: matching the widest pair ({n_a} x {n_b})",
                  (*members, *_several((sim, *solve), at_once), *kept)),
            Phase("neuron_pca", "neuron level: PCA", (*members, *_neuron_pca(hidden, widths, opts, where), *kept))]


def _shared_matching(member: list[int], opts, where: str) -> tuple[Part, ...]:
    """``--match`` other than each: ``SharedMatcher`` keeps members of its matrices, a share of the budget each."""
    if opts.match == "each":
        return ()
    on = len(opts.matrices) if opts.match == "concat" else 1
    held = on * min(sum(member), max(opts.memory_budget // on, 2 * max(member)) + max(member))
    return (Part("shared_members", f"members held for --match {opts.match} (float32)", held, where,
                 f"--memory-budget below {format_bytes(opts.memory_budget)}, or --match each"),)


def _several(parts: tuple[Part, ...], count: int) -> tuple[Part, ...]:
    """``parts`` held ``count`` times at once (pairs matched in parallel within the memory budget)."""
    return _copies(parts, count, "pairs at once", "a smaller --memory-budget (fewer pairs at once)")


def _neuron_pca(hidden: int, widths: list[int], opts, where: str) -> tuple[Part, ...]:
    """``streamed_neuron_pca``: one member in float64 at a time, the hidden x hidden statistics and the
    eigendecomposition (float64), and every neuron's coordinates."""
    return (Part("pca_member", "one member in float64", max(widths) * hidden * 8, where),
            Part("pca_covariance", "hidden x hidden covariance and its eigenvectors (float64)", 6 * hidden ** 2 * 8,
                 where),
            Part("pca_points", "neuron PCA coordinates", sum(widths) * opts.pca_components * 8, where))


def _allocator_slack(temporary: int) -> int:
    """Resident memory beyond what is live: the neuron level's temporaries (a member in float64 and the like)
    come from glibc's heap when they are below its mmap threshold (up to 32 MiB), and freed heap memory mostly
    stays resident: on a layer of 3584 x 1024 members, peak RssAnon measured 1.0-2.3x the live estimate, varying
    from run to run. Larger temporaries are mapped and unmapped on their own, and the live estimate holds (7168 x
    2048 members: 750 MiB measured, 784 MiB estimated)."""
    return _KEPT_TEMPORARIES * temporary if temporary <= _MMAP_THRESHOLD_MAX else 0


def _times(phase: Phase, copies: int, unit: str = "layers") -> Phase:
    """``phase`` held ``copies`` times at once (parallel workers, each on its own layer or shard of documents)."""
    if copies <= 1:
        return phase
    return Phase(phase.key, f"{phase.name}, {copies} {unit} at once",
                 _copies(phase.parts, copies, "workers", f"fewer --workers than {copies}"))


def _copies(parts: tuple[Part, ...], count: int, unit: str, remedy: str) -> tuple[Part, ...]:
    """``parts`` ``count`` times over (``unit``: what runs in parallel; ``remedy``: what lowers ``count``)."""
    if count <= 1:
        return parts
    return tuple(Part(p.key, f"{p.label} x {count} {unit}", p.bytes * count, p.where,
                      remedy + (f", {p.remedy}" if p.remedy else "")) for p in parts)


# -- dynamic pass (moescope trace) ----------------------------------------------------------------------------

def weight_bytes(model: MoEModel, dtype: torch.dtype) -> int:
    """The model's parameters (from the shard headers; quantised ones dequantised) in ``dtype``."""
    return logical_params(model)[0] * dtype.itemsize


def batch_shapes(lengths: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """(documents, padded length) of each forward batch: consecutive documents, right-padded (dynamic/forward.py)."""
    return [(len(lengths[i:i + batch_size]), max(lengths[i:i + batch_size]))
            for i in range(0, len(lengths), batch_size)]


def dynamic_estimate(model: MoEModel, lengths: Sequence[int], opts, device: str, layers: Sequence[int] | None = None,
                     dense: MoEModel | None = None, workers: int = 1) -> Estimate:
    """``moescope trace`` of documents of ``lengths`` tokens (``opts``: ``TraceOptions``) on ``device``; with
    ``workers``, that many shards like it at once (each worker loads the model and traces its shard).

    Forward pass (dynamic/forward.py, run.py): the model's weights in the run's dtype (on a GPU they are loaded
    on the CPU first, then moved), each batch's activations (hidden states, attention scores batch x heads x
    T x T, MLP intermediates, logits), and the captured block inputs and outputs of every traced layer (float32
    on the CPU: the padded per-batch copies, then their concatenation). The dense model (``--dense``) runs
    next, the same way. Then, per layer, the recompute of every member on every token (dynamic/shards.py
    ``accumulate_layer``): all members' outputs [M, T, H] in float32, the per-token similarity of a token chunk in
    float64, one member's weights and intermediates; the captured states of every traced layer are still held.
    """
    from .dynamic.loader import resolve_dtype

    if not model.moe_layers:
        return Estimate("moescope trace", ())
    layers = list(model.moe_layers if layers is None else layers)
    dtype = resolve_dtype(opts.dtype, device)
    batches = batch_shapes(list(lengths), opts.batch_size)
    tokens, padded = sum(lengths), sum(b * s for b, s in batches)
    per_token = (2 * model.hidden_size + model.num_experts) * _CAPTURED_BYTES + 12 * model.routing.top_k
    captured = _captured("", len(layers), per_token)
    phases = _forward_phases(model, batches, dtype, device, (), captured(padded, True), captured(tokens), "")
    held = captured(tokens)
    if dense is not None:
        dense_captured = _captured("dense ", len(layers), 2 * dense.hidden_size * _CAPTURED_BYTES)
        phases += _forward_phases(dense, batches, dtype, device, (held,), dense_captured(padded, True),
                                  dense_captured(tokens), "dense ")
        held = Part(held.key, held.label + " and of the dense model", held.bytes + dense_captured(tokens).bytes,
                    CPU, held.remedy)
    phases.append(_recompute(model, tokens, opts.chunk_tokens, held, GPU if _gpu(device) else CPU,
                             dense.dense_width if dense is not None else None))
    return Estimate("moescope trace", tuple(_times(p, workers, "shards") for p in phases))


def _captured(prefix: str, layers: int, per_token: int):
    """tokens, padded -> the ``Part`` of captured block states of ``layers`` layers (float32, on the CPU)."""
    def part(tokens: int, padded: bool = False) -> Part:
        what = "per batch (padded)" if padded else "joined"
        return Part(f"{prefix}captured{'_batches' if padded else ''}".replace(" ", "_"),
                    f"captured {prefix}block states of {layers} layer(s), {what}", tokens * layers * per_token, CPU,
                    "a lower --max-tokens or fewer --layers")
    return part


def _forward_phases(model: MoEModel, batches: list[tuple[int, int]], dtype: torch.dtype, device: str,
                    held: tuple[Part, ...], captures: Part, joined: Part, prefix: str) -> list[Phase]:
    """Loading ``model`` and running every batch through it while ``held`` (earlier captures) stays in memory
    and the per-batch ``captures`` grow, and the end, where those are ``joined`` before they are freed."""
    where = GPU if _gpu(device) or device == "map" else CPU
    remedies = (["--dtype bfloat16"] if dtype.itemsize > 2 else []) + \
        (["--device map, which spreads the model over GPUs, CPU and disk"] if device != "map" else [])
    weights = Part(f"{prefix}weights".replace(" ", "_"), f"{prefix}model weights ({str(dtype).removeprefix('torch.')})",
                   weight_bytes(model, dtype), where, " or ".join(remedies))
    loading = _loading(model, dtype, prefix)
    batch = max((_activations(model, b, s, dtype.itemsize, where) for b, s in batches),
                key=lambda parts: sum(p.bytes for p in parts))
    on_cpu = (Part(weights.key, f"{weights.label} on the CPU", weights.bytes, CPU, weights.remedy),) \
        if _gpu(device) else ()  # from_pretrained loads on the CPU, then the model moves to the GPU (loader.py)
    return [Phase(f"{prefix}load", f"loading the {prefix}model", (*on_cpu, weights, *loading, *held)),
            Phase(f"{prefix}forward", f"{prefix}forward pass, per batch",
                  (weights, *loading, *batch, *held, captures)),
            Phase(f"{prefix}forward_end", f"end of the {prefix}forward pass",
                  (weights, *loading, *held, captures, joined))]


def _loading(model: MoEModel, dtype: torch.dtype, prefix: str) -> tuple[Part, ...]:
    """What loading with transformers holds on the CPU beside the weights, measured with transformers 5: a copy
    of every tensor stored in another dtype, converted (freed when loading ends, but the allocator keeps most
    of it through the forward pass), and the loader's own code and state (about 100 MiB)."""
    from .checkpoint import SAFETENSORS_DTYPES, TORCH_TO_CODE

    stored = logical_params(model)[1]
    converted = sum(n for code, n in stored.items() if code != TORCH_TO_CODE.get(dtype)) * dtype.itemsize
    own = SAFETENSORS_DTYPES.get(stored.most_common(1)[0][0], (None,))[0] if stored else None
    key = f"{prefix}loading".replace(" ", "_")
    return (Part(f"{key}_copy", f"{prefix}weights converted on loading", converted, CPU,
                 f"--dtype {str(own).removeprefix('torch.')}, the checkpoint's" if own in _MODEL_DTYPES else ""),
            Part(key, "transformers' model code and loading state", _LOADER_STATE, CPU))


def _activations(model: MoEModel, documents: int, length: int, itemsize: int, where: str) -> tuple[Part, Part]:
    """A forward batch's own peak on its device: hidden-size activations (residual, norm, q/k/v, attention
    output: about six copies), MLP intermediates (an expert's gate/up and product on up to every token), the
    logits, and the attention scores of eager/math attention (float32 softmax beside the model dtype)."""
    config, H = model.config, model.hidden_size
    heads = int(config.get("num_attention_heads") or config.get("n_heads") or config.get("n_head") or max(1, H // 128))
    widest = max(model.expert_width if model.family.is_moe else 0, model.dense_width or 0,
                 (model.shared_width or 0) * model.num_shared_members)
    vocab = int(model.namespace.get("vocab_size") or 0)
    tokens = documents * length
    hidden = tokens * (6 * H + 4 * widest + vocab) * itemsize
    scores = documents * heads * length * length * (4 + itemsize)
    shape = f"{documents} x {length} tokens"
    return (Part("activations", f"activations of a batch ({shape})", hidden, where, "a smaller --batch-size"),
            Part("attention", f"attention scores of a batch ({shape}, {heads} heads)", scores, where,
                 "a smaller --batch-size or shorter documents"))


def _recompute(model: MoEModel, tokens: int, chunk_tokens: int, captured: Part, where: str,
               dense_width: int | None) -> Phase:
    """One layer's recompute of every member on every token (dynamic/shards.py ``accumulate_layer``, experts.py)."""
    H = model.hidden_size
    widths = model.member_widths(model.moe_layers[0]) + ([dense_width] if dense_width else [])
    members, widest, chunk = len(widths), max(widths), min(chunk_tokens, tokens)
    outputs = Part("outputs", f"all {members} members' outputs on {tokens} tokens (float32)", members * tokens * H * 4,
                   CPU, "a lower --max-tokens")
    similarity = Part("token_similarity", f"per-token output similarity of {chunk} tokens at a time (float64)",
                      2 * members * chunk * H * 8 + 3 * chunk * members * members * 8, CPU,
                      f"TraceOptions.chunk_tokens below {chunk_tokens}")
    member = Part("member", "one member's weights, intermediates and output (float32; on a GPU, the inputs too)",
                  3 * widest * H * 4 + 4 * chunk * widest * 4 + tokens * H * 4 * (2 if where == GPU else 1), where)
    return Phase("recompute", "expert recompute, per layer", (captured, outputs, similarity, member))


# -- what is available, and the check ----------------------------------------------------------------------------

def available_bytes(where: str, device: str = "cuda") -> int | None:
    """Bytes free now in ``where``: CPU, MemAvailable (within a cgroup's limit); GPU, the free memory of
    ``device`` (``map``: of every GPU). None when unknown (no GPU)."""
    if where == CPU:
        return _cpu_available()
    if not torch.cuda.is_available():
        return None
    if device == "map":
        return sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return torch.cuda.mem_get_info(torch.device(device if _gpu(device) else "cuda"))[0]


def _cpu_available() -> int | None:
    """MemAvailable from /proc/meminfo (else psutil, else sysconf), capped by the room left in a cgroup limit."""
    free = _meminfo_available()
    if free is None:
        try:
            import psutil

            free = int(psutil.virtual_memory().available)
        except ImportError:
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                free = None
    room = _cgroup_room()
    known = [v for v in (free, room) if v is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_CGROUPS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
             "inactive_file"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"))


def _cgroup_room() -> int | None:
    """Bytes left under this container's cgroup memory limit (v2 or v1), counting inactive file pages as free
    (the kernel reclaims them first); None without a limit."""
    for limit_file, usage_file, stat_file, inactive_key in _CGROUPS:
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            if limit == "max" or int(limit) >= 1 << 60:
                return None
            with open(usage_file) as f:
                usage = int(f.read())
            inactive = 0
            with open(stat_file) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == inactive_key:
                        inactive = int(value)
            return max(0, int(limit) - (usage - inactive))
        except (OSError, ValueError):
            continue
    return None


def check_fits(estimate: Estimate, device: str = "cpu") -> None:
    """Raise ``InsufficientMemoryError`` when ``estimate``'s peak exceeds what is free on the CPU or on the GPU
    of ``device`` (``map``: their sum), saying what is needed, what is available and what to change.
    ``MOESCOPE_SKIP_MEMORY_CHECK=1`` skips the check."""
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return
    pools = [(None, "CPU and GPU")] if device == "map" else [(CPU, "CPU"), (GPU, "GPU")]
    for where, name in pools:
        need, phase = estimate.peak(where)
        if not need:
            continue
        have = _pooled_available() if where is None else available_bytes(where, device)
        if have is not None and need > have:
            raise InsufficientMemoryError(_refusal(estimate, phase, where, name, need, have))


def _pooled_available() -> int | None:
    cpu, gpu = available_bytes(CPU), available_bytes(GPU, "map")
    return None if cpu is None else cpu + (gpu or 0)


def _refusal(estimate: Estimate, phase: Phase, where: str | None, name: str, need: int, have: int) -> str:
    """What is needed, what is free, and the largest parts an option can shrink."""
    parts = sorted((p for p in phase.parts if where in (None, p.where) and p.remedy and p.bytes),
                   key=lambda p: -p.bytes)
    listed = "; ".join(f"{p.label} {format_bytes(p.bytes)} (try {p.remedy})" for p in parts[:3])
    return (f"{estimate.run} would need about {format_bytes(need)} of {name} memory at its peak ({phase.name}), but "
            f"only {format_bytes(have)} is available, so it would run out of memory part-way. "
            + (f"Largest parts options can shrink: {listed}. " if listed else "")
            + f"Free memory or change those options, or set {SKIP_ENV}=1 (or pass --no-memory-check) to run anyway; "
            "`moescope inspect PATH` shows the estimate.")
