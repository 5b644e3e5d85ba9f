"""The GPU memory a worker holds, as torch's allocator counts it, reported with each result.

Status views show it per worker (``gpu_memory``), so a notebook author sees which worker
keeps a model on its GPU. Only torch is asked, and only once the job's code has imported it
and initialised CUDA: this module never imports torch itself (a worker without torch pays
one dictionary lookup per job).
"""

from __future__ import annotations

import sys
from typing import Any


def gpu_memory() -> dict[str, int] | None:
    """{"allocated_bytes", "reserved_bytes", "devices"} over this process's visible devices,
    or None when torch has not initialised CUDA here."""
    torch = sys.modules.get("torch")
    cuda: Any = getattr(torch, "cuda", None) if torch is not None else None
    if cuda is None:
        return None
    try:
        if not cuda.is_initialized():
            return None
        n = int(cuda.device_count())
        return {
            "allocated_bytes": sum(int(cuda.memory_allocated(i)) for i in range(n)),
            "reserved_bytes": sum(int(cuda.memory_reserved(i)) for i in range(n)),
            "devices": n,
        }
    except Exception:  # a broken driver must not cost the job its result
        return None


def note(done: dict[str, Any]) -> dict[str, Any]:
    """Add the figures to a ``done`` frame's metadata when there are any."""
    mem = gpu_memory()
    if mem is not None:
        done["gpu_mem"] = mem
    return done
