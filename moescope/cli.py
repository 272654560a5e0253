"""The ``moescope`` command line: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import MoescopeError


def _cmd_inspect(args: argparse.Namespace) -> None:
    from .arch import open_model
    from .inspect import describe, format_facts

    facts = describe(open_model(args.path, args.family))
    print(json.dumps(facts.to_dict(), indent=2) if args.json else format_facts(facts))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moescope", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"moescope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="family, layers, experts, routing, sizes and dtype of a checkpoint")
    p.add_argument("path", help="checkpoint directory or hub id in the local Hugging Face cache")
    p.add_argument("--family", help="force a family instead of detecting it from config.json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("families", help="list supported model families")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_families)

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
