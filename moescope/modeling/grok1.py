"""Grok-1 (the PyTorch port hpcai-tech/grok-1), clean-room eager PyTorch.

Every layer: ``pre_attn_norm`` -> ``attn`` -> ``post_attn_norm`` -> residual; ``pre_moe_norm`` -> ``moe_block``
-> ``post_moe_norm`` -> residual. ``moe_block`` = router ``gate`` (softmax over the 8 experts in float32, top-2,
not renormalised) + experts ``linear_1(gelu(linear x) * linear_v x)``. Attention scores are multiplied by
``attn_output_multiplier`` and soft-capped at ``max_attn_value``; embeddings are multiplied by
``embedding_multiplier_scale`` and logits by ``output_multiplier_scale``; ``lm_head`` is tied to the embedding.
Norm scales are named ``scale``. config.json has no ``model_type``; :class:`Grok1Config` reads it as is.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from .common import Attention, CausalLM, DecoderModel, GatedMLP, RMSNorm, SparseMoeBlock, TopKRouter


class Grok1Config(PretrainedConfig):
    """Config of the Grok-1 PyTorch port. Defaults are hpcai-tech/grok-1's values.

    ``hidden_act`` is the expert activation: "gelu" (exact, as the PyTorch port) by default; the original JAX code
    used ``jax.nn.gelu`` (tanh approximation, "gelu_pytorch_tanh").
    """

    model_type = "grok1"
    default_theta = 10000.0

    vocab_size: int = 131072
    hidden_size: int = 6144
    intermediate_size: int = 32768
    num_hidden_layers: int = 64
    num_attention_heads: int = 48
    num_key_value_heads: int | None = 8
    attn_output_multiplier: float = 0.08838834764831845
    max_attn_value: float = 30.0
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    num_experts_per_tok: int = 2
    num_experts: int = 8
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    rope_parameters: dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)


class Grok1MLP(GatedMLP):
    """Grok-1 expert: ``linear`` = gate (GELU), ``linear_v`` = up, ``linear_1`` = down."""

    names = ("linear", "linear_v", "linear_1")


def _norm(config: Grok1Config) -> RMSNorm:
    return RMSNorm(config.hidden_size, config.rms_norm_eps, param="scale", scale_in_float32=True)


class Grok1DecoderLayer(nn.Module):
    """Grok-1 block with its four norms around attention and the MoE block."""

    def __init__(self, config: Grok1Config, layer: int):
        super().__init__()
        H = config.hidden_size
        self.attn = Attention(H, config.num_attention_heads, config.num_key_value_heads,
                              scaling=config.attn_output_multiplier, softcap=config.max_attn_value)
        router = TopKRouter(H, config.num_experts, config.num_experts_per_tok, renormalize=False)
        self.moe_block = SparseMoeBlock(
            router, [Grok1MLP(H, config.intermediate_size, config.hidden_act) for _ in range(config.num_experts)])
        self.pre_attn_norm, self.post_attn_norm = _norm(config), _norm(config)
        self.pre_moe_norm, self.post_moe_norm = _norm(config), _norm(config)

    def forward(self, hidden: torch.Tensor, rotary, mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.post_attn_norm(self.attn(self.pre_attn_norm(hidden), rotary, mask))
        return hidden + self.post_moe_norm(self.moe_block(self.pre_moe_norm(hidden)))


class Grok1Model(DecoderModel):
    """Grok-1 decoder stack (``model.*`` tensors); input embeddings are scaled by ``embedding_multiplier_scale``."""

    config_class = Grok1Config
    _no_split_modules = ["Grok1DecoderLayer"]

    def make_layer(self, config, index):
        return Grok1DecoderLayer(config, index)

    def make_norm(self, config):
        return _norm(config)

    @property
    def embedding_scale(self) -> float:
        return self.config.embedding_multiplier_scale


class Grok1ForCausalLM(CausalLM):
    """Grok-1 causal LM: ``model`` + ``lm_head`` tied to ``model.embed_tokens``; logits scaled by
    ``output_multiplier_scale``. (The published config names this class ``Grok1ModelForCausalLM``.)"""

    config_class = Grok1Config
    decoder_class = Grok1Model
    _no_split_modules = ["Grok1DecoderLayer"]

    @property
    def logit_scale(self) -> float:
        return self.config.output_multiplier_scale
