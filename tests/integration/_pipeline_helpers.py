"""Shared pieces of the pipeline's end-to-end tests: plans, workers, database reads.

Worker processes are real: ``python -c`` running :func:`run_worker` (SIGTERM
asks it to stop, as under the supervisor), armed
through ``DOCSTOKG_IDEM_FAULTS`` the way a user arms one, so a ``kill`` fault
ends the process with a real SIGKILL. Nothing here sleeps: waits are on
process exit, on a stop reported by ``waitpid``, or on a database condition
polled against a bounded deadline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docstokg_idem import Connection, close, connect, plan_jobs
from docstokg_idem.core.crashpoints import FAULTS_ENV, WORKER_ENV
from docstokg_idem.core.files import list_finals, list_parts
from docstokg_idem.harness.checker import Expected
from docstokg_idem.pipeline.http import HttpConfig
from docstokg_idem.pipeline.origin import Origin
from docstokg_idem.pipeline.worker import Worker, WorkerConfig, WorkerStats

KIB = 1024
#: Bounds every wait on a worker process; a healthy one needs well under a second.
PROCESS_TIMEOUT_S = 60.0
CLOCK_ENV = "DOCSTOKG_IDEM_CLOCK_FILE"

#: Fast retries and bounded timeouts: the origin is local.
FAST_HTTP = HttpConfig(
    connect_timeout_s=5.0,
    read_timeout_s=10.0,
    retries=2,
    backoff_s=0.01,
    backoff_max_s=0.05,
    retry_after_max_s=1,
)

# The body of a worker process: its config comes as JSON in argv[1]; an
# optional "point[:hit]" in argv[2] makes it SIGSTOP itself at that hit.
_WORKER_MAIN = """
import json, os, signal, sys, threading
from docstokg_idem.core.crashpoints import set_hook
from docstokg_idem.pipeline.http import HttpConfig
from docstokg_idem.pipeline.worker import WorkerConfig, install_stop_signals, run_worker

stop = threading.Event()
install_stop_signals(stop)  # as the supervisor's workers do

raw = json.loads(sys.argv[1])
raw["http"] = HttpConfig(**raw["http"])
if len(sys.argv) > 2:
    point, _, nth = sys.argv[2].partition(":")
    seen = []

    def hold(name):
        if name == point:
            seen.append(name)
            if len(seen) == int(nth or 1):
                os.kill(os.getpid(), signal.SIGSTOP)

    set_hook(hold)
stats = run_worker(WorkerConfig(**raw), stop)
print(json.dumps(stats.as_dict()), flush=True)
"""


def worker_config(root: Path, **changes: Any) -> WorkerConfig:
    """A worker of this test's folder: small chunks, progress every 64 KiB."""
    base = WorkerConfig(
        out_dir=str(root / "out"),
        db_path=str(root / "jobs.db"),
        owner="w1",
        lease_ttl_s=30.0,
        chunk_bytes=16 * KIB,
        progress_every_bytes=64 * KIB,
        http=FAST_HTTP,
    )
    return dataclasses.replace(base, **changes)


def rows_for(origin: Origin, names: Iterable[str]) -> list[dict[str, str]]:
    """Plan rows of the named artifacts: one work per artifact."""
    return [
        {"work_id": f"W-{name}", "artifact_id": name, "url": origin.url(name)}
        for name in names
    ]


def plan(db: Path | str, rows: Iterable[Mapping[str, Any]], **kw: Any) -> list[str]:
    """Plan ``rows`` into ``db``; return their job ids."""
    cx = connect(db)
    try:
        return plan_jobs(cx, list(rows), **kw)
    finally:
        close(cx)


def expected(origin: Origin, ids: Mapping[str, str]) -> dict[str, Expected]:
    """What the checker must see, per job id, from what the origin served."""
    out = {}
    for name, job_id in ids.items():
        want = origin.expected(name)
        out[job_id] = Expected(
            want.size,
            want.sha256,
            full_gets=origin.counters(name)["full_gets"],
            validator_changes=want.version,
        )
    return out


def run_inline(
    config: WorkerConfig,
    *,
    cx: Connection | None = None,
    stop: threading.Event | None = None,
) -> WorkerStats:
    """Run a worker in this process until nothing is claimable (or ``stop`` is set)."""
    worker = Worker(config, cx=cx, stop=stop)
    try:
        return worker.run()
    finally:
        worker.close()


@dataclass
class WorkerProcess:
    """A worker in its own process."""

    proc: subprocess.Popen[str]
    owner: str
    stdout: str = ""
    stderr: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self) -> int:
        """Wait for the exit, keep its output; return the exit code (-9: SIGKILL)."""
        self.stdout, self.stderr = self.proc.communicate(timeout=PROCESS_TIMEOUT_S)
        return self.proc.returncode

    def stats(self) -> dict[str, int]:
        """Wait for a clean exit and return the worker's stats."""
        assert self.wait() == 0, self.stderr
        return dict(json.loads(self.stdout.strip().splitlines()[-1]))

    def wait_stopped(self) -> None:
        """Block until the process stopped itself with SIGSTOP."""
        _, status = os.waitpid(self.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"worker {self.owner} ended instead: {status}"
        assert os.WSTOPSIG(status) == signal.SIGSTOP

    def kill(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


def start_worker(
    config: WorkerConfig,
    *,
    faults: Iterable[Mapping[str, Any]] = (),
    stop_at: str | None = None,
    clock_file: Path | None = None,
) -> WorkerProcess:
    """Start ``config`` as a worker process, armed with ``faults`` by environment.

    ``stop_at`` (``"point"`` or ``"point:hit"``) makes the worker stop itself
    with SIGSTOP there; ``clock_file`` shares a fake clock with this process.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (FAULTS_ENV, WORKER_ENV, CLOCK_ENV)
    }
    faults = list(faults)
    if faults:
        env[FAULTS_ENV] = json.dumps(faults)
    env[WORKER_ENV] = config.owner
    if clock_file is not None:
        env[CLOCK_ENV] = str(clock_file)
    argv = [sys.executable, "-c", _WORKER_MAIN, json.dumps(dataclasses.asdict(config))]
    if stop_at is not None:
        argv.append(stop_at)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    return WorkerProcess(proc, config.owner)


def wait_until(
    condition: Callable[[], Any], *, timeout_s: float = 20.0, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)  # the poll interval, not a synchronisation


# --- reading the database and the folder ------------------------------------------


def read(db: Path | str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Rows of a read-only query, as dicts."""
    cx = sqlite3.connect(f"file:{os.fspath(db)}?mode=ro", uri=True)
    cx.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in cx.execute(sql, args).fetchall()]
    finally:
        cx.close()


def job(db: Path | str, job_id: str) -> dict[str, Any]:
    (got,) = read(db, "SELECT * FROM jobs WHERE job_id = ?", job_id)
    return got


def ops(db: Path | str, job_id: str) -> dict[str, dict[str, Any]]:
    """The job's ops by kind."""
    return {
        o["kind"]: o for o in read(db, "SELECT * FROM ops WHERE job_id = ?", job_id)
    }


def history(db: Path | str, job_id: str) -> list[dict[str, Any]]:
    return read(db, "SELECT * FROM history WHERE job_id = ? ORDER BY seq", job_id)


def finalized_count(db: Path | str, job_id: str) -> int:
    """How many FINALIZED transitions the job's history holds."""
    return sum(
        1
        for h in history(db, job_id)
        if h["event"] == "state" and h["to_state"] == "FINALIZED"
    )


def table_dump(db: Path | str) -> dict[str, list[dict[str, Any]]]:
    """Every row of the job, op, history and manifest tables."""
    return {
        t: read(db, f"SELECT * FROM {t}")
        for t in ("jobs", "ops", "history", "manifest")
    }


def parts(out: Path | str) -> dict[int, int]:
    """The part files in ``out``: token -> size."""
    return {token: path.stat().st_size for path, _, token in list_parts(out)}


def finals(out: Path | str) -> dict[str, Path]:
    return list_finals(out)
