"""An explicit pager for optimizer states: fixed-size pages, a device budget, LRU eviction.

Why page at all
---------------
AdamW keeps two states per parameter. In 32 bits that is 8 bytes per trainable parameter (plus
absmax scales in 8 bits: 2 + 8/256 bytes). The states are touched once per optimizer step, for a
few microseconds each, and otherwise only take up device memory that the forward and backward pass
need at their peak (activations, the dequantized weight tile, logits). bitsandbytes moves them out
of the way by allocating them in CUDA unified memory and letting the driver migrate 4 KiB-2 MiB
pages when the device runs short. That is invisible and untestable without a GPU, so fourbit pages
by hand.

Design
------
* The states of all parameters with the same state width form one flat *state space*; each
  parameter owns a range of it that starts at a multiple of 256 elements (small LoRA matrices share
  pages instead of each wasting most of one). The space is cut into **pages** of E elements; a page
  holds everything the update of its elements needs: for 32-bit states `[m: E float32 | v: E
  float32]`, for 8-bit states `[q1: E uint8 | q2: E uint8 | absmax1: E/256 float32 | absmax2: E/256
  float32]` (`StateLayout`). E is a multiple of 256, so an 8-bit quantization block never straddles
  two pages, and the update of a parameter is exactly the sequence of updates of its segments (the
  optimizer's maths is elementwise, blockwise in 8 bits).
* The **pool** (`PagePool`) owns every page. A page is *resident* when it has a device slot (a
  `page_bytes` uint8 tensor on the compute device). At most `budget_bytes // page_bytes` slots
  exist; `resident_bytes <= budget_bytes` is checked at every page-in (RuntimeError if broken).
  A page that is not resident lives in a host buffer (pinned on CUDA, so copies are asynchronous
  DMA). A page that was never written has neither: its first page-in zero-fills the slot.
* **acquire / release**: before the update of a chunk, `acquire(page)` makes it resident (waiting
  for an earlier prefetch if one is in flight) and pins it; `release(page)` unpins it and, on CUDA,
  records an event after the update so that a later eviction copies the page out only once the
  update has written it.
* **Eviction** takes the least-recently-used unpinned page; its slot is copied to its host buffer
  (every resident page is dirty: each update rewrites its states) and given to the incoming page.
* **Prefetch**: the optimizer asks for the next chunk's page while the current chunk updates.
  On CUDA all copies (out and in) go on one side stream, in order, so a slot is reused only after
  its old contents reached the host, and the compute stream waits on a per-page event before
  touching a page. Prefetch never evicts a pinned page and is skipped when no slot can be had
  (a one-page budget pages synchronously). On a CPU "device" the same code runs with plain copies
  between two sets of host tensors, so CI tests the bookkeeping: budget, LRU order, no lost or
  stale state.

What paging costs (bandwidth maths)
-----------------------------------
Let S be the state bytes and B the budget. The optimizer touches every page once per step. It walks
the pages forward on even steps and backward on odd steps, so the pages used last in one step are
the first needed in the next: with LRU, min(B, S) bytes hit and S - B miss. (Walking in the same
order every step would be LRU's worst case, a cyclic scan: every page would miss.) Each miss moves
one page out and one page in, so a step moves 2 (S - B) bytes over the host link.

  QLoRA r=16 on an 8B Llama (~42 M trainable parameters), 32-bit states: S = 336 MB.
  At B = 25 % of S: 2 x 252 MB per step. PCIe 5.0 x16 carries ~50 GB/s per direction, and the
  two directions overlap, so ~5 ms per step. The update itself reads and writes ~20 bytes per
  parameter from HBM (0.84 GB at ~4.8 TB/s on an H200: ~0.2 ms), so paging makes the optimizer step
  ~25x slower, yet it is small next to the forward/backward pass of such a step (hundreds of ms).
  8-bit states shrink S (and the traffic) by 3.9x.

  Measured on CPU (benchmarks/results/cpu/optim.md; SmolLM2-135M LoRA, 4.9 M parameters, 37 MiB of
  32-bit states, one thread, a shared 2-core machine whose timings moved +-30 % between runs): with
  the budget idle a step takes 1.25-1.45x the unpaged one (tensors split at page boundaries give
  more, shorter segments); at a 25 % budget 1.5-1.8x, moving 28 MiB in and 28 MiB out per step
  (10-14 ms of copies; here "device" and host are the same RAM).

Counters (`PagerStats`): pages in/out, bytes in/out, prefetched page-ins, synchronous page-ins
(the compute had to wait), host seconds spent paging (on CPU the copies themselves; on CUDA issuing
them and waiting for pages not yet prefetched), and peak resident bytes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict

import torch

from ...errors import InvalidInput

__all__ = ["PagePool", "PagerStats", "StateLayout", "DEFAULT_PAGE_BYTES"]

# 256 KiB (32768 elements of 32-bit states): a LoRA matrix of a 7B model (16 x 4096 elements) fills
# two pages; smaller pages mean more segments (launches) per step, bigger ones coarser budgets.
DEFAULT_PAGE_BYTES = 256 * 1024
_QBLOCK = 256  # 8-bit states are quantized in blocks of 256 elements (SPEC §7)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where one chunk's states sit inside a page.

    bits = 32: [m float32 (E) | v float32 (E)]                             8 E bytes
    bits = 8:  [q1 uint8 (E) | q2 uint8 (E) | absmax1 f32 (E/256) | absmax2 f32 (E/256)]
    """

    bits: int
    page_bytes: int

    def __post_init__(self):
        if self.bits not in (8, 32):
            raise ValueError(f"state bits must be 8 or 32, got {self.bits}")
        if self.page_bytes < 8 * _QBLOCK:
            raise ValueError(f"page_bytes must be at least {8 * _QBLOCK} (256 32-bit states), got {self.page_bytes}")

    @property
    def chunk(self) -> int:
        """E: elements per page, a multiple of 256."""
        per_element = 8.0 if self.bits == 32 else 2.0 + 8.0 / _QBLOCK
        return int(self.page_bytes // per_element) // _QBLOCK * _QBLOCK

    def views(self, page: torch.Tensor, start: int, n: int) -> dict[str, torch.Tensor]:
        """Typed views of the states of elements [start, start + n) of `page` (uint8, (page_bytes,)).

        start is a multiple of 256, so the 8-bit absmax views cover whole blocks.
        """
        e, a = self.chunk, start
        if self.bits == 32:
            return {
                "state1": page[4 * a : 4 * (a + n)].view(torch.float32),
                "state2": page[4 * (e + a) : 4 * (e + a + n)].view(torch.float32),
            }
        b0, nb, eb = a // _QBLOCK, -(-n // _QBLOCK), e // _QBLOCK
        return {
            "state1": page[a : a + n],
            "state2": page[e + a : e + a + n],
            "absmax1": page[2 * e + 4 * b0 : 2 * e + 4 * (b0 + nb)].view(torch.float32),
            "absmax2": page[2 * e + 4 * (eb + b0) : 2 * e + 4 * (eb + b0 + nb)].view(torch.float32),
        }


@dataclasses.dataclass
class PagerStats:
    pages_in: int = 0
    pages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    prefetched: int = 0  # page-ins issued ahead of use
    sync_page_ins: int = 0  # page-ins the update had to wait for
    wait_s: float = 0.0  # host seconds in acquire() and prefetch(): every copy on CPU, issuing them on CUDA
    peak_resident_bytes: int = 0


@dataclasses.dataclass
class _Page:
    host: torch.Tensor | None = None  # copy of the states while not resident (None: never written)
    slot: torch.Tensor | None = None  # device slot while resident
    ready: torch.cuda.Event | None = None  # CUDA: the page-in copy finished
    last_use: torch.cuda.Event | None = None  # CUDA: the last update that wrote the slot finished
    pinned: bool = False


class PagePool:
    """Fixed-size pages of optimizer state, at most `budget_bytes` of them resident on `device`.

    budget_bytes=None means no limit (everything stays resident after its first use).
    """

    def __init__(self, device: torch.device | str, budget_bytes: int | None, page_bytes: int = DEFAULT_PAGE_BYTES):
        self.check_budget(budget_bytes, page_bytes)
        self.device = torch.device(device)
        self.page_bytes = page_bytes
        self.budget_bytes = budget_bytes
        self.capacity = None if budget_bytes is None else budget_bytes // page_bytes  # slots
        self.stats = PagerStats()
        self._pages: list[_Page] = []
        self._lru: OrderedDict[int, None] = OrderedDict()  # resident page ids, least recent first
        self._free_slots: list[torch.Tensor] = []
        self._n_slots = 0
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None

    @staticmethod
    def check_budget(budget_bytes: int | None, page_bytes: int) -> None:
        """ValueError unless page_bytes > 0 and the budget (None: unlimited) holds at least one page."""
        if page_bytes <= 0:
            raise ValueError(f"page_bytes must be positive, got {page_bytes}")
        if budget_bytes is not None and not (isinstance(budget_bytes, (int, float)) and math.isfinite(budget_bytes)):
            raise InvalidInput(
                f"device_budget_bytes must be a finite number of bytes, got {budget_bytes!r}",
                "give a byte count, or None for no limit (all states resident)",
            )
        if budget_bytes is not None and budget_bytes < page_bytes:
            raise ValueError(
                f"device_budget_bytes={budget_bytes} is smaller than one page ({page_bytes} bytes); "
                f"give at least {page_bytes} bytes, or a smaller page_bytes"
            )

    def set_budget(self, budget_bytes: int | None) -> None:
        """Change the budget; only before any page is resident (the optimizer sets its default late)."""
        self.check_budget(budget_bytes, self.page_bytes)
        if self._lru:
            raise RuntimeError("the budget can only be set while no page is resident")
        self.budget_bytes = budget_bytes
        self.capacity = None if budget_bytes is None else budget_bytes // self.page_bytes

    # -- bookkeeping ---------------------------------------------------------------------------
    def new_page(self) -> int:
        self._pages.append(_Page())
        return len(self._pages) - 1

    @property
    def resident_pages(self) -> list[int]:
        """Resident page ids, least recently used first."""
        return list(self._lru)

    @property
    def resident_bytes(self) -> int:
        return len(self._lru) * self.page_bytes

    def _get_slot(self) -> torch.Tensor | None:
        """A free device slot, evicting the LRU unpinned page if the budget is full; None if impossible."""
        if self._free_slots:
            return self._free_slots.pop()
        if self.capacity is None or self._n_slots < self.capacity:
            self._n_slots += 1
            return torch.empty(self.page_bytes, dtype=torch.uint8, device=self.device)
        victim = next((pid for pid in self._lru if not self._pages[pid].pinned), None)
        if victim is None:
            return None
        return self._evict(victim)

    def _evict(self, pid: int) -> torch.Tensor:
        page = self._pages[pid]
        slot = page.slot
        if page.host is None:
            page.host = torch.empty(self.page_bytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        if self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                if page.last_use is not None:
                    self._copy_stream.wait_event(page.last_use)
                page.host.copy_(slot, non_blocking=True)
        else:
            page.host.copy_(slot)
        page.slot, page.ready, page.last_use = None, None, None
        del self._lru[pid]
        self.stats.pages_out += 1
        self.stats.bytes_out += self.page_bytes
        return slot

    def _page_in(self, pid: int, slot: torch.Tensor) -> None:
        page = self._pages[pid]
        if self.capacity is not None and len(self._lru) + 1 > self.capacity:
            raise RuntimeError(
                f"pager bug: paging in page {pid} would hold {len(self._lru) + 1} pages, budget is {self.capacity}"
            )
        if self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                self._fill(slot, page.host)
                page.ready = torch.cuda.Event()
                page.ready.record(self._copy_stream)
        else:
            self._fill(slot, page.host)
        if page.host is not None:
            self.stats.bytes_in += self.page_bytes
            self.stats.pages_in += 1
        page.slot = slot
        self._lru[pid] = None
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.resident_bytes)

    @staticmethod
    def _fill(slot: torch.Tensor, host: torch.Tensor | None) -> None:
        """Copy a page's host bytes into its slot; a never-written page starts as zeros."""
        if host is None:
            slot.zero_()
        else:
            slot.copy_(host, non_blocking=True)

    # -- the interface the optimizer uses ------------------------------------------------------
    def acquire(self, pid: int) -> torch.Tensor:
        """Make page `pid` resident, pin it, and return its slot (uint8, (page_bytes,)) on `device`."""
        t0 = time.perf_counter()
        page = self._pages[pid]
        if page.slot is None:
            slot = self._get_slot()
            if slot is None:
                raise RuntimeError(f"no device slot for page {pid}: all {self.capacity} resident pages are pinned")
            self._page_in(pid, slot)
            self.stats.sync_page_ins += 1
        if page.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(page.ready)
            page.ready = None
        page.pinned = True
        self._lru.move_to_end(pid)
        self.stats.wait_s += time.perf_counter() - t0
        return page.slot

    def release(self, pid: int) -> None:
        """Unpin page `pid` after its update has been issued."""
        page = self._pages[pid]
        if page.slot is None or not page.pinned:
            raise RuntimeError(f"page {pid} released without being acquired")
        if self.device.type == "cuda":
            page.last_use = torch.cuda.Event()
            page.last_use.record(torch.cuda.current_stream(self.device))
        page.pinned = False

    def prefetch(self, pid: int) -> bool:
        """Start making `pid` resident (CUDA: without blocking); False when no slot can be had now."""
        page = self._pages[pid]
        if page.slot is not None:
            return True
        t0 = time.perf_counter()
        slot = self._get_slot()
        if slot is not None:
            self._page_in(pid, slot)
            self.stats.prefetched += 1
        self.stats.wait_s += time.perf_counter() - t0
        return slot is not None

    def synchronize(self) -> None:
        """Wait for every copy in flight (before the host reads host buffers)."""
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    def read(self, pid: int) -> torch.Tensor:
        """A CPU copy of page `pid` (uint8, (page_bytes,)); zeros if it was never written."""
        self.synchronize()
        page = self._pages[pid]
        if page.slot is not None:
            return page.slot.to("cpu", copy=True)  # ordered after the updates on the current stream
        if page.host is None:
            return torch.zeros(self.page_bytes, dtype=torch.uint8)
        return page.host.clone()

    def write(self, pid: int, data: torch.Tensor) -> None:
        """Overwrite page `pid` with `data` (uint8, (page_bytes,)), wherever the page lives."""
        if data.dtype != torch.uint8 or data.numel() != self.page_bytes:
            raise ValueError(f"page data must be {self.page_bytes} uint8 bytes, got {data.numel()} {data.dtype}")
        self.synchronize()
        page = self._pages[pid]
        if page.slot is not None:
            page.slot.copy_(data)
            return
        if page.host is None:
            page.host = torch.empty(self.page_bytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        page.host.copy_(data)
