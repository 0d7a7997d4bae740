"""Which tile configuration the fused CUDA kernel uses for one GEMM shape on one device.

One configuration per device was wrong for small GEMMs: on an H100 (132 SMs), M=1024, N=1152 in
128x256 tiles is 40 CTAs, so 92 SMs sit idle. Per (device, dtype, M, N, K) the choice is:

1. a tuned table, measured on that device by ``benchmarks/tune_fused.py``: a JSON file named after
   the device (``nvidia-h100-80gb-hbm3.json``), read from ``$LYNX_COMPILE_CACHE/tuned/`` (default
   ``~/.cache/lynx_compile/tuned/``) and then from ``kernels/tuned/`` (shipped with the package). The
   first table that has the exact (dtype, N, K) decides, with the entry of the nearest M;
2. else a wave-quantization model (``heuristic``): a model, to be replaced by measurements.

The kernel's configurations come in as an argument, so that this module does not import the kernel.
A configuration needs ``name``, ``bm``, ``bn``, ``smem_bytes``, ``registers_per_cta`` and ``ctas(m, n)``
(the CTAs of its grid: a cluster rounds the N tiles up to whole clusters).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from . import cuda_rtc
from .contract import dtype_name

DTYPES = ("float16", "bfloat16")
REGISTERS_PER_SM = 64 * 1024      # sm_80 to sm_90
RESERVED_SMEM_PER_BLOCK = 1024    # what the driver keeps per resident CTA on sm_80+
SHIPPED_DIR = Path(__file__).with_name("tuned")
TABLE_KEYS = ("device", "date", "torch", "entries")
ENTRY_KEYS = ("dtype", "m", "n", "k", "config")


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    sm_count: int
    max_smem_per_block: int   # opt-in dynamic shared memory per block
    max_smem_per_sm: int
    capability: tuple[int, int] = (0, 0)  # which main loops can build (wgmma: 9.0)

    @classmethod
    def of(cls, device=None) -> DeviceInfo:
        props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
        per_block = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
        return cls(props.name, getattr(props, "multi_processor_count", 1), per_block,
                   getattr(props, "shared_memory_per_multiprocessor", per_block),
                   (getattr(props, "major", 0), getattr(props, "minor", 0)))


def device_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3": the tuned table's file stem."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_paths(device_name: str) -> tuple[Path, Path]:
    """Where the tuned table for a device is looked up, in order: the user's cache, then the package."""
    file_name = f"{device_slug(device_name)}.json"
    return cuda_rtc.cache_root() / "tuned" / file_name, SHIPPED_DIR / file_name


# ---- the model ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    ctas_per_sm: int
    tiles: int
    waves: int
    cost: int   # waves x ctas_per_sm x bm x bn: proportional to the predicted time


def fitting(configs, max_smem_per_block: int) -> tuple:
    return tuple(c for c in configs if c.smem_bytes <= max_smem_per_block)


def predict(device: DeviceInfo, config, m: int, n: int) -> Prediction:
    """The wave model for one configuration.

    An SM runs ``ctas_per_sm`` CTAs at once, as many as its shared memory and registers hold. The
    device runs ``sm_count x ctas_per_sm`` tiles per wave, and a wave takes as long as one SM needs
    for its ``ctas_per_sm`` tiles. The SM's throughput is taken to be the same for every
    configuration, so a wave costs ``ctas_per_sm x bm x bn``. K does not matter because every
    configuration has the same K tile. This ignores the re-reads of X and W, which are fewer with
    larger tiles. That is why ties go to the larger tile.
    """
    by_smem = device.max_smem_per_sm // (config.smem_bytes + RESERVED_SMEM_PER_BLOCK)
    ctas_per_sm = max(1, min(by_smem, REGISTERS_PER_SM // config.registers_per_cta))
    tiles = config.ctas(m, n)
    waves = -(-tiles // (device.sm_count * ctas_per_sm))
    return Prediction(ctas_per_sm, tiles, waves, waves * ctas_per_sm * config.bm * config.bn)


def heuristic(device: DeviceInfo, m: int, n: int, configs) -> tuple[object, str]:
    """The lowest predicted cost among ``configs`` that fit. Ties go to the larger tile, then to the earlier config."""
    candidates = fitting(configs, device.max_smem_per_block)
    if not candidates:
        raise ValueError(f"no tile configuration fits {device.max_smem_per_block} bytes of shared memory per block "
                         f"on {device.name}; the smallest needs {min(c.smem_bytes for c in configs)}")
    best = min(candidates, key=lambda c: (predict(device, c, m, n).cost, -c.bm * c.bn))
    p = predict(device, best, m, n)
    per_sm = f" x {p.ctas_per_sm} CTAs" if p.ctas_per_sm > 1 else ""
    return best, f"heuristic: {p.waves} wave{'s' * (p.waves != 1)} of {best.name} on {device.sm_count} SMs{per_sm}"


# ---- the tuned tables -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TunedEntry:
    dtype: str
    m: int
    n: int
    k: int
    config: str
    us: float | None = None


@lru_cache(maxsize=None)
def load_table(path: Path) -> tuple[TunedEntry, ...]:
    """The entries of one table file, () when there is none; a malformed file is a ValueError naming it."""
    if not path.is_file():
        return ()
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"tuned tile table {path} is not valid JSON: {exc}") from None
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise ValueError(f"tuned tile table {path}: expected an object with an 'entries' list")
    missing = [key for key in TABLE_KEYS if key not in table]
    if missing:
        raise ValueError(f"tuned tile table {path} lacks {', '.join(map(repr, missing))}")
    return tuple(_entry(path, i, item) for i, item in enumerate(table["entries"]))


def _entry(path: Path, i: int, item) -> TunedEntry:
    where = f"tuned tile table {path}, entry {i}"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
    missing = [key for key in ENTRY_KEYS if key not in item]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(map(repr, missing))}")
    if item["dtype"] not in DTYPES:
        raise ValueError(f"{where}: unknown dtype {item['dtype']!r}; dtypes: {', '.join(DTYPES)}")
    for key in ("m", "n", "k"):
        if type(item[key]) is not int or item[key] < 1:
            raise ValueError(f"{where}: {key}={item[key]!r} is not a positive integer")
    if not isinstance(item["config"], str):
        raise ValueError(f"{where}: config={item['config']!r} is not a name like '128x256x3'")
    return TunedEntry(item["dtype"], item["m"], item["n"], item["k"], item["config"], item.get("us"))


def tuned_entry(device_name: str, dtype: str, m: int, n: int, k: int) -> tuple[TunedEntry, Path] | None:
    """The entry for (dtype, N, K) with the nearest M in log2 distance (the larger M on a tie)."""
    for path in table_paths(device_name):
        entries = [e for e in load_table(path) if (e.dtype, e.n, e.k) == (dtype, n, k)]
        if entries:
            distance = lambda e: (abs(math.log2(e.m) - math.log2(max(m, 1))), -e.m)  # noqa: E731
            return min(entries, key=distance), path
    return None


# ---- the choice -----------------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def choose(device: DeviceInfo, dtype: torch.dtype, m: int, n: int, k: int, configs: tuple) -> tuple[object, str]:
    """(config, why) for one GEMM: the tuned entry if there is one and it is usable, else the model.

    Called at every launch, hence cached; tables are read once per process (``clear_cache`` re-reads).
    """
    note = ""
    hit = tuned_entry(device.name, dtype_name(dtype), m, n, k)
    if hit:
        entry, path = hit
        config = next((c for c in configs if c.name == entry.config), None)
        if config is not None and config.smem_bytes <= device.max_smem_per_block:
            return config, f"tuned: {path} (M={entry.m} entry)"
        why = (f"is not a tile configuration ({', '.join(c.name for c in configs)})" if config is None
               else f"needs {config.smem_bytes} bytes of shared memory, the device has {device.max_smem_per_block}")
        note = f"; ignored {path} (M={entry.m} entry): {entry.config} {why}"
    config, reason = heuristic(device, m, n, configs)
    return config, reason + note


def clear_cache() -> None:
    """Forget the loaded tables and the choices made from them (tests; after writing a table)."""
    load_table.cache_clear()
    choose.cache_clear()
