"""moescope compress / evaluate from the command line."""
import json

from moescope.arch import open_model
from moescope.cli import main


def test_compress_then_evaluate(tiny, tmp_path, capsys):
    path, out = str(tiny("mixtral").path), tmp_path / "pruned"
    assert main(["compress", path, str(out), "--prune", "2", "--builtin", "long", "--max-tokens", "256",
                 "--quiet"]) == 0
    model = open_model(out)
    model.check()
    assert model.num_experts == open_model(path).num_experts - 2
    record = json.loads((out / "compression.json").read_text())
    assert record["layers"]
    assert main(["evaluate", str(out), "--builtin", "long", "--max-tokens", "128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0 and result["perplexity"] > 1
    assert main(["compress", path, str(tmp_path / "x"), "--prune", "8", "--builtin", "long", "--quiet"]) == 2
    assert "error" in capsys.readouterr().err
