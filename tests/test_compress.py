"""moescope.compress: importance scores against numpy, merge candidates on a planted duplicate, checkpoints written
in each family's layout that load without missing or unexpected keys, errors."""
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch

from moescope.arch import open_model
from moescope.checkpoint import Checkpoint
from moescope.compress import (
    CalibrationError,
    CompressionError,
    ExpertCountError,
    UnsupportedLayoutError,
    calibrate,
    compress,
    evaluate,
    expert_importance,
    format_summary,
    layer_data,
    match_neurons,
    parse_amount,
    read_record,
)
from moescope.compress.calibrate import encode_calibration
from moescope.compress.candidates import align
from moescope.compress.study import format_table
from moescope.data import long_text
from moescope.dynamic.loader import load_model, model_class
from moescope.errors import MoescopeError
from moescope.testing import build_checkpoint
from moescope.writer import write_checkpoint

TEXTS = [p for p in long_text().split("\n\n") if p.strip()]
TOKENS = 256


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------ numpy reference
def _np_act(family):
    from scipy.special import erf
    if family == "grok1":
        return lambda z: 0.5 * z * (1 + erf(z / math.sqrt(2)))
    return lambda z: z / (1 + np.exp(-z))


def _capture(model, documents, layer):
    """Independent capture of one MoE block's input and output, one document at a time."""
    net = load_model(model)
    block = net.get_submodule(model.family.execution.layers)[layer].get_submodule(model.family.execution.block)
    xs, ys = [], []
    h1 = block.register_forward_pre_hook(lambda mod, args: xs.append(args[0][0].double().numpy()))
    h2 = block.register_forward_hook(lambda mod, args, out: ys.append(
        (out[0] if isinstance(out, tuple) else out)[0].double().numpy()))
    with torch.no_grad():
        for doc in documents:
            net(input_ids=torch.tensor([doc.ids]))
    h1.remove(), h2.remove()
    return np.concatenate(xs), np.concatenate(ys)


def _np_route(logits, top_k, renormalize):
    """Softmax over the given experts, top-k (stable), renormalised if the family does: (idx [T,k], w [T,k])."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, idx, -1)
    if renormalize:
        w = w / w.sum(-1, keepdims=True)
    return idx, w


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_importance_scores_match_numpy(tiny, family):
    built = tiny(family, dtype="F32")
    model = open_model(built.path)
    calib = calibrate(model, TEXTS, max_tokens=TOKENS, progress=False)
    layer = model.moe_layers[-1]
    got = expert_importance(model, layer_data(model, layer, calib.traces[layer]))
    x, y = _capture(model, calib.documents, layer)
    T, E, k = len(x), model.num_experts, model.routing.top_k
    act = _np_act(family)
    router = model.router(layer).double().numpy()
    outs = np.stack([(act(x @ g.T) * (x @ u.T)) @ d.T for g, u, d in
                     ((model.expert(layer, e, m).double().numpy() for m in ("gate", "up", "down")) for e in range(E))])
    shared = np.zeros_like(y)
    for s in range(model.num_shared_members):
        g, u, d = (model.shared_experts(layer, m)[s].double().numpy() for m in ("gate", "up", "down"))
        shared += (act(x @ g.T) * (x @ u.T)) @ d.T
    if model.shared_gate(layer) is not None:
        shared *= 1 / (1 + np.exp(-(x @ model.shared_gate(layer).double().numpy().T)))
    renorm = model.routing.renormalize

    def rebuilt(experts):
        idx, w = _np_route(x @ router[experts].T, k, renorm)
        ids = np.asarray(experts)[idx]
        return (outs[ids, np.arange(T)[:, None]] * w[..., None]).sum(1) + shared

    idx, w = _np_route(x @ router.T, k, renorm)
    W = np.zeros((T, E))
    np.put_along_axis(W, idx, w, -1)
    norms = np.linalg.norm(outs, axis=-1)                                   # [E, T]
    top1 = idx[np.arange(T), np.argmax(w, -1)]
    expected = {
        "top1_frequency": np.bincount(top1, minlength=E) / T,
        "topk_frequency": np.bincount(idx.ravel(), minlength=E) / T,
        "soft_count": W.sum(0),
        "mean_output_norm": norms.mean(1),
        "weighted_output_norm": (W.T * norms).mean(1),
        "removal_error": [np.linalg.norm(rebuilt([f for f in range(E) if f != e]) - y) / np.linalg.norm(y)
                          for e in range(E)],
    }
    assert got["tokens"] == T == calib.tokens
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=2e-4, atol=1e-6, err_msg=name)
    assert got["baseline_error"] == pytest.approx(np.linalg.norm(rebuilt(list(range(E))) - y) / np.linalg.norm(y),
                                                  abs=1e-6)
    assert got["baseline_error"] < 1e-5


# ------------------------------------------------------------------------------------------------ planted duplicate
def _planted_duplicate(family, path):
    """Independent experts (specificity 1), then expert 5 := expert 2 with its neurons permuted plus 0.1 % noise,
    in every MoE layer, and expert 5's router row := expert 2's plus noise. (The router row is duplicated too: with
    an unrelated row the copy is reached by different tokens, so merging it moves tokens between experts and the
    block output changes for routing reasons that neuron similarity does not see.)"""
    built = build_checkpoint(family, path / "built", dtype="F32", seed=3, specificity=1.0)
    model = open_model(built.path)
    ckpt = Checkpoint(built.path)
    tensors = {n: ckpt.read(n) for n in ckpt.keys()}
    gen = torch.Generator().manual_seed(0)
    noise = lambda w: 1e-3 * w.std() * torch.randn(w.shape, generator=gen)
    for layer in model.moe_layers:
        perm = torch.randperm(model.expert_width, generator=gen)
        for m in ("gate", "up", "down"):
            template = model.family.experts.source(m).name
            w = tensors[template.format(layer=layer, expert=2)]
            w = w[:, perm] if m == "down" else w[perm]
            tensors[template.format(layer=layer, expert=5)] = w + noise(w)
        router = tensors[model.family.router.name.format(layer=layer)]
        router[5] = router[2] + noise(router[2])
    layout = model.family.layout
    write_checkpoint(path / "dup", built.config, tensors, fmt=layout.get("format", "safetensors"), num_shards=2,
                     shard_name=layout.get("shard_name", "model-{index:05d}-of-{count:05d}.safetensors"),
                     index_name=layout.get("index_name", "model.safetensors.index.json"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(built.path / name, path / "dup" / name)
    return path / "dup"


@pytest.mark.parametrize("family", ["qwen2_moe"])
def test_planted_duplicate_is_the_first_and_cheapest_merge(tmp_path, family):
    path = _planted_duplicate(family, tmp_path)
    record = compress(path, tmp_path / "merged", merge=1, calibration_texts=TEXTS, max_tokens=TOKENS, candidates=None,
                      progress=False)
    old, new = open_model(path), open_model(tmp_path / "merged")
    for layer in old.moe_layers:
        rec = record["layers"][str(layer)]
        first = rec["candidates"][0]
        assert {first["a"][0], first["b"][0]} == {2, 5}
        assert first["similarity"] > 0.99 > rec["candidates"][1]["similarity"]
        assert first["block_error_after"] == min(c["block_error_after"] for c in rec["candidates"])
        assert len(rec["candidates"]) == old.num_experts * (old.num_experts - 1) // 2
        assert rec["merged"] == [[2, 5]]
        # the merged expert (at expert 2's place) computes what expert 2 computed, in expert 2's neuron order
        for m in ("gate", "up", "down"):
            torch.testing.assert_close(new.expert(layer, 2, m), old.expert(layer, 2, m), rtol=0, atol=1e-3)
        # expert 6 became expert 5, 7 became 6
        for m in ("gate", "up", "down"):
            assert torch.equal(new.expert(layer, 5, m), old.expert(layer, 6, m))
            assert torch.equal(new.expert(layer, 6, m), old.expert(layer, 7, m))


# ------------------------------------------------------------------------------------------------ writing and loading
LOADS = [("mixtral", "prune"), ("mixtral", "merge"), ("qwen2_moe", "prune"), ("qwen2_moe", "merge"),
         ("deepseek", "prune"), ("deepseek", "merge"), ("grok1", "prune"), ("grok1", "merge")]


def _load_info(path):
    model = open_model(path)
    net, info = model_class(model).from_pretrained(str(path), output_loading_info=True)
    return net, {k: v for k, v in info.items() if v}


def _check_experts(old, new, record):
    """Kept experts bit for bit; merged experts the recorded average of aligned sources; router rows likewise."""
    for layer in old.moe_layers:
        rec = record["layers"][str(layer)]
        assert len(rec["experts"]) == new.num_experts
        old_router, new_router = old.router(layer), new.router(layer)
        for j, entry in enumerate(rec["experts"]):
            sources, weights = entry["sources"], entry["merge_weights"]
            if len(sources) == 1:
                for m in ("gate", "up", "down"):
                    assert torch.equal(new.expert(layer, j, m), old.expert(layer, sources[0], m))
                assert torch.equal(new_router[j], old_router[sources[0]])
                continue
            assert sum(weights) == pytest.approx(1.0)
            torch.testing.assert_close(new_router[j].float(), sum(w * old_router[e].float()
                                                                  for e, w in zip(sources, weights)),
                                       rtol=1e-2, atol=1e-2)
            if len(sources) == 2:
                a, b = ({m: old.expert(layer, e, m).float() for m in ("gate", "up", "down")} for e in sources)
                perm, _ = match_neurons(a, b)
                expected = {m: weights[0] * a[m] + weights[1] * align(b, perm)[m] for m in a}
                for m in ("gate", "up", "down"):
                    torch.testing.assert_close(new.expert(layer, j, m).float(), expected[m], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("family,mode", LOADS)
def test_compressed_checkpoint_loads_without_missing_or_unexpected_keys(tiny, tmp_path, family, mode):
    built = tiny(family)                        # the family's real dtype (bf16) and format (.bin for Grok-1)
    out = tmp_path / "out"
    record = compress(built.path, out, **{mode: 2}, strategy="random", seed=1, candidates=0, progress=False)
    old, new = open_model(built.path), open_model(out)
    new.check()
    assert new.num_experts == old.num_experts - 2 == record["num_experts"]["after"]
    assert new.routing.top_k == old.routing.top_k
    assert new.checkpoint.format == old.checkpoint.format
    assert sorted(p.name for p in new.checkpoint.files) == sorted(p.name for p in old.checkpoint.files)
    assert {n: Checkpoint(out).info(n).dtype for n in new.checkpoint.keys()} == \
        {n: old.checkpoint.info(n).dtype for n in new.checkpoint.keys()}
    assert (out / "tokenizer.json").is_file() and read_record(out) == {k: v for k, v in record.items() if k != "path"}
    net, info = _load_info(out)
    assert info == {}, info
    blocks = net.get_submodule(new.family.execution.layers)
    for layer in new.moe_layers:
        router = blocks[layer].get_submodule(new.family.execution.router)
        assert router.weight.shape == (new.num_experts, new.hidden_size)
        rec = record["layers"][str(layer)]
        kept = [e["sources"][0] for e in rec["experts"]]
        if mode == "prune":
            assert sorted(rec["pruned"] + kept) == list(range(old.num_experts)) and len(rec["pruned"]) == 2
            assert [d["expert"] for d in rec["decisions"]] == rec["pruned"] or \
                sorted(d["expert"] for d in rec["decisions"]) == rec["pruned"]
        else:
            assert sum(len(e["sources"]) for e in rec["experts"]) == old.num_experts
    # every tensor that is not an expert or router is copied unchanged
    edited = {n for l in old.moe_layers for n in _expert_names(old, l)}
    for name in old.checkpoint.keys():
        if name not in edited:
            assert torch.equal(new.checkpoint.read(name), old.checkpoint.read(name)), name
    _check_experts(old, new, record)


def _expert_names(model, layer):
    fam = model.family
    names = {fam.router.name.format(layer=layer)}
    for m in ("gate", "up", "down"):
        names |= {fam.experts.source(m).name.format(layer=layer, expert=e) for e in range(model.num_experts)}
    return names


@pytest.mark.parametrize("family", ["dbrx", "granitemoe"])
def test_packed_layouts_round_trip(tiny, tmp_path, family):
    """Stacked / [E*n, ...] rows, fused gate-up and transposed down are re-encoded exactly as the reader decodes."""
    built = tiny(family)
    record = compress(built.path, tmp_path / "out", merge=1, strategy="random", candidates=0, progress=False)
    old, new = open_model(built.path), open_model(tmp_path / "out")
    _check_experts(old, new, record)
    assert _load_info(tmp_path / "out")[1] == {}


@pytest.mark.parametrize("family,mode,strategy", [("mixtral", "prune", "loss"), ("qwen2_moe", "merge", "similarity"),
                                                   ("deepseek", "prune", "frequency")])
def test_written_model_computes_the_simulated_block(tiny, tmp_path, family, mode, strategy):
    """On the first MoE layer (whose input no edit can change) the compressed model's real block output is off the
    original by exactly the error the simulator recorded."""
    built = tiny(family, dtype="F32")
    record = compress(built.path, tmp_path / "out", **{mode: 2}, strategy=strategy, calibration_texts=TEXTS,
                      max_tokens=TOKENS, candidates=0, progress=False)
    old, new = open_model(built.path), open_model(tmp_path / "out")
    layer = old.moe_layers[0]
    documents = encode_calibration(old, TEXTS, TOKENS)
    _, y = _capture(old, documents, layer)
    _, y_new = _capture(new, documents, layer)
    error = np.linalg.norm(y_new - y) / np.linalg.norm(y)
    assert record["layers"][str(layer)]["block_error"] == pytest.approx(error, rel=1e-4, abs=1e-6)
    assert error > 1e-3  # the edit did change the layer
    assert record["calibration"]["tokens"] == TOKENS


def test_same_experts_pruned_in_every_layer_when_not_per_layer(tiny, tmp_path):
    built = tiny("qwen2_moe", dtype="F32")
    record = compress(built.path, None, prune=3, strategy="loss", per_layer=False, calibration_texts=TEXTS,
                      max_tokens=TOKENS, dry_run=True, progress=False)
    pruned = [tuple(rec["pruned"]) for rec in record["layers"].values()]
    assert len(set(pruned)) == 1 and len(pruned[0]) == 3
    assert "dry run" in format_summary(record)


@pytest.mark.parametrize("mode,strategy", [("prune", "loss"), ("prune", "frequency"), ("prune", "weighted_norm"),
                                           ("merge", "similarity"), ("merge", "output")])
def test_each_strategy_takes_its_recorded_best_step(tiny, mode, strategy):
    built = tiny("mixtral", dtype="F32")
    record = compress(built.path, None, **{mode: 1}, strategy=strategy, calibration_texts=TEXTS, max_tokens=TOKENS,
                      candidates=None if mode == "merge" else 0, dry_run=True, progress=False)
    for rec in record["layers"].values():
        (step,) = rec["decisions"]
        imp = rec["importance"]
        if mode == "prune":
            key = {"loss": "removal_error", "frequency": "topk_frequency", "weighted_norm": "weighted_output_norm"}
            assert step["expert"] == int(np.argmin(imp[key[strategy]])) and rec["pruned"] == [step["expert"]]
            assert rec["block_error"] == pytest.approx(imp["removal_error"][step["expert"]], rel=1e-6)
        else:
            best = (min if strategy == "output" else max)(
                rec["candidates"], key=lambda c: c["block_error_after" if strategy == "output" else "similarity"])
            assert step["members"] == [best["a"], best["b"]]
            assert rec["block_error"] == pytest.approx(best["block_error_after"], rel=1e-6)


# ------------------------------------------------------------------------------------------------ evaluate
def test_evaluate_is_the_mean_next_token_loss(tiny):
    built = tiny("mixtral", dtype="F32")
    result = evaluate(built.path, TEXTS[:3], max_tokens=200, batch_size=2, progress=False)
    model = open_model(built.path)
    docs = encode_calibration(model, TEXTS[:3], 200)
    net = load_model(model)
    nll, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            logits = net(input_ids=torch.tensor([doc.ids])).logits[0].double()
            logp = torch.log_softmax(logits[:-1], -1)
            nll -= float(logp[torch.arange(len(doc.ids) - 1), torch.tensor(doc.ids[1:])].sum())
            count += len(doc.ids) - 1
    assert result["tokens"] == count == 200 - len(docs)
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    short = evaluate(built.path, TEXTS[:3], max_tokens=200, context=32, progress=False)
    assert short["documents"] == len(encode_calibration(model, TEXTS[:3], 200, context=32)) > len(docs)
    assert short["tokens"] == 200 - short["documents"]


# ------------------------------------------------------------------------------------------------ errors
def test_errors(tiny, tmp_path):
    path = tiny("mixtral").path                       # 8 experts, top-2
    cases = [
        (dict(prune=8, strategy="random"), ExpertCountError, "only 8"),
        (dict(prune=7, strategy="random"), ExpertCountError, "top-k=2"),
        (dict(merge=0.9, strategy="random"), ExpertCountError, "top-k=2"),
        (dict(prune=1.5, strategy="random"), ExpertCountError, "fraction"),
        (dict(prune=0, strategy="random"), ExpertCountError, "at least 1"),
        (dict(prune=1, merge=1), CompressionError, "exactly one"),
        (dict(prune=1, strategy="nonsense"), CompressionError, "loss, frequency"),
        (dict(prune=1), CalibrationError, "no calibration text"),
        (dict(prune=1, calibration_texts=["Hello there."]), CalibrationError, "only"),
    ]
    for kwargs, error, words in cases:
        with pytest.raises(error, match=words):
            compress(path, tmp_path / "never", progress=False, **kwargs)
        assert not (tmp_path / "never" / "config.json").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(CompressionError, match="not empty"):
        compress(path, tmp_path / "busy", prune=1, strategy="random", progress=False)
    with pytest.raises(CompressionError, match="source checkpoint"):
        compress(path, path, prune=1, strategy="random", progress=False, overwrite=True)
    assert issubclass(CompressionError, MoescopeError)
    assert (parse_amount("25%"), parse_amount("3"), parse_amount("0.5")) == (0.25, 3, 0.5)
    with pytest.raises(ExpertCountError):
        parse_amount("two")


@pytest.mark.parametrize("family,words", [("gpt_oss", "MXFP4"), ("deepseek_v3", "fp8"), ("phimoe", "SparseMixer"),
                                          ("mistral", "dense")])
def test_unsupported_layouts_are_refused(tiny, tmp_path, family, words):
    with pytest.raises(UnsupportedLayoutError, match=words):
        compress(tiny(family).path, tmp_path / "out", prune=1, strategy="random", progress=False)
    assert not (tmp_path / "out").exists()


def test_study_table_formats_rows():
    rows = [{"model": "m", "method": "original", "experts": 8, "fraction": 0.0, "perplexity": 10.0, "tokens": 99},
            {"model": "m", "method": "prune: random", "experts": 6, "fraction": 0.25, "perplexity": 12.0,
             "perplexity_min": 11.0, "perplexity_max": 13.0, "runs": 3, "tokens": 99}]
    table = format_table(rows)
    assert "| m | 6 (75%) | prune: random | 12.00 (min 11.00, max 13.00) |" in table
    assert json.dumps(rows)
