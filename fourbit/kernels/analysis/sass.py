"""Read a `cuobjdump -sass` listing: instructions, the steady-state loop, and its instruction mix.

The static cost model (`fourbit.kernels.analysis.costmodel`) needs, for one compiled kernel, the
instructions one trip of its hot loop executes per warp, sorted into the classes whose hardware
throughput differs. cuobjdump prints one instruction per line:

    /*0770*/  @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;   /* 0x... */
    /*34b0*/  @!P0 BRA 0x6b0 ;

The steady-state loop is found from its back-edge: a branch whose target address is not after the
branch itself. Its body is every instruction from the target to the branch. Triton's loops carry
helper back-edges too (mbarrier try-wait spins, out-of-line retry stubs placed after EXIT that jump
back into the loop), so the loop we keep is the innermost back-edge whose body holds a global or
asynchronous load and no EXIT. A kernel without such a loop (straight-line code, e.g. one tile
per program) is counted whole. Predicated instructions count as issued: a warp issues them even
when every lane's predicate is false, so this is what the issue slots see.
"""

from __future__ import annotations

import collections
import dataclasses
import re

__all__ = ["Instruction", "Loop", "parse", "find_loop", "classify", "access_bytes", "gathers", "mix", "prologue"]

_LINE = re.compile(
    r"^\s*/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?"
    r"(?P<op>[A-Z][A-Z0-9_]*)(?P<mods>(?:\.[A-Za-z0-9_]+)*)\s*(?P<args>[^;]*);"
)
_TARGET = re.compile(r"0x([0-9a-f]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    addr: int
    opcode: str  # "LDG"
    modifiers: tuple[str, ...]  # ("E", "128")
    operands: str  # "R4, desc[UR6][R2.64]"
    predicated: bool

    @property
    def branch_target(self) -> int | None:
        if self.opcode not in ("BRA", "JMP"):
            return None
        m = _TARGET.search(self.operands)
        return int(m.group(1), 16) if m else None


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction of the body (the back-edge's target)
    end: int  # address of the back-edge branch
    body: tuple[Instruction, ...]


def parse(listing: str) -> list[Instruction]:
    """Every instruction of the listing, in address order (one kernel per listing)."""
    out = []
    for line in listing.splitlines():
        m = _LINE.match(line)
        if m:
            mods = tuple(x for x in m.group("mods").split(".") if x)
            out.append(Instruction(int(m.group("addr"), 16), m.group("op"), mods, m.group("args").strip(),
                                   m.group("pred") is not None))
    return out


_LOADS = {"LDG", "LDGSTS", "UTMALDG", "UBLKCP", "LD"}


def find_loop(instructions: list[Instruction]) -> Loop | None:
    """The steady-state loop (see the module docstring), or None for straight-line code."""
    candidates = []
    for i, ins in enumerate(instructions):
        target = ins.branch_target
        if target is None or target > ins.addr:
            continue
        body = tuple(x for x in instructions[: i + 1] if x.addr >= target)
        if any(x.opcode in ("EXIT", "RET") for x in body) or not any(x.opcode in _LOADS for x in body):
            continue
        candidates.append(Loop(target, ins.addr, body))
    # innermost: no other candidate lies inside it; among several, the one with the most loads
    inner = [c for c in candidates if not any(o is not c and c.start <= o.start and o.end <= c.end for o in candidates)]
    return max(inner, key=lambda c: (sum(x.opcode in _LOADS for x in c.body), len(c.body)), default=None)


_REG = re.compile(r"\bR(\d+)(\.64)?\b")
_STORES = {"STG", "ST", "STS", "STSM", "RED", "REDG", "ATOM", "ATOMG", "ATOMS", "STL"}
_DATA_LOADS = {"LDG", "LD", "LDS", "LDSM", "LDL"}  # loads that write registers


def _regs(text: str) -> set[int]:
    out = set()
    for m in _REG.finditer(text):
        r = int(m.group(1))
        out |= {r, r + 1} if m.group(2) else {r}
    return out


def gathers(body: tuple[Instruction, ...] | list[Instruction]) -> list[Instruction]:
    """Loads (global or shared) whose address depends on data loaded earlier in the same trip,
    e.g. a code-table lookup indexed by the packed nibbles. Their lanes hit scattered addresses, so
    they cost more L1/shared wavefronts than their width says. A forward taint pass: the results of
    loads are tainted, taint flows from source to destination registers, a load whose address
    registers are tainted is a gather. Two passes over the body, so that loads issued for the next
    trip (software pipelining) taint the top of the body."""
    tainted: set[int] = set()
    found: list[Instruction] = []
    for ins in [*body, *body]:
        operands = [x.strip() for x in ins.operands.split(",")]
        address = _regs(" ".join(re.findall(r"\[([^\]]*)\]", ins.operands)))
        if ins.opcode == "LDGSTS":  # global -> shared copy: the shared address comes first, no register written
            source = _regs(" ".join(re.findall(r"\[([^\]]*)\]", ",".join(operands[1:]))))
            if source & tainted and ins not in found:
                found.append(ins)
            continue
        while len(operands) > 1 and re.fullmatch(r"!?U?P(T|\d+)", operands[0]):  # `SHFL.IDX PT, R5, ...`
            operands = operands[1:]
        if ins.opcode in _STORES or not operands[0].startswith("R"):
            continue
        first = _REG.match(operands[0])
        if first is None:  # RZ or a special register
            continue
        width = 1
        if ins.opcode in _DATA_LOADS:
            width = max(1, access_bytes(ins) // 128)  # registers per lane: bytes per warp / 32 / 4
            if address & tainted and ins not in found:
                found.append(ins)
            tainted |= set(range(int(first.group(1)), int(first.group(1)) + width))
            continue
        if "64" in ins.modifiers or "WIDE" in ins.modifiers or first.group(2):
            width = 2
        dest = set(range(int(first.group(1)), int(first.group(1)) + width))
        if _regs(",".join(operands[1:])) & tainted:
            tainted |= dest
        else:
            tainted -= dest
    return found


# instruction class -> opcodes. The throughput of each class is in costmodel.PIPES.
_CLASSES = {
    "global_load": {"LDG", "LDGSTS", "LD", "UTMALDG", "UBLKCP", "LDGDEPBAR"},
    "global_store": {"STG", "ST", "RED", "ATOM", "ATOMG", "REDG", "UTMASTG"},
    "shared_load": {"LDS", "LDSM"},
    "shared_store": {"STS", "STSM", "ATOMS"},
    "shuffle": {"SHFL"},
    "barrier": {"BAR", "SYNCS", "WARPSYNC", "DEPBAR", "WARPGROUP", "MEMBAR", "FENCE", "ARRIVES", "ERRBAR"},
    "tensor": {"HGMMA", "HMMA", "IMMA", "QGMMA"},
    "fp32": {"FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FSWZADD"},
    "fp16x2": {"HFMA2", "HMUL2", "HADD2", "HMNMX2", "HSETP2"},
    "conversion": {"F2F", "F2I", "I2F", "F2FP", "I2FP", "FRND", "F2IP", "I2IP"},
    "special": {"MUFU"},
    "integer": {"IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "ISETP", "IMNMX", "PRMT",
                "SEL", "BFE", "BFI", "SGXT", "IABS", "POPC", "FLO", "BMSK", "BREV", "IDP", "IMUL", "VIADD", "VIMNMX",
                "PLOP3", "P2R", "R2P", "ICMP", "IMNMX3", "VIADDMNMX", "I2I"},
}
_CLASS_OF = {op: cls for cls, ops in _CLASSES.items() for op in ops}


def classify(ins: Instruction) -> str:
    """The throughput class of one instruction; uniform-datapath (U*) ops are "uniform"."""
    if ins.opcode in _CLASS_OF:
        return _CLASS_OF[ins.opcode]
    if ins.opcode.startswith("U"):
        return "uniform"
    return "other"  # MOV, S2R, CS2R, BRA, NOP, ...


_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}
_LDSM_BYTES = {"M88": 128, "2": 256, "4": 512}  # ldmatrix: one to four 8x8 b16 matrices per warp


def access_bytes(ins: Instruction) -> int:
    """Bytes one warp-wide memory instruction moves through L1/shared memory (all 32 lanes active)."""
    if ins.opcode in ("LDSM", "STSM"):
        n = next((_LDSM_BYTES[m] for m in reversed(ins.modifiers) if m in _LDSM_BYTES), 128)
        return n
    widths = [_WIDTHS[m] for m in ins.modifiers if m in _WIDTHS]
    return 32 * (widths[-1] if widths else 32) // 8


_HGMMA_SHAPE = re.compile(r"^64x(\d+)x(\d+)$")


def tensor_flops(ins: Instruction) -> int:
    """Floating-point operations one warp's copy of an MMA instruction does (0 for others).
    HGMMA 64xNxK runs per warpgroup of 4 warps, so each warp's instruction counts a quarter."""
    if ins.opcode == "HGMMA":
        for m in ins.modifiers:
            s = _HGMMA_SHAPE.match(m)
            if s:
                return 2 * 64 * int(s.group(1)) * int(s.group(2)) // 4
    if ins.opcode == "HMMA":
        shape = next((m for m in ins.modifiers if m.isdigit() and len(m) >= 3), "1688")
        m, n, k = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}.get(shape, (16, 8, 8))
        return 2 * m * n * k
    return 0


def hgmma_smem_bytes(ins: Instruction) -> int:
    """Shared-memory bytes a warp's HGMMA reads (its quarter of the warpgroup's operands): B always,
    A too unless it comes from registers (an `R` operand before the descriptor)."""
    if ins.opcode != "HGMMA":
        return 0
    shape = next((_HGMMA_SHAPE.match(m) for m in ins.modifiers if _HGMMA_SHAPE.match(m)), None)
    if shape is None:
        return 0
    n, k = int(shape.group(1)), int(shape.group(2))
    elem = 1 if any(m in ("E4M3", "E5M2", "S8", "U8") for m in ins.modifiers) else 2
    return ((0 if _a_in_registers(ins) else 64 * k * elem) + n * k * elem) // 4


def _a_in_registers(ins: Instruction) -> bool:
    """HGMMA's A operand is a register (`R..` before the B descriptor), not a shared-memory descriptor."""
    operands = [x.strip() for x in ins.operands.split(",")]
    return len(operands) > 1 and operands[1].startswith("R")


def mix(body: tuple[Instruction, ...] | list[Instruction]) -> dict:
    """Counts per warp per loop trip: instructions by class, memory instructions by width, MMA work.

    Returns {"instructions", "by_class": {class: n}, "global_load_bits": {bits: n},
    "shared_bits": {"load"/"store": {bits: n}}, "l1_wavefronts", "tensor_flops",
    "hgmma_smem_bytes", "waits_all_mma", "mma_register_a"}; l1_wavefronts counts 128-byte L1/shared-memory
    transactions per warp (a minimum: perfectly coalesced, conflict-free)."""
    by_class: collections.Counter = collections.Counter()
    gl_bits: collections.Counter = collections.Counter()
    sh = {"load": collections.Counter(), "store": collections.Counter()}
    wavefronts = flops = hg_smem = 0
    waits_all = register_a = False
    for ins in body:
        cls = classify(ins)
        by_class[cls] += 1
        if cls in ("global_load", "shared_load", "shared_store") and ins.opcode not in ("UTMALDG", "UBLKCP", "LDGDEPBAR"):
            nbytes = access_bytes(ins)
            wavefronts += max(1, nbytes // 128)
            if cls == "global_load":
                gl_bits[nbytes * 8 // 32] += 1
            else:
                sh["load" if cls == "shared_load" else "store"][nbytes * 8 // 32] += 1
        elif cls == "global_store":
            wavefronts += max(1, access_bytes(ins) // 128)
        flops += tensor_flops(ins)
        hg_smem += hgmma_smem_bytes(ins)
        register_a |= ins.opcode == "HGMMA" and hgmma_smem_bytes(ins) and _a_in_registers(ins)
        # `WARPGROUP.DEPBAR.LE gsb0, 0x0`: wait until no wgmma is outstanding, so the next decode
        # cannot overlap the MMA just issued
        if ins.opcode == "WARPGROUP" and "DEPBAR" in ins.modifiers and re.search(r",\s*0x0\b", ins.operands):
            waits_all = True
    return {
        "instructions": len(body),
        "by_class": dict(sorted(by_class.items())),
        "global_load_bits": dict(sorted(gl_bits.items())),
        "shared_bits": {k: dict(sorted(v.items())) for k, v in sh.items()},
        "l1_wavefronts": wavefronts,
        "tensor_flops": flops,
        "hgmma_smem_bytes": hg_smem,
        "waits_all_mma": waits_all,
        "mma_register_a": bool(register_a),
    }


def prologue(pre: list[Instruction]) -> dict[str, int]:
    """What runs once per program before the loop (`pre`): its instructions and L1 wavefronts per
    warp, the shared-memory stores of a table fill, the global loads issued before the fill's first
    store (the fill waits for the table's) and those issued after it (their latency starts later)."""
    stores = [i for i, x in enumerate(pre) if x.opcode in ("STS", "STSM")]
    loads = [i for i, x in enumerate(pre) if x.opcode in ("LDG", "LD", "LDGSTS")]
    first = stores[0] if stores else len(pre)
    return {"instructions": len(pre), "l1_wavefronts": mix(pre)["l1_wavefronts"], "fill_stores": len(stores),
            "loads_before_fill": sum(i < first for i in loads), "loads_after_fill": sum(i > first for i in loads)}
