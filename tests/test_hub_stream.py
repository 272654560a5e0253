"""Hub streaming (``moescope weights MODEL_ID --download [--evict]``) against a loopback server that serves a tiny
checkpoint the way the hub's file endpoints do.

huggingface_hub's ``hf_hub_download`` (the installed 2.x) asks ``HEAD {HF_ENDPOINT}/{repo}/resolve/{revision}/{file}``
for ``X-Repo-Commit``, ``ETag`` (``X-Linked-Etag`` for LFS files) and ``Content-Length`` (``X-Linked-Size``), then
``GET``s the same URL; an interrupted body is retried with ``Range: bytes=N-`` (a 206 answer resumes it). Errors are
told apart by ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``). moescope reads shard
headers with ``GET`` + ``Range: bytes=0-…``. ``FakeHub`` implements exactly these and logs every request; anything
else is answered 404 and logged as unexpected.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` when imported (``HF_TOKEN`` at each
request). The full streamed run is a real ``python -m moescope`` subprocess started with those variables, as users
run it; the other cases call ``moescope.cli.main`` in this process after setting the variables and reloading
``huggingface_hub.constants`` (what a fresh process would read), which keeps the file fast.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save

import moescope
from moescope.arch import open_model
from moescope.cli import main
from moescope.errors import HubError
from moescope.testing import build_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REPO = "moescope-test/tiny-mixtral"                # sharded, with model.safetensors.index.json
SINGLE_REPO = "moescope-test/tiny-mixtral-single"  # one model.safetensors, no index
BIN_REPO = "moescope-test/tiny-mixtral-bin"        # pytorch_model.bin only
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_moescope_test_token"  # the repo is private: every request must carry it
LAYERS, SHARDS = 4, 8
FAST = ["--matrices", "gate,down", "--no-neuron-level"]  # down: layers share shards (w2 ends where w1 begins)


@dataclass
class Hit:
    """One request the fake hub answered."""

    method: str
    filename: str                 # file of the repo, or the raw path of a request outside it
    range: str | None
    authorized: bool
    shards_cached: int | None = None  # full GET of a shard: complete shard blobs in the cache at that moment
    expected: bool = True


class FakeHub:
    """A loopback HTTP server for private repos at one commit, speaking the hub's file endpoints."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.files = repos[REPO]
        self.etags = {data: hashlib.sha256(data).hexdigest() for files in repos.values() for data in files.values()}
        self.log: list[Hit] = []
        self.cut_once: set[str] = set()  # files whose first full GET stops half-way
        self.cache: Path | None = None    # HF_HUB_CACHE of the current test (to count cached shard blobs)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self, cache: Path) -> None:
        self.log, self.cut_once, self.cache = [], set(), cache

    def downloads(self) -> list[str]:
        """Shards fetched whole (GET without Range), in request order."""
        return [h.filename for h in self.log if h.method == "GET" and h.range is None and h.filename.endswith(".safetensors")]

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(handler.path)
        parts = path.lstrip("/").split("/", 4)  # owner, name, "resolve", revision, filename
        if len(parts) < 5 or parts[2] != "resolve":
            self.log.append(Hit(handler.command, path, None, False, expected=False))
            return self._error(handler, 404, "", "not an endpoint of this fake hub")
        repo, revision, filename = "/".join(parts[:2]), parts[3], parts[4]
        hit = Hit(handler.command, filename, handler.headers.get("Range"),
                  handler.headers.get("Authorization") == f"Bearer {TOKEN}")
        self.log.append(hit)
        files = self.repos.get(repo)
        if files is None or not hit.authorized:  # the hub's answer for an unknown repo, or a private one without token
            return self._error(handler, 404 if files is None else 401, "RepoNotFound", "Repository not found")
        if revision not in ("main", COMMIT):
            return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
        if filename not in files:
            return self._error(handler, 404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": COMMIT})
        if body and hit.range is None and filename.endswith(".safetensors") and repo == REPO:
            hit.shards_cached = self._cached_shards()
        self._send_file(handler, filename, files[filename], hit.range, body)

    def _send_file(self, handler, filename: str, data: bytes, byte_range: str | None, body: bool) -> None:
        etag = self.etags[data]
        start, end = 0, len(data) - 1
        if byte_range is not None:
            first, _, last = byte_range.removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) if last else end, end)
            if start > end:
                return self._error(handler, 416, "", "Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}"})
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Length": str(end + 1 - start)}
        if filename.endswith(".safetensors"):  # LFS files: the hub adds the blob's sha256 and size
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        if byte_range is not None:
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        handler.send_response(206 if byte_range is not None else 200)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        if not body:
            return
        if byte_range is None and filename in self.cut_once:  # promise the whole file, send half, hang up
            self.cut_once.discard(filename)
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.wfile.write(data[start:end + 1])

    @staticmethod
    def _error(handler, status: int, code: str, message: str, extra: dict | None = None) -> None:
        handler.send_response(status)
        for key, value in {"X-Error-Code": code, "X-Error-Message": message, "Content-Length": "0",
                           **(extra or {})}.items():
            if value:
                handler.send_header(key, value)
        handler.end_headers()

    def _cached_shards(self) -> int:
        blobs = self.cache / f"models--{REPO.replace('/', '--')}" / "blobs"
        return sum((blobs / self.etags[d]).is_file() for n, d in self.files.items() if n.endswith(".safetensors"))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_HEAD(self):  # noqa: N802
        self.server.hub.answer(self, body=False)

    def do_GET(self):  # noqa: N802
        self.server.hub.answer(self, body=True)

    def log_message(self, *args):
        pass


# -- fixtures and helpers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 4-layer Mixtral in 8 shards (layers straddle shard boundaries), its index and a reference run."""
    path = tmp_path_factory.mktemp("hub-ckpt")
    build_checkpoint("mixtral", path, num_shards=SHARDS, tokenizer=False,
                     sizes={"num_hidden_layers": LAYERS, "hidden_size": 64, "intermediate_size": 128})
    reference = moescope.weights(path, out=path.parent / "reference", progress=False,
                                 options=moescope.WeightsOptions(matrices=("gate", "down"), neuron_level=False))
    return path, reference


@pytest.fixture(scope="module")
def server(checkpoint):
    """The fake hub serving the checkpoint sharded, as one model.safetensors, and a repo of .bin weights only."""
    path, _ = checkpoint
    config = (path / "config.json").read_bytes()
    with moescope.Checkpoint(path) as ckpt:
        single = save({name: ckpt.read(name) for name in ckpt.keys()})
    hub = FakeHub({REPO: {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()},
                   SINGLE_REPO: {"config.json": config, "model.safetensors": single},
                   BIN_REPO: {"config.json": config, "pytorch_model.bin": b"never read"}})
    yield hub
    hub.server.shutdown()


def hf_env(hub: FakeHub, **extra: str) -> dict[str, str]:
    """The Hugging Face variables of a user of ``hub``, with the cache in ``hub.cache``."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(hub.cache.parent), "HF_HUB_CACHE": str(hub.cache),
            "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", **extra}


@pytest.fixture
def hub(server, tmp_path):
    """The fake hub with an empty cache under ``tmp_path``; ``hub.use(**extra)`` sets this process's variables."""
    server.reset(tmp_path / "hf" / "hub")
    with pytest.MonkeyPatch.context() as patch:
        def use(**extra: str) -> None:
            for key, value in hf_env(server, **extra).items():
                patch.setenv(key, value)
            importlib.reload(constants)  # what huggingface_hub reads at import, as a fresh process would

        server.use = use
        use()
        yield server
    importlib.reload(constants)


def run(hub: FakeHub, *args: str) -> subprocess.CompletedProcess:
    """``python -m moescope ARGS`` in a fresh process with ``hf_env(hub)``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "moescope", *args], env={**os.environ, **hf_env(hub), "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=300)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``moescope.cli.main(ARGS)`` in this process: exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def layer_shards(path: Path, layer: int) -> set[str]:
    """Shards holding what the static analyses of gate and down of ``layer`` read (router, experts' w1 and w2)."""
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    read = re.compile(rf"model\.layers\.{layer}\.block_sparse_moe\.(gate|experts\.\d+\.w[12])\.weight")
    return {f for n, f in weight_map.items() if read.fullmatch(n)}


def snapshot(hub: FakeHub, repo: str = REPO) -> Path:
    return hub.cache / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT


def snapshot_files(hub: FakeHub, repo: str = REPO) -> list[str]:
    return sorted(p.name for p in snapshot(hub, repo).iterdir())


def blobs(hub: FakeHub) -> list[Path]:
    return sorted((hub.cache / f"models--{REPO.replace('/', '--')}" / "blobs").iterdir())


def assert_same_results(a: moescope.Results, b: moescope.Results, layers: list[int]) -> None:
    """The same numbers in ``a`` as in ``b`` for ``layers`` (``a`` has no other layer)."""
    assert a.layers == layers
    keys = sorted(k for k in b.keys() if int(k.split(".")[0][5:]) in layers)
    assert keys == sorted(a.keys())
    for key in keys:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert a[key] == b[key], key


# -- tests ------------------------------------------------------------------------------------------------------

def test_download_and_evict_streams_shards_layer_by_layer(checkpoint, hub, tmp_path):
    path, reference = checkpoint
    result = run(hub, "weights", REPO, "--download", "--evict", "--out", str(tmp_path / "run"), *FAST)
    assert result.returncode == 0, result.stderr
    assert_same_results(moescope.load_results(tmp_path / "run"), reference, list(range(LAYERS)))

    assert all(h.expected and h.authorized for h in hub.log), hub.log  # the token went with every request
    assert {h.filename for h in hub.log} == {"config.json", "model.safetensors.index.json",
                                            *(p.name for p in path.glob("*.safetensors"))}
    downloads = hub.downloads()
    needed = set().union(*(layer_shards(path, l) for l in range(LAYERS)))
    assert sorted(downloads) == sorted(needed)  # each needed shard once: shared shards are kept, not re-fetched
    first_download = next(i for i, h in enumerate(hub.log) if h.range is None and h.filename in needed)
    header_reads = [i for i, h in enumerate(hub.log) if (h.range or "").startswith("bytes=0-")]
    assert len(header_reads) == SHARDS and max(header_reads) < first_download  # all validated before any fetch
    last_only = layer_shards(path, LAYERS - 1) - layer_shards(path, LAYERS - 2)
    assert max(downloads.index(s) for s in layer_shards(path, 0)) < min(downloads.index(s) for s in last_only)

    peak = max(h.shards_cached for h in hub.log if h.shards_cached is not None) + 1
    assert peak < len(needed)
    assert snapshot_files(hub) == ["config.json", "model.safetensors.index.json"]  # every shard evicted
    assert len(blobs(hub)) == 2


@pytest.mark.parametrize("chunk", [None, 1 << 14], ids=["default-chunks", "small-chunks"])
def test_an_interrupted_download_resumes_and_one_layer_fetches_only_its_shards(checkpoint, hub, tmp_path, capsys,
                                                                               monkeypatch, chunk):
    """huggingface_hub retries a body cut short, with ``Range: bytes=N-`` from the end of the last whole chunk it
    wrote (10 MiB by default, so a tiny shard cut half-way is fetched again from its start)."""
    path, reference = checkpoint
    if chunk:
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    cut = sorted(layer_shards(path, 0))[1]
    hub.cut_once.add(cut)
    code, _, err = cli(capsys, "weights", REPO, "--download", "--layers", "0", "--out", str(tmp_path / "one"), *FAST)
    assert code == 0, err
    assert sorted(set(hub.downloads())) == sorted(layer_shards(path, 0))
    written = len(hub.files[cut]) // 2 // chunk * chunk if chunk else 0  # whole chunks received before the cut
    resumed = f"bytes={written}-" if written else None
    assert [h.range for h in hub.log if h.method == "GET" and h.filename == cut] == ["bytes=0-65535", None, resumed]
    assert_same_results(moescope.load_results(tmp_path / "one"), reference, [0])
    assert (snapshot(hub) / cut).read_bytes() == hub.files[cut]
    assert not [b for b in blobs(hub) if b.name.endswith(".incomplete")]


def test_offline_runs_read_the_cache_and_evict_keeps_what_was_there(checkpoint, hub, tmp_path, capsys):
    path, reference = checkpoint
    code, _, err = cli(capsys, "weights", REPO, "--download", "--out", str(tmp_path / "a"), *FAST)
    assert code == 0, err
    cached = snapshot_files(hub)
    assert len(cached) == 2 + SHARDS
    hub.log.clear()
    hub.use(HF_HUB_OFFLINE="1")
    code, _, err = cli(capsys, "weights", REPO, "--download", "--evict", "--out", str(tmp_path / "b"), *FAST)
    assert code == 0, err
    assert hub.log == [] and snapshot_files(hub) == cached  # no request; the shards it found in the cache stay
    assert_same_results(moescope.load_results(tmp_path / "b"), reference, list(range(LAYERS)))

    gone = sorted(layer_shards(path, LAYERS - 1))[0]
    (snapshot(hub) / gone).unlink()  # every shard header is checked before the first layer: offline, one is missing
    code, _, err = cli(capsys, "weights", REPO, "--download", "--out", str(tmp_path / "c"), *FAST)
    assert code == 2 and f"'{gone}' of '{REPO}'" in err and "HF_HUB_OFFLINE" in err and hub.log == []


def test_offline_without_the_model_in_the_cache_is_a_clear_error(hub, tmp_path, capsys):
    hub.use(HF_HUB_OFFLINE="1")
    code, _, err = cli(capsys, "weights", REPO, "--download", "--out", str(tmp_path / "run"))
    assert code == 2 and err.startswith("moescope: error:") and "Traceback" not in err
    assert REPO in err and "offline" in err and "HF_HUB_OFFLINE" in err
    assert hub.log == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("repo, token", [("moescope-test/no-such-model", TOKEN), (REPO, "hf_wrong_token")],
                         ids=["unknown-repo", "private-repo-wrong-token"])
def test_a_repo_the_hub_does_not_give_is_a_clear_error(hub, tmp_path, capsys, repo, token):
    hub.use(HF_TOKEN=token)
    code, _, err = cli(capsys, "weights", repo, "--download", "--out", str(tmp_path / "run"))
    assert code == 2 and err.startswith("moescope: error:") and "Traceback" not in err
    assert f"'{repo}'" in err and "not found" in err and "HF_TOKEN" in err
    assert not (tmp_path / "run").exists()


def test_an_unknown_revision_is_a_clear_error(hub):
    with pytest.raises(HubError, match=f"'{REPO}' on {hub.url} has no revision 'v9'"):
        moescope.Checkpoint(REPO, download=True, revision="v9")


def test_inspect_download_reads_shard_headers_only(checkpoint, hub, capsys):
    path, _ = checkpoint
    code, out, err = cli(capsys, "inspect", REPO, "--download", "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["num_files"] == SHARDS
    assert facts["checkpoint_bytes"] == sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert hub.downloads() == []


def test_a_single_file_repo_streams_and_a_bin_only_repo_is_refused(checkpoint, hub, tmp_path, capsys):
    _, reference = checkpoint
    code, _, err = cli(capsys, "weights", SINGLE_REPO, "--download", "--evict", "--layers", "0",
                       "--out", str(tmp_path / "single"), *FAST)
    assert code == 0, err
    assert_same_results(moescope.load_results(tmp_path / "single"), reference, [0])
    assert [h.filename for h in hub.log if h.method == "GET" and h.range is None] == [
        "config.json", "model.safetensors"]  # no index on the hub: the one file, once
    assert snapshot_files(hub, SINGLE_REPO) == ["config.json"]  # evicted after its last layer

    code, _, err = cli(capsys, "weights", BIN_REPO, "--download", "--out", str(tmp_path / "bin"))
    assert code == 2 and BIN_REPO in err and "pytorch_model" in err and "huggingface-cli download" in err
    assert not (tmp_path / "bin").exists()


def test_evict_needs_download(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main(["weights", str(path), "--evict", "--out", str(tmp_path / "run")]) == 2
    assert "--evict" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_tensor_names_are_what_a_layer_reads(checkpoint, tiny):
    path, _ = checkpoint
    model = open_model(path)
    moe = [n for n in model.checkpoint.keys() if n.startswith("model.layers.2.block_sparse_moe.")]
    assert sorted(model.tensor_names(2)) == sorted(moe)
    assert sorted(model.tensor_names(2, ["gate"])) == sorted(n for n in moe if n.endswith((".gate.weight", ".w1.weight")))
    deepseek = open_model(tiny("deepseek").path)  # layer 0 is dense; MoE layers add the merged shared experts
    assert all(".mlp." in n and "experts" not in n for n in deepseek.tensor_names(0))
    assert any("shared_experts" in n for n in deepseek.tensor_names(1))
