"""The matmul's tuning cache: configurations measured by `fourbit.kernels.matmul.tune`, on disk.

One JSON file (`tune_cache_path()`: FOURBIT_TUNE_CACHE, else ~/.cache/fourbit/matmul-tuning.json)
maps a key (op, M or its power-of-two bucket, N, K, dtype, nested, blocksize, architecture, Triton
version) to the configuration tuple `plan` then uses. Nothing is tuned implicitly: without an entry
the plan's rule applies, so a first call never benchmarks; under TRITON_INTERPRET=1 the cache is
ignored (the interpreter runs the rule's configurations, which the tests check).
"""

from __future__ import annotations

import json
import os

import triton

from ._triton_utils import interpreting

__all__ = ["tune_cache_path"]

_TUNE_TABLE: dict[str, list] | None = None


def tune_cache_path() -> str:
    """FOURBIT_TUNE_CACHE, else ~/.cache/fourbit/matmul-tuning.json: {key: config} from `tune`."""
    return os.environ.get("FOURBIT_TUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fourbit",
                                                                  "matmul-tuning.json")


def _key(key: tuple) -> str:
    return "|".join(str(p) for p in key) + f"|triton{triton.__version__}"


def _tuned(key: tuple) -> tuple | None:
    """The cached configuration for `key`; None under the interpreter or when never tuned."""
    if interpreting():
        return None
    hit = _table().get(_key(key))
    return tuple(hit) if hit else None


def _table() -> dict[str, list]:
    """The cache file's contents, read once per process."""
    global _TUNE_TABLE
    if _TUNE_TABLE is None:
        try:
            with open(tune_cache_path()) as f:
                _TUNE_TABLE = json.load(f)
        except (OSError, ValueError):
            _TUNE_TABLE = {}
    return _TUNE_TABLE


def _tune_store(key: tuple, candidates: list[tuple], time_of) -> tuple:
    """The candidate with the least time_of(candidate), written to the cache file under `key`
    (atomically: a temporary file, then a rename). The caller clears its cached plans."""
    best = min(candidates, key=time_of)
    table = _table()
    table[_key(key)] = list(best)
    path = tune_cache_path()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return best
