"""Exceptions raised for bad user input. Each says what was expected, what was found and what to do."""
from __future__ import annotations


class MoescopeError(Exception):
    """Base class of every error moescope raises for bad input (the CLI prints these without a traceback)."""


class ConfigNotFoundError(MoescopeError):
    """The checkpoint directory has no config.json."""


class UnknownArchitectureError(MoescopeError):
    """config.json names an architecture moescope has no family description for."""


class MissingShardError(MoescopeError):
    """An index file names a shard that is not on disk (or not on the hub), or no weight files were found."""


class HubError(MoescopeError):
    """The Hugging Face Hub (or the local cache) cannot provide a checkpoint: model not found or gated, offline
    and not cached, network failure."""


class CorruptCheckpointError(MoescopeError):
    """A weight file or index cannot be parsed (truncated file, bad header, bad JSON)."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """A pickled ``.bin`` shard holds objects that only unsafe unpickling could load (moescope refuses)."""


class TensorNotFoundError(MoescopeError):
    """A tensor the family description needs is in none of the shards."""


class ShapeMismatchError(MoescopeError):
    """A tensor's shape disagrees with what config.json implies."""


class UnsupportedDtypeError(MoescopeError):
    """A tensor is stored in a dtype moescope cannot read or dequantise."""


class ConfigError(MoescopeError):
    """config.json lacks a key the family needs, or holds an impossible value."""


class OptionsError(MoescopeError, ValueError):
    """An option has an impossible value (unknown matrix, bad --pairs spec, a layer that is not an MoE layer)."""


class ResultsError(MoescopeError):
    """A results directory is missing, damaged, from another schema version, or from different options."""


class OutputError(ResultsError):
    """An output file could not be written (directory not writable, disk full, ...); nothing half-written is left."""


class NonFiniteWeightsError(MoescopeError):
    """Weights hold NaN or inf where no meaningful analysis can continue (e.g. a forward pass they poison)."""


class InsufficientMemoryError(MoescopeError):
    """A run would need more memory than the machine (or GPU) has free; refused before any heavy work."""


class MoescopeWarning(UserWarning):
    """Something in the input is wrong but the analysis continues (the results record what was affected)."""


class NonFiniteWeightsWarning(MoescopeWarning):
    """Some experts' weights hold NaN / inf, or are all zero: they are left out of the analyses they would void."""
