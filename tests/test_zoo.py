"""The zoo: shipped tiny trained models, the corpus they were trained on, and the training script itself."""
import json
import math

import pytest
import torch

from moescope import data as corpus
from moescope import zoo
from moescope.arch import open_model
from moescope.zoo import train as zt

SHIPPED = ["deepseek-tiny", "grok1-tiny", "mistral-tiny", "mixtral-tiny", "mixtral-tiny-instruct"]
MOE = [name for name in SHIPPED if name != "mistral-tiny"]
# A few steps on a tiny slice, short rows; one thread (two threads stall badly on a loaded 2-core machine).
QUICK = ["--steps", "2", "--max-chars", "40000", "--eval-rows", "2", "--seq-len", "64", "--batch", "2",
         "--threads", "1"]


def _modeling_available() -> bool:
    try:
        from moescope.modeling import MODELING  # noqa: F401
    except ImportError:
        return False
    return True


# -- the corpus -----------------------------------------------------------------------------------------------
def test_long_text_is_held_out_prose():
    paragraphs = [p for p in corpus.long_text().split("\n\n") if p.strip()]
    assert 10 <= len(paragraphs) <= 20
    seen = {p for split in corpus.SPLITS for d in corpus.documents(split) for p in d.paragraphs}
    assert not [p for p in paragraphs if p.strip() in seen]
    # nor any of its sentences-long stretches inside a training document or an instruction pair
    train_text = "\n".join(d.text for d in corpus.documents("train"))
    instruct = corpus.instruct_path().read_text()
    for p in paragraphs:
        assert p[:80] not in train_text and p[:80] not in instruct


def test_splits_and_instructions_are_well_formed():
    train, validation = corpus.documents("train"), corpus.documents("validation")
    assert len(train) > 10 * len(validation) > 0
    assert not {d.name for d in train} & {d.name for d in validation}
    pairs = corpus.instruct_pairs()
    assert 300 <= len(pairs) and all(q.strip() and a.strip() for q, a in pairs)


# -- the shipped models ---------------------------------------------------------------------------------------
def test_zoo_api_lists_models_and_explains_unknown_names():
    assert zoo.list_models() == SHIPPED
    assert (zoo.model_path("mixtral-tiny") / "config.json").is_file()
    with pytest.raises(zoo.UnknownModelError, match="mixtral-tiny-instruct") as err:
        zoo.model_path("mixtral-huge")
    assert "no zoo model named 'mixtral-huge'" in str(err.value)
    assert zoo.long_text_path() == corpus.long_text_path() and zoo.long_text_path().is_file()
    assert zoo.model_info("mistral-tiny")["family"] == "mistral"


@pytest.fixture(scope="module")
def unigram():
    """Add-one unigram log-probabilities of (a slice of) the training split, with the zoo's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.model_path("mistral-tiny"))
    text = "\n\n".join(d.text for d in corpus.documents("train"))[:400_000]
    ids = torch.tensor(tok(text).input_ids)
    counts = torch.bincount(ids, minlength=len(tok)).double() + 1
    return (counts / counts.sum()).log()


@pytest.fixture(scope="module")
def validation_rows():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.model_path("mistral-tiny"))
    ids = []
    for d in corpus.documents("validation")[:3]:
        ids += tok(d.text).input_ids + [tok.eos_token_id]
    return torch.tensor(ids[: 6 * 256]).view(6, 256)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_completely_and_beats_unigram(name, unigram, validation_rows):
    if name.split("-")[0] in ("deepseek", "grok1") and not _modeling_available():
        pytest.skip("moescope.modeling is not available")
    spec = zt.get_spec(name)
    path = zoo.model_path(name)
    model = zt.load_model(spec, path)  # raises on any missing / unexpected / mismatched tensor
    open_model(path).check()  # the repo's own reader finds every canonical tensor with the right shape
    loss = zt.evaluate(model, validation_rows, validation_rows)
    baseline = float(-unigram[validation_rows[:, 1:]].mean())
    assert loss < baseline - 0.5, (loss, baseline)
    info = zoo.model_info(name)
    assert info["validation"]["trained_loss"] < info["validation"]["unigram_loss"] - 0.5
    assert info["validation"]["trained_loss"] < info["validation"]["init_loss"]


def test_shipped_tokenizer_round_trips_and_prepends_bos():
    from transformers import AutoTokenizer

    for name in SHIPPED:
        tok = AutoTokenizer.from_pretrained(zoo.model_path(name))
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        ids = tok("Python is an interpreted language.").input_ids
        assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "Python is an interpreted language."
    n = len(AutoTokenizer.from_pretrained(zoo.model_path("mistral-tiny"))(corpus.long_text()).input_ids)
    assert 1000 <= n <= 2100


@pytest.mark.parametrize("name", MOE)
def test_shipped_experts_are_not_identical(name):
    model = open_model(zoo.model_path(name))
    for layer in model.moe_layers:
        gate = model.experts(layer, "gate").float().flatten(1)
        unit = torch.nn.functional.normalize(gate, dim=1)
        cos = unit @ unit.T
        off = cos[~torch.eye(len(cos), dtype=torch.bool)]
        assert off.max() < 0.995, (name, layer, off.max())
        diff = (gate[:, None] - gate[None]).norm(dim=-1)[~torch.eye(len(gate), dtype=torch.bool)]
        assert diff.min() > 0.05 * gate.norm(dim=-1).mean()


def test_shipped_layouts_are_the_real_ones():
    for name in SHIPPED:
        path = zoo.model_path(name)
        spec = zt.get_spec(name)
        config = json.loads((path / "config.json").read_text())
        expected = zt.expected_layout(spec, config)
        model = open_model(path)
        assert set(model.checkpoint.keys()) == set(expected)
    assert list((zoo.model_path("grok1-tiny")).glob("pytorch_model-*.bin"))
    mixtral = open_model(zoo.model_path("mixtral-tiny")).checkpoint
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in mixtral


# -- the training script --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The training script end to end, a few steps on a tiny slice of the corpus."""
    out = tmp_path_factory.mktemp("zoo")
    names = ["mixtral-tiny-instruct"] + (["deepseek-tiny", "grok1-tiny"] if _modeling_available() else [])
    argv = ["--out", str(out), "--only", ",".join(names), *QUICK]
    assert zt.main(argv) == 0
    return out


def test_training_script_runs_every_model(smoke):
    summary = json.loads((smoke / "training.json").read_text())
    trained = [m["name"] for m in summary["models"]]
    assert trained[:3] == ["mistral-tiny", "mixtral-tiny", "mixtral-tiny-instruct"]  # parents trained first
    assert "| `mixtral-tiny` |" in (smoke / "README.md").read_text()
    for name in trained:
        spec = zt.get_spec(name)
        zt.load_model(spec, smoke / name)
        assert math.isfinite(json.loads((smoke / name / "zoo.json").read_text())["validation"]["trained_loss"])


def test_upcycled_experts_start_as_the_dense_ffn(smoke):
    spec = zt.get_spec("mixtral-tiny")
    config = json.loads((smoke / "mixtral-tiny" / "config.json").read_text())
    dense = zt.read_disk_tensors(smoke / "mistral-tiny")
    init = zt.upcycle(spec, dense, config, seed=0)
    for layer in range(config["num_hidden_layers"]):
        for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            base = dense[f"model.layers.{layer}.mlp.{proj}.weight"]
            experts = [init[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"] for e in range(8)]
            for expert in experts:
                noise = (expert - base).std() / base.std()
                assert 0.5 * spec.noise < noise < 2 * spec.noise
            assert not torch.equal(experts[0], experts[1])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.2.self_attn.q_proj.weight"):
        assert torch.equal(init[name], dense[name])
    # all experts ~ the FFN and renormalised top-2 weights: the upcycled model computes what the dense one does
    dense_loss = json.loads((smoke / "mistral-tiny" / "zoo.json").read_text())["validation"]["trained_loss"]
    moe_init = json.loads((smoke / "mixtral-tiny" / "zoo.json").read_text())["validation"]["init_loss"]
    assert abs(dense_loss - moe_init) < 0.02


def test_upcycled_model_computes_what_the_dense_model_does(smoke):
    dense = zt.load_model(zt.get_spec("mistral-tiny"), smoke / "mistral-tiny")
    config = json.loads((smoke / "mistral-tiny" / "config.json").read_text())
    moe, moe_config = zt.initial_model(zt.get_spec("mixtral-tiny"), smoke, config["vocab_size"], seed=0)
    assert moe_config["rope_theta"] == config["rope_theta"]  # the attention is the dense model's, RoPE included
    ids = torch.randint(3, config["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = dense(input_ids=ids).logits, moe(input_ids=ids).logits
    # every expert is the FFN up to 1 % noise and the top-2 weights sum to 1
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert not torch.equal(a, b)


def test_training_is_deterministic(smoke, tmp_path):
    assert zt.main(["--out", str(tmp_path), "--only", "mistral-tiny", *QUICK]) == 0
    a = zt.read_disk_tensors(smoke / "mistral-tiny")
    b = zt.read_disk_tensors(tmp_path / "mistral-tiny")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokenizers = [(d / "mistral-tiny" / "tokenizer.json").read_text() for d in (smoke, tmp_path)]
    assert tokenizers[0] == tokenizers[1]
