"""The one checkpoint writer (tiny test checkpoints, bundled models, compressed checkpoints).

Writes shards and the index atomically: each file goes to a temporary name first and is renamed into place,
so an interrupted write never leaves a half-written shard under its real name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: object) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def _atomic_save(path: Path, save) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
