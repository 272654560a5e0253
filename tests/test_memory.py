"""Memory: the estimates of `moescope.memory` against definitions and measurements, the early refusal of runs
that do not fit, and the static pass's anonymous memory bound on checkpoints of over 1 GB."""
import json
import math
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping

import pytest
import torch
from safetensors import safe_open

import moescope.memory as memory
from moescope.arch import get_family, open_model
from moescope.arch.spec import MATRICES
from moescope.cli import main
from moescope.dynamic.forward import forward_pass
from moescope.dynamic.inputs import Document
from moescope.dynamic.loader import load_model
from moescope.dynamic.run import TraceOptions
from moescope.errors import InsufficientMemoryError
from moescope.static.run import WeightsOptions
from moescope.static.similarity import cosine_matrix
from moescope.static.stream import pass_memory
from moescope.testing import tiny_config
from moescope.writer import write_checkpoint


# -- estimates against definitions and measurements -------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_similarity_matrix_is_the_widest_pair_in_the_chosen_dtype(tiny, dtype):
    model = open_model(tiny("qwen2_moe").path)  # a wide shared expert: the widest pair is rectangular
    layer, H = model.moe_layers[0], model.hidden_size
    n_a, n_b = sorted(model.member_widths(layer))[-2:]
    assert n_a != n_b
    estimate = memory.static_estimate(model, WeightsOptions(dtype=dtype))
    a, b = torch.randn(n_a, H), torch.randn(n_b, H)
    computed = cosine_matrix(a, b, dtype=getattr(torch, dtype))
    assert estimate.part("similarity") == n_a * n_b * torch.finfo(getattr(torch, dtype)).bits // 8
    assert estimate.part("similarity") == computed.numel() * computed.element_size()


def test_members_held_follow_the_cache_rule(tiny):
    model = open_model(tiny("mixtral").path)
    member = model.expert_width * model.hidden_size * 4  # float32
    E = model.num_experts
    for budget, held in ((1, 3 * member), (4 * member, 5 * member), (1 << 40, E * member)):
        # at least two members plus the one being loaded; the budget plus that one; never more than all of them
        assert memory.static_estimate(model, WeightsOptions(memory_budget=budget)).part("members") == held


def test_one_matching_per_pair_counts_its_members_and_running_sum(tiny):
    model = open_model(tiny("mixtral").path)
    member = model.expert_width * model.hidden_size * 4
    E, budget = model.num_experts, 4 * model.expert_width * model.hidden_size * 4
    each = memory.static_estimate(model, WeightsOptions(memory_budget=budget))
    concat = memory.static_estimate(model, WeightsOptions(memory_budget=budget, match="concat"))
    gate = memory.static_estimate(model, WeightsOptions(memory_budget=budget, match="gate"))
    # SharedMatcher: one MemberCache per matched matrix, budget // matrices each (at least 2 members + 1 loading)
    assert concat.part("shared_members") == 3 * min(E * member, max(budget // 3, 2 * member) + member)
    assert gate.part("shared_members") == min(E * member, max(budget, 2 * member) + member)
    assert concat.part("score") == concat.part("similarity") and gate.part("score") == 0
    assert each.part("shared_members") == 0 and concat.peak()[0] > each.peak()[0]


def test_matrix_level_chunks_stay_within_the_budget_whatever_the_layer():
    budget = 64 << 20
    sizes = {rows: pass_memory(8, rows, 4096, budget) for rows in (3584, 14336, 57344)}  # Mixtral width, up to 4x
    assert all(size <= budget for size in sizes.values())
    assert sizes[57344] - sizes[3584] == 8 * (57344 - 3584) * 8  # only the per-neuron averages grow with the layer
    assert pass_memory(8, 64, 32, budget) < 2 * 16 * 8 * 64 * 32  # a layer below the budget: all of it, at most


def test_parallel_workers_and_a_gpu_place_the_parts_where_the_code_puts_them(tiny):
    model = open_model(tiny("mixtral").path)
    opts = WeightsOptions(memory_budget=1 << 20)
    one = memory.static_estimate(model, opts)
    assert memory.static_estimate(model, opts, workers=3).peak(memory.CPU)[0] == 3 * one.peak(memory.CPU)[0]
    shard = memory.dynamic_estimate(model, [64] * 4, TraceOptions(), "cpu")   # trace --workers 2: each loads the
    assert memory.dynamic_estimate(model, [64] * 4, TraceOptions(), "cpu", workers=2).peak(memory.CPU)[0] == \
        2 * shard.peak(memory.CPU)[0]                                         # model and traces its shard
    gpu = memory.static_estimate(model, opts, device="cuda")
    similarity = one.part("similarity")
    matching = next(p for p in gpu.phases if p.key == "neuron_assignment")
    assert matching.total(memory.GPU) == one.part("members") + similarity  # members and C on the GPU
    assert matching.total(memory.CPU) == similarity + one.part("solver")   # the solver works on a CPU copy of C
    trace = memory.dynamic_estimate(model, [64] * 4, TraceOptions(), "cuda")
    weights = memory.weight_bytes(model, torch.bfloat16)                 # auto: bfloat16 on a GPU
    load = next(p for p in trace.phases if p.key == "load")
    assert load.total(memory.GPU) == weights                               # loaded on the CPU, then moved
    assert load.total(memory.CPU) == weights + trace.part("loading")       # (stored in bfloat16: no conversion)
    assert trace.part("loading_copy") == 0


def _header_elements(path) -> int:
    total = 0
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def test_model_weights_are_the_header_sizes_converted_and_what_transformers_loads(tiny):
    built = tiny("mixtral")
    model = open_model(built.path)
    elements = _header_elements(built.path)
    assert memory.weight_bytes(model, torch.bfloat16) == 2 * elements
    assert memory.weight_bytes(model, torch.float32) == 4 * elements
    net = load_model(model, "cpu", torch.float32)
    assert memory.weight_bytes(model, torch.float32) == sum(p.numel() * p.element_size() for p in net.parameters())
    estimate = memory.dynamic_estimate(model, [8], TraceOptions(dtype="float32"), "cpu")
    assert estimate.part("loading_copy") == 4 * elements  # every bf16 tensor converted to float32 on loading


def test_captured_states_and_recompute_outputs_match_a_forward_pass(tiny):
    built = tiny("mixtral")
    model = open_model(built.path)
    lengths = [7, 5, 9]
    opts = TraceOptions(batch_size=2, dtype="float32", device="cpu")
    estimate = memory.dynamic_estimate(model, lengths, opts, "cpu")
    documents = [Document("", tuple(range(1, n + 1))) for n in lengths]
    net = load_model(model, "cpu", torch.float32)
    traces = forward_pass(net, model.family.execution, model.moe_layers, documents, batch_size=2, progress=False)
    captured = sum(t.nbytes for trace in traces.values() for t in (trace.inputs, trace.output, *trace.router.values()))
    assert estimate.part("captured") == captured
    assert memory.batch_shapes(lengths, 2) == [(2, 7), (1, 9)]  # right-padded batches of consecutive documents
    assert estimate.part("captured_batches") == captured // sum(lengths) * (2 * 7 + 1 * 9)
    members = len(model.member_labels(model.moe_layers[0]))
    assert estimate.part("outputs") == members * sum(lengths) * model.hidden_size * 4
    assert estimate.part("weights") == memory.weight_bytes(model, torch.float32)


def test_inspect_prints_the_estimate(tiny, capsys):
    path = str(tiny("mixtral").path)
    assert main(["inspect", path, "--memory-budget", "1M", "--batch-size", "2", "--max-tokens", "64",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "weights per MoE layer (--memory-budget 1 MiB)" in out and "neuron level" in out
    assert "trace (float32 on cpu, --batch-size 2, --max-tokens 64)" in out and "per batch" in out
    assert main(["inspect", path, "--json", "--device", "cpu"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory"]
    model = open_model(path)
    assert plan["trace"]["model_bytes"] == memory.weight_bytes(model, torch.float32)
    assert plan["trace"]["batch"] == [8, 256]  # 2048 tokens in 8 documents of equal length
    assert plan["weights"]["similarity_bytes"] == model.expert_width ** 2 * 8
    assert plan["available"]["cpu_bytes"] > 0


# -- early refusal ---------------------------------------------------------------------------------------------

@pytest.fixture
def little_memory(monkeypatch):
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    monkeypatch.setattr(memory, "available_bytes", lambda where, device="cuda": 100)


def test_weights_is_refused_before_the_first_layer(tiny, tmp_path, monkeypatch, little_memory):
    import moescope.static.run as run

    analysed = []
    monkeypatch.setattr(run, "analyse_layer", lambda *a, **k: analysed.append(a))
    monkeypatch.setattr(run, "compute_device", lambda: "cpu")
    with pytest.raises(InsufficientMemoryError, match=r"(?s)moescope weights would need about .* CPU memory.*"
                                                      r"only 100 B is available.*--memory-budget.*"
                                                      r"MOESCOPE_SKIP_MEMORY_CHECK=1"):
        run.weights(tiny("mixtral").path, out=tmp_path / "w", progress=False)
    assert not analysed and not (tmp_path / "w").exists()


def test_trace_is_refused_before_the_model_is_loaded(tiny, tmp_path, monkeypatch, little_memory):
    import moescope.dynamic.run as run

    loaded = []
    monkeypatch.setattr(run, "load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(InsufficientMemoryError, match=r"(?s)moescope trace would need.*only 100 B.*--dtype bfloat16"):
        run.trace(tiny("mixtral").path, ["some text to trace"], out=tmp_path / "t", progress=False,
                  options=TraceOptions(device="cpu"))
    assert not loaded and not (tmp_path / "t").exists()


def test_cli_refusal_exit_code_and_the_ways_to_run_anyway(tiny, tmp_path, capsys, monkeypatch, little_memory):
    path = str(tiny("mixtral").path)
    assert main(["weights", path, "--out", str(tmp_path / "w")]) == 2
    assert "only 100 B is available" in capsys.readouterr().err
    assert main(["trace", path, "--prompt", "hello there", "--device", "cpu", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moescope: error: moescope trace would need") and "Traceback" not in err
    estimate = memory.static_estimate(open_model(path), WeightsOptions())
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    memory.check_fits(estimate)  # skipped
    monkeypatch.delenv(memory.SKIP_ENV)
    with pytest.raises(InsufficientMemoryError):
        memory.check_fits(estimate)
    assert main(["weights", path, "--no-neuron-level", "--no-memory-check", "--out", str(tmp_path / "w")]) == 0


def test_a_gpu_too_small_is_named(tiny, monkeypatch):
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    monkeypatch.setattr(memory, "available_bytes",
                        lambda where, device="cuda": 1000 if where == memory.GPU else 1 << 50)
    model = open_model(tiny("mixtral").path)
    memory.check_fits(memory.dynamic_estimate(model, [64] * 4, TraceOptions(), "cpu"), "cpu")  # fits on the CPU
    with pytest.raises(InsufficientMemoryError, match=r"(?s)of GPU memory.*a smaller --batch-size.*--device map"):
        memory.check_fits(memory.dynamic_estimate(model, [64] * 4, TraceOptions(), "cuda"), "cuda")


def test_available_cpu_memory_is_known_here_and_a_container_limit_caps_it(tmp_path, monkeypatch):
    free = memory.available_bytes(memory.CPU)
    assert free is not None and 0 < free <= 1 << 50
    limit, usage, stat = (tmp_path / name for name in ("memory.max", "memory.current", "memory.stat"))
    usage.write_text(f"{6 << 30}\n")
    stat.write_text(f"anon {4 << 30}\ninactive_file {1 << 30}\nactive_file {1 << 30}\n")
    monkeypatch.setattr(memory, "_CGROUPS", ((str(limit), str(usage), str(stat), "inactive_file"),))
    limit.write_text("max\n")
    assert memory._cgroup_room() is None
    limit.write_text(f"{8 << 30}\n")
    assert memory._cgroup_room() == 3 << 30  # the limit minus what is used, inactive file pages counted as free
    assert memory.available_bytes(memory.CPU) <= 3 << 30


# -- the static pass's anonymous memory on checkpoints of over 1 GB --------------------------------------------------

class _PooledTensors(Mapping):
    """name -> a bf16 tensor of its shape, copied from one random pool at a random offset when asked for (fast:
    no per-tensor random generation, and only one shard's tensors exist at a time while it is written)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], pool: torch.Tensor, slack: int):
        self.shapes, self.pool, self.slack = shapes, pool, slack
        self.gen = torch.Generator().manual_seed(1)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        start = int(torch.randint(0, self.slack, (1,), generator=self.gen))
        return self.pool[start:start + math.prod(shape)].view(shape).clone()

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _mixtral_experts_checkpoint(path, hidden: int, width: int, layers: int, experts: int = 8) -> int:
    """A Mixtral-layout checkpoint of what the static pass reads (router and experts, bf16, a shard per layer);
    returns its expert bytes."""
    family = get_family("mixtral")
    config = tiny_config("mixtral", sizes={"hidden_size": hidden, "intermediate_size": width,
                                           "num_hidden_layers": layers, "num_local_experts": experts})
    shapes = {}
    for layer in range(layers):
        shapes[family.router.name.format(layer=layer)] = (experts, hidden)
        for expert in range(experts):
            for m in MATRICES:
                name = family.experts.source(m).name.format(layer=layer, expert=expert)
                shapes[name] = (hidden, width) if m == "down" else (width, hidden)
    slack = 1 << 20
    pool = (torch.randn(width * hidden + slack, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    write_checkpoint(path, config, _PooledTensors(shapes, pool, slack), num_shards=layers)
    return layers * experts * 3 * width * hidden * 2


STATIC_PASS_CHILD = textwrap.dedent("""
    import json, sys
    import moescope
    from moescope.static.stream import warm_up
    from moescope.testing.memtrack import PeakRssAnon

    path, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    warm_up()  # load the compiled kernels (a one-time cost per process, like the imports)
    options = moescope.WeightsOptions(neuron_level=False, memory_budget=budget)
    with PeakRssAnon() as peak:
        moescope.weights(path, out=out, options=options, resume=False, progress=False)
    print(json.dumps({"growth": peak.growth}))
""")

BUDGET = 64 << 20
ALLOWANCE = 32 << 20  # first-use costs: stacks and malloc arenas of the pass's threads (one per core), results


def _start_static_pass(path, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STATIC_PASS_CHILD, str(path), str(out), str(BUDGET)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _growth(child: subprocess.Popen) -> int:
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])["growth"]


def test_static_pass_anonymous_memory_is_bounded_on_checkpoints_over_1_gb(tmp_path):
    """Peak RssAnon (not VmHWM, which counts the mapped file pages) of the matrix-level pass over 1.2 GB in 7
    layers, and over 1.4 GB in 2 layers each 4x larger: within the budget plus a small allowance, and no larger
    for the larger layers. The two passes run at once, each in its own process."""
    cases = {"7 layers": (3584, 7), "2 layers 4x larger": (4 * 3584, 2)}
    start = time.perf_counter()
    try:
        for name, (width, layers) in cases.items():
            expert_bytes = _mixtral_experts_checkpoint(tmp_path / name, hidden=1024, width=width, layers=layers)
            assert expert_bytes >= 1e9
        built = time.perf_counter()
        children = {name: _start_static_pass(tmp_path / name, tmp_path / f"{name} out") for name in cases}
        growth = {name: _growth(child) for name, child in children.items()}
    finally:
        for name in cases:
            shutil.rmtree(tmp_path / name, ignore_errors=True)
            shutil.rmtree(tmp_path / f"{name} out", ignore_errors=True)
    report = {k: f"{v / 2**20:.1f} MiB" for k, v in growth.items()}
    print(f"peak RssAnon growth {report}; build {built - start:.1f} s, passes {time.perf_counter() - built:.1f} s")
    for name, grown in growth.items():
        assert grown <= BUDGET + ALLOWANCE, f"{name}: the pass grew anonymous memory by {grown / 2**20:.0f} MiB"
    small, large = growth.values()
    assert large <= small + (16 << 20), f"anonymous memory grew with the layer size: {report}"
