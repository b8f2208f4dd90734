"""Hazards the interpreter cannot see, read from the SASS of a kernel built for a real GPU.

The interpreter runs every tensor operation to completion in program order, so it proves the
arithmetic but not what the hardware does with asynchronous instructions. Three rules are checked
on every path of the kernel's control-flow graph (branches both ways, loops followed around their
back-edges until nothing changes):

  wgmma    An HGMMA (wgmma.mma_async) runs on after it issues: until the WARPGROUP.DEPBAR
           (wgmma.wait_group) that retires its group, it may still read its A registers and read and
           write its accumulator. The PTX ISA leaves undefined any write to those registers, or any
           read of the accumulator, in that window; the only exception is the next wgmma chaining on
           the same accumulator. HGMMA sets no scoreboard that other instructions wait on, so ptxas
           does not protect these registers either. The walk keeps the pending groups and flags any
           other instruction that writes a pending A or accumulator register or reads a pending
           accumulator. A group is the HGMMAs up to the one marked gsb0 (wgmma.commit_group).
           `DEPBAR.LE gsb0, N` retires all committed groups except the newest N. The same rule also
           requires a WARPGROUP.ARRIVE (wgmma.fence) between any register write and an HGMMA that
           reads that register.
  proxy    wgmma reads shared memory through the async proxy. A generic-proxy write to shared memory
           (STS, STSM, ATOMS, and cp.async's LDGSTS) must be ordered before it by fence.proxy.async
           (FENCE.VIEW.ASYNC.S).
  table    Shared memory written before the steady-state loop (a table the loop reads, a pipeline's
           first tiles) must pass a BAR.SYNC on every path before any shared-memory read inside the
           loop (LDS, LDSM, an HGMMA's descriptor operands): one thread's writes reach another
           thread's reads only through a barrier. Exchanges inside the loop are not checked: Triton
           converts layouts there within a warp (STS then LDSM by the same warp, no barrier needed),
           which a listing cannot tell from a cross-warp read. `LDS RZ, [RZ]` (a load ptxas emits to
           wait for earlier shared-memory traffic; its value is discarded) is not a read.

`check(listing)` returns the findings (an empty list: none of the three rules is broken). Tests build a
deliberately broken kernel for each rule and show that it fails (tests/test_hazards.py).
"""

from __future__ import annotations

import dataclasses
import re

from . import sass as sasslib

__all__ = ["Finding", "check", "writes", "reads"]

_PRED = re.compile(r"^!?U?P(T|\d+)$")
_REG = re.compile(r"^R(\d+)$")
_REG_ANY = re.compile(r"\bR(\d+)(\.64)?\b")
# opcodes that never write a general-purpose register (stores, control, barriers, fences, waits)
_NO_DEST = {"ST", "STG", "STS", "STL", "STSM", "RED", "REDG", "LDGSTS", "LDGDEPBAR", "DEPBAR", "BAR", "BRA", "BRX",
            "JMP", "JMX", "CALL", "RET", "EXIT", "WARPGROUP", "WARPSYNC", "FENCE", "MEMBAR", "ERRBAR", "NOP", "BSSY",
            "BSYNC", "YIELD", "CCTL", "SYNCS", "ARRIVES", "UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF", "BPT", "KILL"}
_SHARED_WRITES = {"STS", "STSM", "ATOMS", "LDGSTS"}  # generic-proxy writes of shared memory
_SHARED_READS = {"LDS", "LDSM"}
_LDSM_REGS = {"2": 2, "4": 4}
_MAX_GROUPS = 8  # pending wgmma groups the walk tracks (ptxas never leaves more in our kernels)


@dataclasses.dataclass(frozen=True)
class Finding:
    rule: str  # "wgmma" | "proxy" | "table"
    addr: int  # the offending instruction
    text: str

    def __str__(self) -> str:
        return f"{self.rule} @0x{self.addr:04x}: {self.text}"


def _operands(ins: sasslib.Instruction) -> list[str]:
    return [x.strip() for x in ins.operands.split(",")] if ins.operands else []


def _dest_width(ins: sasslib.Instruction) -> int:
    """32-bit registers the destination operand spans."""
    mods = ins.modifiers
    if ins.opcode == "LDSM":
        return next((_LDSM_REGS[m] for m in reversed(mods) if m in _LDSM_REGS), 1)
    if ins.opcode == "HMMA":
        return 4 if "F32" in mods[1:2] else 2  # HMMA.16816.F32.BF16: D is 16x8 float32 per warp
    if "128" in mods:
        return 4
    if "64" in mods or "WIDE" in mods or (ins.opcode == "CS2R" and "32" not in mods):
        return 2
    if ins.opcode in ("DADD", "DMUL", "DFMA", "DMNMX"):  # float64
        return 2
    if ins.opcode in ("F2F", "I2F", "F2I", "I2I") and mods and mods[0] in ("F64", "S64", "U64"):
        return 2
    return 1


def _dest_operand(ins: sasslib.Instruction) -> int | None:
    """Index of the operand holding the written general-purpose register, or None."""
    if ins.opcode in _NO_DEST or ins.opcode == "HGMMA":
        return None
    ops = _operands(ins)
    i = 1 if ins.opcode == "SHFL" and ops and _PRED.match(ops[0]) else 0  # SHFL.IDX PT, R5, ...
    return i if i < len(ops) and _REG.match(ops[i]) else None


def writes(ins: sasslib.Instruction) -> set[int]:
    """General-purpose registers `ins` writes (an HGMMA's accumulator: see `_hgmma`)."""
    if ins.opcode == "HGMMA":
        return set(_hgmma(ins)["acc"])
    i = _dest_operand(ins)
    if i is None:
        return set()
    first = int(_REG.match(_operands(ins)[i]).group(1))
    return set(range(first, first + _dest_width(ins)))


def reads(ins: sasslib.Instruction) -> set[int]:
    """General-purpose registers `ins` reads: every register operand but the destination, a
    store's data operand at its full width, `R2.64` as two registers."""
    ops = _operands(ins)
    dest = _dest_operand(ins)
    out: set[int] = set()
    for j, op in enumerate(ops):
        if j == dest:
            continue
        for m in _REG_ANY.finditer(op):
            r = int(m.group(1))
            width = 2 if m.group(2) else 1
            if ins.opcode in _STORES and j == len(ops) - 1 and "[" not in op:  # the data operand
                width = _store_width(ins)
            out |= set(range(r, r + width))
    if ins.opcode == "HGMMA":
        h = _hgmma(ins)
        out |= set(h["a"]) | set(h["acc"])
    return out


_STORES = {"ST", "STG", "STS", "STL", "STSM"}


def _store_width(ins: sasslib.Instruction) -> int:
    if ins.opcode == "STSM":
        return next((_LDSM_REGS[m] for m in reversed(ins.modifiers) if m in _LDSM_REGS), 1)
    return 4 if "128" in ins.modifiers else 2 if "64" in ins.modifiers else 1


_SHAPE = re.compile(r"^64x(\d+)x(\d+)$")


def _hgmma(ins: sasslib.Instruction) -> dict:
    """{"acc": accumulator registers, "a": A registers (empty when A is in shared memory), "commit"}.
    HGMMA.64xNxK.F32.*: a warpgroup's 64 x N float32 accumulator is N / 2 registers per thread (N / 4
    for F16); a register A operand is 64 x K elements of 16 (or 8) bits: 4 registers per thread."""
    shape = next((_SHAPE.match(m) for m in ins.modifiers if _SHAPE.match(m)), None)
    if shape is None:
        raise ValueError(f"HGMMA without a 64xNxK shape at 0x{ins.addr:x}: {ins.operands}")
    n = int(shape.group(1))
    acc_type = ins.modifiers[ins.modifiers.index(shape.group(0)) + 1]
    ops = _operands(ins)
    first = int(_REG.match(ops[0]).group(1))
    acc = range(first, first + (n // 2 if acc_type == "F32" else n // 4))
    a = range(int(ops[1][1:]), int(ops[1][1:]) + 4) if _REG.match(ops[1]) else range(0)
    return {"acc": tuple(acc), "a": tuple(a), "commit": "gsb0" in ops[2:]}


@dataclasses.dataclass(frozen=True)
class _State:
    """What the walk knows on entry to an instruction. The key fields (pending groups, the open
    group, the two shared-memory flags) take few values; the register and address sets are joined
    by union where paths meet."""

    committed: tuple[tuple[int, ...], ...] = ()  # pending committed groups, oldest first: HGMMA indices
    open: tuple[int, ...] = ()  # HGMMAs issued since the last commit
    unfenced: bool = False  # generic shared write not yet followed by FENCE.VIEW.ASYNC.S
    unsynced: bool = False  # shared write before the loop not yet followed by BAR.SYNC

    def key(self):
        return (self.committed, self.open, self.unfenced, self.unsynced)


def _successors(instructions: list[sasslib.Instruction], i: int, index_of: dict[int, int]) -> list[int]:
    ins = instructions[i]
    nxt = [i + 1] if i + 1 < len(instructions) else []
    if ins.opcode in ("EXIT", "RET", "KILL"):
        return nxt if ins.predicated else []
    if ins.opcode in ("BRA", "JMP"):
        target = ins.branch_target
        if target is None or target not in index_of:
            raise ValueError(f"branch at 0x{ins.addr:x} to an unknown address: {ins.operands}")
        return [index_of[target]] + (nxt if ins.predicated else [])
    if ins.opcode in ("BRX", "JMX"):
        raise ValueError(f"indirect branch at 0x{ins.addr:x}: the hazard walk needs static targets")
    return nxt


def check(listing: str) -> list[Finding]:
    """The findings of the three rules (module docstring) on one kernel's cuobjdump -sass listing."""
    instructions = sasslib.parse(listing)
    if not instructions:
        return []
    index_of = {ins.addr: i for i, ins in enumerate(instructions)}
    loop = sasslib.find_loop(instructions)
    in_loop = lambda ins: loop is not None and loop.start <= ins.addr <= loop.end  # noqa: E731
    hgmma = {i: _hgmma(ins) for i, ins in enumerate(instructions) if ins.opcode == "HGMMA"}
    findings: dict[tuple[str, int], Finding] = {}
    # per instruction: key -> (registers written since the last ARRIVE, unfenced writers, unsynced writers)
    seen: dict[int, dict[tuple, tuple[frozenset, frozenset, frozenset]]] = {}
    work = [(0, _State(), frozenset(), frozenset(), frozenset())]
    while work:
        i, state, written, unfenced_at, unsynced_at = work.pop()
        known = seen.setdefault(i, {})
        old = known.get(state.key())
        if old is not None:
            merged = (old[0] | written, old[1] | unfenced_at, old[2] | unsynced_at)
            if merged == old:
                continue
            written, unfenced_at, unsynced_at = merged
        known[state.key()] = (written, unfenced_at, unsynced_at)
        ins = instructions[i]

        def flag(rule: str, text: str) -> None:
            findings.setdefault((rule, ins.addr), Finding(rule, ins.addr, f"{ins.opcode} {ins.operands}: {text}"))

        pending = [j for group in state.committed for j in group] + list(state.open)
        committed, open_group = state.committed, state.open
        unfenced, unsynced = state.unfenced, state.unsynced
        if ins.opcode == "HGMMA":
            h = hgmma[i]
            for j in pending:
                if set(h["acc"]) & set(hgmma[j]["a"]):
                    flag("wgmma", f"overwrites R{min(set(h['acc']) & set(hgmma[j]['a']))}, an A register "
                                  f"of the HGMMA at 0x{instructions[j].addr:x} still pending")
            stale = (set(h["a"]) | set(h["acc"])) & written
            if stale:
                flag("wgmma", f"reads R{min(stale)}, written after the last WARPGROUP.ARRIVE (wgmma.fence)")
            if unfenced:
                flag("proxy", "reads shared memory written by the generic proxy at "
                              + ", ".join(f"0x{a:x}" for a in sorted(unfenced_at)) + " with no FENCE.VIEW.ASYNC.S since")
            if unsynced and in_loop(ins):
                flag("table", "reads shared memory written before the loop at "
                              + ", ".join(f"0x{a:x}" for a in sorted(unsynced_at)) + " with no BAR.SYNC since")
            open_group = open_group + (i,)
            if h["commit"]:  # a loop that never waits would grow the list without end: keep the newest
                committed, open_group = (committed + (open_group,))[-_MAX_GROUPS:], ()
        else:
            wr, rd = writes(ins), reads(ins)
            for j in pending:
                hit_a, hit_acc = wr & set(hgmma[j]["a"]), (wr | rd) & set(hgmma[j]["acc"])
                if hit_a or hit_acc:
                    what = (f"writes R{min(hit_a)}, an A register" if hit_a
                            else f"{'writes' if wr & set(hgmma[j]['acc']) else 'reads'} R{min(hit_acc)}, the accumulator")
                    flag("wgmma", f"{what} of the HGMMA at 0x{instructions[j].addr:x}, not yet retired by a "
                                  "WARPGROUP.DEPBAR")
            written = written | frozenset(wr)
            if ins.opcode == "WARPGROUP" and "ARRIVE" in ins.modifiers:
                written = frozenset()
            elif ins.opcode == "WARPGROUP" and "DEPBAR" in ins.modifiers:
                keep = int(_operands(ins)[-1], 0)  # DEPBAR.LE gsb0, N: at most the newest N stay pending
                committed = committed[len(committed) - keep:] if keep < len(committed) else committed
            elif ins.opcode in _SHARED_WRITES:
                unfenced, unfenced_at = True, unfenced_at | {ins.addr}
                if loop is not None and ins.addr < loop.start:
                    unsynced, unsynced_at = True, unsynced_at | {ins.addr}
            elif ins.opcode == "FENCE" and "ASYNC" in ins.modifiers:
                unfenced, unfenced_at = False, frozenset()
            elif ins.opcode == "BAR" and "SYNC" in ins.modifiers:
                unsynced, unsynced_at = False, frozenset()
            elif ins.opcode in _SHARED_READS and unsynced and in_loop(ins) and not _operands(ins)[0] == "RZ":
                flag("table", "reads shared memory written before the loop at "
                              + ", ".join(f"0x{a:x}" for a in sorted(unsynced_at)) + " with no BAR.SYNC since")
        after = _State(committed, open_group, unfenced, unsynced)
        for s in _successors(instructions, i, index_of):
            work.append((s, after, written, unfenced_at if unfenced else frozenset(),
                         unsynced_at if unsynced else frozenset()))
    return sorted(findings.values(), key=lambda f: (f.addr, f.rule))
