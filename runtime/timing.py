"""Timing the way a layer runs inside a model: its weights stream from memory (a model's weights
outgrow the caches), so every timed call reads a different copy from a rotation larger than the
last-level cache; variants are timed interleaved and compared by their medians."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def l3_bytes(default: int = 32 * 2**20, root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest level-3 cache cpu0 reports in sysfs (a VM may report a whole socket's), or
    ``default`` where sysfs has none. Benchmarks stream more than 4x this so they measure memory."""
    sizes = []
    for index in Path(root).glob("index*"):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes) if sizes else default


L3_BYTES = l3_bytes()
# per-layer decisions rotate through twice the L3, within 64-256 MiB (a VM may report a whole
# socket's L3; the benchmarks use 4x the L3 whatever it is)
DECISION_ROTATE_BYTES = min(max(2 * L3_BYTES, 64 * 2**20), 256 * 2**20)


def copies_for(nbytes: int, rotate: int, cap: int = 256) -> int:
    """How many copies of ``nbytes`` of weights make a rotation of ``rotate`` bytes."""
    return max(2, min(cap, math.ceil(rotate / max(nbytes, 1))))


def interleaved_medians(
    calls: list[Callable[[], None]], trials: int = 9, paired: bool = False, block: int = 1
) -> list[float]:
    """Milliseconds of each call: the median of ``trials`` timings, the calls interleaved so that
    machine noise hits them alike (after one warm-up call each). With ``paired`` (calls into
    different engines) each timed call follows an untimed call of the same callable: engines'
    worker threads spin for a while after a parallel section (onnxruntime's intra-op pool, TVM's
    thread pool), and a call started meanwhile shares the cores with them (measured here with 2
    threads on 2 cores: a TVM build timed right after onnxruntime ran 9x slower), so the untimed
    call takes that hit and the timed one runs as it would alone. With ``block`` > 1 each turn
    of a callable is ``block`` timed calls back to back (after the untimed one when ``paired``):
    each engine runs as it would alone, its thread pool awake, while the rounds still spread
    the machine's slow and fast phases over all of them."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    rounds = max(1, math.ceil(trials / block))
    for _ in range(rounds):
        for i, call in enumerate(calls):
            if paired:
                call()
            for _ in range(block):
                t0 = time.perf_counter()
                call()
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]
