"""Tiny checkpoints in the exact real on-disk layouts, for tests, benchmarks and the demo."""
from .builder import BuiltCheckpoint, build_checkpoint, tiny_config

__all__ = ["BuiltCheckpoint", "build_checkpoint", "tiny_config"]
