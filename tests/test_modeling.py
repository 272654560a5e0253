"""moescope.modeling: DeepSeekMoE v1 and Grok-1 load the real layouts and compute what the published models compute.

The reference computations below are written in numpy (float64) from the tensors on disk, read through
moescope's own Checkpoint / MoEModel readers, independently of the torch modules under test.
"""
import copy
import json

import numpy as np
import pytest
import torch
from scipy.special import erf

from moescope.arch import MoEModel, get_family, open_model
from moescope.checkpoint import Checkpoint
from moescope.modeling import MODELING, DeepseekMoE, SparseMoeBlock, TopKRouter, register
from moescope.modeling.deepseek import DeepseekMLP

FAMILIES = ["deepseek", "grok1"]
BLOCK = {"deepseek": "mlp", "grok1": "moe_block"}  # MoE block attribute of a decoder layer
ROLES = {"deepseek": ("gate_proj", "up_proj", "down_proj"), "grok1": ("linear", "linear_v", "linear_1")}


@pytest.fixture(scope="module")
def loaded(tiny):
    """family -> (BuiltCheckpoint, float32 model, loading info)."""
    out = {}
    for family in FAMILIES:
        built = tiny(family)
        model, info = MODELING[family][1].from_pretrained(built.path, dtype=torch.float32, output_loading_info=True)
        out[family] = (built, model.eval(), info)
    return out


def _weights(built) -> dict[str, np.ndarray]:
    with Checkpoint(built.path) as ckpt:
        return {name: ckpt.read(name).double().numpy() for name in ckpt}


# -- loading ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_loads_real_layout_without_missing_or_unexpected_keys(loaded, family):
    built, model, info = loaded[family]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]
    with Checkpoint(built.path) as ckpt:
        on_disk = set(ckpt.keys())
    expected = set(model.state_dict())
    if family == "grok1":  # tied head: not on disk, shares the embedding
        assert "lm_head.weight" not in on_disk
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        expected.discard("lm_head.weight")
    assert expected == on_disk


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_expert_and_router_parameters_equal_canonical_tensors(loaded, family):
    built, model, _ = loaded[family]
    adapter = open_model(built.path)
    roles = dict(zip(("gate", "up", "down"), ROLES[family]))
    layers = model.model.layers
    for key, expected in built.canonical.items():
        kind, layer, *rest = key
        block = getattr(layers[layer], BLOCK[family])
        if kind == "router":
            got = block.gate.weight
            assert torch.equal(adapter.router(layer).float(), got)
        elif kind == "experts":
            got = torch.stack([getattr(e, roles[rest[0]]).weight for e in block.experts])
            assert torch.equal(adapter.experts(layer, rest[0]).float(), got)
        elif kind == "shared":  # one merged MLP on disk and in the module, split into members canonically
            merged = getattr(block.shared_experts, roles[rest[0]]).weight
            got = torch.stack(merged.chunk(len(expected), dim=-1 if rest[0] == "down" else 0))
        elif kind == "dense":
            got = getattr(block, roles[rest[0]]).weight
        else:
            raise AssertionError(f"unexpected canonical key {key}")
        assert got.shape == expected.shape, key
        assert torch.equal(got, expected.float()), key


def test_deepseek_dense_first_layer_and_moe_layers(loaded):
    built, model, _ = loaded["deepseek"]
    moe_layers = MoEModel.from_config(built.config).moe_layers
    assert moe_layers == [1, 2]
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer.mlp, DeepseekMoE) == (i in moe_layers)
    dense = model.model.layers[0].mlp
    assert isinstance(dense, DeepseekMLP) and not any(isinstance(m, TopKRouter) for m in dense.modules())
    assert dense.gate_proj.weight.shape == (built.config["intermediate_size"], built.config["hidden_size"])
    shared = model.model.layers[1].mlp.shared_experts.gate_proj.weight
    assert shared.shape[0] == built.config["n_shared_experts"] * built.config["moe_intermediate_size"]


@pytest.mark.parametrize("family,reference", [(f, r) for f in FAMILIES for r in get_family(f).reference_configs])
def test_config_classes_read_the_real_configs(family, reference):
    real = get_family(family).reference_configs[reference]
    config_class = MODELING[family][0]
    config = config_class.from_dict(dict(real))
    facts = MoEModel.from_config(real)
    if family == "deepseek":
        assert (config.n_routed_experts, config.num_experts_per_tok, config.norm_topk_prob) == (64, 6, False)
        assert [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)] == facts.moe_layers
    else:
        assert "model_type" not in real
        assert (config.num_experts, config.num_experts_per_tok, config.intermediate_size) == (8, 2, 32768)
        assert config.attn_output_multiplier == real["attn_output_multiplier"]
    assert config.rope_parameters["rope_theta"] == real.get("rope_theta", 10000)


def test_register_with_auto_classes_is_idempotent(loaded):
    from transformers import AutoConfig, AutoModelForCausalLM

    register()
    register()
    built, _, _ = loaded["deepseek"]
    model = AutoModelForCausalLM.from_pretrained(built.path, dtype=torch.float32)
    assert type(model) is MODELING["deepseek"][1]
    grok_built, _, _ = loaded["grok1"]
    assert "model_type" not in json.loads((grok_built.path / "config.json").read_text())
    assert isinstance(AutoConfig.for_model("grok1"), MODELING["grok1"][0])


# -- numpy reference -------------------------------------------------------------------------------------
def _silu(x):
    return x / (1 + np.exp(-x))


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _rms(x, scale, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def _mlp(x, gate, up, down, act):
    return (act(x @ gate.T) * (x @ up.T)) @ down.T


def _moe(x, router, experts, top_k, act):
    """Softmax over all experts, top-k, not renormalised; ``experts`` = (gate [E,I,H], up, down [E,H,I])."""
    probs = _softmax(x @ router.T)
    out = np.zeros_like(x)
    for t in range(len(x)):
        for e in np.argsort(-probs[t])[:top_k]:
            out[t] += probs[t, e] * _mlp(x[t], experts[0][e], experts[1][e], experts[2][e], act)
    return out, probs


def _rope(x, theta):
    """x [S, heads, D], positions 0..S-1, half-split rotation."""
    S, _, D = x.shape
    freqs = np.arange(S)[:, None] / theta ** (np.arange(0, D, 2) / D)
    cos, sin = np.cos(np.concatenate([freqs, freqs], -1))[:, None], np.sin(np.concatenate([freqs, freqs], -1))[:, None]
    rotated = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
    return x * cos + rotated * sin


def _attention(x, w, prefix, heads, kv_heads, scaling, softcap=None, theta=10000.0):
    S, H = x.shape
    D = H // heads
    q = _rope((x @ w[prefix + "q_proj.weight"].T).reshape(S, heads, D), theta)
    k = _rope((x @ w[prefix + "k_proj.weight"].T).reshape(S, kv_heads, D), theta)
    v = (x @ w[prefix + "v_proj.weight"].T).reshape(S, kv_heads, D)
    k, v = np.repeat(k, heads // kv_heads, axis=1), np.repeat(v, heads // kv_heads, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * scaling
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(np.tril(np.ones((S, S), bool)), scores, -np.inf)
    out = np.einsum("hqk,khd->qhd", _softmax(scores), v).reshape(S, H)
    return out @ w[prefix + "o_proj.weight"].T


def _experts(adapter, layer):
    return [adapter.experts(layer, m).double().numpy() for m in ("gate", "up", "down")]


def _deepseek_reference(built, ids):
    """Logits of DeepSeekMoE for one sequence, from the checkpoint tensors."""
    cfg, w, adapter = built.config, _weights(built), open_model(built.path)
    eps, heads = cfg["rms_norm_eps"], cfg["num_attention_heads"]
    h = w["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = _rms(h, w[p + "input_layernorm.weight"], eps)
        scaling = (cfg["hidden_size"] // heads) ** -0.5
        h = h + _attention(x, w, p + "self_attn.", heads, cfg["num_key_value_heads"], scaling, theta=cfg["rope_theta"])
        x = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        if layer in adapter.moe_layers:
            routed, _ = _moe(x, w[p + "mlp.gate.weight"], _experts(adapter, layer), cfg["num_experts_per_tok"], _silu)
            shared = _mlp(x, *(w[p + f"mlp.shared_experts.{r}.weight"] for r in ROLES["deepseek"]), _silu)
            h = h + routed + shared
        else:
            h = h + _mlp(x, *(w[p + f"mlp.{r}.weight"] for r in ROLES["deepseek"]), _silu)
    return _rms(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def _grok_reference(built, ids, w, softcap=True):
    """Logits of Grok-1 for one sequence, from tensors ``w`` (the checkpoint's, possibly modified)."""
    cfg, adapter = built.config, open_model(built.path)
    eps = cfg["rms_norm_eps"]
    h = w["model.embed_tokens.weight"][ids] * cfg["embedding_multiplier_scale"]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = _rms(h, w[p + "pre_attn_norm.scale"], eps)
        a = _attention(x, w, p + "attn.", cfg["num_attention_heads"], cfg["num_key_value_heads"],
                       cfg["attn_output_multiplier"], cfg["max_attn_value"] if softcap else None)
        h = h + _rms(a, w[p + "post_attn_norm.scale"], eps)
        x = _rms(h, w[p + "pre_moe_norm.scale"], eps)
        m, _ = _moe(x, w[p + "moe_block.gate.weight"], _experts(adapter, layer), cfg["num_experts_per_tok"], _gelu)
        h = h + _rms(m, w[p + "post_moe_norm.scale"], eps)
    return _rms(h, w["model.norm.scale"], eps) @ w["model.embed_tokens.weight"].T * cfg["output_multiplier_scale"]


# -- routing and block semantics --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_block_and_router_match_numpy(loaded, family):
    built, model, _ = loaded[family]
    adapter = open_model(built.path)
    layer = adapter.moe_layers[-1]
    block = getattr(model.model.layers[layer], BLOCK[family])
    assert isinstance(block, SparseMoeBlock) and isinstance(block.gate, TopKRouter)
    k = built.config["num_experts_per_tok"]
    x = torch.randn(2, 5, built.config["hidden_size"], generator=torch.Generator().manual_seed(1))
    xn = x.reshape(-1, x.shape[-1]).double().numpy()
    router = adapter.router(layer).double().numpy()
    act = _silu if family == "deepseek" else _gelu
    expected, probs = _moe(xn, router, _experts(adapter, layer), k, act)
    if family == "deepseek":
        shared = [adapter.shared_experts(layer, m).double().numpy() for m in ("gate", "up", "down")]
        expected = expected + sum(_mlp(xn, shared[0][s], shared[1][s], shared[2][s], _silu)
                                  for s in range(len(shared[0])))
    with torch.no_grad():
        logits, weights, indices = block.gate(x)
        out = block(x)
    assert logits.shape == (10, adapter.num_experts) and weights.shape == indices.shape == (10, k)
    np.testing.assert_allclose(logits.numpy(), xn @ router.T, atol=1e-5)
    np.testing.assert_allclose(weights.numpy(), -np.sort(-probs)[:, :k], atol=1e-6)  # not renormalised
    assert (weights.sum(-1) < 1 - 1e-3).all()
    assert [sorted(r) for r in indices.tolist()] == [sorted(np.argsort(-p)[:k].tolist()) for p in probs]
    assert out.shape == x.shape
    np.testing.assert_allclose(out.reshape(-1, x.shape[-1]).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_hook_sees_the_post_norm_input(loaded, family):
    built, model, _ = loaded[family]
    layer = model.model.layers[-1]
    norm = layer.post_attention_layernorm if family == "deepseek" else layer.pre_moe_norm
    seen = {}
    handles = [getattr(layer, BLOCK[family]).register_forward_pre_hook(lambda m, a: seen.setdefault("block", a[0])),
               norm.register_forward_hook(lambda m, a, o: seen.setdefault("norm", o)),
               getattr(layer, BLOCK[family]).gate.register_forward_hook(lambda m, a, o: seen.setdefault("router", o))]
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 5, 9, 33, 7]]))
    finally:
        for h in handles:
            h.remove()
    assert seen["block"].shape == (1, 5, built.config["hidden_size"])
    assert torch.equal(seen["block"], seen["norm"])
    logits, weights, indices = seen["router"]
    assert logits.shape == (5, len(getattr(layer, BLOCK[family]).experts)) and indices.shape == weights.shape


def test_deepseek_model_matches_numpy(loaded):
    built, model, _ = loaded["deepseek"]
    ids = np.array([1, 17, 250, 3, 99, 42])
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(logits, _deepseek_reference(built, ids), atol=1e-5)


def test_grok_model_matches_numpy_with_softcap_active(loaded):
    """Larger q/k weights push attention scores past max_attn_value, so the soft cap matters."""
    built, model, _ = loaded["grok1"]
    model = copy.deepcopy(model)
    w = _weights(built)
    with torch.no_grad():
        for layer in range(built.config["num_hidden_layers"]):
            for proj in ("q_proj", "k_proj"):
                name = f"model.layers.{layer}.attn.{proj}.weight"
                w[name] = w[name] * 60
                getattr(model.model.layers[layer].attn, proj).weight.mul_(60)
    ids = np.array([1, 17, 250, 3, 99, 42])
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    expected = _grok_reference(built, ids, w)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert np.abs(_grok_reference(built, ids, w, softcap=False) - expected).max() > 1e-3


# -- padding and training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_single_sequences(loaded, family, side):
    _, model, _ = loaded[family]
    seqs = [[1, 17, 250, 3, 99, 42], [1, 8, 77], [1, 300, 5, 6]]
    width = max(map(len, seqs))
    ids, mask = torch.zeros(len(seqs), width, dtype=torch.long), torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols], mask[row, cols] = torch.tensor(seq), 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        assert torch.isfinite(batch).all()
        for row, seq in enumerate(seqs):
            single = model(torch.tensor([seq])).logits[0]
            torch.testing.assert_close(batch[row][mask[row].bool()], single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_with_labels_decreases_when_training(loaded, family):
    _, model, _ = loaded[family]
    model = copy.deepcopy(model).train()
    ids = torch.tensor([[1, 17, 250, 3, 99, 42], [1, 8, 77, 5, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    shifted = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, shifted)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.1
