"""``kill -9`` in the middle of a run, then the same command again: finished layers are kept as they are (not
recomputed), no temporary file survives or counts as a result, and the final results are byte-identical to an
uninterrupted run.

The killed run is a real ``python -m moescope`` subprocess. A test-only wrapper (no product code involved)
makes the *second* layer write stop half-way through its temporary file and hang, so the kill lands at the
worst moment: one layer finished, the next half-written on disk.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moescope import load_results
from moescope.cli import main

HANG_ON_SECOND_LAYER = textwrap.dedent("""
    import os, runpy, sys, time
    import moescope.results as results
    import moescope.writer as writer

    real, calls = results.RunWriter.write_layer, []

    def write_layer(self, layer, tables, tensors):
        calls.append(layer)
        if len(calls) == 2:  # the second layer: write half of its tensors' temporary file, then hang
            def hang(handle, data, name):
                handle.write(data[: len(data) // 2])
                handle.flush()
                time.sleep(600)
            writer._write_all = hang
        real(self, layer, tables, tensors)

    results.RunWriter.write_layer = write_layer
    sys.argv = ["moescope", *sys.argv[1:]]
    runpy.run_module("moescope", run_name="__main__", alter_sys=True)
""")


COMMANDS = {
    "weights": ["weights", "--pairs", "sample:2"],
    "trace": ["trace", "--prompt", "The quick brown fox jumps over the lazy dog.", "--bootstrap", "20", "--quiet"],
}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """Start ``python -m moescope ARGS`` through the wrapper that hangs half-way into the second layer."""
    with open(log, "w") as stderr:  # a file, not a pipe: a full pipe would block the run
        return subprocess.Popen([sys.executable, "-c", HANG_ON_SECOND_LAYER, *args], stdout=subprocess.DEVNULL,
                                stderr=stderr)


def _kill_when_half_written(proc: subprocess.Popen, out: Path, log: Path, timeout: float = 300.0) -> None:
    """SIGKILL ``proc`` once layer 0 is finished and layer 1's tensors are half-written to a temporary file."""
    layers = out / "layers"
    deadline = time.monotonic() + timeout
    try:
        while True:
            finished = (layers / "layer000.json").is_file()
            half = list(layers.glob(".layer001.safetensors.*.tmp")) if finished else []
            if half and half[0].stat().st_size > 0:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach its second layer in time")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Both commands killed mid-run (started together) and run uninterrupted in-process meanwhile."""
    path = tiny("mixtral", sizes={"num_hidden_layers": 4}).path
    root = tmp_path_factory.mktemp("kill")
    args = {name: [command[0], str(path), *command[1:]] for name, command in COMMANDS.items()}
    procs = {name: _start([*a, "--out", str(root / name / "killed")], root / f"{name}.log") for name, a in args.items()}
    try:
        for name, a in args.items():  # the uninterrupted references, while the subprocesses start
            assert main([*a, "--out", str(root / name / "reference")]) == 0
        for name, proc in procs.items():
            _kill_when_half_written(proc, root / name / "killed", root / f"{name}.log")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: (a, root / name / "killed", root / name / "reference") for name, a in args.items()}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_kill_9_then_resume(runs, name, capsys):
    args, out, reference = runs[name]
    layers = out / "layers"
    left = sorted(p.name for p in layers.iterdir())
    assert [n for n in left if not n.startswith(".")] == ["layer000.json", "layer000.safetensors"], left
    assert any(n.startswith(".layer001.safetensors.") for n in left), left  # the kill hit a half-written file
    assert load_results(out).layers == [0]  # the temporary file is not a result
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in layers.glob("layer000.*")}

    assert main([*args, "--out", str(out)]) == 0  # the same command again: resumed
    capsys.readouterr()
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in layers.glob("layer000.*")} == kept
    assert not list(out.rglob("*.tmp")), "temporary files survived the resumed run"
    assert load_results(out).layers == [0, 1, 2, 3]
    assert _snapshot(out) == _snapshot(reference)  # byte-identical to the uninterrupted run
