"""The sampler: reads every sensor every ~10 ms into a trace.

On a real GPU it is a daemon thread on wall time; on the simulator it is driven by the
virtual clock (SimGpu.schedule_every), so the same harness code runs on both.

The thread spends its time waiting; NVML calls release the GIL (ctypes), so a decode loop
that launches CUDA graphs from the main thread is slowed by well under 1%
(benchmarks/sampler_overhead.py measures it). A failed reading (a transient NVML error) is
counted and skipped rather than ending the trace.
"""

from __future__ import annotations

import statistics
import threading
import time

import pandas as pd

from phasewatt.gpu.base import Sample

TRACE_COLUMNS = list(Sample.__dataclass_fields__)


class Sampler:
    def __init__(self, gpu, interval_s: float = 0.01):
        self.gpu = gpu
        self.interval_s = float(interval_s)
        self.samples: list[Sample] = []
        self.read_seconds = 0.0  # wall time spent reading sensors (overhead accounting)
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        self._lock = threading.Lock()

    def _take(self) -> None:
        sample = self.gpu.sample()
        with self._lock:
            self.samples.append(sample)

    def start(self) -> "Sampler":
        if getattr(self.gpu, "virtual_time", False):
            self._handle = self.gpu.schedule_every(self.interval_s, self._take)
        else:
            self._thread = threading.Thread(target=self._run, name="phasewatt-sampler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        next_due = time.perf_counter()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self._take()
            except Exception as err:  # one bad reading must not end the trace
                self.errors += 1
                self.last_error = f"{type(err).__name__}: {err}"
            self.read_seconds += time.perf_counter() - t0
            next_due += self.interval_s
            delay = next_due - time.perf_counter()
            if delay < 0:  # fell behind (slow NVML call): skip, do not burst
                next_due = time.perf_counter()
                delay = 0
            self._stop.wait(delay)

    def stop(self) -> None:
        if self._handle is not None:
            self.gpu.cancel(self._handle)
            self._handle = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def stats(self) -> dict:
        """How the sampling went: count, cost of a reading, achieved period, failures."""
        times = [s.t_s for s in self.snapshot()]
        gaps = [b - a for a, b in zip(times, times[1:])]
        return {
            "interval_s": self.interval_s,
            "samples": len(times),
            "read_seconds": self.read_seconds,
            "mean_read_ms": 1000.0 * self.read_seconds / len(times) if times else None,
            "median_gap_s": statistics.median(gaps) if gaps else None,
            "max_gap_s": max(gaps) if gaps else None,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    def between(self, t0: float, t1: float) -> list[Sample]:
        return [s for s in self.snapshot() if t0 <= s.t_s <= t1]

    def frame(self, t_origin: float = 0.0) -> pd.DataFrame:
        rows = [s.as_row() for s in self.snapshot()]
        frame = pd.DataFrame(rows, columns=TRACE_COLUMNS)
        frame["t_s"] = frame["t_s"] - t_origin
        return frame

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
