"""Turn what the user typed (a directory or a hub id) into a local checkpoint directory: offline by default, or
with ``download=True`` a hub checkpoint whose shards are fetched on demand (``moescope.hub_stream``)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigNotFoundError

if TYPE_CHECKING:
    from .hub_stream import HubShards

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_id(path_or_id: str | Path) -> bool:
    """Whether ``path_or_id`` reads as ``owner/name`` and names nothing on disk."""
    return (isinstance(path_or_id, str) and bool(_HUB_ID.match(path_or_id))
            and not Path(path_or_id).expanduser().exists())


def resolve_checkpoint(path_or_id: str | Path, download: bool = False,
                       revision: str | None = None) -> tuple[Path, "HubShards | None"]:
    """The local directory of ``path_or_id`` and, for a hub id with ``download``, the source of its shards
    (at ``revision``: a branch, tag or commit; default main).

    Without ``download`` (or for anything on disk) this is ``resolve_checkpoint_dir`` and no shard source.
    """
    if download and is_hub_id(path_or_id):
        from .hub_stream import HubShards

        shards = HubShards.open(str(path_or_id), revision)
        return shards.directory, shards
    return resolve_checkpoint_dir(path_or_id), None


def resolve_checkpoint_dir(path_or_id: str | Path) -> Path:
    """Return the local directory for ``path_or_id``: an existing directory, or a hub id already in the HF cache.

    Nothing is downloaded: hub ids are resolved with ``local_files_only=True``.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return _require_config(path)
    if path.is_file() and path.name == "config.json":
        return path.parent
    if path.is_file():
        raise ConfigNotFoundError(
            f"'{path}' is a file; expected a checkpoint directory (config.json + weight shards). "
            f"Pass the directory that holds it: '{path.parent}'.")
    if isinstance(path_or_id, str) and _HUB_ID.match(path_or_id):
        cached = _cached_snapshot(path_or_id)
        if cached is not None:
            return _require_config(cached)
        raise ConfigNotFoundError(
            f"'{path_or_id}' is neither a directory nor a model in the local Hugging Face cache. "
            "Expected a checkpoint directory with config.json and weight shards. "
            f"Download it first (e.g. `huggingface-cli download {path_or_id}`) or pass its local path; "
            "`moescope weights` and `moescope inspect` can also fetch it as they read it (`--download`)."
        )
    raise ConfigNotFoundError(
        f"checkpoint directory '{path}' does not exist. Expected a directory with config.json and "
        "*.safetensors or pytorch_model*.bin shards, or a hub id in the local Hugging Face cache."
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        return None


def _require_config(path: Path) -> Path:
    if not (path / "config.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:10]
        raise ConfigNotFoundError(
            f"no config.json in '{path}'. Expected a Hugging Face checkpoint directory "
            f"(config.json + weight shards); found: {found or 'an empty directory'}. "
            "Point moescope at the directory that holds config.json."
        )
    return path
