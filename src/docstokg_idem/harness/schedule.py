"""Controlled interleavings: a schedule of steps over real worker processes.

A schedule is a list of steps, each a small JSON-able list:

- ``["run", k]``: the k-th runnable worker (modulo how many there are) runs to
  its next crash point;
- ``["kill", k]``: the k-th runnable worker is killed with SIGKILL where it
  stands;
- ``["clock", s]``: the shared fake clock moves ``s`` seconds forward;
- ``["restart", k]``: the k-th dead slot gets a new worker process.

Any list of such steps is valid (indexes wrap around), which lets Hypothesis
shrink a failing schedule freely. After the last step every worker runs free,
a recovery pass ends dead workers' leases, reconciles, runs a fresh worker to
finish the jobs and reconciles again; then the exactly-once checker runs. The
same schedule replays to the same event trace.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import connect, plan_jobs
from ..core.clock import SharedClock, set_default_clock
from ..core.db import close
from ..core.jobs import expire_owner_leases
from ..core.reconcile import reconcile_jobs
from ..pipeline.origin import Fault, Origin
from ..pipeline.worker import WorkerConfig, run_worker
from .checker import Expected, Report, check, timeline
from .pool import WorkerPool

Step = list[Any]
START_WALL = 1_700_000_000.0


@dataclass
class Outcome:
    """What one schedule did, and what the checker found."""

    schedule: list[Step]
    trace: list[tuple[int, str | None]]
    report: Report
    timeline: str
    exit_codes: list[int | None]
    workdir: str
    killed: int = 0

    @property
    def ok(self) -> bool:
        return self.report.ok

    def describe(self) -> str:
        lines = [
            f"schedule ({len(self.schedule)} steps): {json.dumps(self.schedule)}",
            f"replay with: --idem-replay='{json.dumps(self.schedule)}'",
            "trace: " + " ".join(f"w{w}@{p}" for w, p in self.trace),
            str(self.report),
            "timeline:",
            self.timeline,
        ]
        return "\n".join(lines)


@dataclass
class World:
    """The fixed part of an interleaving experiment: artifacts, workers, TTL."""

    artifacts: Mapping[str, int] = field(
        default_factory=lambda: {"a.pdf": 40_000, "b.pdf": 9_000}
    )
    faults: Mapping[str, Fault] = field(default_factory=dict)
    workers: int = 2
    lease_ttl_s: float = 10.0
    mutant: str | None = None
    seed: int = 0
    worker_config: Mapping[str, Any] = field(
        default_factory=lambda: {
            "chunk_bytes": 16 * 1024,
            "progress_every_bytes": 16 * 1024,
        }
    )


def run_schedule(
    schedule: Sequence[Step],
    world: World | None = None,
    *,
    workdir: str | os.PathLike[str] | None = None,
    origin: Origin | None = None,
) -> Outcome:
    """Play one schedule against real worker processes and check the result."""
    world = world or World()
    root = Path(workdir or tempfile.mkdtemp(prefix="idem-sched-"))
    root.mkdir(parents=True, exist_ok=True)
    db_path, out = root / "jobs.db", root / "files"
    clock = SharedClock(root / "clock", start=START_WALL)
    own_origin = origin is None
    if origin is None:
        origin = Origin(
            dict(world.artifacts), seed=world.seed, faults=dict(world.faults)
        ).start()
    try:
        ids = _plan(db_path, origin, world, clock)
        pool = WorkerPool(
            db_path,
            out,
            workers=world.workers,
            clock=clock,
            lease_ttl_s=world.lease_ttl_s,
            mutant=world.mutant,
            scheduled=True,
            log_dir=root / "logs",
            config=world.worker_config,
        )
        with pool:
            pool.start()
            killed = _play(pool, schedule, clock)
            _drain(pool)
            codes = pool.exit_codes()
            _recover(pool, world, db_path, out, clock)
            trace = list(pool.trace)
        expected = {job_id: _expected(origin, name) for job_id, name in ids.items()}
        report = check(db_path, out, expected=expected, now=clock.wall())
    finally:
        if own_origin:
            origin.stop()
    return Outcome(
        list(map(list, schedule)),
        trace,
        report,
        timeline(db_path),
        codes,
        str(root),
        killed,
    )


_template: Path | None = None


def _fresh_database(db_path: Path) -> None:
    """Copy an empty, migrated database: cheaper than migrating one per schedule."""
    global _template
    if _template is None or not _template.exists():
        folder = Path(tempfile.mkdtemp(prefix="idem-template-"))
        cx = connect(folder / "template.db")
        cx.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        close(cx)
        _template = folder / "template.db"
    shutil.copyfile(_template, db_path)


def _plan(
    db_path: Path, origin: Origin, world: World, clock: SharedClock
) -> dict[str, str]:
    _fresh_database(db_path)
    cx = connect(db_path, clock=clock)
    try:
        names = list(world.artifacts)
        rows = [
            {"work_id": "W1", "artifact_id": n, "url": origin.url(n)} for n in names
        ]
        return dict(zip(plan_jobs(cx, rows), names, strict=True))
    finally:
        close(cx)


def _expected(origin: Origin, name: str) -> Expected:
    want = origin.expected(name)
    return Expected(
        want.size, want.sha256, origin.counters(name)["full_gets"], want.version
    )


def _play(pool: WorkerPool, schedule: Sequence[Step], clock: SharedClock) -> int:
    killed = 0
    for kind, arg in schedule:
        if kind == "clock":
            clock.advance(float(arg))
            pool.trace.append((-1, f"clock+{arg}"))
            continue
        if kind == "restart":
            dead = [w.index for w in pool if not w.alive]
            if dead:
                pool.restart(dead[int(arg) % len(dead)])
            continue
        runnable = pool.runnable()
        if not runnable:
            continue
        index = runnable[int(arg) % len(runnable)]
        if kind == "run":
            pool.step(index)
        elif kind == "kill":
            pool.crash(index)
            killed += 1
        else:
            raise ValueError(
                f"schedule step {[kind, arg]!r}: the kind must be run, kill, "
                "clock or restart"
            )
    return killed


def _drain(pool: WorkerPool) -> None:
    """Run the workers to the end one step at a time, in a fixed order.

    A free run would let the workers race, so the same schedule could end two
    ways; stepping the first runnable worker (the lock holder when there is
    one) makes the end as deterministic as the schedule.
    """
    while True:
        runnable = pool.runnable()
        if not runnable:
            break
        pool.step(runnable[0])
    pool.run_until_idle(start=False)


def _recover(
    pool: WorkerPool, world: World, db_path: Path, out: Path, clock: SharedClock
) -> None:
    """Recovery runs as the system would: in a process of its own, mutant included."""
    import multiprocess as mp

    dead = list(pool.dead_owners)
    config = WorkerConfig(
        out_dir=str(out),
        db_path=str(db_path),
        owner="recovery",
        lease_ttl_s=world.lease_ttl_s,
        **dict(world.worker_config),
    )
    proc = mp.get_context("fork").Process(
        target=_recovery_child,
        args=(config, clock.path, dead, world.mutant),
        daemon=True,
    )
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise RuntimeError("the recovery worker did not finish in 120 s")
    if proc.exitcode != 0:
        raise RuntimeError(
            f"the recovery process exited with {proc.exitcode} (mutant {world.mutant!r}); "
            "its output above says why"
        )


def _recovery_child(
    config: WorkerConfig, clock_file: str, dead: list[str], mutant: str | None
) -> None:
    clock = SharedClock(clock_file)
    set_default_clock(clock)
    if mutant:
        from . import mutants

        mutants.apply(mutant)
    cx = connect(config.db_path, clock=clock)
    try:
        for owner in dead:
            expire_owner_leases(cx, owner=owner, why="recovery: worker was killed")
        reconcile_jobs(cx, config.out_dir)
        run_worker(config)
        reconcile_jobs(cx, config.out_dir)
    finally:
        close(cx)
