"""moescope compare: two tiny mixtral checkpoints (different seeds) traced on the same text; the routing agreement
equals an independent numpy computation from the saved chosen experts; a run on other text is refused with a
clear error; two weights runs give difference matrices equal to a − b."""
import base64
import json
import math
import re
import shutil

import numpy as np
import pytest

from moescope.dynamic.run import TraceOptions, trace
from moescope.errors import MoescopeError
from moescope.report.compare import (CompareError, TokenMismatchError, compare, compare_numbers, format_compare,
                                     read_compare, routing_agreement)
from moescope.results import load_results
from moescope.static.run import WeightsOptions, weights
from moescope.testing import build_checkpoint

TEXTS = ["Neurons act like fine-grained experts.", "The router prefers large output norms.",
         "The last layer is an outlier."]
OPTIONS = dict(bootstrap=50, device="cpu", dtype="float32", similarity_tokens=2, intermediate_tokens=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    a = build_checkpoint("mixtral", root / "ckpt-a", seed=0)
    b = build_checkpoint("mixtral", root / "ckpt-b", seed=1)
    out = {"root": root}
    out["ta"] = trace(a.path, TEXTS, out=root / "base", progress=False, options=TraceOptions(**OPTIONS))
    out["tb"] = trace(b.path, TEXTS, out=root / "instruct", progress=False, options=TraceOptions(**OPTIONS))
    out["other"] = trace(b.path, ["A different text altogether."], out=root / "other", progress=False,
                         options=TraceOptions(**OPTIONS))
    wopts = WeightsOptions(matrices=("gate", "down"), pca_components=2)
    out["wa"] = weights(a.path, out=root / "wa", progress=False, options=wopts)
    out["wb"] = weights(b.path, out=root / "wb", progress=False, options=wopts)
    out["html"] = compare(out["ta"].path, out["tb"].path, root / "cmp")
    out["numbers"] = read_compare(out["html"])
    return out


def _expected(a, b, layer):
    """Independent computation from the saved arrays."""
    ca, cb = a[f"layer{layer}.chosen_experts"].numpy(), b[f"layer{layer}.chosen_experts"].numpy()
    wa, wb = a[f"layer{layer}.chosen_weights"].numpy(), b[f"layer{layer}.chosen_weights"].numpy()
    t = len(ca)
    top1a, top1b = ca[np.arange(t), wa.argmax(1)], cb[np.arange(t), wb.argmax(1)]
    jaccard = [len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(ca.tolist(), cb.tolist())]
    e = a[f"layer{layer}.router_scores"].shape[1]
    load_a = np.array([(ca == i).any(1).mean() for i in range(e)])
    load_b = np.array([(cb == i).any(1).mean() for i in range(e)])
    pa, pb = np.bincount(top1a, minlength=e) / t, np.bincount(top1b, minlength=e) / t
    confusion = np.zeros((e, e))
    for x, y in zip(top1a, top1b):
        confusion[x, y] += 1 / t
    return {"top1_agreement": float(np.mean(top1a == top1b)), "topk_jaccard": float(np.mean(jaccard)),
            "top1_agreement_chance": float(np.sum(pa * pb)), "topk_load_a": load_a, "topk_load_b": load_b,
            "top1_confusion": confusion}


def test_agreement_equals_numpy(runs):
    a, b, numbers = load_results(runs["ta"].path), load_results(runs["tb"].path), runs["numbers"]
    assert numbers["analysis"] == "trace" and numbers["layers"] == a.layers
    assert numbers["tokens"] == len(a["inputs.token_ids"]) == a["layer0.chosen_experts"].shape[0]
    assert numbers["names"] == ["base", "instruct"]
    per = numbers["per_layer"]
    for i, l in enumerate(numbers["layers"]):
        want = _expected(a, b, l)
        for key in ("top1_agreement", "topk_jaccard", "top1_agreement_chance"):
            assert math.isclose(per[key][i], want[key], rel_tol=1e-12, abs_tol=1e-12), (l, key)
        np.testing.assert_allclose(per["topk_load_a"][i], want["topk_load_a"], atol=1e-12)
        np.testing.assert_allclose(per["topk_load_b"][i], want["topk_load_b"], atol=1e-12)
        np.testing.assert_allclose(per["load_shift"][i], want["topk_load_b"] - want["topk_load_a"], atol=1e-12)
        np.testing.assert_allclose(per["top1_confusion"][i], want["top1_confusion"], atol=1e-12)
        assert math.isclose(per["load_shift_total_variation"][i],
                            0.5 * np.abs(want["topk_load_a"] - want["topk_load_b"]).sum() / 2, abs_tol=1e-12)
    assert math.isclose(numbers["mean"]["top1_agreement"], float(np.mean(per["top1_agreement"])))
    assert 0 <= numbers["mean"]["top1_agreement"] < 1       # different seeds: routing differs somewhere


def test_agreement_of_a_run_with_itself():
    chosen = np.array([[0, 1], [2, 3], [1, 0]])
    weights_ = np.array([[0.7, 0.3], [0.4, 0.6], [0.45, 0.55]])          # top-1: e0, e3, e0
    same = routing_agreement(chosen, chosen[:, ::-1], weights_, weights_[:, ::-1], num_experts=4)
    assert same["top1_agreement"] == 1.0 and same["topk_jaccard"] == 1.0   # column order does not matter
    other = routing_agreement(chosen, np.array([[0, 2], [3, 1], [2, 3]]), weights_, weights_, num_experts=4)
    assert other["topk_jaccard"] == pytest.approx(np.mean([1 / 3, 1 / 3, 0]))
    assert other["top1_agreement"] == pytest.approx(1 / 3)      # top-1 e0, e1, e3 against e0, e3, e0
    assert other["top1_confusion"][0, 0] == pytest.approx(1 / 3) and other["top1_confusion"].sum() == pytest.approx(1)


def test_page_and_json(runs):
    html_path = runs["html"]
    assert html_path == runs["root"] / "cmp" / "compare.html" and (html_path.parent / "compare.json").is_file()
    text = html_path.read_text()
    for ident in ("compare-summary", "routing-agreement", "chosen-experts-compare", "load-shift"):
        assert f'<section id="{ident}">' in text
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= 5
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    names = re.findall(r'data-name="([^"]+)"', text)
    assert {"chosen_experts_a", "chosen_experts_b", "chosen_experts_diff", "agreement_by_layer",
            "load_shift"} <= set(names)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert all(v.startswith("data:") for v in re.findall(r'\ssrc="([^"]*)"', text))
    assert "default-src 'none'" in text
    summary = format_compare(runs["numbers"])
    assert f"{runs['numbers']['mean']['top1_agreement']:.3f}" in summary and len(summary.splitlines()) <= 40


def test_different_tokens_are_refused(runs):
    with pytest.raises(TokenMismatchError) as err:
        compare(runs["ta"].path, runs["other"].path, runs["root"] / "nope")
    message = str(err.value)
    assert "different tokens" in message and "position" in message and "same text" in message
    assert isinstance(err.value, MoescopeError)
    assert not (runs["root"] / "nope").exists()


def test_other_mismatches_are_refused(runs, tmp_path):
    with pytest.raises(CompareError, match="trace run .* weights run"):
        compare_numbers(runs["ta"].path, runs["wb"].path)
    other = tmp_path / "other-family"
    shutil.copytree(runs["wb"].path, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["checkpoint"]["family"] = "qwen2_moe"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CompareError, match="same family"):
        compare_numbers(runs["wa"].path, other)


def _nan_equal(got, want):
    got = np.array([[np.nan if v is None else v for v in row] for row in got], dtype=float) \
        if isinstance(got, list) else np.asarray(got, dtype=float)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), rtol=0, atol=1e-12)


def test_weights_differences_are_a_minus_b(runs):
    a, b = load_results(runs["wa"].path), load_results(runs["wb"].path)
    html_path = compare(a.path, b.path, runs["root"] / "cmp-w", names=("seed0", "seed1"))
    saved = read_compare(html_path)
    direct = compare_numbers(a.path, b.path)
    assert saved["analysis"] == "weights" and saved["names"] == ["seed0", "seed1"]
    checked = 0
    for l in a.layers:
        want = a[f"layer{l}.router_similarity"].double().numpy() - b[f"layer{l}.router_similarity"].double().numpy()
        _nan_equal(saved["layers_detail"][str(l)]["router_similarity"], want)
        for m in ("gate", "down"):
            for kind in ("matrix_similarity", "neuron_avg_similarity", "reordered_matrix_similarity",
                         "matched_neuron_similarity", "kendall_tau"):
                want = a[f"layer{l}.{m}.{kind}"].double().numpy() - b[f"layer{l}.{m}.{kind}"].double().numpy()
                _nan_equal(saved["layers_detail"][str(l)][m][kind], want)
                _nan_equal(direct["layers_detail"][str(l)][m][kind], want)
                checked += 1
        assert "up" not in saved["layers_detail"][str(l)]
    assert checked == len(a.layers) * 10
    text = html_path.read_text()
    assert '<section id="weights-difference">' in text and 'data-heatmap="' in text
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    s = saved["summary"]["gate.matrix_similarity"]
    diffs = [np.asarray(a[f"layer{l}.gate.matrix_similarity"].double() - b[f"layer{l}.gate.matrix_similarity"].double())
             for l in a.layers]
    assert s["max_abs"] == pytest.approx([float(np.nanmax(np.abs(d))) for d in diffs])
