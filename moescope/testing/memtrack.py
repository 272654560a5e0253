"""Anonymous memory of this process (RssAnon): what it allocated, not the file pages it maps.

Peak RSS (VmHWM) counts the pages of memory-mapped checkpoint files a pass touches; those belong to the page
cache, not to the program. RssAnon counts heap, stacks and other anonymous mappings only, so it is what tests
and benchmarks of memory bounds measure.
"""
from __future__ import annotations

import threading
import time


def rss_anon(pid: int | str = "self") -> int:
    """RssAnon of process ``pid`` in bytes (Linux ``/proc/PID/status``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/{pid}/status has no RssAnon line")


class PeakRssAnon:
    """Within ``with``, sample this process's RssAnon every ``interval`` seconds on a thread; ``growth`` is then
    the highest sample minus the value on entry."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRssAnon":
        self.baseline = self.peak = rss_anon()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())

    @property
    def growth(self) -> int:
        return max(self.peak - self.baseline, 0)
