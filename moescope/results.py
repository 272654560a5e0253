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
from .errors import MoescopeError
from .writer import atomic_write_bytes, atomic_write_json

SCHEMA_VERSION = 1


class ResultsError(MoescopeError):
    """A results directory is missing, from another schema version, or from different options."""


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
        out = Path(out)
        manifest = {"schema_version": SCHEMA_VERSION, "moescope_version": __version__, "analysis": analysis,
                    "options": dict(options), "checkpoint": dict(checkpoint)}
        existing = out / "manifest.json"
        if existing.is_file() and resume:
            old = json.loads(existing.read_text())
            same = {k: old.get(k) for k in ("schema_version", "analysis", "options", "checkpoint")} == \
                   {k: manifest[k] for k in ("schema_version", "analysis", "options", "checkpoint")}
            if not same:
                raise ResultsError(
                    f"'{out}' holds results of another run (different checkpoint, options or schema). "
                    "Choose another --out directory, or pass --no-resume to overwrite it.")
        (out / "layers").mkdir(parents=True, exist_ok=True)
        if not resume:
            for f in (out / "layers").glob("layer*"):
                f.unlink()
        atomic_write_json(existing, manifest)
        return cls(out, manifest)

    def _stem(self, layer: int) -> Path:
        return self.out / "layers" / f"layer{layer:03d}"

    def done(self, layer: int) -> bool:
        return self._stem(layer).with_suffix(".json").is_file()

    def write_layer(self, layer: int, tables: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        stem = self._stem(layer)
        blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"layer": str(layer)})
        atomic_write_bytes(stem.with_suffix(".safetensors"), blob)
        atomic_write_json(stem.with_suffix(".json"), {"layer": layer, **tables})

    def write_json(self, name: str, data: Mapping[str, Any]) -> None:
        """Write a run-wide table ``{name}.json`` (read back as ``results["{name}.key"]``)."""
        atomic_write_json(self.out / f"{name}.json", dict(data))

    def write_summary(self, summary: Mapping[str, Any]) -> dict:
        """Write ``summary.json``; return what was written."""
        written = {"schema_version": SCHEMA_VERSION, **summary}
        atomic_write_json(self.out / "summary.json", written)
        return written


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
        if nested:
            return nested
        return _dig(self._tables[layer], rest)

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


def _flat_keys(data: Mapping, prefix: str = "") -> Iterator[str]:
    for k, v in data.items():
        if isinstance(v, Mapping) and v:
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def load_results(path: str | Path) -> Results:
    """Load a run directory written by ``moescope weights`` (or any analysis using ``RunWriter``)."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise ResultsError(f"'{path}' is not a moescope results directory (no manifest.json). "
                           "Pass the --out directory of a moescope run.")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ResultsError(f"'{path}' uses results schema {manifest.get('schema_version')}, this moescope reads "
                           f"schema {SCHEMA_VERSION}. Re-run the analysis with this version.")
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    tables = {f.stem: json.loads(f.read_text()) for f in sorted(path.glob("*.json"))
              if f.stem not in ("manifest", "summary")}
    results = Results(path, manifest, summary, tables)
    for table in sorted((path / "layers").glob("layer*.json")):
        data = json.loads(table.read_text())
        layer = int(data["layer"])
        results._tables[layer] = data
        tensors = table.with_suffix(".safetensors")
        results._tensors[layer] = load_file(str(tensors)) if tensors.is_file() else {}
    return results
