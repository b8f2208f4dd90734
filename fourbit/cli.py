"""The `fourbit` command line.

    fourbit finetune [--model M] [--data D] [--steps N] ...   QLoRA fine-tune (defaults: the main job)
    fourbit generate --adapter DIR "prompt"                   greedy completion with a trained adapter
    fourbit quantize IN OUT                                   transformers checkpoint -> 4-bit directory
    fourbit report [args]                                     the Triton kernel compile report
    fourbit demo                                              quantize one real weight, compare with bnb

`finetune` has one flag per TrainConfig field (`--batch-size` sets `batch_size`), generated from
the dataclass so the two cannot drift apart.

There is no `fourbit bench`: the library never imports `benchmarks/` (which is not part of the
installed package); run a benchmark from a clone as `python -m benchmarks.bench_<op>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.tensor, args.blocksize)
    return 0


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from .train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        if field.name == "targets":
            parser.add_argument(flag, nargs="+", default=None, help=f"modules to adapt (default: {' '.join(field.default)})")
            continue
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)  # Optional[X] -> X
        parser.add_argument(flag, type=base, default=None, help=f"default: {field.default}")


def _finetune(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig
    from .train.loop import Trainer

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "targets" in given:
        given["targets"] = tuple(given["targets"])
    config = TrainConfig(**given)
    trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print(trainer.param_summary)
    summary = trainer.train()
    if summary["interrupted"]:
        return 130
    print(f"exact match on the eval set: before {summary['exact_match_before']:.3f}  after {summary['exact_match_after']:.3f}"
          if summary["exact_match_before"] is not None else "no eval split (fewer than 10 records)")
    print(f"loss: first step {summary['first_loss']:.4f}  last step {summary['last_loss']:.4f}")
    print(f"run directory: {config.output_dir} (adapter/, metrics.jsonl, loss.png, checkpoint/, summary.json)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .lora import load_adapter
    from .train.models import EMBEDDED, load_quantized
    from .train.task import generate

    with open(os.path.join(args.adapter, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path")
    model_spec = args.model or base
    if not model_spec or not os.path.exists(model_spec):
        if model_spec and os.path.basename(model_spec).startswith("smollm2-135m-instruct"):
            model_spec = EMBEDDED  # the embedded model's cache directory on another machine
        else:
            raise SystemExit(f"the adapter's base model {model_spec!r} does not exist here; pass --model")
    model, tokenizer, _ = load_quantized(model_spec)
    load_adapter(model, args.adapter)
    print(generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .train.models import export_4bit

    path = export_4bit(args.input, args.output, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .kernels.report import main as report_main

    return report_main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourbit", description="NF4 quantization and QLoRA fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="quantize a real weight matrix and compare with bitsandbytes")
    demo.add_argument("--tensor", default="blk.0.ffn_gate.weight", help="GGUF tensor name in SmolLM2-135M")
    demo.add_argument("--blocksize", type=int, default=64)
    demo.set_defaults(func=_demo)

    ft = sub.add_parser(
        "finetune", help="QLoRA fine-tune (defaults: embedded SmolLM2-135M-Instruct on the embedded date task)",
        description="QLoRA fine-tuning. --model: 'smollm2', a transformers directory or a .gguf file; "
        "--data: 'dates' or a JSONL file of {prompt, response} or {messages} records.",
    )
    _add_config_flags(ft)
    ft.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    ft.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    ft.set_defaults(func=_finetune)

    gen = sub.add_parser("generate", help="greedy completion of a prompt with a trained adapter")
    gen.add_argument("--adapter", required=True, help="adapter directory (e.g. runs/finetune/adapter)")
    gen.add_argument("--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("prompt")
    gen.set_defaults(func=_generate)

    q = sub.add_parser("quantize", help="a transformers checkpoint -> 4-bit NF4 directory transformers + bitsandbytes load")
    q.add_argument("input", help="transformers model directory, .gguf file, or 'smollm2'")
    q.add_argument("output", help="output directory (model.safetensors + config.json + tokenizer)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.set_defaults(func=_quantize)

    r = sub.add_parser("report", help="compile every Triton kernel for sm_80/89/90a and report registers, spills, SASS")
    r.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for fourbit.kernels.report (e.g. --json FILE)")
    r.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # report passes its arguments through; argparse's REMAINDER misses a leading "--flag"
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "report":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.rest = args.rest + extra
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fourbit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
