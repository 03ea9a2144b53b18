"""Real worker processes under the harness's control.

A :class:`WorkerPool` starts pipeline workers as real processes (with
``multiprocess``), each with its own faults, owner name and event log, all
reading one shared fake clock. It can run them freely until they are idle or
one crashes, pause and resume them (SIGSTOP/SIGCONT), kill and restart them,
or drive them step by step: in *scheduled* mode every crash point is also a
scheduling point where the worker stops and waits for the controller, so that
exactly one worker runs at a time and a schedule replays to the same history.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiprocess as mp
from multiprocess.connection import wait

from ..core import connect
from ..core.clock import SharedClock, set_default_clock
from ..core.crashpoints import arm, ensure_declared, set_hook
from ..core.db import close
from ..core.jobs import expire_owner_leases
from ..core.telemetry import JsonLinesSink, add_sink
from ..pipeline.worker import (
    WorkerConfig,
    WorkerStats,
    install_stop_signals,
    run_worker,
)

WAIT_S = 60.0


class SchedulerStuck(RuntimeError):
    """A worker neither reached its next scheduling point nor exited in time."""


@dataclass
class WorkerSpec:
    """How to start one worker process."""

    config: WorkerConfig
    faults: list[dict[str, Any]] = field(default_factory=list)
    clock_file: str | None = None
    events_path: str | None = None
    mutant: str | None = None
    scheduled: bool = False


def _child(spec: WorkerSpec, conn: Any) -> None:
    """The body of a worker process started by the pool."""
    import threading

    if spec.clock_file:
        set_default_clock(SharedClock(spec.clock_file))
    if spec.mutant:
        from . import mutants

        mutants.apply(spec.mutant)
    if spec.events_path:
        add_sink(JsonLinesSink(spec.events_path))
    stop = threading.Event()
    install_stop_signals(stop)
    arm(spec.faults, worker=spec.config.owner)
    if spec.scheduled and _await_go(conn, None):
        set_hook(lambda point: _await_go(conn, point))
    stats = run_worker(spec.config, stop)
    conn.send(("exit", stats.as_dict()))
    conn.close()


def _await_go(conn: Any, point: str | None) -> bool:
    """Report the point reached and wait; ``False`` once told to run free."""
    from ..core import db

    conn.send(("at", point, db.write_locks_held > 0))
    command = conn.recv()
    if command == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if command == "free":
        set_hook(None)
        return False
    return True


@dataclass
class Worker:
    """One slot of the pool: its current process, owner and what it reported."""

    index: int
    spec: WorkerSpec
    generation: int = 0
    process: Any = None
    conn: Any = None
    at: str | None = None
    holds_lock: bool = False
    ready: bool = False
    exitcode: int | None = None
    stats: dict[str, int] = field(default_factory=dict)
    points: list[str] = field(default_factory=list)

    @property
    def owner(self) -> str:
        return self.spec.config.owner

    @property
    def alive(self) -> bool:
        return self.process is not None and self.exitcode is None

    def events(self) -> list[dict[str, Any]]:
        """The telemetry events this slot's processes wrote, in order."""
        path = self.spec.events_path
        if not path or not os.path.exists(path):
            return []
        return [
            json.loads(line) for line in Path(path).read_text().splitlines() if line
        ]


class WorkerPool:
    """N real worker processes over one job database and output folder."""

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        *,
        workers: int = 2,
        clock: SharedClock | None = None,
        lease_ttl_s: float = 30.0,
        faults: Mapping[int, Sequence[Mapping[str, Any]]] | None = None,
        mutant: str | None = None,
        scheduled: bool = False,
        start_method: str = "fork",
        log_dir: str | os.PathLike[str] | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.db_path, self.out_dir = os.fspath(db_path), os.fspath(out_dir)
        self.clock = clock
        self.scheduled = scheduled
        self.ctx = mp.get_context(start_method)
        self.log_dir = Path(log_dir or Path(self.out_dir).parent / "worker-logs")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.workers: list[Worker] = []
        #: owners whose process died abnormally, in order (a slot may restart)
        self.dead_owners: list[str] = []
        self.trace: list[tuple[int, str | None]] = []
        for i in range(workers):
            for f in (faults or {}).get(i, []):
                ensure_declared(f["point"])
            cfg = WorkerConfig(
                out_dir=self.out_dir,
                db_path=self.db_path,
                owner=f"w{i}",
                lease_ttl_s=lease_ttl_s,
                **dict(config or {}),
            )
            spec = WorkerSpec(
                config=cfg,
                faults=[dict(f) for f in (faults or {}).get(i, [])],
                clock_file=clock.path if clock else None,
                events_path=str(self.log_dir / f"w{i}.jsonl"),
                mutant=mutant,
                scheduled=scheduled,
            )
            self.workers.append(Worker(i, spec))

    # --- lifecycle --------------------------------------------------------------

    def start(self, index: int | None = None) -> None:
        """Start one worker (or every worker that is not running)."""
        for w in self._pick(index):
            if w.process is not None and (w.alive or index is None):
                continue  # running, or ran once: a dead slot comes back by restart()
            parent, child = self.ctx.Pipe()
            w.conn, w.exitcode, w.at, w.ready, w.holds_lock = (
                parent,
                None,
                None,
                False,
                False,
            )
            w.process = self.ctx.Process(
                target=_child,
                args=(w.spec, child),
                daemon=True,
                name=f"docstokg-idem pool {w.owner}",
            )
            w.process.start()
            child.close()
            if self.scheduled:
                self._expect(w)

    def restart(self, index: int, *, faults: Sequence[Mapping[str, Any]] = ()) -> None:
        """Start a new process in a dead slot, under a new owner name."""
        w = self.workers[index]
        if w.alive:
            raise RuntimeError(f"worker {w.owner} is still running; kill it first")
        w.generation += 1
        w.spec.config = _with_owner(w.spec.config, f"w{index}.{w.generation}")
        w.spec.faults = [dict(f) for f in faults]
        self.start(index)

    def _pick(self, index: int | None) -> list[Worker]:
        return self.workers if index is None else [self.workers[index]]

    def kill(self, index: int) -> None:
        """SIGKILL a worker and reap it; its leases stay until they expire."""
        w = self.workers[index]
        if not w.alive:
            return
        try:
            os.kill(w.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it exited on its own meanwhile
        self._reap(w)

    def pause(self, index: int) -> None:
        """SIGSTOP a worker (nothing happens if it already exited)."""
        self._signal(index, signal.SIGSTOP)

    def resume(self, index: int) -> None:
        """SIGCONT a paused worker (nothing happens if it already exited)."""
        self._signal(index, signal.SIGCONT)

    def _signal(self, index: int, sig: int) -> None:
        w = self.workers[index]
        if w.process is None:
            raise RuntimeError(f"worker {w.owner} was never started")
        try:
            os.kill(w.process.pid, sig)
        except ProcessLookupError:
            self._reap(w)

    def reap(self, index: int) -> int | None:
        """Wait for a worker that is exiting and record its exit code."""
        self._reap(self.workers[index])
        return self.workers[index].exitcode

    def expire_dead_leases(self) -> int:
        """End the leases of every dead worker now (their processes were reaped)."""
        if not self.dead_owners:
            return 0
        cx = connect(self.db_path, clock=self.clock)
        try:
            return sum(
                expire_owner_leases(cx, owner=owner, why="its process died")
                for owner in self.dead_owners
            )
        finally:
            close(cx)

    def close(self) -> None:
        """Kill whatever still runs; close pipes."""
        for w in self.workers:
            if w.alive:
                try:
                    os.kill(w.process.pid, signal.SIGCONT)
                    os.kill(w.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._reap(w)
            if w.conn is not None:
                w.conn.close()
                w.conn = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- free running -------------------------------------------------------------

    def run_until_idle(
        self, timeout_s: float = WAIT_S, *, start: bool = True
    ) -> list[int | None]:
        """Wait until every worker has exited (first starting those not running)."""
        if self.scheduled:
            self.free()
        if start:
            self.start()
        for w in self.workers:
            self._join(w, timeout_s)
        return [w.exitcode for w in self.workers]

    def run_until_crash(self, timeout_s: float = WAIT_S) -> Worker | None:
        """Run until one worker dies abnormally (returned) or all exit cleanly."""
        self.start()
        while True:
            live = [w for w in self.workers if w.alive]
            if not live:
                return None
            ready = wait([w.process.sentinel for w in live], timeout=timeout_s)
            if not ready:
                raise SchedulerStuck(f"no worker exited within {timeout_s}s")
            for w in live:
                if w.process.sentinel in ready:
                    self._reap(w)
                    if w.exitcode != 0:
                        return w

    def exit_codes(self) -> list[int | None]:
        return [w.exitcode for w in self.workers]

    # --- scheduled stepping -----------------------------------------------------------

    def runnable(self) -> list[int]:
        """Workers that may take the next step (the lock holder alone, if one holds it)."""
        waiting = [
            w
            for w in self.workers
            if w.alive and w.at is not None or (w.alive and w.ready)
        ]
        holders = [w.index for w in waiting if w.holds_lock]
        return holders or [w.index for w in waiting]

    def step(self, index: int) -> str | None:
        """Let one held worker run to its next scheduling point; return that point.

        Returns ``None`` when the worker exited instead.
        """
        w = self.workers[index]
        if not w.alive:
            raise RuntimeError(f"worker {w.owner} is not running")
        w.conn.send("go")
        self._expect(w)
        return w.at if w.alive else None

    def crash(self, index: int) -> None:
        """Kill a held worker at the point where it stands."""
        self.kill(index)
        self.trace.append((index, "killed"))

    def free(self) -> None:
        """Stop scheduling: every held worker runs on without stopping."""
        for w in self.workers:
            if w.alive and w.conn is not None:
                try:
                    w.conn.send("free")
                except (BrokenPipeError, OSError):
                    pass
        self.scheduled = False
        for w in self.workers:
            w.spec.scheduled = False

    def _expect(self, w: Worker) -> None:
        """Wait for the worker's next message: a scheduling point or its exit."""
        ready = wait([w.conn, w.process.sentinel], timeout=WAIT_S)
        if not ready:
            raise SchedulerStuck(
                f"worker {w.owner} neither reached a crash point nor exited in {WAIT_S}s "
                f"(last at {w.at!r}); another worker may hold a lock it waits for"
            )
        if w.conn in ready:
            try:
                message = w.conn.recv()
            except EOFError:
                message = None
            if message is not None and message[0] == "at":
                w.at, w.holds_lock = message[1], message[2]
                w.ready = message[1] is None
                if message[1] is not None:
                    w.points.append(message[1])
                self.trace.append((w.index, message[1]))
                return
            if message is not None and message[0] == "exit":
                w.stats = message[1]
        self._reap(w)
        self.trace.append((w.index, f"exit {w.exitcode}"))

    def _join(self, w: Worker, timeout_s: float) -> None:
        if w.process is None:
            return
        w.process.join(timeout_s)
        if w.process.is_alive():
            raise SchedulerStuck(f"worker {w.owner} still running after {timeout_s}s")
        self._reap(w)

    def _reap(self, w: Worker) -> None:
        if w.process is None:
            return
        w.process.join()
        w.exitcode = w.process.exitcode
        if w.exitcode not in (0, None) and w.owner not in self.dead_owners:
            self.dead_owners.append(w.owner)
        if w.conn is not None and w.exitcode == 0 and not w.stats:
            try:
                while w.conn.poll():
                    message = w.conn.recv()
                    if message and message[0] == "exit":
                        w.stats = message[1]
            except (EOFError, OSError):
                pass
        w.at, w.ready, w.holds_lock = None, False, False

    def workers_stats(self) -> WorkerStats:
        total = WorkerStats()
        for w in self.workers:
            for k, v in w.stats.items():
                setattr(total, k, getattr(total, k) + v)
        return total

    def __iter__(self) -> Iterator[Worker]:
        return iter(self.workers)


def _with_owner(config: WorkerConfig, owner: str) -> WorkerConfig:
    from dataclasses import replace

    return replace(config, owner=owner)
