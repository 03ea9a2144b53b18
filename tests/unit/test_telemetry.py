"""Tests of docstokg_idem.core.telemetry: events and their sinks."""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from docstokg_idem import (
    Connection,
    FakeClock,
    JobState,
    close,
    connect,
    lease_next_job,
    op_key,
    plan_job_if_absent,
    reconcile_jobs,
    run_effect,
)
from docstokg_idem.core import telemetry
from docstokg_idem.core.telemetry import (
    ACTIONS,
    JsonLinesSink,
    LoggingSink,
    MemorySink,
    add_sink,
    capture_events,
    emit,
    remove_sink,
)

T0 = 1_700_000_000.0
EVENTS_PER_PROCESS = 400
PADDING = "x" * 3_000


@pytest.fixture
def cx(tmp_path: Path, clock: FakeClock) -> Iterator[Connection]:
    conn = connect(tmp_path / "jobs.db", clock=clock)
    yield conn
    close(conn)


@pytest.fixture(autouse=True)
def _no_sinks_left() -> Iterator[None]:
    before = list(telemetry._sinks)
    yield
    assert telemetry._sinks == before


def _plan(cx: Connection) -> str:
    return plan_job_if_absent(
        cx, work_id="W1", artifact_id="a1", canonical_url="https://example.com/a1.pdf"
    )


def test_memory_sink_sees_claim_fields(cx: Connection) -> None:
    """A claim emits one 'leased' event with job, token, state, owner and pid."""
    with capture_events() as sink:
        job = _plan(cx)
        lease_next_job(cx, owner="w1", ttl_s=60)

    assert sink.actions() == ["planned", "leased"]
    (leased,) = sink.of("leased")
    assert leased["job"] == job
    assert (leased["token"], leased["state"], leased["owner"], leased["attempt"]) == (
        1,
        "LEASED",
        "w1",
        1,
    )
    assert isinstance(leased["pid"], int)
    assert sink.of("planned")[0]["jobs"] == 1


def test_every_emitted_action_is_declared(
    cx: Connection, clock: FakeClock, tmp_path: Path
) -> None:
    """A full job life emits only actions listed in ACTIONS, each with its job."""
    with capture_events() as sink:
        job = _plan(cx)
        lease = lease_next_job(cx, owner="w1", ttl_s=10)
        assert lease is not None
        lease = lease.renew()
        key = op_key("HEAD", job)
        with pytest.raises(OSError):
            run_effect(
                cx,
                job_id=job,
                kind="HEAD",
                opkey=key,
                token=lease.token,
                owner="w1",
                effect_fn=lambda: (_ for _ in ()).throw(OSError("x")),
            )
        run_effect(
            cx,
            job_id=job,
            kind="HEAD",
            opkey=key,
            token=lease.token,
            owner="w1",
            effect_fn=dict,
            then_state=JobState.HEAD_DONE,
        )
        run_effect(
            cx,
            job_id=job,
            kind="HEAD",
            opkey=key,
            token=lease.token,
            owner="w1",
            effect_fn=dict,
        )
        lease.advance(JobState.STREAMING)
        clock.advance(10)
        assert lease.cx is cx
        with pytest.raises(RuntimeError):
            lease.release()
        reconcile_jobs(cx, tmp_path / "out")

    actions = sink.actions()
    assert set(actions) <= ACTIONS
    assert set(actions) == {
        "planned",
        "leased",
        "renewed",
        "op_started",
        "op_failed",
        "op_completed",
        "state_changed",
        "op_replayed",
        "lease_lost",
        "recovered",
    }
    assert all(e.get("job") == job for e in sink.events if e["action"] != "planned")


def _write_events(path: str, tag: str, ready: Any) -> None:
    sink = JsonLinesSink(path)
    add_sink(sink)
    try:
        ready.wait()
        for i in range(EVENTS_PER_PROCESS):
            emit("recovered", job=tag, token=i, padding=PADDING)
    finally:
        remove_sink(sink)
        sink.close()


def test_json_lines_from_two_processes_do_not_interleave(tmp_path: Path) -> None:
    """Two processes appending large events to one file leave only whole JSON lines."""
    path = tmp_path / "events.jsonl"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Barrier(2)
    workers = [
        ctx.Process(target=_write_events, args=(str(path), tag, ready))
        for tag in ("a", "b")
    ]

    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)

    assert [w.exitcode for w in workers] == [0, 0]
    lines = path.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert Counter(e["job"] for e in events) == {
        "a": EVENTS_PER_PROCESS,
        "b": EVENTS_PER_PROCESS,
    }
    for tag in ("a", "b"):
        tokens = [e["token"] for e in events if e["job"] == tag]
        assert tokens == list(range(EVENTS_PER_PROCESS))
    assert all(e["padding"] == PADDING and e["action"] == "recovered" for e in events)


def test_logging_sink_writes_one_line_per_event(
    cx: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """The logging sink writes one line per event naming job, token and state."""
    job = _plan(cx)
    sink = LoggingSink()
    add_sink(sink)
    try:
        with caplog.at_level(logging.INFO, logger="docstokg_idem"):
            lease_next_job(cx, owner="w1", ttl_s=60)
    finally:
        remove_sink(sink)

    (record,) = [r for r in caplog.records if r.name == "docstokg_idem"]
    message = record.getMessage()
    assert message.startswith("leased ")
    assert f"job={job[:12]} " in message
    assert " token=1 " in message
    assert " state=LEASED " in message
    assert " owner=w1 " in message
    assert "\n" not in message
    assert record.action == "leased"  # a structured field for log processors
    assert record.levelno == logging.INFO


def test_logging_sink_is_silent_below_its_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A logging sink below the logger's level writes nothing."""
    sink = LoggingSink(level=logging.DEBUG)
    add_sink(sink)
    try:
        with caplog.at_level(logging.INFO, logger="docstokg_idem"):
            emit("leased", job="j", token=1, state="LEASED")
    finally:
        remove_sink(sink)

    assert [r for r in caplog.records if r.name == "docstokg_idem"] == []


def test_failing_sink_never_breaks_the_caller(
    cx: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A sink that raises is logged; the write and the other sinks carry on."""

    def broken(event: dict[str, Any]) -> None:
        raise OSError("disk full")

    add_sink(broken)
    try:
        with (
            capture_events() as sink,
            caplog.at_level(logging.ERROR, logger="docstokg_idem"),
        ):
            job = _plan(cx)
    finally:
        remove_sink(broken)

    assert sink.actions() == ["planned"]
    assert (
        cx.execute("SELECT count(*) FROM jobs WHERE job_id = ?", (job,)).fetchone()[0]
        == 1
    )
    (record,) = caplog.records
    assert "failed on planned" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is OSError


def test_removed_sink_receives_nothing() -> None:
    """After remove_sink a sink sees nothing; emitting without sinks is a no-op."""
    sink = MemorySink()
    add_sink(sink)
    emit("leased", job="j1", token=1)
    remove_sink(sink)
    emit("leased", job="j2", token=1)
    remove_sink(sink)

    assert [e["job"] for e in sink.events] == ["j1"]
