"""Facts about a checkpoint, from config.json and shard headers alone (no tensor data is read)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch

from .arch.adapter import MoEModel


@dataclass
class ModelFacts:
    """What ``moescope inspect`` reports."""

    path: str
    family: str
    family_title: str
    architecture: str | None
    num_layers: int
    moe_layers: list[int]
    dense_layers: list[int]
    num_experts: int
    num_shared_experts: int
    shared_expert_width: int | None
    top_k: int | None
    scoring: str | None
    renormalize: bool | None
    routing_note: str
    hidden_size: int
    expert_width: int | None
    dense_width: int | None
    config_dtype: str | None
    stored_dtypes: dict[str, int]
    total_params: int
    params_per_expert: int
    active_params: int
    num_files: int
    checkpoint_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def logical_params(model: MoEModel) -> tuple[int, Counter]:
    """Parameter count (MXFP4 bytes hold two values; quantisation scales are not parameters) and dtype histogram."""
    ckpt, total, dtypes = model.checkpoint, 0, Counter()
    names = set(ckpt.keys())
    suffix = model.family.fp8_scale_suffix
    for name in names:
        info = ckpt.info(name)
        if name.endswith(suffix) and name[: -len(suffix)] in names:
            continue
        if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in names:
            continue
        packed = name.endswith("_blocks") and name[: -len("_blocks")] + "_scales" in names
        total += info.numel * (2 if packed else 1)
        dtypes["MXFP4" if packed else info.dtype] += info.numel * (2 if packed else 1)
    return total, dtypes


def describe(model: MoEModel) -> ModelFacts:
    """Gather the facts ``inspect`` prints; validates tensor names and shapes from headers first."""
    model.check()
    total, dtypes = logical_params(model)
    routing = model.routing
    E, width, H = model.num_experts, (model.expert_width if model.family.is_moe else None), model.hidden_size
    per_expert = 3 * width * H if width else 0
    if model.family.is_moe and model.family.experts.bias:
        per_expert += 2 * width + H
    inactive = len(model.moe_layers) * (E - routing.top_k) * per_expert if routing else 0
    config = model.config
    return ModelFacts(
        path=str(model.checkpoint.path), family=model.family.name, family_title=model.family.title,
        architecture=(config.get("architectures") or [None])[0], num_layers=model.num_layers,
        moe_layers=model.moe_layers, dense_layers=model.dense_layers, num_experts=E,
        num_shared_experts=model.num_shared_members, shared_expert_width=model.shared_width,
        top_k=routing.top_k if routing else None, scoring=routing.scoring if routing else None,
        renormalize=routing.renormalize if routing else None, routing_note=model.family.routing.note,
        hidden_size=H, expert_width=width, dense_width=model.dense_width if model.dense_layers else None,
        config_dtype=config.get("torch_dtype") or config.get("dtype"), stored_dtypes=dict(dtypes),
        total_params=total, params_per_expert=per_expert, active_params=total - inactive,
        num_files=len(model.checkpoint.files), checkpoint_bytes=model.checkpoint.size_bytes,
    )


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{n:g}{unit}"
        n /= 1000
    return str(n)


def _ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    out, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def format_facts(f: ModelFacts) -> str:
    """Human-readable report of ``ModelFacts``."""
    lines = [
        f"checkpoint   {f.path}",
        f"family       {f.family_title} [{f.family}]  ({f.architecture})",
        f"layers       {f.num_layers}: MoE {_ranges(f.moe_layers)}; dense {_ranges(f.dense_layers)}",
    ]
    if f.num_experts:
        shared = (f"{f.num_shared_experts} shared (width {f.shared_expert_width})" if f.num_shared_experts
                  else "no shared experts")
        lines += [
            f"experts      {f.num_experts} routed, {shared}",
            f"routing      top-{f.top_k}, {f.scoring}, {'renormalised' if f.renormalize else 'not renormalised'}"
            + (f"  ({f.routing_note})" if f.routing_note else ""),
        ]
    lines += [
        f"sizes        hidden {f.hidden_size}" + (f", expert width {f.expert_width}" if f.expert_width else "")
        + (f", dense FFN width {f.dense_width}" if f.dense_width else ""),
        f"dtype        config {f.config_dtype}; stored " + ", ".join(f"{k} {_human(v)}" for k, v in f.stored_dtypes.items()),
        f"parameters   {_human(f.total_params)} total" + (f", {_human(f.active_params)} active per token, "
                                                        f"{_human(f.params_per_expert)} per expert" if f.num_experts else ""),
        f"files        {f.num_files} shard(s), {_human(f.checkpoint_bytes, 'B')}",
    ]
    return "\n".join(lines)


def matching_plan(model: MoEModel, pairs: str = "all", calibrate: bool = True, match: str = "each") -> dict:
    """How many neuron assignments `moescope weights --pairs PAIRS --match MATCH` solves, and a rough time
    estimate (``match`` other than "each" solves one assignment per pair for all three matrices).

    The estimate times one assignment of a structured problem (up to 512 neurons) here and scales it by
    ``(width / n) ** 2.5`` per assignment (scipy's solver on near-permutation similarity matrices).
    """
    if not model.moe_layers:
        return {"pairs": pairs, "assignments": 0, "estimated_seconds": 0.0}
    from .static.run import WeightsOptions, select_pairs  # the same pair choice `weights` makes

    WeightsOptions(pairs=pairs, match=match)  # validates the spec
    members = len(model.member_labels(model.moe_layers[0]))
    per_pair = 3 if match == "each" else 1
    assignments = len(select_pairs(torch.zeros(members, members), pairs)) * per_pair * len(model.moe_layers)
    seconds = None
    if calibrate:
        import time

        from .static.reorder import solve_assignment

        width = model.expert_width
        n = min(width, 512)
        g = torch.Generator().manual_seed(0)
        base = torch.nn.functional.normalize(torch.randn(n, 64, generator=g), dim=1)
        shuffled = base[torch.randperm(n, generator=g)]
        noisy = torch.nn.functional.normalize(shuffled + 0.5 * torch.randn(n, 64, generator=g), dim=1)
        start = time.perf_counter()
        solve_assignment(base @ noisy.T)
        seconds = (time.perf_counter() - start) * (width / n) ** 2.5 * assignments
    return {"pairs": pairs, "assignments": assignments, "estimated_seconds": seconds}


def memory_plan(model: MoEModel, memory_budget: int | None = None, batch_size: int | None = None,
                max_tokens: int | None = None, device: str = "auto", dtype: str = "auto") -> dict:
    """What `moescope weights` needs per MoE layer and `moescope trace` needs (model, per batch, captured states,
    per layer), with these options (None: the defaults), and the memory free here (``moescope.memory``)."""
    from .dynamic.loader import resolve_device
    from .dynamic.run import TraceOptions
    from .memory import CPU, GPU, available_bytes
    from .static.run import WeightsOptions

    weights = WeightsOptions() if memory_budget is None else WeightsOptions(memory_budget=memory_budget)
    trace = TraceOptions(**{k: v for k, v in dict(batch_size=batch_size, max_tokens=max_tokens, device=device,
                                                  dtype=dtype).items() if v is not None})
    gpu = resolve_device(trace.device)
    available = {"cpu_bytes": available_bytes(CPU), "gpu_bytes": available_bytes(GPU, gpu) if gpu != "cpu" else None}
    if not model.moe_layers:
        return {"weights": None, "trace": None, "available": available}
    return {"weights": _weights_memory(model, weights), "trace": _trace_memory(model, trace), "available": available}


def _peaks(estimate) -> dict:
    from .memory import CPU, GPU

    return {"peak_cpu_bytes": estimate.peak(CPU)[0], "peak_gpu_bytes": estimate.peak(GPU)[0]}


def _weights_memory(model: MoEModel, opts) -> dict:
    """``weights``' estimate per MoE layer: matrix level, neuron level and its similarity matrix."""
    from .memory import static_estimate
    from .static.run import compute_device

    estimate = static_estimate(model, opts, device=compute_device())
    return {"memory_budget": opts.memory_budget, "device": compute_device(),
            "matrix_level_bytes": estimate.largest("matrix_level"), "neuron_level_bytes": estimate.largest("neuron"),
            "similarity_bytes": estimate.part("similarity"),
            "widest_pair": sorted(model.member_widths(model.moe_layers[0]))[-2:], **_peaks(estimate)}


def _trace_memory(model: MoEModel, opts) -> dict:
    """``trace``'s estimate for ``opts.max_tokens`` tokens in batches of ``opts.batch_size`` documents of equal
    length (at most the model's context); a run is checked on its real documents."""
    from .dynamic.inputs import context_length
    from .dynamic.loader import resolve_device, resolve_dtype
    from .memory import dynamic_estimate

    device = resolve_device(opts.device)
    tokens = opts.max_tokens or context_length(model)
    length = min(-(-tokens // opts.batch_size), context_length(model))
    lengths = [length] * (tokens // length) + ([tokens % length] if tokens % length else [])
    estimate = dynamic_estimate(model, lengths, opts, device)
    recompute = [p for phase in estimate.phases if phase.key == "recompute" for p in phase.parts]
    return {"device": device, "dtype": str(resolve_dtype(opts.dtype, device)).removeprefix("torch."),
            "batch_size": opts.batch_size, "max_tokens": opts.max_tokens,
            "batch": [min(opts.batch_size, len(lengths)), length], "model_bytes": estimate.part("weights"),
            "loading_bytes": estimate.part("loading_copy") + estimate.part("loading"),
            "batch_bytes": estimate.part("activations") + estimate.part("attention"),
            "captured_bytes": estimate.part("captured"),
            "recompute_per_layer_bytes": sum(p.bytes for p in recompute if p.key != "captured"), **_peaks(estimate)}


def format_memory(plan: dict) -> str:
    """The memory lines of ``moescope inspect`` (from ``memory_plan``)."""
    from .memory import format_bytes as size

    def peak(part: dict) -> str:
        gpu = f" + {size(part['peak_gpu_bytes'])} GPU" if part["peak_gpu_bytes"] else ""
        return f"peak {size(part['peak_cpu_bytes'])} CPU{gpu}"

    lines = []
    w, t = plan["weights"], plan["trace"]
    if w:
        lines += [f"memory       weights per MoE layer (--memory-budget {size(w['memory_budget'])}): {peak(w)}",
                  f"               matrix level {size(w['matrix_level_bytes'])}, neuron level "
                  f"{size(w['neuron_level_bytes'])} (similarity {' x '.join(map(str, w['widest_pair']))}: "
                  f"{size(w['similarity_bytes'])})"]
    if t:
        lines += [f"             trace ({t['dtype']} on {t['device']}, --batch-size {t['batch_size']}, --max-tokens "
                  f"{t['max_tokens']}): {peak(t)}",
                  f"               model {size(t['model_bytes'])} (+{size(t['loading_bytes'])} loading it), per batch "
                  f"{size(t['batch_bytes'])} "
                  f"({t['batch'][0]} x {t['batch'][1]} tokens), captured states {size(t['captured_bytes'])}, "
                  f"recompute per layer {size(t['recompute_per_layer_bytes'])}"]
    free = plan["available"]
    if free["cpu_bytes"] is not None or free["gpu_bytes"] is not None:
        gpu = f", {size(free['gpu_bytes'])} GPU" if free["gpu_bytes"] is not None else ""
        cpu = size(free["cpu_bytes"]) if free["cpu_bytes"] is not None else "unknown"
        lines.append(f"available    {cpu} CPU{gpu} (runs that need more are refused before they start)")
    return "\n".join(lines)
