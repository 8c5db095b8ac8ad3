"""Peak memory of one piece of work: CUDA allocator peak, or sampled RSS above a baseline.

The RSS baseline should be taken once, when the worker is built (``rss_bytes()``), not at each
job's start: the allocator keeps pages from earlier jobs resident, so growth from a warm start
under-reports what a job needs (a device would have to hold those pages too).
"""

from __future__ import annotations

import threading

import psutil
import torch


class PeakMemory:
    """``with PeakMemory(base) as pm: ...`` then ``pm.peak_mib``: the most RSS above ``base`` (default:
    the RSS at entry) seen during the work."""

    def __init__(self, base_rss: int | None = None, interval_s: float = 0.005):
        self.base_rss = base_rss
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._cuda = torch.cuda.is_available()

    def _sample(self, process: psutil.Process, base: int) -> None:
        peak = 0
        while not self._stop.wait(self.interval_s):
            peak = max(peak, process.memory_info().rss - base)
        self._rss_peak = max(peak, process.memory_info().rss - base)

    def __enter__(self) -> PeakMemory:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        process = psutil.Process()
        base = process.memory_info().rss if self.base_rss is None else self.base_rss
        self._thread = threading.Thread(target=self._sample, args=(process, base), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._cuda:
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._cuda_base) / 2**20
        else:
            self.peak_mib = max(0, self._rss_peak) / 2**20


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss
