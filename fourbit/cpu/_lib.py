"""Build, cache and load the C kernels in fourbit/cpu/csrc as one shared library called through ctypes.

No torch headers: a plain C library compiles in a few seconds (a torch C++ extension took 43-53 s
here) and a ctypes call on `tensor.data_ptr()` costs microseconds. The library is built once per
machine: it is cached under $FOURBIT_CACHE, else $XDG_CACHE_HOME/fourbit, else ~/.cache/fourbit, in
cpu-kernels/<key>/, the key hashing the sources, the flags, the compiler's identity and the machine
type. It is compiled to a temporary name and renamed into place, so a second process never loads a
half-written file; a process that cannot write the cache builds into a private temporary folder.

Compiler: $CC, else `cc`. The AVX2 and AVX-512 code paths are compiled into the same library with
per-function target attributes (the rest for the baseline x86-64, or any other machine); the library
asks CPUID which it may run (`fourbit_cpu_best_isa`), so an older CPU never meets an instruction it
lacks. FOURBIT_CPU_ISA=scalar|avx2|avx512 caps the choice (tests run the portable path this way).
A wider path is used only after it reproduced the portable path's bytes on a small known input
(`_self_check`): the AVX-512 code cannot run on this project's machines, so it is checked wherever
it first runs.

`library()` returns the loaded library or raises `Unavailable` with a one-line reason (no compiler,
a failed build, a failed load); `fourbit.dispatch` turns that into a one-line notice and the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..errors import Unavailable

__all__ = ["library", "loaded", "threads", "team", "dtype_code", "isa_name", "set_isa", "build_seconds", "built_here", "ISAS"]

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("runtime.c", "quant4.c", "blockwise8.c", "adamw.c", "gemv4.c")
HEADERS = ("common.h", "nearest.h")
FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-pthread")
OPENMP = "-fopenmp"  # tried first: the kernels then share torch's OpenMP team (runtime.c)
ISAS = ("scalar", "avx2", "avx512")
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "fourbit_cpu_best_isa": ([], _I),
    "fourbit_cpu_set_isa": ([_I], _I),
    "fourbit_cpu_openmp": ([], _I),
    "fourbit_dequantize_4bit": ([_P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _F, _I64, _P, _I, _I], _I),
    "fourbit_quantize_4bit": ([_P, _I, _I64, _I64, _I, _P, _P, _P, _P, _I], _I),
    "fourbit_quantize_blockwise": ([_P, _I, _I64, _I64, _P, _P, _P, _I], _I),
    "fourbit_dequantize_blockwise": ([_P, _I64, _I64, _P, _P, _P, _I, _I], _I),
    "fourbit_adamw_32bit": ([_P, _I, _P, _I, _P, _P, _I64, _F, _F, _F, _F, _F, _F, _I, _F, _I], _I),
    "fourbit_adamw_8bit": ([_P, _I, _P, _I, _P, _P, _P, _P, _P, _P, _I64, _F, _F, _F, _F, _F, _F, _F, _I, _F, _I], _I),
    "fourbit_gemv_4bit": ([_P, _I, _I64, _I64, _P, _I64, _I64, _P, _P, _P, _P, _P, _F, _I64, _P, _P, _I, _I], _I),
}

_LOCK = threading.Lock()
_STATE: dict = {}


def dtype_code(dtype: torch.dtype) -> int:
    """The C side's element-type number (common.h)."""
    return _DTYPES[dtype]


def threads() -> int:
    """Threads for one kernel call: torch's intra-op setting, so a process told to use 1 thread (DDP's
    workers under torchrun, DataLoader workers) starts no team of its own."""
    return max(1, torch.get_num_threads())


def _cache_root() -> Path:
    if os.environ.get("FOURBIT_CACHE"):
        return Path(os.environ["FOURBIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fourbit"


def _compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    path = shutil.which(cc.split()[0]) if cc.strip() else None
    if path is None:
        raise Unavailable(f"no C compiler ({cc!r} is not on PATH)", "install gcc or set CC")
    return cc


def _identity(cc: str) -> str:
    try:
        done = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"the C compiler {cc!r} does not run ({err})", "install gcc or set CC") from None
    if done.returncode != 0:
        raise Unavailable(f"the C compiler {cc!r} does not run (`{cc} --version` exited {done.returncode})",
                          "install gcc or set CC")
    return done.stdout.strip()


def _key(cc: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    h.update("\0".join((*flags, cc, _identity(cc), platform.machine(), platform.system())).encode())
    return h.hexdigest()[:20]


def _run(cmds: list[list[str]]) -> None:
    """Run the commands side by side (one per core); raise Unavailable with the first error line."""
    procs = []
    try:
        for cmd in cmds:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            if proc.returncode != 0:
                first = next((line for line in err.splitlines() if "error" in line), err.strip()[:200])
                raise Unavailable(f"compiling the CPU kernels failed: {first or f'{proc.args[0]} exited {proc.returncode}'}",
                                  "install gcc (or set CC to a working C compiler)")
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"compiling the CPU kernels failed ({err})", "install gcc or set CC") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def _build(cc: str, folder: Path, flags: tuple[str, ...]) -> Path:
    """Compile each source to an object (in parallel: 3.3 s of compiler time here), link them into a
    temporary .so and rename it into place."""
    target = folder / "libfourbit_cpu.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tag = f".build-{os.getpid()}-{threading.get_ident()}"
    objects = [folder / f"{tag}-{Path(s).stem}.o" for s in SOURCES]
    tmp = folder / f"{tag}.so"
    compile_flags = [f for f in flags if f != "-shared"]
    jobs = max(1, min(len(SOURCES), os.cpu_count() or 1))
    sources = [[*cc.split(), *compile_flags, "-c", str(CSRC / s), "-o", str(o)] for s, o in zip(SOURCES, objects)]
    try:
        for i in range(0, len(sources), jobs):
            _run(sources[i : i + jobs])
        _run([[*cc.split(), *flags, *map(str, objects), "-o", str(tmp), "-lm"]])
        if not tmp.exists():
            raise Unavailable(f"compiling the CPU kernels failed: {cc} wrote no library", "install gcc or set CC")
        os.replace(tmp, target)  # atomic: another process sees no file or a whole one
    finally:
        for leftover in (*objects, tmp):
            leftover.unlink(missing_ok=True)
    return target


def _load() -> ctypes.CDLL:
    import time

    t0 = time.perf_counter()
    if platform.system() != "Linux":
        raise Unavailable(f"the CPU kernels are built for Linux only (this is {platform.system()})",
                          "use FOURBIT_BACKEND=reference")
    cc = _compiler()
    for flags in ((*FLAGS, OPENMP), FLAGS):  # without OpenMP only if the compiler has none
        key = _key(cc, flags)
        folder = _cache_root() / "cpu-kernels" / key
        _STATE["built"] = not (folder / "libfourbit_cpu.so").exists()
        try:
            try:
                path = _build(cc, folder, flags)
            except OSError:  # the cache is not writable: build privately for this process
                _STATE["built"] = True
                path = _build(cc, Path(tempfile.mkdtemp(prefix="fourbit-cpu-")) / key, flags)
            break
        except Unavailable:
            if flags == FLAGS:
                raise
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise Unavailable(f"loading the CPU kernels failed ({err})", "delete the cache folder and retry") from None
    _STATE["team"] = _team(lib)
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    want = os.environ.get("FOURBIT_CPU_ISA", "").strip().lower() or "avx512"
    if want not in ISAS:
        raise ValueError(f"FOURBIT_CPU_ISA must be one of {list(ISAS)}, got {want!r}")
    isa = lib.fourbit_cpu_set_isa(ISAS.index(want))
    while isa > 0 and not _self_check(lib, isa):
        isa = lib.fourbit_cpu_set_isa(isa - 1)
    _STATE["isa"] = _STATE["checked"] = ISAS[isa]
    _STATE["seconds"] = time.perf_counter() - t0
    _STATE["path"] = str(path)
    return lib


def _team(lib: ctypes.CDLL) -> str:
    """Which threads run the kernels' parallel loops: "torch" when the library is bound to the one
    OpenMP runtime already in the process (torch's), "own" otherwise (threads of its own, which can
    compete with torch's for the cores)."""
    if not lib.fourbit_cpu_openmp():
        return "own"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "own"
    runtimes = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line.rsplit("/", 1)[-1]}
    return "torch" if len(runtimes) == 1 else "own"


def _self_check(lib: ctypes.CDLL, isa: int) -> bool:
    """Does `isa` reproduce the portable path on a small fixed input (dequantize, 8-bit quantize)?"""
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(32, generator=g) + 0.5
    code = torch.linspace(-1, 1, 16)
    code8 = torch.linspace(-1, 1, 256)
    x = torch.randn(2000, generator=g)
    outs = []
    for which in (isa, 0):
        lib.fourbit_cpu_set_isa(which)
        out = torch.empty(2000)
        lib.fourbit_dequantize_4bit(packed.data_ptr(), 0, 2000, 64, code.data_ptr(), absmax.data_ptr(), None, None, None,
                                    0.0, 256, out.data_ptr(), 0, 1)
        q = torch.empty(2000, dtype=torch.uint8)
        amax = torch.empty(8)
        lib.fourbit_quantize_blockwise(x.data_ptr(), 0, 2000, 256, code8.data_ptr(), q.data_ptr(), amax.data_ptr(), 1)
        outs.append((out, q, amax))
    lib.fourbit_cpu_set_isa(isa)
    ok = all(torch.equal(a, b) for a, b in zip(*outs))
    if not ok:
        import sys

        print(f"fourbit: the {ISAS[isa]} CPU kernels disagree with the portable ones on this machine; "
              f"using {ISAS[isa - 1]}", file=sys.stderr)
    return ok


def library() -> ctypes.CDLL:
    """The loaded kernel library (built on first use, then cached); raises Unavailable if it cannot be."""
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]
        if "error" in _STATE:
            raise _STATE["error"]
        try:
            _STATE["lib"] = _load()
        except Unavailable as err:
            _STATE["error"] = err
            raise
        return _STATE["lib"]


def loaded() -> ctypes.CDLL:
    """`library()` without the lock once it has loaded (the per-call path of every kernel)."""
    lib = _STATE.get("lib")
    return lib if lib is not None else library()


def team() -> str:
    """"torch" when the kernels' threads are torch's OpenMP team, "own" when they start their own."""
    library()
    return _STATE["team"]


def isa_name() -> str:
    """The instruction set the kernels use: "scalar", "avx2" or "avx512" (loads the library)."""
    library()
    return _STATE["isa"]


def set_isa(name: str) -> str:
    """Use instruction set `name` ("scalar", "avx2", "avx512"; capped at what this CPU runs) for every
    later call in this process; returns the one now in use. Tests run each kernel on every path."""
    if name not in ISAS:
        raise ValueError(f"isa must be one of {list(ISAS)}, got {name!r}")
    lib = library()
    best = lib.fourbit_cpu_best_isa()
    _STATE["isa"] = ISAS[lib.fourbit_cpu_set_isa(min(ISAS.index(name), ISAS.index(_STATE["checked"]), best))]
    return _STATE["isa"]


def built_here() -> bool:
    """Whether this process compiled the library (False: it loaded the cached build)."""
    library()
    return _STATE["built"]


def build_seconds() -> float:
    """Seconds the first `library()` call of this process took (a build, or a cache hit's load)."""
    library()
    return _STATE["seconds"]
