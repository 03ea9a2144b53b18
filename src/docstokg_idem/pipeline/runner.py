"""Run N worker processes over one job database, restart the ones that die.

The supervisor starts each worker as a real process (``multiprocess``), waits
on their exit sentinels, and:

- when a worker is killed, counts a crash, ends the dead owner's leases at
  once (fencing still guards them) and starts a new worker in its slot, armed
  with the next planned fault if there is one;
- when every worker went idle but jobs wait out a retry backoff, waits for the
  earliest one and starts the workers again;
- on Ctrl-C (SIGINT) or SIGTERM, asks the workers to stop at the next chunk:
  each records its progress and releases its lease; nothing is lost.
"""

from __future__ import annotations

import json
import secrets
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import multiprocess as mp
from multiprocess.connection import wait

from ..core import connect
from ..core.crashpoints import arm
from ..core.db import close
from ..core.jobs import counts, expire_owner_leases
from .worker import (
    EnvironmentTrouble,
    WorkerConfig,
    WorkerStats,
    install_stop_signals,
    run_worker,
)

log = logging.getLogger("docstokg_idem.runner")

#: exit status of a worker that stopped because the output folder is unusable
ENVIRONMENT_EXIT = 3

#: Decides the faults of a new worker: (slot, generation) -> fault specs.
FaultPlan = Callable[[int, int], list[dict[str, Any]]]


@dataclass
class RunResult:
    """What a run did."""

    crashes: int = 0
    restarts: int = 0
    exits: list[tuple[str, int]] = field(default_factory=list)
    stats: WorkerStats = field(default_factory=WorkerStats)
    interrupted: bool = False
    elapsed_s: float = 0.0
    #: why the run stopped early on its own (a full disk, an unwritable folder)
    trouble: str | None = None
    #: the crash points each worker was armed with, by owner name
    armed: dict[str, list[str]] = field(default_factory=dict)
    final_counts: dict[str, Any] = field(default_factory=dict)


def _worker_main(
    config: WorkerConfig, faults: list[dict[str, Any]], stats_path: str
) -> None:
    _observe(config)
    stop = threading.Event()
    install_stop_signals(stop)
    if faults:
        arm(faults, worker=config.owner)
    try:
        stats = run_worker(config, stop)
    except EnvironmentTrouble as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(ENVIRONMENT_EXIT)
    try:
        Path(stats_path).write_text(json.dumps(stats.as_dict()))
    except OSError:
        pass  # a full disk: the stats are a summary, the database is the record


def _observe(config: WorkerConfig) -> None:
    """Give a worker process the logging and event sinks its parent was asked for."""
    from ..core.telemetry import JsonLinesSink, LoggingSink, add_sink

    if config.log_level is not None:
        logging.basicConfig(
            level=config.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if config.log_level <= logging.INFO:
            add_sink(LoggingSink())
    if config.events_path:
        add_sink(JsonLinesSink(config.events_path))


@dataclass
class _Slot:
    index: int
    generation: int = 0
    process: Any = None
    owner: str = ""
    idle: bool = False


class Supervisor:
    """Runs and restarts worker processes until every job is finished."""

    def __init__(
        self,
        template: WorkerConfig,
        *,
        workers: int = 4,
        faults: FaultPlan | None = None,
        max_restarts: int = 1000,
        start_method: str = "forkserver",
        on_tick: Callable[[dict[str, Any], RunResult], None] | None = None,
        tick_s: float = 0.2,
    ):
        if workers < 1:
            raise ValueError(f"workers={workers!r}: run at least 1 worker")
        self.template = template
        self.workers = workers
        self.faults = faults
        self.max_restarts = max_restarts
        self.ctx = mp.get_context(start_method)
        self.on_tick = on_tick
        self.tick_s = tick_s
        self.stats_dir = Path(template.out_dir) / ".workers"
        self.stopping = False
        self.armed: dict[str, list[str]] = {}
        #: tells this run's workers from another run's on the same database
        self.run_id = secrets.token_hex(3)
        self.trouble: str | None = None
        self._wake = threading.Event()

    def run(self) -> RunResult:
        started = time.monotonic()
        result = RunResult()
        self.stats_dir.mkdir(parents=True, exist_ok=True)
        cx = connect(self.template.db_path, synchronous=self.template.synchronous)
        slots = [_Slot(i) for i in range(self.workers)]
        previous = self._trap_signals()
        forwarded = False
        try:
            for slot in slots:
                self._start(slot)
            while True:
                live = [s.process.sentinel for s in slots if s.process is not None]
                if live:
                    wait(live, timeout=self.tick_s)
                if self.stopping and not forwarded:
                    forwarded = self._signal_all(slots, signal.SIGTERM)
                for slot in slots:
                    self._reap(slot, cx, result)
                snapshot = counts(cx)
                if self.on_tick:
                    self.on_tick(snapshot, result)
                if any(s.process is not None for s in slots):
                    continue
                if self.stopping or not self._more_to_do(snapshot, slots):
                    break
            result.final_counts = counts(cx)
        finally:
            self._restore_signals(previous)
            self._stop_all(slots)
            close(cx)
        result.interrupted = self.stopping and self.trouble is None
        result.trouble = self.trouble
        result.armed = dict(self.armed)
        result.elapsed_s = time.monotonic() - started
        return result

    def _more_to_do(self, snapshot: dict[str, Any], slots: list[_Slot]) -> bool:
        """Every worker went idle: wait for the next job to become claimable."""
        waiting = snapshot["total"] - snapshot["finished"]
        if waiting <= 0:
            return False
        moments = [
            t
            for t in (snapshot["next_retry_at"], snapshot["next_lease_expiry"])
            if t is not None
        ]
        if moments:
            delay = max(0.0, min(60.0, min(moments) - time.time()))
            log.info(
                "%d jobs wait for a retry backoff or a lease of another worker; "
                "next one claimable in %.1fs",
                waiting,
                delay,
            )
            self._wake.wait(delay)
            if self.stopping:
                return False
        for slot in slots:
            self._start(slot)
        return True

    def _start(self, slot: _Slot) -> None:
        slot.owner = f"w{slot.index}.{slot.generation}@{self.run_id}"
        config = replace(self.template, owner=slot.owner)
        faults = self.faults(slot.index, slot.generation) if self.faults else []
        self.armed[slot.owner] = [f["point"] for f in faults]
        stats_path = str(self.stats_dir / f"{slot.owner}.json")
        slot.process = self.ctx.Process(
            target=_worker_main,
            args=(config, faults, stats_path),
            name=f"docstokg-idem {slot.owner}",
            daemon=True,
        )
        slot.process.start()
        log.info(
            "started worker owner=%s pid=%s faults=%s",
            slot.owner,
            slot.process.pid,
            [f["point"] for f in faults],
        )

    def _reap(self, slot: _Slot, cx: Any, result: RunResult) -> None:
        proc = slot.process
        if proc is None or proc.is_alive():
            return
        proc.join()
        code = proc.exitcode
        result.exits.append((slot.owner, code))
        slot.process = None
        self._collect(slot, result)
        if code == 0:
            return
        if code == ENVIRONMENT_EXIT:
            self.trouble = "the output folder cannot be written (see the error above)"
            self.stopping = True
            return
        ended = expire_owner_leases(
            cx, owner=slot.owner, why=f"worker exited with {code}"
        )
        if self.stopping and code in (-signal.SIGTERM, -signal.SIGINT, 1):
            return  # asked to stop before its handler was in place: not a crash
        result.crashes += 1
        log.warning(
            "worker owner=%s pid=%s exited with %s; ended %d of its leases",
            slot.owner,
            proc.pid,
            code,
            ended,
        )
        if self.stopping or result.restarts >= self.max_restarts:
            return
        slot.generation += 1
        result.restarts += 1
        self._start(slot)

    def _collect(self, slot: _Slot, result: RunResult) -> None:
        path = self.stats_dir / f"{slot.owner}.json"
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # killed, or a full disk: the database holds the truth anyway
        for key, value in stats.items():
            setattr(result.stats, key, getattr(result.stats, key) + value)
        path.unlink(missing_ok=True)

    def _trap_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def stop(signum: int, _frame: Any) -> None:
            self.stopping = True
            self._wake.set()
            log.warning("signal %s: asking workers to stop; progress is kept", signum)

        return {
            sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _signal_all(self, slots: list[_Slot], sig: int) -> bool:
        for slot in slots:
            if slot.process is not None and slot.process.is_alive():
                os.kill(slot.process.pid, sig)
        return True

    def _stop_all(self, slots: list[_Slot]) -> None:
        self._signal_all(slots, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for slot in slots:
            if slot.process is None:
                continue
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
