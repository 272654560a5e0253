"""One real-size Mixtral layer through `moescope weights` (all three matrices, all 28 expert pairs = 84
assignments, plus the matrix-level pass), timed, and extrapolated to the 32 layers of Mixtral-8x7B.

Meant for a GPU machine (the similarity matmuls run on the GPU, the certified assignments on the CPU cores);
runs on CPU too. Run: bash benchmarks/gpu_reorder.sh  (or python benchmarks/gpu_reorder.py --hidden 1024 ...)
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import moescope
from moescope.static.run import WeightsOptions
from moescope.testing import build_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--model-layers", type=int, default=32, help="layers to extrapolate to")
    parser.add_argument("--budgets", default="16", help="memory budgets to try, in GiB, comma-separated (a larger "
                        "budget lets more pairs be matched at once)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer"
        t = time.perf_counter()
        build_checkpoint("mixtral", path, tokenizer=False, num_shards=4, sizes={
            "hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": 1,
            "num_local_experts": args.experts, "num_attention_heads": 32, "num_key_value_heads": 8})
        print(f"built one layer ({args.experts} x {args.intermediate} x {args.hidden}) in {time.perf_counter() - t:.0f} s")
        t = time.perf_counter()
        moescope.weights(path, out=Path(tmp) / "matrix", options=WeightsOptions(neuron_level=False), progress=False)
        matrix_seconds = time.perf_counter() - t
        runs = {}
        for gib in [float(b) for b in args.budgets.split(",")]:
            opts = WeightsOptions(memory_budget=int(gib * 2**30))
            t = time.perf_counter()
            results = moescope.weights(path, out=Path(tmp) / f"out{gib}", options=opts, progress=True)
            runs[gib] = time.perf_counter() - t
    pairs = len(results["layer0.gate.permutations"])
    found = [v for m in ("gate", "up", "down") for v in results[f"layer0.{m}.assignment"].values()]
    solvers = sorted({v["solver"] for v in found})
    certified = sum(v["certified"] for v in found)
    print(f"device: {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"one layer, matrix level only: {matrix_seconds:.1f} s")
    for gib, seconds in runs.items():
        print(f"one layer, everything, budget {gib:g} GiB ({3 * pairs} assignments, {', '.join(solvers)}, "
              f"{certified} certified): {seconds:.1f} s; extrapolated to {args.model_layers} layers: "
              f"{seconds * args.model_layers / 60:.1f} min")

if __name__ == "__main__":
    main()
