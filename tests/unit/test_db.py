"""Tests of docstokg_idem.core.db: connections, transactions, migrations (C06-C08)."""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from docstokg_idem import (
    SCHEMA_VERSION,
    Connection,
    DatabaseCorrupt,
    DatabaseUnavailable,
    FakeClock,
    InheritedConnection,
    SchemaTooNew,
    apply_migration,
    close,
    connect,
    get_job,
    get_schema_version,
    lease_next_job,
    op_key,
    plan_jobs,
    run_effect,
    transaction,
)
from docstokg_idem.core import db

SRC = Path(db.__file__).resolve().parents[1]

# Beyond any real TTL: contention tests must not see a lease expire.
LONG_TTL = 600.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


@pytest.fixture
def cx(path: Path) -> Iterator[Connection]:
    conn = connect(path)
    yield conn
    close(conn)


def _plan(cx: Connection, n: int) -> list[str]:
    rows = [
        {
            "work_id": f"W{i}",
            "artifact_id": f"a{i}",
            "url": f"https://example.com/{i}.pdf",
        }
        for i in range(n)
    ]
    return plan_jobs(cx, rows)


def _meta_count(path: Path) -> int:
    raw = sqlite3.connect(path)
    try:
        return int(raw.execute("SELECT count(*) FROM meta").fetchone()[0])
    finally:
        raw.close()


def _insert_meta(cx: sqlite3.Connection, key: str) -> None:
    cx.execute("INSERT INTO meta (key, value) VALUES (?, 'v')", (key,))


# --- the connection factory -----------------------------------------------------------


def test_connect_sets_wal_and_normal_synchronous(cx: Connection) -> None:
    """A new connection runs in WAL with synchronous=NORMAL (1) and a busy timeout."""
    assert cx.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert cx.execute("PRAGMA synchronous").fetchone()[0] == 1
    assert cx.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    assert cx.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_connect_full_synchronous(path: Path) -> None:
    """synchronous="full" (any case) gives SQLite's FULL mode (2)."""
    conn = connect(path, synchronous="full", busy_timeout_s=2)
    try:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2_000
    finally:
        close(conn)


def test_connect_refuses_unknown_synchronous_mode(path: Path) -> None:
    """An unknown synchronous mode is refused by name, before any file is made."""
    with pytest.raises(ValueError, match=r"synchronous='fast'.*NORMAL") as info:
        connect(path, synchronous="fast")

    assert "OFF, NORMAL, FULL, EXTRA" in str(info.value)
    assert not path.exists()


def test_connect_sets_autocommit_transaction_mode(cx: Connection) -> None:
    """The driver never opens transactions itself: isolation_level is None (C07)."""
    assert cx.isolation_level is None
    assert not cx.in_transaction

    _insert_meta(cx, "outside")

    assert not cx.in_transaction
    assert _meta_count(Path(cx.db_path)) == 1


def test_library_never_calls_executescript() -> None:
    """No source file calls executescript, which commits pending work (C07)."""
    sources = sorted(SRC.rglob("*.py"))

    offenders = [str(p) for p in sources if "executescript" in p.read_text()]

    assert len(sources) > 10
    assert offenders == []


def test_connect_in_missing_folder_is_unavailable(tmp_path: Path) -> None:
    """A path in a folder that does not exist raises DatabaseUnavailable naming it."""
    missing = tmp_path / "no-such-folder" / "jobs.db"

    with pytest.raises(DatabaseUnavailable) as info:
        connect(missing)

    assert repr(str(missing)) in str(info.value)
    assert "folder does not exist" in str(info.value)
    assert not missing.parent.exists()


def test_connect_to_non_database_is_corrupt(path: Path) -> None:
    """A file that is not a SQLite database raises DatabaseCorrupt naming it."""
    path.write_bytes(b"this is a text file, not a database\n" * 64)

    with pytest.raises(DatabaseCorrupt) as info:
        connect(path)

    assert repr(str(path)) in str(info.value)
    assert "not a readable SQLite database" in str(info.value)


def _newer_database(path: Path, journal_mode: str) -> bytes:
    raw = sqlite3.connect(path)
    try:
        raw.execute(f"PRAGMA journal_mode = {journal_mode}")
        raw.execute("CREATE TABLE future (x)")
        raw.execute("INSERT INTO future VALUES (1)")
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 98}")
        raw.commit()
    finally:
        raw.close()
    return path.read_bytes()


@pytest.mark.parametrize("journal_mode", ["DELETE", "WAL"])
def test_newer_schema_refused_and_untouched(path: Path, journal_mode: str) -> None:
    """A database of a newer schema raises SchemaTooNew and keeps every byte."""
    before = _newer_database(path, journal_mode)

    with pytest.raises(SchemaTooNew) as info:
        connect(path)

    assert f"schema version {SCHEMA_VERSION + 98}" in str(info.value)
    assert f"newer than {SCHEMA_VERSION}" in str(info.value)
    assert path.read_bytes() == before


# --- transactions ---------------------------------------------------------------------


def test_transaction_commits(cx: Connection, path: Path) -> None:
    """A block that ends normally is committed and visible to another connection."""
    with transaction(cx) as tx:
        _insert_meta(tx, "a")
        assert tx is cx
        assert cx.in_transaction
        assert _meta_count(path) == 0

    assert not cx.in_transaction
    assert _meta_count(path) == 1


def test_transaction_rolls_back_on_exception(cx: Connection, path: Path) -> None:
    """A block that raises is rolled back (0 rows left); the error propagates."""
    with pytest.raises(KeyError, match="boom"):
        with transaction(cx) as tx:
            _insert_meta(tx, "a")
            _insert_meta(tx, "b")
            raise KeyError("boom")

    assert not cx.in_transaction
    assert _meta_count(path) == 0
    assert cx.execute("SELECT count(*) FROM meta").fetchone()[0] == 0


def test_transaction_nests_into_one_commit(cx: Connection, path: Path) -> None:
    """An inner block joins the outer one: nothing commits until the outer ends."""
    with transaction(cx) as outer:
        _insert_meta(outer, "a")
        with transaction(cx) as inner:
            _insert_meta(inner, "b")
        assert cx.in_transaction
        assert _meta_count(path) == 0

    assert _meta_count(path) == 2


def test_nested_error_rolls_back_the_outer_block(cx: Connection, path: Path) -> None:
    """An error out of a nested block undoes the outer block's rows too."""
    with pytest.raises(RuntimeError):
        with transaction(cx) as outer:
            _insert_meta(outer, "a")
            with transaction(cx) as inner:
                _insert_meta(inner, "b")
                raise RuntimeError("inner failed")

    assert not cx.in_transaction
    assert _meta_count(path) == 0


def test_transaction_takes_write_lock_at_begin(cx: Connection, path: Path) -> None:
    """transaction() begins IMMEDIATE: another writer is locked out before any write."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with transaction(cx):
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()


# --- migrations -----------------------------------------------------------------------


def _tables(cx: sqlite3.Connection) -> list[str]:
    got = cx.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    )
    return [r[0] for r in got.fetchall()]


def test_new_file_has_schema_version_zero(path: Path) -> None:
    """An unmigrated file reports schema version 0 and has no tables."""
    conn = connect(path, migrate=False)
    try:
        assert get_schema_version(conn) == 0
        assert _tables(conn) == []
    finally:
        close(conn)


def test_migrations_reach_schema_version(cx: Connection) -> None:
    """connect() migrates to SCHEMA_VERSION and creates the core tables."""
    assert get_schema_version(cx) == SCHEMA_VERSION
    assert {"jobs", "history", "ops", "manifest", "meta"} <= set(_tables(cx))


def test_migrations_are_idempotent(cx: Connection, path: Path) -> None:
    """Migrating again, or reconnecting, changes nothing and keeps the rows."""
    _plan(cx, 2)
    schema = cx.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()

    assert apply_migration(cx) == SCHEMA_VERSION
    again = connect(path)
    close(again)

    assert get_schema_version(cx) == SCHEMA_VERSION
    assert (
        cx.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema
    )
    assert cx.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2


def test_failing_migration_applies_nothing(
    cx: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration whose last statement fails leaves no table and no version bump."""
    broken = (
        "CREATE TABLE half_done (x INTEGER);\n"
        "INSERT INTO half_done VALUES (1);\n"
        "INSERT INTO no_such_table VALUES (1);\n"
    )
    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS, (2, "broken", broken)])
    monkeypatch.setattr(db, "SCHEMA_VERSION", 2)

    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        apply_migration(cx)

    assert get_schema_version(cx) == 1
    assert "half_done" not in _tables(cx)
    assert not cx.in_transaction


# --- C06: a busy database is waited for, never reported -----------------------------


def _hold_write_lock(
    path: Path, kind: str, start: threading.Event, held: threading.Event, other: str
) -> None:
    """Once ``start`` is set: lock, update ``other``, hold 1 s, commit."""
    start.wait(10)
    if kind == "raw":
        b: sqlite3.Connection = sqlite3.connect(path, isolation_level=None)
        b.execute("BEGIN IMMEDIATE")
        b.execute(
            "UPDATE jobs SET updated_at = updated_at + 1 WHERE job_id = ?", (other,)
        )
        held.set()
        threading.Event().wait(1.0)  # the scenario: B keeps the lock for 1 s
        b.execute("COMMIT")
        b.close()
        return
    lib = connect(path, migrate=False)
    with transaction(lib) as tx:
        tx.execute(
            "UPDATE jobs SET updated_at = updated_at + 1 WHERE job_id = ?", (other,)
        )
        held.set()
        threading.Event().wait(1.0)
    close(lib)


def _claim(a: Connection, start: threading.Event, held: threading.Event) -> Any:
    start.set()
    held.wait(10)
    return lease_next_job(a, owner="A", ttl_s=LONG_TTL)


def _renew(a: Connection, start: threading.Event, held: threading.Event) -> Any:
    lease = lease_next_job(a, owner="A", ttl_s=LONG_TTL)
    assert lease is not None
    start.set()
    held.wait(10)
    return lease.renew()


def _record(a: Connection, start: threading.Event, held: threading.Event) -> Any:
    lease = lease_next_job(a, owner="A", ttl_s=LONG_TTL)
    assert lease is not None

    def effect() -> dict[str, Any]:
        start.set()  # B takes the lock while the effect runs: the record must wait
        held.wait(10)
        return {"ok": True}

    return run_effect(
        a,
        job_id=lease.job_id,
        kind="HEAD",
        opkey=op_key("HEAD", lease.job_id),
        effect_fn=effect,
        token=lease.token,
        owner="A",
    )


@pytest.mark.parametrize("holder", ["raw", "library"])
@pytest.mark.parametrize(
    "call", [_claim, _renew, _record], ids=["claim", "renew", "record"]
)
def test_busy_writer_is_waited_for(
    path: Path,
    holder: str,
    call: Callable[[Connection, threading.Event, threading.Event], Any],
) -> None:
    """Claim, renew and record wait out B's 1 s write lock and succeed (C06)."""
    a = connect(path, busy_timeout_s=2.0)
    _, other = _plan(a, 2)
    start, held = threading.Event(), threading.Event()
    b = threading.Thread(
        target=_hold_write_lock, args=(path, holder, start, held, other)
    )
    b.start()
    try:
        began = time.monotonic()
        result = call(a, start, held)
        waited = time.monotonic() - began
    finally:
        b.join(10)
        close(a)

    assert not b.is_alive()
    assert result
    assert 0.8 <= waited < 2.0


# --- C08: a connection does not cross fork --------------------------------------------


def _claim_in_child(path: str, connected: Any, out: Any) -> None:
    """Open an own connection, say so, claim a job and report it (a child process)."""
    cx = connect(path, migrate=False)
    try:
        connected.set()
        lease = lease_next_job(cx, owner="child", ttl_s=LONG_TTL)
        out.put(None if lease is None else (lease.job_id, lease.token))
    finally:
        close(cx)


def _use_inherited(cx: Connection, out: Any) -> None:
    """Use the parent's connection in a forked child and report what happened."""
    try:
        lease_next_job(cx, owner="zombie", ttl_s=LONG_TTL)
    except InheritedConnection as exc:
        out.put(f"InheritedConnection: {exc}")
    else:
        out.put("no error")


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_child_claims_while_parent_holds_a_write(path: Path, method: str) -> None:
    """A child claims with its own connection; the parent's open write commits (C08)."""
    ctx = multiprocessing.get_context(method)
    cx = connect(path)
    mine, theirs = _plan(cx, 2)
    connected, out = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_claim_in_child, args=(str(path), connected, out))

    with transaction(cx):
        parent_lease = lease_next_job(cx, owner="parent", ttl_s=LONG_TTL)
        child.start()
        assert connected.wait(30)
    got = out.get(timeout=30)
    child.join(30)

    try:
        assert child.exitcode == 0
        assert parent_lease is not None and parent_lease.job_id == mine
        assert got == (theirs, 1)
        assert cx.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        owners = dict(cx.execute("SELECT job_id, lease_owner FROM jobs").fetchall())
        assert owners == {mine: "parent", theirs: "child"}
    finally:
        close(cx)


def test_inherited_connection_is_refused_in_child(path: Path) -> None:
    """A connection used in a forked child raises InheritedConnection naming pids."""
    ctx = multiprocessing.get_context("fork")
    cx = connect(path)
    (job,) = _plan(cx, 1)
    out = ctx.Queue()
    child = ctx.Process(target=_use_inherited, args=(cx, out))

    child.start()
    message = out.get(timeout=30)
    child.join(30)

    try:
        assert child.exitcode == 0
        assert message.startswith("InheritedConnection: ")
        assert re.search(
            rf"opened by process {cx.owner_pid} and used in process \d+", message
        )
        assert get_job(cx, job_id=job)["lease_owner"] is None  # type: ignore[index]
        assert lease_next_job(cx, owner="parent", ttl_s=LONG_TTL) is not None
    finally:
        close(cx)


def _open_and_count(path: str, out: Any) -> None:
    """Open an own connection in a forked child and report the committed meta rows."""
    cx = connect(path, migrate=False)
    try:
        out.put(cx.execute("SELECT count(*) FROM meta").fetchone()[0])
    finally:
        close(cx)


def test_fork_during_large_write_keeps_parent_transaction(path: Path) -> None:
    """A write larger than the cache survives a fork child dropping its copy (C08)."""
    ctx = multiprocessing.get_context("fork")
    cx = connect(path)
    cx.execute("PRAGMA cache_size = 10")
    out = ctx.Queue()
    child = ctx.Process(target=_open_and_count, args=(str(path), out))

    try:
        assert cx.execute("PRAGMA cache_spill").fetchone()[0] == 0
        with transaction(cx) as tx:
            for i in range(5_000):
                tx.execute("INSERT INTO meta VALUES (?, ?)", (f"k{i}", "x" * 200))
            child.start()
            seen_by_child = out.get(timeout=30)
            child.join(30)
            in_parent = tx.execute("SELECT count(*), sum(length(value)) FROM meta")
            assert tuple(in_parent.fetchone()) == (5_000, 1_000_000)

        assert child.exitcode == 0
        assert seen_by_child == 0
        assert cx.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert cx.execute("SELECT count(*) FROM meta").fetchone()[0] == 5_000
    finally:
        close(cx)


def test_connection_clock_is_the_one_given(path: Path) -> None:
    """connect(clock=...) makes the connection read time from the given clock."""
    clock = FakeClock(start=1_000.0)
    conn = connect(path, clock=clock)
    try:
        (job,) = _plan(conn, 1)
        lease = lease_next_job(conn, owner="w1", ttl_s=30)
        assert lease is not None
        assert lease.lease_until == 1_030.0
        assert get_job(conn, job_id=job)["created_at"] == 1_000.0  # type: ignore[index]
    finally:
        close(conn)
