"""Benchmark moescope.static.assignment.linear_assignment against scipy.optimize.linear_sum_assignment.

Run: python benchmarks/bench_assignment.py [--sizes 1408 2048 4096] [--kinds strong weak uniform] ...

"strong"/"weak" are cosine matrices of two synthetic experts that share a base with permuted neurons plus
noise (noise 0.5 / 3.0 relative to the base), like real expert pairs of upcycled / independently trained MoEs;
"uniform" is i.i.d. U(-1, 1); "ties" is uniform rounded to 9 levels.  Both solvers run on the same matrix in the
same process; totals are checked to agree within 1e-9 relative.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moescope.static.assignment import compiled_available, linear_assignment

NOISE = {"strong": 0.5, "weak": 3.0}


def expert_cosine(n: int, m: int, dim: int, noise: float, seed: int) -> np.ndarray:
    """Cosine matrix (float32) between the neurons of two synthetic experts sharing a permuted base."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(max(n, m), dim, generator=g)
    a = base[:n] + noise * torch.randn(n, dim, generator=g)
    perm = torch.randperm(max(n, m), generator=g)[:m]
    b = base[perm] + noise * torch.randn(m, dim, generator=g)
    a = torch.nn.functional.normalize(a, dim=1)
    b = torch.nn.functional.normalize(b, dim=1)
    return (a @ b.T).numpy()


def make(kind: str, n: int, m: int, dim: int, seed: int) -> np.ndarray:
    """Build one benchmark matrix."""
    if kind in NOISE:
        return expert_cosine(n, m, dim, NOISE[kind], seed)
    rng = np.random.default_rng(seed)
    c = rng.uniform(-1, 1, (n, m)).astype(np.float32)
    if kind == "ties":
        c = np.round(c * 4) / 4
    elif kind != "uniform":
        raise SystemExit(f"unknown kind {kind!r}; use strong, weak, uniform or ties")
    return c


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median wall time of fn() over `repeat` runs, and its last result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the comparisons and print a table; non-zero exit if any total disagrees."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1408, 2048, 4096], help="n of the n x n problems")
    p.add_argument("--rect", type=str, nargs="*", default=["1408x5632"], help="extra rectangular shapes, NxM")
    p.add_argument("--kinds", nargs="+", default=["strong", "weak", "uniform"], help="strong weak uniform ties")
    p.add_argument("--dim", type=int, default=512, help="hidden size of the synthetic experts")
    p.add_argument("--repeat", type=int, default=3, help="runs per solver (median reported)")
    p.add_argument("--scipy-max", type=int, default=16384, help="skip scipy above this n (too slow)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not compiled_available():
        print("warning: numba kernels unavailable; moescope falls back to scipy", file=sys.stderr)
    linear_assignment(np.random.default_rng(0).random((300, 300)), method="sparse")  # load/compile kernels
    shapes = [(n, n) for n in a.sizes] + [tuple(int(x) for x in s.lower().split("x")) for s in a.rect]
    print(f"{'shape':>12} {'kind':>8} {'scipy s':>9} {'moescope s':>11} {'speed-up':>9} {'solver':>17} "
          f"{'rounds':>6} {'agree':>6}")
    bad = 0
    for n, m in shapes:
        for kind in a.kinds:
            c = make(kind, n, m, a.dim, a.seed)
            t_ms, res = timed(lambda c=c: linear_assignment(c), a.repeat)
            if max(n, m) <= a.scipy_max:
                t_sp, (r, col) = timed(lambda c=c: linear_sum_assignment(c, maximize=True), max(1, min(a.repeat, 2)))
                ref = float(c[r, col].sum(dtype=np.float64))
                ok = abs(res.total - ref) <= 1e-9 * max(1.0, abs(ref))
                bad += not ok
                sp, ratio, agree = f"{t_sp:9.3f}", f"{t_sp / t_ms:8.1f}x", "yes" if ok else "NO"
            else:
                sp, ratio, agree = f"{'-':>9}", f"{'-':>9}", "-"
            print(f"{f'{n}x{m}':>12} {kind:>8} {sp} {t_ms:11.3f} {ratio} {res.solver:>17} {res.rounds:>6} "
                  f"{agree:>6}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
