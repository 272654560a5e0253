"""The lazy reader: formats, slices, hub cache ids, and that reading one tensor reads only its bytes."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from moescope.checkpoint import Checkpoint, read_safetensors_header
from moescope.writer import write_checkpoint

CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(3 + i, 5, generator=g) for i in range(6)}


@pytest.mark.parametrize("layout", ["single", "sharded", "glob", "bin", "bin-glob"])
def test_formats_read_every_tensor(tmp_path, layout):
    tensors = _tensors()
    fmt = "bin" if layout.startswith("bin") else "safetensors"
    kwargs = {
        "single": dict(num_shards=1, shard_name="model.safetensors", index_name=None),
        "sharded": dict(num_shards=3),
        "glob": dict(num_shards=3, index_name=None),
        "bin": dict(num_shards=2, shard_name="pytorch_model-{index:05d}-of-{count:05d}.bin",
                    index_name="pytorch_model.bin.index.json"),
        "bin-glob": dict(num_shards=2, shard_name="pytorch_model-{index:05d}.bin", index_name=None),
    }[layout]
    write_checkpoint(tmp_path, CONFIG, tensors, fmt=fmt, **kwargs)
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.format == fmt
        assert sorted(ckpt.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(ckpt.read(name), t)
            assert torch.equal(ckpt.read(name, slice(1, 3)), t[1:3])
            assert torch.equal(ckpt.read(name, 2), t[2])
            assert ckpt.info(name).shape == tuple(t.shape)


def test_safetensors_header_parsed_independently(tmp_path):
    tensors = _tensors()
    write_checkpoint(tmp_path, CONFIG, tensors, num_shards=1, shard_name="model.safetensors", index_name=None)
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    infos = read_safetensors_header(tmp_path / "model.safetensors")
    for name, t in tensors.items():
        begin, end = header[name]["data_offsets"]
        data = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype=np.float32).reshape(t.shape)
        np.testing.assert_array_equal(data, t.numpy())
        assert infos[name].shape == tuple(t.shape) and infos[name].dtype == "F32"


def test_hub_id_resolved_from_local_cache(tmp_path, monkeypatch, tiny):
    built = tiny("mixtral")
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-mixtral" / "snapshots" / ("a" * 40)
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(built.path, target_is_directory=True)
    (cache / "models--acme--tiny-mixtral" / "refs").mkdir()
    (cache / "models--acme--tiny-mixtral" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    with Checkpoint("acme/tiny-mixtral") as ckpt:
        assert ckpt.path.resolve() == built.path.resolve()


LAZY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from moescope.checkpoint import Checkpoint
    from moescope.testing.memtrack import rss_anon

    ckpt = Checkpoint(sys.argv[1])
    ckpt.read("w0")  # warm up allocator and code paths on a first tensor
    before = rss_anon()
    t = ckpt.read(sys.argv[2])
    after = rss_anon()
    print(after - before, t.numel() * t.element_size(), ckpt.size_bytes)
""")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_reading_one_tensor_reads_only_its_bytes(tmp_path, fmt):
    # ~320 MB in 8 shards; read one 4 MB tensor and measure anonymous memory growth in a fresh process
    tensors = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(80)}
    shard = "model-{index:05d}-of-{count:05d}.safetensors" if fmt == "safetensors" else "pytorch_model-{index:05d}-of-{count:05d}.bin"
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    write_checkpoint(tmp_path, CONFIG, tensors, fmt=fmt, num_shards=8, shard_name=shard, index_name=index)
    del tensors
    out = subprocess.run([sys.executable, "-c", LAZY_SCRIPT, str(tmp_path), "w57"], capture_output=True,
                         text=True, check=True).stdout.split()
    grown, tensor_bytes, total = map(int, out)
    assert total > 300e6
    assert grown < tensor_bytes + 8e6, f"reading a {tensor_bytes}-byte tensor grew anonymous memory by {grown}"
