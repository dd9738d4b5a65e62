"""Time of stretches of device work (e.g. the validation forward passes of an epoch) without a
host synchronisation per stretch: on a GPU, a pair of CUDA events is recorded around each stretch
and the elapsed times are read once, at the end (``seconds``); on the CPU, wall time."""

from __future__ import annotations

import time

import torch


class DeviceTimer:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._open: torch.cuda.Event | float | None = None
        self._wall = 0.0
        self.count = 0

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open = event
        else:
            self._open = time.perf_counter()

    def stop(self) -> None:
        if self._open is None:
            return
        if isinstance(self._open, float):
            self._wall += time.perf_counter() - self._open
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._open, end))
        self._open = None
        self.count += 1

    def seconds(self) -> float:
        """The summed time; waits for the last recorded event (call it at the end of an epoch)."""
        if self._events:
            self._events[-1][1].synchronize()
        return self._wall + sum(start.elapsed_time(end) for start, end in self._events) / 1000.0

    # CUDA events cannot be pickled / deep-copied: a copy starts empty
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.reset()
