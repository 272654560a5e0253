"""Benchmark of the streamed matrix-level pass of `moescope weights` against a plain read of the same files.

Builds a synthetic checkpoint with Mixtral's per-layer structure scaled to this machine (default: hidden 1024,
intermediate 3584, 8 experts, 4 layers, bf16), then measures in fresh processes:
  * reference: read every expert tensor once with safetensors (the raw read speed of the files);
  * moescope:  `weights(..., neuron_level=False)` (matrix-level + averaged similarity, gate regression,
               matrix-level PCA) under a memory budget;
and reports throughput, the ratio, and peak anonymous memory (RssAnon, sampled every 5 ms). As root, the page
cache is dropped before every run, so both sides read from disk as they would for a real checkpoint.
Run: python benchmarks/static.py [--hidden 1024 --intermediate 3584 --layers 4 --budget-mb 256 --scale 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    def rss_anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    peak = [0]
    def sample():
        while True:
            peak[0] = max(peak[0], rss_anon()); time.sleep(0.005)
    import torch
    from safetensors import safe_open
    import moescope
    from moescope.checkpoint import Checkpoint
    mode, path, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    base = rss_anon()
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    nbytes = 0
    if mode == "reference":
        ckpt = Checkpoint(path)
        for f in ckpt.files:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    if "experts" in name:
                        t = h.get_tensor(name).clone(); nbytes += t.numel() * t.element_size(); del t  # clone: touch every byte
    else:
        opts = moescope.WeightsOptions(neuron_level=False, memory_budget=budget)
        moescope.weights(path, out=sys.argv[4], options=opts, resume=False, progress=False)
        ckpt = Checkpoint(path)
        nbytes = sum(ckpt.info(n).nbytes for n in ckpt.keys() if "experts" in n)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"seconds": elapsed, "bytes": nbytes, "peak_anon": peak[0] - base}))
""")


def run(mode: str, path: Path, budget: int, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(budget), str(out)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def drop_page_cache() -> bool:
    """Evict the files from the page cache (needs root), so both sides read from disk like a real checkpoint."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def measure(path: Path, budget: int, out: Path, cold: bool) -> tuple[dict, dict]:
    def once(mode: str) -> dict:
        if cold:
            drop_page_cache()
        else:
            run("reference", path, budget, out)  # warm the page cache so both read from memory alike
        return run(mode, path, budget, out)

    ref = min((once("reference") for _ in range(2)), key=lambda r: r["seconds"])
    ours = min((once("moescope") for _ in range(2)), key=lambda r: r["seconds"])
    return ref, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budget-mb", type=int, default=256)
    parser.add_argument("--scale", type=int, default=4, help="also run one layer made this many times larger")
    parser.add_argument("--warm", action="store_true", help="read from the page cache instead of from disk")
    args = parser.parse_args()
    cold = not args.warm and drop_page_cache()
    print(f"reading {'from disk (page cache dropped before each run)' if cold else 'from the page cache'}")
    from moescope.testing import build_checkpoint

    budget = args.budget_mb << 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [("base", args.layers, args.intermediate), (f"{args.scale}x layer", 1, args.intermediate * args.scale)]
        for label, layers, width in cases:
            sizes = {"hidden_size": args.hidden, "intermediate_size": width, "num_hidden_layers": layers,
                     "num_local_experts": args.experts, "num_attention_heads": 8, "num_key_value_heads": 8}
            path = tmp / label.replace(" ", "")
            build_checkpoint("mixtral", path, sizes=sizes, num_shards=max(layers, 1), tokenizer=False)
            ref, ours = measure(path, budget, tmp / "out", cold)
            gb = ref["bytes"] / 1e9
            print(f"{label:>9}: {gb:.2f} GB of experts | raw read {gb / ref['seconds']:.2f} GB/s | "
                  f"moescope matrix-level pass {gb / ours['seconds']:.2f} GB/s | ratio {ref['seconds'] / ours['seconds']:.2f} | "
                  f"peak anon: reference {ref['peak_anon'] / 2**20:.0f} MiB, moescope {ours['peak_anon'] / 2**20:.0f} MiB "
                  f"(budget {args.budget_mb} MiB)")


if __name__ == "__main__":
    main()
