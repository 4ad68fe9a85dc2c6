"""Progress of the run's long steps (the baseline pass, the auto importance matrix, the
default model's conversion): chunks (or tensors) done / total, elapsed time and ETA.

The steps call :func:`report` as they go; where the lines go is set once per process by the
plugin with :func:`set_writer` (pytest's terminal writer, nothing under ``-q``). Without a writer
(an xdist worker, whose terminal output pytest does not show, or a library use) nothing is
printed. Nothing here knows pytest.
"""

from __future__ import annotations

import time
from collections.abc import Callable

_writer: Callable[[str], None] | None = None

#: At most one line per step every this many seconds (the last one always shows).
MIN_INTERVAL_S = 2.0


def set_writer(write: Callable[[str], None] | None) -> None:
    """Send progress lines to ``write`` (one line per call, no newline), or nowhere (None)."""
    global _writer
    _writer = write


class Progress:
    """One long step's progress.

    Args:
        what: the step, as the line starts (``"baseline"``, ``"imatrix"``, ``"default model"``).
        total: units in the step (> 0); unit: their name (``"chunks"``, ``"tensors"``).
        clock: seconds (``time.perf_counter``; a test passes its own).
    """

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "chunks",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.what, self.total, self.unit, self.clock = what, total, unit, clock
        self.start = clock()
        self._shown = -MIN_INTERVAL_S

    def line(self, done: int) -> str:
        """``quantbench baseline: 3/8 chunks, 12.3 s elapsed, ETA 20.5 s``."""
        elapsed = self.clock() - self.start
        eta = f", ETA {elapsed / done * (self.total - done):.1f} s" if 0 < done < self.total else ""
        return (
            f"quantbench {self.what}: {done}/{self.total} {self.unit}, {elapsed:.1f} s elapsed{eta}"
        )

    def update(self, done: int) -> None:
        """Report that ``done`` units are finished (printed when a writer is set, at most every
        :data:`MIN_INTERVAL_S` seconds, and always for the last unit)."""
        if _writer is None:
            return
        now = self.clock() - self.start
        if done < self.total and now - self._shown < MIN_INTERVAL_S:
            return
        self._shown = now
        _writer(self.line(done))
