"""What a figure was measured on: CPU model, the SIMD / matrix extensions that decide which
kernels XLA's CPU backend can use, cores and RAM. One reader for every benchmark and report:
the machines this project runs on change between sessions (an AVX-512 AMD EPYC one day, an
AMX-capable Intel Xeon the next), and a speed figure means little without them."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# Flags that change which matmul kernels are available (AMX: bf16/int8 tiles; avx512_bf16: bf16 dot).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_facts() -> dict[str, Any]:
    """``{"cpu": model name, "simd": [flags of SIMD_FLAGS present], "cores": n, "ram_gib": x}``;
    fields this OS does not expose fall back to ``platform`` values (or None)."""
    cpu, simd = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
        flags = set(next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), []))
        simd = [f for f in SIMD_FLAGS if f in flags]
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = None
    return {"cpu": cpu, "simd": simd, "cores": os.cpu_count(),
            "ram_gib": round(ram, 1) if ram is not None else None}


def describe() -> str:
    """One line for a report: ``host: CPU [simd], N cores, X GiB RAM``."""
    f = cpu_facts()
    ram = f"{f['ram_gib']:.0f} GiB RAM" if f["ram_gib"] is not None else "RAM unknown"
    return f"{platform.node()}: {f['cpu']} [{' '.join(f['simd']) or 'no SIMD flags read'}], {f['cores']} cores, {ram}"


__all__ = ["SIMD_FLAGS", "cpu_facts", "describe"]
