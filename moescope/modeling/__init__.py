"""Eager PyTorch models of MoE families that transformers lacks (DeepSeekMoE v1, Grok-1), loadable with
``from_pretrained`` from their published checkpoint layouts.

``MODELING`` maps a moescope family name to ``(config class, causal-LM class)``; :func:`register` makes them
known to ``AutoConfig`` / ``AutoModelForCausalLM`` (model types "deepseek" and "grok1").
"""
from __future__ import annotations

from .common import SparseMoeBlock, TopKRouter
from .deepseek import DeepseekConfig, DeepseekForCausalLM, DeepseekModel, DeepseekMoE
from .grok1 import Grok1Config, Grok1ForCausalLM, Grok1Model

MODELING = {
    "deepseek": (DeepseekConfig, DeepseekForCausalLM),
    "grok1": (Grok1Config, Grok1ForCausalLM),
}


def register() -> None:
    """Register the configs and causal-LM classes with the transformers Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_class, model_class in MODELING.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


__all__ = ["MODELING", "DeepseekConfig", "DeepseekForCausalLM", "DeepseekMoE", "DeepseekModel", "Grok1Config",
           "Grok1ForCausalLM", "Grok1Model", "SparseMoeBlock", "TopKRouter", "register"]
