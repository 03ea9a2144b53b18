"""The steps engine: real worker processes driven by explicit steps.

Workers of a :class:`WorkerPool` run freely; steps start, kill, pause
(SIGSTOP), resume (SIGCONT), stop (SIGTERM) and restart them, move the shared
fake clock and reconcile. Then a recovery pass runs as the supervisor would.

Crash points reached by the workers are recorded by a hook (:class:`Probe`)
installed in this process before the pool forks them, so they inherit it. The
same hook carries out plans: a worker stops itself (SIGSTOP) at a crash point
for the ``pause`` and ``resume ... until`` steps, or a write fails with ENOSPC
there for ``disk_full``. Scheduled workers replace the hook with the
scheduler's, which reports each point through the pool's trace.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import connect
from ..core.clock import SharedClock, set_default_clock
from ..core.crashpoints import CRASH_POINTS, set_hook
from ..core.db import close
from ..core.jobs import expire_owner_leases
from ..core.reconcile import reconcile_jobs
from ..pipeline.origin import Origin
from .checker import check, timeline
from .scenario_checks import (
    WAIT_S,
    Facts,
    RunResult,
    ScenarioStepError,
    expectations,
    expected_of,
    picture,
    plan_artifacts,
    restrict,
)
from .scenario_format import Scenario, Step, Variant

#: Recovery workers run again after a retry backoff at most this often.
RECOVERY_ROUNDS = 6


# --- the coverage and injection hook --------------------------------------------------


@dataclass
class Plan:
    """Something a forked worker does at the ``hit``-th time it reaches ``point``.

    Hits count from the start of the worker's process.
    """

    point: str
    hit: int
    action: str  # "pause" (SIGSTOP itself) or "disk_full" (raise ENOSPC)


class Probe:
    """The crash point hook of a run; forked workers inherit it with their plans.

    In this process it only records the points reached. In a worker it also
    carries out the plans given at fork, and those the controller writes later
    into the worker's plan file (read when the file changes), which is how a
    paused worker is resumed until another point.
    """

    def __init__(self, path: Path):
        self.parent = os.getpid()
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.seen: set[str] = set()
        self.plans: list[Plan] = []
        self.plan_file: str | None = None
        self.plan_stamp: tuple[int, int] | None = None
        self.later: list[Plan] = []
        self.hits: Counter[str] = Counter()

    def __call__(self, point: str) -> None:
        if point not in self.seen:
            self.seen.add(point)
            os.write(self.fd, f"{point}\n".encode())
        if os.getpid() == self.parent:
            return
        self.hits[point] += 1
        for plan in [*self.plans, *self._later()]:
            if plan.point == point and plan.hit == self.hits[point]:
                if plan.action == "pause":
                    os.kill(os.getpid(), signal.SIGSTOP)
                else:
                    raise OSError(
                        errno.ENOSPC,
                        "No space left on device (injected by the "
                        f"scenario at {point}, hit {plan.hit})",
                    )

    def _later(self) -> list[Plan]:
        if self.plan_file is None:
            return []
        try:
            info = os.stat(self.plan_file)
        except FileNotFoundError:
            return []
        stamp = (info.st_ino, info.st_mtime_ns)  # each write is a new file
        if stamp != self.plan_stamp:
            self.plan_stamp = stamp
            with open(self.plan_file, encoding="utf-8") as f:
                self.later = [Plan(**p) for p in json.load(f)]
        return self.later

    @contextmanager
    def forking(
        self, plans: Sequence[Plan] = (), plan_file: Path | None = None
    ) -> Iterator[None]:
        """Give the next forked process these plans and this plan file."""
        self.plans, self.plan_file = list(plans), str(plan_file) if plan_file else None
        try:
            yield
        finally:
            self.plans, self.plan_file = [], None

    def reached(self) -> set[str]:
        return {p for p in self.path.read_text().split() if p in CRASH_POINTS}

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def probing(root: Path) -> Iterator[Probe]:
    probe = Probe(root / "points.txt")
    set_hook(probe)
    try:
        yield probe
    finally:
        set_hook(None)
        probe.close()


# --- engine: explicit steps over free-running workers ---------------------------------


class StepRun:
    """Real worker processes driven by explicit steps, then recovered and checked."""

    def __init__(self, variant: Variant, root: Path, seed: int, probe: Probe):
        self.v = variant
        self.s = variant.scenario
        self.root = root
        self.seed = seed
        self.probe = probe
        self.db, self.out = root / "jobs.db", root / "files"
        self.exits: list[tuple[str, int | None]] = []
        self.paused: set[int] = set()
        self.started: set[int] = set()
        self.crashes: list[dict[str, Any]] = []
        self.clocks: list[dict[str, Any]] = []
        self.log: list[str] = []

    def run(self) -> RunResult:
        from .pool import WorkerPool

        s = self.s
        with Origin(dict(s.jobs), seed=self.seed, faults=s.origin_faults()) as origin:
            self.clock = SharedClock(self.root / "clock", start=s.clock_start)
            self.ids = plan_artifacts(self.db, origin, list(s.jobs), self.clock)
            faults = {
                i: [c.fault() for c in self.v.crashes if c.worker in (None, i)]
                for i in range(s.workers)
            }
            self.pool = WorkerPool(
                self.db,
                self.out,
                workers=s.workers,
                clock=self.clock,
                lease_ttl_s=s.lease_ttl,
                faults=faults,
                mutant=s.mutant,
                start_method="fork",
                log_dir=self.root / "logs",
                config=s.worker_config(),
            )
            with self.pool:
                for step in s.steps or [
                    Step("run", {"until": "idle", "workers": None}, "")
                ]:
                    try:
                        self.do(step)
                    except ScenarioStepError as exc:
                        exc.add_note(f"step at {step.where}")
                        raise
                if s.recover:
                    self.recover()
                else:
                    self.finish()
            expected = expected_of(origin, self.ids)
            report = check(self.db, self.out, expected=expected, now=self.clock.wall())
            facts = Facts(
                self.db, self.out, self.ids, origin, self.exits, self.root / "logs"
            )
            unmet = expectations(s, facts)
        return RunResult(
            self.v.name,
            restrict(report, s.invariants(True)),
            unmet,
            text_timeline=timeline(self.db),
            log=self.log,
            picture=picture(
                self.db, start=s.clock_start, crashes=self.crashes, clocks=self.clocks
            ),
        )

    # --- steps ---

    def do(self, step: Step) -> None:
        handler: Callable[[Any], None] = getattr(self, f"step_{step.kind}")
        handler(step.arg)

    def step_run(self, arg: dict[str, Any]) -> None:
        targets = (
            arg["workers"] if arg["workers"] is not None else range(self.s.workers)
        )
        for i in targets:
            if i not in self.started:
                self.start(i)
        crashed = self.wait(list(targets), until_crash=arg["until"] == "crash")
        who = "all workers" if arg["workers"] is None else f"workers {list(targets)}"
        codes = ", ".join(
            f"{w.owner} {w.exitcode}"
            for w in self.pool.workers
            if w.index in targets and w.exitcode is not None
        )
        self.log.append(
            f"run {who} until {arg['until']}"
            + (f": {crashed} crashed" if crashed else "")
            + (f" (exit codes: {codes})" if codes else "")
        )

    def step_crash(self, index: int) -> None:
        w = self.pool.workers[index]
        if not self.running(index, "crash"):
            return
        self.pool.kill(index)
        self.paused.discard(index)
        self.exited(index, "SIGKILL by a crash step")
        self.log.append(f"crash worker {index} ({w.owner}) with SIGKILL")

    def step_clock(self, seconds: float) -> None:
        self.clock.advance(float(seconds))
        self.clocks.append({"to": self.clock.wall(), "by": float(seconds)})
        self.log.append(f"clock +{seconds:g} s")

    def step_pause(self, arg: dict[str, Any]) -> None:
        index = arg["worker"]
        if "at" in arg:
            self.start(index, [Plan(arg["at"], arg.get("hit", 1), "pause")])
            self.hold(index, arg["at"], arg.get("hit", 1), "pause")
            return
        if not self.running(index, "pause"):
            return
        self.pool.pause(index)
        self.paused.add(index)
        self.log.append(f"pause worker {index} (SIGSTOP) wherever it is")

    def step_resume(self, arg: dict[str, Any]) -> None:
        index = arg["worker"]
        if index not in self.paused:
            self.running(index, "resume")
            if self.pool.workers[index].alive:
                raise ScenarioStepError(
                    f"resume: worker {index} is running, not paused"
                )
            return
        until = arg.get("until")
        if until:
            plans = [{"point": until, "hit": arg.get("hit", 1), "action": "pause"}]
            path = self.plan_file(index)
            path.with_suffix(".new").write_text(json.dumps(plans), encoding="utf-8")
            os.replace(path.with_suffix(".new"), path)
        self.pool.resume(index)
        self.paused.discard(index)
        if until:
            self.hold(index, until, arg.get("hit", 1), "resume")
        else:
            self.log.append(f"resume worker {index} (SIGCONT)")

    def step_stop(self, index: int) -> None:
        if not self.running(index, "stop"):
            return
        os.kill(self.pool.workers[index].process.pid, signal.SIGTERM)
        held = " (delivered when it resumes)" if index in self.paused else ""
        self.log.append(f"stop worker {index} (SIGTERM: keep progress, release){held}")

    def running(self, index: int, what: str) -> bool:
        """Whether worker ``index`` runs; steps on a dead worker do nothing (logged)."""
        w = self.pool.workers[index]
        if w.alive and not w.process.is_alive():
            _reap(self.pool, w)  # it exited on its own since the last step
            self.exited(index, None)
        if w.alive:
            return True
        self.log.append(
            f"{what} worker {index}: not running ({w.owner} exited with "
            f"{w.exitcode}); nothing to do"
        )
        return False

    def plan_file(self, index: int, generation: int | None = None) -> Path:
        """Where the controller writes later plans for the process in slot ``index``."""
        folder = self.root / "plans"
        folder.mkdir(exist_ok=True)
        if generation is None:
            generation = self.pool.workers[index].generation
        return folder / f"slot{index}-{generation}.json"

    def hold(self, index: int, point: str, hit: int, what: str) -> None:
        """Wait until worker ``index`` stops itself at ``point`` (or exits first)."""
        where = "at" if what == "pause" else "until"
        how = f"{what} worker {index} {where} {point} (hit {hit})"
        if self.wait_stopped(index):
            self.paused.add(index)
            self.log.append(f"{how}: held there (SIGSTOP)")
            return
        self.wait([index], until_crash=False)
        w = self.pool.workers[index]
        self.log.append(f"{how}: it exited with {w.exitcode} before reaching it")

    def step_restart(self, arg: dict[str, Any]) -> None:
        index = arg["worker"]
        if self.pool.workers[index].alive:
            raise ScenarioStepError(
                f"restart: worker {index} is still running; crash it "
                "or let it finish first"
            )
        faults = [
            {
                "point": c["point"],
                "action": c.get("action", "kill"),
                "hit": c.get("hit", 1),
                "worker": None,
                "arg": c.get("arg", 0.0),
            }
            for c in arg.get("crashes", [])
        ]
        next_plans = self.plan_file(index, self.pool.workers[index].generation + 1)
        with self.probe.forking(plan_file=next_plans):
            self.pool.restart(index, faults=faults)
        self.started.add(index)
        self.log.append(f"restart worker {index} as {self.pool.workers[index].owner}")

    def step_reconcile(self, _: Any) -> None:
        self.with_db(lambda cx: reconcile_jobs(cx, self.out))
        self.log.append("reconcile")

    def step_expire_dead(self, _: Any) -> None:
        ended = self.expire_dead()
        self.log.append(f"expire the leases of dead workers ({ended} ended)")

    # --- helpers ---

    def start(self, index: int, plans: Sequence[Plan] = ()) -> None:
        if index in self.started:
            raise ScenarioStepError(
                f"worker {index} was started before; use `restart` to "
                "start a new process in its slot"
            )
        disk = self.s.disk_full
        if disk and disk.get("worker", 0) == index:
            plans = [*plans, Plan(disk["at"], disk.get("hit", 1), "disk_full")]
        with self.probe.forking(plans, self.plan_file(index)):
            self.pool.start(index)
        self.started.add(index)

    def wait(self, indexes: Sequence[int], *, until_crash: bool) -> str | None:
        from multiprocess.connection import wait

        deadline = time.monotonic() + WAIT_S
        while True:
            live = [
                w
                for w in self.pool.workers
                if w.index in indexes and w.alive and w.index not in self.paused
            ]
            if not live:
                return None
            ready = wait(
                [w.process.sentinel for w in live],
                timeout=max(0.0, deadline - time.monotonic()),
            )
            if not ready:
                raise ScenarioStepError(
                    f"workers {[w.owner for w in live]} still run after {WAIT_S:.0f} s"
                )
            for w in live:
                if w.process.sentinel in ready:
                    _reap(self.pool, w)
                    self.exited(w.index, None)
                    if until_crash and w.exitcode not in (0, None):
                        return w.owner

    def exited(self, index: int, how: str | None) -> None:
        w = self.pool.workers[index]
        self.exits.append((w.owner, w.exitcode))
        if w.exitcode in (0, None):
            return
        armed = [c.point for c in self.v.crashes if c.worker in (None, index)]
        label = how or (
            f"killed at {armed[0]}"
            if armed and w.generation == 0 and w.exitcode == -signal.SIGKILL
            else f"exit {w.exitcode}"
        )
        self.crashes.append({"owner": w.owner, "label": label})

    def wait_stopped(self, index: int) -> bool:
        """True once the worker stopped itself; False if it exited first."""
        pid = self.pool.workers[index].process.pid
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            flags = os.WSTOPPED | os.WEXITED | os.WNOHANG | os.WNOWAIT
            info = os.waitid(os.P_PID, pid, flags)
            if info is not None:
                return bool(info.si_code == os.CLD_STOPPED)
            time.sleep(0.002)
        raise ScenarioStepError(
            f"worker {index} neither stopped nor exited in {WAIT_S:.0f} s"
        )

    def with_db(self, fn: Callable[[Any], Any]) -> Any:
        cx = connect(self.db, clock=self.clock)
        try:
            return fn(cx)
        finally:
            close(cx)

    def dead_owners(self) -> list[str]:
        return sorted({o for o, code in self.exits if code not in (None, 0)})

    def expire_dead(self) -> int:
        return int(
            self.with_db(
                lambda cx: sum(
                    expire_owner_leases(cx, owner=o, why="scenario: worker died")
                    for o in self.dead_owners()
                )
            )
        )

    def finish(self) -> None:
        for index in sorted(self.paused):
            self.pool.resume(index)
        self.paused.clear()
        self.wait(range(self.s.workers), until_crash=False)

    def recover(self) -> None:
        """As the supervisor would: end dead leases, reconcile, fresh workers until
        nothing is left (waiting out retry backoffs on the fake clock), reconcile."""
        self.finish()
        self.expire_dead()
        self.with_db(lambda cx: reconcile_jobs(cx, self.out))
        for round_ in range(RECOVERY_ROUNDS):
            owner = "recovery" if round_ == 0 else f"recovery.{round_}"
            with self.probe.forking():
                code = _run_recovery_worker(
                    self.s, self.db, self.out, self.clock.path, owner
                )
            self.exits.append((owner, code))
            wait = self.with_db(_backoff_left)
            if code != 0 or wait is None:
                break
            self.step_clock(round(wait + 0.001, 3))
        self.with_db(lambda cx: reconcile_jobs(cx, self.out))
        self.log.append(
            f"recovery: leases of {self.dead_owners() or 'no'} dead workers "
            "ended, reconcile, fresh workers until done, reconcile"
        )


def _backoff_left(cx: Any) -> float | None:
    """Seconds to the earliest retry, when every unfinished job waits out a backoff."""
    from ..core.jobs import counts

    snapshot = counts(cx)
    waiting = snapshot["total"] - snapshot["finished"]
    if (
        waiting <= 0
        or snapshot["next_retry_at"] is None
        or snapshot["backing_off"] != waiting
    ):
        return None
    wall: float = cx.clock.wall()
    return max(0.0, float(snapshot["next_retry_at"]) - wall)


def _reap(pool: Any, w: Any) -> None:
    """Record the exit of a pool worker whose process ended.

    The pool reaps only in its own waits, and ``multiprocess`` may already have
    reaped the process (any later ``Process.start`` does), so this joins
    instead of signalling (``pool.kill`` would raise ProcessLookupError).
    """
    w.process.join(WAIT_S)
    w.exitcode = w.process.exitcode
    w.at, w.ready, w.holds_lock = None, False, False
    if w.exitcode not in (0, None) and w.owner not in pool.dead_owners:
        pool.dead_owners.append(w.owner)


def _run_recovery_worker(
    s: Scenario, db: Path, out: Path, clock_path: str, owner: str
) -> int | None:
    import multiprocess as mp

    from ..pipeline.worker import WorkerConfig

    config = WorkerConfig(
        out_dir=str(out),
        db_path=str(db),
        owner=owner,
        lease_ttl_s=s.lease_ttl,
        **s.worker_config(),
    )
    proc = mp.get_context("fork").Process(
        target=_recovery_main, args=(config, clock_path, s.mutant), daemon=True
    )
    proc.start()
    proc.join(WAIT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise ScenarioStepError(f"the recovery worker did not finish in {WAIT_S:.0f} s")
    return int(proc.exitcode) if proc.exitcode is not None else None


def _recovery_main(config: Any, clock_path: str, mutant: str | None) -> None:
    from ..pipeline.worker import run_worker

    set_default_clock(SharedClock(clock_path))
    if mutant:
        from . import mutants

        mutants.apply(mutant)
    run_worker(config)
