"""Routing statistics checked against known answers and independent loop implementations of the definitions."""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moescope.dynamic.routing_stats import (CoActivation, ConsecutiveConsistency, CrossLayerConsistency, ExpertLoad,
                                            LayerRoutingStats, RouterEntropy, RoutingDataError,
                                            VocabularySpecialisation, cross_layer_statistics,
                                            independent_pair_probabilities, routing_statistics, top1_experts)

B = 50  # bootstrap samples where the interval itself is not under test


# ---------------------------------------------------------------- data
def random_doc(rng: np.random.Generator, T: int, E: int, k: int, vocab: int = 6) -> dict:
    """Softmax-like scores, top-k by score, columns shuffled (top-1 must come from the weights)."""
    scores = rng.dirichlet(np.full(E, 0.7), size=T)
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    idx = rng.permuted(idx, axis=1)
    weights = np.take_along_axis(scores, idx, axis=1)
    return {"indices": idx, "weights": weights, "scores": scores, "token_ids": rng.integers(0, vocab, T)}


def update_all(acc, docs):
    for d in docs:
        acc.update(d["indices"], d["weights"], d["scores"], d["token_ids"])
    return acc


def value(stat):
    return stat["value"]


def arrays_only(x):
    """json default: numpy arrays become lists; anything else (e.g. a numpy scalar) is not JSON-friendly."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-friendly: {type(x)}")


def assert_same(a, b, atol=1e-12):
    """Nested dict / list / array equality (NaN == NaN), up to ``atol``."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key], atol)
    elif isinstance(a, list) and a and isinstance(a[0], dict):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, atol)
    else:
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=0, atol=atol, equal_nan=True)


# ---------------------------------------------------------------- loop references (the definitions, literally)
def loop_top1(row, w):
    best = 0
    for j in range(len(row)):
        if w[j] > w[best]:
            best = j
    return int(row[best])


def loop_reference(docs, E, k):
    """Every single-layer statistic by plain Python loops over tokens."""
    N, c1, ck = 0, [0] * E, [0] * E
    H = Hk = margin = 0.0
    C = [[0] * E for _ in range(E)]
    pairs = same = perm1 = jac = perm_jac = 0.0
    cve, cv = Counter(), Counter()
    for d in docs:
        idx, w, s, tok = d["indices"].tolist(), d["weights"].tolist(), d["scores"].tolist(), d["token_ids"].tolist()
        T = len(idx)
        top = [loop_top1(idx[t], w[t]) for t in range(T)]
        sets = [set(r) for r in idx]
        for t in range(T):
            N += 1
            c1[top[t]] += 1
            for a in idx[t]:
                ck[a] += 1
                cve[(tok[t], a)] += 1
                for b in idx[t]:
                    C[a][b] += 1
            cv[tok[t]] += 1
            p = [x / sum(s[t]) for x in s[t]]
            H -= sum(x * math.log(x) for x in p if x > 0)
            q = [x / sum(w[t]) for x in w[t]]
            Hk -= sum(x * math.log(x) for x in q if x > 0)
            srt = sorted(p, reverse=True)
            margin += srt[0] - srt[1]
        for t in range(T - 1):
            pairs += 1
            same += top[t] == top[t + 1]
            jac += len(sets[t] & sets[t + 1]) / len(sets[t] | sets[t + 1])
        if T >= 2:   # exact within-document permutation expectation: a random ordered pair of distinct positions
            eq = sum(top[i] == top[j] for i in range(T) for j in range(T) if i != j)
            jj = sum(len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for i in range(T) for j in range(T) if i != j)
            perm1 += eq / T
            perm_jac += jj / T
    load = [c / N for c in ck]
    mean = sum(load) / E
    std = math.sqrt(sum((x - mean) ** 2 for x in load) / E)
    lift = [[(C[a][b] / N) / (load[a] * load[b]) if a != b else math.nan for b in range(E)] for a in range(E)]
    kl = []
    for e in range(E):
        kl.append(sum((c / ck[e]) * math.log((c / ck[e]) / (cv[v] / N)) for (v, ee), c in cve.items() if ee == e))
    return {"top1_load": [c / N for c in c1], "topk_load": load, "load_cv": std / mean,
            "load_max_over_mean": max(load) / mean, "dead": [e for e in range(E) if ck[e] == 0],
            "entropy": H / N, "topk_entropy": Hk / N, "confidence": margin / N, "counts": C, "lift": lift,
            "top1_consistency": same / pairs, "top1_baseline_load": sum((c / N) ** 2 for c in c1),
            "top1_baseline_permutation": perm1 / pairs, "jaccard": jac / pairs,
            "jaccard_baseline_permutation": perm_jac / pairs, "kl": kl, "cve": cve, "cv": cv, "N": N}


def loop_mi(a, b):
    N = len(a)
    joint, pa, pb = Counter(zip(a, b)), Counter(a), Counter(b)
    mi = sum(c / N * math.log((c / N) / (pa[x] / N * pb[y] / N)) for (x, y), c in joint.items())
    ha = -sum(c / N * math.log(c / N) for c in pa.values())
    hb = -sum(c / N * math.log(c / N) for c in pb.values())
    return mi, ha, hb


# ---------------------------------------------------------------- hand-made trace
def test_hand_trace():
    idx = np.array([[0, 1], [1, 0], [1, 2], [2, 0]])
    w = np.array([[.7, .3], [.6, .4], [.5, .5], [.9, .1]])
    load = ExpertLoad(3, 2)
    load.update(idx, w)
    r = load.finalize(B)
    assert value(r["top1_load"]) == [.25, .5, .25]           # top-1: 0, 1, 1 (tie -> first column), 2
    assert value(r["topk_load"]) == [.75, .75, .5]
    assert value(r["load_cv"]) == pytest.approx(1.5 / math.sqrt(72), abs=1e-15)
    assert value(r["load_max_over_mean"]) == pytest.approx(1.125, abs=1e-15)
    cons = ConsecutiveConsistency(3, 2)
    cons.update(idx, w)
    r = cons.finalize(B)
    assert value(r["top1_consistency"]) == pytest.approx(1 / 3, abs=1e-15)       # only (1, 1)
    assert value(r["jaccard"]) == pytest.approx((1 + 1 / 3 + 1 / 3) / 3, abs=1e-15)
    assert value(r["top1_baseline_load"]) == pytest.approx(.375, abs=1e-15)
    assert value(r["top1_baseline_permutation"]) == pytest.approx((2 / 4) / 3, abs=1e-15)  # Σ n(n-1)/T per pair
    co = CoActivation(3, 2)
    co.update(idx)
    r = co.finalize()
    np.testing.assert_array_equal(r["counts"], [[3, 2, 1], [2, 3, 1], [1, 1, 2]])
    assert r["lift"][0, 1] == pytest.approx(.5 / .75 ** 2, abs=1e-15)


def test_random_trace_matches_loops():
    rng = np.random.default_rng(1)
    E, k = 5, 2
    docs = [random_doc(rng, T, E, k) for T in (0, 1, 2, 7, 9, 4)]
    ref = loop_reference(docs, E, k)
    r = update_all(LayerRoutingStats(E, k, n_permutations=3000, min_count=2, top_n=3), docs).finalize(B)
    load, ent, co, cons, voc = r["load"], r["entropy"], r["coactivation"], r["consistency"], r["vocabulary"]
    for key in ("top1_load", "topk_load", "load_cv", "load_max_over_mean"):
        np.testing.assert_allclose(value(load[key]), ref[key], rtol=0, atol=1e-12)
    assert load["dead_experts"] == ref["dead"]
    for key in ("entropy", "topk_entropy", "confidence"):
        assert value(ent[key]) == pytest.approx(ref[key], abs=1e-12)
    assert value(ent["entropy_normalised"]) == pytest.approx(ref["entropy"] / math.log(E), abs=1e-12)
    assert value(ent["topk_entropy_normalised"]) == pytest.approx(ref["topk_entropy"] / math.log(k), abs=1e-12)
    np.testing.assert_array_equal(co["counts"], ref["counts"])
    np.testing.assert_allclose(co["lift"], ref["lift"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(co["pmi"], np.log(ref["lift"]), rtol=0, atol=1e-12)
    for key in ("top1_consistency", "top1_baseline_load", "top1_baseline_permutation", "jaccard"):
        assert value(cons[key]) == pytest.approx(ref[key], abs=1e-12), key
    # the top-k baseline is a Monte Carlo estimate of the exact within-document permutation expectation
    assert value(cons["jaccard_baseline_permutation"]) == pytest.approx(ref["jaccard_baseline_permutation"], abs=0.01)
    np.testing.assert_allclose(voc["specialisation"], ref["kl"], rtol=0, atol=1e-12)
    for e in range(E):   # top tokens: count(v,e)/count(v) descending, count(v) >= min_count, ties by count then id
        rows = [(-(c / ref["cv"][v]), -c, v) for (v, ee), c in ref["cve"].items() if ee == e and ref["cv"][v] >= 2]
        best = sorted(rows)[:3]
        assert voc["top_tokens"][e]["token_ids"] == [v for _, _, v in best]
        assert voc["top_tokens"][e]["p_expert_given_token"] == pytest.approx([-s for s, _, _ in best], abs=1e-15)
        assert voc["top_tokens"][e]["lift"] == pytest.approx(
            [-s / ref["topk_load"][e] for s, _, _ in best], abs=1e-12)
    # cross-layer MI against the loop (second layer: another random routing of the same tokens)
    nxt = [random_doc(rng, len(d["indices"]), E, k) for d in docs]
    a = np.concatenate([top1_experts(d["indices"], d["weights"]) for d in docs]).tolist()
    b = np.concatenate([top1_experts(d["indices"], d["weights"]) for d in nxt]).tolist()
    mi, ha, hb = loop_mi(a, b)
    x = cross_layer_statistics(docs, nxt, E, n_bootstrap=B)
    assert value(x["mutual_information"]) == pytest.approx(mi, abs=1e-12)
    assert value(x["entropy"]) == pytest.approx(ha, abs=1e-12)
    assert value(x["entropy_next"]) == pytest.approx(hb, abs=1e-12)
    assert value(x["mi_normalised"]) == pytest.approx(mi / min(ha, hb), abs=1e-12)


# ---------------------------------------------------------------- known answers
def test_uniform_routing():
    E, k, T = 8, 2, 64
    t = np.arange(T)
    idx = np.stack([t % E, (t + 1) % E], axis=1)
    doc = {"indices": idx, "weights": np.full((T, k), .5), "scores": np.full((T, E), 1 / E),
           "token_ids": t % 5}
    r = routing_statistics([doc] * 5, E, n_bootstrap=B)
    load, ent = r["load"], r["entropy"]
    assert value(load["top1_load"]) == pytest.approx([1 / E] * E, abs=1e-15)
    assert value(load["topk_load"]) == pytest.approx([k / E] * E, abs=1e-15)
    assert sum(value(load["topk_load"])) == pytest.approx(k, abs=1e-12)
    assert value(load["load_cv"]) == pytest.approx(0, abs=1e-12)
    assert value(load["load_max_over_mean"]) == pytest.approx(1, abs=1e-12)
    assert load["dead_experts"] == [] and load["rare_experts"] == []
    assert value(ent["entropy"]) == pytest.approx(math.log(E), abs=1e-12)
    assert value(ent["entropy_normalised"]) == pytest.approx(1, abs=1e-12)
    assert value(ent["topk_entropy"]) == pytest.approx(math.log(k), abs=1e-12)
    assert value(ent["confidence"]) == pytest.approx(0, abs=1e-12)
    json.dumps(r, default=arrays_only)
    for stat in (ent["entropy"], load["load_cv"]):   # identical documents: every resample agrees
        assert stat["ci_low"] == pytest.approx(stat["value"], abs=1e-12)
        assert stat["ci_high"] == pytest.approx(stat["value"], abs=1e-12)


def test_single_dominant_expert():
    E, T = 4, 30
    scores = np.zeros((T, E))
    scores[:, 2] = 1.0
    docs = [{"indices": np.full((T, 1), 2), "weights": np.ones((T, 1)), "scores": scores,
             "token_ids": np.arange(T) % 3}] * 3
    r = routing_statistics(docs, E, n_bootstrap=B, min_count=1)
    load, ent, cons, voc = r["load"], r["entropy"], r["consistency"], r["vocabulary"]
    assert value(load["top1_load"]) == [0, 0, 1, 0]
    assert value(load["load_cv"]) == pytest.approx(math.sqrt(E - 1), abs=1e-12)
    assert value(load["load_max_over_mean"]) == pytest.approx(E, abs=1e-12)
    assert load["dead_experts"] == [0, 1, 3]
    assert value(ent["entropy"]) == 0 and value(ent["confidence"]) == 1
    for key in ("top1_consistency", "top1_baseline_load", "top1_baseline_permutation", "jaccard",
                "jaccard_baseline_permutation"):
        assert value(cons[key]) == pytest.approx(1, abs=1e-12), key
    assert value(cons["top1_excess"]) == pytest.approx(0, abs=1e-12)
    assert voc["specialisation"][2] == pytest.approx(0, abs=1e-12)    # every token goes to expert 2: P(v|e) = P(v)
    assert all(math.isnan(voc["specialisation"][e]) for e in (0, 1, 3))
    top1 = [np.full(T, 2)] * 3
    x = CrossLayerConsistency(E)
    for a in top1:
        x.update(a, a)
    x = x.finalize(B)
    assert value(x["mutual_information"]) == 0 and math.isnan(value(x["mi_normalised"]))


def test_perfectly_consistent_cross_layer():
    rng = np.random.default_rng(2)
    E, F = 8, 11
    mapping = rng.permutation(F)[:E]        # injective: layer l+1's expert is a function of layer l's
    acc = CrossLayerConsistency(E, F)
    tops = [rng.integers(0, E, int(rng.integers(5, 40))) for _ in range(20)]
    for a in tops:
        acc.update(a, mapping[a])
    r = acc.finalize(B)
    allv = np.concatenate(tops).tolist()
    h = -sum(c / len(allv) * math.log(c / len(allv)) for c in Counter(allv).values())
    assert value(r["mutual_information"]) == pytest.approx(h, abs=1e-12)
    assert value(r["entropy"]) == pytest.approx(h, abs=1e-12)
    assert value(r["mi_normalised"]) == pytest.approx(1, abs=1e-12)
    assert value(r["mi_excess"]) > 1.0     # far above the within-document permutation baseline


def test_independent_cross_layer():
    rng = np.random.default_rng(3)
    E = 8
    acc = CrossLayerConsistency(E)
    for _ in range(100):
        acc.update(rng.integers(0, E, 200), rng.integers(0, E, 200))
    r = acc.finalize(B)
    assert value(r["mutual_information"]) < 0.005        # plug-in bias ≈ (E-1)²/(2N) ≈ 0.0012
    assert abs(value(r["mi_excess"])) < 0.003
    assert value(r["mi_normalised"]) < 0.003


def sample_conditional_poisson(rng, w, k, n):
    """Independent Bernoulli(w/(1+w)) choices kept when exactly k experts are chosen."""
    rows = []
    while sum(len(r) for r in rows) < n:
        draw = rng.random((4 * n, len(w))) < w / (1 + w)
        rows.append(draw[draw.sum(1) == k])
    x = np.concatenate(rows)[:n]
    return np.nonzero(x)[1].reshape(n, k)


def test_coactivation_independent_routing():
    rng = np.random.default_rng(4)
    E, k = 6, 2
    w = np.array([.1, .2, .3, .5, .8, 1.2])
    acc = CoActivation(E, k)
    for _ in range(20):
        acc.update(rng.permuted(sample_conditional_poisson(rng, w, k, 2000), axis=1))
    r = acc.finalize()
    off = ~np.eye(E, dtype=bool)
    n = r["n_tokens"]
    expected = r["baseline_lift"] * np.outer(r["topk_load"], r["topk_load"]) * n      # pair counts under the null
    z = (r["counts"] - expected)[off] / np.sqrt(expected[off])
    assert np.abs(z).max() < 4
    assert np.abs(r["excess_pmi"][off]).max() < 0.2
    assert not np.allclose(r["baseline_lift"][off], 1, atol=0.1)   # the naive "lift = 1" null would be wrong
    # uniform loads: the baseline is the uniform k-subset answer (k-1)E / (k(E-1))
    base = independent_pair_probabilities(np.full(E, k / E), k) / (k / E) ** 2
    assert base[off] == pytest.approx((k - 1) * E / (k * (E - 1)), abs=1e-10)


def test_independent_pair_probabilities_brute_force():
    rng = np.random.default_rng(5)
    E, k = 7, 3
    w = rng.random(E) * 3 + 0.05
    single, pair = np.zeros(E), np.zeros((E, E))
    subsets = list(itertools.combinations(range(E), k))
    probs = np.array([np.prod(w[list(s)]) for s in subsets])
    probs /= probs.sum()
    for s, p in zip(subsets, probs):
        for a in s:
            single[a] += p
            for b in s:
                pair[a, b] += p
    np.testing.assert_allclose(independent_pair_probabilities(single, k), pair, rtol=0, atol=1e-10)
    # an always-chosen expert (load 1) and a never-chosen one (load 0)
    load = np.array([1.0, 0.0, .5, .5, .5, .5])
    got = independent_pair_probabilities(load, 3)
    assert got[0, 2] == pytest.approx(.5) and got[1].sum() == 0
    assert got[2:, 2:][~np.eye(4, dtype=bool)] == pytest.approx(np.full(12, 2 / 12))   # 2 of 4 uniformly
    # the constraint: each token chooses exactly k experts, so Σ_{b≠a} P(a, b) = (k-1) P(a)
    p = 4 * rng.dirichlet(np.full(9, 5.0))
    assert p.max() < 1
    got = independent_pair_probabilities(p, 4)
    np.testing.assert_allclose(got.sum(1) - np.diag(got), 3 * p, rtol=0, atol=1e-9)


def test_vocabulary_specialisation():
    rng = np.random.default_rng(6)
    E, V = 4, 12
    acc, rnd = VocabularySpecialisation(E, 1, min_count=1, top_n=2), VocabularySpecialisation(E, 1)
    tokens = []
    for _ in range(30):
        tok = rng.integers(0, V, 300)
        tokens.append(tok)
        acc.update((tok % E)[:, None], tok)                       # expert is a function of the token
        rnd.update(rng.integers(0, E, (300, 1)), tok)            # expert independent of the token
    r = acc.finalize()
    load = np.bincount(np.concatenate(tokens) % E, minlength=E) / (30 * 300)
    for e in range(E):
        top = r["top_tokens"][e]
        assert len(top["token_ids"]) == 2 and all(v % E == e for v in top["token_ids"])
        assert top["p_expert_given_token"] == [1.0, 1.0]
        assert top["lift"] == pytest.approx([1 / load[e]] * 2, abs=1e-12)      # P(e|v) / P(e)
    # P(v|e) = P(v) / P(e) on expert e's tokens, so KL(P(v|e) || P(v)) = -log P(e)
    np.testing.assert_allclose(r["specialisation"], -np.log(load), rtol=0, atol=1e-12)
    assert min(r["specialisation_excess"]) > 1.0
    q = rnd.finalize()
    np.testing.assert_allclose(q["specialisation"], q["specialisation_baseline"], atol=0.01)


# ---------------------------------------------------------------- merging
def finalize_all(layer: LayerRoutingStats, cross: CrossLayerConsistency) -> dict:
    return {"layer": layer.finalize(30, seed=7), "cross": cross.finalize(30, seed=7)}


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_docs=st.integers(1, 8), n_shards=st.integers(1, 4))
def test_merge_any_order_equals_one_pass(seed, n_docs, n_shards):
    rng = np.random.default_rng(seed)
    E, k = 4, 2
    docs = [random_doc(rng, int(rng.integers(0, 12)), E, k) for _ in range(n_docs)]
    docs.append(random_doc(rng, 3, E, k))
    nxt = [rng.integers(0, E, len(d["indices"])) for d in docs]

    def build(which):
        layer, cross = LayerRoutingStats(E, k, min_count=1, seed=3), CrossLayerConsistency(E, seed=3)
        for i in which:
            d = docs[i]
            layer.update(d["indices"], d["weights"], d["scores"], d["token_ids"])
            cross.update(top1_experts(d["indices"], d["weights"]), nxt[i])
        return layer, cross

    one_pass = finalize_all(*build(range(len(docs))))
    order = rng.permutation(len(docs))
    shards = [build(part) for part in np.array_split(order, n_shards)]
    while len(shards) > 1:                                # merge random neighbours: any tree, any order
        i = int(rng.integers(0, len(shards) - 1))
        (la, ca), (lb, cb) = shards[i], shards[i + 1]
        if rng.random() < .5:
            merged = (lb.merge(la), cb.merge(ca))
        else:
            merged = (la.merge(lb), ca.merge(cb))
        shards[i:i + 2] = [merged]
    assert_same(finalize_all(*shards[0]), one_pass)


def test_merge_associative_and_checked():
    rng = np.random.default_rng(8)
    a, b, c = (update_all(LayerRoutingStats(4, 2), [random_doc(rng, 10, 4, 2)]) for _ in range(3))
    assert_same(a.merge(b).merge(c).finalize(B), a.merge(b.merge(c)).finalize(B))
    assert a.merge(b).n_documents == 2 and a.n_documents == 1      # merge does not modify its inputs
    with pytest.raises(RoutingDataError):
        ExpertLoad(4, 2).merge(ExpertLoad(5, 2))
    with pytest.raises(RoutingDataError):
        a.merge(LayerRoutingStats(4, 2, seed=1))


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_coverage():
    """95% intervals of the top-1 load of expert 0 cover the truth at about the nominal rate."""
    rng = np.random.default_rng(9)
    truth = np.array([.4, .3, .2, .1])
    covered = 0
    n_sets = 200
    for _ in range(n_sets):
        acc = ExpertLoad(4, 1)
        for _ in range(30):   # documents i.i.d.: own expert mix around the truth, own length
            q = rng.dirichlet(20 * truth)
            acc.update(rng.choice(4, size=(int(rng.integers(20, 80)), 1), p=q))
        stat = acc.finalize(n_bootstrap=400, confidence=0.95, seed=int(rng.integers(2**31)))["top1_load"]
        covered += stat["ci_low"][0] <= truth[0] <= stat["ci_high"][0]
    assert 0.85 <= covered / n_sets <= 0.99


def test_bootstrap_basics():
    rng = np.random.default_rng(10)
    docs = [random_doc(rng, 20, 4, 2) for _ in range(12)]
    acc = RouterEntropy(4, 2)
    for d in docs:
        acc.update(d["scores"], d["weights"])
    r1, r2 = acc.finalize(200, seed=1), acc.finalize(200, seed=1)
    assert r1 == r2 and r1["n_documents"] == 12 and r1["n_tokens"] == 240
    for stat in ("entropy", "confidence", "topk_entropy"):
        assert r1[stat]["ci_low"] < r1[stat]["value"] < r1[stat]["ci_high"]
    assert acc.finalize(200, seed=2)["entropy"] != r1["entropy"]
    narrow = acc.finalize(200, confidence=0.5, seed=1)["entropy"]
    assert r1["entropy"]["ci_low"] < narrow["ci_low"] < narrow["ci_high"] < r1["entropy"]["ci_high"]
    none = acc.finalize(0)["entropy"]
    assert math.isnan(none["ci_low"]) and none["value"] == r1["entropy"]["value"]
    single = RouterEntropy(4, 2)
    single.update(docs[0]["scores"], docs[0]["weights"])
    s = single.finalize(50)["entropy"]
    assert s["ci_low"] == pytest.approx(s["value"], abs=1e-12) and s["ci_high"] == pytest.approx(s["value"], abs=1e-12)


# ---------------------------------------------------------------- inputs
def test_bad_inputs():
    acc = LayerRoutingStats(4, 2)
    good = random_doc(np.random.default_rng(11), 5, 4, 2)
    bad = [dict(good, indices=np.array([[0, 0]] * 5)),          # repeated expert
           dict(good, indices=good["indices"] + 4),               # out of range
           dict(good, indices=good["indices"][:, :1]),            # wrong k
           dict(good, weights=-good["weights"]),
           dict(good, scores=good["scores"][:, :3]),
           dict(good, token_ids=good["token_ids"][:4]),
           dict(good, indices=good["indices"].astype(float))]
    for doc in bad:
        with pytest.raises(RoutingDataError):
            acc.update(doc["indices"], doc["weights"], doc["scores"], doc["token_ids"])
    assert acc.n_documents == 0 and acc.entropy.n_documents == 0     # nothing half-added
    with pytest.raises(RoutingDataError):
        acc.finalize(B)
    with pytest.raises(RoutingDataError):
        CrossLayerConsistency(4).update(np.zeros(3, int), np.zeros(2, int))
    with pytest.raises(RoutingDataError):
        routing_statistics([], 4)
