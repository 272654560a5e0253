"""Process pools for ``--workers N``: Ray's (``--ray [ADDRESS]``) or the standard library's (spawn).

``weights`` gives each worker whole layers; ``trace`` gives each worker a shard of the documents. A worker gets
its job as one picklable tuple, opens the checkpoint itself and returns small results.
"""
from __future__ import annotations

import logging
import multiprocessing
from contextlib import contextmanager
from typing import Iterator

import torch

from .errors import OptionsError

LOCAL = "local"   # ``--ray`` without an address: start a local Ray cluster


def check_workers(workers: int, ray: str | None) -> None:
    """``--workers`` is at least 1; ``--ray`` comes with at least 2 of them, and Ray is installed."""
    if workers < 1:
        raise OptionsError(f"--workers must be at least 1, got {workers}")
    if ray is not None:
        if workers < 2:
            raise OptionsError("--ray runs the --workers on a Ray cluster: pass --workers N (N >= 2) with it")
        _import_ray()


def worker_threads(workers: int) -> int:
    """torch threads per worker: this process's threads shared among the workers."""
    return max(1, torch.get_num_threads() // workers)


@contextmanager
def process_pool(workers: int, ray: str | None = None) -> Iterator:
    """A pool of ``workers`` processes (``map`` / ``imap_unordered``). With ``ray``: Ray actors on the cluster
    at that address, or on a local cluster (``"local"``) started here and shut down afterwards; a Ray session
    the caller already started is used as it is. Without: a spawn pool of this machine."""
    if ray is None:
        yield from _finished(multiprocessing.get_context("spawn").Pool(workers))
        return
    ray_module, Pool = _import_ray()
    started = not ray_module.is_initialized()
    if started:
        _init_ray(ray_module, workers, ray)
    try:
        try:
            pool = Pool(processes=workers)
        except ValueError as err:  # the cluster has fewer CPUs than workers
            raise OptionsError(f"--ray: {err}. Pass a smaller --workers.") from None
        yield from _finished(pool)
    finally:
        if started:
            ray_module.shutdown()


def _finished(pool) -> Iterator:
    """Yield ``pool``; then let its workers exit on their own (killing them may leak their locks), or on an
    error terminate them."""
    with pool:
        yield pool
        pool.close()
        pool.join()


def _import_ray():
    try:
        import ray
        from ray.util.multiprocessing import Pool
    except ImportError:
        raise OptionsError("--ray needs Ray installed (pip install 'moescope[ray]'); without it, --workers N "
                           "alone uses a local process pool") from None
    return ray, Pool


def _init_ray(ray_module, workers: int, address: str) -> None:
    """Start a local cluster of ``workers`` CPUs (no dashboard), or connect to the cluster at ``address``."""
    quiet = {"logging_level": logging.WARNING}
    if address == LOCAL:   # a new cluster even where RAY_ADDRESS names another
        ray_module.init(address=LOCAL, num_cpus=workers, include_dashboard=False, **quiet)
        return
    try:
        ray_module.init(address=address, **quiet)
    except ConnectionError as err:
        raise OptionsError(f"--ray {address}: no Ray cluster could be reached there ({err}). Start one with "
                           "`ray start --head`, or pass --ray without an address for a local cluster.") from None
