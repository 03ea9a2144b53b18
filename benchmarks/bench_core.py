"""Throughput of the idempotency core, measured on a WAL file in a temp folder.

Run ``python benchmarks/bench_core.py [--jobs N] [--procs 4] [--profile]``.
It prints one table: each figure, its goal where the product has one, and
whether the figure meets it. Nothing here is a test; the figures depend on the
machine, so the raw SQLite commit rate of the same run is printed as the
baseline to compare against.

A *lifecycle* is what a worker does for one job: lease it, run HEAD (then
HEAD_DONE), advance to STREAMING, run STREAM, run FINALIZE (then FINALIZED),
each effect under the lease token, and release. The effects do no I/O, so the
figures are the core's own cost.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing as mp
import os
import pstats
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from docstokg_idem import (
    Connection,
    JobState,
    Lease,
    advance_state,
    close,
    connect,
    lease_next_job,
    op_key,
    plan_job_if_absent,
    plan_jobs,
    release_lease,
    run_effect,
)

OWNER = "bench"
LEASE_TTL_S = 300.0
GOAL_LIFECYCLES_1P = 3_000.0
GOAL_LIFECYCLES_4P = 3_000.0
GOAL_SCALE_LOSS = 0.15  # 100k planned jobs within 15 % of 10k
GOAL_BULK_PLAN = 50_000.0


# --- one lifecycle -------------------------------------------------------------


def _spec(i: int) -> dict[str, Any]:
    return {
        "work_id": f"W{i}",
        "artifact_id": "pdf",
        "url": f"https://example.org/{i}.pdf",
    }


def _effect(
    cx: Connection, lease: Lease, kind: str, then: JobState | None, **options: Any
) -> None:
    run_effect(
        cx,
        job_id=lease.job_id,
        kind=kind,
        opkey=op_key(kind, lease.job_id),
        effect_fn=lambda: {"kind": kind, "size": 1234},
        token=lease.token,
        owner=lease.lease_owner,
        then_state=then,
        **options,
    )


def work_one(cx: Connection, owner: str = OWNER, lean: bool = False) -> bool:
    """Lease the next job and take it to FINALIZED; ``False`` if none is left.

    ``lean`` uses the options that fold steps into fewer transactions: HEAD
    ``first_wins`` (no in-progress record), the move to STREAMING in STREAM's
    start (``start_state``), the release in FINALIZE's record (``then_release``).
    """
    lease = lease_next_job(cx, owner=owner, ttl_s=LEASE_TTL_S)
    if lease is None:
        return False
    if lean:
        _effect(cx, lease, "HEAD", JobState.HEAD_DONE, mode="first_wins")
        _effect(cx, lease, "STREAM", None, start_state=JobState.STREAMING)
        _effect(cx, lease, "FINALIZE", JobState.FINALIZED, then_release=True)
        return True
    _effect(cx, lease, "HEAD", JobState.HEAD_DONE)
    advance_state(
        cx, job_id=lease.job_id, to_state=JobState.STREAMING, token=lease.token
    )
    _effect(cx, lease, "STREAM", None)
    _effect(cx, lease, "FINALIZE", JobState.FINALIZED)
    release_lease(cx, job_id=lease.job_id, owner=owner, token=lease.token, strict=True)
    return True


def plan_and_work(cx: Connection, i: int, lean: bool = False) -> None:
    """The whole lifecycle of the brief: plan one job, then work it."""
    spec = _spec(i)
    plan_job_if_absent(
        cx,
        work_id=spec["work_id"],
        artifact_id=spec["artifact_id"],
        canonical_url=spec["url"],
    )
    if not work_one(cx, lean=lean):
        raise RuntimeError(f"job {i} was planned but could not be leased")


# --- helpers -------------------------------------------------------------------


@contextmanager
def database(synchronous: str = "NORMAL") -> Iterator[tuple[Connection, str]]:
    """A fresh job database in a temp folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="idem-bench-") as folder:
        path = os.path.join(folder, "jobs.db")
        cx = connect(path, synchronous=synchronous)
        try:
            yield cx, path
        finally:
            close(cx)


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    start = time.perf_counter()
    count = fn()
    return count, time.perf_counter() - start


def _rate(n: float) -> str:
    return f"{n:,.0f}/s"


def _meets(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# --- the measurements ----------------------------------------------------------


def median_of(rates: list[float]) -> tuple[float, str]:
    """The median rate and the spread of the rounds, for the table."""
    ordered = sorted(rates)
    middle = ordered[len(ordered) // 2]
    return middle, f"{ordered[0]:,.0f}..{ordered[-1]:,.0f}"


def raw_commit_rate(commits: int, rounds: int) -> list[float]:
    """Plain sqlite3: WAL, synchronous=NORMAL, one small INSERT per transaction."""
    with tempfile.TemporaryDirectory(prefix="idem-bench-") as folder:
        cx = sqlite3.connect(os.path.join(folder, "raw.db"), isolation_level=None)
        cx.execute("PRAGMA journal_mode = WAL")
        cx.execute("PRAGMA synchronous = NORMAL")
        cx.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")

        def run() -> int:
            for i in range(commits):
                cx.execute("BEGIN IMMEDIATE")
                cx.execute("INSERT INTO t (v) VALUES (?)", (f"row {i}",))
                cx.execute("COMMIT")
            return commits

        rates = [commits / timed(run)[1] for _ in range(rounds)]
        cx.close()
    return rates


def count_statements(lifecycles: int, lean: bool = False) -> tuple[float, float]:
    """Transactions (COMMITs) and SQL statements per lifecycle, plan included."""
    with database() as (cx, _):
        plan_and_work(cx, -1, lean)  # warm up: migrations and statement cache
        seen: list[str] = []
        cx.set_trace_callback(seen.append)
        for i in range(lifecycles):
            plan_and_work(cx, i, lean)
        cx.set_trace_callback(None)
    commits = sum(1 for s in seen if s.strip().upper() == "COMMIT")
    return commits / lifecycles, len(seen) / lifecycles


@dataclass(frozen=True)
class Variant:
    """One way of running the single-process lifecycle."""

    synchronous: str = "NORMAL"
    lean: bool = False
    per_round: int = 400


def lifecycle_rates(
    variants: dict[str, Variant], rounds: int
) -> dict[str, list[float]]:
    """Plan one job and work it, in one process, for each variant.

    The variants take turns round by round, so that a slow spell of the disk
    hits them alike.
    """
    rates: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="idem-bench-") as folder:
        cxs = {
            name: connect(os.path.join(folder, f"{name}.db"), synchronous=v.synchronous)
            for name, v in variants.items()
        }
        next_id = 0
        for name, cx in cxs.items():
            plan_and_work(cx, -1, variants[name].lean)
        for _ in range(rounds):
            for name, cx in cxs.items():
                v = variants[name]
                first, next_id = next_id, next_id + v.per_round

                def run(cx: Connection = cx, first: int = first, v: Variant = v) -> int:
                    for i in range(first, first + v.per_round):
                        plan_and_work(cx, i, v.lean)
                    return v.per_round

                count, seconds = timed(run)
                rates[name].append(count / seconds)
        for cx in cxs.values():
            close(cx)
    return rates


def _plan_many(cx: Connection, count: int, batch: int = 50_000) -> float:
    """Plan ``count`` jobs in bulk; return the seconds it took."""
    began = time.perf_counter()
    for low in range(0, count, batch):
        plan_jobs(cx, [_spec(i) for i in range(low, min(count, low + batch))])
    return time.perf_counter() - began


def bulk_plan_rate(rows: int) -> float:
    """One plan_jobs call with ``rows`` new jobs."""
    with database() as (cx, _):
        specs = [_spec(i) for i in range(rows)]
        _, seconds = timed(lambda: len(plan_jobs(cx, specs)))
    return rows / seconds


def backlog_rates(
    backlogs: tuple[int, ...], per_round: int, rounds: int
) -> dict[int, list[float]]:
    """Lease, effects and release on databases holding each backlog of planned jobs.

    The databases take turns round by round, like :func:`lifecycle_rates`.
    """
    rates: dict[int, list[float]] = {b: [] for b in backlogs}
    with tempfile.TemporaryDirectory(prefix="idem-bench-") as folder:
        cxs = {}
        for backlog in backlogs:
            cxs[backlog] = connect(os.path.join(folder, f"{backlog}.db"))
            _plan_many(cxs[backlog], backlog)
            cxs[backlog].execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for _ in range(rounds):
            for backlog, cx in cxs.items():

                def run(cx: Connection = cx) -> int:
                    done = 0
                    while done < per_round and work_one(cx):
                        done += 1
                    return done

                count, seconds = timed(run)
                rates[backlog].append(count / seconds)
        for cx in cxs.values():
            close(cx)
    return rates


def _worker(path: str, owner: str, start: Any, out: Any) -> None:
    cx = connect(path)
    done = 0
    start.wait()
    began = time.time()
    while work_one(cx, owner):
        done += 1
    ended = time.time()
    close(cx)
    out.put((done, began, ended))


def multi_process_rate(procs: int, jobs: int) -> float:
    """``procs`` processes work ``jobs`` pre-planned jobs until none is left.

    Each worker opens its own connection after the fork (C08).
    """
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="idem-bench-") as folder:
        path = os.path.join(folder, "jobs.db")
        cx = connect(path)
        _plan_many(cx, jobs)
        close(cx)  # each worker opens its own connection (C08)
        start, out = ctx.Event(), ctx.Queue()
        workers = [
            ctx.Process(target=_worker, args=(path, f"w{n}", start, out))
            for n in range(procs)
        ]
        for w in workers:
            w.start()
        time.sleep(0.5)  # let every worker connect before the clock starts
        start.set()
        results: list[tuple[int, float, float]] = [
            out.get(timeout=600) for _ in workers
        ]
        for w in workers:
            w.join()
    done = sum(r[0] for r in results)
    if done != jobs:
        raise RuntimeError(f"{procs} workers finished {done} of {jobs} planned jobs")
    span = max(r[2] for r in results) - min(r[1] for r in results)
    return float(done / span)


def profile_lifecycle(lifecycles: int, top: int) -> str:
    """cProfile of the single-process lifecycle, by own time and by total time."""
    with database() as (cx, _):
        plan_and_work(cx, -1)
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(lifecycles):
            plan_and_work(cx, i)
        profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats("docstokg_idem", top)
    return text.getvalue()


def sql_time_by_statement(lifecycles: int) -> str:
    """Where a lifecycle's time goes: each SQL statement's share, and Python's.

    Times every ``execute`` of the core's connections (this process only, by
    wrapping the method on the class), without cProfile's per-call overhead.
    """
    spent: dict[str, list[float]] = {}

    def timing(method: Callable[..., Any], tag: str) -> Callable[..., Any]:
        def timed_method(self: sqlite3.Connection, sql: str, *args: Any) -> Any:
            began = time.perf_counter()
            try:
                return method(self, sql, *args)
            finally:
                entry = spent.setdefault(tag + " ".join(sql.split())[:60], [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - began

        return timed_method

    with database() as (cx, _):
        plan_and_work(cx, -1)
        Connection.execute = timing(sqlite3.Connection.execute, "")  # type: ignore[method-assign]
        Connection.executemany = timing(  # type: ignore[method-assign]
            sqlite3.Connection.executemany, "(many) "
        )
        try:
            began = time.perf_counter()
            for i in range(lifecycles):
                plan_and_work(cx, i)
            total = time.perf_counter() - began
        finally:
            del Connection.execute, Connection.executemany
    in_sql = sum(t for _, t in spent.values())
    lines = [
        f"per lifecycle: {total / lifecycles * 1e6:,.0f} us, of which SQL "
        f"{in_sql / lifecycles * 1e6:,.0f} us and Python "
        f"{(total - in_sql) / lifecycles * 1e6:,.0f} us",
        f"  {'us/lifecycle':>12} {'calls':>6} {'us/call':>8}  statement",
    ]
    for sql, (calls, seconds) in sorted(spent.items(), key=lambda kv: -kv[1][1]):
        lines.append(
            f"  {seconds / lifecycles * 1e6:12.1f} {calls / lifecycles:6.1f} "
            f"{seconds / calls * 1e6:8.1f}  {sql}"
        )
    return "\n".join(lines)


# --- the report ----------------------------------------------------------------

ROUNDS = 5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jobs",
        type=int,
        default=2_000,
        help="lifecycles per single-process figure, and jobs for the "
        "multi-process figure (default 2000)",
    )
    parser.add_argument(
        "--procs",
        type=int,
        default=4,
        help="processes for the multi-process figure (default 4)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print where a single-process lifecycle spends its time: "
        "SQL time by statement, then a cProfile",
    )
    args = parser.parse_args(argv)
    n = args.jobs
    per_round = max(1, n // ROUNDS)
    began = time.perf_counter()

    def say(
        what: str, figure: str, spread: str = "", goal: str = "", verdict: str = ""
    ) -> None:
        print(
            f"  {what:<46} {figure:>11} {spread:>15}  {goal:>11}  {verdict}", flush=True
        )

    print(
        f"docstokg-idem core benchmark: {os.cpu_count()} CPUs, SQLite "
        f"{sqlite3.sqlite_version}, Python {sys.version.split()[0]}, "
        f"--jobs {n}, median of {ROUNDS} rounds (spread: slowest..fastest)"
    )
    say("measure", "figure", "spread", "goal", "verdict")

    raw, spread = median_of(raw_commit_rate(max(2_000, n), ROUNDS))
    say("raw SQLite commits (WAL, NORMAL, 1 INSERT)", _rate(raw), spread)

    per_tx, per_stmt = count_statements(200)
    lean_tx, lean_stmt = count_statements(200, lean=True)
    modes = lifecycle_rates(
        {
            "NORMAL": Variant(per_round=per_round),
            "FULL": Variant("FULL", per_round=max(1, per_round // 4)),
            "lean": Variant(lean=True, per_round=per_round),
        },
        ROUNDS,
    )
    one, spread = median_of(modes["NORMAL"])
    say(
        "lifecycles, 1 process (plan + lease..release)",
        _rate(one),
        spread,
        f">= {GOAL_LIFECYCLES_1P:,.0f}/s",
        _meets(one >= GOAL_LIFECYCLES_1P),
    )
    say("  transactions per lifecycle", f"{per_tx:.1f}")
    say("  SQL statements per lifecycle", f"{per_stmt:.1f}")
    say("  one lifecycle costs, in raw commits", f"{raw / one:.1f}")
    say("  one transaction costs, in raw commits", f"{raw / one / per_tx:.1f}")
    lean, spread = median_of(modes["lean"])
    say(
        "  lean: first_wins, start_state, then_release",
        _rate(lean),
        spread,
        f">= {GOAL_LIFECYCLES_1P:,.0f}/s",
        _meets(lean >= GOAL_LIFECYCLES_1P),
    )
    say("    transactions, statements per lifecycle", f"{lean_tx:.0f}, {lean_stmt:.0f}")

    many = multi_process_rate(args.procs, max(n, 1_000))
    say(
        f"lifecycles, {args.procs} processes in all (pre-planned)",
        _rate(many),
        "",
        f">= {GOAL_LIFECYCLES_4P:,.0f}/s",
        _meets(many >= GOAL_LIFECYCLES_4P),
    )

    backlog = backlog_rates((10_000, 100_000), per_round, ROUNDS)
    small, spread_small = median_of(backlog[10_000])
    large, spread_large = median_of(backlog[100_000])
    loss = 1 - large / small
    say("lease..release, 10,000 jobs planned", _rate(small), spread_small)
    say("lease..release, 100,000 jobs planned", _rate(large), spread_large)
    say(
        "  100k slower than 10k by",
        f"{loss:+.1%}",
        "",
        f"<= {GOAL_SCALE_LOSS:.0%}",
        _meets(loss <= GOAL_SCALE_LOSS),
    )

    bulk = bulk_plan_rate(50_000)
    say(
        "bulk planning (plan_jobs, 50,000 rows)",
        _rate(bulk),
        "",
        f">= {GOAL_BULK_PLAN:,.0f}/s",
        _meets(bulk >= GOAL_BULK_PLAN),
    )

    full, spread = median_of(modes["FULL"])
    say("lifecycles, 1 process, synchronous=FULL", _rate(full), spread)
    say(
        "  FULL slower than NORMAL by",
        f"{1 - full / one:+.1%}",
        "",
        "",
        f"{(1 / full - 1 / one) * 1e3:+.1f} ms per lifecycle",
    )

    print(f"  ({time.perf_counter() - began:.0f} s in all)")
    if args.profile:
        print()
        print(sql_time_by_statement(min(n, 1_000)))
        print()
        print(profile_lifecycle(min(n, 2_000), top=25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
