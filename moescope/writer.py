"""The one checkpoint writer (tiny test checkpoints, bundled models, compressed checkpoints).

Writes shards and the index atomically: each file goes to a temporary name first and is renamed into place,
so an interrupted write never leaves a half-written shard under its real name.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .errors import OutputError


TEMP_SUFFIX = ".tmp"  # temporary files are ``.{name}.{random}.tmp`` next to their target


def temp_name_pattern(name: str) -> str:
    """Glob pattern of the temporary files an interrupted ``atomic_write_*`` of ``name`` may leave behind."""
    return f".{name}.*{TEMP_SUFFIX}"


def _write_all(handle, data: bytes, name: str) -> None:
    """Write ``data`` to the open temporary file ``name`` and flush it to disk (tests patch this seam to
    simulate a full disk)."""
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and an atomic rename.

    On any failure (disk full, interrupt) the temporary file is removed and ``path`` is untouched: readers
    see the old file or the new one, never a half-written one. OSErrors propagate unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            _write_all(handle, data, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename == tmp:  # name the file being written, not its temporary stand-in
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space (or choose an --out on another disk) and run again",
    errno.EDQUOT: "the disk quota is exhausted: free some space (or choose an --out on another disk) and run again",
    errno.EACCES: "the directory is not writable: choose an --out you can write to, or fix its permissions",
    errno.EPERM: "the directory is not writable: choose an --out you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose an --out on a writable disk",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another --out",
    errno.EEXIST: "a file is in the way of the directory: choose another --out",
    errno.EISDIR: "a directory is in the way of the file: choose another --out",
}


@contextmanager
def output_errors(target: str | Path, what: str = "results") -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``target`` into an ``OutputError`` that says what to do."""
    try:
        yield
    except OSError as exc:
        advice = _ADVICE.get(exc.errno, "check that the directory exists, is writable and has free space, "
                                        "then run again")
        where = exc.filename or target
        raise OutputError(f"could not write {what} to '{where}' ({exc.strerror or exc}): {advice}. "
                          "Files already finished are kept; nothing half-written was left behind.") from None


def atomic_write_json(path: Path, data: object) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def _atomic_save(path: Path, save) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_checkpoint(path: str | Path, config: Mapping, tensors: Mapping[str, torch.Tensor], *,
                     fmt: str = "safetensors", num_shards: int = 1,
                     shard_name: str = "model-{index:05d}-of-{count:05d}.safetensors",
                     index_name: str | None = "model.safetensors.index.json") -> list[Path]:
    """Write ``config.json`` and ``tensors`` split into ``num_shards`` shards (in insertion order) plus an index.

    ``shard_name`` may use ``{index}`` (1-based), ``{index0}`` (0-based), ``{count}`` and ``{last}`` (count-1).
    With ``index_name=None`` and one shard, the single file is named by ``shard_name`` and no index is written.
    """
    path = Path(path)
    with output_errors(path, "a checkpoint"):
        return _write_checkpoint(path, config, tensors, fmt, num_shards, shard_name, index_name)


def _write_checkpoint(path: Path, config: Mapping, tensors: Mapping[str, torch.Tensor], fmt: str, num_shards: int,
                      shard_name: str, index_name: str | None) -> list[Path]:
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per_shard = -(-len(names) // max(num_shards, 1))
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)] or [[]]
    count = len(groups)
    weight_map, files, total = {}, [], 0
    for i, group in enumerate(groups):
        file = path / shard_name.format(index=i + 1, index0=i, count=count, last=count - 1)
        shard = {n: tensors[n].contiguous() for n in group}
        if fmt == "safetensors":
            from safetensors.torch import save_file
            _atomic_save(file, lambda tmp: save_file(shard, tmp, metadata={"format": "pt"}))
        else:
            _atomic_save(file, lambda tmp: torch.save(shard, tmp))
        files.append(file)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update({n: file.name for n in group})
    if index_name:
        atomic_write_json(path / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic_write_json(path / "config.json", dict(config))
    return files
