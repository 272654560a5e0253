"""moescope trace from the command line: inputs, the dense member F, resuming, and clear errors."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from moescope import load_results
from moescope.arch import open_model
from moescope.cli import main
from moescope.dynamic.inputs import CHAT_PROMPT, SHORT_PROMPT, paragraphs, select_input, wikitext_lines
from moescope.dynamic.loader import load_model

TEXTS = [SHORT_PROMPT, CHAT_PROMPT, "Experts are small networks; the router picks two of them for every token."]


def test_dense_member_F_is_the_dense_models_own_ffn_output(tiny, tmp_path):
    moe, dense = tiny("mixtral"), tiny("mistral")
    out = tmp_path / "run"
    assert main(["trace", str(moe.path), "--dense", str(dense.path), "--builtin", "short", "--out", str(out),
                 "--quiet"]) == 0
    results = load_results(out)
    dmodel = open_model(dense.path)
    net = load_model(dmodel)
    seen = {}
    hooks = [net.model.layers[l].mlp.register_forward_pre_hook(
        lambda m, a, l=l: seen.__setitem__(l, a[0][0].double().numpy())) for l in results.layers]
    with torch.no_grad():
        net(input_ids=torch.tensor([results["inputs.token_ids"]]))
    for h in hooks:
        h.remove()
    for layer in results.layers:
        assert results[f"layer{layer}.members"][-1] == "F"
        g, u, d = (dmodel.dense_ffn(layer, m).double().numpy() for m in ("gate", "up", "down"))
        x = seen[layer]
        f = (x @ g.T / (1 + np.exp(-x @ g.T)) * (x @ u.T)) @ d.T
        np.testing.assert_allclose(results[f"layer{layer}.expert_norms"][:, -1].numpy(),
                                   np.linalg.norm(f, axis=-1), rtol=1e-4)
        assert results[f"layer{layer}.output_similarity"].shape == (9, 9)


def test_resume_skips_finished_layers_and_gives_the_same_numbers(tiny, tmp_path, capsys):
    path, out = str(tiny("olmoe").path), str(tmp_path / "run")
    assert main(["trace", path, "--builtin", "chat", "--out", out, "--json", "--bootstrap", "50"]) == 0
    first = json.loads(capsys.readouterr().out)
    (tmp_path / "run" / "layers" / "layer001.json").unlink()  # as if interrupted before layer 1 finished
    assert main(["trace", path, "--builtin", "chat", "--out", out, "--json", "--bootstrap", "50"]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert main(["trace", path, "--builtin", "short", "--out", out, "--quiet"]) == 2  # other input, same --out
    assert "another run" in capsys.readouterr().err


def test_summary_is_printed(tiny, tmp_path, capsys):
    assert main(["trace", str(tiny("mixtral").path), "--builtin", "short", "--out", str(tmp_path / "r"),
                 "--no-stats"]) == 0
    printed = capsys.readouterr().out
    assert "tokens in 1 document" in printed and "top-1 scored expert" in printed


@pytest.mark.parametrize("args, message", [
    (["--prompt", "   "], "input is empty"),
    (["--text", "/nonexistent/file.txt"], "cannot read"),
    (["--layers", "7"], "not MoE layers"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--ray"], "pass --workers N"),
])
def test_bad_input_is_a_clear_error(tiny, tmp_path, capsys, args, message):
    assert main(["trace", str(tiny("mixtral").path), "--out", str(tmp_path / "r"), *args]) == 2
    assert message in capsys.readouterr().err


def test_workers_trace_shards_whose_merged_results_equal_one_process(tiny, tmp_path, one_torch_thread,
                                                                      assert_same_results):
    """3 documents, one per batch: 2 worker processes trace 2 and 1 of them, their accumulators merge (sums over
    tokens to 1e-12, everything else bit-identical: per-token values, counts, kept states, bootstrap CIs)."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    command = ["trace", str(tiny("mixtral").path), "--documents", str(docs), "--batch-size", "1", "--bootstrap", "50",
               "--dtype", "float32", "--quiet"]
    assert main([*command, "--out", str(tmp_path / "one")]) == 0
    assert main([*command, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = load_results(tmp_path / "one"), load_results(tmp_path / "two")
    assert len(one["inputs.documents"]) == 4 and one["layer0.stats.cross_layer.next_layer"] == 1
    assert_same_results(one, two)


def test_device_map_gives_the_cpu_results(tiny, tmp_path, assert_same_results):
    """--device map loads with accelerate's device_map (all on the CPU here, where there is no GPU)."""
    command = ["trace", str(tiny("mixtral").path), "--builtin", "short", "--dtype", "float32", "--bootstrap", "20",
               "--quiet"]
    assert main([*command, "--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    assert main([*command, "--device", "map", "--out", str(tmp_path / "map")]) == 0
    assert_same_results(load_results(tmp_path / "cpu"), load_results(tmp_path / "map"))


@pytest.mark.parametrize("module, args, message", [
    ("ray", ["--workers", "2", "--ray"], "--ray needs Ray installed"),
    ("accelerate", ["--device", "map"], "pip install accelerate"),
])
def test_missing_optional_package_is_a_clear_error(tiny, tmp_path, capsys, monkeypatch, module, args, message):
    monkeypatch.setitem(sys.modules, module, None)   # import it -> ImportError
    assert main(["trace", str(tiny("mixtral").path), "--builtin", "short", "--out", str(tmp_path / "r"), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_tokenizer_and_dense_checks(tiny, tmp_path, capsys):
    bare = tiny("mixtral", tokenizer=False)
    assert main(["trace", str(bare.path), "--builtin", "short", "--out", str(tmp_path / "a")]) == 2
    assert "no usable tokenizer" in capsys.readouterr().err
    other = tmp_path / "other-dense"
    shutil.copytree(tiny("mistral").path, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    token = next(t for t, i in vocab.items() if i == 100)
    vocab["renamed-token"] = vocab.pop(token)
    (other / "tokenizer.json").write_text(json.dumps(spec))
    assert main(["trace", str(tiny("mixtral").path), "--dense", str(other), "--builtin", "short",
                 "--out", str(tmp_path / "b")]) == 2
    assert "tokenizer differs" in capsys.readouterr().err
    assert main(["trace", str(tiny("mistral").path), "--builtin", "short", "--out", str(tmp_path / "c")]) == 2
    assert "needs an MoE model" in capsys.readouterr().err


def test_long_documents_are_split_with_a_warning(tiny, tmp_path):
    text = " ".join(f"word{i}" for i in range(400))  # far more tokens than the tiny context of 256
    with pytest.warns(UserWarning, match="split into"):
        assert main(["trace", str(tiny("mixtral").path), "--prompt", text, "--out", str(tmp_path / "r"),
                     "--quiet", "--no-stats", "--max-tokens", "100000"]) == 0
    offsets = load_results(tmp_path / "r")["inputs.documents"]
    assert len(offsets) > 2 and max(b - a for a, b in zip(offsets, offsets[1:])) <= 256


def test_input_rules(tmp_path):
    wiki = "\n = Title = \n\n First line .\n\n = = Section = = \n Second line .\n" + "".join(
        f" Line {i} .\n" for i in range(20))
    assert wikitext_lines(wiki)[:3] == ["First line .", "Second line .", "Line 0 ."]
    assert len(wikitext_lines(wiki)) == 10
    assert paragraphs("a\nb\n\n\n c \n") == ["a b", "c"]
    (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert select_input(documents=tmp_path / "docs.jsonl") == (["one", "two"], f"documents:{tmp_path / 'docs.jsonl'}")
    texts, source = select_input()
    assert source == "builtin:long" and len(texts) >= 5


def test_config_that_does_not_match_the_weights_is_refused(tiny, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny("mixtral").path, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] *= 2
    (broken / "config.json").write_text(json.dumps(config))
    assert main(["trace", str(broken), "--builtin", "short", "--out", str(tmp_path / "r")]) == 2
    assert "does not match these weights" in capsys.readouterr().err
