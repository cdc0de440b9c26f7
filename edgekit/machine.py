"""Where a number was measured: the machine and the library versions.

Recorded with every report so a benchmark can be reproduced (or explained).
Nothing here imports the measured libraries; versions come from package metadata.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

# CPU features that decide which kernels a runtime can use.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "neon", "asimd", "asimddp", "i8mm")
PACKAGES = ("edgekit", "torch", "onnx", "onnxruntime", "numpy", "transformers", "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "apache-tvm")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, relevant CPU flags, memory, OS, Python and host name."""
    cpu, flags = _cpuinfo()
    return {
        "cpu": cpu or platform.processor() or platform.machine() or "unknown",
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "memory_gb": _memory_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


def versions() -> dict[str, str | None]:
    """Installed versions of edgekit and the libraries it measures (None when absent)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _cpuinfo() -> tuple[str | None, set[str]]:
    """Model name and feature flags from /proc/cpuinfo (Linux; x86 and ARM spellings)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return None, set()
    model = None
    flags: set[str] = set()
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)  # kB -> GiB
    except OSError:
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        return None


def cpu_ticks() -> tuple[int, int, int] | None:
    """(busy CPU time of the whole machine, all CPU time of the machine, CPU time of this process),
    in clock ticks from /proc; None where /proc is missing. Benchmarks diff two readings to see how
    much of the machine other processes used meanwhile."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    return sum(v) - v[3] - v[4], sum(v), int(own[11]) + int(own[12])  # minus idle and iowait; utime + stime
