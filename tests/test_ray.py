"""Ray: ``weights`` and ``trace`` on a local Ray cluster of 2 CPUs give the single-process results.

Skipped without Ray, except where MOESCOPE_REQUIRE_RAY=1 (CI, which installs the test extra): there it fails.
"""
import logging
import os
import shutil

import pytest
import torch

import moescope
from moescope.dynamic.inputs import CHAT_PROMPT, SHORT_PROMPT

try:
    import ray
except ImportError:
    if os.environ.get("MOESCOPE_REQUIRE_RAY") == "1":
        pytest.fail("MOESCOPE_REQUIRE_RAY=1 but Ray is not installed (pip install -e '.[test]')", pytrace=False)
    pytest.skip("Ray is not installed (pip install 'moescope[ray]')", allow_module_level=True)

TEXTS = [SHORT_PROMPT, CHAT_PROMPT, "Experts are small networks; the router picks two of them for every token."]


@pytest.fixture(scope="module")
def local_ray():
    """One quiet local Ray cluster of 2 CPUs for the module; moescope uses it as it finds it. One torch thread
    here, as in each of the 2 workers: CPU kernels sum in another order with another thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")      # a throwaway cluster: no token file, no warning about it
        env.setenv("RAY_worker_niceness", "0")       # Ray's default 15 slows workers on a machine shared with others
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            yield
        finally:
            ray.shutdown()
            torch.set_num_threads(threads)


def test_weights_on_ray_equal_one_process(local_ray, tiny, tmp_path, assert_same_results):
    built = tiny("olmoe", sizes={"num_hidden_layers": 2})
    opts = moescope.WeightsOptions(matrices=("gate", "down"), pairs="sample:4")
    one = moescope.weights(built.path, out=tmp_path / "one", options=opts, progress=False)
    two = moescope.weights(built.path, out=tmp_path / "ray", options=opts, progress=False, workers=2, ray="local")
    assert one.layers == [0, 1]
    assert_same_results(one, two, summed=())


def test_trace_resumed_with_shards_on_ray_equals_one_process(local_ray, tiny, tmp_path, assert_same_results):
    """Layer 1 left to do: 2 Ray workers trace a shard each (every layer captured for the cross-layer
    statistics), and the merged layer equals the single-process one; test_trace_cli checks every layer."""
    path = tiny("mixtral").path
    opts = moescope.TraceOptions(device="cpu", dtype="float32", batch_size=1, bootstrap=50, similarity_tokens=180,
                                 intermediate_tokens=180)   # the kept first tokens reach into the second shard
    one = moescope.trace(path, TEXTS, out=tmp_path / "one", options=opts, progress=False)
    shutil.copytree(tmp_path / "one", tmp_path / "ray")
    (tmp_path / "ray" / "layers" / "layer001.json").unlink()   # as if interrupted before layer 1 was written
    two = moescope.trace(path, TEXTS, out=tmp_path / "ray", options=opts, progress=False, workers=2, ray="local")
    assert one["inputs.documents"] == [0, 16, 162, 199] and one.layers == [0, 1]   # shards: 16 + 146 | 37 tokens
    assert_same_results(one, two)
