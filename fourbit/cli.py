"""The `fourbit` command line. Each subcommand registers itself in `COMMANDS`."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.tensor, args.blocksize)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourbit", description="NF4 quantization and QLoRA fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a real weight matrix and compare with bitsandbytes")
    demo.add_argument("--tensor", default="blk.0.ffn_gate.weight", help="GGUF tensor name in SmolLM2-135M")
    demo.add_argument("--blocksize", type=int, default=64)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
