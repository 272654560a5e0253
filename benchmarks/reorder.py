"""Neuron matching of two experts: the study's loop, batched matmul + scipy, and moescope, in one process.

Synthetic experts (W [I, H], gate-style rows are neurons): expert a = base + noise·N(0,1), expert b = a permuted
copy of the base + noise·N(0,1), with noise 0.5 ("structured, strong"), 3.0 ("structured, weak"), and fully
random experts ("random": a and b independent N(0,1)). Methods:
  (1) study: a Python loop over neurons computing each neuron's cosines to all neurons of b, then scipy;
  (2) batched: one normalised matmul, then scipy.optimize.linear_sum_assignment;
  (3) moescope: moescope.static.reorder_pair (normalised matmul + certified sparse assignment).
Every method's matched total is checked against (2)'s optimum. Times are split into similarity and assignment.
Run: python benchmarks/reorder.py [--neurons 4096 --hidden 1024 --repeat 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moescope.static.assignment import linear_assignment
from moescope.static.reorder import reorder_pair


def experts(kind: str, n: int, h: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    noise = {"strong": 0.5, "weak": 3.0}[kind]
    base = torch.randn(n, h, generator=g)
    a = base + noise * torch.randn(n, h, generator=g)
    b = base[torch.randperm(n, generator=g)] + noise * torch.randn(n, h, generator=g)
    return a, b


def loop_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(1) the study's way: one neuron at a time."""
    return np.stack([((b @ a[i]) / (b.norm(dim=1) * a[i].norm())).numpy() for i in range(len(a))])


def batched_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(2), (3): one normalised matmul."""
    return (torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T).numpy()


def scipy_total(c: np.ndarray) -> float:
    r, col = linear_sum_assignment(c, maximize=True)
    return float(c[r, col].astype(np.float64).sum())


def moescope_total(c: np.ndarray) -> float:
    return linear_assignment(c).total


METHODS = {"study": (loop_cosine, scipy_total), "batched": (batched_cosine, scipy_total),
           "moescope": (batched_cosine, moescope_total)}


def run(method: str, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(similarity seconds, assignment seconds, matched total) of one method."""
    similarity, solve = METHODS[method]
    t0 = time.perf_counter()
    c = similarity(a, b)
    t1 = time.perf_counter()
    total = solve(c)
    return t1 - t0, time.perf_counter() - t1, total


def best(method, a, b, repeat):
    runs = [run(method, a, b) for _ in range(repeat)]
    return min(runs, key=lambda r: r[0] + r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    linear_assignment(np.random.default_rng(0).random((300, 300)))  # load (or compile) the kernels once
    print(f"{args.neurons} neurons x hidden {args.hidden}; seconds as similarity + assignment (best of {args.repeat})")
    for kind in ("strong", "weak", "random"):
        a, b = experts(kind, args.neurons, args.hidden)
        s1 = best("study", a, b, 1)
        s2 = best("batched", a, b, args.repeat)
        s3 = best("moescope", a, b, args.repeat)
        t = time.perf_counter()
        pair = reorder_pair(a, b, "gate")
        whole = time.perf_counter() - t
        # moescope solves the same float32 matrix as (2): equal optimum; the loop rounds its cosines differently
        for name, s, tol in (("study", s1, 1e-6), ("moescope", s3, 1e-9)):
            assert abs(s[2] - s2[2]) <= tol * abs(s2[2]), f"{name} total {s[2]} differs from the optimum {s2[2]}"
        tot = [s[0] + s[1] for s in (s1, s2, s3)]
        print(f"{kind:>7}: study {s1[0]:.2f}+{s1[1]:.2f} | batched+scipy {s2[0]:.2f}+{s2[1]:.2f} | "
              f"moescope {s3[0]:.2f}+{s3[1]:.2f} (reorder_pair {whole:.2f}, {pair.solver}) | "
              f"speed-up vs batched {tot[1] / tot[2]:.1f}x, vs study {tot[0] / tot[2]:.1f}x")


if __name__ == "__main__":
    main()
