"""Reading dotted keys (``ffn_config.moe_top_k``) out of config.json, with a sentinel for "absent"."""
from __future__ import annotations

from typing import Any, Mapping

MISSING = object()


def lookup(config: Mapping, dotted: str) -> Any:
    """The value at ``dotted`` in nested ``config``, or ``MISSING``."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value
