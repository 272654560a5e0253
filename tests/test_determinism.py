"""Two CPU runs of the same command give bit-identical results: every tensor, every table, every file.

Results hold no timestamps or other provenance that may change between runs (the manifest records the
checkpoint's path and config hash, the options and the versions), so whole files are compared byte for byte.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moescope import load_results
from moescope.cli import main

COMMANDS = {
    "weights": ["weights", "--pairs", "sample:6"],  # every analysis, neuron matching included
    "trace": ["trace", "--builtin", "chat", "--bootstrap", "100", "--quiet"],
}


def _differences(a: Path, b: Path) -> list[str]:
    """Readable list of what differs between two results directories (empty if byte-identical)."""
    files_a = {str(p.relative_to(a)): p.read_bytes() for p in sorted(a.rglob("*")) if p.is_file()}
    files_b = {str(p.relative_to(b)): p.read_bytes() for p in sorted(b.rglob("*")) if p.is_file()}
    if files_a.keys() != files_b.keys():
        return [f"files differ: {sorted(files_a.keys() ^ files_b.keys())}"]
    changed = [name for name in files_a if files_a[name] != files_b[name]]
    if not changed:
        return []
    ra, rb = load_results(a), load_results(b)
    out = []
    for key in ra.keys():
        x, y = ra[key], rb[key]
        same = (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
                if isinstance(x, torch.Tensor) else json.dumps(x) == json.dumps(y))
        if not same:
            out.append(key)
    return out or [f"bytes of {changed}"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_two_cpu_runs_are_bit_identical(tiny, tmp_path, capsys, name):
    path = tiny("mixtral").path
    command, *options = COMMANDS[name]
    for run in ("first", "second"):
        assert main([command, str(path), *options, "--out", str(tmp_path / run)]) == 0
    capsys.readouterr()
    assert _differences(tmp_path / "first", tmp_path / "second") == []
    results = load_results(tmp_path / "first")
    assert results.layers == [0, 1] and results.manifest["checkpoint"]["path"] == str(path)
