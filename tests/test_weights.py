"""`moescope weights` end to end on tiny checkpoints, every number checked against numpy definitions (PAPER.md)."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import moescope
from moescope.arch import open_model
from moescope.cli import main
from moescope.static import run as static_run
from moescope.static.run import WeightsOptions


def np_cos(a, b):
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def np_tau_b(x):
    x = np.asarray(x)
    n = len(x)
    conc = disc = 0
    for i in range(n):
        for j in range(i + 1, n):
            s = np.sign(x[i] - x[j]) * np.sign(i - j)
            conc += s > 0
            disc += s < 0
    return (conc - disc) / (n * (n - 1) / 2)  # permutations have no ties


def neurons(w, m):
    return np.asarray(w, float).T if m == "down" else np.asarray(w, float)


def np_members(model, layer, m, dense=None):
    mats = [e.double().numpy() for e in model.experts(layer, m)]
    shared = model.shared_experts(layer, m)
    if shared is not None:
        mats += [s.double().numpy() for s in shared]
    if dense is not None:
        mats.append(dense.dense_ffn(layer, m).double().numpy())
    return mats


def np_pca(points, k):
    x = np.asarray(points, float)
    sd = x.std(axis=0, ddof=1)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1)
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    coords = u[:, :k] * s[:k]
    for j in range(k):  # sign rule: the component (loading vector)'s entry of largest magnitude is positive
        if vt[j, np.argmax(np.abs(vt[j]))] < 0:
            coords[:, j] *= -1
    return coords, (s ** 2 / (s ** 2).sum())[:k]


@pytest.fixture(scope="module")
def mixtral_run(tiny, tmp_path_factory):
    moe, dense = tiny("mixtral", dtype="float32"), tiny("mistral", dtype="float32")
    out = tmp_path_factory.mktemp("weights")
    results = moescope.weights(moe.path, dense=dense.path, out=out, progress=False)
    return moe, dense, results


@pytest.mark.parametrize("m", ["gate", "up", "down"])
def test_every_number_matches_numpy(mixtral_run, m):
    moe, dense, res = mixtral_run
    model, dmodel = open_model(moe.path), open_model(dense.path)
    for layer in model.moe_layers:
        mats = np_members(model, layer, m, dmodel)
        n = len(mats)
        assert res[f"layer{layer}.labels"] == [f"e{i}" for i in range(8)] + ["F"]
        flat = np.array([[np_cos(a, b) for b in mats] for a in mats])
        np.testing.assert_allclose(res[f"layer{layer}.{m}.matrix_similarity"].numpy(), flat, atol=1e-6)
        avg = [neurons(x, m).mean(axis=0) for x in mats]
        np.testing.assert_allclose(res[f"layer{layer}.{m}.neuron_avg_similarity"].numpy(),
                                   [[np_cos(a, b) for b in avg] for a in avg], atol=1e-6)
        assert np.allclose(np.diag(res[f"layer{layer}.{m}.matrix_similarity"].numpy()), 1.0)
        for a in range(n):
            for b in range(a + 1, n):
                va, vb = neurons(mats[a], m), neurons(mats[b], m)
                c = (va / np.linalg.norm(va, axis=1, keepdims=True)) @ (vb / np.linalg.norm(vb, axis=1, keepdims=True)).T
                rows, cols = linear_sum_assignment(c, maximize=True)
                got_col = res[f"layer{layer}.{m}.permutations"][f"{res[f'layer{layer}.labels'][a]}-{res[f'layer{layer}.labels'][b]}"].numpy()
                assert math.isclose(c[rows, got_col].sum(), c[rows, cols].sum(), rel_tol=1e-9)
                np.testing.assert_array_equal(got_col, cols)  # random weights: the optimum is unique
                assert abs(res[f"layer{layer}.{m}.matched_neuron_similarity"][a, b] - c[rows, cols].mean()) < 1e-6
                assert abs(res[f"layer{layer}.{m}.reordered_matrix_similarity"][a, b] - np_cos(va, vb[cols])) < 1e-6
                assert abs(res[f"layer{layer}.{m}.kendall_tau"][a, b] - np_tau_b(cols)) < 1e-9
                pair = f"{res[f'layer{layer}.labels'][a]}-{res[f'layer{layer}.labels'][b]}"
                assert res[f"layer{layer}.{m}.assignment"][pair]["solver"] in ("scipy", "sparse-certified")
        # gate-embedding regression over pairs a > b of routed experts
        router = model.router(layer).double().numpy()
        g = np.array([[np_cos(x, y) for y in router] for x in router])
        ia, ib = np.tril_indices(8, -1)
        for kind, s in (("flat", flat), ("averaged", res[f"layer{layer}.{m}.neuron_avg_similarity"].numpy())):
            x, y = g[ia, ib], s[ia, ib]
            fit = res[f"layer{layer}.{m}.gate_regression"][kind]
            slope, intercept = np.polyfit(x, y, 1)
            assert abs(fit["r2"] - np.corrcoef(x, y)[0, 1] ** 2) < 1e-6
            assert abs(fit["slope"] - slope) < 1e-6 and abs(fit["intercept"] - intercept) < 1e-6
        # PCA: matrix-level (one point per member) and neuron-level (one per neuron, member-major)
        coords, evr = np_pca(np.stack([x.ravel() for x in mats]), 3)
        np.testing.assert_allclose(res[f"layer{layer}.{m}.pca_matrix"].numpy(), coords, atol=1e-5)
        np.testing.assert_allclose(res[f"layer{layer}.{m}.pca_matrix_evr"].numpy(), evr, atol=1e-6)
        coords, evr = np_pca(np.concatenate([neurons(x, m) for x in mats]), 3)
        np.testing.assert_allclose(res[f"layer{layer}.{m}.pca_neuron"].numpy(), coords, atol=1e-5)
        np.testing.assert_allclose(res[f"layer{layer}.{m}.pca_neuron_evr"].numpy(), evr, atol=1e-6)
    r2 = [res[f"layer{l}.{m}.gate_regression.flat.r2"] for l in model.moe_layers]
    assert abs(res["summary.gate_r2_mean"][m]["flat"] - np.mean(r2)) < 1e-12


def test_planted_permutations_are_recovered(mixtral_run):
    moe, _, res = mixtral_run
    perms = moe.truth["permutations"]
    for layer, per_expert in perms.items():
        for a in range(len(per_expert)):
            for b in range(a + 1, len(per_expert)):
                inverse_b = {p: j for j, p in enumerate(per_expert[b])}
                planted = [inverse_b[p] for p in per_expert[a]]
                for m in ("gate", "up", "down"):
                    got = res[f"layer{layer}.{m}.permutations"][f"e{a}-e{b}"].tolist()
                    assert got == planted, (layer, m, a, b)


@pytest.mark.parametrize("match", ["concat", "up"])
def test_one_matching_per_pair_serves_every_matrix(mixtral_run, tmp_path, match):
    moe, dense, _ = mixtral_run
    model, dmodel = open_model(moe.path), open_model(dense.path)
    layer = model.moe_layers[-1]
    res = moescope.weights(moe.path, dense=dense.path, out=tmp_path, progress=False,
                           options=WeightsOptions(layers=[layer], match=match))
    labels = res[f"layer{layer}.labels"]
    mats = {m: [neurons(x, m) for x in np_members(model, layer, m, dmodel)] for m in ("gate", "up", "down")}
    unit = {m: [v / np.linalg.norm(v, axis=1, keepdims=True) for v in vs] for m, vs in mats.items()}
    on = ("gate", "up", "down") if match == "concat" else (match,)
    truth = moe.truth["permutations"][str(layer)]
    for a in range(len(labels)):
        for b in range(a + 1, len(labels)):
            pair = f"{labels[a]}-{labels[b]}"
            score = np.mean([unit[m][a] @ unit[m][b].T for m in on], axis=0)
            rows, best = linear_sum_assignment(score, maximize=True)
            col = res[f"layer{layer}.gate.permutations"][pair].numpy()
            assert math.isclose(score[rows, col].sum(), score[rows, best].sum(), rel_tol=1e-9)
            if b < len(truth):  # routed experts are permuted copies of one another
                inverse_b = {p: j for j, p in enumerate(truth[b])}
                assert col.tolist() == [inverse_b[p] for p in truth[a]]
            for m in ("gate", "up", "down"):
                np.testing.assert_array_equal(res[f"layer{layer}.{m}.permutations"][pair].numpy(), col)
                c = unit[m][a] @ unit[m][b].T
                assert abs(res[f"layer{layer}.{m}.matched_neuron_similarity"][a, b] - c[rows, col].mean()) < 1e-6
                assert abs(res[f"layer{layer}.{m}.reordered_matrix_similarity"][a, b]
                           - np_cos(mats[m][a], mats[m][b][col])) < 1e-6
                assert abs(res[f"layer{layer}.{m}.kendall_tau"][a, b] - np_tau_b(col)) < 1e-9
                assert res[f"layer{layer}.{m}.assignment"][pair]["matched_on"] == match


def test_match_option_is_checked():
    with pytest.raises(moescope.errors.OptionsError, match="--match must be"):
        WeightsOptions(match="all")


def test_deepseek_shared_split_and_dense_layer(tiny, tmp_path):
    built = tiny("deepseek", dtype="float32")
    res = moescope.weights(built.path, out=tmp_path, progress=False)
    model = open_model(built.path)
    assert res.layers == model.moe_layers == [1, 2]
    assert res["summary.dense_layers"] == [0]
    assert res["layer1.labels"][-2:] == ["shared0", "shared1"]
    merged = model.checkpoint.read("model.layers.1.mlp.shared_experts.gate_proj.weight").double()
    width = model.expert_width
    split = model.shared_experts(1, "gate").double()
    assert torch.equal(split[1], merged[width:]) and split.shape[1] == width
    sim = res["layer1.gate.matrix_similarity"].numpy()
    assert not np.isnan(sim).any()  # shared members have the routed width: comparable
    assert abs(sim[8, 9] - np_cos(merged[:width], merged[width:])) < 1e-6


def test_qwen_wide_shared_expert_is_only_matched(tiny, tmp_path):
    built = tiny("qwen2_moe", dtype="float32")
    res = moescope.weights(built.path, out=tmp_path, progress=False)
    sim = res["layer0.gate.matrix_similarity"].numpy()
    assert np.isnan(sim[:8, 8]).all() and np.isnan(res["layer0.up.neuron_avg_similarity"].numpy()[8, :8]).all()
    assert not np.isnan(res["layer0.gate.reordered_matrix_similarity"].numpy()[:8, 8]).any()
    model = open_model(built.path)
    wa, ws = model.experts(0, "down")[3].double().numpy(), model.shared_experts(0, "down")[0].double().numpy()
    va, vs = wa.T, ws.T
    c = (va / np.linalg.norm(va, axis=1, keepdims=True)) @ (vs / np.linalg.norm(vs, axis=1, keepdims=True)).T
    rows, cols = linear_sum_assignment(c, maximize=True)
    assert abs(res["layer0.down.matched_neuron_similarity"][3, 8] - c[rows, cols].mean()) < 1e-6
    assert res["layer0.down.permutation_side"]["e3-shared0"] == "e3"
    assert res["layer0.gate.pca_matrix_members"] == [f"e{i}" for i in range(8)]


def test_grok_bin_shards(tiny, tmp_path):
    built = tiny("grok1", dtype="float32")
    res = moescope.weights(built.path, out=tmp_path, progress=False, options=WeightsOptions(matrices=("up",)))
    model = open_model(built.path)
    mats = np_members(model, 1, "up")
    np.testing.assert_allclose(res["layer1.up.matrix_similarity"].numpy(),
                               [[np_cos(a, b) for b in mats] for a in mats], atol=1e-6)


def test_pairs_options(tiny, tmp_path):
    built = tiny("mixtral", dtype="float32")
    top = moescope.weights(built.path, out=tmp_path / "top", progress=False,
                           options=WeightsOptions(layers=[0], matrices=("gate",), pairs="top:3"))
    flat = top["layer0.gate.matrix_similarity"].numpy().copy()
    np.fill_diagonal(flat, -np.inf)
    best = sorted(zip(*np.triu_indices(8, 1)), key=lambda p: -flat[p])[:3]
    assert sorted(top["layer0.gate.permutations"]) == sorted(f"e{a}-e{b}" for a, b in best)
    sample = moescope.weights(built.path, out=tmp_path / "s", progress=False,
                              options=WeightsOptions(layers=[0], matrices=("gate",), pairs="sample:5"))
    assert len(sample["layer0.gate.permutations"]) == 5
    assert np.isnan(sample["layer0.gate.kendall_tau"].numpy()).sum() == 2 * (28 - 5)


def test_interrupted_run_resumes_identically(tiny, tmp_path, monkeypatch):
    built = tiny("deepseek", dtype="float32")
    full = moescope.weights(built.path, out=tmp_path / "full", progress=False)
    import moescope.static.run as run
    original, calls = run._matrix_level, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # first matrix of the second layer
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(run, "_matrix_level", failing)
    with pytest.raises(KeyboardInterrupt):
        moescope.weights(built.path, out=tmp_path / "resumed", progress=False)
    assert [p.name for p in sorted((tmp_path / "resumed" / "layers").iterdir())] == ["layer001.json", "layer001.safetensors"]
    monkeypatch.setattr(run, "_matrix_level", original)
    seen = []
    monkeypatch.setattr(run, "_matrix_level", lambda model, layer, *a, **k: seen.append(layer) or original(model, layer, *a, **k))
    resumed = moescope.weights(built.path, out=tmp_path / "resumed", progress=False)
    assert set(seen) == {2}
    for key in full.keys():
        a, b = full[key], resumed[key]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True), key
        else:
            assert json.dumps(a) == json.dumps(b), key


def test_small_memory_budget_streams_the_same_numbers(tiny, tmp_path):
    built = tiny("deepseek", dtype="float32")
    opts = dict(layers=[1], neuron_level=False)
    big = moescope.weights(built.path, out=tmp_path / "big", progress=False, options=WeightsOptions(**opts))
    small = moescope.weights(built.path, out=tmp_path / "small", progress=False,
                             options=WeightsOptions(**opts, memory_budget=2000))  # a few rows per chunk
    for key in ("gate.matrix_similarity", "down.neuron_avg_similarity", "up.pca_matrix", "down.pca_matrix"):
        torch.testing.assert_close(big[f"layer1.{key}"], small[f"layer1.{key}"], rtol=0, atol=1e-12)


def test_cli_writes_and_load_results_reads(tiny, tmp_path, capsys):
    built = tiny("olmoe", dtype="float32")
    assert main(["weights", str(built.path), "--out", str(tmp_path), "--matrices", "gate", "--layers", "1"]) == 0
    assert "wrote 1 layer(s)" in capsys.readouterr().out
    res = moescope.load_results(tmp_path)
    assert res.layers == [1] and res.manifest["options"]["matrices"] == ["gate"]
    assert res.manifest["checkpoint"]["config_sha256"]
    assert main(["weights", str(built.path), "--out", str(tmp_path), "--matrices", "up"]) == 2  # other options
    assert "another run" in capsys.readouterr().err


def test_matching_plan_counts_assignments_of_real_models():
    from moescope.arch import MoEModel, get_family
    from moescope.inspect import matching_plan
    ds = MoEModel.from_config(get_family("deepseek").reference_configs["deepseek-ai/deepseek-moe-16b-base"])
    mixtral = MoEModel.from_config(get_family("mixtral").reference_configs["mistralai/Mixtral-8x7B-v0.1"])
    assert matching_plan(ds, calibrate=False)["assignments"] == 66 * 65 // 2 * 3 * 27  # 64 routed + 2 shared
    assert matching_plan(mixtral, calibrate=False)["assignments"] == 28 * 3 * 32
    assert matching_plan(mixtral, "top:5", calibrate=False)["assignments"] == 5 * 3 * 32
    assert matching_plan(mixtral)["estimated_seconds"] > 0


def test_inspect_prints_matching_plan(tiny, capsys):
    built = tiny("mixtral")
    assert main(["inspect", str(built.path), "--pairs", "sample:3"]) == 0
    assert "--pairs sample:3: 18 neuron assignments" in capsys.readouterr().out
    assert main(["inspect", str(built.path), "--pairs", "sample:3", "--match", "concat"]) == 0
    assert "--pairs sample:3 --match concat: 6 neuron assignments" in capsys.readouterr().out


def test_dense_model_must_match(tiny, tmp_path, capsys):
    moe = tiny("mixtral", dtype="float32")
    other = tiny("mistral", dtype="float32", sizes={"hidden_size": 64})
    assert main(["weights", str(moe.path), "--dense", str(other.path), "--out", str(tmp_path)]) == 2
    assert "hidden size 64" in capsys.readouterr().err
    assert main(["weights", str(moe.path), "--dense", str(moe.path), "--out", str(tmp_path / "b")]) == 2
    assert "must be a dense model" in capsys.readouterr().err


def test_bad_options_are_user_errors(tiny, tmp_path, capsys):
    built = tiny("deepseek", dtype="float32")
    assert main(["weights", str(built.path), "--layers", "0", "--out", str(tmp_path)]) == 2  # layer 0 is dense
    assert "not MoE layers" in capsys.readouterr().err
    assert main(["inspect", str(built.path), "--pairs", "best:3"]) == 2
    assert "--pairs must be" in capsys.readouterr().err


def test_parallel_workers_give_the_single_process_results(tiny, tmp_path):
    built = tiny("olmoe", sizes={"num_hidden_layers": 3})
    opts = WeightsOptions(matrices=("gate", "down"), pairs="sample:6")
    one = moescope.weights(built.path, out=tmp_path / "one", options=opts, progress=False)
    two = moescope.weights(built.path, out=tmp_path / "two", options=opts, progress=False, workers=2)
    assert two.layers == one.layers == [0, 1, 2]
    _assert_same_results(one, two)


def test_pairs_matched_in_threads_give_the_sequential_results(tiny, tmp_path, monkeypatch):
    built = tiny("deepseek", dtype="float32")
    opts = WeightsOptions(matrices=("up",), layers=[1])
    one = moescope.weights(built.path, out=tmp_path / "one", options=opts, progress=False)
    monkeypatch.setattr(static_run, "_pair_workers", lambda *args: 3)
    three = moescope.weights(built.path, out=tmp_path / "three", options=opts, progress=False)
    assert len(three["layer1.up.permutations"]) >= 6
    _assert_same_results(one, three)


def _assert_same_results(one, two):
    for key in one.keys():
        a, b = one[key], two[key]
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)
        else:
            assert a == b or (a != a and b != b), key
