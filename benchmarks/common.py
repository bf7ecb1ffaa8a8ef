"""Shared helpers for the benchmark scripts: median timing, machine description, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def parser(description: str, clock: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, help="write results to this JSON file")
    p.add_argument("--quick", action="store_true", help="small sizes, finishes in under a minute")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores; 1 with --quick, which must stay fast on a busy machine)")
    if clock:
        p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                       help="wall: elapsed time (default). cpu: this process's CPU time, which leaves out the "
                            "time other jobs hold the cores on a shared machine; needs --threads 1")
    return p


_clock = time.perf_counter
_load_at_start: tuple[float, float, float] | None = None


def clock() -> float:
    """The timer chosen by --clock (wall time unless ``setup`` was given --clock cpu)."""
    return _clock()


def setup(args: argparse.Namespace) -> None:
    global _clock, _load_at_start
    _load_at_start = os.getloadavg()  # 1/5/15-minute load averages: how busy the machine was
    if args.quick and not args.threads:
        # Two threads on a 2-core machine that other jobs are using oversubscribe the cores: OpenMP
        # then takes 10x longer, and the quick scan/decode runs took 1-2 minutes instead of ~10 s.
        args.threads = 1
    if getattr(args, "clock", "wall") == "cpu":
        if args.threads != 1:
            raise SystemExit("--clock cpu sums the CPU time of all threads; use it with --threads 1")
        _clock = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def interleaved_seconds(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time every function once per round, round after round: {name: [seconds per round]}.

    On a shared machine the speed drifts by tens of percent over a minute; timing A five times and then
    B five times puts that drift into the A/B ratio, timing them in turns spreads it over both.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (times taken in the same round)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "clock": "cpu" if _clock is time.process_time else "wall",
            "load_average_start": _load_at_start, "load_average_end": os.getloadavg(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def emit(args: argparse.Namespace, results: dict) -> None:
    results = {"machine": machine(), "quick": bool(args.quick), **results}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
