"""What the plugin's fixtures hand to a test: the gate, the clock, the faults.

Each works in the test's own process and reaches the worker processes it
starts: through environment variables a child inherits, or through the shared
clock file. Nothing is global across tests, so tests run in parallel under
xdist never see each other's settings.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..core.clock import CLOCK_FILE_ENV, SharedClock, set_default_clock
from ..core.crashpoints import (
    CRASH_POINTS,
    FAULTS_ENV,
    Fault,
    arm,
    disarm,
    ensure_declared,
)
from ..core.gate import GATE_ENV, idempotency_enabled


class FeatureGate:
    """Sets ``DOCSTOKG_ENABLE_IDEMPOTENCY`` for the test and its children; restores it."""

    def __init__(
        self, setenv: Callable[[str, str], None], delenv: Callable[[str], None]
    ):
        self._setenv, self._delenv = setenv, delenv

    def enable(self) -> None:
        self._setenv(GATE_ENV, "1")

    def disable(self) -> None:
        self._setenv(GATE_ENV, "0")

    def set(self, value: str | bool | None) -> None:
        """Set any raw value (even an invalid one, to test the error); None unsets."""
        if value is None:
            self._delenv(GATE_ENV)
        elif isinstance(value, bool):
            self._setenv(GATE_ENV, "1" if value else "0")
        else:
            self._setenv(GATE_ENV, value)

    @property
    def enabled(self) -> bool:
        return idempotency_enabled()


class FakeClock:
    """Wall and monotonic time that move only when the test says so.

    The core and every worker process started after this fixture read it
    through a shared file (``DOCSTOKG_IDEM_CLOCK_FILE``). In the test's own
    process, freezegun freezes ``time.time()`` and ``datetime.now()`` at the
    same wall time, while ``time.monotonic()`` follows this clock's monotonic
    time, which never goes back even when wall time is moved back (C14).
    """

    def __init__(self, path: Path, start: float):
        self.shared = SharedClock(path, start=start)
        self.path = str(path)
        self._freezer: Any = None
        self._frozen: Any = None
        self._saved_monotonic: Callable[[], float] | None = None

    def wall(self) -> float:
        return self.shared.wall()

    def monotonic(self) -> float:
        return self.shared.monotonic()

    def advance(self, seconds: float) -> None:
        """Move wall and monotonic time forward."""
        self.shared.advance(seconds)
        self._sync()

    def move_to(self, wall: float | dt.datetime) -> None:
        """Set wall time (either direction); monotonic time only follows forward."""
        if isinstance(wall, dt.datetime):
            wall = wall.timestamp()
        self.shared.move_to(float(wall))
        self._sync()

    def _sync(self) -> None:
        if self._frozen is not None:
            self._frozen.move_to(dt.datetime.fromtimestamp(self.shared.wall(), dt.UTC))
            time.monotonic = self.shared.monotonic  # freezegun's move_to re-derives it

    def start(self) -> None:
        import freezegun

        self._freezer = freezegun.freeze_time(
            dt.datetime.fromtimestamp(self.shared.wall(), dt.UTC)
        )
        self._frozen = self._freezer.start()
        self._saved_monotonic = time.monotonic
        time.monotonic = self.shared.monotonic
        set_default_clock(self.shared)

    def stop(self) -> None:
        set_default_clock(None)
        if self._saved_monotonic is not None:
            time.monotonic = self._saved_monotonic
        if self._freezer is not None:
            self._freezer.stop()
        self._freezer = self._frozen = None

    def env(self) -> dict[str, str]:
        return {CLOCK_FILE_ENV: self.path}

    def __repr__(self) -> str:
        return f"FakeClock(wall={self.wall()!r}, monotonic={self.monotonic()!r})"


class FaultInjector:
    """Arms declared crash points for this test's own worker processes.

    ``arm("stream.after_chunk", action="kill", hit=2, worker="w0")`` records a
    fault; :meth:`for_worker` gives the specs a pool hands to one worker, and
    :meth:`env` the environment for a process started by hand. With
    ``in_process=True`` the fault is armed in the test's process too.
    """

    def __init__(self) -> None:
        self.faults: list[Fault] = []
        self._in_process = False

    def arm(
        self,
        point: str,
        action: str = "kill",
        *,
        hit: int = 1,
        worker: str | None = None,
        arg: float = 0.0,
        in_process: bool = False,
    ) -> Fault:
        ensure_declared(point)
        fault = Fault(point=point, action=action, hit=hit, worker=worker, arg=arg)
        self.faults.append(fault)
        if in_process:
            arm([f for f in self.faults], worker=None)
            self._in_process = True
        return fault

    @staticmethod
    def points() -> list[str]:
        return sorted(CRASH_POINTS)

    def for_worker(self, owner: str) -> list[dict[str, Any]]:
        return [f.to_mapping() for f in self.faults if f.worker in (None, owner)]

    def by_index(self, workers: int) -> dict[int, list[dict[str, Any]]]:
        return {i: self.for_worker(f"w{i}") for i in range(workers)}

    def env(self) -> dict[str, str]:
        return {FAULTS_ENV: json.dumps([f.to_mapping() for f in self.faults])}

    def clear(self) -> None:
        self.faults.clear()
        if self._in_process:
            disarm()
            self._in_process = False


@contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for a block, restoring them after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
