"""The demo: a real run of the pipeline under fire, checked at the end.

It starts the HTTP origin on 127.0.0.1 with realistic faults (503s with
Retry-After, truncated and reset bodies, a changed ETag, a slow body), plans
about 200 artifacts of mixed sizes, runs 4 worker processes, kills workers with
SIGKILL at crash points drawn from the registry, restarts them, reconciles,
runs the exactly-once checker and reports what happened.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core import CRASH_POINTS, connect, plan_jobs, reconcile_jobs
from .core.db import close
from .harness.checker import Expected, Report, check
from .pipeline.http import HttpConfig
from .pipeline.origin import Fault, Origin
from .pipeline.runner import RunResult, Supervisor
from .pipeline.worker import WorkerConfig

KIB = 1024
MIB = 1024 * KIB


@dataclass
class DemoReport:
    jobs: int
    crashes_planned: int
    crashes: int
    crash_points: list[str]
    effects_rerun: int
    bytes_served: int
    bytes_published: int
    duplicates: int
    lost: int
    failed: int
    elapsed_s: float
    check: Report
    out_dir: str
    run: RunResult = field(repr=False)

    @property
    def bytes_redownloaded(self) -> int:
        return max(0, self.bytes_served - self.bytes_published)

    def _verdict(self) -> str:
        return (
            "all hold" if self.check.ok else ", ".join(self.check.broken()) + " BROKEN"
        )

    def lines(self) -> list[str]:
        return [
            f"jobs                 {self.jobs}",
            f"crashes injected     {self.crashes} of {self.crashes_planned} planned "
            f"(SIGKILL at {len(set(self.crash_points))} crash points)",
            f"effects re-run       {self.effects_rerun}",
            f"bytes re-downloaded  {self.bytes_redownloaded:,} of {self.bytes_published:,} "
            f"({100 * self.bytes_redownloaded / max(1, self.bytes_published):.1f}%)",
            f"duplicates           {self.duplicates}",
            f"lost                 {self.lost}",
            f"failed (final)       {self.failed}",
            f"elapsed              {self.elapsed_s:.1f} s",
            f"invariants           {self._verdict()}",
        ]


def _sizes(rng: random.Random, n: int) -> list[int]:
    sizes = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.70:
            sizes.append(rng.randint(4 * KIB, 128 * KIB))
        elif roll < 0.95:
            sizes.append(rng.randint(256 * KIB, 1 * MIB))
        else:
            sizes.append(rng.randint(2 * MIB, 6 * MIB))
    return sizes


def _faults(rng: random.Random, names: list[str]) -> dict[str, Fault]:
    faults: dict[str, Fault] = {}
    picks = rng.sample(names, k=min(len(names), max(6, len(names) // 8)))
    for i, name in enumerate(picks):
        kind = i % 6
        if kind == 0:
            faults[name] = Fault(status=503, status_times=2, retry_after=0)
        elif kind == 1:
            faults[name] = Fault(
                status=429, status_times=1, retry_after=0, status_methods={"GET"}
            )
        elif kind == 2:
            faults[name] = Fault(truncate_at=3000)
        elif kind == 3:
            faults[name] = Fault(reset_at=2000)
        elif kind == 4:
            faults[name] = Fault(change_etag_after=1, truncate_at=2500)
        else:
            faults[name] = Fault(slow_chunk_delay=0.01, slow_times=1)
    return faults


#: Crash points a short demo run may never reach: no renewal within the TTL, and
#: state changes or releases made outside an op happen only on a retry or a stop.
_RARE = frozenset({"renew.before", "state.after_commit", "release.before"})


def _crash_plan(
    rng: random.Random, crashes: int, jobs_per_worker: int
) -> Callable[[int, int], list[dict[str, Any]]]:
    """Faults for successive workers, spread over the run by their hit numbers."""
    points = sorted(set(CRASH_POINTS) - _RARE)
    spread = max(2, jobs_per_worker // 2)
    queue = [
        {"point": rng.choice(points), "action": "kill", "hit": rng.randint(1, spread)}
        for _ in range(crashes)
    ]

    def plan(slot: int, generation: int) -> list[dict[str, Any]]:
        return [queue.pop(0)] if queue else []

    return plan


def run_demo(
    *,
    seed: int = 0,
    jobs: int = 200,
    workers: int = 4,
    crashes: int = 8,
    out_dir: str | None = None,
    on_tick: Callable[[dict[str, Any], RunResult], None] | None = None,
    start_method: str = "forkserver",
) -> DemoReport:
    """Run the whole demo and return its report."""
    rng = random.Random(seed)
    root = Path(out_dir or tempfile.mkdtemp(prefix="docstokg-idem-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    db_path, out = root / "jobs.db", root / "files"
    for stale in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        stale.unlink(missing_ok=True)
    names = [f"art-{i:04d}.pdf" for i in range(jobs)]
    sizes = _sizes(rng, jobs)
    started = time.monotonic()
    with Origin(
        dict(zip(names, sizes, strict=True)), seed=seed, faults=_faults(rng, names)
    ) as origin:
        cx = connect(db_path)
        try:
            rows = [
                {
                    "work_id": f"W{i // 3:04d}",
                    "artifact_id": name,
                    "url": origin.url(name),
                }
                for i, name in enumerate(names)
            ]
            ids = plan_jobs(cx, rows)
            plan = _crash_plan(rng, crashes, max(1, jobs // workers))
            template = WorkerConfig(
                out_dir=str(out),
                db_path=str(db_path),
                lease_ttl_s=30.0,
                progress_every_bytes=128 * KIB,
                http=HttpConfig(backoff_s=0.05, retries=4),
            )
            run = Supervisor(
                template,
                workers=workers,
                faults=plan,
                on_tick=on_tick,
                start_method=start_method,
            ).run()
            reconcile_jobs(cx, out)
            expected = {}
            for job_id, name in zip(ids, names, strict=True):
                want = origin.expected(name)
                expected[job_id] = Expected(
                    want.size,
                    want.sha256,
                    origin.counters(name)["full_gets"],
                    want.version,
                )
            served = origin.total_counters()["bytes_sent"]
            reruns = cx.execute(
                "SELECT coalesce(sum(runs - 1), 0) FROM ops"
            ).fetchone()[0]
            published = cx.execute(
                "SELECT coalesce(sum(size), 0), count(*) FROM manifest"
            ).fetchone()
            failed = cx.execute(
                "SELECT count(*) FROM jobs WHERE state = 'FAILED'"
            ).fetchone()[0]
        finally:
            close(cx)
    report = check(db_path, out, expected=expected)
    duplicates = sum(
        1
        for v in report.violations
        if v.invariant in ("I2", "I3", "I4", "I6") and not v.lost
    )
    lost = sum(len(v.rows) for v in report.violations if v.invariant == "I1" or v.lost)
    crash_points = [
        point
        for owner, code in run.exits
        if code and code < 0
        for point in run.armed.get(owner, [])
    ]
    return DemoReport(
        jobs=len(ids),
        crashes_planned=crashes,
        crashes=run.crashes,
        crash_points=crash_points,
        effects_rerun=int(reruns),
        bytes_served=int(served),
        bytes_published=int(published[0]),
        duplicates=duplicates,
        lost=lost,
        failed=int(failed),
        elapsed_s=time.monotonic() - started,
        check=report,
        out_dir=str(root),
        run=run,
    )


def default_out_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "docstokg-idem-demo")
