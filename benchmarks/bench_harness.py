"""What the chaos harness costs: crash points, kill and recover, schedules, shrinking.

Run ``python benchmarks/bench_harness.py [--cycles N] [--schedules N] [--profile]``.
It prints one table: each figure, its goal, and whether the figure meets it,
then, with ``--profile``, where a kill-and-recover cycle and a controlled
interleaving spend their time. Nothing here is a test; every process binds
127.0.0.1 only.

- *crash point*: a disarmed ``crashpoint()`` call against a plain empty call.
- *kill-and-recover cycle*: a pool worker armed to SIGKILL itself at a crash
  point claims a job and dies there; the pool reaps it, ends its leases, and
  a fresh worker in the same slot finishes the job.
- *interleaving*: ``run_schedule`` of a random 12-step schedule over 2 real
  worker processes, with its recovery pass and the exactly-once checker.
- *shrink*: Hypothesis finds a schedule that breaks a mutant and shrinks it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from docstokg_idem.core import close, connect, plan_jobs
from docstokg_idem.core.crashpoints import crashpoint
from docstokg_idem.harness import WorkerPool, World, run_schedule
from docstokg_idem.pipeline.origin import Origin

GOAL_CRASHPOINT_NS = 100.0
GOAL_CYCLES_PER_S = 50.0
GOAL_SCHEDULES_PER_S = 20.0
GOAL_SHRINK_S = 60.0
GOAL_SHRUNK_STEPS = 5
KILL_POINT = "stream.after_open"
SHRINK_MUTANT, SHRINK_INVARIANT = "token_reused", "I6"


def _empty() -> None:
    pass


def _meets(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# --- crash points ---------------------------------------------------------------------


def crashpoint_cost(calls: int) -> tuple[float, float]:
    """Nanoseconds per disarmed ``crashpoint()`` call and per empty call (best of 7)."""
    names = {"crashpoint": crashpoint, "_empty": _empty}

    def best(stmt: str) -> float:
        timer = timeit.Timer(stmt, globals=names)
        return min(timer.repeat(7, calls)) / calls * 1e9

    return best("crashpoint('stream.after_chunk')"), best("_empty()")


# --- kill and recover -----------------------------------------------------------------


def kill_recover_cycles(cycles: int, root: Path) -> tuple[float, dict[str, float]]:
    """Cycles per second, and the seconds spent in each phase over all cycles."""
    phases = dict.fromkeys(
        ("start to SIGKILL", "reap + expire leases", "fresh worker to done"), 0.0
    )
    root.mkdir(parents=True)
    with Origin({f"a{i}.pdf": 1 for i in range(cycles)}) as origin:
        db_path = root / "cycles.db"
        cx = connect(db_path)
        kill = [{"point": KILL_POINT, "action": "kill"}]
        pool = WorkerPool(
            db_path, root / "files", workers=1, faults={0: kill}, log_dir=root / "logs"
        )
        began = time.perf_counter()
        with pool:
            for i in range(cycles):
                t0 = time.perf_counter()
                plan_jobs(
                    cx,
                    [
                        {
                            "work_id": "W",
                            "artifact_id": f"a{i}",
                            "url": origin.url(f"a{i}.pdf"),
                        }
                    ],
                )  # the only job left
                if i:
                    pool.restart(0, faults=kill)
                crashed = pool.run_until_crash()
                t1 = time.perf_counter()
                assert crashed is not None and crashed.exitcode == -9, pool.exit_codes()
                assert pool.expire_dead_leases() == 1
                t2 = time.perf_counter()
                pool.restart(0)
                assert pool.run_until_idle(start=False) == [0]
                t3 = time.perf_counter()
                for name, spent in zip(
                    phases, (t1 - t0, t2 - t1, t3 - t2), strict=True
                ):
                    phases[name] += spent
        elapsed = time.perf_counter() - began
        close(cx)
        assert origin.total_counters()["full_gets"] == cycles, origin.total_counters()
    return cycles / elapsed, phases


# --- controlled interleavings ---------------------------------------------------------


def random_schedule(rng: random.Random, steps: int = 12) -> list[list[Any]]:
    """A schedule like the strategy's: mostly runs; kills, clock moves, restarts."""
    kinds = ["run"] * 6 + ["kill", "clock", "restart"]
    out: list[list[Any]] = []
    for _ in range(steps):
        kind = rng.choice(kinds)
        out.append(
            [
                kind,
                rng.choice((1.0, 4.0, 11.0, 31.0))
                if kind == "clock"
                else rng.randrange(2),
            ]
        )
    return out


def _play(schedule: list[list[Any]], origin: Origin, workdir: Path) -> Any:
    """One schedule against a shared origin (its counters are per schedule, for I9)."""
    origin.reset_counters()
    return run_schedule(schedule, World(), workdir=workdir, origin=origin)


def interleavings(count: int, root: Path, seed: int = 1) -> tuple[float, int]:
    """Schedules per second over 2 real workers, and how many found a violation."""
    rng = random.Random(seed)
    plans = [random_schedule(rng) for _ in range(count)]
    with Origin({"a.pdf": 40_000, "b.pdf": 9_000}) as origin:
        began = time.perf_counter()
        bad = sum(not _play(s, origin, root / f"s{i}").ok for i, s in enumerate(plans))
        elapsed = time.perf_counter() - began
    return count / elapsed, bad


def schedule_phases(count: int, root: Path) -> dict[str, float]:
    """Seconds per schedule in each phase of ``run_schedule`` (wrapped and timed)."""
    from docstokg_idem.harness import schedule as sched

    spent: dict[str, float] = {}
    saved: dict[str, Callable[..., Any]] = {}

    def wrap(name: str, label: str) -> None:
        real = saved[name] = getattr(sched, name)

        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real(*args, **kw)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0

        setattr(sched, name, timed)

    for name, label in [
        ("_plan", "plan (connect, migrate, insert)"),
        ("WorkerPool", "pool object"),
        ("_play", "play the steps (2 workers start + steps)"),
        ("_recover", "recovery process (fork, reconcile, worker)"),
        ("check", "exactly-once checker"),
        ("timeline", "timeline text"),
    ]:
        wrap(name, label)
    rng = random.Random(2)
    try:
        with Origin({"a.pdf": 40_000, "b.pdf": 9_000}) as origin:
            began = time.perf_counter()
            for i in range(count):
                _play(random_schedule(rng), origin, root / f"p{i}")
            total = time.perf_counter() - began
    finally:
        for name, real in saved.items():
            setattr(sched, name, real)
    spent = {k: v / count for k, v in spent.items()}
    spent["total per schedule"] = total / count
    spent["rest (free run to idle, origin, dirs)"] = total / count - sum(
        v for k, v in spent.items() if k != "total per schedule"
    )
    return spent


def profile_schedules(count: int, root: Path, top: int) -> str:
    rng = random.Random(3)
    profile = cProfile.Profile()
    with Origin({"a.pdf": 40_000, "b.pdf": 9_000}) as origin:
        profile.enable()
        for i in range(count):
            _play(random_schedule(rng), origin, root / f"c{i}")
        profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


# --- shrinking ------------------------------------------------------------------------


def shrink_time(root: Path) -> tuple[float, list[list[Any]], int]:
    """Seconds for Hypothesis to find and shrink a mutant's failure; its steps; runs."""
    from hypothesis import HealthCheck, find, settings

    from docstokg_idem.harness import schedules

    runs = 0
    world = World(artifacts={"a.pdf": 1}, mutant=SHRINK_MUTANT)

    def breaks(schedule: list[list[Any]]) -> bool:
        nonlocal runs
        runs += 1
        outcome = run_schedule(schedule, world, workdir=root / f"h{runs}")
        return SHRINK_INVARIANT in outcome.report.broken()

    began = time.perf_counter()
    found = find(
        schedules(workers=2),
        breaks,
        settings=settings(
            max_examples=200,
            database=None,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
    return time.perf_counter() - began, found, runs


# --- the table ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cycles",
        type=int,
        default=40,
        help="kill-and-recover cycles to time (default 40)",
    )
    parser.add_argument(
        "--schedules",
        type=int,
        default=30,
        help="random schedules to time (default 30)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print where an interleaving spends its time",
    )
    args = parser.parse_args(argv)
    began = time.perf_counter()

    def say(what: str, figure: str, goal: str = "", verdict: str = "") -> None:
        print(f"  {what:<50} {figure:>14}  {goal:>10}  {verdict}", flush=True)

    print(
        f"docstokg-idem harness benchmark: {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}"
    )
    say("measure", "figure", "goal", "verdict")
    with tempfile.TemporaryDirectory(prefix="idem-bench-") as tmp:
        root = Path(tmp)

        point, empty = crashpoint_cost(1_000_000)
        say(
            "disarmed crashpoint() call",
            f"{point:.0f} ns",
            f"<= {GOAL_CRASHPOINT_NS:.0f} ns",
            _meets(point <= GOAL_CRASHPOINT_NS),
        )
        say("  empty function call, for comparison", f"{empty:.0f} ns")
        say("  ratio crashpoint / empty call", f"{point / empty:.2f}x")

        rate, phases = kill_recover_cycles(args.cycles, root / "cycles")
        say(
            f"kill-and-recover cycles ({KILL_POINT})",
            f"{rate:.1f}/s",
            f">= {GOAL_CYCLES_PER_S:.0f}/s",
            _meets(rate >= GOAL_CYCLES_PER_S),
        )
        for name, spent in phases.items():
            say(f"  {name}", f"{spent / args.cycles * 1e3:.1f} ms")

        rate, bad = interleavings(args.schedules, root / "sched")
        say(
            "controlled interleavings, 2 workers, 12 steps",
            f"{rate:.1f}/s",
            f">= {GOAL_SCHEDULES_PER_S:.0f}/s",
            _meets(rate >= GOAL_SCHEDULES_PER_S),
        )
        say("  schedules with a violation (real code: 0)", f"{bad}")
        for name, spent in schedule_phases(
            max(5, args.schedules // 3), root / "phases"
        ).items():
            say(f"  {name}", f"{spent * 1e3:.1f} ms")

        seconds, found, runs = shrink_time(root / "shrink")
        say(
            f"find + shrink a failure of {SHRINK_MUTANT} ({SHRINK_INVARIANT})",
            f"{seconds:.1f} s",
            f"<= {GOAL_SHRINK_S:.0f} s",
            _meets(seconds <= GOAL_SHRINK_S and len(found) <= GOAL_SHRUNK_STEPS),
        )
        say("  shrunk to steps", f"{len(found)}", f"<= {GOAL_SHRUNK_STEPS}")
        say("  schedules played to get there", f"{runs}")
        print(f"    shrunk schedule: {found}")
        print(f"  ({time.perf_counter() - began:.0f} s in all)")

        if args.profile:
            print()
            print(profile_schedules(max(5, args.schedules // 3), root / "prof", top=20))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
