"""The compression table of ``docs/compression.md``: held-out perplexity of the bundled models, original and
with 25 % / 50 % of their routed experts pruned or merged.

Calibration text: the first documents of the bundled corpus's ``train`` split; held-out text: its ``validation``
split (neither overlaps the other). Documents are split at the sequence length the model was trained on
(``zoo.json``), for calibration and evaluation alike. Rows per model: the original; moescope pruning (``loss``)
and merging (``similarity`` and ``output``); the ``frequency`` pruning baseline; the ``random`` pruning baseline,
averaged over three seeds (min and max shown).

    python -m moescope.compress.study                 # every bundled MoE model, markdown table on stdout
    python -m moescope.compress.study --models mixtral-tiny --out table.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Sequence

from ..arch.adapter import open_model
from .edit import compress
from .errors import CompressionError
from .evaluate import evaluate

METHODS = (("prune", "loss", "prune: reconstruction loss (moescope)"),
           ("merge", "similarity", "merge: neuron-matched similarity (moescope)"),
           ("merge", "output", "merge: block-output change (moescope)"),
           ("prune", "frequency", "prune: least frequent (baseline)"),
           ("prune", "random", "prune: random, 3 seeds (baseline)"))


def corpus_texts(split: str, tokens: int) -> list[str]:
    """Documents of the bundled corpus split, enough for about ``tokens`` tokens (4 characters a token)."""
    from ..data import documents

    texts, chars = [], 0
    for doc in documents(split):
        texts.append(doc.text)
        chars += len(doc.text)
        if chars >= 4 * tokens:
            break
    return texts


def training_context(path: str | Path) -> int | None:
    """The sequence length a bundled model was trained on (``zoo.json`` ``seq_len``), else None (the model's own
    context): tiny models never saw positions beyond it, so longer documents would be out of distribution."""
    info = Path(path) / "zoo.json"
    if not info.is_file():
        return None
    value = json.loads(info.read_text()).get("seq_len")
    return int(value) if value else None


def zoo_moe_models() -> list[str]:
    """The bundled models that have routed experts (dense ones are skipped)."""
    from .. import zoo

    names = []
    for name in zoo.list_models():
        if open_model(zoo.model_path(name)).family.is_moe:
            names.append(name)
    return names


def run_study(models: Sequence[str | Path] | None = None, *, fractions: Sequence[float] = (0.25, 0.5),
              seeds: Sequence[int] = (0, 1, 2), calibration_tokens: int = 4096, eval_tokens: int = 8192,
              work_dir: str | Path | None = None, device: str = "auto", progress: bool = False) -> list[dict]:
    """One row per (model, method, fraction): perplexity and loss on the held-out split."""
    from .. import zoo

    names = list(models) if models is not None else zoo_moe_models()
    calibration = corpus_texts("train", calibration_tokens)
    held_out = corpus_texts("validation", eval_tokens)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for name in names:
            path = Path(name) if Path(str(name)).is_dir() else zoo.model_path(str(name))
            model = open_model(path)
            E, k = model.num_experts, model.routing.top_k
            label = Path(str(name)).name
            context = training_context(path)
            base = evaluate(path, held_out, max_tokens=eval_tokens, context=context, device=device,
                            progress=progress)
            rows.append({"model": label, "method": "original", "experts": E, "fraction": 0.0,
                         "perplexity": base["perplexity"], "loss": base["loss"], "tokens": base["tokens"]})
            for fraction in fractions:
                count = int(round(fraction * E))
                if count < 1 or E - count < k:
                    rows.append({"model": label, "method": "skipped", "experts": E - count, "fraction": fraction,
                                 "note": f"{E - count} experts < top-k {k}"})
                    continue
                for mode, strategy, title in METHODS:
                    runs = []
                    for seed in (seeds if strategy == "random" else seeds[:1]):
                        out = Path(tmp) / f"{label}-{mode}-{strategy}-{fraction}-{seed}"
                        try:
                            compress(path, out, **{mode: count}, strategy=strategy, seed=seed,
                                     calibration_texts=calibration, max_tokens=calibration_tokens, device=device,
                                     context=context, candidates=0, progress=progress)
                        except CompressionError as err:
                            rows.append({"model": label, "method": title, "experts": E - count,
                                         "fraction": fraction, "note": str(err)})
                            break
                        runs.append(evaluate(out, held_out, max_tokens=eval_tokens, context=context,
                                             device=device, progress=progress))
                    if runs:
                        ppl = [r["perplexity"] for r in runs]
                        rows.append({"model": label, "method": title, "experts": E - count, "fraction": fraction,
                                     "perplexity": statistics.fmean(ppl), "perplexity_min": min(ppl),
                                     "perplexity_max": max(ppl), "runs": len(runs),
                                     "loss": statistics.fmean(r["loss"] for r in runs), "tokens": runs[0]["tokens"]})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of ``run_study`` rows."""
    lines = ["| model | experts kept | method | held-out perplexity |", "|---|---|---|---|"]
    for r in rows:
        if "perplexity" not in r:
            lines.append(f"| {r['model']} | {r['experts']} | {r['method']} | n/a ({r.get('note', '')}) |")
            continue
        ppl = f"{r['perplexity']:.2f}"
        if r.get("runs", 1) > 1:
            ppl += f" (min {r['perplexity_min']:.2f}, max {r['perplexity_max']:.2f})"
        share = "" if r["fraction"] == 0 else f" ({1 - r['fraction']:.0%})"
        lines.append(f"| {r['model']} | {r['experts']}{share} | {r['method']} | {ppl} |")
    tokens = next((r["tokens"] for r in rows if "tokens" in r), None)
    if tokens is not None:
        lines.append("")
        lines.append(f"Perplexity over {tokens} predicted tokens of the corpus's validation split (documents "
                     "split at the training sequence length).")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="zoo names or checkpoint directories (default: every bundled "
                                                    "MoE model)")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    rows = run_study(args.models, calibration_tokens=args.calibration_tokens, eval_tokens=args.eval_tokens,
                     device=args.device)
    if not rows:
        print("no bundled MoE model found (moescope.zoo.list_models() is empty)")
        return
    table = format_table(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
