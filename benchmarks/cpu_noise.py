"""CPU noise: how much of the machine other processes took while a benchmark ran.

Pairing evens out short busy spells, not long ones, so each benchmark reports this share and warns
past 10%: rerun when the machine is idle.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_snapshot() -> tuple[int, int, float]:
    """(busy, total) CPU ticks of the whole machine, and this process's CPU seconds."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:  # not Linux: others' share reads 0
        ticks = [0] * 5
    own = os.times()
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks), own.user + own.system


def others_cpu_share(start: tuple[int, int, float]) -> float:
    """Share of all CPUs' time since `start` that other processes used: the noise pairing faces."""
    busy, total, own = (b - a for a, b in zip(start, cpu_snapshot(), strict=True))
    return max(0.0, busy / total - own * os.sysconf("SC_CLK_TCK") / total) if total else 0.0
