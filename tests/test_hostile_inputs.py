"""Hostile and broken inputs, through the real command line: each must exit 2 with ``moescope: error: ...``
saying what was expected, what was found and what to do, and leave no partial results behind.

Each case damages a fresh copy of a tiny checkpoint (or the input / output side), runs ``moescope.cli.main``
and checks the exit code, the message fragments and the results directory.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch

import moescope.writer as writer_module
from moescope import load_results
from moescope.checkpoint import Checkpoint
from moescope.cli import main
from moescope.errors import MoescopeWarning, ResultsError
from moescope.writer import write_checkpoint

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
_REAL_WRITE_ALL = writer_module._write_all


# -- helpers ----------------------------------------------------------------------------------------------------

def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(path: Path, edit) -> None:
    header, data = read_header(path)
    edit(header)
    write_raw(path, header, data)


def tensor_entries(header: dict) -> list[tuple[str, dict]]:
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])


NULL = "<null>"  # edit_config: set the key to JSON null (None removes it)


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = None if value is NULL else value
    (path / "config.json").write_text(json.dumps(config))


def rewrite_tensors(path: Path, edit, fmt: str = "safetensors") -> None:
    """Read every tensor, let ``edit`` change the dict, write the checkpoint back in the same layout."""
    with Checkpoint(path) as ckpt:
        tensors = {n: ckpt.read(n).clone() for n in ckpt.keys()}
    config = json.loads((path / "config.json").read_text())
    edit(tensors)
    for f in path.glob("model*"):
        f.unlink()
    write_checkpoint(path, config, tensors, num_shards=2)


def overlap(header: dict) -> None:
    """Point a later tensor at the bytes of an earlier one of the same size."""
    entries = tensor_entries(header)
    for i, (_, a) in enumerate(entries):
        size = a["data_offsets"][1] - a["data_offsets"][0]
        for _, b in entries[i + 1:]:
            if size and b["data_offsets"][1] - b["data_offsets"][0] == size and b["dtype"] == a["dtype"]:
                b["data_offsets"] = list(a["data_offsets"])
                return
    raise AssertionError("no two tensors of the same size")


def hole(header: dict) -> None:
    del header[tensor_entries(header)[0][0]]  # the first tensor's bytes now belong to no tensor


class RunsCode:
    """A pickle payload: unpickling it calls ``os.system`` (what an unsafe torch.load would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def unsafe_bin(path: Path) -> None:
    shard = path / "pytorch_model-00001.bin"
    state = torch.load(shard, weights_only=True)
    state["extra"] = RunsCode(path / "PWNED")
    torch.save(state, shard)


def truncate(path: Path, keep) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:keep(len(raw))])


def swap_shards(index: Path) -> None:
    """An index that places every tensor in the other shard."""
    weight_map = json.loads(index.read_text())["weight_map"]
    index.write_text(json.dumps({"weight_map": {k: SHARD2 if v == SHARD1 else SHARD1 for k, v in weight_map.items()}}))


def replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    raw = path.read_bytes()
    assert old in raw
    path.write_bytes(raw.replace(old, new, 1))


# -- the cases --------------------------------------------------------------------------------------------------
# (id, family, damage(path), command, fragments): fragments say what was expected, what was found and what to do.

CASES = [
    # weight files
    ("shard-missing", "mixtral", lambda p: (p / SHARD2).unlink(), "weights",
     [SHARD2, "names 1 shard", "Download the missing shard"]),
    ("shard-empty", "mixtral", lambda p: (p / SHARD1).write_bytes(b""), "weights",
     ["is 0 bytes", "expected an 8-byte header", "download it again"]),
    ("shard-truncated-in-data", "mixtral", lambda p: truncate(p / SHARD1, lambda n: n - 100), "weights",
     [SHARD1, "should span", "truncated", "download it again"]),
    ("shard-truncated-in-header", "mixtral", lambda p: truncate(p / SHARD1, lambda n: 64), "weights",
     ["declares a", "header", "file holds 56 bytes", "Download it again"]),
    ("header-bad-json", "mixtral", lambda p: replace_bytes(p / SHARD1, b'{"', b"{'"), "weights",
     ["not valid UTF-8 JSON", "JSONDecodeError", "download it again"]),
    ("header-not-utf8", "mixtral", lambda p: replace_bytes(p / SHARD1, b'"dtype"', b'"dty\xffe"'), "weights",
     ["not valid UTF-8 JSON", "UnicodeDecodeError", "download it again"]),
    ("header-not-an-object", "mixtral", lambda p: write_raw(p / SHARD1, b"[1, 2, 3]", b""), "weights",
     ["header is a JSON list", "expected a JSON object", "download it again"]),
    ("header-length-beyond-file", "mixtral",
     lambda p: replace_bytes(p / SHARD1, (p / SHARD1).read_bytes()[:8], struct.pack("<Q", 1 << 40)), "weights",
     ["declares a 1099511627776-byte header", "file holds", "Download it again"]),
    ("header-entry-malformed", "mixtral",
     lambda p: edit_header(p / SHARD1, lambda h: tensor_entries(h)[0][1].pop("data_offsets")), "weights",
     ["is malformed", "expected", "data_offsets", "download it again"]),
    ("header-shape-not-integers", "mixtral",
     lambda p: edit_header(p / SHARD1, lambda h: tensor_entries(h)[0][1].update(shape=[2.5, "x"])), "weights",
     ["is malformed", "non-negative integers", "found shape [2.5, 'x']", "download it again"]),
    ("offsets-out-of-range", "mixtral",
     lambda p: edit_header(p / SHARD1, lambda h: tensor_entries(h)[-1][1].update(data_offsets=[0, 1 << 40])),
     "weights", ["should span", "offsets are [0, 1099511627776]", "download it again"]),
    ("offsets-overlap", "mixtral", lambda p: edit_header(p / SHARD1, overlap), "weights",
     ["overlap", "each tensor must own its bytes", "download it again"]),
    ("offsets-hole", "mixtral", lambda p: edit_header(p / SHARD1, hole), "weights",
     ["belong to no tensor", "back to back", "download it again"]),
    ("trailing-bytes", "mixtral", lambda p: (p / SHARD1).write_bytes((p / SHARD1).read_bytes() + b"\0" * 16),
     "weights", ["expected them to fill it exactly", "download it again"]),
    ("dtype-unknown", "mixtral", lambda p: replace_bytes(p / SHARD1, b'"dtype":"BF16"', b'"dtype":"F6_E3M2"'),
     "weights", ["dtype F6_E3M2", "moescope reads", "Convert the checkpoint"]),
    ("metadata-not-strings", "mixtral",
     lambda p: edit_header(p / SHARD1, lambda h: h.update(__metadata__={"format": 3})), "weights",
     ["__metadata__ must map strings to strings", "found", "download it again"]),
    ("no-weight-files", "mixtral", lambda p: [f.unlink() for f in p.glob("model*")], "weights",
     ["no weight files", "Expected model.safetensors", "found [", "fetch the weight files"]),
    # index
    ("index-not-json", "mixtral", lambda p: (p / INDEX).write_text('{"weight_map": {'), "weights",
     [INDEX, "not valid JSON", "Download it again"]),
    ("index-weight-map-wrong-type", "mixtral", lambda p: (p / INDEX).write_text('{"weight_map": [1, 2]}'),
     "weights", ["not a valid index", "weight_map of type list", "Download it again"]),
    ("index-names-path-outside", "mixtral",
     lambda p: (p / INDEX).write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}})), "weights",
     ["'../../etc/passwd'", "in the same directory", "download it again"]),
    ("index-disagrees-with-shards", "mixtral", lambda p: swap_shards(p / INDEX), "weights",
     ["places", "do not contain them", "download both again"]),
    # pickled .bin shards
    ("bin-needs-unsafe-unpickling", "grok1", unsafe_bin, "weights",
     ["unsafe unpickling", "could run arbitrary code", "refuses", "Convert the file to safetensors"]),
    ("bin-not-a-checkpoint", "grok1", lambda p: (p / "pytorch_model-00001.bin").write_bytes(b"\x80\x04garbage"),
     "weights", ["not a readable PyTorch zip checkpoint", "download it again"]),
    ("bin-empty", "grok1", lambda p: (p / "pytorch_model-00001.bin").write_bytes(b""), "weights",
     ["is empty (0 bytes)", "expected a PyTorch checkpoint shard", "download it again"]),
    # config.json
    ("config-missing", "mixtral", lambda p: (p / "config.json").unlink(), "weights",
     ["no config.json", "Expected a Hugging Face checkpoint directory", "Point moescope at"]),
    ("config-not-json", "mixtral", lambda p: (p / "config.json").write_text("{'hidden_size': 32"), "weights",
     ["config.json' is not valid JSON", "Fix or re-download"]),
    ("config-not-utf8", "mixtral", lambda p: (p / "config.json").write_bytes(b'{"model_type": "mix\xe9tral"}'),
     "weights", ["is not UTF-8 text", "expected a JSON config", "Fix or re-download"]),
    ("config-not-an-object", "mixtral", lambda p: (p / "config.json").write_text("[]"), "weights",
     ["holds a JSON list", "expected a JSON object", "Fix or re-download"]),
    ("config-lacks-hidden-size", "mixtral", lambda p: edit_config(p, hidden_size=None), "weights",
     ["lacks an integer 'hidden_size'", "tried keys", "Check that config.json is complete"]),
    ("config-lacks-expert-count", "mixtral", lambda p: edit_config(p, num_local_experts=None), "weights",
     ["needs a positive integer 'num_experts'", "found None"]),
    ("config-wrong-type", "mixtral", lambda p: edit_config(p, hidden_size="32"), "weights",
     ["'hidden_size' is '32'", "expected an integer from 1 to", "Fix config.json"]),
    ("config-top-k-above-experts", "mixtral", lambda p: edit_config(p, num_experts_per_tok=9), "weights",
     ["num_experts_per_tok = 9", "more experts than the 8 there are", "top-k <= number of experts",
      "Fix config.json"]),
    ("config-groups-contradict", "deepseek", lambda p: edit_config(p, n_group=3, topk_group=2), "weights",
     ["cannot be split into n_group = 3", "expected a multiple of n_group", "Fix config.json"]),
    ("config-zero-layer-frequency", "deepseek", lambda p: edit_config(p, moe_layer_freq=0), "inspect",
     ["'moe_layer_freq' is 0", "expected an integer from 1 to", "Fix config.json"]),
    ("config-rule-key-null", "qwen2_moe", lambda p: edit_config(p, mlp_only_layers=NULL), "inspect",
     ["the rule for which layers are MoE layers", "argument of type 'NoneType' is not iterable",
      "a key it uses is null or of the wrong type", "Fix config.json"]),
    ("unknown-architecture", "mixtral",
     lambda p: edit_config(p, architectures=["FancyMoEForCausalLM"], model_type="fancy"), "weights",
     ["FancyMoEForCausalLM", "Supported families", "mixtral (MixtralForCausalLM)", "write a family data file"]),
    ("path-is-a-shard-file", "mixtral", lambda p: None, "inspect-shard",
     ["is a file", "expected a checkpoint directory", "Pass the directory that holds it"]),
    ("unknown-forced-family", "mixtral", lambda p: None, "inspect --family fancy",
     ["no family named 'fancy'", "Supported families", "mixtral"]),
    # tensors disagreeing with config.json
    ("hidden-size-disagrees", "mixtral", lambda p: edit_config(p, hidden_size=16, num_attention_heads=2,
                                                               num_key_value_heads=1), "weights",
     ["has stored shape [8, 32]", "config.json implies", "use the config that came with the shards"]),
    ("expert-width-disagrees-trace", "mixtral",
     lambda p: edit_config(p, intermediate_size=56), "trace --prompt hello",
     ["stored shape [48, 32]", "[56, 32] that config.json implies", "use the config that came with the shards"]),
    ("integer-expert-weights", "mixtral",
     lambda p: rewrite_tensors(p, lambda t: t.update({EXPERT.format(layer=0, expert=0, w="w1"):
                                                      t[EXPERT.format(layer=0, expert=0, w="w1")].to(torch.int32)})),
     "weights", ["stored as torch.int32", "moescope reads float weights", "Dequantise the checkpoint first"]),
]

CASES.append(("expert-width-disagrees-weights", "mixtral", lambda p: edit_config(p, intermediate_size=56),
              "weights", ["stored shape [48, 32]", "config.json implies", "use the config that came with"]))


@pytest.fixture
def damaged(tiny, tmp_path):
    def make(family: str, damage) -> Path:
        path = tmp_path / "ckpt"
        shutil.copytree(tiny(family).path, path)
        damage(path)
        return path
    return make


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(args)
    return code, capsys.readouterr().err


def assert_clean_error(code: int, err: str, fragments: list[str]) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    # (a progress bar may share the line: static/run.py does not close its bar when a layer fails)
    lines = [line[line.index("moescope: error: "):] for line in err.replace("\r", "\n").splitlines()
             if "moescope: error: " in line]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def assert_no_results(out: Path) -> None:
    """No results directory, or one without any layer file (finished or temporary)."""
    if out.exists():
        leftovers = [p.name for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"]
        assert not leftovers, leftovers


def _command(command: str, path: Path, out: Path) -> list[str]:
    name, *extra = command.split()
    if name == "inspect-shard":
        return ["inspect", str(path / SHARD1)]
    if name == "inspect":
        return ["inspect", str(path), *extra]
    if name == "weights":
        return ["weights", str(path), "--no-neuron-level", "--out", str(out), *extra]
    return ["trace", str(path), "--bootstrap", "0", "--quiet", "--out", str(out), *extra]


@pytest.mark.parametrize("case, family, damage, command, fragments",
                         [pytest.param(*c, id=c[0]) for c in CASES])
def test_broken_checkpoint(damaged, tmp_path, capsys, case, family, damage, command, fragments):
    path = damaged(family, damage)
    out = tmp_path / "out"
    code, err = run_cli(_command(command, path, out), capsys)
    assert_clean_error(code, err, fragments)
    assert_no_results(out)
    assert not (path / "PWNED").exists(), "a pickle payload ran"


def test_case_count():
    assert len(CASES) + len(EXTRA_CASES) >= 30


# -- inputs of trace --------------------------------------------------------------------------------------------

EXTRA_CASES = ["text-empty", "text-not-utf8", "text-too-long", "out-is-a-file", "out-parent-is-a-file",
               "out-not-writable", "disk-full-first-layer", "disk-full-later-layer", "results-older-schema",
               "results-damaged", "nan-weights-static", "inf-weights-static", "zero-expert-static",
               "nan-weights-trace", "zero-expert-trace", "nan-weights-poison-trace"]


def test_text_file_that_is_empty(tiny, tmp_path, capsys):
    text = tmp_path / "empty.txt"
    text.write_text("\n\n   \n")
    out = tmp_path / "out"
    code, err = run_cli(_command(f"trace --text {text}", tiny("mixtral").path, out), capsys)
    assert_clean_error(code, err, ["the input is empty", "give a prompt, a text file or documents"])
    assert not out.exists()


def test_text_file_that_is_not_utf8(tiny, tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    out = tmp_path / "out"
    code, err = run_cli(_command(f"trace --text {text}", tiny("mixtral").path, out), capsys)
    assert_clean_error(code, err, ["latin1.txt", "UTF-8", "byte"])
    assert not out.exists()


def test_text_longer_than_the_context_is_split_with_a_warning(tiny, tmp_path, capsys):
    text = tmp_path / "long.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 60))  # > 256-token context
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="longer than the model's context"):
        code = main(_command(f"trace --text {text} --max-tokens 300 --no-stats", tiny("mixtral").path, out))
    assert code == 0
    assert len(load_results(out)["inputs.documents"]) > 2  # split into several documents


# -- the output side --------------------------------------------------------------------------------------------

def test_out_is_a_file(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a directory")
    code, err = run_cli(_command("weights", tiny("mixtral").path, out), capsys)
    assert_clean_error(code, err, ["is a file", "expected a results directory", "Choose another --out"])
    assert out.read_text() == "not a directory"


def test_out_parent_is_a_file(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    code, err = run_cli(_command("weights", tiny("mixtral").path, out), capsys)
    assert_clean_error(code, err, ["could not write results", "not a directory", "choose another --out"])


def test_out_not_writable(tiny, tmp_path, capsys, monkeypatch):
    def refuse(*args, dir=None, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(writer_module.tempfile, "mkstemp", refuse)
    out = tmp_path / "out"
    code, err = run_cli(_command("weights", tiny("mixtral").path, out), capsys)
    assert_clean_error(code, err, ["could not write results", "Permission denied", "not writable",
                                   "choose an --out you can write to"])
    assert_no_results(out)


def _disk_full_at(monkeypatch, fragment: str) -> list[str]:
    """Make writes of files whose name contains ``fragment`` write half their bytes, then fail with ENOSPC."""
    failed = []
    real = writer_module._write_all

    def full(handle, data, name):
        if fragment in os.path.basename(name):
            handle.write(data[: len(data) // 2])
            handle.flush()
            assert os.path.getsize(name) > 0  # a half-written temporary file exists now
            failed.append(name)
            raise OSError(errno.ENOSPC, "No space left on device", name)
        real(handle, data, name)

    monkeypatch.setattr(writer_module, "_write_all", full)
    return failed


def test_disk_full_while_writing_the_first_layer(tiny, tmp_path, capsys, monkeypatch):
    failed = _disk_full_at(monkeypatch, "layer000")
    out = tmp_path / "out"
    code, err = run_cli(_command("weights", tiny("mixtral").path, out), capsys)
    assert_clean_error(code, err, ["could not write layer 0", "No space left on device", "the disk is full",
                                   "free some space", "nothing half-written"])
    assert failed and not Path(failed[0]).exists()
    assert_no_results(out)


def test_disk_full_on_a_later_layer_keeps_finished_layers_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    path, out = tiny("mixtral").path, tmp_path / "out"
    failed = _disk_full_at(monkeypatch, "layer001.json")  # tensors of layer 1 written, then its JSON fails
    code, err = run_cli(_command("weights", path, out), capsys)
    assert_clean_error(code, err, ["could not write layer 1", "the disk is full"])
    files = sorted(p.name for p in (out / "layers").iterdir())
    assert files == ["layer000.json", "layer000.safetensors"], files  # no half layer, no temporary file
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "layers").iterdir()}
    assert failed
    monkeypatch.setattr(writer_module, "_write_all", _REAL_WRITE_ALL)  # space freed
    code, err = run_cli(_command("weights", path, out), capsys)
    assert code == 0, err
    assert load_results(out).layers == [0, 1]
    assert {n: (out / "layers" / n).stat().st_mtime_ns for n in stamps} == stamps  # layer 0 not recomputed


def _fake_results(out: Path, schema) -> None:
    (out / "layers").mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"schema_version": schema, "moescope_version": "0.0.1",
                                                   "analysis": "weights", "options": {}, "checkpoint": {}}))
    (out / "layers" / "layer000.json").write_text(json.dumps({"layer": 0}))


def test_results_of_an_older_schema_are_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    _fake_results(out, 0)
    with pytest.raises(ResultsError, match=r"schema 0 \(written by moescope 0\.0\.1\).*reads schema 1.*Re-run"):
        load_results(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = run_cli(_command("weights", tiny("mixtral").path, out), capsys)
    assert_clean_error(code, err, ["holds results of schema 0", "cannot resume them", "--no-resume"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # left as it was


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "manifest.json").write_text("{"), "manifest) is damaged"),
    (lambda out: (out / "layers" / "layer000.json").write_bytes(b"\xff\xfe"), "layer table) is damaged"),
    (lambda out: (out / "layers" / "layer000.json").write_text('{"layer": 3}'), "names layer 3"),
    (lambda out: None, "has the JSON of layer 0 but not its tensors"),
    (lambda out: (out / "layers" / "layer000.safetensors").write_bytes(b"\0" * 20), "tensors of layer 0) is damaged"),
])
def test_damaged_results_are_refused(tmp_path, damage, message):
    out = tmp_path / "out"
    _fake_results(out, 1)
    damage(out)
    with pytest.raises(ResultsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_results(out)


# -- non-finite and zero weights --------------------------------------------------------------------------------

def _poison(layer: int, expert: int, value: float | None):
    def edit(tensors):
        if value is None:  # the whole expert is zero
            for w in ("w1", "w2", "w3"):
                tensors[EXPERT.format(layer=layer, expert=expert, w=w)].zero_()
        else:
            tensors[EXPERT.format(layer=layer, expert=expert, w="w1")][3, 4] = value
    return lambda path: rewrite_tensors(path, edit)



@pytest.mark.parametrize("value, kind", [(float("nan"), "nonfinite_members"), (float("inf"), "nonfinite_members"),
                                         (None, "zero_norm_members")], ids=["nan", "inf", "zero"])
def test_bad_expert_weights_are_reported_and_the_static_pass_continues(damaged, tmp_path, value, kind):
    path = damaged("mixtral", _poison(0, 2, value))
    out = tmp_path / "out"
    with pytest.warns(MoescopeWarning, match=r"layer 0 gate: e2 \("):
        assert main(_command("weights", path, out)) == 0
    results = load_results(out)
    assert "e2" in results[f"layer0.gate.{kind}"] and results["layer0.gate.excluded_members"] == ["e2"]
    sim = results["layer0.gate.matrix_similarity"]
    assert torch.isnan(sim[2]).all() and torch.isnan(sim[:, 2]).all()
    assert torch.isfinite(sim[[0, 1, 3]][:, [0, 1, 3]]).all()
    assert results["layer1.gate.excluded_members"] == []  # other layers untouched


@pytest.mark.parametrize("value, kind", [(float("nan"), "nonfinite_members"), (None, "zero_norm_members")],
                         ids=["nan", "zero"])
def test_bad_expert_weights_are_reported_and_trace_continues(damaged, tmp_path, value, kind):
    path = damaged("mixtral", _poison(1, 2, value))  # the last layer: the forward pass stays finite before it
    out = tmp_path / "out"
    with pytest.warns(MoescopeWarning, match=r"layer 1: e2 \("):
        assert main(_command("trace --prompt hello", path, out)) == 0
    results = load_results(out)
    assert results[f"layer1.{kind}"] and "e2" in results[f"layer1.{kind}"]
    assert torch.isnan(results["layer1.output_similarity"][2]).all()
    assert results["layer0.excluded_members"] == []


def test_nan_weights_that_poison_the_forward_pass_stop_trace_after_the_last_clean_layer(damaged, tmp_path, capsys):
    def nan_expert(tensors):
        tensors[EXPERT.format(layer=0, expert=2, w="w1")][:] = float("nan")
    path = damaged("mixtral", lambda p: rewrite_tensors(p, nan_expert))
    out = tmp_path / "out"
    with pytest.warns(MoescopeWarning, match=r"layer 0: e2 \(4672 NaN, 0 inf\)"):
        code = main(_command("trace --builtin chat", path, out))
    assert_clean_error(code, capsys.readouterr().err, ["hidden states entering layer 1 hold NaN/inf",
                                                       "Layers before it were written", "Repair the checkpoint"])
    assert load_results(out).layers == [0] and load_results(out)["layer0.excluded_members"] == ["e2"]


# -- the building blocks those integrations use (moescope.validate) ------------------------------------------

def test_scan_members_finds_nan_inf_and_zero_members():
    from moescope.validate import scan_members

    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(6, 4, generator=g) for _ in range(5)]
    mats[1][2, 3] = float("nan")
    mats[2][0, 0] = float("-inf")
    mats[3].zero_()
    health = scan_members([lambda a, b, m=m: m[a:b] for m in mats], ["e0", "e1", "e2", "e3", "e4"],
                          [(6, 4)] * 5, budget_bytes=16 * 2)  # tiny budget: many chunks
    assert health.nonfinite == {"e1": {"nan": 1, "inf": 0}, "e2": {"nan": 0, "inf": 1}}
    assert health.zero == ["e3"] and health.excluded == ["e1", "e2", "e3"] and health.keep == [0, 4]
    assert health.table() == {"nonfinite_members": health.nonfinite, "zero_norm_members": ["e3"],
                              "excluded_members": ["e1", "e2", "e3"]}
    with pytest.warns(MoescopeWarning, match=r"layer 7 gate: e1 \(1 NaN, 0 inf\), e2 \(0 NaN, 1 inf\), e3 \(all zero"):
        health.warn("layer 7 gate")
    full = health.expand(torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64))
    assert full.shape == (5, 5) and full[0, 4] == 0.5 and full[4, 4] == 1.0
    assert torch.isnan(full[1:4]).all() and torch.isnan(full[:, 1:4]).all()
    masked = health.mask(torch.ones(3, 5, 5))
    assert torch.isnan(masked[:, 2]).all() and masked[:, 0, 4].eq(1).all()


def test_scan_layer_reads_the_real_members(damaged):
    from moescope.arch import open_model
    from moescope.validate import scan_layer

    path = damaged("mixtral", _poison(0, 5, float("inf")))
    health = scan_layer(open_model(path), 0, "gate")
    assert health.labels == [f"e{i}" for i in range(8)] and health.excluded == ["e5"]
    assert scan_layer(open_model(path), 0, "up").ok and scan_layer(open_model(path), 1, "gate").ok


def test_output_health_and_poisoned_states():
    from moescope.errors import NonFiniteWeightsError
    from moescope.validate import check_finite_states, first_nonfinite_layer, output_health

    outputs = torch.randn(3, 5, 4)
    outputs[1, 2, 0] = float("nan")
    outputs[2] = 0
    health = output_health(outputs, ["e0", "e1", "shared0"])
    assert health.nonfinite == {"e1": {"nan": 1, "inf": 0}} and health.zero == ["shared0"]
    states = {0: torch.randn(5, 4), 1: torch.randn(5, 4), 2: torch.randn(5, 4)}
    assert first_nonfinite_layer(states) is None
    states[1][3, 1] = float("inf")
    assert first_nonfinite_layer(states) == 1
    check_finite_states(states[0], 0)
    with pytest.raises(NonFiniteWeightsError, match="entering layer 1 hold NaN/inf for 1 of 5 tokens"):
        check_finite_states(states[1], 1)
