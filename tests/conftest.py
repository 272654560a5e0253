import json
import math

import pytest

from moescope.arch import families
from moescope.testing import build_checkpoint

FAMILY_REFERENCES = [(f.name, ref) for f in families().values() for ref in f.reference_configs]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Build (once per session) a tiny checkpoint: tiny(family, reference=None, **kw) -> BuiltCheckpoint."""
    cache = {}

    def make(family, reference=None, **kw):
        key = (family, reference, repr(sorted(kw.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(family)
            cache[key] = build_checkpoint(family, path, reference=reference, **kw)
        return cache[key]

    return make



@pytest.fixture
def one_torch_thread():
    """One torch thread, as in each of 2 workers on 2 cores (CPU kernels sum in another order with another
    thread count, so exact comparisons between a run and a sharded run need the same count)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SUMMED = ("output_similarity", "output_cosine", "mean_routed_angular_similarity", "reconstruction_error",
          "intermediate_mean_abs", "per_layer", "depth_trend")   # float sums over tokens, and what comes of them


def _same(a, b, close: bool) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        if close:
            return torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-12, equal_nan=True)
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if close and isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12) or (a != a and b != b)
    return json.dumps(a) == json.dumps(b)


def _leaves(data, prefix=""):
    """Dotted key -> value of nested dicts and lists."""
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    if isinstance(data, list):
        return {k: v for i, value in enumerate(data) for k, v in _leaves(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): data}


@pytest.fixture
def assert_same_results():
    """assert_same_results(a, b, summed=SUMMED): two runs' saved values (layers, run-wide tables, summary) all
    bit-identical (tensors bytewise, the rest as JSON), except keys naming one of ``summed``: equal to 1e-12."""

    def check(a, b, summed=SUMMED):
        assert a.layers == b.layers and a.tables == b.tables
        values_a = {**{key: a[key] for key in a.keys()}, **_leaves(a.summary, "summary.")}
        values_b = {**{key: b[key] for key in b.keys()}, **_leaves(b.summary, "summary.")}
        assert sorted(values_a) == sorted(values_b)
        differ = [key for key, value in values_a.items()
                  if not _same(value, values_b[key], any(part in key.split(".") for part in summed))]
        assert differ == []
    return check
