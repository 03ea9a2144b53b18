"""Named crash points: places where the harness may kill, pause, delay or fail.

Every point is declared once, in :data:`CRASH_POINTS`, as ``<phase>.<moment>``
with a sentence saying where it sits. Code marks the place with
``crashpoint("stream.after_chunk")``. Disarmed (the normal case) a call costs
one global truth test.

A process is armed from ``DOCSTOKG_IDEM_FAULTS`` (a JSON list of fault specs, or
``@path`` of a file holding one) when this module is imported, or by
:func:`arm`. A hook installed with :func:`set_hook` sees every point reached;
the harness uses it to hold workers at scheduling points and to count coverage.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import CrashPointFired, UnknownCrashPoint

FAULTS_ENV = "DOCSTOKG_IDEM_FAULTS"
WORKER_ENV = "DOCSTOKG_IDEM_WORKER"

#: Every declared crash point, with where it sits. The one registry.
CRASH_POINTS: dict[str, str] = {
    "claim.after_commit": "a lease was claimed and committed; no work done yet",
    "state.after_commit": (
        "advance_state() committed a state change (moves made with an op record "
        "commit with it and pass op.after_record instead)"
    ),
    "op.after_start": "an op's in-progress record committed; its effect not run",
    "op.after_effect": "an op's effect ran; its result is not recorded yet",
    "op.after_record": "an op's result record committed",
    "renew.before": "a lease renewal is about to be written",
    "release.before": (
        "release_lease() is about to release a lease (a release made with an "
        "op record commits with it and passes op.after_record instead)"
    ),
    "head.before_request": "the HEAD request is about to be sent",
    "head.after_response": "the HEAD response arrived; nothing recorded yet",
    "stream.after_open": "the part file of this token was created, empty",
    "stream.after_chunk": "a chunk was written to the part file",
    "stream.after_progress": "the bytes received so far were recorded",
    "stream.before_fsync": "the body is complete; the part file is not fsynced",
    "stream.after_fsync": "the part file is fsynced; it is not in place yet",
    "finalize.before_replace": "finalize checked the lease; the part is not renamed",
    "finalize.after_replace": "the part was renamed into place; folder not fsynced",
    "finalize.after_dirsync": "the folder was fsynced; the finalize is not recorded",
    "index.before_record": "the manifest entry is about to be written",
    "index.after_record": "the manifest entry and its ledger record committed",
}

ACTIONS = ("kill", "raise", "hang", "sleep", "exit")


@dataclass
class Fault:
    """One armed fault: do ``action`` at the ``hit``-th time ``point`` is reached."""

    point: str
    action: str = "kill"
    hit: int = 1
    worker: str | None = None
    arg: float = 0.0

    def __post_init__(self) -> None:
        ensure_declared(self.point)
        if self.action not in ACTIONS:
            raise ValueError(
                f"fault action {self.action!r} for crash point {self.point!r} is not "
                f"known; use one of {', '.join(ACTIONS)}"
            )
        if not isinstance(self.hit, int) or self.hit < 1:
            raise ValueError(
                f"fault hit for crash point {self.point!r} must be an integer >= 1 "
                f"(the 1st, 2nd, ... time the point is reached), got {self.hit!r}"
            )

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> Fault:
        return cls(**dict(spec))

    def to_mapping(self) -> dict[str, Any]:
        return {
            "point": self.point,
            "action": self.action,
            "hit": self.hit,
            "worker": self.worker,
            "arg": self.arg,
        }


@dataclass
class _State:
    faults: list[Fault] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=dict)
    hook: Callable[[str], None] | None = None
    worker: str | None = None


_state = _State()
_armed = False


def crashpoint(name: str) -> None:
    """Mark a crash point. Does nothing unless this process is armed."""
    if _armed:
        _reached(name)


def ensure_declared(name: str) -> None:
    """Raise :class:`UnknownCrashPoint` unless ``name`` is in the registry."""
    if name not in CRASH_POINTS:
        raise UnknownCrashPoint(
            f"crash point {name!r} is not declared; known points: "
            f"{', '.join(sorted(CRASH_POINTS))}. Use one of these names, or declare "
            "the new point in docstokg_idem.core.crashpoints.CRASH_POINTS"
        )


def arm(
    faults: Iterable[Fault | Mapping[str, Any]], *, worker: str | None = None
) -> None:
    """Arm this process with ``faults`` (replacing earlier ones); reset hit counts."""
    global _armed
    _state.faults = [
        f if isinstance(f, Fault) else Fault.from_mapping(f) for f in faults
    ]
    _state.hits = {}
    if worker is not None:
        _state.worker = worker
    _armed = bool(_state.faults) or _state.hook is not None


def disarm() -> None:
    """Remove every fault and the hook; crash points cost nothing again."""
    global _armed
    _state.faults, _state.hits, _state.hook = [], {}, None
    _armed = False


def set_hook(hook: Callable[[str], None] | None) -> None:
    """Call ``hook(name)`` at every crash point reached (scheduling, coverage)."""
    global _armed
    _state.hook = hook
    _armed = bool(_state.faults) or hook is not None


def set_worker_name(name: str | None) -> None:
    _state.worker = name


def hits() -> dict[str, int]:
    """How often each point was reached in this process while armed."""
    return dict(_state.hits)


def faults_to_env(faults: Iterable[Fault]) -> str:
    """Encode faults for ``DOCSTOKG_IDEM_FAULTS`` in a child's environment."""
    return json.dumps([f.to_mapping() for f in faults])


def _reached(name: str) -> None:
    ensure_declared(name)
    count = _state.hits[name] = _state.hits.get(name, 0) + 1
    if _state.hook is not None:
        _state.hook(name)
    for fault in _state.faults:
        if fault.point != name or fault.hit != count:
            continue
        if fault.worker is not None and fault.worker != _state.worker:
            continue
        _fire(fault)


def _fire(fault: Fault) -> None:
    if fault.action == "kill":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait()  # SIGKILL is delivered before this returns
    elif fault.action == "exit":
        os._exit(int(fault.arg) or 17)
    elif fault.action == "raise":
        raise CrashPointFired(
            f"crash point {fault.point!r} fired on hit {fault.hit} "
            f"(worker {_state.worker!r})"
        )
    elif fault.action == "hang":
        while True:
            signal.pause()
    elif fault.action == "sleep":
        time.sleep(fault.arg)


def _arm_from_env() -> None:
    global _armed
    _state.worker = os.environ.get(WORKER_ENV) or _state.worker
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return
    if raw.startswith("@"):
        with open(raw[1:], encoding="utf-8") as f:
            raw = f.read()
    try:
        specs = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{FAULTS_ENV} must hold a JSON list of fault specs, got {raw[:200]!r}"
        ) from exc
    arm(specs)


_arm_from_env()
