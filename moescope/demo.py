"""``moescope demo``: the study's analyses on the bundled trained models, with the report, in about a minute.

For each demo model: the static analyses (with the dense model as ``F`` where there is one), a trace of the
bundled long text, and its report; then Mixtral base vs instruct on the study's chat-style prompt through
``compare``. Everything lands in one directory whose ``index.html`` links the pages and lists the findings.
"""
from __future__ import annotations

import html
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import zoo
from .dynamic.inputs import select_input
from .dynamic.run import TraceOptions, trace
from .report.compare import compare, read_compare
from .report.html import read_summary, report
from .static.run import WeightsOptions, weights
from .writer import atomic_write_bytes


@dataclass(frozen=True)
class DemoModel:
    """A bundled model the demo analyses, and the dense model that joins it as ``F``."""

    name: str
    dense: str | None = None


DEMO_MODELS = (DemoModel("mixtral-tiny", dense="mistral-tiny"), DemoModel("deepseek-tiny"), DemoModel("grok1-tiny"))
BASE_VS_INSTRUCT = ("mixtral-tiny", "mixtral-tiny-instruct")
DEMO_PAIRS = "top:12"   # neuron matching for the 12 most similar member pairs per matrix (all pairs: --pairs all)


@dataclass
class DemoPage:
    """One page of the demo: its title, HTML path and one-line findings."""

    title: str
    path: Path
    findings: list[str]


def _model_page(model: DemoModel, out: Path, texts: list[str], source: str, progress: bool) -> DemoPage:
    path = zoo.model_path(model.name)
    dense = zoo.model_path(model.dense) if model.dense else None
    runs = out / "runs" / model.name
    w = weights(path, dense=dense, out=runs / "weights", options=WeightsOptions(pairs=DEMO_PAIRS), progress=progress)
    t = trace(path, texts, dense=dense, out=runs / "trace", options=TraceOptions(bootstrap=200), source=source,
              progress=progress)
    page = report([w.path, t.path], out / model.name / "index.html", detail_layers=t.layers[-1:], quick=True)
    return DemoPage(f"{model.name} (+ {model.dense} as F)" if model.dense else model.name, page,
                    _findings(read_summary(page)))


def _findings(summary: dict) -> list[str]:
    """The headline numbers of a report's ``summary.json``, as short sentences."""
    lines = []
    static, traced = summary.get("static") or {}, summary.get("trace") or {}
    r2 = ((static.get("gate_r2_mean") or {}).get("gate") or {}).get("flat")
    if r2 is not None:
        lines.append(f"gate-embedding vs expert similarity (W_gate, matrix-level): mean R² {r2:.2f}")
    top1, chance = traced.get("top1_largest_norm_fraction"), traced.get("chance_fraction")
    if top1 is not None:
        lines.append(f"the top-1 scored expert has the largest output norm for {top1:.0%} of tokens"
                     + (f" (chance {chance:.0%})" if chance else ""))
    slope = (traced.get("depth_trend") or {}).get("slope")
    if slope is not None:
        trend = "falls" if slope < 0 else "rises"
        lines.append(f"expert-output similarity {trend} with depth ({slope:+.3f} per layer)")
    return lines


def _compare_page(out: Path, progress: bool) -> DemoPage:
    texts, source = select_input(builtin="chat")
    base, instruct = (trace(zoo.model_path(name), texts, out=out / "runs" / name / "chat", source=source,
                            options=TraceOptions(bootstrap=200), progress=progress) for name in BASE_VS_INSTRUCT)
    page = compare(base.path, instruct.path, out / "compare", names=BASE_VS_INSTRUCT)
    numbers = read_compare(page)
    mean = numbers.get("mean") or {}
    agreement, chance = mean.get("top1_agreement"), mean.get("top1_agreement_chance")
    findings = [f"base and instruct pick the same top-1 expert for {agreement:.0%} of the chat prompt's tokens "
                f"(chance {chance:.0%})"] if agreement is not None and chance is not None else []
    return DemoPage("Mixtral base vs instruct on the study's chat prompt", page, findings)


def _task(job: tuple) -> DemoPage:
    """One page of the demo, in a worker process (threads split between the workers)."""
    kind, model, out, progress, threads = job
    torch.set_num_threads(threads)
    if kind == "compare":
        return _compare_page(out, progress)
    texts, source = select_input()
    return _model_page(model, out, texts, source, progress)


def demo(out: str | Path = "moescope-demo", progress: bool = True, models: tuple[DemoModel, ...] = DEMO_MODELS,
         workers: int | None = None) -> tuple[Path, list[DemoPage]]:
    """Run the demo into ``out`` (pages in parallel processes, one per core by default); return the index page
    and the pages it links."""
    out = Path(out)
    start = time.perf_counter()
    workers = workers or min(os.cpu_count() or 1, len(models) + 1)
    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs = [("model", m, out, progress and workers == 1, threads) for m in models] + \
        [("compare", None, out, progress and workers == 1, threads)]
    if workers == 1:
        pages = [_task(job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pages = list(tqdm(pool.imap(_task, jobs), total=len(jobs), desc="demo", unit="page",
                              disable=not progress))
    index = out / "index.html"
    atomic_write_bytes(index, _index_html(pages, time.perf_counter() - start).encode())
    return index, pages


def _index_html(pages: list[DemoPage], seconds: float) -> str:
    items = "".join(
        f'<li><a href="{html.escape(p.path.parent.name)}/{html.escape(p.path.name)}">{html.escape(p.title)}</a>'
        f'<ul>{"".join(f"<li>{html.escape(f)}</li>" for f in p.findings)}</ul></li>' for p in pages)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>moescope demo</title>"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            "<style>body{font-family:system-ui,sans-serif;max-width:56rem;margin:2rem auto;line-height:1.5}"
            "</style></head><body><h1>moescope demo</h1><p>The analyses of “A Closer Look into Mixture-of-Experts "
            "in Large Language Models” (arXiv 2406.18219) on moescope's bundled tiny trained models "
            f"({seconds:.0f} s).</p><ul>{items}</ul></body></html>")
