"""Peak memory of one piece of work: CUDA allocator peak, or sampled RSS above the start."""

from __future__ import annotations

import threading

import psutil
import torch


class PeakMemory:
    """``with PeakMemory() as pm: ...`` then ``pm.peak_mib``: the most the work added."""

    def __init__(self, interval_s: float = 0.005):
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
        self._thread = threading.Thread(target=self._sample, args=(process, process.memory_info().rss), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._cuda:
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._cuda_base) / 2**20
        else:
            self.peak_mib = max(0, self._rss_peak) / 2**20
