"""moescope trace: every number checked against an independent numpy computation on tiny checkpoints."""
import json
import math

import numpy as np
import pytest
import torch

from moescope.arch import open_model
from moescope.dynamic.capture import capture_blocks
from moescope.dynamic.forward import forward_pass
from moescope.dynamic.inputs import CHAT_PROMPT, SHORT_PROMPT, Document
from moescope.dynamic.loader import load_model
from moescope.dynamic.metrics import IntermediateSummary, NormScoreRanks, OutputSimilarity
from moescope.dynamic.run import TraceOptions, trace

TEXTS = [SHORT_PROMPT, CHAT_PROMPT, "Experts are small networks; the router picks two of them for every token."]
FAMILIES = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "deepseek", "grok1"]


def _build(tiny, family):
    if family == "deepseek_v3":  # fp8 weights need a GPU to run in transformers: use the unquantised layout
        built = tiny(family, dtype="F32")
        config_file = built.path / "config.json"
        config = json.loads(config_file.read_text())
        config.pop("quantization_config", None)
        config_file.write_text(json.dumps(config))
        return built
    return tiny(family)


@pytest.fixture(scope="module")
def traced(tiny, tmp_path_factory):
    cache = {}

    def run(family, **options):
        key = (family, tuple(sorted(options.items())))
        if key not in cache:
            built = _build(tiny, family)
            out = tmp_path_factory.mktemp(f"trace-{family}")
            opts = TraceOptions(device="cpu", dtype="float32", similarity_tokens=8, intermediate_tokens=5,
                                **options)
            cache[key] = (built, trace(built.path, TEXTS, out=out, options=opts, progress=False))
        return cache[key]
    return run


def _block_inputs(model, texts_ids):
    """Independent capture: the MoE block input of every MoE layer, one document at a time, by position."""
    net = load_model(model)
    blocks = net.get_submodule(model.family.execution.layers)
    seen = {l: [] for l in model.moe_layers}
    hooks = [blocks[l].get_submodule(model.family.execution.block).register_forward_pre_hook(
        lambda mod, args, l=l: seen[l].append(args[0][0].detach().double().numpy())) for l in model.moe_layers]
    with torch.no_grad():
        for ids in texts_ids:
            net(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {l: np.concatenate(v) for l, v in seen.items()}


def _np_act(family):
    from scipy.special import erf
    if family == "grok1":
        return lambda z: 0.5 * z * (1 + erf(z / math.sqrt(2)))
    return lambda z: z / (1 + np.exp(-z))


def _np_members(model, layer):
    """[(label, gate, up, down)] in float64 from the canonical weights."""
    out = []
    for e in range(model.num_experts):
        out.append((f"e{e}", *(model.expert(layer, e, m).double().numpy() for m in ("gate", "up", "down"))))
    for s in range(model.num_shared_members):
        out.append((f"shared{s}", *(model.shared_experts(layer, m)[s].double().numpy() for m in ("gate", "up", "down"))))
    return out


def _np_route(model, layer, x):
    """Independent routing from the router weights: (scores [T,E], sorted chosen indices [T,k], weights)."""
    facts = model.routing
    logits = x @ model.router(layer).double().numpy().T
    if facts.scoring == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
        choice = scores + model.score_correction_bias(layer).double().numpy()
        groups = choice.reshape(len(x), facts.num_groups, -1)
        group_score = np.sort(groups, axis=-1)[..., -2:].sum(-1)
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :facts.top_groups]
        mask = np.zeros_like(group_score, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        choice = np.where(np.repeat(mask, groups.shape[-1], axis=-1), choice, -np.inf)
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        choice = scores
    idx = np.argsort(-choice, axis=-1, kind="stable")[:, :facts.top_k]
    w = np.take_along_axis(scores, idx, -1)
    if facts.renormalize:
        w = w / w.sum(-1, keepdims=True)
    w = w * facts.scaling
    order = np.argsort(idx, axis=-1)
    return scores, np.take_along_axis(idx, order, -1), np.take_along_axis(w, order, -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_number_matches_numpy(traced, family):
    built, results = traced(family)
    model = open_model(built.path)
    ids = [d for d in _documents(results)]
    xs = _block_inputs(model, ids)
    act = _np_act(family)
    for layer in model.moe_layers:
        x = xs[layer]
        T = len(x)
        scores, idx, w = _np_route(model, layer, x)
        got_idx = results[f"layer{layer}.chosen_experts"].numpy()
        order = np.argsort(got_idx, axis=-1)
        np.testing.assert_array_equal(np.take_along_axis(got_idx, order, -1), idx)
        got_w = np.take_along_axis(results[f"layer{layer}.chosen_weights"].numpy(), order, -1)
        np.testing.assert_allclose(got_w, w, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(results[f"layer{layer}.router_scores"].numpy(), scores, rtol=1e-4, atol=1e-6)
        members = _np_members(model, layer)
        outs = np.stack([(act(x @ g.T) * (x @ u.T)) @ d.T for _, g, u, d in members])
        norms = np.linalg.norm(outs, axis=-1).T
        np.testing.assert_allclose(results[f"layer{layer}.expert_norms"].numpy(), norms, rtol=1e-4)
        unit = outs / np.linalg.norm(outs, axis=-1, keepdims=True)
        cos = np.einsum("mth,nth->tmn", unit, unit).clip(-1, 1)
        np.testing.assert_allclose(results[f"layer{layer}.token_similarity"].numpy(), cos[:8], atol=1e-5)
        np.testing.assert_allclose(results[f"layer{layer}.output_similarity"].numpy(),
                                   (1 - np.arccos(cos) / np.pi).mean(0), atol=1e-5)
        E = model.num_experts
        counts = np.zeros((E, E), dtype=np.int64)
        for t in range(T):
            s_rank = np.argsort(np.argsort(scores[t], kind="stable"), kind="stable")
            n_rank = np.argsort(np.argsort(norms[t, :E], kind="stable"), kind="stable")
            for e in range(E):
                counts[s_rank[e], n_rank[e]] += 1
        np.testing.assert_array_equal(results[f"layer{layer}.rank_counts"].numpy(), counts)
        top1 = np.mean(np.argmax(norms[:, :E], 1) == np.argmax(scores, 1))
        assert results[f"layer{layer}.top1_largest_norm_fraction"] == pytest.approx(top1)
        label, g, _, _ = members[1]
        intermediate = act(x @ g.T)
        kept = results[f"layer{layer}.intermediate"] if f"layer{layer}.intermediate.e0" in set(results.keys()) else None
        if kept is not None:
            np.testing.assert_allclose(kept[label].numpy(), intermediate[:5], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(results[f"layer{layer}.intermediate_mean_abs.{label}"].numpy(),
                                   np.abs(intermediate).mean(0), rtol=1e-4, atol=1e-7)
        assert results[f"layer{layer}.reconstruction_error"] < 1e-5


def _documents(results):
    ids, offsets = results["inputs.token_ids"], results["inputs.documents"]
    return [ids[a:b] for a, b in zip(offsets, offsets[1:])]


def test_intermediate_states_kept_for_first_middle_last_layer(traced):
    built, results = traced("deepseek_v3")
    kept = [l for l in results.layers if any(k.startswith(f"layer{l}.intermediate.") for k in results.keys())]
    moe = open_model(built.path).moe_layers
    assert kept == sorted({moe[0], moe[len(moe) // 2], moe[-1]})
    assert results[f"layer{kept[0]}.intermediate"]["e0"].shape[0] == 5


@pytest.mark.parametrize("family", ["mixtral", "deepseek", "grok1"])
def test_capture_leaves_logits_unchanged_and_no_hook_behind(tiny, family):
    model = open_model(_build(tiny, family).path)
    net = load_model(model)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        before = net(input_ids=ids).logits
        with capture_blocks(net, model.family.execution, model.moe_layers) as store:
            during = net(input_ids=ids).logits
        after = net(input_ids=ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert store[model.moe_layers[0]].inputs.shape == (1, 5, model.hidden_size)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_same_results_for_any_batch_size_and_order(tiny):
    model = open_model(tiny("mixtral").path)
    net = load_model(model)
    docs = [Document("", tuple([1] + list(range(10 + 3 * i, 10 + 3 * i + n)))) for i, n in enumerate([3, 9, 5, 12, 7])]
    run = lambda d, b: forward_pass(net, model.family.execution, model.moe_layers, d, batch_size=b,  # noqa: E731
                                    progress=False)
    one, eight = run(docs, 1), run(docs, 8)
    shards = [run(docs[i:i + 1], 1) for i in range(5)]  # documents spread over 5 workers
    for layer in model.moe_layers:
        for name in ("inputs", "output"):
            a, b = getattr(one[layer], name), getattr(eight[layer], name)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.cat([getattr(s[layer], name) for s in shards]), a, atol=1e-5, rtol=1e-5)
        assert torch.equal(one[layer].router["indices"], eight[layer].router["indices"])


def test_token_order_is_position_order(tiny):
    """Position p of the captured sequence is the state of token p: the prefix ids[:p+1] ends in the same state."""
    model = open_model(tiny("mixtral").path)
    net = load_model(model)
    ids = (1, 50, 60, 70, 80, 90, 100)
    full = forward_pass(net, model.family.execution, [0], [Document("", ids)], progress=False)[0]
    for p in (1, 3, 6):
        prefix = forward_pass(net, model.family.execution, [0], [Document("", ids[:p + 1])], progress=False)[0]
        torch.testing.assert_close(prefix.inputs[-1], full.inputs[p], atol=1e-5, rtol=1e-5)


def test_accumulators_merge_over_shards_like_one_pass():
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(5, 40, 16, generator=gen)
    scores = torch.softmax(torch.randn(40, 5, generator=gen), -1)
    cuts = [0, 3, 11, 20, 33, 40]
    one_sim, one_rank, one_int = OutputSimilarity(5, keep=6), NormScoreRanks(5), IntermediateSummary({"e0": 16})
    one_sim.update(outputs, 0)
    one_rank.update(outputs.norm(dim=-1).T, scores)
    one_int.update("e0", outputs[0])
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        s, r, i = OutputSimilarity(5, keep=6), NormScoreRanks(5), IntermediateSummary({"e0": 16})
        s.update(outputs[:, a:b], a)
        r.update(outputs[:, a:b].norm(dim=-1).T, scores[a:b])
        i.update("e0", outputs[0, a:b])
        parts.append((s, r, i))
    for order in (parts, parts[::-1]):
        s, r, i = order[0]
        for s2, r2, i2 in order[1:]:
            s, r, i = s.merge(s2), r.merge(r2), i.merge(i2)
        for k, v in one_sim.finalize().items():
            torch.testing.assert_close(s.finalize()[k], v)
        assert torch.equal(r.finalize()["rank_counts"], one_rank.finalize()["rank_counts"])
        torch.testing.assert_close(i.finalize()["mean_abs"]["e0"], one_int.finalize()["mean_abs"]["e0"])


def test_routing_statistics_come_from_the_saved_choices(traced):
    built, results = traced("olmoe")
    model = open_model(built.path)
    E = model.num_experts
    for layer in results.layers:
        idx, w = results[f"layer{layer}.chosen_experts"].numpy(), results[f"layer{layer}.chosen_weights"].numpy()
        top1 = idx[np.arange(len(idx)), np.argmax(w, axis=1)]
        np.testing.assert_allclose(results[f"layer{layer}.stats.load.top1_load.value"],
                                   np.bincount(top1, minlength=E) / len(idx))
        np.testing.assert_allclose(results[f"layer{layer}.stats.load.topk_load.value"],
                                   np.bincount(idx.ravel(), minlength=E) / len(idx))
        pairs = [(d[t], d[t + 1]) for a, b in zip(results["inputs.documents"], results["inputs.documents"][1:])
                 for d in [top1[a:b]] for t in range(b - a - 1)]
        assert results[f"layer{layer}.stats.consistency.top1_consistency.value"] == \
            pytest.approx(np.mean([x == y for x, y in pairs]))
        assert results[f"layer{layer}.stats.coactivation.lift"].shape == (E, E)
    first = results.layers[0]
    assert results[f"layer{first}.stats.cross_layer.next_layer"] == results.layers[1]
