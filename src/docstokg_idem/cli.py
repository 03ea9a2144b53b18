"""The ``docstokg-idem`` command: plan, run, status, reconcile, verify, demo."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .core import (
    GATE_ENV,
    IdemError,
    connect,
    idempotency_enabled,
    plan_jobs,
    reconcile_jobs,
)
from .core.db import Connection, close
from .core.jobs import counts
from .core.telemetry import JsonLinesSink, LoggingSink, add_sink
from .harness.checker import check
from .pipeline.http import HttpConfig
from .pipeline.legacy import download_untracked
from .pipeline.planfile import read_plan
from .pipeline.runner import RunResult, Supervisor
from .pipeline.worker import WorkerConfig, WorkerStats

console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(code)


@contextmanager
def clear_errors() -> Iterator[None]:
    """Turn the library's errors into one clear line and exit status 2."""
    try:
        yield
    except IdemError as exc:
        fail(str(exc))
    except PermissionError as exc:
        fail(
            f"{exc.filename or exc}: permission denied; fix its permissions or choose "
            "another path"
        )
    except sqlite3.OperationalError as exc:
        if "full" in str(exc):
            fail(
                "the disk holding the database is full; free space and run the command "
                "again (what was recorded is kept)"
            )
        raise
    except OSError as exc:
        if exc.errno == 28:
            fail(
                f"disk full while writing {exc.filename or ''}: free space and run again; "
                "recorded progress is kept"
            )
        raise


def ensure_writable(folder: str) -> Path:
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        fail(
            f"output folder {folder!r} is not writable ({exc.strerror}); choose another "
            "--out or fix its permissions"
        )
    return path


def open_db(path: str) -> Connection:
    with clear_errors():
        return connect(path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    "db_path",
    envvar="DOCSTOKG_IDEM_DB",
    default="docstokg-idem.db",
    show_default=True,
    help="The job database (SQLite, WAL).",
)
@click.option(
    "--out",
    "out_dir",
    envvar="DOCSTOKG_IDEM_OUT",
    default="downloads",
    show_default=True,
    help="Folder for the downloaded files.",
)
@click.option(
    "-v", "--verbose", count=True, help="Log one line per event (-vv: debug)."
)
@click.option(
    "--events",
    type=click.Path(dir_okay=False),
    default=None,
    help="Append every telemetry event to this JSON-lines file.",
)
@click.version_option(package_name="docstokg-idem")
@click.pass_context
def main(
    ctx: click.Context, db_path: str, out_dir: str, verbose: int, events: str | None
) -> None:
    """Exactly-once downloads of scholarly artifacts, and proof by crashing them."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if verbose:
        add_sink(LoggingSink())
    if events:
        events = os.path.abspath(events)
        add_sink(JsonLinesSink(events))
    ctx.obj = {
        "db": db_path,
        "out": out_dir,
        "log_level": level if verbose else None,
        "events": events,
    }


def _plan_rows(
    cx: Connection, plan_file: str, max_attempts: int = 5
) -> tuple[int, int]:
    """Plan a file's good rows; report its bad ones. Returns (new jobs, bad rows)."""
    rows, errors = read_plan(plan_file)
    for error in errors:
        console.print(f"[yellow]bad row[/] {error}", soft_wrap=True)
    before = cx.execute("SELECT count(*) FROM jobs").fetchone()[0]
    plan_jobs(cx, [r.as_dict() for r in rows], max_attempts=max_attempts)
    after = cx.execute("SELECT count(*) FROM jobs").fetchone()[0]
    return after - before, len(errors)


@main.command()
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--max-attempts",
    default=5,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Attempts per job before it fails for good.",
)
@click.pass_obj
def plan(obj: dict[str, Any], plan_file: str, max_attempts: int) -> None:
    """Plan the rows of PLAN_FILE (JSON lines or CSV: work_id, artifact_id, url[, sha256]).

    Bad rows are reported with their line number; good rows are planned anyway.
    Planning the same file twice adds nothing. Exit status 1 if any row was bad.
    """
    rows, errors = read_plan(plan_file)
    for error in errors:
        console.print(f"[yellow]bad row[/] {error}", soft_wrap=True)
    cx = open_db(obj["db"])
    try:
        with clear_errors():
            before = cx.execute("SELECT count(*) FROM jobs").fetchone()[0]
            plan_jobs(cx, [r.as_dict() for r in rows], max_attempts=max_attempts)
            after = cx.execute("SELECT count(*) FROM jobs").fetchone()[0]
    finally:
        close(cx)
    out_console.print(
        f"planned {after - before} new jobs ({len(rows) - (after - before)} "
        f"already planned), {len(errors)} bad rows, {after} jobs in {obj['db']}"
    )
    if errors:
        sys.exit(1)


def _progress_tick(
    progress: Progress, task: Any
) -> Callable[[dict[str, Any], RunResult], None]:
    def tick(snapshot: dict[str, Any], result: RunResult) -> None:
        progress.update(
            task,
            total=snapshot["total"],
            completed=snapshot["finished"],
            crashes=result.crashes,
            live=snapshot["leases_live"],
        )

    return tick


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("leases {task.fields[live]}  crashes {task.fields[crashes]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@main.command()
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 256))
@click.option(
    "--lease-ttl",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0.001),
    help="Seconds a claim lasts unless renewed (renewed every third of it).",
)
@click.option(
    "--idempotency/--no-idempotency",
    default=None,
    help=f"Track jobs and ops (overrides {GATE_ENV}).",
)
@click.option(
    "--require-idempotency",
    is_flag=True,
    help="Fail instead of downloading untracked when the database is unusable.",
)
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Rows to download when idempotency is off.",
)
@click.option(
    "--max-body-bytes", default=2 << 30, show_default=True, type=click.IntRange(1)
)
@click.option("--retries", default=4, show_default=True, type=click.IntRange(0, 20))
@click.option(
    "--per-host",
    default=8,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Concurrent requests per host, across all workers.",
)
@click.option(
    "--synchronous",
    type=click.Choice(["NORMAL", "FULL"]),
    default="NORMAL",
    show_default=True,
    help="FULL also survives power loss, at a cost.",
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: on a tty)."
)
@click.pass_obj
def run(
    obj: dict[str, Any],
    workers: int,
    lease_ttl: float,
    idempotency: bool | None,
    require_idempotency: bool,
    plan_file: str | None,
    max_body_bytes: int,
    retries: int,
    per_host: int,
    synchronous: str,
    progress: bool | None,
) -> None:
    """Run worker processes until every planned job is finished.

    Ctrl-C stops the workers at the next chunk; progress is recorded and kept.
    """
    with clear_errors():
        gate = idempotency_enabled(idempotency)
    out = ensure_writable(obj["out"])
    http = HttpConfig(max_body_bytes=max_body_bytes, retries=retries, per_host=per_host)
    fallback = None
    if gate and plan_file is None and not os.path.exists(obj["db"]):
        fail(
            f"database {obj['db']!r} does not exist, so there are no planned jobs to run; "
            f"plan them first (docstokg-idem --db {obj['db']} plan FILE), pass --plan FILE "
            "to plan and run in one go, or pass the right --db"
        )
    if gate:
        try:
            cx = connect(obj["db"], synchronous=synchronous)
            if plan_file is not None:
                _plan_rows(cx, plan_file)
            close(cx)
        except IdemError as exc:
            if require_idempotency:
                fail(f"idempotency is required but the database is unusable: {exc}")
            console.print(
                f"[yellow]warning:[/] database unusable ({exc}); downloading "
                "untracked (gate-off behaviour). Pass --require-idempotency to fail "
                "instead.",
                soft_wrap=True,
            )
            gate, fallback = False, str(exc)
    if not gate:
        _run_untracked(obj, out, plan_file, http, workers, fallback)
        return
    template = WorkerConfig(
        out_dir=str(out),
        db_path=obj["db"],
        lease_ttl_s=lease_ttl,
        http=http,
        synchronous=synchronous,
        log_level=obj.get("log_level"),
        events_path=obj.get("events"),
    )
    show = sys.stderr.isatty() if progress is None else progress
    with clear_errors():
        if show:
            with _progress() as bar:
                task = bar.add_task("downloading", total=None, crashes=0, live=0)
                result = Supervisor(
                    template, workers=workers, on_tick=_progress_tick(bar, task)
                ).run()
        else:
            result = Supervisor(template, workers=workers).run()
    _print_run(result)
    if result.trouble:
        fail(
            f"the run stopped: {result.trouble}; no job lost an attempt, run again once "
            "it is fixed"
        )
    if result.interrupted:
        sys.exit(130)
    failed = result.final_counts.get("states", {}).get("FAILED_FINAL", 0)
    if failed:
        console.print(
            f"{failed} jobs failed for good; `docstokg-idem status` lists them with "
            "their reasons, `docstokg-idem retry` gives them fresh attempts",
            soft_wrap=True,
        )
        sys.exit(1)


def _run_untracked(
    obj: dict[str, Any],
    out: Path,
    plan_file: str | None,
    http: HttpConfig,
    workers: int,
    fallback: str | None = None,
) -> None:
    if plan_file is None and fallback is not None:
        fail(
            "the database is unusable, and an untracked download needs its rows from a "
            "plan file: pass --plan FILE, or fix --db (see the warning above)"
        )
    if plan_file is None:
        fail(
            f"idempotency is off ({GATE_ENV} unset or false), so jobs are not read from "
            "the database: pass --plan FILE to download its rows untracked, or "
            "--idempotency to run the planned jobs"
        )
    rows, errors = read_plan(plan_file)
    for error in errors:
        console.print(f"[yellow]bad row[/] {error}", soft_wrap=True)
    console.print(
        f"idempotency off: downloading {len(rows)} rows untracked "
        "(no job or op tables written)"
    )
    import multiprocess as mp

    ctx = mp.get_context("forkserver")
    specs = [r.as_dict() for r in rows]
    with ctx.Pool(workers) as pool:
        stats = pool.starmap(
            _download_shard,
            [(specs, str(out), http, (i, workers)) for i in range(workers)],
        )
    done = sum(s.jobs_done for s in stats)
    failed = sum(s.jobs_failed for s in stats)
    out_console.print(f"untracked: {done} downloaded, {failed} failed")
    if failed or errors:
        sys.exit(1)


def _download_shard(
    specs: list[dict[str, Any]], out: str, http: HttpConfig, shard: tuple[int, int]
) -> WorkerStats:
    return download_untracked(specs, out, http=http, shard=shard)


def _print_run(result: RunResult) -> None:
    c = result.final_counts
    states = ", ".join(f"{k} {v}" for k, v in sorted(c.get("states", {}).items()))
    out_console.print(
        f"finished {c.get('finished', 0)}/{c.get('total', 0)} jobs in {result.elapsed_s:.1f} s "
        f"({states}); worker crashes {result.crashes}, restarts {result.restarts}; "
        f"{result.stats.bytes_received:,} bytes received"
        + (
            "; interrupted: progress kept, run again to continue"
            if result.interrupted
            else ""
        ),
        soft_wrap=True,
    )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--failures", default=20, show_default=True, help="Failures to list.")
@click.pass_obj
def status(obj: dict[str, str], as_json: bool, failures: int) -> None:
    """Counts per state, live and expired leases, failures with their reasons."""
    _ensure_db_exists(obj["db"])
    cx = open_db(obj["db"])
    try:
        snapshot = counts(cx)
        failed = [
            dict(r)
            for r in cx.execute(
                "SELECT job_id, artifact_id, url, attempts, claimable, fail_reason FROM jobs "
                "WHERE state = 'FAILED' ORDER BY updated_at DESC LIMIT ?",
                (failures,),
            )
        ]
    finally:
        close(cx)
    if as_json:
        out_console.print_json(json.dumps({**snapshot, "failures": failed}))
        return
    table = Table(
        title=f"{obj['db']}: {snapshot['total']} jobs, {snapshot['finished']} finished"
    )
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for state, n in sorted(snapshot["states"].items()):
        table.add_row(state, str(n))
    out_console.print(table)
    out_console.print(
        f"leases: {snapshot['leases_live']} live, {snapshot['leases_expired']} "
        f"expired; {snapshot['backing_off']} jobs in retry backoff"
    )
    for f in failed:
        kind = "retryable" if f["claimable"] else "final"
        out_console.print(
            f"  FAILED ({kind}, {f['attempts']} attempts) {f['artifact_id']} "
            f"{f['job_id'][:12]}: {f['fail_reason']}",
            soft_wrap=True,
        )


def _ensure_db_exists(path: str) -> None:
    if not os.path.exists(path):
        fail(
            f"database {path!r} does not exist; plan jobs first (docstokg-idem --db {path} "
            "plan FILE) or pass the right --db"
        )


@main.command()
@click.option(
    "--repair-all",
    is_flag=True,
    help="Download again every published job whose file is missing, even "
    "when none of them is in --out (normally a sign of a wrong --out).",
)
@click.pass_obj
def reconcile(obj: dict[str, Any], repair_all: bool) -> None:
    """Heal what crashed workers left: stale leases and ops, part files, lost files."""
    _ensure_db_exists(obj["db"])
    cx = open_db(obj["db"])
    try:
        with clear_errors():
            try:
                report = reconcile_jobs(cx, obj["out"], repair_all=repair_all)
            except ValueError as exc:
                fail(f"{exc}; nothing was changed")
    finally:
        close(cx)
    parts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.as_dict().items())
    out_console.print(f"reconciled: {parts}")


@main.command()
@click.pass_obj
def retry(obj: dict[str, Any]) -> None:
    """Make the jobs that failed for good claimable again; `run` then retries them."""
    from .core.jobs import retry_failed

    _ensure_db_exists(obj["db"])
    cx = open_db(obj["db"])
    try:
        with clear_errors():
            count = retry_failed(cx)
    finally:
        close(cx)
    out_console.print(f"{count} failed jobs will be retried by the next run")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def verify(obj: dict[str, str], as_json: bool) -> None:
    """Check the database, the files and the manifest against I1–I12; exit 1 on any violation."""
    _ensure_db_exists(obj["db"])
    open_db(obj["db"]).close()  # a clear error for a corrupt or newer database
    report = check(obj["db"], obj["out"])
    if as_json:
        out_console.print_json(
            json.dumps(
                {
                    "ok": report.ok,
                    "jobs": report.jobs,
                    "checked": report.checked,
                    "violations": [
                        {
                            "invariant": v.invariant,
                            "message": v.message,
                            "rows": list(v.rows),
                        }
                        for v in report.violations
                    ],
                },
                default=str,
            )
        )
    else:
        out_console.print(str(report), soft_wrap=True)
    sys.exit(0 if report.ok else 1)


@main.command()
@click.option(
    "--seed",
    default=0,
    show_default=True,
    help="Fixes the artifacts, the origin's faults and the crash plan; when "
    "each kill lands still depends on how the processes are scheduled.",
)
@click.option("--jobs", default=200, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--crashes",
    default=8,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="Workers to kill with SIGKILL at random crash points.",
)
@click.option(
    "--out",
    "demo_out",
    default=None,
    help="Folder for the demo's database and files (default: a temp folder).",
)
@click.option("--progress/--no-progress", default=None)
def demo(
    seed: int,
    jobs: int,
    workers: int,
    crashes: int,
    demo_out: str | None,
    progress: bool | None,
) -> None:
    """Download ~200 artifacts from a faulty local origin while killing workers; verify."""
    from .demo import run_demo

    if demo_out:
        ensure_writable(demo_out)
    console.print(
        f"demo: seed {seed}, {jobs} artifacts, {workers} workers, {crashes} "
        "SIGKILLs at random crash points, origin on 127.0.0.1"
    )
    show = sys.stderr.isatty() if progress is None else progress
    with clear_errors():
        if show:
            with _progress() as bar:
                task = bar.add_task("downloading", total=jobs, crashes=0, live=0)
                report = run_demo(
                    seed=seed,
                    jobs=jobs,
                    workers=workers,
                    crashes=crashes,
                    out_dir=demo_out,
                    on_tick=_progress_tick(bar, task),
                )
        else:
            report = run_demo(
                seed=seed, jobs=jobs, workers=workers, crashes=crashes, out_dir=demo_out
            )
    for line in report.lines():
        out_console.print(line)
    if demo_out:
        out_console.print(f"files and database in {report.out_dir}")
    elif report.check.ok:
        import shutil

        shutil.rmtree(report.out_dir, ignore_errors=True)
    else:
        out_console.print(f"files and database kept for inspection in {report.out_dir}")
    if not report.check.ok:
        out_console.print(str(report.check), soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
