"""Many real processes planning and claiming on one SQLite file at once (I6, C06)."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from docstokg_idem import (
    SCHEMA_VERSION,
    close,
    connect,
    get_schema_version,
    lease_next_job,
    op_key,
    plan_job_if_absent,
    plan_jobs,
    run_effect,
)

pytestmark = pytest.mark.integration

CTX = multiprocessing.get_context("fork")
LONG_TTL = 600.0  # no lease may expire while the test runs


def _plan_same_job(path: str, barrier: Any, out: Any) -> None:
    """Connect (migrating if needed) and plan one job, both in step with the others."""
    barrier.wait(30)
    cx = connect(path, busy_timeout_s=2.0)
    try:
        barrier.wait(30)
        job = plan_job_if_absent(
            cx,
            work_id="W1",
            artifact_id="a1",
            canonical_url="https://example.com/a1.pdf",
        )
        out.put(job)
    finally:
        close(cx)


def _claim_loop(
    path: str,
    owner: str,
    barrier: Any,
    out: Any,
    seconds: float | None,
    file_lock: bool,
    with_writes: bool,
) -> None:
    """Claim until none is left (or for ``seconds``); report claims, lock errors."""
    cx = connect(path, migrate=False, busy_timeout_s=2.0, file_lock=file_lock)
    claims: list[tuple[str, int]] = []
    locked = 0
    try:
        barrier.wait(30)
        deadline = None if seconds is None else time.monotonic() + seconds
        while deadline is None or time.monotonic() < deadline:
            try:
                lease = lease_next_job(cx, owner=owner, ttl_s=LONG_TTL)
                if lease is None:
                    break
                claims.append((lease.job_id, lease.token))
                if with_writes:
                    lease = lease.renew()
                    run_effect(
                        cx,
                        job_id=lease.job_id,
                        kind="HEAD",
                        effect_fn=dict,
                        opkey=op_key("HEAD", lease.job_id),
                        token=lease.token,
                        owner=owner,
                    )
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                locked += 1
    finally:
        close(cx)
    out.put((owner, claims, locked))


def _run_all(procs: list[Any], out: Any, timeout: float = 60) -> list[Any]:
    for proc in procs:
        proc.start()
    results = [out.get(timeout=timeout) for _ in procs]
    for proc in procs:
        proc.join(timeout)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return results


def _plan_many(path: Path, n: int) -> list[str]:
    cx = connect(path)
    try:
        rows = [
            {
                "work_id": f"W{i}",
                "artifact_id": f"a{i}",
                "url": f"https://example.com/{i}.pdf",
            }
            for i in range(n)
        ]
        return plan_jobs(cx, rows)
    finally:
        close(cx)


def _claim_rows(path: Path) -> Counter[str]:
    raw = sqlite3.connect(path)
    try:
        got = raw.execute("SELECT job_id FROM history WHERE event = 'claim'").fetchall()
        return Counter(r[0] for r in got)
    finally:
        raw.close()


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-file", "migrated-file"])
def test_eight_processes_plan_one_job(tmp_path: Path, fresh: bool) -> None:
    """8 processes planning one job at once leave one row and agree on its id."""
    path = tmp_path / "jobs.db"
    if not fresh:
        close(connect(path))
    barrier, out = CTX.Barrier(8), CTX.Queue()
    procs = [
        CTX.Process(target=_plan_same_job, args=(str(path), barrier, out))
        for _ in range(8)
    ]

    ids = _run_all(procs, out)

    cx = connect(path)
    try:
        assert len(set(ids)) == 1
        assert [tuple(r) for r in cx.execute("SELECT job_id FROM jobs")] == [(ids[0],)]
        assert get_schema_version(cx) == SCHEMA_VERSION
        assert cx.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        close(cx)


def test_four_processes_claim_every_job_once(tmp_path: Path) -> None:
    """4 processes draining 400 jobs claim each once, token 1, no lock error."""
    path = tmp_path / "jobs.db"
    jobs = _plan_many(path, 400)
    barrier, out = CTX.Barrier(4), CTX.Queue()
    procs = [
        CTX.Process(
            target=_claim_loop,
            args=(str(path), f"w{i}", barrier, out, None, True, False),
        )
        for i in range(4)
    ]

    results = _run_all(procs, out)

    claims = [c for _, got, _ in results for c in got]
    assert sum(locked for _, _, locked in results) == 0
    assert sorted(job for job, _ in claims) == sorted(jobs)
    assert {token for _, token in claims} == {1}
    assert _claim_rows(path) == Counter({job: 1 for job in jobs})
    assert sum(1 for _, got, _ in results if got) >= 2  # the work was actually shared


@pytest.mark.parametrize("file_lock", [True, False], ids=["file-lock", "sqlite-only"])
def test_eight_processes_claim_renew_record_for_two_seconds(
    tmp_path: Path, file_lock: bool
) -> None:
    """8 processes claim, renew, record for 2 s: no job twice, no lock error (C06)."""
    path = tmp_path / "jobs.db"
    jobs = set(_plan_many(path, 20_000))
    barrier, out = CTX.Barrier(8), CTX.Queue()
    procs = [
        CTX.Process(
            target=_claim_loop,
            args=(str(path), f"w{i}", barrier, out, 2.0, file_lock, True),
        )
        for i in range(8)
    ]

    results = _run_all(procs, out)

    claims = [c for _, got, _ in results for c in got]
    claimed = Counter(job for job, _ in claims)
    assert sum(locked for _, _, locked in results) == 0
    assert 0 < len(claimed) < len(jobs)
    assert set(claimed) <= jobs
    assert max(claimed.values()) == 1
    assert {token for _, token in claims} == {1}
    assert _claim_rows(path) == claimed
    raw = sqlite3.connect(path)
    try:
        recorded = raw.execute("SELECT count(*) FROM ops WHERE status = 'SUCCEEDED'")
        assert recorded.fetchone()[0] >= len(claimed) - 8  # at most one unfinished each
    finally:
        raw.close()
