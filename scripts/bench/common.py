"""What every suite shares: paths, and measuring a call (time, CPU, peak RSS, passes) with the
items of a section interleaved over rounds."""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

from featcircuits.tracing import SplicedModel


ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_THREADS = torch.get_num_threads()  # torch's own default, before --threads
OUT_DEFAULT = ROOT / "results" / "benchmarks"
RESULTS_README = ROOT / "results" / "README.md"
TASK = "sva-simple"

# --------------------------------------------------------------------------------------
# Measuring


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class PeakRSS:
    """Peak resident set size of this process while the block runs (psutil polling)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.proc = psutil.Process()
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        _malloc_trim()
        self.base = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(fn: Callable[[], Any]) -> tuple[dict, Any]:
    """Run ``fn`` once: wall and CPU seconds, peak RSS and its growth, load average."""
    load0 = os.getloadavg()[0]
    with PeakRSS() as mem:
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rec = {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "peak_rss_mib": round(mem.peak / 2**20, 1),
           "rss_growth_mib": round((mem.peak - mem.base) / 2**20, 1),
           "load1": round((load0 + os.getloadavg()[0]) / 2, 2)}
    return rec, out


def counted(sm: SplicedModel, n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap ``fn`` so that its result carries the passes it made (calls and rows per example)."""

    def run():
        c0 = sm.counters()
        out = fn()
        c1 = sm.counters()
        d = [b - a for a, b in zip(c0, c1)]
        return out, {"forward_calls": d[0], "backward_calls": d[1],
                     "forward_per_example": round(d[2] / n, 3), "backward_per_example": round(d[3] / n, 3)}

    return run


def interleaved(items: dict[str, Callable[[], Any]], rounds: int, repeats: dict[str, int] | None = None,
                log: Callable[[str], None] = print, keep: set[str] | None = None) -> dict[str, dict]:
    """Run every item once per round, the order rotated by the round; collect the records.

    ``repeats[name]`` caps how many rounds an (expensive) item takes part in. The value
    returned by the first run of each item in ``keep`` is kept under ``result``."""
    names = list(items)
    out: dict[str, dict] = {n: {"runs": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if repeats and r >= repeats.get(name, rounds):
                continue
            rec, value = measure(items[name])
            passes = None
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict) and "forward_calls" in value[1]:
                value, passes = value
            rec["round"] = r
            out[name]["runs"].append(rec)
            if passes is not None:
                out[name]["passes"] = passes
            if keep and name in keep and "result" not in out[name]:
                out[name]["result"] = value
            del value
            log(f"    {name:<28} round {r}: {rec['wall_s']:8.3f} s wall  {rec['cpu_s']:8.3f} s cpu  "
                f"peak {rec['peak_rss_mib']:7.0f} MiB (+{rec['rss_growth_mib']:.0f})  load {rec['load1']}")
    for name, d in out.items():
        runs = d["runs"]
        if runs:
            d["median_wall_s"] = round(statistics.median(r["wall_s"] for r in runs), 4)
            d["median_cpu_s"] = round(statistics.median(r["cpu_s"] for r in runs), 4)
            d["max_peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
            d["median_rss_growth_mib"] = round(statistics.median(r["rss_growth_mib"] for r in runs), 1)
            d["n_runs"] = len(runs)
    return out


def round_ratio(res: dict[str, dict], num: str, den: str, key: str = "wall_s") -> dict | None:
    """Median over rounds of num/den, each ratio taken within one round (same background load)."""
    if num not in res or den not in res:
        return None
    a = {r["round"]: r[key] for r in res[num]["runs"]}
    b = {r["round"]: r[key] for r in res[den]["runs"]}
    per = [a[k] / b[k] for k in sorted(set(a) & set(b)) if b[k] > 0]
    if not per:  # different rounds (an item capped to fewer repeats): ratio of medians
        if not a or not b:
            return None
        return {"median": round(statistics.median(a.values()) / statistics.median(b.values()), 4),
                "per_round": [], "how": "ratio of medians (no common round)"}
    return {"median": round(statistics.median(per), 4), "per_round": [round(x, 4) for x in per],
            "how": "median of per-round ratios"}


def strip_results(res: dict[str, dict]) -> dict[str, dict]:
    return {k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in res.items()}
