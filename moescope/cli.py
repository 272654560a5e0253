"""The ``moescope`` command line: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import json
import sys

from ._version import __version__
from .errors import MoescopeError, OptionsError

_MATCH_HELP = ("neuron matching of a pair: each (every matrix separately, as the study) | gate | up | down (once on "
               "that matrix) | concat (once on all matrices' unit neuron vectors); one matching serves all matrices")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from .arch import open_model
    from .inspect import describe, format_facts, format_memory, matching_plan, memory_plan

    model = open_model(args.path, args.family, download=args.download)
    facts = describe(model)
    plan = matching_plan(model, args.pairs, match=args.match)
    memory = memory_plan(model, None if args.memory_budget is None else _parse_bytes(args.memory_budget),
                         args.batch_size, args.max_tokens, args.device, args.dtype)
    if args.json:
        print(json.dumps({**facts.to_dict(), "neuron_matching": plan, "memory": memory}, indent=2))
        return
    print(format_facts(facts))
    if plan["assignments"]:
        match = "" if args.match == "each" else f" --match {args.match}"
        print(f"matching     --pairs {plan['pairs']}{match}: {plan['assignments']} neuron assignments "
              f"({'gate/up/down x ' if args.match == 'each' else ''}member pairs x MoE layers), "
              f"roughly {_duration(plan['estimated_seconds'])} here")
    print(format_memory(memory))


def _cmd_families(args: argparse.Namespace) -> None:
    from .arch import families

    rows = [{"family": f.name, "title": f.title, "architectures": list(f.architectures),
             "model_type": list(f.model_types), "models": list(f.models)} for f in families().values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    width = max(len(r["family"]) for r in rows)
    for r in rows:
        print(f"{r['family']:<{width}}  {r['title']:<28} {', '.join(r['architectures'])}")


def _cmd_tiny(args: argparse.Namespace) -> None:
    from .testing import build_checkpoint

    built = build_checkpoint(args.family, args.out, seed=args.seed, num_shards=args.shards, dtype=args.dtype)
    print(f"wrote a tiny {args.family} checkpoint to {built.path}")


def _cmd_weights(args: argparse.Namespace) -> None:
    from .static.run import WeightsOptions, weights

    layers = None if args.layers in (None, "all") else _parse_layers(args.layers)
    options = WeightsOptions(layers=layers, matrices=tuple(args.matrices.split(",")),
                             neuron_level=not args.no_neuron_level, pairs=args.pairs, match=args.match,
                             pca_components=args.pca_components, memory_budget=_parse_bytes(args.memory_budget))
    results = weights(args.path, dense=args.dense, out=args.out, options=options, resume=not args.no_resume,
                      workers=args.workers, ray=args.ray, download=args.download, evict=args.evict,
                      memory_check=not args.no_memory_check)
    r2 = results.summary.get("gate_r2_mean", {})
    print(f"wrote {len(results.layers)} layer(s) to {results.path}")
    for m, kinds in r2.items():
        print(f"  gate-embedding R² ({m}): matrix-level {_fmt(kinds['flat'])}, "
              f"neuron-averaged {_fmt(kinds['averaged'])}")


def _cmd_trace(args: argparse.Namespace) -> None:
    from .dynamic.run import TraceOptions, trace

    texts, source = _input_texts(args)
    options = TraceOptions(layers=None if args.layers in (None, "all") else _parse_layers(args.layers),
                           max_tokens=args.max_tokens, batch_size=args.batch_size, dtype=args.dtype,
                           device=args.device, stats=not args.no_stats, bootstrap=args.bootstrap)
    results = trace(args.path, texts, dense=args.dense, out=args.out, options=options, source=source,
                    resume=not args.no_resume, progress=not (args.quiet or args.json),
                    memory_check=not args.no_memory_check, workers=args.workers, ray=args.ray)
    summary = results.summary
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    if args.quiet:
        return
    per_layer = summary["per_layer"]
    print(f"traced {summary['tokens']} tokens in {summary['documents']} document(s); wrote {results.path}")
    print(f"  top-1 scored expert has the largest output norm: {_fmt(summary['top1_largest_norm_fraction'])} "
          "of tokens (mean over layers)")
    print("  layer  top1=largest-norm  mean expert-output similarity (angular)")
    for layer, top1, sim in zip(summary["layers_done"], per_layer["top1_largest_norm_fraction"],
                                per_layer["mean_routed_angular_similarity"]):
        print(f"  {layer:>5}  {_fmt(top1):>17}  {_fmt(sim)}")


def _cmd_report(args: argparse.Namespace) -> None:
    from .report.html import format_summary, read_summary, report

    path = report(args.runs, args.out, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(read_summary(path), indent=2))
    elif not args.quiet:
        print(format_summary(read_summary(path)))


def _cmd_compare(args: argparse.Namespace) -> None:
    from .report.compare import compare, format_compare, read_compare

    path = compare(args.run_a, args.run_b, args.out, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(read_compare(path), indent=2))
    elif not args.quiet:
        print(format_compare(read_compare(path)))


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import demo

    index, pages = demo(args.out, progress=not args.quiet)
    if args.quiet:
        return
    for page in pages:
        print(page.title)
        for line in page.findings:
            print(f"  - {line}")
    print(f"report: {index}")


def _input_texts(args: argparse.Namespace) -> tuple[list[str], str]:
    from .dynamic.inputs import select_input

    return select_input(args.prompt, args.builtin, args.text, args.wikitext, args.documents)


def _add_worker_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--workers", type=int, default=1, help=what)
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the --workers on Ray (a local cluster started for the run, or the cluster at ADDRESS)")


def _add_input_options(p: argparse.ArgumentParser, default: str) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="one text")
    source.add_argument("--builtin", choices=["short", "chat", "long"],
                        help=f"the study's short or chat-style prompt, or the bundled long text ({default})")
    source.add_argument("--text", help="a text file; each blank-line separated paragraph is a document")
    source.add_argument("--wikitext", help="a WikiText file: its first 10 non-empty, non-heading lines "
                                           "(the study's long input)")
    source.add_argument("--documents", help="a directory of .txt files or a .jsonl file with a 'text' field")


def _add_memory_check_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the estimated peak memory exceeds what is free (like "
                        "MOESCOPE_SKIP_MEMORY_CHECK=1)")


def _cmd_compress(args: argparse.Namespace) -> None:
    from .compress import compress, format_summary, parse_amount

    texts, _ = _input_texts(args)
    amount = {"prune": parse_amount(args.prune)} if args.prune else {"merge": parse_amount(args.merge)}
    record = compress(args.path, args.out, **amount, strategy=args.strategy, per_layer=not args.same_experts,
                      calibration_texts=texts, max_tokens=args.max_tokens, device=args.device,
                      overwrite=args.overwrite, dry_run=args.dry_run, progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    elif not args.quiet:
        print(format_summary(record))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from . import data
    from .compress import evaluate

    chosen = any(getattr(args, k) is not None for k in ("prompt", "builtin", "text", "wikitext", "documents"))
    texts = _input_texts(args)[0] if chosen else [d.text for d in data.documents("validation")]  # held out
    result = evaluate(args.path, texts, max_tokens=args.max_tokens, device=args.device,
                      progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(result, indent=2))
    elif not args.quiet:
        print(f"perplexity {result['perplexity']:.2f} (loss {result['loss']:.4f} nats) on {result['tokens']} tokens "
              f"in {result['documents']} document(s)")


def _cmd_zoo(args: argparse.Namespace) -> None:
    from . import zoo

    if args.action == "path":
        if not args.name:
            raise OptionsError("moescope zoo path NAME: give a model name (see moescope zoo list)")
        print(zoo.model_path(args.name))
        return
    for name in zoo.list_models():
        info = zoo.model_info(name)
        print(f"{name:<24} {info.get('family', ''):<10} {zoo.model_path(name)}")


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def _parse_layers(text: str) -> list[int]:
    layers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        layers.extend(range(int(lo), int(hi or lo) + 1))
    return layers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moescope", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"moescope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="family, layers, experts, routing, sizes and dtype of a checkpoint")
    p.add_argument("path", help="checkpoint directory or hub id (in the local Hugging Face cache, or see --download)")
    p.add_argument("--download", action="store_true",
                   help="PATH is a hub id: download config.json and the index, read shard headers remotely "
                        "(no shard is downloaded)")
    p.add_argument("--family", help="force a family instead of detecting it from config.json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--pairs", default="all", help="neuron-matching pairs to plan for: all | sample:N | top:K")
    p.add_argument("--match", default="each", help=_MATCH_HELP)
    p.add_argument("--memory-budget", help="weights' --memory-budget to estimate memory for (default: its default)")
    p.add_argument("--batch-size", type=int, help="trace's --batch-size to estimate memory for (default: its default)")
    p.add_argument("--max-tokens", type=int, help="trace's --max-tokens to estimate memory for (default: its default)")
    p.add_argument("--device", default="auto", help="trace's --device to estimate memory for")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="trace's --dtype to estimate memory for")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("families", help="list supported model families")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_families)

    p = sub.add_parser("weights", help="static analyses of expert weights (similarity, neuron matching, "
                                        "gate regression, PCA), layer by layer")
    p.add_argument("path", help="checkpoint directory or hub id (in the local Hugging Face cache, or see --download)")
    p.add_argument("--dense", help="a dense model whose FFN joins each layer as member 'F' (e.g. Mistral-7B)")
    p.add_argument("--layers", default="all", help="'all' (default) or a list like 0,3,8-11")
    p.add_argument("--matrices", default="gate,up,down", help="comma-separated subset of gate,up,down")
    p.add_argument("--no-neuron-level", action="store_true", help="skip neuron matching (the expensive part)")
    p.add_argument("--pairs", default="all", help="member pairs to match: all | sample:N | top:K")
    p.add_argument("--match", default="each", help=_MATCH_HELP)
    p.add_argument("--pca-components", type=int, default=3)
    p.add_argument("--memory-budget", default="2G", help="memory for one streamed chunk of a layer and for the "
                   "similarity matrices of pairs matched at once (e.g. 512M, 2G; more lets more pairs run in parallel)")
    p.add_argument("--out", default="moescope-runs/weights", help="results directory (resumed if it exists)")
    p.add_argument("--no-resume", action="store_true", help="recompute every layer even if saved")
    _add_worker_options(p, "analyse layers in N parallel processes")
    p.add_argument("--download", action="store_true",
                   help="PATH (and --dense) may be hub ids: download each shard into the Hugging Face cache when a "
                        "layer first reads it (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE apply)")
    p.add_argument("--evict", action="store_true",
                   help="with --download: delete each shard this run downloaded once no remaining layer needs it")
    _add_memory_check_option(p)
    p.set_defaults(func=_cmd_weights)

    p = sub.add_parser("trace", help="dynamic analyses from one forward pass: expert outputs, norms vs router "
                                      "scores, intermediate states, chosen experts")
    p.add_argument("path", help="checkpoint directory or hub id in the local Hugging Face cache")
    _add_input_options(p, "the default")
    p.add_argument("--dense", help="a dense model with the same tokenizer whose FFN output joins as member 'F'")
    p.add_argument("--layers", default="all", help="'all' (default) or a list like 0,3,8-11")
    p.add_argument("--max-tokens", type=int, default=2048, help="cap on tokens over all documents")
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | map (spread with accelerate)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--no-stats", action="store_true", help="skip the routing statistics (load, entropy, ...)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples over documents for confidence intervals (0: none)")
    p.add_argument("--out", default="moescope-runs/trace", help="results directory (resumed if it exists)")
    p.add_argument("--no-resume", action="store_true", help="recompute every layer even if saved")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_memory_check_option(p)
    _add_worker_options(p, "trace the documents in N shards by parallel processes (results merged exactly)")
    p.set_defaults(func=_cmd_trace)

    p = sub.add_parser("report", help="self-contained HTML report (figures, headline numbers) from saved runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a weights run and/or a trace run of one model")
    p.add_argument("--out", help="output directory or .html path (default: RUN_DIR/report/index.html)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary")
    p.add_argument("--json", action="store_true", help="print the headline numbers as JSON")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("compare", help="compare two runs: routing agreement token by token (e.g. base vs "
                                        "instruct), load shift, similarity differences")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--out", help="output directory (default: RUN_A/compare)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="print the comparison numbers as JSON")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("demo", help="the analyses and the report on moescope's bundled trained models")
    p.add_argument("--out", default="moescope-demo", help="output directory (default: ./moescope-demo)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("compress", help="prune or merge experts, scored on calibration text; writes a checkpoint "
                                         "in the same family layout + compression.json")
    p.add_argument("path")
    p.add_argument("out", nargs="?", help="output checkpoint directory (optional with --dry-run)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--prune", help="experts to remove per MoE layer: N or P%%")
    amount.add_argument("--merge", help="experts to merge away per MoE layer: N or P%%")
    p.add_argument("--strategy", help="prune: loss (default) | frequency | weighted_norm | random; "
                                      "merge: similarity (default) | output | random")
    p.add_argument("--same-experts", action="store_true", help="remove/merge the same experts in every layer")
    _add_input_options(p, "the default calibration text")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="score and plan, write nothing")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser("evaluate", help="perplexity on text (e.g. before and after compress)")
    p.add_argument("path")
    _add_input_options(p, "default: the bundled corpus's validation split")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("zoo", help="the tiny trained models shipped with moescope: list them, or print one's path")
    p.add_argument("action", choices=["list", "path"])
    p.add_argument("name", nargs="?", help="model name (for 'path')")
    p.set_defaults(func=_cmd_zoo)

    p = sub.add_parser("tiny", help="write a tiny structured checkpoint of a family in its real on-disk layout")
    p.add_argument("family")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="storage dtype (default: the family's real one)")
    p.set_defaults(func=_cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MoescopeError as exc:
        print(f"moescope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moescope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends: stop quietly
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
