"""Tests of docstokg_idem.core.jobs: planning, leases, fencing tokens, states."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from docstokg_idem import (
    ConfigError,
    Connection,
    FakeClock,
    InvalidTransition,
    JobState,
    KeyFieldMissing,
    Lease,
    LeaseLost,
    advance_state,
    close,
    connect,
    fail_job,
    get_current_state,
    get_job,
    job_key,
    lease_next_job,
    plan_job_if_absent,
    plan_jobs,
    release_lease,
    renew_lease,
)

S = JobState
T0 = 1_700_000_000.0


@pytest.fixture
def cx(tmp_path: Path, clock: FakeClock) -> Iterator[Connection]:
    conn = connect(tmp_path / "jobs.db", clock=clock)
    yield conn
    close(conn)


@pytest.fixture
def job(cx: Connection) -> str:
    return plan_job_if_absent(
        cx, work_id="W1", artifact_id="a1", canonical_url="https://example.com/a1.pdf"
    )


def _spec(i: int) -> dict[str, Any]:
    return {
        "work_id": f"W{i}",
        "artifact_id": f"a{i}",
        "url": f"https://example.com/{i}.pdf",
    }


def _count(cx: sqlite3.Connection, sql: str, *args: Any) -> int:
    return int(cx.execute(sql, args).fetchone()[0])


def _claim(cx: Connection, owner: str, ttl_s: float = 60.0) -> Lease:
    lease = lease_next_job(cx, owner=owner, ttl_s=ttl_s)
    assert lease is not None, f"{owner} found nothing to claim"
    return lease


def _history(cx: sqlite3.Connection, job_id: str) -> list[tuple[Any, ...]]:
    got = cx.execute(
        "SELECT event, from_state, to_state, token, owner FROM history "
        "WHERE job_id = ? ORDER BY seq",
        (job_id,),
    )
    return [tuple(r) for r in got.fetchall()]


# --- planning -------------------------------------------------------------------------


def test_planning_is_idempotent(cx: Connection, job: str) -> None:
    """Planning a job again, in any URL spelling, returns its id and adds no row."""
    again = plan_job_if_absent(
        cx,
        work_id="W1",
        artifact_id="a1",
        canonical_url="HTTPS://Example.COM:443/a1.pdf",
    )
    first = {"work_id": "W1", "artifact_id": "a1", "url": "https://example.com/a1.pdf"}
    batch = plan_jobs(cx, [first, _spec(2), first])

    assert again == job == job_key("W1", "a1", "https://example.com/a1.pdf")
    assert batch[0] == batch[2] == job
    assert batch[1] != job
    assert _count(cx, "SELECT count(*) FROM jobs") == 2
    assert get_job(cx, job_id=job)["state"] == "PLANNED"  # type: ignore[index]


def test_plan_jobs_returns_ids_in_input_order(cx: Connection) -> None:
    """plan_jobs returns each row's job key, in the order of the rows."""
    rows = [_spec(i) for i in (3, 1, 2)]

    ids = plan_jobs(cx, rows)

    assert ids == [job_key(r["work_id"], r["artifact_id"], r["url"]) for r in rows]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"work_id": "W9", "artifact_id": "a9"}, KeyFieldMissing),
        ({"work_id": "W9", "artifact_id": "a9", "url": None}, KeyFieldMissing),
        ({"work_id": "W9", "artifact_id": "a9", "url": ""}, KeyFieldMissing),
        (
            {"work_id": "", "artifact_id": "a9", "url": "https://example.com/9"},
            KeyFieldMissing,
        ),
        (
            {"work_id": 9, "artifact_id": "a9", "url": "https://example.com/9"},
            TypeError,
        ),
        ({"work_id": "W9", "artifact_id": "a9", "url": "example.com/9"}, ValueError),
    ],
    ids=["no-url", "url-none", "url-empty", "work-empty", "work-int", "no-scheme"],
)
def test_plan_jobs_is_atomic_on_a_bad_row(
    cx: Connection, bad: dict[str, Any], error: type[Exception]
) -> None:
    """One bad row plans nothing, and the error's note names the row by index."""
    with pytest.raises(error) as info:
        plan_jobs(cx, [_spec(0), bad, _spec(2)])

    notes = getattr(info.value, "__notes__", [])
    assert any(n.startswith("plan_jobs: row 1 ") and "'a9'" in n for n in notes)
    assert _count(cx, "SELECT count(*) FROM jobs") == 0
    assert _count(cx, "SELECT count(*) FROM history") == 0


# --- leases and tokens ----------------------------------------------------------------


def test_claim_sets_lease_fields(cx: Connection, clock: FakeClock, job: str) -> None:
    """A claim sets owner, expiry, token 1, LEASED and one attempt, and logs it."""
    lease = _claim(cx, "w1", ttl_s=30)
    row = get_job(cx, job_id=job)

    assert (lease.job_id, lease.token, lease.state) == (job, 1, "LEASED")
    assert lease.lease_until == T0 + 30
    assert row is not None
    assert (row["lease_owner"], row["lease_until"], row["lease_token"]) == (
        "w1",
        T0 + 30,
        1,
    )
    assert (row["state"], row["attempts"]) == ("LEASED", 1)
    assert _history(cx, job) == [("claim", "PLANNED", "LEASED", 1, "w1")]


def test_live_lease_is_not_claimable(
    cx: Connection, clock: FakeClock, job: str
) -> None:
    """While a lease is live no other worker gets the job."""
    _claim(cx, "w1", ttl_s=30)
    clock.advance(29.999)

    assert lease_next_job(cx, owner="w2", ttl_s=30) is None


def test_tokens_strictly_increase_across_reclaims(
    cx: Connection, clock: FakeClock
) -> None:
    """Each reclaim, even by the same owner, gets a higher token (C05)."""
    (job,) = plan_jobs(cx, [_spec(1)], max_attempts=10)
    tokens = []
    for owner in ["w1", "w2", "w1", "w1"]:
        tokens.append(_claim(cx, owner, ttl_s=10).token)
        clock.advance(10)
    lease = _claim(cx, "w1", ttl_s=10)
    lease.release()
    tokens.append(lease.token)
    tokens.append(_claim(cx, "w1", ttl_s=10).token)

    assert tokens == [1, 2, 3, 4, 5, 6]
    assert [h[3] for h in _history(cx, job) if h[0] == "claim"] == tokens


def test_expired_lease_is_reclaimed_keeping_progress(
    cx: Connection, clock: FakeClock, job: str
) -> None:
    """A job reclaimed after expiry keeps its STREAMING state under a new token."""
    first = _claim(cx, "w1", ttl_s=10)
    assert first.advance(S.HEAD_DONE)
    assert first.advance(S.STREAMING)
    clock.advance(10)

    second = _claim(cx, "w2", ttl_s=10)

    assert (second.job_id, second.state, second.token, second.attempts) == (
        job,
        "STREAMING",
        2,
        2,
    )
    assert get_current_state(cx, job_id=job) is S.STREAMING
    assert ("expire", "STREAMING", None, 1, "w1") in _history(cx, job)


@pytest.mark.parametrize("ttl", [0, 0.0, 0.0004])
def test_ttl_zero_lease_is_expired_at_once(
    cx: Connection, clock: FakeClock, job: str, ttl: float
) -> None:
    """A lease of TTL 0 (or under half a millisecond) expires at its start (I10)."""
    first = _claim(cx, "w1", ttl_s=ttl)

    second = lease_next_job(cx, owner="w2", ttl_s=60)

    assert first.lease_until == T0
    assert first.remaining() == 0.0
    assert second is not None and (second.job_id, second.token) == (job, 2)
    with pytest.raises(LeaseLost):
        first.advance(S.HEAD_DONE)


@pytest.mark.parametrize("ttl", [None, -1, -0.001, math.nan, math.inf, True, "60"])
def test_bad_ttl_is_a_config_error(cx: Connection, job: str, ttl: Any) -> None:
    """A TTL of None, < 0, NaN, inf or a non-number raises ConfigError (I10)."""
    with pytest.raises(ConfigError, match=r"ttl_s=.*seconds from 0"):
        lease_next_job(cx, owner="w1", ttl_s=ttl)

    row = get_job(cx, job_id=job)
    assert row is not None
    assert (row["state"], row["lease_owner"], row["lease_token"]) == (
        "PLANNED",
        None,
        0,
    )


@pytest.mark.parametrize("ttl", [None, -5, math.nan])
def test_bad_ttl_on_renew_is_a_config_error(cx: Connection, job: str, ttl: Any) -> None:
    """Renewing with a bad TTL raises ConfigError and keeps the old expiry."""
    lease = _claim(cx, "w1", ttl_s=30)

    with pytest.raises(ConfigError):
        renew_lease(cx, job_id=job, owner="w1", ttl_s=ttl, token=lease.token)

    assert get_job(cx, job_id=job)["lease_until"] == T0 + 30  # type: ignore[index]


def test_renew_extends_from_now(cx: Connection, clock: FakeClock, job: str) -> None:
    """A renew moves the expiry to now + TTL and keeps the token."""
    lease = _claim(cx, "w1", ttl_s=30)
    clock.advance(20)

    renewed = lease.renew()
    plain = renew_lease(cx, job_id=job, owner="w1", ttl_s=5, token=lease.token)

    assert renewed.lease_until == T0 + 50
    assert renewed.token == lease.token == 1
    assert plain is True
    assert get_job(cx, job_id=job)["lease_until"] == T0 + 25  # type: ignore[index]


def test_release_keeps_state_and_frees_job(cx: Connection, job: str) -> None:
    """A release clears the lease, keeps the progress state, and frees the job."""
    lease = _claim(cx, "w1")
    lease.advance(S.HEAD_DONE)

    lease.release()
    again = _claim(cx, "w2")

    assert (again.state, again.token) == ("HEAD_DONE", 2)


# --- C05: a stale token changes nothing -----------------------------------------------


def _snapshot(cx: sqlite3.Connection, job_id: str) -> tuple[Any, ...]:
    row = cx.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    history = cx.execute("SELECT count(*) FROM history").fetchone()[0]
    return (*tuple(row), history)


@pytest.fixture
def zombie(cx: Connection, clock: FakeClock, job: str) -> Lease:
    """w1's lease (token 1), expired and reclaimed by w2 (token 2)."""
    stale = _claim(cx, "w1", ttl_s=10)
    clock.advance(11)
    assert _claim(cx, "w2", ttl_s=60).token == 2
    return stale


def test_stale_token_bool_api_returns_false(
    cx: Connection, zombie: Lease, job: str
) -> None:
    """renew_lease/release_lease with a stale token return False, change nothing."""
    before = _snapshot(cx, job)

    renewed = renew_lease(cx, job_id=job, owner="w1", ttl_s=60, token=1)
    released = release_lease(cx, job_id=job, owner="w1", token=1)

    assert (renewed, released) == (False, False)
    assert _snapshot(cx, job) == before


@pytest.mark.parametrize(
    "write",
    [
        lambda z: z.renew(),
        lambda z: z.release(),
        lambda z: z.advance(S.HEAD_DONE),
        lambda z: z.fail("gave up"),
        lambda z: renew_lease(
            z.cx, job_id=z.job_id, owner="w1", ttl_s=60, token=1, strict=True
        ),
        lambda z: release_lease(
            z.cx, job_id=z.job_id, owner="w1", token=1, strict=True
        ),
        lambda z: advance_state(z.cx, job_id=z.job_id, to_state=S.HEAD_DONE, token=1),
        lambda z: fail_job(z.cx, job_id=z.job_id, token=1, reason="x", retryable=False),
    ],
    ids=[
        "renew",
        "release",
        "advance",
        "fail",
        "renew-fn",
        "release-fn",
        "advance-fn",
        "fail-fn",
    ],
)
def test_stale_token_strict_write_is_refused(
    cx: Connection, zombie: Lease, job: str, write: Any
) -> None:
    """A strict write with a stale token raises LeaseLost, changes nothing (I7)."""
    before = _snapshot(cx, job)

    with pytest.raises(
        LeaseLost, match=r"token 1\): the job is leased by 'w2' with token 2"
    ):
        write(zombie)

    assert _snapshot(cx, job) == before
    row = get_job(cx, job_id=job)
    assert row is not None
    assert (row["lease_owner"], row["lease_token"], row["state"]) == ("w2", 2, "LEASED")


def test_same_owner_old_token_is_refused(
    cx: Connection, clock: FakeClock, job: str
) -> None:
    """An owner that re-claimed its job cannot write with its earlier token (C05)."""
    old = _claim(cx, "w1", ttl_s=10)
    clock.advance(10)
    new = _claim(cx, "w1", ttl_s=60)

    assert renew_lease(cx, job_id=job, owner="w1", ttl_s=60, token=old.token) is False
    with pytest.raises(LeaseLost):
        old.advance(S.HEAD_DONE)
    assert new.advance(S.HEAD_DONE) is True
    assert new.token == old.token + 1


def test_expired_unclaimed_lease_refuses_writes(
    cx: Connection, clock: FakeClock, job: str
) -> None:
    """After its expiry a lease writes nothing, even if nobody reclaimed the job."""
    lease = _claim(cx, "w1", ttl_s=10)
    clock.advance(10)

    with pytest.raises(LeaseLost, match="the lease expired at"):
        lease.advance(S.HEAD_DONE)
    assert renew_lease(cx, job_id=job, owner="w1", ttl_s=10, token=1) is False
    assert get_current_state(cx, job_id=job) is S.LEASED


# --- states ---------------------------------------------------------------------------


def test_advance_follows_forward_edges(cx: Connection, job: str) -> None:
    """A lease moves the job along its edges, one history row per change."""
    lease = _claim(cx, "w1")

    for state in [S.HEAD_DONE, S.STREAMING, S.FINALIZED, S.INDEXED]:
        assert lease.advance(state) is True

    assert get_current_state(cx, job_id=job) is S.INDEXED
    changes = [(h[1], h[2]) for h in _history(cx, job) if h[0] == "state"]
    assert changes == [
        ("LEASED", "HEAD_DONE"),
        ("HEAD_DONE", "STREAMING"),
        ("STREAMING", "FINALIZED"),
        ("FINALIZED", "INDEXED"),
    ]
    assert get_job(cx, job_id=job)["claimable"] == 0  # type: ignore[index]


def test_replayed_advance_returns_false(cx: Connection, job: str) -> None:
    """Advancing to the state the job is already in returns False and writes nothing."""
    lease = _claim(cx, "w1")
    assert lease.advance(S.HEAD_DONE, allowed_from={S.LEASED}) is True
    before = _snapshot(cx, job)

    assert lease.advance(S.HEAD_DONE, allowed_from={S.LEASED}) is False
    assert advance_state(cx, job_id=job, to_state="HEAD_DONE") is False
    assert _snapshot(cx, job) == before


def test_advance_denial_names_job_states(cx: Connection, job: str) -> None:
    """A refused change names job, wanted state, allowed states and actual state."""
    lease = _claim(cx, "w1")

    with pytest.raises(InvalidTransition) as info:
        lease.advance(S.FINALIZED, allowed_from={S.STREAMING, S.RESUME_OK})

    message = str(info.value)
    assert repr(job) in message
    assert "to FINALIZED" in message
    assert "['RESUME_OK', 'STREAMING']" in message
    assert "it is in LEASED" in message
    assert get_current_state(cx, job_id=job) is S.LEASED


def test_advance_off_the_edges_names_allowed_states(cx: Connection, job: str) -> None:
    """Without allowed_from, a refusal names the states with an edge to the target."""
    lease = _claim(cx, "w1")

    with pytest.raises(InvalidTransition) as info:
        lease.advance(S.FINALIZED)

    message = str(info.value)
    assert repr(job) in message
    assert "to FINALIZED" in message
    assert "['STREAMING']" in message
    assert "it is in LEASED" in message


def test_backward_move_is_refused(cx: Connection, job: str) -> None:
    """A job never moves backwards: STREAMING to HEAD_DONE raises InvalidTransition."""
    lease = _claim(cx, "w1")
    lease.advance(S.HEAD_DONE)
    lease.advance(S.STREAMING)

    with pytest.raises(InvalidTransition, match="it is in STREAMING"):
        lease.advance(S.HEAD_DONE)
    assert get_current_state(cx, job_id=job) is S.STREAMING


def test_advance_unknown_job_is_refused(cx: Connection) -> None:
    """Advancing a job that was never planned raises InvalidTransition naming it."""
    with pytest.raises(InvalidTransition, match=r"'nope' does not exist"):
        advance_state(cx, job_id="nope", to_state=S.LEASED)


# --- failures, retries and the attempt limit ------------------------------------------


def test_attempt_limit_fails_job_with_reason(cx: Connection, clock: FakeClock) -> None:
    """A job whose leases keep expiring ends FAILED, final, with a reason."""
    (job,) = plan_jobs(cx, [_spec(1)], max_attempts=2)
    _claim(cx, "w1", ttl_s=5)
    clock.advance(5)
    _claim(cx, "w2", ttl_s=5)
    clock.advance(5)

    assert lease_next_job(cx, owner="w3", ttl_s=5) is None

    row = get_job(cx, job_id=job)
    assert row is not None
    assert (row["state"], row["claimable"], row["attempts"]) == ("FAILED", 0, 2)
    assert row["lease_owner"] is None
    assert "attempt limit 2 reached in state LEASED" in row["fail_reason"]
    assert _history(cx, job)[-1][:3] == ("state", "LEASED", "FAILED")


def test_failure_at_the_limit_is_final(cx: Connection, clock: FakeClock) -> None:
    """A retryable failure on the last attempt is final and never claimed again."""
    (job,) = plan_jobs(cx, [_spec(1)], max_attempts=1)
    lease = _claim(cx, "w1")

    assert lease.fail("HTTP 500", retryable=True) is S.FAILED
    clock.advance(10_000)

    assert lease_next_job(cx, owner="w2") is None
    row = get_job(cx, job_id=job)
    assert row is not None
    assert (row["state"], row["claimable"], row["fail_reason"]) == (
        "FAILED",
        0,
        "HTTP 500",
    )
    assert _history(cx, job)[-1] == ("state", "LEASED", "FAILED", 1, None)


def test_retryable_failure_backs_off(
    cx: Connection, clock: FakeClock, job: str
) -> None:
    """A retryable failure is claimable only once its backoff has passed."""
    lease = _claim(cx, "w1")
    lease.advance(S.HEAD_DONE)
    fail_job(cx, job_id=job, token=lease.token, reason="timeout", backoff_s=30)

    clock.advance(29.9)
    early = lease_next_job(cx, owner="w2")
    clock.advance(0.1)
    late = lease_next_job(cx, owner="w2")

    assert early is None
    assert late is not None and (late.state, late.token, late.attempts) == (
        "LEASED",
        2,
        2,
    )
    assert ("state", "HEAD_DONE", "FAILED", 1, None) in _history(cx, job)
    assert get_job(cx, job_id=job)["fail_reason"] == "timeout"  # type: ignore[index]


def test_backoff_doubles_per_attempt(
    cx: Connection, clock: FakeClock, job: str
) -> None:
    """The second retryable failure waits twice the first backoff."""
    _claim(cx, "w1").fail("x")
    clock.advance(1)
    second = _claim(cx, "w1")
    second.fail("y")

    clock.advance(1.999)
    assert lease_next_job(cx, owner="w1") is None
    clock.advance(0.001)
    assert _claim(cx, "w1").token == 3


def test_done_job_cannot_fail(cx: Connection, job: str) -> None:
    """fail_job on a FINALIZED job raises InvalidTransition and keeps it FINALIZED."""
    lease = _claim(cx, "w1")
    for state in [S.HEAD_DONE, S.STREAMING, S.FINALIZED]:
        lease.advance(state)

    with pytest.raises(InvalidTransition, match="a done job cannot fail"):
        lease.fail("late error")
    assert get_current_state(cx, job_id=job) is S.FINALIZED


# --- C03: a healthy owner keeps its job -----------------------------------------------


@pytest.mark.parametrize("renewing", [True, False], ids=["renewing", "not-renewing"])
def test_renewed_lease_is_never_handed_out(
    cx: Connection, clock: FakeClock, job: str, renewing: bool
) -> None:
    """TTL 60 s renewed every 20 s is never handed out; unrenewed, at 60 s (C03)."""
    lease = _claim(cx, "w1", ttl_s=60)
    taken_at = None
    for t in range(10, 201, 10):
        clock.advance(10)
        if renewing and t % 20 == 0:
            lease = lease.renew()
        if lease_next_job(cx, owner="w2", ttl_s=60) is not None:
            taken_at = t
            break

    if renewing:
        assert taken_at is None
        assert lease.current_state() is S.LEASED
        assert get_job(cx, job_id=job)["lease_token"] == 1  # type: ignore[index]
    else:
        assert taken_at == 60


# --- C14: wall time moved backwards ---------------------------------------------------


def test_lease_remaining_stays_within_ttl(
    cx: Connection, clock: FakeClock, job: str
) -> None:
    """Lease.remaining() follows monotonic time within [0, TTL], whatever the wall."""
    lease = _claim(cx, "w1", ttl_s=60)
    seen = [lease.remaining()]
    clock.advance(20)
    seen.append(lease.remaining())
    clock.move_to(T0 - 3_600)
    seen.append(lease.remaining())
    clock.move_to(T0 + 3_600)
    seen.append(lease.remaining())

    assert seen == [60.0, 40.0, 40.0, 0.0]


def test_backward_wall_jump_keeps_expired_lease_expired(
    cx: Connection, clock: FakeClock, job: str
) -> None:
    """An expired lease stays claimable after the wall moves back before it (C14)."""
    _claim(cx, "w1", ttl_s=60)
    plan_jobs(cx, [_spec(2)])
    clock.advance(120)
    other = _claim(cx, "w2", ttl_s=600)  # the database has now seen T0 + 120
    clock.move_to(T0 + 10)

    taken = lease_next_job(cx, owner="w3", ttl_s=60)

    assert other.job_id != job
    assert taken is not None and (taken.job_id, taken.token) == (job, 2)
    assert taken.lease_until == T0 + 180


def test_backward_wall_jump_keeps_live_lease_live(
    cx: Connection, clock: FakeClock, job: str
) -> None:
    """A live lease, renewed after wall time moved back, is not handed out (C14)."""
    lease = _claim(cx, "w1", ttl_s=60)
    clock.advance(30)
    assert lease_next_job(cx, owner="w2", ttl_s=60) is None
    clock.move_to(T0 - 3_600)

    lease = lease.renew()
    clock.advance(30)
    taken = lease_next_job(cx, owner="w2", ttl_s=60)

    assert taken is None
    assert lease.advance(S.HEAD_DONE) is True
    assert get_job(cx, job_id=job)["lease_owner"] == "w1"  # type: ignore[index]
