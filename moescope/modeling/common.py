"""Building blocks shared by the DeepSeekMoE and Grok-1 models.

RMSNorm, rotary tables, a padding-aware causal mask, plain eager attention, a gated MLP, a softmax top-k router,
an index-based sparse MoE block, and the decoder / causal-LM skeletons both families fill in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32; its scale parameter is named ``param`` (Grok-1: ``scale``).

    ``scale_in_float32`` multiplies by the scale before casting back (Grok-1), otherwise after (Llama/DeepSeek).
    """

    def __init__(self, hidden_size: int, eps: float, param: str = "weight", scale_in_float32: bool = False):
        super().__init__()
        self.param, self.eps, self.scale_in_float32 = param, eps, scale_in_float32
        self.register_parameter(param, nn.Parameter(torch.ones(hidden_size)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype, scale = hidden_states.dtype, getattr(self, self.param)
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (scale * x).to(dtype) if self.scale_in_float32 else scale * x.to(dtype)


def rotary_tables(position_ids: torch.Tensor, head_dim: int, rope: dict | None,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, S, head_dim]`` of half-split (Llama-style) rotary embeddings; supports linear scaling."""
    rope = rope or {}
    inv_freq = 1.0 / (float(rope.get("rope_theta", 10000.0)) **
                      (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    elif kind != "default":
        raise NotImplementedError(f"rope type {kind!r} is not supported by moescope's eager models")
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, S, D]`` by tables ``[B, S, D]``."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


def position_ids_from_mask(attention_mask: torch.Tensor | None, batch: int, seq: int,
                           device: torch.device) -> torch.Tensor:
    """Positions ``[B, S]`` counted over real tokens only, so left padding does not shift positions."""
    if attention_mask is None:
        return torch.arange(seq, device=device)[None].expand(batch, seq)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_padding_mask(attention_mask: torch.Tensor | None, batch: int, seq: int,
                        device: torch.device) -> torch.Tensor:
    """Additive float32 mask ``[B, 1, S, S]``: 0 where a query may attend (causal, key not padding), else min.

    A finite minimum keeps fully masked rows (queries at left padding) finite instead of NaN.
    """
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    allowed = allowed.expand(batch, 1, seq, seq)
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)


class Attention(nn.Module):
    """Eager multi-head / grouped-query attention with rotary embeddings.

    Scores are ``(q . k) * scaling`` in float32, optionally soft-capped as ``cap * tanh(scores / cap)`` before the
    mask is added (Grok-1's ``max_attn_value``).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, *, scaling: float | None = None,
                 softcap: float | None = None, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim ** -0.5 if scaling is None else scaling
        self.softcap, self.dropout = softcap, dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        B, S, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(B, S, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scaling
        if self.softcap:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        probs = torch.softmax(scores + mask, dim=-1).to(v.dtype)
        probs = F.dropout(probs, p=self.dropout, training=self.training)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, -1)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; ``names`` are the attribute names of (gate, up, down)."""

    names = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, hidden_size: int, width: int, act: str):
        super().__init__()
        gate, up, down = self.names
        self.add_module(gate, nn.Linear(hidden_size, width, bias=False))
        self.add_module(up, nn.Linear(hidden_size, width, bias=False))
        self.add_module(down, nn.Linear(width, hidden_size, bias=False))
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class TopKRouter(nn.Module):
    """Softmax router over all experts (float32), top-k, optionally renormalised.

    ``forward(hidden [..., H])`` returns ``(router_logits [T, E], topk_weights [T, k] float32,
    topk_indices [T, k])`` like transformers 5 routers; ``weight`` is ``[E, H]``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
        router_logits = F.linear(hidden_states, self.weight)
        probs = torch.softmax(router_logits.float(), dim=-1)
        topk_weights, topk_indices = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, topk_weights, topk_indices


class SparseMoeBlock(nn.Module):
    """Routed experts: ``gate`` (a :class:`TopKRouter`) and ``experts`` (a ModuleList of MLPs).

    ``forward(hidden [B, S, H])`` sends every token to its top-k experts by index (tokens keep their positions)
    and sums the expert outputs weighted by the router's top-k weights.
    """

    def __init__(self, router: TopKRouter, experts: list[nn.Module]):
        super().__init__()
        self.gate = router
        self.experts = nn.ModuleList(experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, topk_weights, topk_indices = self.gate(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens, slot = torch.where(topk_indices == e)  # ascending token order
            if tokens.numel():
                y = expert(x[tokens]) * topk_weights[tokens, slot, None]
                out.index_add_(0, tokens, y.to(out.dtype))
        return out.reshape(shape)


class MoEPreTrainedModel(PreTrainedModel):
    """Shared ``PreTrainedModel`` settings and weight init of moescope's eager MoE models."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _supports_sdpa = False
    _supports_flash_attn = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RMSNorm):
            init.ones_(getattr(module, module.param))
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class DecoderModel(MoEPreTrainedModel):
    """``embed_tokens`` -> ``layers`` -> ``norm``. Subclasses provide ``make_layer``/``make_norm`` and may scale
    the input embeddings (``embedding_scale``, applied to ``inputs_embeds`` too)."""

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = self.make_norm(config)
        self.post_init()

    def make_layer(self, config, index: int) -> nn.Module:
        raise NotImplementedError

    def make_norm(self, config) -> nn.Module:
        raise NotImplementedError

    @property
    def embedding_scale(self) -> float:
        return 1.0

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutput:
        """Causal forward; ``attention_mask [B, S]`` (1 = token, 0 = padding) masks keys and sets positions."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden = inputs_embeds * self.embedding_scale if self.embedding_scale != 1.0 else inputs_embeds
        B, S, _ = hidden.shape
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, B, S, hidden.device)
        position_ids = position_ids.expand(B, S)
        mask = causal_padding_mask(attention_mask, B, S, hidden.device)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        rotary = rotary_tables(position_ids, head_dim, self.config.rope_parameters, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, rotary, mask)
        return BaseModelOutput(last_hidden_state=self.norm(hidden))


class CausalLM(MoEPreTrainedModel, GenerationMixin):
    """A :class:`DecoderModel` (``model``) plus ``lm_head``; logits are multiplied by ``logit_scale``.

    ``forward(input_ids, attention_mask=None, labels=None)`` returns logits and, with labels, the shifted
    token cross-entropy (labels of -100 are ignored). No router auxiliary loss. No KV cache: every call (and every
    generate() step) recomputes the whole sequence.
    """

    decoder_class: type[DecoderModel]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = self.decoder_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no KV cache

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, **kwargs):
        """Without a KV cache generate() must feed the whole sequence at every step."""
        kwargs.pop("cache", None)
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=None, **kwargs)

    @property
    def logit_scale(self) -> float:
        return 1.0

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutput:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
