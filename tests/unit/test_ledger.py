"""Tests of docstokg_idem.core.ledger: records, replays and fencing (I4, I7, I9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from docstokg_idem import (
    ConfigError,
    Connection,
    CrashPointFired,
    FakeClock,
    Fault,
    InvalidTransition,
    JobState,
    Lease,
    LeaseLost,
    OpInProgress,
    PayloadMismatch,
    ResultTooLarge,
    SharedClock,
    add_manifest_entry,
    arm,
    canonical_json,
    close,
    connect,
    disarm,
    get_current_state,
    get_effect_record,
    get_effect_result,
    get_op,
    lease_next_job,
    manifest_entries,
    op_key,
    plan_job_if_absent,
    plan_jobs,
    reconcile_jobs,
    record_progress,
    run_effect,
)

S = JobState
T0 = 1_700_000_000.0
RESULT = {
    "status": 200,
    "etag": '"abc"',
    "size": 1234,
    "title": "caf\u00e9",
    "tags": [1, 2],
}


class Effect:
    """A side effect that counts its runs and returns (or raises) what it is given."""

    def __init__(self, *outcomes: Mapping[str, Any] | BaseException) -> None:
        self.outcomes = list(outcomes) or [RESULT]
        self.calls = 0

    def __call__(self) -> Mapping[str, Any]:
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.calls += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


@pytest.fixture
def cx(db_path: Path, clock: FakeClock) -> Iterator[Connection]:
    conn = connect(db_path, clock=clock)
    yield conn
    close(conn)


@pytest.fixture
def job(cx: Connection) -> str:
    return plan_job_if_absent(
        cx, work_id="W1", artifact_id="a1", canonical_url="https://example.com/a1.pdf"
    )


@pytest.fixture
def lease(cx: Connection, job: str) -> Lease:
    got = lease_next_job(cx, owner="w1", ttl_s=60)
    assert got is not None
    return got


def _run(
    lease: Lease, effect: Callable[[], Mapping[str, Any]], **kw: Any
) -> dict[str, Any]:
    """run_effect for a HEAD op under ``lease``."""
    kw.setdefault("opkey", op_key("HEAD", lease.job_id))
    return run_effect(
        lease.cx,
        job_id=lease.job_id,
        kind="HEAD",
        effect_fn=effect,
        token=lease.token,
        owner=lease.lease_owner,
        **kw,
    )


# --- record and replay (I4) -----------------------------------------------------------


def test_replay_is_byte_for_byte(cx: Connection, lease: Lease) -> None:
    """A second call replays the canonical recorded bytes without running."""
    effect = Effect()
    key = op_key("HEAD", lease.job_id)

    first = _run(lease, effect)
    raw = get_effect_record(cx, opkey=key)
    second = _run(lease, effect)

    assert effect.calls == 1
    assert raw == canonical_json(RESULT)
    assert first == second == RESULT
    assert canonical_json(second) == raw
    assert get_effect_record(cx, opkey=key) == raw
    op = get_op(cx, opkey=key)
    assert op is not None
    assert (op["status"], op["runs"], op["token"], op["owner"]) == (
        "SUCCEEDED",
        1,
        1,
        "w1",
    )


def test_unrecorded_op_reads_as_none(cx: Connection, job: str) -> None:
    """An op never run has no record, no result and no row."""
    key = op_key("HEAD", job)

    assert get_effect_record(cx, opkey=key) is None
    assert get_effect_result(cx, opkey=key) is None
    assert get_op(cx, opkey=key) is None


@pytest.mark.parametrize("locked", [False, True], ids=["unlocked", "locked"])
def test_effect_error_is_recorded_and_run_again(
    cx: Connection, lease: Lease, locked: bool
) -> None:
    """An effect that raises is recorded FAILED and runs again on the next call."""
    effect = Effect(OSError("connection reset"), RESULT)
    key = op_key("HEAD", lease.job_id)

    with pytest.raises(OSError, match="connection reset") as info:
        _run(lease, effect, locked=locked)
    failed = get_op(cx, opkey=key)
    again = _run(lease, effect, locked=locked)

    assert failed is not None
    assert (failed["status"], failed["error"]) == (
        "FAILED",
        "OSError: connection reset",
    )
    assert any("recorded as FAILED" in n for n in info.value.__notes__)
    assert again == RESULT
    assert effect.calls == 2
    assert get_op(cx, opkey=key)["status"] == "SUCCEEDED"  # type: ignore[index]


def test_live_tokenless_op_is_in_progress(cx: Connection, job: str) -> None:
    """A token-less op held by a live in-progress record refuses a second runner."""
    key = op_key("HEAD", job)
    arm([Fault("op.after_start", "raise")])
    with pytest.raises(CrashPointFired):
        run_effect(
            cx,
            job_id=job,
            kind="HEAD",
            opkey=key,
            effect_fn=Effect(),
            owner="a",
            ttl_s=30,
        )
    disarm()
    effect = Effect()

    with pytest.raises(OpInProgress, match=r"in progress by 'a' until"):
        run_effect(cx, job_id=job, kind="HEAD", opkey=key, effect_fn=effect, owner="b")

    assert effect.calls == 0


# --- C01: a TTL of zero means "expired now" -------------------------------------------


@pytest.mark.parametrize("ttl", [0, 0.0, 0.0004])
def test_zero_ttl_op_is_taken_over_after_a_crash(
    db_path: Path,
    cx: Connection,
    clock: FakeClock,
    job: str,
    ttl: float,
    tmp_path: Path,
) -> None:
    """An op of TTL 0 expires at its start; after a crash it runs once more (C01)."""
    key = op_key("HEAD", job)
    crashed, second = Effect(), Effect()
    arm([Fault("op.after_start", "raise")])
    with pytest.raises(CrashPointFired):
        run_effect(
            cx,
            job_id=job,
            kind="HEAD",
            opkey=key,
            effect_fn=crashed,
            owner="w1",
            ttl_s=ttl,
        )
    disarm()
    started = get_op(cx, opkey=key)

    clock.advance(1)
    report = reconcile_jobs(cx, tmp_path / "out")
    other = connect(db_path, clock=clock)
    try:
        result = run_effect(
            other,
            job_id=job,
            kind="HEAD",
            opkey=key,
            effect_fn=second,
            owner="w2",
            ttl_s=ttl,
        )
    finally:
        close(other)

    assert started is not None
    assert started["status"] == "IN_PROGRESS"
    assert started["expires_at"] is not None
    assert started["expires_at"] == started["started_at"] == T0
    assert report.ops_abandoned == 1
    assert (crashed.calls, second.calls) == (0, 1)
    assert result == RESULT
    op = get_op(cx, opkey=key)
    assert op is not None and (op["status"], op["owner"]) == ("SUCCEEDED", "w2")
    assert get_effect_record(cx, opkey=key) == canonical_json(RESULT)


_KILLED_CHILD = """
import sys
from pathlib import Path
from docstokg_idem import connect, run_effect

db, job, key, marker = sys.argv[1:]
cx = connect(db)
run_effect(cx, job_id=job, kind="HEAD", opkey=key, owner="child", ttl_s=0,
           effect_fn=lambda: Path(marker).write_text("ran") and {"ran": True})
print("the crash point did not fire")
"""


def test_zero_ttl_op_after_sigkill(tmp_path: Path) -> None:
    """A worker SIGKILLed after a TTL-0 op started: the next runner runs it once."""
    clock = SharedClock(tmp_path / "clock", start=T0)
    db = tmp_path / "jobs.db"
    marker = tmp_path / "effect-ran"
    cx = connect(db, clock=clock)
    try:
        job = plan_job_if_absent(
            cx,
            work_id="W1",
            artifact_id="a1",
            canonical_url="https://example.com/a1.pdf",
        )
        key = op_key("HEAD", job)
        env = {
            **os.environ,
            "DOCSTOKG_IDEM_CLOCK_FILE": str(clock.path),
            "DOCSTOKG_IDEM_FAULTS": '[{"point": "op.after_start", "action": "kill"}]',
        }
        child = subprocess.run(
            [sys.executable, "-c", _KILLED_CHILD, str(db), job, key, str(marker)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        started = get_op(cx, opkey=key)
        clock.advance(1)
        report = reconcile_jobs(cx, tmp_path / "out")
        effect = Effect()
        result = run_effect(
            cx,
            job_id=job,
            kind="HEAD",
            opkey=key,
            effect_fn=effect,
            owner="w2",
            ttl_s=0,
        )
        op = get_op(cx, opkey=key)
    finally:
        close(cx)

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout == ""
    assert started is not None
    assert (started["status"], started["expires_at"]) == ("IN_PROGRESS", T0)
    assert started["started_at"] == T0
    assert report.ops_abandoned == 1
    assert not marker.exists()
    assert effect.calls == 1 and result == RESULT
    assert op is not None and (op["status"], op["runs"]) == ("SUCCEEDED", 2)


@pytest.mark.parametrize("ttl", [None, -1, -0.5])
def test_bad_op_ttl_is_a_config_error(cx: Connection, lease: Lease, ttl: Any) -> None:
    """An op TTL of None or below 0 raises ConfigError before anything is written."""
    effect = Effect()

    with pytest.raises(ConfigError, match=r"op ttl_s="):
        _run(lease, effect, ttl_s=ttl)

    assert effect.calls == 0
    assert get_op(cx, opkey=op_key("HEAD", lease.job_id)) is None


# --- C02: one op key, one request -----------------------------------------------------


def test_payload_mismatch_is_refused(cx: Connection, lease: Lease) -> None:
    """The op key with another request raises PayloadMismatch; nothing runs (C02)."""
    key = op_key("HEAD", lease.job_id)
    _run(lease, Effect(), request={"url": "https://example.com/a"})
    raw = get_effect_record(cx, opkey=key)
    effect = Effect({"other": True})

    with pytest.raises(PayloadMismatch, match="Derive a new op key"):
        _run(lease, effect, request={"url": "https://example.com/b"})
    replay = _run(lease, effect, request={"url": "https://example.com/a"})

    assert effect.calls == 0
    assert replay == RESULT
    assert get_effect_record(cx, opkey=key) == raw


def test_payload_mismatch_on_explicit_fingerprint(cx: Connection, lease: Lease) -> None:
    """An explicit fingerprint is compared too, even while the op is unrecorded."""
    key = op_key("HEAD", lease.job_id)
    with pytest.raises(OSError):
        _run(lease, Effect(OSError("down")), fingerprint="f" * 64)
    effect = Effect()

    with pytest.raises(PayloadMismatch):
        _run(lease, effect, fingerprint="e" * 64)

    assert effect.calls == 0
    assert get_op(cx, opkey=key)["fingerprint"] == "f" * 64  # type: ignore[index]


# --- results that cannot be recorded --------------------------------------------------


def test_result_too_large_is_refused_not_truncated(
    cx: Connection, lease: Lease
) -> None:
    """A result over the limit raises ResultTooLarge, is not kept, and runs again."""
    key = op_key("HEAD", lease.job_id)
    effect = Effect({"body": "x" * 200}, {"size": 200})

    with pytest.raises(ResultTooLarge, match=r"is 211 bytes .* limit of 100"):
        _run(lease, effect, max_result_bytes=100)
    failed = get_op(cx, opkey=key)
    again = _run(lease, effect, max_result_bytes=100)

    assert failed is not None and failed["status"] == "FAILED"
    assert failed["result"] is None
    assert again == {"size": 200}
    assert effect.calls == 2
    assert get_effect_record(cx, opkey=key) == b'{"size":200}'


def test_non_mapping_result_is_refused(cx: Connection, lease: Lease) -> None:
    """An effect returning a non-mapping raises TypeError; the op can run again."""
    key = op_key("HEAD", lease.job_id)

    with pytest.raises(TypeError, match="must return a mapping"):
        _run(lease, Effect(["not", "a", "mapping"]))  # type: ignore[arg-type]

    assert get_op(cx, opkey=key)["status"] == "FAILED"  # type: ignore[index]
    assert _run(lease, Effect()) == RESULT


# --- fencing (I7) ---------------------------------------------------------------------


def test_stale_token_cannot_start(
    cx: Connection, clock: FakeClock, lease: Lease
) -> None:
    """Starting an op with a token whose lease moved on raises LeaseLost."""
    clock.advance(60)
    newer = lease_next_job(cx, owner="w2", ttl_s=60)
    assert newer is not None
    effect = Effect()

    with pytest.raises(LeaseLost, match=r"start of HEAD refused .* token 2"):
        _run(lease, effect)

    assert effect.calls == 0
    assert get_op(cx, opkey=op_key("HEAD", lease.job_id)) is None


def test_takeover_refuses_old_runners_record(
    db_path: Path, cx: Connection, clock: FakeClock, lease: Lease
) -> None:
    """When a new token takes the op over, the old runner's record raises LeaseLost."""
    key = op_key("HEAD", lease.job_id)
    other = connect(db_path, clock=clock)
    seen: dict[str, Any] = {}

    def slow_effect() -> Mapping[str, Any]:
        clock.advance(61)  # the old runner pauses past its TTL
        newer = lease_next_job(other, owner="w2", ttl_s=60)
        assert newer is not None
        seen["newer"] = newer
        seen["result"] = _run(newer, Effect({"by": "w2"}))
        return {"by": "w1"}

    try:
        with pytest.raises(LeaseLost, match=r"record of HEAD refused"):
            _run(lease, slow_effect)
        newer = seen["newer"]
        assert newer.renew().token == 2
    finally:
        close(other)

    assert seen["result"] == {"by": "w2"}
    assert get_effect_result(cx, opkey=key) == {"by": "w2"}
    op = get_op(cx, opkey=key)
    assert op is not None
    assert (op["status"], op["token"], op["owner"], op["runs"]) == (
        "SUCCEEDED",
        2,
        "w2",
        2,
    )


def test_tokenless_takeover_refuses_old_owners_record(
    cx: Connection, clock: FakeClock, job: str
) -> None:
    """A token-less op taken over after expiry refuses the first owner's late record."""
    key = op_key("HEAD", job)

    def slow_effect() -> Mapping[str, Any]:
        clock.advance(5)
        run_effect(
            cx,
            job_id=job,
            kind="HEAD",
            opkey=key,
            owner="b",
            effect_fn=Effect({"by": "b"}),
            ttl_s=5,
        )
        return {"by": "a"}

    with pytest.raises(LeaseLost, match="another runner took it over"):
        run_effect(
            cx,
            job_id=job,
            kind="HEAD",
            opkey=key,
            owner="a",
            effect_fn=slow_effect,
            ttl_s=5,
        )

    assert get_effect_result(cx, opkey=key) == {"by": "b"}


def test_record_progress_is_fenced(
    cx: Connection, clock: FakeClock, lease: Lease
) -> None:
    """Progress is recorded under the live token and refused under a stale one."""
    key = op_key("STREAM", lease.job_id)
    arm([Fault("op.after_start", "raise")])
    with pytest.raises(CrashPointFired):
        run_effect(
            cx,
            job_id=lease.job_id,
            kind="STREAM",
            opkey=key,
            effect_fn=Effect(),
            token=lease.token,
            owner="w1",
        )
    disarm()
    progress = {"opkey": key, "token": 1, "owner": "w1", "job_id": lease.job_id}

    record_progress(cx, progress=4096, meta={"etag": '"abc"'}, **progress)
    clock.advance(60)
    assert lease_next_job(cx, owner="w2") is not None
    with pytest.raises(LeaseLost):
        record_progress(cx, progress=8192, **progress)

    op = get_op(cx, opkey=key)
    assert op is not None
    assert (op["progress"], op["progress_meta"]) == (4096, '{"etag":"\\"abc\\""}')


# --- what commits with the record -----------------------------------------------------


def _manifest_writer(
    lease: Lease, fail: bool
) -> Callable[[Connection, dict[str, Any]], None]:
    def on_record(tx: Connection, result: dict[str, Any]) -> None:
        add_manifest_entry(
            tx,
            job_id=lease.job_id,
            final_name=f"{lease.job_id}.pdf",
            sha256="0" * 64,
            size=result["size"],
            token=lease.token,
        )
        if fail:
            raise RuntimeError("disk full while indexing")

    return on_record


def test_on_record_error_rolls_back_the_record(cx: Connection, lease: Lease) -> None:
    """If on_record raises, no record, no state change and none of its writes stay."""
    key = op_key("HEAD", lease.job_id)

    with pytest.raises(RuntimeError, match="disk full"):
        _run(
            lease,
            Effect(),
            then_state=S.HEAD_DONE,
            on_record=_manifest_writer(lease, True),
        )

    assert get_effect_record(cx, opkey=key) is None
    assert get_op(cx, opkey=key)["status"] == "IN_PROGRESS"  # type: ignore[index]
    assert get_current_state(cx, job_id=lease.job_id) is S.LEASED
    assert manifest_entries(cx) == []


def test_record_state_and_on_record_commit_together(
    cx: Connection, lease: Lease
) -> None:
    """The record, then_state and on_record's writes are all there after one call."""
    key = op_key("HEAD", lease.job_id)
    effect = Effect()

    _run(
        lease,
        effect,
        then_state=S.HEAD_DONE,
        allowed_from={S.LEASED},
        on_record=_manifest_writer(lease, False),
    )
    _run(
        lease,
        effect,
        then_state=S.HEAD_DONE,
        allowed_from={S.LEASED},
        on_record=_manifest_writer(lease, False),
    )

    assert effect.calls == 1
    assert get_effect_record(cx, opkey=key) == canonical_json(RESULT)
    assert get_current_state(cx, job_id=lease.job_id) is S.HEAD_DONE
    assert [(m["job_id"], m["size"], m["token"]) for m in manifest_entries(cx)] == [
        (lease.job_id, 1234, 1)
    ]


def test_then_state_off_the_edges_names_states(cx: Connection, lease: Lease) -> None:
    """An unreachable then_state is refused, naming the states; nothing records."""
    key = op_key("HEAD", lease.job_id)

    with pytest.raises(InvalidTransition) as info:
        _run(lease, Effect(), then_state=S.FINALIZED)

    message = str(info.value)
    assert repr(lease.job_id) in message
    assert "to FINALIZED" in message and "it is in LEASED" in message
    assert "['STREAMING']" in message
    assert get_effect_record(cx, opkey=key) is None
    assert get_current_state(cx, job_id=lease.job_id) is S.LEASED


def test_locked_effect_runs_under_a_checked_lease(
    cx: Connection, clock: FakeClock, lease: Lease
) -> None:
    """A locked effect runs while its lease is live, never after it moved on."""
    ran = _run(lease, Effect(), locked=True, opkey=op_key("FINALIZE", lease.job_id))
    clock.advance(60)
    assert lease_next_job(cx, owner="w2") is not None
    effect = Effect()

    with pytest.raises(LeaseLost):
        _run(lease, effect, locked=True, opkey=op_key("INDEX", lease.job_id))

    assert ran == RESULT
    assert effect.calls == 0


# --- C14: an op started after wall time moved back ------------------------------------


def test_op_started_after_backward_jump_is_not_abandoned(
    cx: Connection, clock: FakeClock, job: str, tmp_path: Path
) -> None:
    """An op started after the wall moved back keeps its full TTL (C14)."""
    key = op_key("HEAD", job)
    clock.advance(100)
    reconcile_jobs(cx, tmp_path / "out")  # the database has seen T0 + 100
    clock.move_to(T0)
    arm([Fault("op.after_start", "raise")])
    with pytest.raises(CrashPointFired):
        run_effect(
            cx,
            job_id=job,
            kind="HEAD",
            opkey=key,
            effect_fn=Effect(),
            owner="a",
            ttl_s=30,
        )
    disarm()

    report = reconcile_jobs(cx, tmp_path / "out")

    assert report.ops_abandoned == 0
    assert get_op(cx, opkey=key)["status"] == "IN_PROGRESS"  # type: ignore[index]


def test_renew_extends_ops_in_progress(
    cx: Connection, clock: FakeClock, lease: Lease, tmp_path: Path
) -> None:
    """A renewal carries the lease's in-progress ops along, so reconcile keeps them."""
    key = op_key("STREAM", lease.job_id)
    arm([Fault("op.after_start", "raise")])
    with pytest.raises(CrashPointFired):
        run_effect(
            cx,
            job_id=lease.job_id,
            kind="STREAM",
            opkey=key,
            effect_fn=Effect(),
            token=lease.token,
            owner="w1",
            ttl_s=30,
        )
    disarm()
    clock.advance(25)

    renewed = lease.renew()
    clock.advance(10)
    report = reconcile_jobs(cx, tmp_path / "out")

    op = get_op(cx, opkey=key)
    assert op is not None
    assert (op["status"], op["expires_at"]) == ("IN_PROGRESS", renewed.lease_until)
    assert renewed.lease_until == T0 + 85
    assert report.ops_abandoned == 0


def test_an_op_key_of_another_job_or_kind_raises_payload_mismatch(
    tmp_path: Path,
) -> None:
    """Reusing one op key for another job's op never returns that job's result."""
    cx = connect(tmp_path / "jobs.db")
    try:
        a, b = plan_jobs(cx, [
            {"work_id": "W", "artifact_id": "a", "url": "http://127.0.0.1:9/a"},
            {"work_id": "W", "artifact_id": "b", "url": "http://127.0.0.1:9/b"},
        ])
        runs: list[str] = []
        run_effect(cx, job_id=a, kind="HEAD", opkey="k", request={"url": "u"},
                   effect_fn=lambda: runs.append("a") or {"size": 111})

        with pytest.raises(PayloadMismatch, match="belongs to HEAD of job"):
            run_effect(cx, job_id=b, kind="STREAM", opkey="k", request={"url": "u"},
                       effect_fn=lambda: runs.append("b") or {"size": 222})

        assert runs == ["a"]
        assert get_effect_result(cx, opkey="k") == {"size": 111}
    finally:
        close(cx)


def test_a_replay_under_a_new_lease_takes_the_state_moves_it_implies(
    tmp_path: Path,
) -> None:
    """After a retry out of FAILED, replaying HEAD and STREAM brings the job back."""
    cx = connect(tmp_path / "jobs.db")
    try:
        (job,) = plan_jobs(cx, [{"work_id": "W", "artifact_id": "a",
                                 "url": "http://127.0.0.1:9/a"}])
        first = lease_next_job(cx, owner="w1", ttl_s=60)
        assert first is not None
        run_effect(cx, job_id=job, kind="HEAD", opkey=op_key("HEAD", job),
                   effect_fn=lambda: {"size": 1}, token=first.token, owner="w1",
                   mode="first_wins", then_state="HEAD_DONE")
        run_effect(cx, job_id=job, kind="STREAM", opkey=op_key("STREAM", job),
                   effect_fn=lambda: {"part": "p"}, token=first.token, owner="w1",
                   start_state="STREAMING")
        first.fail("HTTP 503", retryable=True)
        cx.execute("UPDATE jobs SET not_before = 0")
        second = lease_next_job(cx, owner="w2", ttl_s=60)
        assert second is not None and second.state == "LEASED"
        ran: list[str] = []

        run_effect(cx, job_id=job, kind="HEAD", opkey=op_key("HEAD", job),
                   effect_fn=lambda: ran.append("HEAD") or {}, token=second.token,
                   owner="w2", mode="first_wins", then_state="HEAD_DONE")
        assert get_current_state(cx, job_id=job) is JobState.HEAD_DONE
        run_effect(cx, job_id=job, kind="STREAM", opkey=op_key("STREAM", job),
                   effect_fn=lambda: ran.append("STREAM") or {}, token=second.token,
                   owner="w2", start_state="STREAMING")

        assert ran == []
        assert get_current_state(cx, job_id=job) is JobState.STREAMING
    finally:
        close(cx)
