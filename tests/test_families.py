"""Every family: a tiny checkpoint in its real layout reads back exactly, and the real configs give the real facts."""
import json

import pytest
import torch

from moescope.arch import MoEModel, families, get_family, open_model
from moescope.cli import main
from tests.conftest import FAMILY_REFERENCES

# Facts of the real checkpoints, written down independently of the family files (from the model cards/configs):
# layers, MoE layers, routed experts, shared members, top-k, renormalised, expert width, hidden size.
REAL = {
    "mistralai/Mixtral-8x7B-v0.1": (32, 32, 8, 0, 2, True, 14336, 4096),
    "mistralai/Mixtral-8x22B-v0.1": (56, 56, 8, 0, 2, True, 16384, 6144),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": (32, 32, 8, 0, 2, True, 14336, 4096),
    "mistralai/Mistral-7B-v0.1": (32, 0, 0, 0, None, None, None, 4096),
    "deepseek-ai/deepseek-moe-16b-base": (28, 27, 64, 2, 6, False, 1408, 2048),
    "deepseek-ai/DeepSeek-V2-Lite": (27, 26, 64, 2, 6, False, 1408, 2048),
    "deepseek-ai/DeepSeek-V3": (61, 58, 256, 1, 8, True, 2048, 7168),
    "hpcai-tech/grok-1": (64, 64, 8, 0, 2, False, 32768, 6144),
    "Qwen/Qwen1.5-MoE-A2.7B": (24, 24, 60, 1, 4, False, 1408, 2048),
    "Qwen/Qwen2-57B-A14B": (28, 28, 64, 1, 8, False, 2560, 3584),
    "Qwen/Qwen3-30B-A3B": (48, 48, 128, 0, 8, True, 768, 2048),
    "allenai/OLMoE-1B-7B-0924": (16, 16, 64, 0, 8, False, 1024, 2048),
    "databricks/dbrx-base": (40, 40, 16, 0, 4, True, 10752, 6144),
    "openai/gpt-oss-20b": (24, 24, 32, 0, 4, True, 2880, 2880),
    "ibm-granite/granite-3.0-3b-a800m-base": (32, 32, 40, 0, 8, True, 512, 1536),
    "jetmoe/jetmoe-8b": (24, 24, 8, 0, 2, True, 5632, 2048),
    "microsoft/Phi-3.5-MoE-instruct": (32, 32, 16, 0, 2, False, 6400, 4096),
}
REQUIRED = {"mixtral", "mistral", "deepseek", "grok1", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
            "deepseek_v3", "dbrx", "gpt_oss"}


def test_all_required_families_are_supported():
    assert REQUIRED <= set(families())
    assert {ref for _, ref in FAMILY_REFERENCES} == set(REAL)


@pytest.mark.parametrize("family,reference", FAMILY_REFERENCES)
def test_real_config_facts(family, reference):
    config = get_family(family).reference_configs[reference]
    model = MoEModel.from_config(config)  # detection from architectures / model_type
    assert model.family.name == family
    layers, moe, experts, shared, top_k, renorm, width, hidden = REAL[reference]
    assert (model.num_layers, len(model.moe_layers), model.num_experts, model.num_shared_members) == \
           (layers, moe, experts, shared)
    assert model.hidden_size == hidden
    if experts:
        assert (model.routing.top_k, model.routing.renormalize, model.expert_width) == (top_k, renorm, width)


def _read(model, key):
    kind, layer, *rest = key
    readers = {
        "experts": lambda: model.experts(layer, rest[0]), "router": lambda: model.router(layer),
        "dense": lambda: model.dense_ffn(layer, rest[0]), "shared": lambda: model.shared_experts(layer, rest[0]),
        "shared_gate": lambda: model.shared_gate(layer), "router_bias": lambda: model.router_bias(layer),
        "score_correction_bias": lambda: model.score_correction_bias(layer),
        "expert_bias": lambda: model.expert_bias(layer, rest[0]),
    }
    return readers[kind]()


@pytest.mark.parametrize("family,reference", FAMILY_REFERENCES)
def test_canonical_tensors_read_back_exactly(tiny, family, reference):
    built = tiny(family, reference)
    model = open_model(built.path)
    assert model.family.name == family
    model.check()
    assert built.canonical, "the builder recorded no canonical tensors"
    for key, expected in built.canonical.items():
        got = _read(model, key)
        assert got.shape == expected.shape, key
        assert torch.equal(got.float(), expected.float()), key
    for layer in model.moe_layers:  # single-expert reads agree with the stacked view
        for matrix in ("gate", "up", "down"):
            stacked = model.experts(layer, matrix)
            assert torch.equal(model.expert(layer, model.num_experts - 1, matrix), stacked[-1])


@pytest.mark.parametrize("family,reference", FAMILY_REFERENCES)
def test_inspect_reports_facts(tiny, family, reference, capsys):
    built = tiny(family, reference)
    assert main(["inspect", str(built.path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    config = built.config
    model = MoEModel.from_config(config)
    assert facts["family"] == family
    assert facts["num_layers"] == model.num_layers
    assert facts["moe_layers"] == model.moe_layers
    assert facts["num_experts"] == model.num_experts
    total = sum(t.numel() for t in built.canonical.values())
    assert facts["total_params"] > 0 and facts["checkpoint_bytes"] > 0
    if model.family.is_moe:
        E, I, H = model.num_experts, model.expert_width, model.hidden_size
        assert facts["top_k"] == model.routing.top_k
        assert facts["params_per_expert"] >= 3 * I * H
        assert facts["active_params"] == facts["total_params"] - len(model.moe_layers) * (
            E - model.routing.top_k) * facts["params_per_expert"]
    assert total <= facts["total_params"]


def test_structured_weights_have_the_planted_permutation(tiny):
    built = tiny("mixtral", dtype="float32")
    model = open_model(built.path)
    perms = built.truth["permutations"]["0"]
    gate = model.experts(0, "gate")
    # expert a's neuron i and expert b's neuron j share a base neuron when perm_a[i] == perm_b[j]
    inverse_b = {p: j for j, p in enumerate(perms[1])}
    match = torch.tensor([inverse_b[p] for p in perms[0]])
    a, b = torch.nn.functional.normalize(gate[0], dim=1), torch.nn.functional.normalize(gate[1], dim=1)
    matched = (a * b[match]).sum(1).mean()
    unmatched = (a * b).sum(1).mean()
    assert matched > 0.6 > unmatched.abs()
