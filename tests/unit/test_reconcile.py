"""Tests of docstokg_idem.core.reconcile: healing what crashed workers left (I1, I8)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from docstokg_idem import (
    Connection,
    CrashPointFired,
    FakeClock,
    Fault,
    JobState,
    Lease,
    arm,
    cleanup_stale_leases,
    cleanup_stale_ops,
    close,
    connect,
    disarm,
    get_current_state,
    get_job,
    get_op,
    lease_next_job,
    manifest_entries,
    op_key,
    plan_jobs,
    reconcile_jobs,
    record_progress,
    run_effect,
    set_digest,
    transaction,
)
from docstokg_idem.core.files import final_name, part_name

S = JobState
T0 = 1_700_000_000.0
BODY = b"%PDF-1.7 the whole body\n" * 100


@pytest.fixture
def cx(tmp_path: Path, clock: FakeClock) -> Iterator[Connection]:
    conn = connect(tmp_path / "jobs.db", clock=clock)
    yield conn
    close(conn)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def jobs(cx: Connection) -> list[str]:
    rows = [
        {
            "work_id": f"W{i}",
            "artifact_id": f"a{i}",
            "url": f"https://example.com/{i}.pdf",
        }
        for i in range(2)
    ]
    return plan_jobs(cx, rows)


def _claim(cx: Connection, owner: str, ttl_s: float = 60.0) -> Lease:
    lease = lease_next_job(cx, owner=owner, ttl_s=ttl_s)
    assert lease is not None
    return lease


def _advance(lease: Lease, *states: JobState) -> None:
    for state in states:
        assert lease.advance(state)


def _history(cx: Connection, job_id: str, event: str) -> list[dict[str, Any]]:
    got = cx.execute(
        "SELECT * FROM history WHERE job_id = ? AND event = ? ORDER BY seq",
        (job_id, event),
    )
    return [dict(r) for r in got.fetchall()]


def _record_digest(cx: Connection, job_id: str, body: bytes) -> str:
    name = final_name(job_id, ".pdf")
    with transaction(cx) as tx:
        set_digest(
            tx,
            job_id=job_id,
            final_name=name,
            sha256=hashlib.sha256(body).hexdigest(),
            size=len(body),
        )
    return name


# --- leases and ops -------------------------------------------------------------------


def test_stale_lease_cleared_and_state_kept(cx: Connection, clock: FakeClock) -> None:
    """An expired lease is cleared; the job keeps STREAMING and is claimable again."""
    plan_jobs(
        cx, [{"work_id": "W", "artifact_id": "a", "url": "https://example.com/a"}]
    )
    lease = _claim(cx, "w1", ttl_s=10)
    _advance(lease, S.HEAD_DONE, S.STREAMING)
    clock.advance(10)

    cleared = cleanup_stale_leases(cx)
    row = get_job(cx, job_id=lease.job_id)
    again = _claim(cx, "w2")

    assert cleared == 1
    assert row is not None
    assert (row["lease_owner"], row["lease_until"], row["state"]) == (
        None,
        None,
        "STREAMING",
    )
    assert (again.job_id, again.state, again.token) == (lease.job_id, "STREAMING", 2)
    assert [h["token"] for h in _history(cx, lease.job_id, "expire")] == [1]


def test_live_lease_is_not_cleared(
    cx: Connection, clock: FakeClock, jobs: list[str]
) -> None:
    """A lease with time left is kept by the reconciler."""
    lease = _claim(cx, "w1", ttl_s=10)
    clock.advance(9.999)

    assert cleanup_stale_leases(cx) == 0
    row = get_job(cx, job_id=lease.job_id)
    assert row is not None and row["lease_owner"] == "w1"


def test_stale_op_abandoned_and_run_again(
    cx: Connection, clock: FakeClock, jobs: list[str], out: Path
) -> None:
    """An op whose runner died is ABANDONED, then runs once under the next lease."""
    lease = _claim(cx, "w1", ttl_s=10)
    key = op_key("HEAD", lease.job_id)
    calls: list[str] = []
    arm([Fault("op.after_start", "raise")])
    with pytest.raises(CrashPointFired):
        run_effect(
            cx,
            job_id=lease.job_id,
            kind="HEAD",
            opkey=key,
            effect_fn=lambda: calls.append("w1") or {},
            token=1,
            owner="w1",
        )
    disarm()
    clock.advance(10)

    report = reconcile_jobs(cx, out)
    abandoned = get_op(cx, opkey=key)
    second = _claim(cx, "w2")
    result = run_effect(
        cx,
        job_id=second.job_id,
        kind="HEAD",
        opkey=key,
        effect_fn=lambda: calls.append("w2") or {"by": "w2"},
        token=second.token,
        owner="w2",
    )

    assert (report.leases_cleared, report.ops_abandoned) == (1, 1)
    assert abandoned is not None and abandoned["status"] == "ABANDONED"
    assert "token 1" in abandoned["error"]
    assert second.job_id == lease.job_id
    assert calls == ["w2"]
    assert result == {"by": "w2"}
    op = get_op(cx, opkey=key)
    assert op is not None and (op["status"], op["token"]) == ("SUCCEEDED", 2)


def test_op_under_a_lost_lease_is_abandoned(
    cx: Connection, clock: FakeClock, jobs: list[str]
) -> None:
    """An op in progress under a token that lost the job's lease is ABANDONED."""
    lease = _claim(cx, "w1", ttl_s=10)
    key = op_key("HEAD", lease.job_id)
    arm([Fault("op.after_start", "raise")])
    with pytest.raises(CrashPointFired):
        run_effect(
            cx,
            job_id=lease.job_id,
            kind="HEAD",
            opkey=key,
            effect_fn=dict,
            token=1,
            owner="w1",
            ttl_s=3_600,
        )
    disarm()
    clock.advance(10)
    lease.cx.execute("UPDATE jobs SET lease_owner = NULL, lease_until = NULL")

    assert cleanup_stale_ops(cx) == 1
    assert get_op(cx, opkey=key)["status"] == "ABANDONED"  # type: ignore[index]


def test_op_under_a_live_lease_is_kept(cx: Connection, jobs: list[str]) -> None:
    """An op in progress under the job's live lease, within its TTL, is not touched."""
    lease = _claim(cx, "w1", ttl_s=60)
    key = op_key("HEAD", lease.job_id)
    arm([Fault("op.after_start", "raise")])
    with pytest.raises(CrashPointFired):
        run_effect(
            cx,
            job_id=lease.job_id,
            kind="HEAD",
            opkey=key,
            effect_fn=dict,
            token=1,
            owner="w1",
        )
    disarm()

    assert cleanup_stale_ops(cx) == 0
    assert get_op(cx, opkey=key)["status"] == "IN_PROGRESS"  # type: ignore[index]


# --- part files (I8) ------------------------------------------------------------------


def test_only_active_tokens_part_survives(
    cx: Connection, clock: FakeClock, jobs: list[str], out: Path
) -> None:
    """Only the part file of the live lease's token survives reconcile (I8)."""
    first = _claim(cx, "w1", ttl_s=10)
    idle = _claim(cx, "w3", ttl_s=20)
    clock.advance(10)
    live = _claim(cx, "w2", ttl_s=60)
    clock.advance(10)
    assert live.job_id == first.job_id and idle.job_id != first.job_id
    parts = {
        "dead": out / part_name(first.job_id, 1),
        "live": out / part_name(first.job_id, 2),
        "future": out / part_name(first.job_id, 3),
        "expired": out / part_name(idle.job_id, 1),
    }
    for path in parts.values():
        path.write_bytes(b"partial")
    unrelated = out / "notes.txt"
    unrelated.write_text("not ours")

    report = reconcile_jobs(cx, out)

    assert sorted(report.parts_removed) == sorted(
        parts[k].name for k in ("dead", "future", "expired")
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [parts["live"].name, "notes.txt"]
    )
    assert parts["live"].read_bytes() == b"partial"


# --- final files ----------------------------------------------------------------------


def _finalize(cx: Connection, lease: Lease, out: Path, *, write: bool) -> str:
    name = _record_digest(cx, lease.job_id, BODY)
    _advance(lease, S.HEAD_DONE, S.STREAMING, S.FINALIZED)
    if write:
        (out / name).write_bytes(BODY)
    lease.release()
    return name


def test_finalized_job_with_missing_file_goes_back(
    cx: Connection, jobs: list[str], out: Path
) -> None:
    """A FINALIZED job without its file goes back to HEAD_DONE, with a reason."""
    lease = _claim(cx, "w1")
    name = _finalize(cx, lease, out, write=False)

    report = reconcile_jobs(cx, out)
    again = _claim(cx, "w2")

    assert report.repaired == [lease.job_id]
    repairs = _history(cx, lease.job_id, "repair")
    assert [(h["from_state"], h["to_state"]) for h in repairs] == [
        ("FINALIZED", "HEAD_DONE")
    ]
    assert repairs[0]["detail"] == f"repair: final file {name!r} is missing"
    assert get_job(cx, job_id=lease.job_id)["final_name"] is None  # type: ignore[index]
    assert (again.job_id, again.state) == (lease.job_id, "HEAD_DONE")


def test_indexed_job_with_missing_file_loses_its_manifest_entry(
    cx: Connection, jobs: list[str], out: Path
) -> None:
    """An INDEXED job without its file goes back and loses its manifest entry."""
    lease = _claim(cx, "w1")
    name = _record_digest(cx, lease.job_id, BODY)
    _advance(lease, S.HEAD_DONE, S.STREAMING, S.FINALIZED)
    with transaction(cx) as tx:
        tx.execute(
            "INSERT INTO manifest VALUES (?, 'W0', 'a0', 'u', ?, 'x', 1, 1, 0)",
            (lease.job_id, name),
        )
    _advance(lease, S.INDEXED)
    lease.release()

    report = reconcile_jobs(cx, out)

    assert report.repaired == [lease.job_id]
    assert get_current_state(cx, job_id=lease.job_id) is S.HEAD_DONE
    assert manifest_entries(cx) == []


def test_finalized_job_with_its_file_is_indexed(
    cx: Connection, jobs: list[str], out: Path
) -> None:
    """A FINALIZED job whose worker died before INDEX gets its manifest entry."""
    lease = _claim(cx, "w1")
    name = _finalize(cx, lease, out, write=True)

    report = reconcile_jobs(cx, out)

    assert report.indexed == [lease.job_id]
    assert get_current_state(cx, job_id=lease.job_id) is S.INDEXED
    assert [e["final_name"] for e in manifest_entries(cx)] == [name]
    assert (out / name).read_bytes() == BODY
    assert reconcile_jobs(cx, out).total() == 0


def test_finalized_job_under_a_live_lease_is_left_alone(
    cx: Connection, jobs: list[str], out: Path
) -> None:
    """A FINALIZED job still leased (its worker is indexing it) is not touched."""
    lease = _claim(cx, "w1")
    name = _record_digest(cx, lease.job_id, BODY)
    _advance(lease, S.HEAD_DONE, S.STREAMING, S.FINALIZED)
    (out / name).write_bytes(BODY)

    report = reconcile_jobs(cx, out)

    assert report.total() == 0
    assert get_current_state(cx, job_id=lease.job_id) is S.FINALIZED


def _crashed_after_rename(
    cx: Connection, clock: FakeClock, out: Path, body: bytes
) -> Lease:
    """A STREAMING job whose file is in place; its worker died before recording."""
    lease = _claim(cx, "w1", ttl_s=10)
    name = _record_digest(cx, lease.job_id, BODY)
    _advance(lease, S.HEAD_DONE, S.STREAMING)
    (out / name).write_bytes(body)
    clock.advance(10)
    return lease


def test_matching_file_is_adopted(
    cx: Connection, clock: FakeClock, jobs: list[str], out: Path
) -> None:
    """A file matching the recorded digest is adopted: INDEXED, one manifest row."""
    lease = _crashed_after_rename(cx, clock, out, BODY)

    report = reconcile_jobs(cx, out)
    again = reconcile_jobs(cx, out)

    assert report.adopted == [lease.job_id]
    assert again.total() == 0
    assert get_current_state(cx, job_id=lease.job_id) is S.INDEXED
    entries = manifest_entries(cx)
    assert [(e["job_id"], e["sha256"], e["size"]) for e in entries] == [
        (lease.job_id, hashlib.sha256(BODY).hexdigest(), len(BODY))
    ]
    changes = [h["to_state"] for h in _history(cx, lease.job_id, "state")]
    assert changes.count("FINALIZED") == 1
    assert changes[-2:] == ["FINALIZED", "INDEXED"]
    assert (out / final_name(lease.job_id, ".pdf")).read_bytes() == BODY


@pytest.mark.parametrize(
    "body",
    [BODY[:-1], BODY[:-1] + b"X", BODY + b"\n"],
    ids=["short", "changed", "long"],
)
def test_mismatching_file_is_removed(
    cx: Connection, clock: FakeClock, jobs: list[str], out: Path, body: bytes
) -> None:
    """A file not matching the recorded digest is removed; the job is untouched."""
    lease = _crashed_after_rename(cx, clock, out, body)
    name = final_name(lease.job_id, ".pdf")

    report = reconcile_jobs(cx, out)

    assert report.strays_removed == [name]
    assert report.adopted == []
    assert not (out / name).exists()
    assert get_current_state(cx, job_id=lease.job_id) is S.STREAMING
    assert manifest_entries(cx) == []


def test_file_of_a_live_lease_is_left_alone(
    cx: Connection, jobs: list[str], out: Path
) -> None:
    """A final file whose job is still leased is neither adopted nor removed."""
    lease = _claim(cx, "w1", ttl_s=60)
    name = _record_digest(cx, lease.job_id, BODY)
    _advance(lease, S.HEAD_DONE, S.STREAMING)
    (out / name).write_bytes(b"not yet checked")

    report = reconcile_jobs(cx, out)

    assert report.total() == 0
    assert (out / name).exists()
    assert get_current_state(cx, job_id=lease.job_id) is S.STREAMING


def test_file_of_an_unknown_job_is_removed(cx: Connection, out: Path) -> None:
    """A final-looking file whose job was never planned is removed as a stray."""
    stray = out / ("ab" * 32 + ".pdf")
    stray.write_bytes(BODY)

    report = reconcile_jobs(cx, out)

    assert report.strays_removed == [stray.name]
    assert not stray.exists()


def test_reconcile_refuses_a_folder_holding_none_of_the_published_files(
    cx: Connection, jobs: list[str], out: Path, tmp_path: Path
) -> None:
    """A wrong --out (none of two published files there) changes nothing."""
    names = []
    for owner in ("w1", "w2"):
        lease = _claim(cx, owner)
        names.append(_finalize(cx, lease, out, write=True))
    wrong = tmp_path / "typo"
    wrong.mkdir()

    with pytest.raises(ValueError, match="none of the 2 published files"):
        reconcile_jobs(cx, wrong)
    with pytest.raises(ValueError, match="does not exist"):
        reconcile_jobs(cx, tmp_path / "missing")

    assert {get_current_state(cx, job_id=j) for j in jobs[:2]} == {S.FINALIZED}
    assert all((out / name).exists() for name in names)
    assert len(reconcile_jobs(cx, wrong, repair_all=True).repaired) == 2


def test_reconcile_keeps_the_part_file_whose_bytes_are_recorded(
    cx: Connection, jobs: list[str], out: Path, clock: FakeClock
) -> None:
    """A dead lease's part with recorded progress stays for the next lease (I9)."""
    lease = _claim(cx, "w1", ttl_s=10)
    _advance(lease, S.HEAD_DONE, S.STREAMING)
    key = op_key("STREAM", lease.job_id)
    arm([{"point": "op.after_start", "action": "raise"}])
    with pytest.raises(CrashPointFired):
        run_effect(cx, job_id=lease.job_id, kind="STREAM", opkey=key,
                   effect_fn=lambda: {}, token=lease.token, owner="w1")
    disarm()
    record_progress(cx, opkey=key, token=lease.token, owner="w1", job_id=lease.job_id,
                    progress=3, meta={"token": lease.token})
    recorded = out / part_name(lease.job_id, lease.token)
    recorded.write_bytes(b"abc")
    stray = out / part_name(lease.job_id, 99)
    stray.write_bytes(b"x")
    clock.advance(11)

    report = reconcile_jobs(cx, out)

    assert report.parts_removed == [stray.name]
    assert recorded.read_bytes() == b"abc"
