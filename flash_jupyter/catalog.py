"""GPU and CPU types: names, aliases, memory and per-second flex prices.

Data only. Prices are Runpod's published serverless flex prices per second (2026); they
date, so the date travels with them (``PRICES_AS_OF``) and every cost figure derived from
them says which list it came from.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

PRICES_AS_OF = "2026-01"
CURRENCY = "USD"


def money(x: float | None) -> str:
    """US dollars as a person reads them: $1,234.50, $0.25, and two significant digits below
    a dollar ($0.012, $0.000019), never an exponent. None: "-"."""
    if x is None:
        return "-"
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return "$0" if x == 0 else f"${x}"
    if abs(x) >= 1:
        return f"${x:,.2f}"
    digits = max(2, 1 - math.floor(math.log10(abs(x))))
    text = f"{x:.{digits}f}"
    return "$" + (text.rstrip("0") if digits > 2 else text)


@dataclass(frozen=True)
class HardwareType:
    """One kind of hardware a worker can ask for."""

    name: str  # canonical name, as status views show it
    kind: str  # "gpu" or "cpu"
    memory_gb: int  # GPU memory (gpu) or RAM (cpu)
    price_per_second: float  # USD, flex (scale-to-zero) price
    aliases: tuple[str, ...] = ()
    # Substrings of `nvidia-smi --query-gpu=name` that identify this type on a real host.
    smi_names: tuple[str, ...] = ()
    vcpus: int = 0


GPUS: tuple[HardwareType, ...] = (
    HardwareType("RTX A4000", "gpu", 16, 0.00016, ("A4000",), ("RTX A4000",)),
    HardwareType("RTX A4500", "gpu", 20, 0.00016, ("A4500",), ("RTX A4500",)),
    HardwareType("RTX 4000 Ada", "gpu", 20, 0.00016, ("RTX4000", "RTX 4000"), ("RTX 4000 Ada",)),
    HardwareType("L4", "gpu", 24, 0.00019, (), ("L4",)),
    HardwareType("RTX A5000", "gpu", 24, 0.00019, ("A5000",), ("RTX A5000",)),
    HardwareType("RTX 3090", "gpu", 24, 0.00019, ("3090", "RTX3090"), ("RTX 3090",)),
    HardwareType(
        "RTX 4090", "gpu", 24, 0.00031, ("4090", "RTX4090", "RTX 4090 PRO"), ("RTX 4090",)
    ),
    HardwareType("RTX A6000", "gpu", 48, 0.00034, ("A6000",), ("RTX A6000",)),
    HardwareType("A40", "gpu", 48, 0.00034, (), ("A40",)),
    HardwareType("L40", "gpu", 48, 0.00053, (), ("L40",)),
    HardwareType("L40S", "gpu", 48, 0.00053, (), ("L40S",)),
    HardwareType("RTX 6000 Ada", "gpu", 48, 0.00053, ("6000ADA", "RTX6000"), ("RTX 6000 Ada",)),
    HardwareType("A100", "gpu", 80, 0.00076, ("A100-80GB", "A100 80GB"), ("A100",)),
    HardwareType("H100", "gpu", 80, 0.00116, ("H100 PRO", "H100-80GB"), ("H100",)),
    HardwareType("H200", "gpu", 141, 0.00155, ("H200 PRO",), ("H200",)),
    HardwareType("B200", "gpu", 180, 0.00240, (), ("B200",)),
)

# Runpod serverless CPU flavours (compute-optimised and general purpose), priced per vCPU.
CPUS: tuple[HardwareType, ...] = (
    HardwareType("cpu3c-1-2", "cpu", 2, 0.0000186, ("cpu",), vcpus=1),
    HardwareType("cpu3c-2-4", "cpu", 4, 0.0000372, (), vcpus=2),
    HardwareType("cpu3c-4-8", "cpu", 8, 0.0000744, (), vcpus=4),
    HardwareType("cpu3c-8-16", "cpu", 16, 0.0001488, (), vcpus=8),
    HardwareType("cpu3g-2-8", "cpu", 8, 0.0000464, (), vcpus=2),
    HardwareType("cpu3g-4-16", "cpu", 16, 0.0000928, (), vcpus=4),
    HardwareType("cpu3g-8-32", "cpu", 32, 0.0001856, (), vcpus=8),
)

DEFAULT_CPU = "cpu3c-2-4"


def _key(s: str) -> str:
    return re.sub(r"[\s_\-]", "", s).upper()


_BY_KEY: dict[str, HardwareType] = {}
for _hw in GPUS + CPUS:
    for _n in (_hw.name, *_hw.aliases):
        _BY_KEY.setdefault(_key(_n), _hw)
_BY_KEY.setdefault("A10080GB", _BY_KEY["A100"])


def lookup(name: str, kind: str | None = None) -> HardwareType:
    """Find a GPU or CPU type by name or alias (case, spaces and dashes ignored).

    Raises ValueError listing the known names when nothing matches.
    """
    hw = _BY_KEY.get(_key(name))
    if hw is None and kind != "cpu":
        hw = match_smi_name(name)  # "NVIDIA A100-SXM4-80GB", as nvidia-smi names them
    if hw is None or (kind is not None and hw.kind != kind):
        pool = GPUS if kind != "cpu" else CPUS
        known = ", ".join(h.name for h in pool)
        what = "GPU" if kind != "cpu" else "CPU"
        raise ValueError(f"unknown {what} type {name!r}; known: {known}")
    return hw


def match_smi_name(smi_name: str) -> HardwareType | None:
    """Map an ``nvidia-smi`` device name to a catalogue type (longest match wins)."""
    best: HardwareType | None = None
    best_len = 0
    for hw in GPUS:
        for pat in hw.smi_names:
            word = rf"(?<![A-Za-z0-9]){re.escape(pat)}(?![A-Za-z0-9])"
            if len(pat) > best_len and re.search(word, smi_name, re.I):
                best, best_len = hw, len(pat)
    return best
