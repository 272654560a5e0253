"""The registry of supported families, loaded from ``arch/families/*.json``, and family detection."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Mapping

from ..errors import UnknownArchitectureError
from .spec import Family

FAMILY_DIR = Path(__file__).parent / "families"


@lru_cache(maxsize=1)
def families() -> dict[str, Family]:
    """All supported families by name (one data file each)."""
    loaded = (Family.load(p) for p in sorted(FAMILY_DIR.glob("*.json")))
    return {f.name: f for f in loaded}


def get_family(name: str) -> Family:
    try:
        return families()[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"no family named '{name}'. Supported families: {', '.join(sorted(families()))}.") from None


def detect_family(config: Mapping) -> Family:
    """Pick the family from ``architectures`` first, then ``model_type`` (never via remote code)."""
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    for family in families().values():
        if any(a in family.architectures for a in architectures):
            return family
    for family in families().values():
        if model_type and model_type in family.model_types:
            return family
    supported = "; ".join(f"{f.name} ({', '.join(f.architectures)})" for f in families().values())
    raise UnknownArchitectureError(
        f"config.json names architectures={architectures} and model_type={model_type!r}, which moescope does "
        f"not know. Supported families: {supported}. To add one, write a family data file "
        "(see docs/families.md).")
