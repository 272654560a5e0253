"""Bad input gets a specific exception with a helpful message, and the CLI exits non-zero without a traceback."""
import json
import shutil
import struct

import pytest
import torch

from moescope.arch import open_model
from moescope.cli import main
from moescope.errors import (ConfigNotFoundError, CorruptCheckpointError, MissingShardError, ShapeMismatchError,
                             TensorNotFoundError, UnknownArchitectureError, UnsupportedDtypeError)
from moescope.writer import write_checkpoint


@pytest.fixture
def copy(tiny, tmp_path):
    def make(family="mixtral", **kw):
        dst = tmp_path / "ckpt"
        shutil.copytree(tiny(family, **kw).path, dst)
        return dst
    return make


def _inspect_fails(path, capsys, error, *fragments):
    with pytest.raises(error) as info:
        from moescope.inspect import describe
        describe(open_model(path))
    for fragment in fragments:
        assert fragment in str(info.value)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("moescope: error:")
    return str(info.value)


def test_missing_config(copy, capsys):
    path = copy()
    (path / "config.json").unlink()
    _inspect_fails(path, capsys, ConfigNotFoundError, "config.json")


def test_missing_directory(tmp_path, capsys):
    _inspect_fails(tmp_path / "nope", capsys, ConfigNotFoundError, "does not exist")


def test_unknown_architecture_lists_supported(copy, capsys):
    path = copy()
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["FancyMoEForCausalLM"], model_type="fancy")
    (path / "config.json").write_text(json.dumps(config))
    message = _inspect_fails(path, capsys, UnknownArchitectureError, "FancyMoEForCausalLM", "mixtral",
                             "deepseek_v3", "grok1")
    assert "Supported families" in message


def test_index_names_missing_shard(copy, capsys):
    path = copy()
    (path / "model-00002-of-00002.safetensors").unlink()
    _inspect_fails(path, capsys, MissingShardError, "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "header-length", "header-json"])
def test_corrupt_safetensors_header(copy, capsys, damage):
    path = copy()
    shard = path / "model-00001-of-00002.safetensors"
    raw = shard.read_bytes()
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "header-length":
        raw = struct.pack("<Q", len(raw) * 4) + raw[8:]
    else:
        raw = raw[:8] + b"{not json" + raw[17:]
    shard.write_bytes(raw)
    _inspect_fails(path, capsys, CorruptCheckpointError, shard.name)


def test_tiny_file_is_corrupt(copy, capsys):
    path = copy()
    (path / "model-00001-of-00002.safetensors").write_bytes(b"abc")
    _inspect_fails(path, capsys, CorruptCheckpointError, "too short")


def test_tensor_missing_from_shards(tmp_path, tiny, capsys):
    built = tiny("mixtral")
    from moescope.checkpoint import Checkpoint
    with Checkpoint(built.path) as ckpt:
        tensors = {n: ckpt.read(n) for n in ckpt.keys()}
    missing = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    del tensors[missing]
    write_checkpoint(tmp_path / "ckpt", built.config, tensors, num_shards=2)
    _inspect_fails(tmp_path / "ckpt", capsys, TensorNotFoundError, missing)


def test_shape_disagrees_with_config(copy, capsys):
    path = copy()
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] += 8
    (path / "config.json").write_text(json.dumps(config))
    _inspect_fails(path, capsys, ShapeMismatchError, "w1.weight", "config.json")


def test_unsupported_dtype_in_header(copy, capsys):
    path = copy()
    shard = path / "model-00001-of-00002.safetensors"
    raw = shard.read_bytes()
    raw = raw.replace(b'"dtype":"BF16"', b'"dtype":"F6_E3M2"', 1)
    shard.write_bytes(raw)
    _inspect_fails(path, capsys, UnsupportedDtypeError, "F6_E3M2")


def test_integer_expert_weights_are_refused(tmp_path, tiny):
    built = tiny("mixtral")
    from moescope.checkpoint import Checkpoint
    with Checkpoint(built.path) as ckpt:
        tensors = {n: ckpt.read(n) for n in ckpt.keys()}
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    tensors[name] = tensors[name].to(torch.int32)
    write_checkpoint(tmp_path / "ckpt", built.config, tensors, num_shards=1)
    with pytest.raises(UnsupportedDtypeError, match="int32"):
        open_model(tmp_path / "ckpt").experts(0, "gate")


def test_bin_shard_that_is_not_a_checkpoint(copy, capsys):
    path = copy("grok1")
    (path / "pytorch_model-00001.bin").write_bytes(b"\x80\x04garbage")
    _inspect_fails(path, capsys, CorruptCheckpointError, "pytorch_model-00001.bin")
