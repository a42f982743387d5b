"""Resource measurement: a process's own peak memory (and CUDA's on a GPU).

``VmHWM`` from ``/proc/self/status`` on Linux is the calling process's own peak; ``ru_maxrss``
survives ``exec`` (a child started by a parent at 1.5 GB reads 1.5 GB there), so it is only the
fallback where there is no ``/proc``.
"""
from __future__ import annotations

import resource
import sys
from typing import Any, Iterable, Optional

def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory(device: Any = None) -> dict[str, int]:
    """Peak memory of THIS process, in bytes: ``peak_rss`` (``VmHWM``; ``ru_maxrss`` where there is
    no ``/proc``), and on CUDA ``cuda_max_allocated`` / ``cuda_max_reserved``."""
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kib //= 1024  # bytes there
    out = {"peak_rss": int(kib) * 1024}
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        out["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated(device))
        out["cuda_max_reserved"] = int(torch.cuda.max_memory_reserved(device))
    return out


def peak_megabytes(mem: dict) -> float:
    """The figure a table shows: CUDA max allocated on a GPU, else the process peak RSS."""
    return mem.get("cuda_max_allocated", mem.get("peak_rss", 0)) / 2**20


def trainable_parameters(*modules: Any) -> int:
    """Trainable (``requires_grad``) parameters of modules or parameter lists; None counts 0."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        if m is None:
            continue
        params: Iterable = m.parameters() if hasattr(m, "parameters") else m
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
