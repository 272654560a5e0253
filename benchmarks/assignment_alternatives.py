"""Measure alternative linear-assignment solvers against moescope's engine and scipy (maximisation).

Solvers, all on the same float32 matrix in one process:
  scipy      scipy.optimize.linear_sum_assignment, dense exact; its total is the reference optimum.
  moescope   moescope.static.assignment.linear_assignment, sparse candidates + dense dual certificate (exact).
  lapjv      lap.lapjv on the dense cost -C (float64), exact; rectangular via extend_cost=True.
  lapmod-k   lap.lapmod on a sparse graph of the top-k columns of every row (cost max(C) - C); the time
             includes building the graph and checking it has a perfect matching.  If it has none, the
             diagonal edges are added (note "+diag").  Not certified: it is exact only if the optimum
             happens to lie in the graph.
  auction    forward auction with epsilon-scaling in torch (float64, Jacobi bidding), on CUDA when available,
             else CPU; eps-optimal only (total >= optimum - n * eps_final).  The time includes the copy to
             the device.
lapmod and the auction are run on square problems only (lapmod has no extend_cost; padding with zero
rows gives the auction long bidding wars between the tied dummy rows).
For every case and solver: best-of-N wall time, speed relative to scipy and to moescope (>1 = faster), the
total, the relative gap to scipy's total, (scipy - total) / |scipy|, and exact = gap <= 1e-9.
Matrices are the strong / weak / uniform kinds of bench_assignment.py.

Run: python benchmarks/assignment_alternatives.py [--sizes 1024 2048 4096] [--rect 1024x1408] [--repeat 3]
     (needs the bench extra: pip install -e .[bench])

Figures (2 vCPU AMD EPYC Zen 4, CPU only, torch 2.13, lap 0.5.13; best s, scipy / moescope / lapjv /
lapmod-16 / lapmod-32 / auction; every solver exact unless a gap is given):
  1024  strong   0.012 / 0.004 / 0.002 / 0.012 / 0.012 / 0.084
        weak     0.046 / 0.008 / 0.048 / 0.015 / 0.016 / 0.349   lapmod gaps 7.6e-5 (k=16), 4.2e-6 (k=32)
        uniform  0.052 / 0.007 / 0.023 / 0.015 / 0.016 / 0.472
  2048  strong   0.045 / 0.012 / 0.013 / 0.050 / 0.051 / 0.300
        weak     0.257 / 0.017 / 0.269 / 0.058 / 0.062 / 0.837   lapmod-16 gap 7.5e-5
        uniform  0.382 / 0.020 / 0.074 / 0.054 / 0.056 / 1.014
  1024x1408 (scipy / moescope / lapjv): strong 0.007 / 0.004 / 0.080, weak 0.018 / 0.005 / 0.167,
        uniform 0.019 / 0.005 / 0.133
With --sizes 4096 (best s, scipy / moescope / lapjv / lapmod-16 / lapmod-32 / auction):
  strong   0.176 / 0.035 / 0.055 / 0.201 / 0.202 / 1.16   all exact
  weak     1.233 / 0.056 / 1.090 / 0.224 / 0.235 / 3.11   lapmod-16 gap 4.5e-05, others exact
  uniform  1.934 / 0.053 / 0.371 / 0.211 / 0.218 / 3.81   all exact
Conclusions: moescope is exact (certified) and the fastest on every weak, uniform and rectangular case (1.9-37x
scipy).  lapjv is exact and beats moescope only on strong 1024 (2.5x); it is as slow as scipy on weak matrices
and 20-33x slower than moescope on 1024x1408 (extend_cost pads to square).  lapmod's time is mostly selecting
the top-k of the dense matrix; it is not certified and misses the optimum on weak matrices with k=16 (gap
~5e-5) and at 1024 with k=32 (4e-6).  The CPU auction reached the optimum here (eps_final = 1e-7 * spread) but
is 20-70x slower than moescope.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lap
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from moescope.static.assignment import linear_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_assignment import make

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def from_pairs(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Column of each of the n rows from matched (row, col) pairs."""
    col = np.full(n, -1, np.int64)
    col[rows] = cols
    return col


def solve_scipy(c: np.ndarray) -> tuple[np.ndarray, str]:
    """scipy's dense exact solver."""
    r, k = linear_sum_assignment(c, maximize=True)
    return from_pairs(c.shape[0], r, k), ""


def solve_moescope(c: np.ndarray) -> tuple[np.ndarray, str]:
    """moescope's engine; the note gives its solver and whether it was certified."""
    res = linear_assignment(c, maximize=True)
    return from_pairs(c.shape[0], res.row_ind, res.col_ind), res.solver + (" certified" if res.certified else "")


def solve_lapjv(c: np.ndarray) -> tuple[np.ndarray, str]:
    """lap.lapjv on the dense cost -C."""
    _, x, _ = lap.lapjv(-c.astype(np.float64), extend_cost=c.shape[0] != c.shape[1])
    return x.astype(np.int64), ""


def topk_graph(c: np.ndarray, k: int) -> tuple[np.ndarray, str]:
    """Sorted columns of every row's graph (top-k, plus the diagonal if top-k has no perfect matching)."""
    n = c.shape[0]
    cols = np.sort(np.argpartition(-c, k - 1, axis=1)[:, :k], axis=1)
    data = np.ones(cols.size, np.int8)
    graph = csr_matrix((data, cols.ravel(), np.arange(0, cols.size + 1, k)), shape=(n, n))
    if (maximum_bipartite_matching(graph, perm_type="column") >= 0).all():
        return cols, ""
    return np.sort(np.hstack([cols, np.arange(n)[:, None]]), axis=1), "top-k infeasible: +diag"


def solve_lapmod(c: np.ndarray, k: int) -> tuple[np.ndarray, str]:
    """lap.lapmod on the top-k graph of the square matrix c, costs max(C) - C >= 0."""
    n = c.shape[0]
    cols, note = topk_graph(c, k)
    keep = np.ones(cols.shape, bool)
    keep[:, 1:] = cols[:, 1:] != cols[:, :-1]  # the diagonal may repeat a top-k column
    per_row = keep.sum(1)
    rows = np.repeat(np.arange(n), per_row)
    kk = cols[keep].astype(np.int32)
    ii = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    _, x, _ = lap.lapmod(n, (float(c.max()) - c[rows, kk]).astype(np.float64), ii, kk)
    return x.astype(np.int64), note


def auction(c: torch.Tensor, eps_final: float, factor: float = 5.0, max_iter: int = 100_000) -> torch.Tensor | None:
    """Column of each row of the square benefit matrix c by forward auction; None past max_iter bidding rounds.

    Epsilon-scaling: eps starts at max|c| / 4 and is divided by `factor` per phase down to eps_final; the last
    phase's assignment is within n * eps_final of the optimum.
    """
    n, dev = c.shape[0], c.device
    prices = torch.zeros(n, dtype=c.dtype, device=dev)
    eps = max(c.abs().max().item() / 4, eps_final)
    rounds = 0
    while True:  # one epsilon phase: everyone unassigned, prices kept from the previous phase
        owner = torch.full((n,), -1, dtype=torch.long, device=dev)  # object -> person
        col = torch.full((n,), -1, dtype=torch.long, device=dev)  # person -> object
        free = torch.arange(n, device=dev)
        while free.numel():
            rounds += 1
            if rounds > max_iter:
                return None
            # Jacobi bidding: every free person bids for its best object, raising its price by
            # (best value - second-best value) + eps.
            top = (c[free] - prices).topk(2, dim=1)
            obj = top.indices[:, 0]
            bid = prices[obj] + (top.values[:, 0] - top.values[:, 1]) + eps
            # Each object goes to its highest bidder (any one of tied bids); its old owner becomes free.
            best = torch.full((n,), -torch.inf, dtype=c.dtype, device=dev).scatter_reduce_(0, obj, bid, "amax")
            won = bid == best[obj]
            winner = torch.full((n,), -1, dtype=torch.long, device=dev).scatter_(0, obj[won], free[won])
            objs = (winner >= 0).nonzero().squeeze(1)
            prev = owner[objs]
            col[prev[prev >= 0]] = -1
            owner[objs] = winner[objs]
            col[winner[objs]] = objs
            prices[objs] = best[objs]
            free = (col < 0).nonzero().squeeze(1)
        if eps <= eps_final:
            return col
        eps = max(eps / factor, eps_final)


def solve_auction(c: np.ndarray, rel_eps: float, max_iter: int) -> tuple[np.ndarray | None, str]:
    """Auction on the square matrix c with eps_final = rel_eps * (max C - min C)."""
    t = torch.from_numpy(c).to(DEVICE, torch.float64)
    col = auction(t, rel_eps * (t.max() - t.min()).item(), max_iter=max_iter)
    if col is None:
        return None, f"capped at {max_iter} rounds"
    return col.cpu().numpy(), DEVICE


def best_of(fn, repeat: int) -> tuple[float, np.ndarray | None, str]:
    """Best wall time of fn() over `repeat` runs, with the last run's (columns, note)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        col, note = fn()
        best = min(best, time.perf_counter() - t)
    return best, col, note


def total_of(c: np.ndarray, col: np.ndarray) -> float | None:
    """float64 total of a one-to-one assignment of every row; None when col is not one."""
    n, m = c.shape
    if col.shape != (n,) or col.min() < 0 or col.max() >= m or len(np.unique(col)) != n:
        return None
    return float(c[np.arange(n), col].sum(dtype=np.float64))


def case_rows(head: str, c: np.ndarray, fns: dict, repeat: int) -> list[str]:
    """Time every solver on c and format one table row each (scipy first: it is the reference)."""
    runs = {name: fn if isinstance(fn, str) else best_of(lambda fn=fn: fn(c), repeat) for name, fn in fns.items()}
    t_ref, ref = runs["scipy"][0], total_of(c, runs["scipy"][1])
    t_moe = runs["moescope"][0]
    rows = []
    for name, run in runs.items():
        line = f"{head} {name:>10}"
        if isinstance(run, str):
            rows.append(f"{line} {'-':>8} {'-':>9} {'-':>7} {'-':>14} {'-':>9} {'-':>5}  {run}")
            continue
        t, col, note = run
        total = None if col is None else total_of(c, col)
        line += f" {t:8.3f} {t_ref / t:8.1f}x {t_moe / t:6.1f}x"
        if total is None:
            rows.append(f"{line} {'-':>14} {'-':>9} {'-':>5}  {note or 'not a one-to-one assignment of every row'}")
            continue
        gap = (ref - total) / abs(ref)
        rows.append(f"{line} {total:14.6f} {gap:9.1e} {'yes' if gap <= 1e-9 else 'NO':>5}  {note}")
    return rows


def solvers(a: argparse.Namespace, n: int, m: int) -> dict:
    """name -> callable(c) for an n x m problem; a string instead of a callable is a skip note."""
    out = {"scipy": solve_scipy, "moescope": solve_moescope, "lapjv": solve_lapjv}
    for k in a.lapmod_k:
        out[f"lapmod-{k}"] = (lambda c, k=k: solve_lapmod(c, k)) if n == m else "skipped: square only"
    out["auction"] = (lambda c: solve_auction(c, a.auction_eps, a.auction_iters)) if n == m <= a.auction_max \
        else "skipped: " + ("square only" if n != m else f"n > --auction-max {a.auction_max}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every solver on every case and print one row per case and solver."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="n of the n x n problems")
    p.add_argument("--rect", nargs="*", default=["1024x1408"], help="rectangular shapes NxM, N <= M")
    p.add_argument("--kinds", nargs="+", default=["strong", "weak", "uniform"])
    p.add_argument("--dim", type=int, default=512, help="hidden size of the synthetic experts")
    p.add_argument("--repeat", type=int, default=3, help="runs per solver (best reported)")
    p.add_argument("--lapmod-k", type=int, nargs="+", default=[16, 32], help="top-k candidates per row")
    p.add_argument("--auction-eps", type=float, default=1e-7, help="final epsilon relative to max C - min C")
    p.add_argument("--auction-iters", type=int, default=100_000, help="bidding-round cap of one auction")
    p.add_argument("--auction-max", type=int, default=4096, help="skip the auction above this size")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    warm = np.random.default_rng(0).random((600, 600)).astype(np.float32)
    linear_assignment(warm, maximize=True)  # load/compile moescope's numba kernels
    solve_auction(warm, a.auction_eps, a.auction_iters)  # warm up torch (and CUDA)
    shapes = [(n, n) for n in a.sizes] + [tuple(int(x) for x in s.lower().split("x")) for s in a.rect]
    print(f"{'shape':>10} {'kind':>8} {'solver':>10} {'best s':>8} {'vs scipy':>9} {'vs moe':>7} "
          f"{'total':>14} {'rel gap':>9} {'exact':>5}  note")
    for n, m in shapes:
        for kind in a.kinds:
            c = make(kind, n, m, a.dim, a.seed)
            for line in case_rows(f"{f'{n}x{m}':>10} {kind:>8}", c, solvers(a, n, m), a.repeat):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
