"""Structured telemetry events, sent to pluggable sinks.

Every event has an ``action`` (``planned``, ``leased``, ``state_changed``,
``renewed``, ``released``, ``lease_lost``, ``op_started``, ``op_completed``,
``op_failed``, ``op_replayed``, ``recovered``) and the fields that matter to an
operator: the job, the token, the state. With no sink installed, emitting costs
one truth test.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

logger = logging.getLogger("docstokg_idem")

ACTIONS = frozenset(
    {
        "planned",
        "leased",
        "state_changed",
        "renewed",
        "released",
        "lease_lost",
        "op_started",
        "op_completed",
        "op_failed",
        "op_replayed",
        "recovered",
    }
)


class Sink(Protocol):
    def __call__(self, event: dict[str, Any]) -> None: ...


class LoggingSink:
    """One log line per event: ``leased job=… token=3 state=LEASED owner=w1``."""

    def __init__(self, log: logging.Logger = logger, level: int = logging.INFO):
        self.log, self.level = log, level

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.log.isEnabledFor(self.level):
            return
        fields = " ".join(
            f"{k}={_short(k, v)}"
            for k, v in event.items()
            if k not in ("action", "pid") and v is not None
        )
        self.log.log(
            self.level,
            "%s %s",
            event["action"],
            fields,
            extra={"action": event["action"], "event": event},
        )


def _short(key: str, value: Any) -> Any:
    """Job keys are 64 hex digits; 12 name a job in a log line."""
    return value[:12] if key == "job" and isinstance(value, str) else value


class JsonLinesSink:
    """Appends one JSON object per event to a file; safe across processes.

    Each event is written with a single ``write`` on a file opened with
    ``O_APPEND``, so lines from several processes never interleave.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, sort_keys=True, default=str) + "\n"
        os.write(self._fd, line.encode())

    def close(self) -> None:
        os.close(self._fd)


class MemorySink:
    """Keeps events in a list; for tests."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)

    def actions(self) -> list[str]:
        return [e["action"] for e in self.events]

    def of(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["action"] == action]


_sinks: list[Sink] = []


def add_sink(sink: Sink) -> None:
    _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


@contextmanager
def capture_events() -> Iterator[MemorySink]:
    """Collect the events emitted inside the block."""
    sink = MemorySink()
    add_sink(sink)
    try:
        yield sink
    finally:
        remove_sink(sink)


def emit(action: str, **fields: Any) -> None:
    """Send one event to every sink. A failing sink never breaks the caller."""
    if not _sinks:
        return
    event = {"action": action, "pid": os.getpid(), **fields}
    for sink in list(_sinks):
        try:
            sink(event)
        except Exception:  # a broken sink must not undo a committed write
            logger.exception("telemetry sink %r failed on %s", sink, action)
