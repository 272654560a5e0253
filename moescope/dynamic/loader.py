"""Load a checkpoint's model and tokenizer for a forward pass, choosing the class from moescope's family data
(never remote code), and refusing a model whose weights did not all load."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

from ..arch.adapter import MoEModel
from ..errors import ConfigError, CorruptCheckpointError, MoescopeError, OptionsError


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading chatter (moescope checks the load itself and says what is wrong)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def model_class(model: MoEModel):
    """The causal-LM class named by the family's ``execution.model_class``."""
    name = model.family.execution.model_class
    if name.startswith("moescope:"):
        from ..modeling import MODELING

        return MODELING[name.partition(":")[2]][1]
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise MoescopeError(f"transformers {transformers.__version__} has no class {name} for the "
                            f"{model.family.title} family; install a transformers release that has it")
    return cls


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device != "cpu" else torch.float32
    return getattr(torch, dtype)


def load_model(model: MoEModel, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model in eval mode on ``device`` (``map``: spread over devices with accelerate's ``device_map``)."""
    cls = model_class(model)
    kwargs = {"device_map": "auto"} if device == "map" else {}
    if device == "map":
        try:
            import accelerate  # noqa: F401  (transformers' device_map needs it)
        except ImportError:
            raise OptionsError("--device map spreads the model over the GPUs and CPU memory with accelerate's "
                               "device_map: pip install accelerate") from None
    path = str(model.checkpoint.path)
    try:
        with quiet_transformers():
            net, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True, trust_remote_code=False,
                                            **kwargs)
    except Exception as err:  # transformers raises many kinds; each is a checkpoint it cannot load
        raise ConfigError(f"{cls.__name__} could not load '{path}': {type(err).__name__}: {err}") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        shown = ", ".join(missing[:5] or [str(m) for m in mismatched[:5]])
        raise CorruptCheckpointError(
            f"{cls.__name__} left {len(missing) + len(mismatched)} weights of '{path}' unloaded or of the wrong "
            f"shape (e.g. {shown}); they would be random and every number meaningless. Check that config.json "
            "and the shards belong together.")
    if device not in ("map", "cpu"):
        net = net.to(device)
    return net.eval()


def load_tokenizer(model: MoEModel):
    """The checkpoint's tokenizer (``tokenizer.json`` / ``tokenizer_config.json`` next to the weights)."""
    from transformers import AutoTokenizer

    path = model.checkpoint.path
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise MoescopeError(f"'{path}' has no usable tokenizer ({err}). moescope trace needs the tokenizer "
                            "files (tokenizer.json or tokenizer.model + tokenizer_config.json) next to the weights."
                            ) from None
