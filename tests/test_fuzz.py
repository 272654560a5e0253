"""Fuzzing the parsers of untrusted files: mutated bytes and JSON must give a result or a documented
``MoescopeError`` subclass, never another exception.

Targets: the safetensors header parser (and: what it accepts, safetensors itself reads), the index parser,
config.json parsing + family detection + the adapter's config-derived facts, and the results loader.
Bounded (``max_examples``, derandomized) so the file runs in seconds.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moescope.arch import families
from moescope.arch.adapter import MoEModel
from moescope.arch.registry import detect_family
from moescope.checkpoint import parse_config, parse_index, read_safetensors_header
from moescope.errors import CorruptCheckpointError, MoescopeError, ResultsError, UnsupportedDtypeError
from moescope.results import RunWriter, load_results
from moescope.testing.builder import tiny_config

# MOESCOPE_FUZZ_EXAMPLES=5000 fuzzes longer, with fresh random examples each run
_LONG = int(os.environ.get("MOESCOPE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_LONG or 120, deadline=None, derandomize=not _LONG, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


# -- mutations --------------------------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4)), max_leaves=8)


@st.composite
def mutated_bytes(draw, original: bytes) -> bytes:
    """Byte-level damage: flips, overwrites, truncation, insertion, deletion, or random bytes."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "random"]))
        if kind == "random":
            return draw(st.binary(max_size=64))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0, 0xFF, ord("{"), ord("}"), ord('"'), ord(","), ord("9")]))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:at + draw(st.integers(1, 8))]
    return bytes(data)


@st.composite
def mutated_json(draw, original):
    """Structural damage to a JSON document: replace, delete or add values at random paths."""
    doc = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        node, parents = doc, []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node, key=str) if isinstance(node, dict) else range(len(node))))
            parents.append((node, key))
            node = node[key]
        if not parents:
            doc = draw(json_values) if draw(st.integers(0, 9)) == 0 else doc
            continue
        parent, key = parents[-1]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return doc


def dumps(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


# -- safetensors headers ----------------------------------------------------------------------------------------

def _safetensors_file() -> tuple[bytes, dict]:
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "empty": torch.zeros(0, 2)}
    raw = save(tensors, metadata={"format": "pt"})
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, json.loads(raw[8:8 + n])


RAW, HEADER = _safetensors_file()
DATA = RAW[8 + struct.unpack("<Q", RAW[:8])[0]:]


@st.composite
def damaged_safetensors(draw) -> bytes:
    if draw(st.booleans()):
        return draw(mutated_bytes(RAW))
    header = draw(mutated_json(HEADER))
    text = dumps(header)
    text += b" " * (-len(text) % 8)
    data = DATA if draw(st.integers(0, 3)) else draw(mutated_bytes(DATA))
    return struct.pack("<Q", len(text)) + text + data


def _check_header(path: Path) -> None:
    """Parse ``path``; if the parser accepts it, safetensors must read every tensor it describes."""
    from safetensors import safe_open

    try:
        infos = read_safetensors_header(path)
    except (CorruptCheckpointError, UnsupportedDtypeError):
        return
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(infos)
        for name, info in infos.items():
            tensor = handle.get_tensor(name)
            assert tuple(tensor.shape) == info.shape


def test_intact_file_parses(scratch):
    path = scratch / "intact.safetensors"
    path.write_bytes(RAW)
    infos = read_safetensors_header(path)
    assert sorted(infos) == ["a", "b", "c", "empty"] and infos["b"].dtype == "BF16"


@FUZZ
@given(damaged_safetensors())
def test_safetensors_header_parser(scratch, raw):
    path = scratch / "fuzz.safetensors"
    path.write_bytes(raw)
    _check_header(path)


# -- index ------------------------------------------------------------------------------------------------------

INDEX = {"metadata": {"total_size": 1234},
         "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                        "lm_head.weight": "model-00002-of-00002.safetensors"}}


@FUZZ
@given(st.one_of(mutated_json(INDEX).map(dumps), mutated_bytes(dumps(INDEX))))
def test_index_parser(scratch, raw):
    try:
        files = parse_index(raw, scratch, "fuzz.index.json")
    except CorruptCheckpointError:
        return
    assert all(isinstance(k, str) and f.parent == scratch for k, f in files.items())


# -- config.json ------------------------------------------------------------------------------------------------

CONFIGS = [tiny_config(f.name, ref) for f in families().values() for ref in f.reference_configs]


@st.composite
def damaged_config(draw) -> bytes:
    config = draw(st.sampled_from(CONFIGS))
    if draw(st.integers(0, 4)) == 0:
        return draw(mutated_bytes(dumps(config)))
    config = dict(config)
    for _ in range(draw(st.integers(1, 3))):  # aim at the keys the adapter uses, then anywhere
        key = draw(st.sampled_from(sorted(config)))
        if draw(st.booleans()):
            config[key] = draw(st.one_of(json_scalars, st.integers(-1, 64)))
        else:
            del config[key]
    return dumps(draw(mutated_json(config)) if draw(st.integers(0, 3)) == 0 else config)


def _config_facts(raw: bytes) -> None:
    """What ``open_model`` derives from config.json alone, as inspect / weights / trace use it."""
    config = parse_config(raw, "fuzz/config.json")
    model = MoEModel.from_config(config, detect_family(config))
    model.moe_layers, model.dense_layers, model.routing
    if model.family.is_moe:
        model.num_shared_members, model.shared_width, model.expert_width
    if model.family.dense is not None:
        model.dense_width


@FUZZ
@given(damaged_config())
def test_config_parsing_and_family_detection(raw):
    try:
        _config_facts(raw)
    except MoescopeError:
        pass


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.get("model_type"))
def test_intact_configs_parse(config):
    _config_facts(dumps(config))


# -- results ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results_dir(scratch):
    out = scratch / "results"
    writer = RunWriter.open(out, "weights", {"layers": [0, 1]}, {"path": "x", "family": "mixtral"})
    for layer in (0, 1):
        writer.write_layer(layer, {"labels": ["e0", "e1"], "gate": {"r2": 0.5, "solver": {"certified": True}}},
                           {"gate.matrix_similarity": torch.eye(2, dtype=torch.float64) * (layer + 1),
                            "perm": torch.arange(4)})
    writer.write_json("inputs", {"token_ids": [1, 2, 3], "texts": ["x"]})
    writer.write_summary({"layers_done": [0, 1], "gate_r2_mean": {"gate": {"flat": math.pi}}})
    assert load_results(out).layers == [0, 1]
    return out


RESULT_FILES = ["manifest.json", "summary.json", "inputs.json", "layers/layer000.json",
                "layers/layer001.safetensors"]


@FUZZ
@given(st.sampled_from(RESULT_FILES), st.data())
def test_results_loader(results_dir, scratch, target, data):
    work = scratch / "results-fuzz"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(results_dir, work)
    original = (work / target).read_bytes()
    if target.endswith(".json") and data.draw(st.booleans()):
        raw = dumps(data.draw(mutated_json(json.loads(original))))
    else:
        raw = data.draw(mutated_bytes(original))
    (work / target).write_bytes(raw)
    try:
        results = load_results(work)
    except ResultsError:
        return
    for key in list(results.keys()):
        results[key]
    results.summary, results.tables, results.manifest
