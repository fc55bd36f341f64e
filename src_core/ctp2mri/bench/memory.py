"""Peak-memory measurement and page-cache control for honest benchmark numbers."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any


def drop_from_page_cache(path: Path) -> bool:
    """Evict one file from the page cache so the benchmark reads it from disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True


class PeakMemory:
    """Peak resident memory of this process during a ``with`` block.

    The kernel's own high-water mark (VmHWM, reset through /proc/self/clear_refs) is exact;
    a sampling thread additionally tracks anonymous memory (RSS minus file-backed pages,
    i.e. without the memory-mapped input, which the kernel can drop at any time).
    """

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak_rss = self.peak_anon = self.baseline_rss = 0
        self.kernel_peak: int | None = None
        self._reset = False
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            info = self._proc.memory_info()
            self.peak_rss = max(self.peak_rss, info.rss)
            self.peak_anon = max(self.peak_anon, info.rss - getattr(info, "shared", 0))
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.baseline_rss = self._proc.memory_info().rss
        try:  # "5" resets the kernel's peak-RSS counter (Linux ≥ 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = True
        except OSError:
            pass
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if self._reset:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.kernel_peak = int(line.split()[1]) * 1024
        self.peak_rss = max(self.peak_rss, self.kernel_peak or 0)
