"""moescope report: one self-contained HTML page from a tiny mixtral's weights + trace runs. Every section is
there, every image decodes, summary.json holds exactly the numbers of the results, nothing is loaded from outside
the page, and a headless Chromium draws it without script errors or blocked requests."""
import base64
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from moescope.dynamic.run import TraceOptions, trace
from moescope.report.html import (SECTIONS, STATIC_SECTIONS, TRACE_SECTIONS, ReportError, format_summary,
                                  read_summary, report)
from moescope.results import load_results
from moescope.static.run import WeightsOptions, weights
from moescope.testing import build_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXTS = ["Neurons act like fine-grained experts.", "The router prefers large output norms.",
         "Experts grow diverse with depth.", "The last layer is an outlier."]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    moe = build_checkpoint("mixtral", root / "mx", seed=0)
    dense = build_checkpoint("mistral", root / "ms", seed=0)
    w = weights(moe.path, dense=dense.path, out=root / "w", progress=False,
                options=WeightsOptions(matrices=("gate",), pca_components=2))
    t = trace(moe.path, TEXTS, out=root / "t", progress=False,
              options=TraceOptions(bootstrap=50, device="cpu", dtype="float32", similarity_tokens=4,
                                   intermediate_tokens=6))
    html_path = report([w.path, t.path], root / "out", detail_layers=[t.layers[0]])
    return {"root": root, "weights": load_results(w.path), "trace": load_results(t.path), "html": html_path,
            "text": html_path.read_text(encoding="utf-8"), "summary": read_summary(html_path)}


def test_writes_index_and_summary(runs):
    assert runs["html"] == runs["root"] / "out" / "index.html"
    assert (runs["root"] / "out" / "summary.json").is_file()
    assert runs["summary"]["report"] == str(runs["html"])
    assert set(runs["summary"]["sections"]) == set(SECTIONS)
    assert all(v is True for v in runs["summary"]["sections"].values())


def test_every_section_present(runs):
    for ident in SECTIONS:
        assert f'<section id="{ident}">' in runs["text"], ident
        assert f'href="#{ident}"' in runs["text"], ident


def _data_uris(text):
    return re.findall(r'src="data:(image/[a-z+]+);base64,([A-Za-z0-9+/=]+)"', text)


def test_images_decode(runs):
    images = _data_uris(runs["text"])
    assert len(images) >= 8
    for mime, data in images:
        raw = base64.b64decode(data, validate=True)
        if mime == "image/png":
            assert raw.startswith(PNG_MAGIC) and len(raw) > 1000
        else:
            assert mime == "image/svg+xml" and raw.lstrip().startswith((b"<?xml", b"<svg"))
    names = re.findall(r'data-name="([^"]+)"', runs["text"])
    for expected in ("gate_regression_r2_by_layer", "output_similarity_by_layer", "norm_rank_table",
                     "chosen_experts_map", "routing_by_layer", "load_bars", "coactivation_lift"):
        assert expected in names


def _section(text, ident):
    start = text.index(f'<section id="{ident}">')
    return text[start:text.index("</section>", start)]


def test_figures_sit_in_their_sections(runs):
    text = runs["text"]
    assert "pca_gate_matrix_2d" in _section(text, "pca")
    assert "gate_regression_gate_flat" in _section(text, "gate-regression")
    assert "norm_rank_table" in _section(text, "norm-vs-score")
    assert "chosen_experts_map" in _section(text, "chosen-experts")
    assert "load_bars" in _section(text, "routing-stats")
    for ident in ("static-similarity", "output-similarity"):
        assert "data-heatmap=" in _section(text, ident)


def test_no_external_resources(runs):
    text = runs["text"]
    assert not re.search(r"""(?:src|href|action|poster|srcset)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:)?//", text, re.I)
    assert "@import" not in text
    for value in re.findall(r'\ssrc="([^"]*)"', text):
        assert value.startswith("data:"), value[:60]
    for value in re.findall(r'\shref="([^"]*)"', text):
        assert value.startswith("#"), value
    assert "Content-Security-Policy" in text and "default-src 'none'" in text


def _close(a, b):
    if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
        return (a is None) and (b is None or math.isnan(b))
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_summary_numbers_equal_results(runs):
    s, w, t = runs["summary"], runs["weights"], runs["trace"]
    for m, kinds in w.summary["gate_r2_mean"].items():
        for k, v in kinds.items():
            assert _close(s["static"]["gate_r2_mean"][m][k], v)
    for i, l in enumerate(w.layers):
        assert _close(s["static"]["gate_r2_by_layer"]["gate"]["flat"][i], w[f"layer{l}.gate.gate_regression.flat.r2"])
    assert _close(s["trace"]["top1_largest_norm_fraction"], t.summary["top1_largest_norm_fraction"])
    assert _close(s["trace"]["top1_largest_norm_fraction"],
                  float(np.mean([t[f"layer{l}.top1_largest_norm_fraction"] for l in t.layers])))
    for key in ("slope", "last_layer_outlier_z"):
        assert _close(s["trace"]["depth_trend"][key], t.summary["depth_trend"][key])
    assert s["trace"]["tokens"] == t.summary["tokens"] == len(t["inputs.token_ids"])
    ro = s["routing"]
    assert ro["layers"] == t.layers and ro["n_bootstrap"] == 50
    for i, l in enumerate(t.layers):
        for key, section in (("load_cv", "load"), ("entropy_normalised", "entropy"),
                             ("top1_consistency", "consistency"), ("top1_baseline_permutation", "consistency"),
                             ("jaccard", "consistency"), ("jaccard_baseline_permutation", "consistency")):
            saved = t[f"layer{l}.stats.{section}.{key}"]
            for part in ("value", "ci_low", "ci_high"):
                assert _close(ro["per_layer"][key][i][part], saved[part]), (key, part)
    assert _close(ro["mean"]["load_cv"], float(np.mean([t[f"layer{l}.stats.load.load_cv.value"] for l in t.layers])))
    m = s["model"]
    assert (m["family"], m["num_experts"], m["top_k"], m["num_shared_experts"]) == ("mixtral", 8, 2, 0)
    assert m["moe_layers"] == t.summary["moe_layers"] and m["dense_layers"] == []
    assert m["path"] == t.manifest["checkpoint"]["path"] == w.manifest["checkpoint"]["path"]
    assert m["dense_model"] == w.manifest["checkpoint"]["dense"]["path"]    # F of the weights run


def _widgets(text):
    return {i: json.loads(blob.replace("<\\/", "</")) for i, blob in
            re.findall(r'<script type="application/json" id="([^"]+)">(.*?)</script>', text, re.S)}


def test_heatmap_data_are_the_saved_matrices(runs):
    w, t = runs["weights"], runs["trace"]
    specs = _widgets(runs["text"])
    assert len(specs) == runs["text"].count('class="hm" data-heatmap="')
    static = next(s for s in specs.values() if s["key"] == ["layer", "matrix", "kind"])
    l = w.layers[-1]
    entry = static["data"][f"{l}|gate|matrix_similarity"]
    assert static["labels"][entry["r"]] == list(w[f"layer{l}.labels"])
    got = np.array([[np.nan if v is None else v for v in row] for row in entry["v"]])
    np.testing.assert_allclose(got, w[f"layer{l}.gate.matrix_similarity"].numpy(), atol=5e-5)
    per_token = next(s for s in specs.values() if s["key"] == ["layer", "token"])
    l = t.layers[0]
    entry = per_token["data"][f"{l}|3"]
    np.testing.assert_allclose(np.array(entry["v"], dtype=float), t[f"layer{l}.token_similarity"][3].numpy(),
                               atol=5e-5)
    assert per_token["range"] == [-1.0, 1.0]


def test_text_summary(runs):
    text = format_summary(runs["summary"])
    lines = text.splitlines()
    assert len(lines) <= 40 and max(map(len, lines)) <= 110
    s = runs["summary"]
    assert f"{s['static']['gate_r2_mean']['gate']['flat']:.3f}" in text
    assert f"{s['trace']['top1_largest_norm_fraction']:.1%}" in text
    assert f"{s['routing']['per_layer']['load_cv'][0]['value']:.2f}" in text
    assert str(runs["html"]) in text


@pytest.fixture
def no_figures(monkeypatch):
    """Section logic only: the figure renderers return nothing (they are tested above and in test_figures)."""
    import moescope.report.html as html
    monkeypatch.setattr(html, "render_safely", lambda *a, **k: [])


def test_single_runs_omit_the_other_sections_with_a_note(runs, tmp_path, no_figures):
    only_static = report([runs["weights"].path], tmp_path / "w.html")
    text = only_static.read_text()
    assert only_static.name == "w.html" and (tmp_path / "summary.json").is_file()
    for ident in STATIC_SECTIONS:
        assert f'<section id="{ident}">' in text
    for ident in TRACE_SECTIONS:
        assert f'<section id="{ident}">' not in text
    assert "Not in this report" in text and "needs a `moescope trace` run" in text
    summary = read_summary(only_static)
    assert summary["trace"] is None and summary["routing"] is None
    assert summary["sections"]["norm-vs-score"].startswith("needs a `moescope trace`")

    only_trace = report([runs["trace"].path], tmp_path / "t")
    text = only_trace.read_text()
    assert only_trace == tmp_path / "t" / "index.html"
    for ident in TRACE_SECTIONS:
        assert f'<section id="{ident}">' in text
    for ident in STATIC_SECTIONS:
        assert f'<section id="{ident}">' not in text
    assert read_summary(only_trace)["static"] is None


def test_default_location(runs, no_figures):
    path = report(runs["weights"].path)
    assert path == Path(runs["weights"].path) / "report" / "index.html" and path.is_file()
    assert (path.parent / "summary.json").is_file()


def test_refuses_runs_that_do_not_make_one_report(runs, tmp_path):
    with pytest.raises(ReportError, match="both trace runs"):
        report([runs["trace"].path, runs["trace"].path], tmp_path)
    other = tmp_path / "other"
    shutil.copytree(runs["weights"].path, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["checkpoint"]["config_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReportError, match="different checkpoints"):
        report([other, runs["trace"].path], tmp_path)


# --- headless Chromium -----------------------------------------------------------------------------------------

def _chromium():
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        if os.environ.get("MOESCOPE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("MOESCOPE_REQUIRE_CHROMIUM=1 but no chromium / chromium-browser / google-chrome on PATH")
        pytest.skip("no headless Chromium on PATH (install `chromium` to run this test)")
    return binary


def _browse(binary, html_file, profile, *extra):
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-extensions", "--disable-sync", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", *extra, html_file.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _root_attrs(dom):
    tag = re.search(r"<html([^>]*)>", dom).group(1)
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


def _console_problems(stderr):
    return [l for l in stderr.splitlines() if "CONSOLE" in l and
            ("Uncaught" in l or "Content Security Policy" in l or "Error" in l)]


def test_headless_chromium_draws_the_page(runs, tmp_path):
    binary = _chromium()
    done = _browse(binary, runs["html"], tmp_path / "profile", "--dump-dom")
    dom = done.stdout
    assert done.returncode == 0 and "<html" in dom, done.stderr[-2000:]
    attrs = _root_attrs(dom)
    assert attrs.get("data-report-ready") == "1", attrs
    assert "data-js-errors" not in attrs, attrs.get("data-js-errors")
    assert "data-csp-violations" not in attrs, attrs.get("data-csp-violations")
    assert int(attrs["data-heatmaps"]) == runs["text"].count('class="hm" data-heatmap="') >= 3
    assert not _console_problems(done.stderr)
    shown = re.sub(r"<script\b.*?</script>", "", dom, flags=re.S)      # the page as drawn, without script text
    assert "could not be drawn" not in shown and "no data for this selection" not in shown
    for ident in SECTIONS:
        assert f'<section id="{ident}">' in shown
    assert shown.count("<canvas") == 2 * int(attrs["data-heatmaps"])    # matrix + colour bar per widget

    shot = tmp_path / "shot.png"
    done = _browse(binary, runs["html"], tmp_path / "profile2", "--hide-scrollbars", f"--screenshot={shot}",
                   "--window-size=1280,2000")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 20000


def test_headless_chromium_would_catch_errors_and_requests(runs, tmp_path):
    """The checks above can fail: a page with a network image and a broken script is caught."""
    binary = _chromium()
    bad = tmp_path / "bad.html"
    bad.write_text(runs["text"].replace("</main>", '<img src="http://127.0.0.1:9/x.png">'
                                                   "<script>notDefinedAnywhere();</script></main>"))
    done = _browse(binary, bad, tmp_path / "profile", "--dump-dom")
    attrs = _root_attrs(done.stdout)
    assert "notDefinedAnywhere" in attrs.get("data-js-errors", "")
    assert "127.0.0.1:9" in attrs.get("data-csp-violations", "")
    assert _console_problems(done.stderr)


def test_headless_chromium_heatmap_hover_select_and_zoom(tmp_path):
    """The widget itself: hovering a cell shows its row, column and value; a selector redraws; a click zooms."""
    from moescope.report.html import HeatmapSet, page

    binary = _chromium()
    labels = [f"e{i}" for i in range(30)]
    values = np.arange(900, dtype=float).reshape(30, 30) / 1000
    values[0, 1] = np.nan
    hm = HeatmapSet()
    widget = hm.add(controls=[("layer", "layer", [(0, "0"), (1, "1")])], entries={
        "0": {"rows": labels, "values": values, "note": "first"},
        "1": {"rows": labels, "values": -values, "note": "second", "more": {"other": values}}}, value_name="v")
    probe = """<script>
(function () {
  var root = document.documentElement, fig = document.querySelector('[data-heatmap]');
  var canvas = fig.querySelector('canvas.hm-canvas'), box = canvas.getBoundingClientRect();
  function at(type, x, y) { canvas.dispatchEvent(new MouseEvent(type, {clientX: x, clientY: y, bubbles: true})); }
  at('mousemove', box.right - 6, box.bottom - 6);
  root.setAttribute('data-tip', fig.querySelector('.hm-tip').textContent);
  var select = fig.querySelector('select');
  select.value = '1'; select.dispatchEvent(new Event('change'));
  at('mousemove', box.right - 6, box.bottom - 6);
  root.setAttribute('data-tip2', fig.querySelector('.hm-tip').textContent);
  at('click', box.right - 6, box.bottom - 6);
  root.setAttribute('data-zoomed', fig.querySelector('.hm-note').textContent);
  root.setAttribute('data-reset', String(fig.querySelector('.hm-reset').disabled));
  fig.querySelector('.hm-reset').click();
  root.setAttribute('data-unzoomed', fig.querySelector('.hm-note').textContent);
})();
</script>"""
    html_file = tmp_path / "widget.html"
    html_file.write_text(page("widget", "test", [], widget).replace("</body>", probe + "</body>"))
    done = _browse(binary, html_file, tmp_path / "profile", "--dump-dom", "--window-size=1280,1400")
    attrs = _root_attrs(done.stdout)
    assert "data-js-errors" not in attrs and "data-csp-violations" not in attrs, attrs
    assert attrs["data-tip"] == "e29 × e29: 0.899"
    assert attrs["data-tip2"] == "e29 × e29: -0.899\nother: 0.899"
    assert attrs["data-zoomed"].startswith("second (zoomed: rows e22…e29, columns e22…e29)")
    assert attrs["data-reset"] == "false" and attrs["data-unzoomed"] == "second"
