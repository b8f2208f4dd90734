"""Where a plan is checked: a GPU from a small table, a size given by hand, this machine's GPU, or
this machine's RAM (a CPU run).

Capacities are the total memory nvidia-smi reports for each card (MiB, ECC on where the card has
it); a run can use less: the CUDA context and cuBLAS take some outside the allocator, and the
allocator's caching leaves fragments. `Target.usable` keeps HEADROOM of the card for them.
"""

from __future__ import annotations

import dataclasses
import os
import re

from ..errors import InvalidInput

__all__ = ["GPUS", "HEADROOM", "Target", "parse_size", "gpu_target", "memory_target", "local_target", "format_bytes"]

# name -> (total MiB as nvidia-smi reports it, compute capability major)
GPUS: dict[str, tuple[int, int]] = {
    "T4": (15360, 7),
    "4090": (24564, 8),
    "A100-40GB": (40960, 8),
    "A100-80GB": (81920, 8),
    "L40S": (46068, 8),
    "H100": (81559, 9),
    "H200": (143771, 9),
}
_ALIASES = {"RTX4090": "4090", "RTX-4090": "4090", "A100": "A100-80GB", "A100-40": "A100-40GB", "A100-80": "A100-80GB",
            "A10040GB": "A100-40GB", "A10080GB": "A100-80GB", "H100-80GB": "H100"}
HEADROOM = 0.05  # of a GPU's capacity, left for the CUDA context, cuBLAS and the allocator's fragments

_UNITS = {"": 1, "B": 1, "K": 2**10, "KIB": 2**10, "KB": 10**3, "M": 2**20, "MIB": 2**20, "MB": 10**6,
          "G": 2**30, "GIB": 2**30, "GB": 10**9, "T": 2**40, "TIB": 2**40, "TB": 10**12}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # "H100 (79.6 GiB)", "24.0 GiB", "this machine's RAM (23.4 GiB)"
    device: str  # "cuda" or "cpu": whose allocation rules the plan follows
    capacity: int  # bytes
    hopper: bool = True  # compute capability 9: decides fourbit's matmul routes
    headroom: float = HEADROOM

    @property
    def usable(self) -> int:
        return int(self.capacity * (1 - self.headroom))


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def parse_size(text: str, flag: str = "--gpu-memory") -> int:
    """Bytes of '24GiB', '80GB', '16000MiB', '24G' (K/M/G/T alone are binary); InvalidInput otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match[2].upper() if match else None
    if match is None or unit not in _UNITS or float(match[1]) <= 0:
        raise InvalidInput(f"{flag} {text!r} is not a memory size", "write a number and a unit, e.g. 24GiB, 80GB or 16000MiB")
    return int(float(match[1]) * _UNITS[unit])


def gpu_target(name: str) -> Target:
    key = name.strip().upper().replace(" ", "")
    key = _ALIASES.get(key, key)
    found = next((k for k in GPUS if k.upper() == key), None)
    if found is None:
        raise InvalidInput(f"--gpu {name!r} is not in the table ({', '.join(GPUS)})", "pick one of those, or give --gpu-memory SIZE")
    mib, major = GPUS[found]
    return Target(f"{found} ({mib / 1024:.1f} GiB)", "cuda", mib * 2**20, hopper=major == 9)


def memory_target(size: int) -> Target:
    return Target(format_bytes(size), "cuda", size)


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_target(device: str = "auto") -> Target:
    """This machine: its GPU (the memory free now) when the run would use it, else its available RAM."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return Target(f"{props.name} ({format_bytes(free)} free)", "cuda", free, hopper=props.major == 9)
    ram = _ram_bytes()
    return Target(f"this machine's RAM ({format_bytes(ram)} available)", "cpu", ram, headroom=0.0)
