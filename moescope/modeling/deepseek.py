"""DeepSeekMoE v1 (``model_type`` "deepseek", e.g. deepseek-ai/deepseek-moe-16b-base), clean-room eager PyTorch.

A Llama-style decoder whose layers ``>= first_k_dense_replace`` (every ``moe_layer_freq``-th) replace the dense
SwiGLU MLP by ``mlp`` = :class:`DeepseekMoE`: a softmax top-k router ``mlp.gate``, routed SwiGLU experts
``mlp.experts.{e}.{gate,up,down}_proj`` and the ``n_shared_experts`` shared experts merged into one SwiGLU MLP
``mlp.shared_experts`` of width ``n_shared_experts * moe_intermediate_size``, added unweighted.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from .common import Attention, CausalLM, DecoderModel, GatedMLP, RMSNorm, SparseMoeBlock, TopKRouter


class DeepseekConfig(PretrainedConfig):
    """Config of DeepSeekMoE v1; reads the published config.json. Defaults are deepseek-moe-16b-base's values.

    ``aux_loss_alpha`` / ``seq_aux`` are kept for round-tripping; no auxiliary loss is computed.
    """

    model_type = "deepseek"
    default_theta = 10000.0

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    num_experts_per_tok: int | None = 6
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.scoring_func != "softmax":
            raise ValueError(f"DeepSeekMoE supports scoring_func 'softmax' only, got {self.scoring_func!r}")
        super().__post_init__(**kwargs)

    def is_moe_layer(self, layer: int) -> bool:
        """The published rule: MoE iff experts exist, ``layer >= first_k_dense_replace`` and on the frequency."""
        return (self.n_routed_experts is not None and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)


class DeepseekMLP(GatedMLP):
    """SwiGLU MLP ``down_proj(act(gate_proj x) * up_proj x)``: dense layers, routed and shared experts."""


class DeepseekMoE(SparseMoeBlock):
    """Routed experts (``gate``, ``experts``) plus the always-on ``shared_experts`` MLP (unweighted)."""

    def __init__(self, config: DeepseekConfig):
        H, I = config.hidden_size, config.moe_intermediate_size
        top_k = config.num_experts_per_tok
        router = TopKRouter(H, config.n_routed_experts, top_k, renormalize=config.norm_topk_prob and top_k > 1)
        super().__init__(router, [DeepseekMLP(H, I, config.hidden_act) for _ in range(config.n_routed_experts)])
        self.shared_experts = (DeepseekMLP(H, I * config.n_shared_experts, config.hidden_act)
                               if config.n_shared_experts else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = super().forward(hidden_states)
        return out if self.shared_experts is None else out + self.shared_experts(hidden_states)


class DeepseekDecoderLayer(nn.Module):
    """Pre-norm block: ``input_layernorm`` -> ``self_attn``; ``post_attention_layernorm`` -> ``mlp``."""

    def __init__(self, config: DeepseekConfig, layer: int):
        super().__init__()
        H = config.hidden_size
        self.self_attn = Attention(H, config.num_attention_heads, config.num_key_value_heads,
                                   bias=config.attention_bias, dropout=config.attention_dropout)
        self.mlp = (DeepseekMoE(config) if config.is_moe_layer(layer)
                    else DeepseekMLP(H, config.intermediate_size, config.hidden_act))
        self.input_layernorm = RMSNorm(H, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(H, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, rotary, mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rotary, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DeepseekModel(DecoderModel):
    """DeepSeekMoE decoder stack (``model.*`` tensors)."""

    config_class = DeepseekConfig
    _no_split_modules = ["DeepseekDecoderLayer"]

    def make_layer(self, config, index):
        return DeepseekDecoderLayer(config, index)

    def make_norm(self, config):
        return RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(CausalLM):
    """DeepSeekMoE causal LM: ``model`` + untied ``lm_head``."""

    config_class = DeepseekConfig
    decoder_class = DeepseekModel
    _no_split_modules = ["DeepseekDecoderLayer"]
