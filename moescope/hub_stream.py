"""Hub streaming (``--download``): a hub checkpoint whose shards are downloaded when first read and, with
``--evict``, deleted again once no remaining layer needs them.

Only config.json and the index are downloaded up front. Each shard's header is read with an HTTP Range request
(or from the cache), so the whole checkpoint is validated before any shard is fetched; a shard is downloaded the
first time one of its tensors is read. Every download goes through ``huggingface_hub.hf_hub_download``, pinned
to the commit config.json came from, into the Hugging Face cache: ``HF_ENDPOINT``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` apply, interrupted transfers resume, and a partial download never appears
under a shard's name (huggingface_hub writes a ``*.incomplete`` file and renames it when complete).

Eviction deletes only what this run added to the cache: shards that were cached before the run, config.json,
the index and blobs shared with other revisions stay.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from huggingface_hub import constants, hf_hub_download, hf_hub_url
from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                   RepositoryNotFoundError, RevisionNotFoundError, build_hf_headers,
                                   hf_raise_for_status, http_backoff)

from .checkpoint import TensorInfo, parse_index, parse_safetensors_header, read_safetensors_header
from .errors import ConfigNotFoundError, CorruptCheckpointError, HubError, MissingShardError, MoescopeError

if TYPE_CHECKING:
    from .arch.adapter import MoEModel

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PROBE_BYTES = 64 << 10  # first Range request per shard header; more is fetched if the header is longer


class HubShards:
    """The shards of one hub repo at one commit, fetched into the Hugging Face cache on demand.

    Implements ``checkpoint.ShardSource``: ``files`` and ``declared`` (from the index), ``header(file)``,
    ``size(file)``, ``fetch(file)`` and ``evict(file)``. ``directory`` is the cache snapshot directory that
    holds config.json and the index, and where each shard appears once fetched.
    """

    def __init__(self, repo_id: str, directory: Path, files: list[Path], declared: dict[str, Path]):
        self.repo_id, self.directory, self.files, self.declared = repo_id, directory, files, declared
        self.commit = directory.name
        self._blobs = directory.parent.parent / "blobs"
        self._cached_before = {f.name for f in files if f.is_file()}
        self._blobs_before = set(os.listdir(self._blobs)) if self._blobs.is_dir() else set()
        self._sizes: dict[Path, int] = {}
        self._remote_headers: dict[Path, dict[str, TensorInfo]] = {}

    @classmethod
    def open(cls, repo_id: str, revision: str | None = None) -> "HubShards":
        """Download config.json of ``repo_id`` at ``revision`` (default: main), which pins the commit, and the
        index; no shard is downloaded."""
        try:
            config = _download(repo_id, "config.json", revision)
        except EntryNotFoundError:
            raise ConfigNotFoundError(
                f"the hub repo '{repo_id}' has no config.json; expected a Hugging Face model checkpoint "
                "(config.json + safetensors shards). Check the model id.") from None
        directory = config.parent
        index = _find_index(repo_id, directory)
        if index is None:
            return cls(repo_id, directory, [directory / SINGLE], {})
        declared = parse_index(index.read_bytes(), directory, index)
        return cls(repo_id, directory, sorted(set(declared.values())), declared)

    # -- checkpoint.ShardSource ------------------------------------------------------------------------------
    def header(self, file: Path) -> dict[str, TensorInfo]:
        """The tensor entries of shard ``file``: from the cache when it is there, else from a Range request."""
        if file.is_file():
            self._sizes[file] = file.stat().st_size
            return read_safetensors_header(file)
        if _offline():
            raise _offline_error(self.repo_id, file.name)
        url = hf_hub_url(self.repo_id, file.name, revision=self.commit)
        reader = _RangeReader(url)
        with _hub_errors(self.repo_id, file.name, self.commit):
            try:
                size = reader.open()
            except EntryNotFoundError:
                raise self._missing(file) from None
            infos = parse_safetensors_header(reader.read, size, file, url)
        self._sizes[file], self._remote_headers[file] = size, infos
        return infos

    def size(self, file: Path) -> int:
        """Size in bytes of shard ``file`` (known once its header was read)."""
        if file not in self._sizes:
            self.header(file)
        return self._sizes[file]

    def fetch(self, file: Path) -> Path:
        """Make shard ``file`` local (download it into the cache unless it is there) and return its path."""
        if file.is_file():
            return file
        try:
            local = _download(self.repo_id, file.name, revision=self.commit)
        except EntryNotFoundError:
            raise self._missing(file) from None
        self._check_same_header(file, local)
        return local

    def evict(self, file: Path) -> bool:
        """Delete shard ``file`` from the cache (snapshot entry, and its blob unless another revision had it)
        if this run downloaded it; return whether anything was deleted."""
        if file.name in self._cached_before or not os.path.lexists(file):
            return False
        blob = Path(os.path.realpath(file)) if file.is_symlink() else None
        file.unlink()
        if blob is not None and blob.parent == self._blobs.resolve() and blob.name not in self._blobs_before:
            blob.unlink(missing_ok=True)
        return True

    # -- internals -------------------------------------------------------------------------------------------
    def _missing(self, file: Path) -> MissingShardError:
        if file.name == SINGLE and not self.declared:
            return MissingShardError(
                f"the hub repo '{self.repo_id}' has neither {INDEX} nor {SINGLE} at commit {self.commit}: "
                "--download streams safetensors checkpoints. For pytorch_model*.bin shards, download the model "
                f"(`huggingface-cli download {self.repo_id}`) and pass its directory.")
        return MissingShardError(
            f"the index of '{self.repo_id}' names shard '{file.name}', which the hub does not have at commit "
            f"{self.commit}. The repo is incomplete: ask its owner, or use another revision.")

    def _check_same_header(self, file: Path, local: Path) -> None:
        """A downloaded shard must hold the tensors its header promised when read remotely."""
        promised = self._remote_headers.get(file)
        if promised is None:
            return
        found = read_safetensors_header(local)
        shapes = {n: (i.dtype, i.shape) for n, i in found.items()}
        if shapes != {n: (i.dtype, i.shape) for n, i in promised.items()}:
            raise CorruptCheckpointError(
                f"'{local}' (just downloaded) holds other tensors than its header on the hub promised. Delete it "
                "from the Hugging Face cache and run again.")


def shard_files(model: "MoEModel", layer: int, matrices: Sequence[str]) -> set[Path]:
    """The shards holding the tensors the static analyses of ``matrices`` of ``layer`` read."""
    return {model.checkpoint.info(name).file for name in model.tensor_names(layer, matrices)}


class ShardEvictor:
    """Deletes, after each finished layer, the downloaded shards that no remaining layer reads (``--evict``)."""

    def __init__(self, models: list["MoEModel | None"], layers: list[int], matrices: Sequence[str]):
        self.models = [m for m in models if m is not None]
        self.needs = [{layer: shard_files(m, layer, matrices) for layer in layers} for m in self.models]
        self.remaining = list(layers)

    def layer_done(self, layer: int) -> list[Path]:
        """Record ``layer`` as written; delete and return the shards nothing left needs."""
        self.remaining.remove(layer)
        removed = []
        for model, needs in zip(self.models, self.needs):
            keep = set().union(*(needs[l] for l in self.remaining))
            removed += model.checkpoint.evict(keep)
        return removed


class _RangeReader:
    """Reads a remote file front to back with HTTP Range requests, at least ``PROBE_BYTES`` at a time."""

    def __init__(self, url: str):
        self.url, self.data, self.position, self.total = url, b"", 0, 0

    def open(self) -> int:
        """Fetch the first block; return the file's size."""
        self._fetch(PROBE_BYTES)
        return self.total

    def read(self, n: int) -> bytes:
        end = self.position + n
        if end > len(self.data) and len(self.data) < self.total:
            self._fetch(max(end, len(self.data) + PROBE_BYTES))
        chunk = self.data[self.position:end]
        self.position += len(chunk)
        return chunk

    def _fetch(self, end: int) -> None:
        """Append bytes ``[len(data), end)`` (fewer at the end of the file)."""
        start = len(self.data)
        headers = {**build_hf_headers(), "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        response = http_backoff("GET", self.url, headers=headers)
        hf_raise_for_status(response)
        if response.status_code == 206:  # "Content-Range: bytes start-last/total"
            self.total = int(response.headers["Content-Range"].rsplit("/", 1)[-1])
            self.data += response.content
        else:  # the server ignored the Range header and sent the whole file
            self.data = response.content
            self.total = len(self.data)


def _find_index(repo_id: str, directory: Path) -> Path | None:
    """The index at the commit of snapshot ``directory`` (downloaded), or None for a single-file checkpoint."""
    if _offline() and not (directory / INDEX).is_file() and (directory / SINGLE).is_file():
        return None  # a cached single-file checkpoint: offline, the hub cannot be asked whether an index exists
    try:
        return _download(repo_id, INDEX, revision=directory.name)
    except EntryNotFoundError:
        return None


def _download(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """``hf_hub_download`` into the cache, with its errors turned into moescope errors (a missing file into
    huggingface_hub's ``EntryNotFoundError``, for the caller to explain)."""
    with _hub_errors(repo_id, filename, revision):
        return Path(hf_hub_download(repo_id, filename, revision=revision))


def _offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def _offline_error(repo_id: str, filename: str) -> HubError:
    return HubError(
        f"'{filename}' of '{repo_id}' is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and offline "
        "mode is on (HF_HUB_OFFLINE is set), so it cannot be downloaded. Unset HF_HUB_OFFLINE to download it, or "
        "run on a machine whose cache holds the model.")


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


@contextmanager
def _hub_errors(repo_id: str, filename: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's and the network's errors into ``HubError``s that say what to do.

    A file the hub does not have (``EntryNotFoundError`` for a repo that exists) passes through unchanged:
    what it means depends on the file.
    """
    where = f"'{repo_id}' on {constants.ENDPOINT}"
    try:
        yield
    except MoescopeError:
        raise
    except GatedRepoError:
        raise HubError(f"{where} is a gated model: accept its conditions on the model page, then log in "
                       "(`hf auth login`) or set HF_TOKEN to a token of that account.") from None
    except RepositoryNotFoundError:
        raise HubError(f"model {where} was not found. Check the id's spelling; a private model also needs a token "
                       "with access to it (set HF_TOKEN or run `hf auth login`).") from None
    except RevisionNotFoundError:
        raise HubError(f"{where} has no revision '{revision or 'main'}' (a typo, or the repo's history was "
                       "rewritten?). Check the revision, or leave it out to use the main branch.") from None
    except LocalEntryNotFoundError as exc:
        if _offline():
            raise _offline_error(repo_id, filename) from None
        raise HubError(f"cannot download '{filename}' of {where}, and it is not in the local Hugging Face cache "
                       f"({_first_line(exc.__cause__ or exc)}). Check the network connection and HF_ENDPOINT, "
                       "then run again.") from None
    except EntryNotFoundError:
        raise
    except HfHubHTTPError as exc:
        raise HubError(f"the hub answered '{filename}' of {where} with an error: {_first_line(exc)}. "
                       "Run again later; shards already downloaded stay in the cache.") from None
    except Exception as exc:  # the network failed mid-transfer (after huggingface_hub's retries), disk full, ...
        raise HubError(f"downloading '{filename}' of {where} failed ({type(exc).__name__}: {_first_line(exc)}). "
                       "Run again: shards already downloaded stay in the cache, and nothing partial is "
                       "kept under a shard's name.") from None
