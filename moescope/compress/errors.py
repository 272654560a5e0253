"""Errors of ``moescope compress`` / ``moescope evaluate`` (all :class:`moescope.errors.MoescopeError`)."""
from __future__ import annotations

from ..errors import MoescopeError


class CompressionError(MoescopeError, ValueError):
    """A compression request that cannot be carried out (bad options, impossible expert counts)."""


class ExpertCountError(CompressionError):
    """Pruning or merging more experts than exist, or leaving fewer experts than the router's top-k."""


class UnsupportedLayoutError(CompressionError):
    """The checkpoint's layout or routing rule cannot be rewritten (quantised fp8 / MXFP4 weights, expert biases,
    group-limited or SparseMixer routing, a dense model)."""


class CalibrationError(CompressionError):
    """The calibration text is missing or too short to score the experts."""
