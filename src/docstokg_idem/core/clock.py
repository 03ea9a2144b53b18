"""The clock seam: every time read of the core goes through a :class:`Clock`.

Wall time (seconds since the epoch) is what lease and op expiries are stored in,
because several processes compare them. Monotonic time is for durations inside
one process (how long until I must renew). The two are kept apart: moving a fake
clock's wall time backwards never moves its monotonic time backwards (C14).

Worker processes share a fake clock through :class:`SharedClock`, a small file
of two doubles that every process maps; :func:`default_clock` picks it up from
``DOCSTOKG_IDEM_CLOCK_FILE`` so that fork, spawn and forkserver children all
read the same time.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Protocol

CLOCK_FILE_ENV = "DOCSTOKG_IDEM_CLOCK_FILE"

_PAIR = struct.Struct("<dd")


class Clock(Protocol):
    """What the core needs to know about time."""

    def wall(self) -> float:
        """Seconds since the epoch; used for expiries stored in the database."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; used for durations."""
        ...


class SystemClock:
    """The real clocks of this machine."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """An in-process clock that moves only when told to.

    ``advance(s)`` moves both clocks forward. ``move_to(t)`` sets wall time, in
    either direction; monotonic time follows only forward jumps.
    """

    def __init__(self, start: float = 1_700_000_000.0, monotonic_start: float = 0.0):
        self._wall = float(start)
        self._mono = float(monotonic_start)

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(
                f"advance() takes a non-negative number of seconds, got {seconds!r}; "
                "use move_to() to set wall time backwards"
            )
        self._set(self._wall + seconds, self._mono + seconds)

    def move_to(self, wall: float) -> None:
        self._set(float(wall), self._mono + max(0.0, wall - self._wall))

    def _set(self, wall: float, mono: float) -> None:
        self._wall, self._mono = wall, mono

    def __repr__(self) -> str:
        return f"{type(self).__name__}(wall={self._wall!r}, monotonic={self._mono!r})"


class SharedClock(FakeClock):
    """A fake clock kept in a file, so that every process reads the same time.

    Creating it with ``start`` writes the file; creating it without opens an
    existing one. Reads go through a shared memory map: no system call per read.
    """

    def __init__(self, path: str | os.PathLike[str], start: float | None = None):
        self.path = os.fspath(path)
        if start is not None:
            with open(self.path, "wb") as f:
                f.write(_PAIR.pack(float(start), 0.0))
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _PAIR.size)
        finally:
            os.close(fd)

    def wall(self) -> float:
        return float(_PAIR.unpack_from(self._map)[0])

    def monotonic(self) -> float:
        return float(_PAIR.unpack_from(self._map)[1])

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"advance() takes seconds >= 0, got {seconds!r}")
        wall, mono = _PAIR.unpack_from(self._map)
        self._set(wall + seconds, mono + seconds)

    def move_to(self, wall: float) -> None:
        old_wall, mono = _PAIR.unpack_from(self._map)
        self._set(float(wall), mono + max(0.0, wall - old_wall))

    def _set(self, wall: float, mono: float) -> None:
        _PAIR.pack_into(self._map, 0, wall, mono)

    def __repr__(self) -> str:
        return f"SharedClock({self.path!r}, wall={self.wall()!r})"


_default: Clock | None = None


def default_clock() -> Clock:
    """The process-wide clock: a :class:`SharedClock` if the environment names one."""
    global _default
    if _default is None:
        path = os.environ.get(CLOCK_FILE_ENV)
        _default = SharedClock(path) if path else SystemClock()
    return _default


def set_default_clock(clock: Clock | None) -> None:
    """Replace the process-wide clock; ``None`` goes back to the environment's."""
    global _default
    _default = clock
