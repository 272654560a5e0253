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
from typing import Callable, Iterable, Iterator, Protocol

import torch

from .errors import (ConfigError, CorruptCheckpointError, MissingShardError, TensorNotFoundError,
                     UnsafeCheckpointError, UnsupportedDtypeError)
from .hub import resolve_checkpoint

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


_DOWNLOAD_AGAIN = "The file is truncated or corrupt: download it again."


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate the header of the safetensors file ``path`` without touching the tensor data.

    See ``parse_safetensors_header`` for what is checked. Raises ``CorruptCheckpointError``
    (``UnsupportedDtypeError`` for an unknown dtype, ``MissingShardError`` for a missing file) otherwise.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            return parse_safetensors_header(handle.read, size, path)
    except FileNotFoundError:
        raise MissingShardError(f"weight file '{path}' does not exist (it vanished while being read?). "
                                "Download the missing shard and run again.") from None
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read '{path}' ({exc.strerror or exc}): expected a readable "
                                     "safetensors file. Check its permissions or download it again.") from None


def parse_safetensors_header(read: Callable[[int], bytes], size: int, path: Path,
                             where: str | None = None) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header read front to back through ``read(n)`` from a ``size``-byte file.

    Checks what the safetensors format requires, so a file that passes is one ``safe_open`` reads: an 8-byte
    little-endian header length within the file, a UTF-8 JSON object, string-to-string ``__metadata__``, every
    entry with a known dtype, a shape of non-negative integers and ``data_offsets`` whose span matches the
    shape, and offsets that tile the data section exactly (no overlaps, no holes, nothing after the last
    tensor). The tensors are placed in ``path``; messages name ``where`` (default: ``path``), e.g. the URL of a
    file on the hub whose header is read with Range requests. Raises ``CorruptCheckpointError``
    (``UnsupportedDtypeError`` for an unknown dtype) otherwise.
    """
    where = str(path) if where is None else where
    head = read(8)
    if len(head) < 8:
        raise CorruptCheckpointError(
            f"'{where}' is {size} bytes: too short for a safetensors file (expected an 8-byte header "
            f"length followed by a JSON header). {_DOWNLOAD_AGAIN}")
    (length,) = struct.unpack("<Q", head)
    if length > size - 8:
        raise CorruptCheckpointError(
            f"'{where}' declares a {length}-byte header but the file holds {size - 8} bytes after the "
            f"length field: the header is corrupt or the file is truncated. Download it again.")
    if length > _MAX_HEADER:
        raise CorruptCheckpointError(
            f"'{where}' declares a {length}-byte header; safetensors headers are at most {_MAX_HEADER} "
            f"bytes. {_DOWNLOAD_AGAIN}")
    raw = read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(
            f"'{where}' has a header that is not valid UTF-8 JSON ({type(exc).__name__}: {str(exc)[:100]}). "
            f"{_DOWNLOAD_AGAIN}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"'{where}' header is a JSON {type(header).__name__}, expected a JSON object "
                                     f"of tensor entries. {_DOWNLOAD_AGAIN}")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"'{where}': __metadata__ must map strings to strings, found "
                                     f"{str(metadata)[:80]}. {_DOWNLOAD_AGAIN}")
    data_size = size - 8 - length
    infos, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name], span = _tensor_info(path, where, name, entry, data_size)
        spans.append((*span, name))
    _check_tiling(where, spans, data_size)
    return infos


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_info(path: Path, where: str, name: str, entry: object,
                 data_size: int) -> tuple[TensorInfo, tuple[int, int]]:
    expected = ('expected {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]} with '
                "non-negative integers")
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CorruptCheckpointError(f"'{where}': header entry for '{name}' is malformed ({expected}; found "
                                     f"{str(entry)[:80]}). {_DOWNLOAD_AGAIN}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if (not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)):
        raise CorruptCheckpointError(f"'{where}': header entry for '{name}' is malformed ({expected}; found shape "
                                     f"{str(shape)[:40]}, data_offsets {str(offsets)[:40]}). {_DOWNLOAD_AGAIN}")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise UnsupportedDtypeError(
            f"'{where}': tensor '{name}' has dtype {dtype}; moescope reads {sorted(SAFETENSORS_DTYPES)}. "
            "Convert the checkpoint to one of these (e.g. bfloat16) first.")
    info = TensorInfo(name, path, dtype, tuple(shape))
    begin, end = offsets
    if not (0 <= begin <= end <= data_size) or end - begin != info.nbytes:
        raise CorruptCheckpointError(
            f"'{where}': tensor '{name}' ({dtype}{list(shape)}) should span {info.nbytes} bytes inside a "
            f"{data_size}-byte data section, but its offsets are [{begin}, {end}]. The file is truncated "
            "or corrupt: download it again.")
    return info, (begin, end)


def _check_tiling(where: str, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors must cover the data section exactly, in offset order: no overlap, no hole, no trailing bytes."""
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise CorruptCheckpointError(
                f"'{where}': tensors '{previous}' and '{name}' overlap (bytes [{begin}, {position}) of the data "
                f"section belong to both); each tensor must own its bytes. {_DOWNLOAD_AGAIN}")
        if begin > position:
            raise CorruptCheckpointError(
                f"'{where}': bytes [{position}, {begin}) of the data section belong to no tensor (a hole before "
                f"'{name}'); safetensors files hold their tensors back to back. {_DOWNLOAD_AGAIN}")
        position, previous = end, name
    if position != data_size:
        raise CorruptCheckpointError(
            f"'{where}': its tensors end at byte {position} of a {data_size}-byte data section; expected them to "
            f"fill it exactly (extra or missing bytes at the end). {_DOWNLOAD_AGAIN}")


class ShardSource(Protocol):
    """Where the shards of a checkpoint that are not on disk yet come from (``hub_stream.HubShards``).

    ``repo_id`` and ``commit`` say what is streamed; ``files`` and ``declared`` are what ``_discover_weights``
    finds on disk for a local checkpoint; ``header`` reads a shard's tensor entries without fetching it, ``fetch``
    makes the shard local (returns its path), ``evict`` removes a shard this run fetched (returns whether it did).
    """

    repo_id: str
    commit: str
    files: list[Path]
    declared: dict[str, Path]

    def header(self, file: Path) -> dict[str, TensorInfo]: ...

    def size(self, file: Path) -> int: ...

    def fetch(self, file: Path) -> Path: ...

    def evict(self, file: Path) -> bool: ...


class Checkpoint:
    """A checkpoint directory opened lazily: ``config``, ``keys()``, ``info(name)``, ``read(name, rows)``.

    With ``download=True`` a hub id (at ``revision``, default main) is streamed: only config.json and the index
    are downloaded up front, each shard the first time one of its tensors is read (see ``moescope.hub_stream``);
    ``evict`` removes them again. Use as a context manager (or call ``close()``) to release file handles.
    """

    def __init__(self, path_or_id: str | Path, *, download: bool = False, revision: str | None = None):
        self.path, self._source = resolve_checkpoint(path_or_id, download=download, revision=revision)
        self.config = _read_config(self.path / "config.json")
        if self._source is None:
            self.format, self.files, declared = _discover_weights(self.path)
        else:
            self.format, self.files, declared = "safetensors", list(self._source.files), self._source.declared
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
        if self._source is not None:
            return sum(self._source.size(f) for f in self.files)
        return sum(f.stat().st_size for f in self.files)

    @property
    def streamed(self) -> bool:
        """Whether shards are fetched on demand (``download=True`` on a hub id)."""
        return self._source is not None

    @property
    def hub(self) -> tuple[str, str] | None:
        """``(repo id, commit)`` of a streamed checkpoint, else None."""
        return None if self._source is None else (self._source.repo_id, self._source.commit)

    # -- reading --------------------------------------------------------------------
    def read(self, name: str, rows: int | slice | None = None) -> torch.Tensor:
        """Read tensor ``name`` (or ``tensor[rows]`` along its first axis), touching only those bytes."""
        info = self.info(name)
        if self.format == "safetensors":
            handle = self._handle(info.file)
            from safetensors import SafetensorError

            try:
                if rows is None:
                    return handle.get_tensor(name)
                return handle.get_slice(name)[rows]
            except SafetensorError as exc:  # the file changed, or is damaged beyond its header
                raise CorruptCheckpointError(
                    f"'{info.file}': reading tensor '{name}' failed ({type(exc).__name__}: {str(exc)[:120]}), "
                    f"although its header was valid. {_DOWNLOAD_AGAIN}") from None
        tensor = self._handle(info.file)[name]
        return (tensor if rows is None else tensor[rows]).clone()

    def close(self) -> None:
        self._handles.clear()

    def evict(self, keep: Iterable[Path]) -> list[Path]:
        """Close and delete the shards not in ``keep`` that were downloaded for this checkpoint; return them.

        Only a streamed checkpoint (``download=True``) deletes anything, and only shards that were not in the
        cache when it was opened; a shard read again later is downloaded again.
        """
        if self._source is None:
            return []
        keep = set(keep)
        removed = []
        for file in self.files:
            if file not in keep:
                self._handles.pop(file, None)
                if self._source.evict(file):
                    removed.append(file)
        return removed

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    # -- internals ------------------------------------------------------------------
    def _read_infos(self, file: Path) -> dict[str, TensorInfo]:
        if self._source is not None:
            return self._source.header(file)
        if self.format == "safetensors":
            return read_safetensors_header(file)
        state = self._handle(file)
        infos = {}
        for name, tensor in state.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise CorruptCheckpointError(
                    f"'{file}' maps {name!r} to a {type(tensor).__name__}; expected a state dict of tensors keyed "
                    "by name. It is not a model checkpoint shard: download it again or convert it to safetensors.")
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
            local = file if self._source is None else self._source.fetch(file)
            handle = self._handles[file] = (_open_safetensors if self.format == "safetensors" else _load_bin)(local)
        return handle


def _open_safetensors(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt")
    except FileNotFoundError:
        raise MissingShardError(f"weight file '{file}' does not exist (it vanished after its header was read?). "
                                "Download the missing shard and run again.") from None
    except Exception as exc:  # SafetensorError: something the header check did not catch
        raise CorruptCheckpointError(f"'{file}' is not a readable safetensors file ({type(exc).__name__}: "
                                     f"{str(exc)[:120]}). {_DOWNLOAD_AGAIN}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """Load a pickled ``.bin`` shard with ``torch.load(weights_only=True)``: tensors and plain containers only."""
    import pickle

    if file.stat().st_size == 0:
        raise CorruptCheckpointError(f"'{file}' is empty (0 bytes); expected a PyTorch checkpoint shard. "
                                     "The download is incomplete: download it again.")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses anything that would run code to load
        raise UnsafeCheckpointError(
            f"'{file}' can only be loaded by unsafe unpickling, which could run arbitrary code: it holds objects "
            f"other than tensors and plain containers ({_first_line(exc)}). moescope refuses to unpickle it. "
            "Convert the file to safetensors with a tool you trust, or use a safetensors copy of the checkpoint."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CorruptCheckpointError(
            f"'{file}' is not a readable PyTorch zip checkpoint ({type(exc).__name__}: {_first_line(exc)}). "
            "It may be truncated or saved in the legacy format: download it again or convert it to safetensors."
        ) from None
    except Exception as exc:  # anything else torch.load raises on a damaged file
        raise CorruptCheckpointError(
            f"'{file}' could not be loaded safely ({type(exc).__name__}: {_first_line(exc)}). moescope never "
            "unpickles arbitrary objects; convert the file to safetensors with a tool you trust.") from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"'{file}' holds a {type(state).__name__}, expected a state dict of tensors. "
                                     "Download it again or convert it to safetensors.")
    return state


def parse_config(raw: bytes, source: str | Path = "config.json") -> dict:
    """Parse the bytes of a config.json and check its generic fields (see ``validate.check_config``).

    Raises ``ConfigError`` for anything that is not a sensible JSON object.
    """
    from .validate import check_config

    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"'{source}' is not UTF-8 text ({exc.reason} at byte {exc.start}); expected a JSON "
                          "config. Fix or re-download config.json.") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"'{source}' is not valid JSON ({type(exc).__name__}: {str(exc)[:120]}). "
                          "Fix or re-download config.json.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{source}' holds a JSON {type(config).__name__}, expected a JSON object. "
                          "Fix or re-download config.json.")
    check_config(config, source)
    return config


def _read_config(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read '{path}' ({exc.strerror or exc}); expected a readable config.json. "
                          "Check its permissions.") from None
    return parse_config(raw, path)


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
        files = [path / single] if (path / single).is_file() else sorted(p for p in path.glob(pattern) if p.is_file())
        if files:
            return fmt, files, {}
    present = sorted(p.name for p in path.iterdir())
    raise MissingShardError(
        f"no weight files in '{path}'. Expected model.safetensors, *.safetensors shards with "
        f"model.safetensors.index.json, or pytorch_model*.bin shards; found {present}. "
        "The download is incomplete: fetch the weight files too.")


def parse_index(raw: bytes, directory: Path, source: str | Path = "index") -> dict[str, Path]:
    """Parse the bytes of a ``*.index.json``: tensor name -> shard path inside ``directory`` (not checked on disk).

    Raises ``CorruptCheckpointError`` unless it is a JSON object whose ``weight_map`` maps names to plain shard
    file names.
    """
    expected = "expected a JSON object whose 'weight_map' maps tensor names to shard file names"
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"'{source}' is not valid JSON ({type(exc).__name__}: {str(exc)[:120]}); "
                                     f"{expected}. Download it again.") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        found = f"a JSON {type(data).__name__}" if not isinstance(data, dict) else \
            ("no 'weight_map'" if "weight_map" not in data else f"a weight_map of type {type(weight_map).__name__}")
        raise CorruptCheckpointError(f"'{source}' is not a valid index ({expected}; found {found}). "
                                     "Download it again.")
    files = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise CorruptCheckpointError(
                f"'{source}' maps tensor '{name}' to {shard!r}; {expected} in the same directory. "
                "The index is corrupt: download it again.")
        files[name] = directory / shard
    return files


def read_index(index: Path) -> dict[str, Path]:
    """Read an index file and check that every shard it names is on disk (``MissingShardError`` otherwise)."""
    return _read_index(Path(index))


def _read_index(index: Path) -> dict[str, Path]:
    try:
        raw = index.read_bytes()
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read '{index}' ({exc.strerror or exc}). Check its permissions or "
                                     "download it again.") from None
    files = parse_index(raw, index.parent, index)
    missing = sorted({f.name for f in files.values() if not f.is_file()})
    if missing:
        raise MissingShardError(
            f"'{index.name}' names {len(missing)} shard(s) that are not in '{index.parent}': {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Download the missing shard(s) and run again.")
    return files
