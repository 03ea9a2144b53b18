"""End-to-end tests of the download pipeline: real processes, SQLite, HTTP, signals."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _pipeline_helpers import (
    FAST_HTTP,
    WorkerProcess,
    expected,
    finalized_count,
    finals,
    job,
    ops,
    parts,
    plan,
    read,
    rows_for,
    run_inline,
    start_worker,
    table_dump,
    worker_config,
)

from docstokg_idem import (
    CRASH_POINTS,
    FakeClock,
    JobState,
    Lease,
    LeaseLost,
    SharedClock,
    canonical_url,
    close,
    connect,
    job_key,
    op_key,
    reconcile_jobs,
    record_progress,
)
from docstokg_idem.core import crashpoints
from docstokg_idem.core.files import sha256_file
from docstokg_idem.core.jobs import expire_owner_leases
from docstokg_idem.harness.checker import Expected, check, check_gate_off
from docstokg_idem.pipeline import worker as worker_module
from docstokg_idem.pipeline.legacy import download_untracked
from docstokg_idem.pipeline.origin import Fault, Origin
from docstokg_idem.pipeline.runner import Supervisor
from docstokg_idem.pipeline.worker import EnvironmentTrouble, WorkerStats

pytestmark = pytest.mark.integration

NAME = "paper.pdf"
SIZE = 200_000  # three progress records of 64 KiB, some thirteen chunks of 16 KiB


@pytest.fixture
def origin() -> Iterator[Origin]:
    with Origin({NAME: SIZE}, seed=11) as server:
        yield server


def _snapshot(root: Path, job_id: str, origin: Origin) -> dict[str, Any]:
    """What a dead worker left: state, ops, lease, files and requests."""
    row = job(root / "jobs.db", job_id)
    by_kind = ops(root / "jobs.db", job_id)
    part_sizes = parts(root / "out")
    stream = by_kind.get("STREAM")
    counters = origin.counters(NAME)
    return {
        "state": row["state"],
        "ops": {kind: op["status"] for kind, op in by_kind.items()},
        "lease_owner": row["lease_owner"],
        "final": job_id in finals(root / "out"),
        "part": _amount(part_sizes.get(1)),
        "progress": _amount(stream["progress"] if stream else None),
        "heads": counters["methods"]["HEAD"],
        "gets": counters["methods"]["GET"],
        "manifest": len(read(root / "jobs.db", "SELECT * FROM manifest")),
    }


def _amount(n: int | None) -> str | None:
    if n is None:
        return None
    return "empty" if n == 0 else "full" if n == SIZE else "partial"


_S, _IP = "SUCCEEDED", "IN_PROGRESS"
_HEAD_OK = {"HEAD": _S}
_STREAMING = {"HEAD": _S, "STREAM": _IP}
_FINALIZING = {"HEAD": _S, "STREAM": _S, "FINALIZE": _IP}

#: What the database, the folder and the origin show after a SIGKILL at each
#: point's first hit: proof that the process died exactly there.
AT_DEATH: dict[str, dict[str, Any]] = {
    "claim.after_commit": {"state": "LEASED", "ops": {}, "heads": 0},
    "op.after_start": {"state": "LEASED", "ops": {"HEAD": _IP}, "heads": 0},
    "head.before_request": {"state": "LEASED", "ops": {"HEAD": _IP}, "heads": 0},
    "head.after_response": {"state": "LEASED", "ops": {"HEAD": _IP}, "heads": 1},
    "op.after_effect": {"state": "LEASED", "ops": {"HEAD": _IP}, "heads": 1},
    "op.after_record": {"state": "HEAD_DONE", "ops": _HEAD_OK, "gets": 0},
    "state.after_commit": {  # reached on a retry: the replayed HEAD's edge
        "state": "HEAD_DONE",
        "ops": {"HEAD": _S, "STREAM": "FAILED"},
        "heads": 1,
    },
    "stream.after_open": {
        "state": "STREAMING",
        "ops": _STREAMING,
        "part": "empty",
        "gets": 0,
    },
    "stream.after_chunk": {
        "ops": _STREAMING,
        "part": "partial",
        "progress": "empty",
        "gets": 1,
    },
    "renew.before": {"ops": _STREAMING, "part": "partial", "progress": "empty"},
    "stream.after_progress": {
        "ops": _STREAMING,
        "part": "partial",
        "progress": "partial",
    },
    "stream.before_fsync": {"ops": _STREAMING, "part": "full", "progress": "partial"},
    "stream.after_fsync": {"ops": _STREAMING, "part": "full", "progress": "partial"},
    "finalize.before_replace": {
        "state": "STREAMING",
        "ops": _FINALIZING,
        "part": "full",
        "final": False,
    },
    "finalize.after_replace": {
        "state": "STREAMING",
        "ops": _FINALIZING,
        "part": None,
        "final": True,
    },
    "finalize.after_dirsync": {
        "state": "STREAMING",
        "ops": _FINALIZING,
        "part": None,
        "final": True,
    },
    "index.before_record": {
        "state": "FINALIZED",
        "ops": {**_FINALIZING, "FINALIZE": _S},
        "manifest": 0,
        "lease_owner": "w1",
    },
    "index.after_record": {"state": "INDEXED", "manifest": 1, "lease_owner": None},
    "release.before": {  # reached on a stop: the lease is given back mid-stream
        "state": "STREAMING",
        "lease_owner": "w1",
        "part": "partial",
        "progress": "partial",
    },
}


def test_every_crash_point_has_an_expected_outcome() -> None:
    """The kill table above covers exactly the declared crash points."""
    assert set(AT_DEATH) == set(CRASH_POINTS)


def _fail_once(tmp_path: Path, origin: Origin, job_id: str) -> None:
    """Make the job FAILED retryable after its HEAD, its backoff already over."""
    origin.set_fault(NAME, status=503, status_times=None, status_methods={"GET"})
    cx = connect(tmp_path / "jobs.db", clock=FakeClock(start=time.time() - 100))
    try:
        run_inline(worker_config(tmp_path, owner="w0"), cx=cx)
    finally:
        close(cx)
    origin.clear_fault(NAME)
    row = job(tmp_path / "jobs.db", job_id)
    assert (row["state"], row["claimable"]) == ("FAILED", 1), row


def _start_victim(
    tmp_path: Path, origin: Origin, job_id: str, point: str
) -> WorkerProcess:
    """A worker armed to SIGKILL itself at ``point``, arranged so that it gets there."""
    kill = [{"point": point, "action": "kill", "hit": 1}]
    if point == "renew.before":  # renew at every chunk
        return start_worker(worker_config(tmp_path, renew_every_s=0.0), faults=kill)
    if point == "state.after_commit":  # a retry out of FAILED
        _fail_once(tmp_path, origin, job_id)
    if point != "release.before":
        return start_worker(worker_config(tmp_path), faults=kill)
    victim = start_worker(
        worker_config(tmp_path), faults=kill, stop_at="stream.after_chunk:6"
    )
    victim.wait_stopped()  # then asked to stop: it records progress and releases
    victim.proc.send_signal(signal.SIGTERM)
    victim.proc.send_signal(signal.SIGCONT)
    return victim


@pytest.mark.parametrize("order", ["worker-first", "reconcile-first"])
@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_sigkill_at_crash_point_then_recovery(
    tmp_path: Path, origin: Origin, point: str, order: str
) -> None:
    """SIGKILL at a point's 1st hit; expiry, an heir and reconcile: no violation."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    (job_id,) = plan(db, rows_for(origin, [NAME]))
    victim = _start_victim(tmp_path, origin, job_id, point)

    assert victim.wait() == -signal.SIGKILL
    at_death = _snapshot(tmp_path, job_id, origin)
    assert {k: at_death[k] for k in AT_DEATH[point]} == AT_DEATH[point]
    before = check(db, out, expected=expected(origin, {NAME: job_id}))
    if at_death["state"] not in ("INDEXED", "FINALIZED"):
        assert "I1" in before.broken(), before

    cx = connect(db)
    try:
        held = int(at_death["lease_owner"] == "w1")
        assert expire_owner_leases(cx, owner="w1", why="killed by the test") == held
        if at_death["state"] == "FINALIZED":  # published, not indexed, nobody on it
            lost = check(db, out, expected=expected(origin, {NAME: job_id}))
            assert [v.invariant for v in lost.violations if v.lost] == ["I3"], lost
        if order == "reconcile-first":
            reconcile_jobs(cx, out)
        stats = run_inline(worker_config(tmp_path, owner="w2"), cx=cx)
        reconcile_jobs(cx, out)
    finally:
        close(cx)

    report = check(db, out, expected=expected(origin, {NAME: job_id}))
    assert report.ok, str(report)
    assert job(db, job_id)["state"] == "INDEXED"
    assert sha256_file(finals(out)[job_id]) == (origin.expected(NAME).sha256, SIZE)
    assert parts(out) == {}
    assert stats.jobs_failed == stats.lease_lost == 0
    assert origin.counters(NAME)["full_gets"] <= 2


# --- the checker goes red ---------------------------------------------------------


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One clean tracked run of two artifacts, to copy and damage."""
    root = tmp_path_factory.mktemp("clean")
    names = [NAME, "page.html"]
    with Origin({NAME: SIZE, "page.html": 3_000}, seed=11) as server:
        ids = dict(
            zip(names, plan(root / "jobs.db", rows_for(server, names)), strict=True)
        )
        run_inline(worker_config(root))
        want = expected(server, ids)
    return root, want


def _damage_byte(root: Path, job_id: str) -> None:
    path = finals(root / "out")[job_id]
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))


def _sql(*statements: str) -> Any:
    def damage(root: Path, job_id: str) -> None:
        cx = sqlite3.connect(root / "jobs.db")
        with cx:
            for statement in statements:
                cx.execute(statement, {"job_id": job_id})
        cx.close()

    return damage


#: A damaged outcome, and the invariant the checker must name for it.
DAMAGES: dict[str, tuple[Any, str]] = {
    "byte flipped": (_damage_byte, "I2"),
    "final deleted": (lambda root, j: finals(root / "out")[j].unlink(), "I2"),
    "stray final": (
        lambda root, j: (root / "out" / ("0" * 64 + ".pdf")).write_bytes(b"x"),
        "I2",
    ),
    "dead part left": (
        lambda root, j: (root / "out" / f"{j}.7.part").write_bytes(b"x"),
        "I8",
    ),
    "second finalize": (
        _sql(
            "INSERT INTO history (job_id, event, from_state, to_state, "
            "token, owner, at) SELECT job_id, 'state', 'STREAMING', "
            "'FINALIZED', 1, 'w1', at FROM history WHERE job_id = "
            ":job_id AND to_state = 'FINALIZED'"
        ),
        "I3",
    ),
    "manifest lost": (_sql("DELETE FROM manifest WHERE job_id = :job_id"), "I3"),
    "index lost": (
        _sql(
            "DELETE FROM manifest WHERE job_id = :job_id",
            "DELETE FROM ops WHERE job_id = :job_id AND kind = 'INDEX'",
            "DELETE FROM history WHERE job_id = :job_id AND to_state = 'INDEXED'",
            "UPDATE jobs SET state = 'FINALIZED' WHERE job_id = :job_id",
        ),
        "I3",
    ),
    "left streaming": (
        _sql(
            "UPDATE jobs SET state = 'STREAMING', claimable = 1 WHERE job_id = :job_id"
        ),
        "I1",
    ),
    "state moved back": (
        _sql(
            "UPDATE history SET to_state = 'PLANNED' WHERE job_id = "
            ":job_id AND to_state = 'HEAD_DONE'"
        ),
        "I5",
    ),
    "stream ran twice": (
        _sql("UPDATE ops SET runs = 2 WHERE job_id = :job_id AND kind = 'STREAM'"),
        "I9",
    ),
    "stale token recorded": (
        _sql("UPDATE ops SET token = 9 WHERE job_id = :job_id AND kind = 'INDEX'"),
        "I7",
    ),
    "token reused": (
        _sql(
            "INSERT INTO history (job_id, event, from_state, to_state, "
            "token, owner, at, lease_until) SELECT job_id, 'claim', "
            "'INDEXED', 'INDEXED', 2, 'w9', at, at + 60 FROM history "
            "WHERE job_id = :job_id AND event = 'claim'"
        ),
        "I6",
    ),
    "key of other fields": (
        _sql("UPDATE jobs SET artifact_id = 'other' WHERE job_id = :job_id"),
        "I12",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_checker_flags_a_damaged_run(
    tmp_path: Path, clean_run: tuple[Path, dict[str, Any]], damage: str
) -> None:
    """A clean run passes the checker; each kind of damage is named by its invariant."""
    source, want = clean_run
    root = tmp_path / "run"
    shutil.copytree(source, root)
    (job_id,) = [j for j in want if want[j].size == SIZE]
    assert check(root / "jobs.db", root / "out", expected=want).ok

    apply, invariant = DAMAGES[damage]
    apply(root, job_id)

    report = check(root / "jobs.db", root / "out", expected=want)
    assert invariant in report.broken()
    assert any(v.lost for v in report.violations) == (damage == "index lost")


def test_checker_flags_full_gets_over_the_leases(
    tmp_path: Path, clean_run: tuple[Path, dict[str, Any]]
) -> None:
    """I9: more full GETs than leases plus validator changes is flagged."""
    source, want = clean_run
    (job_id,) = [j for j in want if want[j].size == SIZE]
    assert want[job_id].full_gets == 1
    too_many = {**want, job_id: dataclasses.replace(want[job_id], full_gets=2)}
    changed = {
        **want,
        job_id: dataclasses.replace(want[job_id], full_gets=2, validator_changes=1),
    }

    assert check(source / "jobs.db", source / "out", expected=too_many).broken() == [
        "I9"
    ]
    assert check(source / "jobs.db", source / "out", expected=changed).ok


# --- C05: a zombie writes after its lease moved on -----------------------------------


#: Where the zombie is held, what it tries on resuming, the words of the refusal,
#: and where the heir is held: its FINALIZE recorded, its lease live, no lock held.
ZOMBIES = {
    "renew": (
        "stream.after_progress",
        {"renew_every_s": 1.0},
        "renew refused",
        "op.after_record:2",
    ),
    "record": (
        "stream.after_progress",
        {"renew_every_s": 1e9},
        "progress record refused",
        "op.after_record:2",
    ),
    "rename": (
        "op.after_start:3",
        {"renew_every_s": 1e9},
        "FINALIZE effect refused",
        "op.after_record:1",
    ),
}


@pytest.mark.parametrize("attempt", sorted(ZOMBIES))
def test_zombie_is_refused_after_its_lease_moved_on(
    tmp_path: Path, origin: Origin, attempt: str
) -> None:
    """C05: a paused worker past its lease has every write refused; no row changes."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    clock = SharedClock(tmp_path / "clock", start=time.time())
    (job_id,) = plan(db, rows_for(origin, [NAME]))
    where, renewal, refusal, heir_hold = ZOMBIES[attempt]
    zombie = start_worker(
        worker_config(tmp_path, owner="w1", lease_ttl_s=10.0, **renewal),
        stop_at=where,
        clock_file=tmp_path / "clock",
    )
    zombie.wait_stopped()
    assert job(db, job_id)["lease_owner"] == "w1"

    clock.advance(11.0)  # the zombie's lease is past its TTL
    heir = start_worker(
        worker_config(tmp_path, owner="w2", lease_ttl_s=600.0),
        stop_at=heir_hold,
        clock_file=tmp_path / "clock",
    )
    try:
        heir.wait_stopped()
        before = table_dump(db)
        final = finals(out)[job_id]
        inode = final.stat().st_ino
        heir_row = job(db, job_id)
        assert (heir_row["state"], heir_row["lease_owner"]) == ("FINALIZED", "w2")
        assert heir_row["lease_token"] == 2 and heir_row["lease_until"] > clock.wall()

        zombie.proc.send_signal(signal.SIGCONT)
        zombie_stats = zombie.stats()

        assert table_dump(db) == before
        assert refusal in zombie.stderr
        assert zombie_stats["lease_lost"] == 1 and zombie_stats["jobs_done"] == 0
        assert final.stat().st_ino == inode
        assert sha256_file(final) == (origin.expected(NAME).sha256, SIZE)
        assert finalized_count(db, job_id) == 1
        _stale_lease_is_refused(db, job_id, clock)
        assert table_dump(db) == before
    finally:
        heir.proc.send_signal(signal.SIGCONT)
        zombie.kill()
    assert heir.stats()["jobs_done"] == 1

    report = check(db, out, expected=expected(origin, {NAME: job_id}))
    assert report.ok, str(report)


def _stale_lease_is_refused(db: Path, job_id: str, clock: SharedClock) -> None:
    """The zombie's token-1 lease: renew, advance, fail, release raise LeaseLost."""
    cx = connect(db, clock=clock)
    try:
        current = job(db, job_id)
        stale = Lease(
            job_id=job_id,
            work_id=current["work_id"],
            artifact_id=current["artifact_id"],
            url=current["url"],
            expected_sha256=None,
            state="STREAMING",
            attempts=1,
            lease_owner="w1",
            lease_until=clock.wall() - 1,
            token=1,
            ttl_s=10.0,
            acquired_monotonic=clock.monotonic() - 11,
            cx=cx,
        )
        for write in (
            stale.renew,
            stale.release,
            lambda: stale.fail("zombie"),
            lambda: stale.advance(JobState.FINALIZED),
        ):
            with pytest.raises(LeaseLost):
                write()
        with pytest.raises(LeaseLost):
            record_progress(
                cx,
                opkey=op_key("STREAM", job_id),
                token=1,
                owner="w1",
                job_id=job_id,
                progress=1,
                meta={"token": 1},
            )
    finally:
        close(cx)


# --- resume, validators, limits, names ------------------------------------------------


def _kill_then_recover(
    tmp_path: Path, job_id: str, fault: dict[str, Any]
) -> tuple[dict[str, Any], WorkerStats]:
    """Kill a worker at ``fault``; return its STREAM op at death, the heir's stats."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    victim = start_worker(worker_config(tmp_path), faults=[{**fault, "action": "kill"}])
    assert victim.wait() == -signal.SIGKILL
    at_death = ops(db, job_id)["STREAM"]
    at_death["part_size"] = parts(out)[1]
    cx = connect(db)
    try:
        expire_owner_leases(cx, owner="w1", why="killed by the test")
        stats = run_inline(worker_config(tmp_path, owner="w2"), cx=cx)
        reconcile_jobs(cx, out)
    finally:
        close(cx)
    return at_death, stats


def test_resume_after_kill_fetches_only_unrecorded_bytes(
    tmp_path: Path, origin: Origin
) -> None:
    """I9: the heir copies the recorded bytes and asks the origin for the rest only."""
    (job_id,) = plan(tmp_path / "jobs.db", rows_for(origin, [NAME]))

    at_death, stats = _kill_then_recover(
        tmp_path, job_id, {"point": "stream.after_chunk", "hit": 10}
    )

    recorded = at_death["progress"]
    assert 0 < recorded < at_death["part_size"] < SIZE  # unrecorded bytes were on disk
    counters = origin.counters(NAME)
    assert counters["range_starts"] == {recorded: 1}
    assert counters["full_gets"] == 1
    assert (stats.bytes_copied, stats.bytes_received) == (recorded, SIZE - recorded)
    assert (stats.range_gets, stats.full_gets, stats.restarts_from_zero) == (1, 0, 0)
    report = check(
        tmp_path / "jobs.db",
        tmp_path / "out",
        expected=expected(origin, {NAME: job_id}),
    )
    assert report.ok, str(report)


@pytest.mark.parametrize("change", ["between attempts", "within an attempt"])
def test_changed_validator_restarts_from_zero(
    tmp_path: Path, origin: Origin, change: str
) -> None:
    """A new ETag after a partial body restarts from byte 0: the new version."""
    (job_id,) = plan(tmp_path / "jobs.db", rows_for(origin, [NAME]))
    old = origin.expected(NAME)
    if change == "between attempts":
        origin.set_fault(NAME, change_etag_after=1)
        at_death, stats = _kill_then_recover(
            tmp_path, job_id, {"point": "stream.after_progress", "hit": 1}
        )
        resumed_at = at_death["progress"]
    else:
        origin.set_fault(NAME, change_etag_after=1, truncate_at=100_000)
        stats = run_inline(worker_config(tmp_path))
        resumed_at = 100_000

    new = origin.expected(NAME)
    assert new.version == 1 and new.sha256 != old.sha256
    counters = origin.counters(NAME)
    assert counters["range_starts"] == {resumed_at: 1}  # asked with If-Range ...
    assert counters["full_gets"] == 2  # ... and got the whole new version
    assert stats.restarts_from_zero == 1
    assert sha256_file(finals(tmp_path / "out")[job_id]) == (new.sha256, SIZE)
    report = check(
        tmp_path / "jobs.db",
        tmp_path / "out",
        expected=expected(origin, {NAME: job_id}),
    )
    assert report.ok, str(report)


@pytest.mark.parametrize("how", ["limit below the size", "origin sends more"])
def test_oversize_body_fails_for_good(tmp_path: Path, origin: Origin, how: str) -> None:
    """A body over --max-body-bytes: FAILED final with the reason, no file left."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    (job_id,) = plan(db, rows_for(origin, [NAME]))
    if how == "limit below the size":
        limit = SIZE - 1
    else:
        limit = SIZE
        origin.set_fault(NAME, oversize=5_000, on_get=1)
    config = worker_config(
        tmp_path, http=dataclasses.replace(FAST_HTTP, max_body_bytes=limit)
    )

    stats = run_inline(config)
    cx = connect(db)
    try:
        reconcile_jobs(cx, out)
    finally:
        close(cx)

    row = job(db, job_id)
    assert (row["state"], row["claimable"], stats.jobs_failed) == ("FAILED", 0, 1)
    assert f"over the maximum of {limit} bytes" in row["fail_reason"]
    assert finals(out) == {} and parts(out) == {}
    assert origin.counters(NAME)["full_gets"] == (
        0 if how == "limit below the size" else 1
    )
    report = check(db, out)
    assert report.ok, str(report)


TRAPS = [
    ("../../x", "../../x.pdf", "W-1"),
    ("/etc/passwd", "passwd", "../../../W-2"),
    ("a/../../../../tmp/y", "..%2Fy.pdf", "W-3/../.."),
]


def test_artifact_ids_cannot_leave_the_output_folder(tmp_path: Path) -> None:
    """File names come from the job key: ids and URLs with ../ or / stay inside out/."""
    db, out = tmp_path / "plan" / "jobs.db", tmp_path / "plan" / "out"
    db.parent.mkdir()
    with Origin({name: 1_000 + i for i, (_, name, _) in enumerate(TRAPS)}) as server:
        rows = [
            {"work_id": work, "artifact_id": artifact, "url": server.url(name)}
            for artifact, name, work in TRAPS
        ]
        ids = plan(db, rows)
        stats = run_inline(worker_config(tmp_path / "plan"))
        want = expected(
            server, {name: j for (_, name, _), j in zip(TRAPS, ids, strict=True)}
        )

    assert stats.jobs_done == len(TRAPS)
    everything = {
        p.relative_to(tmp_path).as_posix()
        for p in tmp_path.rglob("*")
        if p.is_file() and ".hosts" not in p.parts
    }
    assert everything == {
        "plan/jobs.db",
        "plan/jobs.db-idem.lock",
        *(f"plan/out/{j}.pdf" for j in ids),
    }
    report = check(db, out, expected=want)
    assert report.ok, str(report)


# --- a full disk ----------------------------------------------------------------------


def _fail_writes_after(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Make the worker's part-file writes raise ENOSPC past ``limit`` bytes."""
    real = worker_module._Body.write

    def write(body: Any, data: bytes) -> None:
        if body.received + len(data) > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), body.file.name)
        real(body, data)

    monkeypatch.setattr(worker_module._Body, "write", write)


def _retry_after_backoff(
    tmp_path: Path, clock: FakeClock, **changes: Any
) -> WorkerStats:
    """Move the fake clock past the retry backoff and run a fresh worker."""
    clock.advance(60.0)
    config = worker_config(tmp_path, owner="w2", **changes)
    cx = connect(config.db_path, clock=clock)
    try:
        stats = run_inline(config, cx=cx)
        reconcile_jobs(cx, config.out_dir)
    finally:
        close(cx)
    return stats


def _assert_retryable_failure(db: Path, out: Path, job_id: str, words: str) -> None:
    row = job(db, job_id)
    assert (row["state"], row["claimable"], row["lease_owner"]) == ("FAILED", 1, None)
    assert words in row["fail_reason"]
    assert ops(db, job_id)["HEAD"]["status"] == "SUCCEEDED"  # nothing recorded is lost
    assert job_id not in finals(out)


def _assert_stopped_by_the_disk(db: Path, out: Path, job_id: str) -> None:
    row = job(db, job_id)
    assert (row["state"], row["claimable"], row["lease_owner"]) == ("STREAMING", 1, None)
    assert (row["attempts"], row["fail_reason"]) == (1, None)  # no attempt is charged
    assert ops(db, job_id)["HEAD"]["status"] == "SUCCEEDED"  # nothing recorded is lost
    assert job_id not in finals(out)


def test_injected_enospc_stops_the_worker_then_resumes(
    tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC mid-stream stops the worker, not the job: progress kept, no attempt lost."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    (job_id,) = plan(db, rows_for(origin, [NAME]))
    clock = FakeClock(start=time.time())
    cx = connect(db, clock=clock)
    _fail_writes_after(monkeypatch, 100_000)
    try:
        with pytest.raises(EnvironmentTrouble, match="No space left on device"):
            run_inline(worker_config(tmp_path), cx=cx)
    finally:
        close(cx)

    _assert_stopped_by_the_disk(db, out, job_id)
    recorded = ops(db, job_id)["STREAM"]["progress"]
    assert 64 * 1024 <= recorded < 100_000

    monkeypatch.undo()
    stats = _retry_after_backoff(tmp_path, clock)

    assert stats.jobs_done == 1
    assert origin.counters(NAME)["range_starts"] == {recorded: 1}
    report = check(db, out, expected=expected(origin, {NAME: job_id}))
    assert report.ok, str(report)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, mounted for this test (root only)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({done.stderr.strip()}); the "
            "injected-ENOSPC test covers a full disk instead"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_real_full_disk_stops_the_worker_then_finishes(
    tmp_path: Path, small_disk: Path
) -> None:
    """A full tmpfs stops the worker with no attempt lost; with space freed, it finishes."""
    db, out = tmp_path / "jobs.db", small_disk / "out"
    big = 1024 * 1024
    with Origin({"big.pdf": big}, seed=3) as server:
        (job_id,) = plan(db, rows_for(server, ["big.pdf"]))
        out.mkdir()
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (big + big // 4))
        clock = FakeClock(start=time.time())
        cx = connect(db, clock=clock)
        try:
            with pytest.raises(EnvironmentTrouble, match="No space left on device"):
                run_inline(worker_config(tmp_path, out_dir=str(out)), cx=cx)
        finally:
            close(cx)
        _assert_stopped_by_the_disk(db, out, job_id)

        filler.unlink()
        stats = _retry_after_backoff(tmp_path, clock, out_dir=str(out))

        assert stats.jobs_done == 1
        report = check(db, out, expected=expected(server, {"big.pdf": job_id}))
    assert report.ok, str(report)
    assert parts(out) == {}


# --- C10: the order of a durable publish ----------------------------------------------


def _record_publish(
    monkeypatch: pytest.MonkeyPatch, *, exdev: bool = False
) -> list[tuple[str, ...]]:
    """Wrap the real os.fsync and os.replace; optionally make replace raise EXDEV."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(
            (
                "replace",
                os.fspath(src),
                os.fspath(dst),
                str(os.stat(src).st_dev),
                str(os.stat(os.path.dirname(dst)).st_dev),
            )
        )
        if exdev:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), os.fspath(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_finalize_fsyncs_part_then_replaces_then_fsyncs_folder(
    tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C10: fsync(part), replace(part, final), fsync(folder); one device for both."""
    (job_id,) = plan(tmp_path / "jobs.db", rows_for(origin, [NAME]))
    events = _record_publish(monkeypatch)

    run_inline(worker_config(tmp_path))

    out = os.path.realpath(tmp_path / "out")
    part, final = f"{out}/{job_id}.1.part", f"{out}/{job_id}.pdf"
    (at,) = [i for i, e in enumerate(events) if e[0] == "replace"]
    _, src, dst, src_dev, dir_dev = events[at]
    assert (src, dst) == (part, final)
    assert os.path.dirname(src) == os.path.dirname(dst) and src_dev == dir_dev
    assert events[at - 1] == ("fsync", part)
    assert events[at + 1] == ("fsync", out)
    assert len(events) == at + 2  # nothing else is synced or moved after the publish


def test_cross_device_replace_fails_without_copy_fallback(
    tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C10: EXDEV fails the finalize, retryable, with no copy; a retry publishes."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    (job_id,) = plan(db, rows_for(origin, [NAME]))
    events = _record_publish(monkeypatch, exdev=True)
    copies: list[Any] = []
    for name in ("copy", "copy2", "copyfile", "copyfileobj", "move"):
        monkeypatch.setattr(shutil, name, lambda *a, **k: copies.append(a))
    clock = FakeClock(start=time.time())
    cx = connect(db, clock=clock)
    try:
        run_inline(worker_config(tmp_path), cx=cx)
    finally:
        close(cx)

    _assert_retryable_failure(db, out, job_id, "Invalid cross-device link")
    assert [e[0] for e in events].count("replace") == 1 and copies == []
    assert parts(out) == {1: SIZE}  # the recorded body waits for the retry

    monkeypatch.undo()
    stats = _retry_after_backoff(tmp_path, clock)

    assert stats.jobs_done == 1 and stats.full_gets == stats.range_gets == 0
    report = check(db, out, expected=expected(origin, {NAME: job_id}))
    assert report.ok, str(report)


# --- the feature gate (I11) -----------------------------------------------------------


def _untracked_expected(origin: Origin, names: list[str]) -> dict[str, Expected]:
    rows = rows_for(origin, names)
    return {
        job_key(r["work_id"], r["artifact_id"], canonical_url(r["url"])): Expected(
            origin.expected(n).size, origin.expected(n).sha256
        )
        for r, n in zip(rows, names, strict=True)
    }


def test_gate_off_writes_no_rows_and_publishes_atomically(tmp_path: Path) -> None:
    """I11: untracked downloads leave the tables empty; files whole, fetched once."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    close(connect(db))  # an existing, empty database must stay untouched
    names = [f"doc-{i}.pdf" for i in range(5)]
    with Origin(dict.fromkeys(names, 50_000), seed=5) as server:
        rows = [{**r, "url": canonical_url(r["url"])} for r in rows_for(server, names)]
        stats = [
            download_untracked(rows, out, http=FAST_HTTP, shard=(i, 2)) for i in (0, 1)
        ]
        again = download_untracked(rows, out, http=FAST_HTTP)
        want = _untracked_expected(server, names)
        gets = [server.counters(n)["full_gets"] for n in names]

    assert sum(s.jobs_done for s in stats) == len(names) and again.jobs_done == 0
    assert gets == [1] * len(names)  # one shard per row; a file in place is kept
    assert set(finals(out)) == set(want) and parts(out) == {}
    assert table_dump(db) == {"jobs": [], "ops": [], "history": [], "manifest": []}
    report = check_gate_off(db, out, expected=want)
    assert report.ok, str(report)

    plan(db, rows[:1])
    _damage_byte(tmp_path, next(iter(want)))
    assert check_gate_off(db, out, expected=want).broken() == ["I2", "I11"]


def test_gate_off_failure_leaves_no_part_file(tmp_path: Path) -> None:
    """An untracked body cut short counts as failed and leaves no part or final file."""
    out = tmp_path / "out"
    with Origin(
        {"ok.pdf": 20_000, "cut.pdf": 50_000},
        seed=5,
        faults={"cut.pdf": Fault(truncate_at=10_000, truncate_times=None)},
    ) as server:
        rows = rows_for(server, ["cut.pdf", "ok.pdf"])
        stats = download_untracked(rows, out, http=FAST_HTTP)
        want = _untracked_expected(server, ["ok.pdf"])

    assert (stats.jobs_done, stats.jobs_failed) == (1, 1)
    assert set(finals(out)) == set(want)
    report = check_gate_off(None, out, expected=want)
    assert report.ok, str(report)


# --- the supervisor -------------------------------------------------------------------


def test_supervisor_restarts_killed_workers_and_finishes(tmp_path: Path) -> None:
    """Workers SIGKILLed mid-stream and mid-publish are replaced; each job done once."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    names = [f"doc-{i}.pdf" for i in range(6)]
    kills = {0: "stream.after_progress", 1: "finalize.after_replace"}

    def faults(slot: int, generation: int) -> list[dict[str, Any]]:
        return [{"point": kills[slot], "action": "kill"}] if generation == 0 else []

    with Origin(dict.fromkeys(names, SIZE), seed=9) as server:
        ids = dict(zip(names, plan(db, rows_for(server, names)), strict=True))
        result = Supervisor(
            worker_config(tmp_path), workers=2, faults=faults, tick_s=0.05
        ).run()
        cx = connect(db)
        try:
            reconcile_jobs(cx, out)
        finally:
            close(cx)
        want = expected(server, ids)
        served = server.total_counters()

    assert (served["full_gets"], served["range_gets"]) == (len(names), 1)  # one resume
    assert sorted(code for _, code in result.exits if code) == [-9, -9]
    assert (result.crashes, result.restarts) == (2, 2)
    assert {owner.split("@")[0]: points for owner, points in result.armed.items()} == {
        "w0.0": [kills[0]],
        "w1.0": [kills[1]],
        "w0.1": [],
        "w1.1": [],
    }
    assert result.final_counts["finished"] == result.final_counts["total"] == len(names)
    report = check(db, out, expected=want)
    assert report.ok, str(report)


# --- stopping, and a renew that fails -------------------------------------------------


def test_sigterm_keeps_progress_and_releases_the_lease(
    tmp_path: Path, origin: Origin
) -> None:
    """SIGTERM mid-stream: progress recorded, lease released, exit 0; rerun resumes."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    (job_id,) = plan(db, rows_for(origin, [NAME]))
    worker = start_worker(worker_config(tmp_path), stop_at="stream.after_chunk:6")
    worker.wait_stopped()
    worker.proc.send_signal(signal.SIGTERM)  # delivered when it continues
    worker.proc.send_signal(signal.SIGCONT)

    assert worker.stats()["jobs_done"] == 0
    row, stream = job(db, job_id), ops(db, job_id)["STREAM"]
    assert (row["state"], row["lease_owner"]) == ("STREAMING", None)
    assert (
        stream["progress"] == parts(out)[1] > 64 * 1024
    )  # every byte on disk recorded
    stats = run_inline(worker_config(tmp_path, owner="w2"))

    assert stats.bytes_copied == stream["progress"]
    assert origin.counters(NAME)["range_starts"] == {stream["progress"]: 1}
    report = check(db, out, expected=expected(origin, {NAME: job_id}))
    assert report.ok, str(report)


def test_stop_after_publish_still_writes_the_manifest_entry(
    tmp_path: Path, origin: Origin
) -> None:
    """A stop between FINALIZE and INDEX: the job is indexed, then the worker stops."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    (job_id,) = plan(db, rows_for(origin, [NAME]))
    stop = threading.Event()
    crashpoints.set_hook(lambda name: name == "finalize.after_dirsync" and stop.set())
    try:
        stats = run_inline(worker_config(tmp_path), stop=stop)
    finally:
        crashpoints.disarm()

    assert stop.is_set() and stats.jobs_done == 1
    row = job(db, job_id)
    assert (row["state"], row["lease_owner"]) == ("INDEXED", None)
    report = check(db, out, expected=expected(origin, {NAME: job_id}))
    assert report.ok, str(report)


def test_renew_error_stops_the_worker_before_any_further_effect(
    tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C05: a renew raising a database error ends the work; an heir finishes the job."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    (job_id,) = plan(db, rows_for(origin, [NAME]))

    def broken_renew(self: Lease, ttl_s: float | None = None) -> Lease:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Lease, "renew", broken_renew)
    with pytest.raises(sqlite3.OperationalError):
        run_inline(worker_config(tmp_path, renew_every_s=0.0))
    monkeypatch.undo()

    assert {k: o["status"] for k, o in ops(db, job_id).items()} == {
        "HEAD": "SUCCEEDED",
        "STREAM": "FAILED",
    }  # no FINALIZE, no INDEX started
    assert finals(out) == {}
    cx = connect(db)
    try:
        assert (
            expire_owner_leases(cx, owner="w1", why="worker died on a renew error") == 1
        )
        run_inline(worker_config(tmp_path, owner="w2"), cx=cx)
        reconcile_jobs(cx, out)
    finally:
        close(cx)
    report = check(db, out, expected=expected(origin, {NAME: job_id}))
    assert report.ok, str(report)


def test_resume_when_every_byte_was_recorded(tmp_path: Path, origin: Origin) -> None:
    """A stop after the last byte was recorded: the heir asks for no range at all."""
    db, out = tmp_path / "jobs.db", tmp_path / "out"
    (job_id,) = plan(db, rows_for(origin, [NAME]))
    part, stop = out / f"{job_id}.1.part", threading.Event()

    def stop_when_complete(name: str) -> None:
        if name == "stream.after_chunk" and part.stat().st_size == SIZE:
            stop.set()  # the stop check right after records every byte

    crashpoints.set_hook(stop_when_complete)
    try:
        run_inline(worker_config(tmp_path), stop=stop)
    finally:
        crashpoints.disarm()
    assert ops(db, job_id)["STREAM"]["progress"] == SIZE
    stats = run_inline(worker_config(tmp_path, owner="w2"))

    assert (stats.jobs_done, stats.bytes_copied, stats.bytes_received) == (1, SIZE, 0)
    assert origin.counters(NAME)["methods"]["GET"] == 1  # the first worker's only
    report = check(db, out, expected=expected(origin, {NAME: job_id}))
    assert report.ok, str(report)
