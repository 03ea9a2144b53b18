"""SQLite connections, transactions and migrations.

Every dialect-specific piece of SQL lives in ``sql/sqlite/`` and is loaded by
name through :func:`q`; a second backend slots in beside it.

Transactions are explicit. The connection runs with ``isolation_level=None``
(the driver never opens a transaction on its own), and :func:`transaction`
issues ``BEGIN IMMEDIATE`` so that a read-then-write takes the write lock before
it reads (C06). A busy database is retried as a whole transaction, never inside
one. Writers of this library also queue on an advisory file lock beside the
database, which hands the write lock from process to process without SQLite's
sleeping busy handler; a killed holder releases it with its process.

A connection never crosses fork (C08). SQLite keeps lock state per process, and
a forked child inherits the parent's copy: a child that opens its own
connection while the parent holds a write would wait on a lock that nobody in
the child will ever release. So a forked child closes its copies at once (which
touches nothing shared, because connections never spill uncommitted pages into
the WAL), and a copy used anyway raises :class:`InheritedConnection`.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any, TypeVar

from .clock import Clock, default_clock
from .errors import (
    DatabaseCorrupt,
    DatabaseUnavailable,
    InheritedConnection,
    SchemaTooNew,
)

T = TypeVar("T")

#: How many write locks this process holds right now (0 or 1 per connection).
#: The harness's scheduler reads it at a crash point: a worker held there while
#: holding the lock must be the next to run, or every other worker would block.
write_locks_held = 0

PAGE_SIZE = 1024

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


class Connection(sqlite3.Connection):
    """A SQLite connection that knows its process, its clock and its lock file."""

    owner_pid: int
    db_path: str
    clock: Clock
    lock_fd: int | None
    depth: int
    #: the transaction's "now", read once per transaction (see jobs._now)
    tx_now: float | None
    #: whether the last run_effect call replayed a recorded result
    last_replayed: bool
    #: whether that replay moved the job's state (see ledger._catch_up)
    caught_up: bool


def _load_queries() -> dict[str, str]:
    text = resources.files(__package__).joinpath("sql/sqlite/queries.sql").read_text()
    queries: dict[str, str] = {}
    for chunk in re.split(r"^-- name: ", text, flags=re.M)[1:]:
        name, _, body = chunk.partition("\n")
        queries[name.strip()] = body.strip()
    return queries


_QUERIES = _load_queries()


#: The open connections of this process, closed in a forked child (C08).
_OPEN: weakref.WeakSet[Connection] = weakref.WeakSet()


def q(name: str) -> str:
    """The SQL text of the named query."""
    return _QUERIES[name]


def connect(
    path: str | os.PathLike[str],
    *,
    synchronous: str = "NORMAL",
    busy_timeout_s: float = 30.0,
    clock: Clock | None = None,
    migrate: bool = True,
    file_lock: bool = True,
) -> Connection:
    """Open (and by default migrate) the job database at ``path`` in WAL mode.

    ``synchronous="NORMAL"`` survives a killed process; ``"FULL"`` also survives
    power loss, at the cost measured in the README.

    Raises:
        DatabaseUnavailable: the file cannot be opened or created.
        DatabaseCorrupt: the file is not a SQLite database.
        SchemaTooNew: the database was written by a newer version.
    """
    path = os.fspath(path)
    mode = synchronous.upper()
    if mode not in SYNCHRONOUS_MODES:
        raise ValueError(
            f"synchronous={synchronous!r} is not a SQLite synchronous mode; "
            f"use one of {', '.join(SYNCHRONOUS_MODES)} (NORMAL survives a killed "
            "process, FULL also survives power loss)"
        )
    memory = path == ":memory:" or path.startswith("file::memory:")
    try:
        cx = sqlite3.connect(
            path,
            timeout=busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
            factory=Connection,
        )
    except sqlite3.OperationalError as exc:
        raise _unavailable(path, exc) from None
    assert isinstance(cx, Connection)
    cx.row_factory = sqlite3.Row
    cx.owner_pid = os.getpid()
    cx.db_path = path
    cx.clock = clock or default_clock()
    cx.lock_fd = None
    cx.depth = 0
    cx.tx_now = None
    cx.last_replayed = False
    cx.caught_up = False
    try:
        _ensure_not_newer(cx)  # before WAL: a newer database is left byte for byte
        _retry_busy(
            lambda: _configure(
                cx, memory=memory, synchronous=mode, busy_timeout_s=busy_timeout_s
            ),
            deadline_s=max(busy_timeout_s, 10.0),
        )
    except SchemaTooNew:
        cx.close()
        raise
    except sqlite3.DatabaseError as exc:
        cx.close()
        if "not a database" in str(exc) or "malformed" in str(exc):
            raise DatabaseCorrupt(
                f"{path!r} is not a readable SQLite database ({exc}); "
                "restore it from a backup or point --db at another file"
            ) from None
        raise _unavailable(path, exc) from None
    if file_lock and not memory:
        cx.lock_fd = _open_lock(path)
    _OPEN.add(cx)
    if migrate:
        try:
            apply_migration(cx)
        except BaseException:
            close(cx)
            raise
    return cx


def _retry_busy(fn: Callable[[], None], *, deadline_s: float) -> None:
    """Run ``fn`` again while SQLite says busy (processes opening a new file at once)."""
    start = time.monotonic()
    delay = 0.005
    while True:
        try:
            fn()
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() - start > deadline_s:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.2)


def _configure(
    cx: Connection, *, memory: bool, synchronous: str, busy_timeout_s: float
) -> None:
    cx.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    # A new file gets small pages: a lifecycle dirties a few dozen pages in
    # all, and every dirty page is written whole to the WAL at each commit.
    cx.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    if not memory:
        mode = cx.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(
                f"could not switch to WAL (journal_mode={mode})"
            )
    cx.execute(f"PRAGMA synchronous = {synchronous}")
    # Checkpoint less often: jobs rows are rewritten many times each, and a
    # page checkpointed once per 4,000 WAL pages is written back once.
    cx.execute("PRAGMA wal_autocheckpoint = 4000")
    cx.execute("PRAGMA foreign_keys = ON")
    # Uncommitted pages stay in memory until COMMIT, so a forked child that
    # closes its copy of an open write rolls back nothing the parent shares.
    cx.execute("PRAGMA cache_spill = OFF")


def _unavailable(path: str, exc: Exception) -> DatabaseUnavailable:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return DatabaseUnavailable(
            f"cannot open database {path!r}: it is a folder, not a database file; "
            "pass the path of a file (it is created if missing)"
        )
    why = "its folder does not exist" if not os.path.isdir(folder) else str(exc)
    return DatabaseUnavailable(
        f"cannot open database {path!r}: {why}; create the folder, check its "
        "permissions, or pass another path"
    )


def _open_lock(path: str) -> int | None:
    try:
        return os.open(path + "-idem.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None  # a read-only folder: SQLite's own locking still applies


def close(cx: Connection) -> None:
    """Close the connection and its lock file."""
    _OPEN.discard(cx)
    if getattr(cx, "lock_fd", None) is not None:
        assert cx.lock_fd is not None
        os.close(cx.lock_fd)
        cx.lock_fd = None
    cx.close()


def _close_inherited() -> None:
    """In a forked child, close the copies of the parent's connections (C08).

    Their owner stays the parent, so using one still raises
    :class:`InheritedConnection`; closing them resets SQLite's per-process lock
    state, so the child's own connections do not wait on the parent's locks.
    """
    for cx in list(_OPEN):
        try:
            close(cx)
        except sqlite3.Error:
            pass


os.register_at_fork(after_in_child=_close_inherited)


def ensure_own(cx: sqlite3.Connection) -> Connection:
    """Refuse a connection opened by another process (C08)."""
    if not isinstance(cx, Connection):
        raise TypeError(
            f"expected a connection from docstokg_idem.connect(), got {cx!r}; "
            "open the database with docstokg_idem.connect(path)"
        )
    if cx.owner_pid != os.getpid():
        raise InheritedConnection(
            f"connection to {cx.db_path!r} was opened by process {cx.owner_pid} and "
            f"used in process {os.getpid()}; a SQLite connection must not cross "
            "fork: open a new one in each worker with docstokg_idem.connect()"
        )
    return cx


def is_busy(exc: BaseException) -> bool:
    """Tell whether ``exc`` is SQLite saying the database is locked or busy."""
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


@contextmanager
def transaction(
    cx: sqlite3.Connection, *, immediate: bool = True
) -> Iterator[Connection]:
    """Run the block in one transaction: commit on success, roll back on error.

    ``immediate`` takes the write lock at ``BEGIN`` (every read-then-write path).
    Nested use joins the outer transaction.
    """
    own = ensure_own(cx)
    if own.depth:
        own.depth += 1
        try:
            yield own
        finally:
            own.depth -= 1
        return
    global write_locks_held
    locked = immediate and own.lock_fd is not None
    if locked:
        assert own.lock_fd is not None
        fcntl.flock(own.lock_fd, fcntl.LOCK_EX)
    write_locks_held += 1
    try:
        own.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        own.depth = 1
        own.tx_now = None
        try:
            yield own
        except BaseException:
            if own.in_transaction:
                own.execute("ROLLBACK")
            raise
        else:
            own.execute("COMMIT")
        finally:
            own.depth = 0
    finally:
        write_locks_held -= 1
        if locked:
            assert own.lock_fd is not None
            fcntl.flock(own.lock_fd, fcntl.LOCK_UN)


def write(
    cx: sqlite3.Connection, fn: Callable[[Connection], T], *, deadline_s: float = 60.0
) -> T:
    """Run ``fn`` in an immediate transaction, retrying the whole of it while busy.

    A busy error never reaches the caller before ``deadline_s`` of retrying.
    """
    start = time.monotonic()
    delay = 0.001
    while True:
        try:
            with transaction(cx) as tx:
                return fn(tx)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() - start > deadline_s:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.05)


def row(
    cx: sqlite3.Connection, name: str, params: dict[str, Any] | None = None
) -> sqlite3.Row | None:
    """Run a named query and return its first row."""
    result: sqlite3.Row | None = cx.execute(q(name), params or {}).fetchone()
    return result


# --- migrations -------------------------------------------------------------


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files(__package__).joinpath("sql/sqlite/migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


MIGRATIONS = _migrations()
SCHEMA_VERSION = MIGRATIONS[-1][0]


def _statements(script: str) -> list[str]:
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        if not buffer and line.strip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError(f"unterminated SQL statement in a migration: {buffer[:80]!r}")
    return statements


def get_schema_version(cx: sqlite3.Connection) -> int:
    """The schema version stored in the database (0 for a new file)."""
    return int(cx.execute("PRAGMA user_version").fetchone()[0])


def _ensure_not_newer(cx: Connection) -> int:
    """Return the schema version; raise :class:`SchemaTooNew` above ours."""
    current = get_schema_version(cx)
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"database {cx.db_path!r} has schema version {current}, newer than "
            f"{SCHEMA_VERSION}, the newest this docstokg-idem knows; upgrade "
            "docstokg-idem to open it (the file was left untouched)"
        )
    return current


def apply_migration(cx: sqlite3.Connection) -> int:
    """Bring the schema up to date, atomically; return the version reached.

    Running it again does nothing. A database of a newer schema is refused and
    left untouched.

    Raises:
        SchemaTooNew: the database's version is above :data:`SCHEMA_VERSION`.
    """

    def migrate(tx: Connection) -> int:
        current = _ensure_not_newer(tx)
        for version, _name, script in MIGRATIONS:
            if version <= current:
                continue
            for statement in _statements(script):
                tx.execute(statement)
            tx.execute(f"PRAGMA user_version = {version}")
        return max(current, SCHEMA_VERSION)

    return write(cx, migrate)
