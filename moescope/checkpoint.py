"""Lazy reader of checkpoint shards: one tensor (or a slice of one) at a time, never the whole model.

Supports ``model.safetensors``, sharded ``*.safetensors`` with ``model.safetensors.index.json``, and
``pytorch_model*.bin`` shards (read with ``torch.load(weights_only=True, mmap=True)``, never unsafe
unpickling). Safetensors headers are validated before any data is read.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import (ConfigError, CorruptCheckpointError, MissingShardError, TensorNotFoundError,
                     UnsupportedDtypeError)
from .hub import resolve_checkpoint_dir

# safetensors dtype code -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
TORCH_TO_CODE = {dtype: code for code, (dtype, _) in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: where it is, its dtype code and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * SAFETENSORS_DTYPES[self.dtype][1]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without touching the tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(
                f"'{path}' is {size} bytes: too short for a safetensors file (expected an 8-byte header "
                "length followed by a JSON header). The file is truncated: download it again.")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise CorruptCheckpointError(
                f"'{path}' declares a {length}-byte header but the file holds {size - 8} bytes after the "
                "length field: the header is corrupt or the file is truncated. Download it again.")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"'{path}' has a header that is not valid JSON ({exc}). The file is corrupt: download it again.") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"'{path}' header is a {type(header).__name__}, expected a JSON object.")
    data_size = size - 8 - length
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(path, name, entry, data_size)
    return infos


def _tensor_info(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"'{path}': header entry for '{name}' is malformed ({exc!r}); expected dtype, shape and "
            "data_offsets. The file is corrupt: download it again.") from None
    if dtype not in SAFETENSORS_DTYPES:
        raise UnsupportedDtypeError(
            f"'{path}': tensor '{name}' has dtype {dtype}; moescope reads {sorted(SAFETENSORS_DTYPES)}. "
            "Convert the checkpoint to one of these (e.g. bfloat16) first.")
    info = TensorInfo(name, path, dtype, shape)
    if not (0 <= begin <= end <= data_size) or end - begin != info.nbytes:
        raise CorruptCheckpointError(
            f"'{path}': tensor '{name}' ({dtype}{list(shape)}) should span {info.nbytes} bytes inside a "
            f"{data_size}-byte data section, but its offsets are [{begin}, {end}]. The file is truncated "
            "or corrupt: download it again.")
    return info


class Checkpoint:
    """A checkpoint directory opened lazily: ``config``, ``keys()``, ``info(name)``, ``read(name, rows)``.

    Use as a context manager (or call ``close()``) to release file handles.
    """

    def __init__(self, path_or_id: str | Path):
        self.path = resolve_checkpoint_dir(path_or_id)
        self.config = _read_config(self.path / "config.json")
        self.format, self.files, declared = _discover_weights(self.path)
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        for file in self.files:
            self._infos.update(self._read_infos(file))
        missing = [n for n, f in declared.items() if n not in self._infos or self._infos[n].file != f]
        if missing:
            files = sorted({declared[n].name for n in missing})
            raise CorruptCheckpointError(
                f"the index of '{self.path}' places {len(missing)} tensors (e.g. '{missing[0]}') in {files}, "
                "but those files do not contain them. The index and the shards disagree: download both again.")

    # -- what is there --------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise TensorNotFoundError(
                f"tensor '{name}' is in none of the {len(self.files)} weight files of '{self.path}' "
                f"({len(self._infos)} tensors). The checkpoint is incomplete or its config.json does not match "
                "its weights: check the download, or that config.json belongs to these shards.") from None

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    # -- reading --------------------------------------------------------------------
    def read(self, name: str, rows: int | slice | None = None) -> torch.Tensor:
        """Read tensor ``name`` (or ``tensor[rows]`` along its first axis), touching only those bytes."""
        info = self.info(name)
        if self.format == "safetensors":
            handle = self._handle(info.file)
            if rows is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[rows]
        tensor = self._handle(info.file)[name]
        return (tensor if rows is None else tensor[rows]).clone()

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    # -- internals ------------------------------------------------------------------
    def _read_infos(self, file: Path) -> dict[str, TensorInfo]:
        if self.format == "safetensors":
            return read_safetensors_header(file)
        state = self._handle(file)
        infos = {}
        for name, tensor in state.items():
            code = TORCH_TO_CODE.get(tensor.dtype)
            if code is None:
                raise UnsupportedDtypeError(
                    f"'{file}': tensor '{name}' has dtype {tensor.dtype}; moescope reads "
                    f"{sorted(str(d) for d in TORCH_TO_CODE)}. Convert the checkpoint first.")
            infos[name] = TensorInfo(name, file, code, tuple(tensor.shape))
        return infos

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = (_open_safetensors if self.format == "safetensors" else _load_bin)(file)
        return handle


def _open_safetensors(file: Path):
    from safetensors import safe_open

    return safe_open(str(file), framework="pt")


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        raise CorruptCheckpointError(
            f"'{file}' is not a readable PyTorch zip checkpoint ({str(exc).splitlines()[0]}). "
            "It may be truncated or saved in the legacy format: download it again or convert it to safetensors.") from None
    except Exception as exc:  # UnpicklingError: weights_only refuses arbitrary objects
        raise CorruptCheckpointError(
            f"'{file}' could not be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0]}). moescope never "
            "unpickles arbitrary objects; convert the file to safetensors with a tool you trust.") from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"'{file}' holds a {type(state).__name__}, expected a state dict of tensors.")
    return state


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"'{path}' is not valid JSON ({exc}). Fix or re-download config.json.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{path}' holds a {type(config).__name__}, expected a JSON object.")
    return config


_INDEXES = (("safetensors", "model.safetensors.index.json", "model.safetensors", "*.safetensors"),
            ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"))


def _discover_weights(path: Path) -> tuple[str, list[Path], dict[str, Path]]:
    """Find the weight files: an index first, then a single file, then a glob (safetensors preferred).

    Returns the format, the files, and the index's name -> file map (empty without an index).
    """
    for fmt, index_name, single, pattern in _INDEXES:
        index = path / index_name
        if index.is_file():
            declared = _read_index(index)
            return fmt, sorted(set(declared.values())), declared
        files = [path / single] if (path / single).is_file() else sorted(path.glob(pattern))
        if files:
            return fmt, files, {}
    present = sorted(p.name for p in path.iterdir())
    raise MissingShardError(
        f"no weight files in '{path}'. Expected model.safetensors, *.safetensors shards with "
        f"model.safetensors.index.json, or pytorch_model*.bin shards; found {present}. "
        "The download is incomplete: fetch the weight files too.")


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(
            f"'{index}' is not a valid index (expected JSON with a 'weight_map' object; {exc!r}). "
            "Download it again.") from None
    files = {name: index.parent / shard for name, shard in weight_map.items()}
    missing = sorted({f.name for f in files.values() if not f.is_file()})
    if missing:
        raise MissingShardError(
            f"'{index.name}' names {len(missing)} shard(s) that are not in '{index.parent}': {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Download the missing shard(s) and run again.")
    return files
