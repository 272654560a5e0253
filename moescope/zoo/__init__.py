"""Tiny trained models shipped with moescope, so a first command shows real behaviour without any download.

>>> from moescope import zoo
>>> zoo.list_models()
['deepseek-tiny', 'grok1-tiny', 'mistral-tiny', 'mixtral-tiny', 'mixtral-tiny-instruct']
>>> zoo.model_path("mixtral-tiny")          # a checkpoint directory in Mixtral's real layout
>>> zoo.long_text_path()                    # the held-out prose that ``moescope trace`` reads by default

Each model directory holds config.json, the weights (bfloat16, the family's real tensor names and shard naming),
``tokenizer.json`` / ``tokenizer_config.json`` and ``zoo.json`` (how it was trained, validation losses).
``models/README.md`` and ``models/training.json`` summarise them; ``python -m moescope.zoo.train`` rebuilds them.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..data import long_text_path
from ..errors import MoescopeError

MODELS_DIR = Path(__file__).resolve().parent / "models"

__all__ = ["MODELS_DIR", "UnknownModelError", "list_models", "long_text_path", "model_info", "model_path"]


class UnknownModelError(MoescopeError, KeyError):
    """A zoo model name that is not shipped."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def list_models() -> list[str]:
    """Names of the shipped models, sorted."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file())


def model_path(name: str) -> Path:
    """The checkpoint directory of the shipped model ``name`` (usable wherever moescope takes a PATH)."""
    path = MODELS_DIR / name
    if name and "/" not in name and "\\" not in name and (path / "config.json").is_file():
        return path
    available = list_models()
    hint = (f"Available: {', '.join(available)}." if available else
            "None is installed: reinstall moescope with its package data, or build them with "
            "python -m moescope.zoo.train --out DIR.")
    raise UnknownModelError(f"no zoo model named {name!r}. {hint}")


def model_info(name: str) -> dict:
    """What ``zoo.json`` records for ``name``: family, initialisation, steps, parameters, validation losses."""
    return json.loads((model_path(name) / "zoo.json").read_text())
