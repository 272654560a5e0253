"""Results on disk: versioned JSON for scalars and tables, safetensors for matrices, written atomically.

A run directory holds ``manifest.json`` (schema version, moescope version, analysis, options, checkpoint path,
family and config hash), one ``layers/layer{L:03d}.json`` + ``.safetensors`` pair per finished layer, and
``summary.json``. A layer's pair is written tensors first, JSON last: a layer counts as finished only when its
JSON exists, so an interrupted run resumes from the last finished layer. ``load_results`` indexes everything by
dotted keys such as ``layer3.gate.matrix_similarity``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ._version import __version__
from .errors import OutputError, ResultsError
from .writer import TEMP_SUFFIX, atomic_write_bytes, atomic_write_json, output_errors

SCHEMA_VERSION = 1


def config_hash(config: Mapping) -> str:
    """sha256 of config.json in canonical form, so a result can be traced to its checkpoint."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


@dataclass
class RunWriter:
    """Writes one run directory; ``done(layer)`` tells which layers a previous run already finished."""

    out: Path
    manifest: dict

    @classmethod
    def open(cls, out: str | Path, analysis: str, options: Mapping[str, Any], checkpoint: Mapping[str, Any],
             resume: bool = True) -> "RunWriter":
        """Open ``out`` for a run: resume a previous run with the same manifest, or start afresh.

        Refuses (``ResultsError``) a directory holding another run, another schema or a damaged manifest unless
        ``resume`` is False; write failures (not writable, disk full) raise ``OutputError``.
        """
        out = Path(out)
        manifest = {"schema_version": SCHEMA_VERSION, "moescope_version": __version__, "analysis": analysis,
                    "options": dict(options), "checkpoint": dict(checkpoint)}
        if out.exists() and not out.is_dir():
            raise OutputError(f"--out '{out}' is a file, expected a results directory (new or from a previous run). "
                              "Choose another --out.")
        existing = out / "manifest.json"
        if existing.is_file() and resume:
            _check_resumable(out, _read_object(existing, "manifest"), manifest)
        with output_errors(out):
            (out / "layers").mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(out)
            if not resume:
                for f in [*(out / "layers").glob("layer*"), out / "summary.json"]:
                    f.unlink(missing_ok=True)
            atomic_write_json(existing, manifest)
        return cls(out, manifest)

    def _stem(self, layer: int) -> Path:
        return self.out / "layers" / f"layer{layer:03d}"

    def done(self, layer: int) -> bool:
        """Whether a previous run finished ``layer`` (its JSON, written last, and its tensors are both there)."""
        stem = self._stem(layer)
        return stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file()

    def write_layer(self, layer: int, tables: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Write one finished layer: tensors first, JSON last, each atomically.

        If writing fails (disk full, ...), neither file is left behind: the layer stays unfinished and a rerun
        recomputes it. Raises ``OutputError``.
        """
        from safetensors.torch import save

        stem = self._stem(layer)
        blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"layer": str(layer)})
        text = (json.dumps({"layer": layer, **tables}, indent=2) + "\n").encode()
        with output_errors(self.out, f"layer {layer}"):
            atomic_write_bytes(stem.with_suffix(".safetensors"), blob)
            try:
                atomic_write_bytes(stem.with_suffix(".json"), text)
            except BaseException:
                stem.with_suffix(".safetensors").unlink(missing_ok=True)
                raise

    def write_json(self, name: str, data: Mapping[str, Any]) -> None:
        """Write a run-wide table ``{name}.json`` (read back as ``results["{name}.key"]``)."""
        with output_errors(self.out, f"{name}.json"):
            atomic_write_json(self.out / f"{name}.json", dict(data))

    def write_summary(self, summary: Mapping[str, Any]) -> dict:
        """Write ``summary.json``; return what was written."""
        written = {"schema_version": SCHEMA_VERSION, **summary}
        with output_errors(self.out, "summary.json"):
            atomic_write_json(self.out / "summary.json", written)
        return written


def _check_resumable(out: Path, old: dict, new: dict) -> None:
    """Refuse to resume into ``out`` unless its manifest describes the same run as ``new``."""
    if old.get("schema_version") != SCHEMA_VERSION:
        raise ResultsError(
            f"'{out}' holds results of schema {old.get('schema_version')!r} (written by moescope "
            f"{old.get('moescope_version', 'unknown')}); this moescope writes schema {SCHEMA_VERSION} and cannot "
            "resume them. Choose another --out, or pass --no-resume to overwrite them.")
    keys = ("analysis", "options", "checkpoint")
    differ = [k for k in keys if old.get(k) != new[k]]
    if differ:
        raise ResultsError(
            f"'{out}' holds results of another run (different {', '.join(differ)}: e.g. "
            f"{_first_difference(old.get(differ[0]), new[differ[0]])}). "
            "Choose another --out directory, or pass --no-resume to overwrite it.")


def _first_difference(old: Any, new: Any) -> str:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return f"{key}: {_short(old.get(key))} there, {_short(new.get(key))} now"
    return f"{_short(old)} there, {_short(new)} now"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _remove_stale_temporaries(out: Path) -> None:
    """Remove temporary files a killed run left (``.name.random.tmp``): they never count as results."""
    for folder in (out, out / "layers"):
        for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


@dataclass
class Results:
    """Saved results, indexable by dotted keys: ``results["layer3.gate.kendall_tau"]``."""

    path: Path
    manifest: dict
    summary: dict
    tables: dict[str, dict] = field(default_factory=dict)   # run-wide tables, e.g. ``inputs``
    _tables: dict[int, dict] = field(default_factory=dict, repr=False)
    _tensors: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> list[int]:
        return sorted(self._tables)

    def layer(self, layer: int) -> dict:
        """Everything saved for one layer: JSON tables merged with tensors (dotted keys nested by their head)."""
        out: dict[str, Any] = dict(self._tables[layer])
        for key, tensor in self._tensors[layer].items():
            out[key] = tensor
        return out

    def __getitem__(self, key: str) -> Any:
        head, _, rest = key.partition(".")
        if head == "summary":
            return _dig(self.summary, rest)
        if head in self.tables:
            return _dig(self.tables[head], rest)
        if not head.startswith("layer") or not head[5:].isdigit():
            raise KeyError(f"{key!r}: keys look like 'layer3.gate.matrix_similarity' or 'summary.gate_r2_mean'")
        layer = int(head[5:])
        if layer not in self._tables:
            raise KeyError(f"{key!r}: no results for layer {layer}; layers with results: {self.layers}")
        tensors = self._tensors[layer]
        if rest in tensors:
            return tensors[rest]
        prefix = rest + "."
        nested = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            table = _dig(self._tables[layer], rest)
        except KeyError:
            if nested:
                return nested
            raise
        if nested and isinstance(table, Mapping):  # tables and tensors under one key: one nested dict
            return _with_tensors(table, nested)
        return table

    def keys(self) -> Iterator[str]:
        for layer in self.layers:
            yield from (f"layer{layer}.{k}" for k in _flat_keys(self._tables[layer]) if k != "layer")
            yield from (f"layer{layer}.{k}" for k in self._tensors[layer])


def _dig(data: Mapping, dotted: str) -> Any:
    value: Any = data
    for part in dotted.split(".") if dotted else []:
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _with_tensors(table: Mapping, tensors: Mapping[str, Any]) -> dict:
    """A copy of ``table`` with each tensor placed at its dotted path."""
    merged = json.loads(json.dumps(table))
    for dotted, tensor in tensors.items():
        *parents, last = dotted.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = tensor
    return merged


def _flat_keys(data: Mapping, prefix: str = "") -> Iterator[str]:
    for k, v in data.items():
        if isinstance(v, Mapping) and v:
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _read_json(path: Path, what: str) -> Any:
    """Parse one JSON file of a results directory, or raise ``ResultsError`` saying it is damaged."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ResultsError(
            f"'{path}' ({what}) is damaged: expected JSON, could not parse it ({type(exc).__name__}: "
            f"{str(exc)[:120]}). Re-run the analysis into a fresh --out (or with --no-resume).") from None


def _read_object(path: Path, what: str) -> dict:
    data = _read_json(path, what)
    if not isinstance(data, dict):
        raise ResultsError(f"'{path}' ({what}) holds a JSON {type(data).__name__}, expected an object. "
                           "Re-run the analysis into a fresh --out (or with --no-resume).")
    return data


def _read_tensors(path: Path, layer: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ResultsError(f"'{path.parent}' has the JSON of layer {layer} but not its tensors ({path.name}): the "
                           "results are damaged. Delete that layer's JSON and re-run to recompute it.")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ...: the file is damaged
        raise ResultsError(f"'{path}' (tensors of layer {layer}) is damaged ({type(exc).__name__}: "
                           f"{str(exc)[:120]}). Delete layer{layer:03d}.json and re-run to recompute it.") from None


def load_results(path: str | Path) -> Results:
    """Load a run directory written by ``moescope weights`` (or any analysis using ``RunWriter``).

    Raises ``ResultsError`` for a directory that is not a results directory, is from another schema version, or
    is damaged (unparseable JSON, missing or unreadable tensors).
    """
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise ResultsError(f"'{path}' is not a moescope results directory (no manifest.json). "
                           "Pass the --out directory of a moescope run.")
    manifest = _read_object(manifest_file, "manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultsError(f"'{path}' uses results schema {version!r} (written by moescope "
                           f"{manifest.get('moescope_version', 'unknown')}), this moescope reads schema "
                           f"{SCHEMA_VERSION}. Re-run the analysis with this version (or load it with the "
                           "moescope that wrote it).")
    summary_file = path / "summary.json"
    summary = _read_object(summary_file, "summary") if summary_file.is_file() else {}
    tables = {f.stem: _read_object(f, "table") for f in sorted(path.glob("*.json"))
              if f.stem not in ("manifest", "summary")}
    results = Results(path, manifest, summary, tables)
    for table in sorted((path / "layers").glob("layer*.json")):
        data = _read_object(table, "layer table")
        layer = data.get("layer")
        if type(layer) is not int or table.stem != f"layer{layer:03d}":
            raise ResultsError(f"'{table}' names layer {layer!r}, expected the layer in its file name. The results "
                               "are damaged: delete that file and re-run to recompute the layer.")
        results._tables[layer] = data
        results._tensors[layer] = _read_tensors(table.with_suffix(".safetensors"), layer)
    return results
