"""Checks of inputs that are well-formed but wrong: contradictory config values, and expert weights that hold
NaN / inf or are all zero.

``check_config`` runs whenever a config.json is read (``Checkpoint``). The weight checks are building blocks
for the analyses: ``scan_members`` finds the members of a layer whose matrix is non-finite or zero (streamed,
in bounded memory); the returned ``MemberHealth`` warns (``NonFiniteWeightsWarning``), says which members to
keep, turns square tables over the kept members back into tables over all members (NaN rows / columns for
the others: a cosine with a zero or NaN vector is undefined, never 0), and records what was left out.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .config_keys import MISSING, lookup
from .errors import ConfigError, NonFiniteWeightsError, NonFiniteWeightsWarning

# -- config.json ------------------------------------------------------------------------------------------------

_FIX = "Fix config.json, or use the one that came with the weights."


def _first(config: Mapping, aliases: Sequence[str]) -> tuple[str, Any]:
    """The first alias present with a non-null value (the adapter's rule), or ``(aliases[0], MISSING)``."""
    for alias in aliases:
        value = lookup(config, alias)
        if value is not MISSING and value is not None:
            return alias, value
    return aliases[0], MISSING


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# canonical key -> (smallest, largest) allowed value; each must be an integer when present. The upper bounds
# are far above any real model and keep a damaged value from turning into hours of work or an overflow.
_BIG = 1 << 24
_SIZES = {"hidden_size": (1, _BIG), "num_layers": (1, 10_000), "num_experts": (0, 100_000), "top_k": (1, 100_000),
          "moe_intermediate_size": (1, _BIG), "intermediate_size": (1, _BIG), "vocab_size": (1, 1 << 26)}
# plain config keys some families' rules and shapes use -> (smallest, largest) integer value; ``_NOT_NULL``
# ones must not be null either (a layer rule cannot use a null)
_INTEGERS = {"first_k_dense_replace": (0, 10_000), "moe_layer_freq": (1, 10_000), "decoder_sparse_step": (1, 10_000),
             "n_group": (1, 100_000), "topk_group": (1, 100_000), "n_shared_experts": (0, 1024),
             "shared_expert_intermediate_size": (1, _BIG), "num_attention_heads": (1, 1 << 16),
             "num_key_value_heads": (1, 1 << 16), "max_position_embeddings": (1, 1 << 30), "head_dim": (1, 1 << 16)}
_NOT_NULL = ("first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step")
_NUMBERS = ("routed_scaling_factor", "rms_norm_eps", "rope_theta")
_BOOLEANS = ("norm_topk_prob", "tie_word_embeddings")


def check_config(config: Mapping[str, Any], source: str | Path = "config.json") -> None:
    """Refuse a config.json whose generic fields are of the wrong type, out of range or contradictory.

    Only keys that are present are checked (families need different ones; the adapter reports missing keys).
    Raises ``ConfigError`` saying which key, what it holds, what was expected and what to do.
    """
    from .arch.spec import CONFIG_KEY_ALIASES

    def bad(key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"'{source}': '{key}' is {_show(value)}; expected {expected}. {_FIX}")

    architectures = config.get("architectures")
    if architectures is not None and (not isinstance(architectures, list)
                                      or not all(isinstance(a, str) for a in architectures)):
        raise bad("architectures", architectures, 'a list of class names like ["MixtralForCausalLM"]')
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise bad("model_type", model_type, 'a string like "mixtral"')
    found: dict[str, tuple[str, int]] = {}
    for canonical, (low, high) in _SIZES.items():
        key, value = _first(config, CONFIG_KEY_ALIASES[canonical])
        if value is MISSING:
            continue
        if not _is_int(value) or not low <= value <= high:
            raise bad(key, value, f"an integer from {low} to {high}")
        found[canonical] = (key, value)
    for key, (low, high) in _INTEGERS.items():
        if key not in config or (config[key] is None and key not in _NOT_NULL):
            continue
        if not _is_int(config[key]) or not low <= config[key] <= high:
            raise bad(key, config[key], f"an integer from {low} to {high}")
    for key in _NUMBERS:
        value = config.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value)):
            raise bad(key, value, "a finite number")
    for key in _BOOLEANS:
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            raise bad(key, value, "true or false")
    layers = config.get("mlp_only_layers")
    if layers is not None and (not isinstance(layers, list) or not all(_is_int(l) for l in layers)):
        raise bad("mlp_only_layers", layers, "a list of layer numbers")
    if "top_k" in found and found.get("num_experts", (None, 0))[1] > 0:
        (k_key, k), (e_key, e) = found["top_k"], found["num_experts"]
        if k > e:
            raise ConfigError(
                f"'{source}': {k_key} = {k} asks every token to use more experts than the {e} there are "
                f"({e_key}); expected top-k <= number of experts. The config is inconsistent. {_FIX}")
    groups, top_groups = config.get("n_group"), config.get("topk_group")
    if groups is not None and top_groups is not None and top_groups > groups:
        raise ConfigError(f"'{source}': topk_group = {top_groups} selects more expert groups than the n_group = "
                          f"{groups} there are; expected topk_group <= n_group. {_FIX}")
    if groups is not None and found.get("num_experts", (None, 0))[1] % groups:
        e_key, e = found["num_experts"]
        raise ConfigError(f"'{source}': {e_key} = {e} experts cannot be split into n_group = {groups} equal "
                          f"groups; expected a multiple of n_group. {_FIX}")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads is not None and kv is not None and heads % kv:
        raise ConfigError(f"'{source}': num_attention_heads = {heads} is not a multiple of num_key_value_heads = "
                          f"{kv}; expected each key/value head to serve a whole number of query heads. {_FIX}")
    _check_family_rules(config, source)


def _check_family_rules(config: Mapping[str, Any], source: str | Path) -> None:
    """Evaluate the detected family's config-derived facts (layer rule, routing, widths) once, so a value of the
    wrong type or a null that a rule uses is a ``ConfigError`` here instead of a crash later.

    Errors the adapter itself reports as ``MoescopeError`` (a missing key, an unknown architecture) are left to
    it: they surface, with their own message, when the model is opened.
    """
    from .arch.adapter import MoEModel
    from .arch.registry import detect_family
    from .errors import MoescopeError

    try:
        family = detect_family(config)
        model = MoEModel.from_config(config, family)
    except MoescopeError:
        return
    except _RULE_ERRORS as exc:
        raise ConfigError(f"'{source}': a size or count has an unusable value ({type(exc).__name__}: "
                          f"{str(exc)[:100]}); expected integers. {_FIX}") from None
    steps = [(f"the rule for which layers are MoE layers ({family.moe_layer!r})", lambda: model.moe_layers),
             ("the routing rule", lambda: model.routing)]
    if family.is_moe:
        steps.append(("the expert width", lambda: model.expert_width))
    if family.shared is not None:
        steps.append(("the shared experts' count and width", lambda: (model.num_shared_members, model.shared_width)))
    if family.dense is not None:
        steps.append(("the dense FFN width", lambda: model.dense_width))
    for what, step in steps:
        try:
            step()
        except MoescopeError:
            return
        except _RULE_ERRORS as exc:
            raise ConfigError(
                f"'{source}': {what} of the {family.title} family cannot be evaluated on this config "
                f"({type(exc).__name__}: {str(exc)[:100]}): a key it uses is null or of the wrong type. "
                f"Expected the values a {family.title} config.json holds. {_FIX}") from None


_RULE_ERRORS = (TypeError, ValueError, ArithmeticError, KeyError, AttributeError, IndexError, RecursionError)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- expert weights ---------------------------------------------------------------------------------------------

RowReader = Callable[[int, int], torch.Tensor]   # (start, stop) -> rows [stop-start, cols] of one member


@dataclass
class MemberHealth:
    """Which members of a layer (for one matrix) hold NaN / inf or are all zero, and what to do about it."""

    labels: list[str]
    nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)   # label -> {"nan": n, "inf": n}
    zero: list[str] = field(default_factory=list)                         # labels with a zero-norm matrix

    @property
    def excluded(self) -> list[str]:
        """Members left out of the analyses (non-finite or zero), in label order."""
        bad = set(self.nonfinite) | set(self.zero)
        return [label for label in self.labels if label in bad]

    @property
    def keep(self) -> list[int]:
        """Indices (into ``labels``) of the members the analyses use."""
        bad = set(self.excluded)
        return [i for i, label in enumerate(self.labels) if label not in bad]

    @property
    def ok(self) -> bool:
        return not self.excluded

    def table(self) -> dict[str, Any]:
        """What the results record: ``{"nonfinite_members": {label: {"nan": n, "inf": n}}, "zero_norm_members":
        [...], "excluded_members": [...]}``."""
        return {"nonfinite_members": dict(self.nonfinite), "zero_norm_members": list(self.zero),
                "excluded_members": self.excluded}

    def describe(self) -> str:
        parts = [f"{label} ({counts['nan']} NaN, {counts['inf']} inf)" for label, counts in self.nonfinite.items()]
        parts += [f"{label} (all zero: its cosine with any member is undefined)" for label in self.zero]
        return ", ".join(parts)

    def warn(self, where: str, stacklevel: int = 2) -> None:
        """Issue one ``NonFiniteWeightsWarning`` naming the excluded members (nothing if all are healthy)."""
        if not self.ok:
            warnings.warn(f"{where}: {self.describe()}; left out of the analyses (their similarities are NaN and "
                          "the results list them under excluded_members). Check the checkpoint: these weights are "
                          "damaged or were never trained.", NonFiniteWeightsWarning, stacklevel=stacklevel + 1)

    def expand(self, square: torch.Tensor) -> torch.Tensor:
        """A ``[k, k]`` table over the kept members -> ``[n, n]`` over all, NaN in excluded rows and columns."""
        keep, n = torch.tensor(self.keep, dtype=torch.long), len(self.labels)
        if square.shape != (len(keep), len(keep)):
            raise ValueError(f"expected a [{len(keep)}, {len(keep)}] table over the kept members, "
                             f"got {tuple(square.shape)}")
        full = torch.full((n, n), math.nan, dtype=square.dtype if square.is_floating_point() else torch.float64,
                          device=square.device)
        full[keep[:, None], keep[None, :]] = square.to(full.dtype)
        return full

    def merge(self, other: "MemberHealth") -> "MemberHealth":
        """Health over the tokens of both (trace shards): NaN / inf counts add up; zero means zero in both."""
        nonfinite = {}
        for label in self.labels:
            counts = [h.nonfinite[label] for h in (self, other) if label in h.nonfinite]
            if counts:
                nonfinite[label] = {k: sum(c[k] for c in counts) for k in ("nan", "inf")}
        return MemberHealth(list(self.labels), nonfinite, [label for label in self.zero if label in other.zero])

    def mask(self, square: torch.Tensor) -> torch.Tensor:
        """A ``[..., n, n]`` table over all members with the excluded rows and columns set to NaN (a copy)."""
        out = square.clone() if square.is_floating_point() else square.double()
        excluded = set(self.excluded)
        bad = [i for i, label in enumerate(self.labels) if label in excluded]
        if bad:
            out[..., bad, :] = math.nan
            out[..., :, bad] = math.nan
        return out


def scan_rows(read: RowReader, rows: int, cols: int, budget_bytes: int = 256 << 20) -> tuple[int, int, float]:
    """(NaN count, inf count, sum of squares of the finite entries) of one member, read in row chunks."""
    step = max(1, budget_bytes // max(cols * 4, 1))
    nan = inf = 0
    squares = 0.0
    for start in range(0, rows, step):
        chunk = read(start, min(start + step, rows))
        if not chunk.is_floating_point():
            chunk = chunk.double()
        isnan = torch.isnan(chunk)
        isinf = torch.isinf(chunk)
        nan += int(isnan.sum())
        inf += int(isinf.sum())
        finite = chunk.masked_fill(isnan | isinf, 0).double()
        squares += float((finite * finite).sum())
    return nan, inf, squares


def scan_members(readers: Sequence[RowReader], labels: Sequence[str], shapes: Sequence[tuple[int, int]],
                 budget_bytes: int = 256 << 20) -> MemberHealth:
    """Scan each member (``readers[i]`` returns rows of a ``shapes[i]`` matrix) for NaN / inf / all zero."""
    health = MemberHealth(list(labels))
    for read, label, (rows, cols) in zip(readers, labels, shapes):
        nan, inf, squares = scan_rows(read, rows, cols, budget_bytes)
        if nan or inf:
            health.nonfinite[label] = {"nan": nan, "inf": inf}
        elif squares == 0.0:
            health.zero.append(label)
    return health


def scan_layer(model, layer: int, matrix: str, labels: Sequence[str] | None = None,
               widths: Sequence[int] | None = None, dense_matrix: torch.Tensor | None = None,
               budget_bytes: int = 256 << 20) -> MemberHealth:
    """Scan every member of an MoE layer's ``matrix`` (routed ``e*``, shared ``shared*``, and ``F`` from
    ``dense_matrix`` if given), reading rows through ``model.member_rows`` in bounded memory."""
    labels = list(labels if labels is not None else model.member_labels(layer))
    widths = list(widths if widths is not None else model.member_widths(layer))
    H = model.hidden_size
    readers, shapes = [], []
    for label, width in zip(labels, widths):
        if label == "F":
            if dense_matrix is None:
                raise ValueError("member F needs dense_matrix")
            readers.append(lambda a, b: dense_matrix[a:b])
        else:
            readers.append(lambda a, b, label=label: model.member_rows(layer, label, matrix, a, b))
        shapes.append((H, width) if matrix == "down" else (width, H))
    return scan_members(readers, labels, shapes, budget_bytes)


def output_health(outputs: torch.Tensor, labels: Sequence[str]) -> MemberHealth:
    """Health of members from their outputs ``[M, T, H]`` (trace): NaN / inf entries, or exactly zero outputs."""
    health = MemberHealth(list(labels))
    for label, out in zip(labels, outputs):
        nan, inf = int(torch.isnan(out).sum()), int(torch.isinf(out).sum())
        if nan or inf:
            health.nonfinite[label] = {"nan": nan, "inf": inf}
        elif not bool(out.any()):
            health.zero.append(label)
    return health


def nonfinite_tokens(states: torch.Tensor) -> int:
    """How many tokens (rows) of ``states`` hold NaN / inf."""
    return int((~torch.isfinite(states)).reshape(states.shape[0], -1).any(1).sum())


def poisoned_states_error(layer: int, tokens: int, total: int,
                          what: str = "hidden states entering") -> NonFiniteWeightsError:
    """The error for states of ``layer`` that hold NaN / inf for ``tokens`` of ``total`` tokens."""
    return NonFiniteWeightsError(
        f"the {what} layer {layer} hold NaN/inf for {tokens} of {total} tokens: weights of an earlier "
        "layer (see the warnings above) are non-finite and the forward pass carried them on, so routing at "
        f"layer {layer} and after cannot be analysed. Layers before it were written. Repair the checkpoint "
        "(re-download the damaged shard), or trace only the layers before it with --layers.")


def check_finite_states(states: torch.Tensor, layer: int, what: str = "hidden states entering") -> None:
    """Raise ``NonFiniteWeightsError`` if the states a layer sees hold NaN / inf (an earlier layer's damaged
    weights poisoned the forward pass: routing there and after means nothing)."""
    tokens = nonfinite_tokens(states)
    if tokens:
        raise poisoned_states_error(layer, tokens, states.shape[0], what)


def first_nonfinite_layer(states: Mapping[int, torch.Tensor]) -> int | None:
    """The first layer (of ``{layer: states it sees}``) whose states hold NaN / inf, or None if all are finite.

    After a forward pass, layers before it can be analysed; it and the layers after it cannot (see
    ``check_finite_states``, which raises the error to report for it).
    """
    for layer in sorted(states):
        if not bool(torch.isfinite(states[layer]).all()):
            return layer
    return None
