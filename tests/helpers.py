"""Helpers shared by the test modules (which import this module, never each other).

    rel_err, max_rel_err             relative errors in float64
    tiny_llama, tiny_llama_dir       a 2-layer, 64-wide random Llama (in memory, or saved with the
                                     SmolLM2 tokenizer for the training loop and the CLI)
    one_thread_quiet_bnb             fixture: one intra-op thread, bitsandbytes' CPU paging warning off
    bnb_twin, peft_twin              bitsandbytes Linear4bit (+ PEFT LoRA) holding our exact bytes
    cpu_stored_absmax, ...           models of bitsandbytes' CPU-build quirks
    qlora_model, train_steps, ...    the small QLoRA run of tests/test_distributed.py and its torchrun
                                     worker (tests/dist_worker.py)
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fourbit.lora import Linear4bit, LoRALinear, add_lora, lora_layers, quantize_model
from fourbit.nf4.blockwise import code_midpoints
from fourbit.nf4.codes import FP4_THRESHOLDS, NF4_THRESHOLDS
from fourbit.train import checkpoint, distributed

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- numbers ------------------------------------------------------------------------------------
def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ (Frobenius), in float64."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def assert_within_rounding(y, want, terms, dtype, tol: float) -> None:
    """Per element: W rounded to the activations' dtype (bf16 2^-9, fp16 2^-12 relative, 2x slack)
    bounds the sum's error by that fraction of `terms` = sum |a * w| (a dot product that cancels may
    lose more than its own size), plus the output's rounding (the interpreter truncates bf16: 2^-7).
    Over 32 or more outputs the relative norm error must also be under `tol` (F.linear's tolerance)."""
    bound = (2.0**-8 if dtype == torch.bfloat16 else 2.0**-11) * terms
    bound += (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10) * want.abs() + 1e-6
    assert bool(((y.double() - want).abs() <= bound).all()), ((y.double() - want).abs() / bound).max()
    if want.numel() >= 32:
        assert rel_err(y, want) < tol


def max_rel_err(a, b) -> float:
    """max_i |a_i − b_i| / |b_i| over two sequences (loss curves), in float64."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(((a - b).abs() / b.abs()).max())


# ---- backends -----------------------------------------------------------------------------------
# Parity tests run on the reference and on the C kernels (fourbit.cpu). Both give bitsandbytes' bytes,
# except what fourbit.cpu's fused GEMV computes (a matmul with at most fourbit.cpu.GEMV_MAX_M rows of
# x): float32 sums in another order, so there F.linear's float32 tolerance instead of equality.
BOTH_BACKENDS = pytest.mark.parametrize("backend", ["reference", "cpu"])


def use_backend(monkeypatch, backend: str) -> None:
    """FOURBIT_BACKEND=backend for this test (a `cpu` run is skipped where the kernels do not load)."""
    from fourbit import dispatch

    if backend == "cpu" and not dispatch.cpu_kernels_available():
        pytest.skip("the CPU kernels did not load")
    monkeypatch.setenv("FOURBIT_BACKEND", backend)


def assert_gemv_parity(ours: torch.Tensor, theirs: torch.Tensor, backend: str, what: str = "") -> None:
    """Equal under the reference; under the CPU kernels' fused GEMV within 1e-6 relative (float32)."""
    if backend == "reference":
        assert torch.equal(ours, theirs), what
    else:
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
        assert rel_err(ours, theirs) < 1e-6, (what, rel_err(ours, theirs))


# ---- tiny Llama ---------------------------------------------------------------------------------
def tiny_llama(seed: int = 0, *, hidden: int = 64, inter: int = 128, layers: int = 2, **config):
    """A random LlamaForCausalLM (float32, train mode), the same for the same arguments. `config`
    overrides LlamaConfig fields (default vocab 96, 4 heads, 2 KV heads, 64 positions)."""
    import transformers

    fields = {**dict(vocab_size=96, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), **config}
    llama = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, **fields)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama).float().train()


def tiny_llama_dir(root) -> str:
    """root/tiny: tiny_llama with the SmolLM2 tokenizer's vocabulary and special tokens (tied
    embeddings, 256 positions), saved with that tokenizer; reused when it is already there."""
    from transformers import AutoTokenizer

    from fourbit.train.models import smollm2_dir

    path = os.path.join(os.fspath(root), "tiny")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- bitsandbytes -------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread_quiet_bnb():
    """One intra-op thread: optimizer tensors are small, and on a loaded 2-core machine every 2-thread
    op waited ~15 ms for the busy core (sqrt of 8256 floats: 15.5 ms vs 0.005 ms). Results do not
    depend on it: every op is elementwise. Also silences bitsandbytes' CPU paging warning. Autouse
    in the modules that import it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        yield
    torch.set_num_threads(threads)


def bnb_twin(skeleton: nn.Module, ours: nn.Module) -> nn.Module:
    """A copy of `skeleton` (a dense model, or a quantized copy with or without adapters) whose
    linears are bitsandbytes Linear4bit holding our exact bytes; where ours wraps a Linear4bit in a
    LoRALinear, the twin's Linear4bit takes the LoRALinear's place."""
    import bitsandbytes as bnb

    twin = copy.deepcopy(skeleton)
    for name, base in ours.named_modules():
        if not isinstance(base, Linear4bit):
            continue
        owner = name.rpartition(".")[0]
        if name.endswith(".base") and isinstance(ours.get_submodule(owner), LoRALinear):
            name = owner
        layer = bnb.nn.Linear4bit(
            base.in_features, base.out_features, bias=base.bias is not None, quant_type="nf4",
            compute_dtype=torch.float32, device="meta",
        )
        stats = base.quant_state.to_dict()
        layer.weight = bnb.nn.Params4bit.from_prequantized(base.weight.detach().clone(), stats, device="cpu", module=layer)
        if base.bias is not None:
            layer.bias = nn.Parameter(base.bias.detach().clone())
        layer.support_avx512bf16_for_cpu = False  # train mode or not: no in-place repack of the bytes
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, layer)
    return twin.train()


def peft_twin(skeleton: nn.Module, ours: nn.Module, r: int, alpha: int, targets=TARGETS):
    """bnb_twin + PEFT LoRA (dropout 0) with our adapter values copied in."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
    model = peft.get_peft_model(bnb_twin(skeleton, ours), config)
    inner = model.base_model.model
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            theirs = inner.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return model.train()


# ---- bitsandbytes' CPU-build quirks (SPEC §2, §3) ---------------------------------------------
# Models used to *prove* that a byte where fourbit and bitsandbytes' CPU backend disagree is one of
# the documented quirks and nothing else. fourbit follows bitsandbytes' CUDA rules; the CPU build
# differs in four places:
#   1. 4-bit, partial last block: true division x / absmax instead of x * (1 / absmax).
#   2. FP4: exact midpoints (sorted table) instead of CUDA's hand-typed thresholds, and the opposite
#      sign convention for |s| <= 0.0026.
#   3. 8-bit blockwise: a 65536-bin lookup table instead of an exact nearest-code search.
#   4. A partial last block whose values are all zero stores absmax 1e-38 (the clamped divisor)
#      instead of 0; full zero blocks store 0. This shifts the double-quant mean for such tensors.
# FP4 magnitudes in value order, and the exact float32 midpoints the CPU build compares against.
_FP4_MAGS = torch.tensor([0, 0.0625, 2, 3, 4, 6, 8, 12], dtype=torch.float32) / 12.0
FP4_EXACT_MIDPOINTS = (_FP4_MAGS[:-1] + _FP4_MAGS[1:]) / 2


def cpu_stored_absmax(absmax: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """The float32 scales bitsandbytes' CPU build stores, given the true per-block maxima (quirk 4)."""
    out = absmax.clone()
    if n % blocksize and out.numel() and out[-1] == 0:
        out[-1] = 1e-38
    return out


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 codes (n,) from packed bytes (high nibble first)."""
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]


def scaled_both_ways(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_mul, s_div, in_tail): x scaled by the reciprocal (CUDA, fourbit) and by true division
    (bitsandbytes CPU, partial last block), and a mask of elements in a partial last block."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    idx = torch.arange(n)
    nb = -(-n // blocksize)
    absmax = torch.zeros(nb).scatter_reduce(0, idx // blocksize, flat.abs(), "amax")
    am = absmax.clamp(min=1e-38)[idx // blocksize]
    s_mul = (flat * (1.0 / am)).clamp(-1, 1)
    s_div = (flat / am).clamp(-1, 1)
    in_tail = (n % blocksize != 0) & (idx >= (n // blocksize) * blocksize)
    return s_mul, s_div, in_tail


def nf4_cpu_code(s: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(s, NF4_THRESHOLDS, right=False)


def explain_4bit_differences(x, ours, theirs, blocksize, quant_type) -> dict[str, int]:
    """Every element whose code differs must be explained by a CPU quirk; returns counts per quirk.
    Raises AssertionError naming the first unexplained element."""
    n = x.numel()
    a, b = unpack(ours, n), unpack(theirs, n)
    diff = torch.nonzero(a != b).reshape(-1)
    counts = {"tail_division": 0, "fp4_thresholds": 0, "fp4_tiny_sign": 0}
    if diff.numel() == 0:
        return counts
    s_mul, s_div, in_tail = scaled_both_ways(x, blocksize)
    for i in diff.tolist():
        sm, sd = s_mul[i].item(), s_div[i].item()
        if in_tail[i] and sm != sd:
            counts["tail_division"] += 1
            continue
        if quant_type == "fp4":
            mag = abs(sm)
            if mag <= 0.0026042:
                counts["fp4_tiny_sign"] += 1
                continue
            lo = torch.minimum(FP4_THRESHOLDS, FP4_EXACT_MIDPOINTS)
            hi = torch.maximum(FP4_THRESHOLDS, FP4_EXACT_MIDPOINTS)
            if bool(((lo <= mag) & (mag <= hi)).any()):
                counts["fp4_thresholds"] += 1
                continue
        raise AssertionError(
            f"element {i}: fourbit code {int(a[i])}, bitsandbytes code {int(b[i])}, scaled value {sm!r} "
            f"(division {sd!r}) — not explained by any documented CPU quirk"
        )
    return counts


def cpu_lut_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU 8-bit blockwise quantizer (quirk 3, SPEC §3), modelled bit for bit from the
    text: v = clamp(fl32(x * fl32(1/absmax)), -1, 1); bin = trunc(fl32(fma(fl32(v+1)*0.5, 65535, 0.5)));
    code index = lut[bin] = number of float32 midpoints strictly below fl32(fl32(2*bin)/65535) - 1.
    Returns (codes (n,) uint8, absmax (nb,) float32); an all-zero block gets codes 0."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)  # (nb, bs)
    absmax = padded.abs().amax(dim=1)  # (nb,)
    v = (padded * (1.0 / absmax).unsqueeze(1)).clamp(-1, 1)  # NaN in zero blocks, masked below
    half = (v + 1) * 0.5  # the * 0.5 is exact
    bins = torch.trunc((half.double() * 65535 + 0.5).float()).long()  # fma: exact product in float64
    grid = (torch.arange(65536, dtype=torch.float32) * 2) / 65535 - 1
    lut = torch.bucketize(grid, code_midpoints(code), right=False)
    q = torch.where((absmax == 0).unsqueeze(1), 0, lut[bins.clamp(0, 65535)]).to(torch.uint8)
    return q.view(-1)[:n], absmax


def explain_8bit_differences(x, ours, theirs, code, blocksize=256) -> int:
    """bitsandbytes CPU codes must equal the LUT model everywhere; where fourbit differs, the LUT
    model must differ from fourbit's exact nearest choice there. Returns the number of such codes."""
    lut, _ = cpu_lut_quantize(x, code, blocksize)
    mismatch_model = torch.nonzero(lut != theirs.reshape(-1)).reshape(-1)
    assert mismatch_model.numel() == 0, f"bitsandbytes CPU 8-bit codes differ from the LUT model at {mismatch_model[:5].tolist()}"
    return int((ours.reshape(-1) != theirs.reshape(-1)).sum())


# ---- the small distributed QLoRA run (tests/test_distributed.py, tests/dist_worker.py) ----------
STEPS, CHECKPOINT_AT = 10, 5
LR = {"tiny": 2e-2, "smollm2": 2e-4}  # the tiny model learns the sequences within 10 steps; SmolLM2 at a QLoRA lr
GLOBAL_BATCH, SEQ = 4, 16


def qlora_model(name: str = "tiny", r: int = 8) -> nn.Module:
    """A QLoRA model (NF4 + double quant base, LoRA r on q/k/v/o/gate/up/down), same on every call."""
    if name == "tiny":
        dense = tiny_llama(0, vocab_size=128, initializer_range=0.2)
    elif name == "smollm2":
        import transformers

        from fourbit.train.models import smollm2_gguf_path

        folder, file = os.path.split(smollm2_gguf_path())
        dense = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    else:
        raise ValueError(f"model must be 'tiny' or 'smollm2', got {name!r}")
    torch.manual_seed(1)
    return add_lora(quantize_model(dense.train()), r=r, alpha=16)


def make_optimizer(model: nn.Module, lr: float, kind: str = "torch") -> torch.optim.Optimizer:
    """torch.optim.AdamW (works on FSDP's sharded DTensor parameters) or fourbit's own AdamW
    (32-bit states; plain tensors only, so DDP or a single process)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "fourbit":
        from fourbit.train.optim import AdamW

        return AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def global_batch(step: int, vocab: int) -> dict[str, torch.Tensor]:
    """Rows counting up from a random start by a random stride in {1, 2, 3} (learnable, so the loss
    falls within 10 steps); row i's first k_i labels (k_i in [0, SEQ/2]) are masked as prompt, so
    ranks hold different numbers of label tokens."""
    g = torch.Generator().manual_seed(1000 + step % 2)
    start = torch.randint(0, vocab, (GLOBAL_BATCH, 1), generator=g)  # (B, 1)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)  # (B, 1)
    ids = (start + stride * torch.arange(SEQ)) % vocab  # (B, T)
    prompt = torch.randint(0, SEQ // 2 + 1, (GLOBAL_BATCH, 1), generator=g)  # (B, 1)
    labels = torch.where(torch.arange(SEQ) < prompt, -100, ids)  # (B, T)
    return {"input_ids": ids, "labels": labels}


def train_steps(
    model, optimizer, vocab: int, start: int, stop: int, checkpoint_dir: str | None = None, micro_batches: int = 1
) -> list[float]:
    """Steps start..stop-1 on this rank's shard of each global batch, in `micro_batches`
    accumulated pieces, with the gradient norm clipped to 1; returns the global loss per step and
    writes a checkpoint after step CHECKPOINT_AT when given a directory."""
    losses = []
    for step in range(start, stop):
        batch = distributed.shard(global_batch(step, vocab))
        labels = batch["labels"][:, 1:]  # (b, T-1): token t+1 is predicted at position t
        n_tokens = int((labels != -100).sum())  # this rank's label tokens in the whole step
        loss = 0.0
        for ids, lab in zip(batch["input_ids"].chunk(micro_batches), labels.chunk(micro_batches)):
            logits = model(input_ids=ids).logits  # (b/m, T, V)
            token_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab.flatten(), ignore_index=-100, reduction="sum")
            part = distributed.global_mean_loss(token_sum, n_tokens)
            part.backward()
            loss += float(distributed.reduce(part.detach()))
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if checkpoint_dir is not None and step + 1 == CHECKPOINT_AT:
            checkpoint.save(checkpoint_dir, model, optimizer, step=step + 1)
    return losses


# ---- runs and the CLI ---------------------------------------------------------------------------
FINISHED_ARGS = ["--steps", "2", "--batch-size", "2", "--eval-examples", "4", "--targets", "q_proj", "v_proj", "--quiet"]


def finished_run(tiny: str, root) -> str:
    """root/finished: a completed 2-step fine-tune of the tiny Llama (FINISHED_ARGS); reused when there."""
    from fourbit.cli import main

    run = os.path.join(os.fspath(root), "finished")
    if not os.path.isfile(os.path.join(run, "summary.json")):
        assert main(["finetune", "--model", tiny, "--output-dir", run, *FINISHED_ARGS]) == 0
    return run


def tree_hashes(root) -> dict[str, str]:
    """{relative path: sha256} of every file below root (what "byte for byte unchanged" compares)."""
    import hashlib

    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of `fourbit argv` in this process. A failure must be the CLI's one line
    `fourbit <command>: error: <what> — <fix>` and no traceback."""
    from fourbit.cli import main

    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exit_info:  # argparse's errors exit from inside parsing
        rc = exit_info.code
    err = capsys.readouterr().err
    if rc != 0:
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and lines[0].startswith(f"fourbit {argv[0]}: error: ") and " — " in lines[0], err
        assert "Traceback" not in err, err
    return rc, err
