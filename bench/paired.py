"""Paired timing rounds, the one way the sweep benchmarks time their variants on these shared,
noisy machines.

Each round runs every variant once, in turn, the order reversed every other round, so load that
comes and goes hits them alike; a speedup is the median over rounds of the per-round ratio (with
its range), in wall time and in process CPU time (which other processes inflate less).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def paired_rounds(variants: dict[str, Callable[[], object]], rounds: int, *, warm_up: bool = False) -> dict:
    """Time ``variants`` (name -> call) over ``rounds`` paired rounds.

    ``warm_up``: one untimed call of each first (the first call in a process pays one-time
    costs). Returns ``{"wall": {name: [s, ...]}, "cpu": {name: [s, ...]}, "outputs": {name:
    the first timed call's result}}``.
    """
    if warm_up:
        for run in variants.values():
            run()
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    outputs = {}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            _sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            out = variants[name]()
            _sync()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            outputs.setdefault(name, out)
    return {"wall": wall, "cpu": cpu, "outputs": outputs}


def ratios(times: dict[str, list[float]], slower: str, faster: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``times[slower][r] / times[faster][r]``."""
    each = [s / f for s, f in zip(times[slower], times[faster])]
    return statistics.median(each), min(each), max(each)


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}
