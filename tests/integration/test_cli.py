"""The ``docstokg-idem`` command, run as a real process against a local origin."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pipeline_helpers import finals, parts, read, rows_for, table_dump, wait_until
from click.testing import CliRunner

from docstokg_idem import canonical_url, close, connect, job_key
from docstokg_idem.cli import main as cli_group
from docstokg_idem.core.files import sha256_file
from docstokg_idem.harness.checker import Expected, check_gate_off
from docstokg_idem.pipeline.origin import Fault, Origin

pytestmark = pytest.mark.integration

_SCRIPT = Path(sys.executable).with_name("docstokg-idem")
COMMAND = (
    [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "docstokg_idem.cli"]
)
NAMES = ["a.pdf", "b.html", "c.xml"]
SIZES = {"a.pdf": 150_000, "b.html": 20_000, "c.xml": 3_000}
HEX64 = re.compile(r"[0-9a-f]{64}")


def cli(
    tmp_path: Path,
    *args: str,
    db: Path | None = None,
    out: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``docstokg-idem --db DB --out OUT ARGS`` with a clean environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DOCSTOKG_")}
    argv = [
        *COMMAND,
        "--db",
        str(db or tmp_path / "jobs.db"),
        "--out",
        str(out or tmp_path / "out"),
        *args,
    ]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**clean, "COLUMNS": "200", **(env or {})},
        check=False,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """Assert exit status 2 with exactly one line on stderr; return that line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert done.stdout == ""
    return lines[0]


def write_plan(path: Path, origin: Origin, names: list[str] = NAMES) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_for(origin, names)))
    return path


def expected_files(origin: Origin, names: list[str] = NAMES) -> dict[str, Expected]:
    """Expected files by job id (keys of the canonical URL, as the CLI plans them)."""
    return {
        job_key(r["work_id"], r["artifact_id"], canonical_url(r["url"])): Expected(
            origin.expected(n).size, origin.expected(n).sha256
        )
        for r, n in zip(rows_for(origin, names), names, strict=True)
    }


@pytest.fixture
def origin() -> Iterator[Origin]:
    with Origin(SIZES, seed=21) as server:
        yield server


# --- help, plan, status ---------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *sorted(cli_group.commands)])
def test_every_command_has_help(tmp_path: Path, command: str | None) -> None:
    """``--help`` works for the group and every command, and names the usage."""
    args = [
        "--db",
        str(tmp_path / "jobs.db"),
        *([command] if command else []),
        "--help",
    ]

    done = CliRunner().invoke(
        cli_group, args, env={"DOCSTOKG_ENABLE_IDEMPOTENCY": None}
    )

    assert done.exit_code == 0, done.output
    assert done.output.startswith("Usage: ")
    assert (f"Usage: main {command} " if command else "Commands:") in done.output
    assert not (tmp_path / "jobs.db").exists()


BAD_JSONL = """\
{"work_id": "W1", "artifact_id": "a.pdf", "url": "URL_A"}
{"work_id": "W2", "artifact_id": "b.pdf", "url": "URL_B"
{"work_id": "W3", "artifact_id": "c.pdf"}
# a comment line
{"work_id": "W4", "artifact_id": "d.pdf", "url": "URL_A", "sha256": "abc"}
{"work_id": "W5", "artifact_id": "e.pdf", "url": "ftp://127.0.0.1/e.pdf"}
[1, 2, 3]
{"work_id": "W6", "artifact_id": "f.pdf", "url": "URL_B"}
"""

BAD_CSV = """\
work_id,artifact_id,url,sha256
W1,a.pdf,URL_A,
W2,b.pdf,URL_B,,extra
W3,c.pdf,,
W4,d.pdf,URL_A,abc
W5,e.pdf,example.com:80/e.pdf,

W6,f.pdf,URL_B,
"""

#: For each format: the file, and the line numbers of its bad rows.
PLANS = {
    "plan.jsonl": (BAD_JSONL, [2, 3, 5, 6, 7]),
    "plan.csv": (BAD_CSV, [3, 4, 5, 6]),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_plan_reports_bad_rows_by_line_and_plans_the_rest(
    tmp_path: Path, origin: Origin, name: str
) -> None:
    """Bad rows named by line (exit 1), good ones planned; planning twice adds none."""
    text, bad_lines = PLANS[name]
    plan_file = tmp_path / name
    plan_file.write_text(
        text.replace("URL_A", origin.url("a.pdf")).replace(
            "URL_B", origin.url("b.html")
        )
    )

    first = cli(tmp_path, "plan", str(plan_file))
    second = cli(tmp_path, "plan", str(plan_file))

    assert first.returncode == second.returncode == 1
    reported = [
        int(m)
        for m in re.findall(
            rf"bad row {re.escape(str(plan_file))}:(\d+): ", first.stderr
        )
    ]
    assert reported == bad_lines, first.stderr
    assert (
        f"planned 2 new jobs (0 already planned), {len(bad_lines)} bad rows"
        in first.stdout
    )
    assert (
        f"planned 0 new jobs (2 already planned), {len(bad_lines)} bad rows"
        in second.stdout
    )
    jobs = table_dump(tmp_path / "jobs.db")["jobs"]
    assert sorted(j["work_id"] for j in jobs) == ["W1", "W6"]


def test_status_json_has_counts_leases_and_failures(
    tmp_path: Path, origin: Origin
) -> None:
    """``status --json``: per-state counts, lease counts and failures with reasons."""
    plan_file = write_plan(tmp_path / "plan.jsonl", origin)
    assert cli(tmp_path, "plan", str(plan_file)).returncode == 0
    planned = json.loads(cli(tmp_path, "status", "--json").stdout)

    ran = cli(
        tmp_path,
        "run",
        "--idempotency",
        "--workers",
        "1",
        "--no-progress",
        "--max-body-bytes",
        "100000",
        "--retries",
        "0",
    )
    status = json.loads(cli(tmp_path, "status", "--json").stdout)

    assert planned == {
        "total": 3,
        "finished": 0,
        "states": {"PLANNED": 3},
        "leases_live": 0,
        "leases_expired": 0,
        "backing_off": 0,
        "next_retry_at": None,
        "next_lease_expiry": None,
        "failures": [],
    }
    assert ran.returncode == 1, ran.stderr  # one job failed for good
    assert "1 jobs failed for good" in ran.stderr
    assert {k: status[k] for k in ("total", "finished", "states", "leases_live")} == {
        "total": 3,
        "finished": 3,
        "states": {"INDEXED": 2, "FAILED_FINAL": 1},
        "leases_live": 0,
    }
    (failure,) = status["failures"]
    assert set(failure) == {
        "job_id",
        "artifact_id",
        "url",
        "attempts",
        "claimable",
        "fail_reason",
    }
    assert (failure["artifact_id"], failure["claimable"]) == ("a.pdf", 0)
    assert "over the maximum of 100000 bytes" in failure["fail_reason"]


# --- run and verify -------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_origin() -> Iterator[Origin]:
    """An origin that outlives single tests, for runs that are copied and resumed."""
    with Origin(SIZES, seed=21) as server:
        yield server


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, live_origin: Origin) -> Path:
    """A tracked CLI run of three artifacts with two worker processes, to copy."""
    root = tmp_path_factory.mktemp("cli-run")
    plan_file = write_plan(root / "plan.jsonl", live_origin)
    assert cli(root, "plan", str(plan_file)).returncode == 0
    done = cli(root, "run", "--idempotency", "--workers", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "finished 3/3 jobs" in done.stdout
    return root


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["none", "final deleted", "byte edited"])
def test_verify_passes_a_clean_run_and_names_damage(
    tmp_path: Path, finished_run: Path, damage: str
) -> None:
    """``verify`` exits 0 on a clean run, 1 with a readable I2 line on a damaged one."""
    root = tmp_path / "run"
    shutil.copytree(finished_run, root)
    victim = sorted(finals(root / "out").values())[0]
    if damage == "final deleted":
        victim.unlink()
    elif damage == "byte edited":
        _flip_byte(victim)

    done = cli(root, "verify")

    if damage == "none":
        assert done.returncode == 0, done.stdout
        assert done.stdout.startswith("exactly-once: 3 jobs, I1, I2,")
        return
    assert done.returncode == 1
    assert "violations of I2 over 3 jobs" in done.stdout
    reason = {
        "final deleted": f"job {victim.name[:12]} is INDEXED but has no final file",
        "byte edited": f"final file {victim.name} does not match what the origin "
        "served",
    }[damage]
    assert f"  - I2 (one artifact): {reason}\n" in done.stdout
    as_json = json.loads(cli(root, "verify", "--json").stdout)
    assert not as_json["ok"] and {v["invariant"] for v in as_json["violations"]} == {
        "I2"
    }


def test_reconcile_and_rerun_repair_a_deleted_file(
    tmp_path: Path, finished_run: Path, live_origin: Origin
) -> None:
    """A deleted final file: ``reconcile`` sends the job back, ``run`` refetches it."""
    root = tmp_path / "run"
    shutil.copytree(finished_run, root)
    victim = finals(root / "out")[next(iter(expected_files(live_origin, ["a.pdf"])))]
    victim.unlink()
    live_origin.reset_counters()

    reconciled = cli(root, "reconcile")
    rerun = cli(root, "run", "--idempotency", "--no-progress")
    verified = cli(root, "verify")

    assert (
        "reconciled: leases cleared 0, ops abandoned 0, parts removed 0, repaired 1"
        in reconciled.stdout
    ), reconciled.stderr
    assert "finished 3/3 jobs" in rerun.stdout, rerun.stderr
    assert verified.returncode == 0, verified.stdout
    assert sha256_file(victim) == (live_origin.expected("a.pdf").sha256, SIZES["a.pdf"])
    served = live_origin.total_counters()
    assert (served["full_gets"], live_origin.counters("a.pdf")["full_gets"]) == (1, 1)


def test_ctrl_c_keeps_progress_and_a_rerun_resumes(tmp_path: Path) -> None:
    """SIGINT to ``run``: exit 130, progress kept; the next ``run`` resumes by range."""
    slow = Fault(slow_chunk_delay=0.05)
    with Origin(SIZES, seed=21, faults=dict.fromkeys(SIZES, slow)) as server:
        assert (
            cli(
                tmp_path, "plan", str(write_plan(tmp_path / "plan.jsonl", server))
            ).returncode
            == 0
        )
        argv = [
            *COMMAND,
            "--db",
            str(tmp_path / "jobs.db"),
            "--out",
            str(tmp_path / "out"),
            "run",
            "--idempotency",
            "--workers",
            "2",
            "--no-progress",
        ]
        run = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        try:
            wait_until(
                lambda: read(
                    tmp_path / "jobs.db",
                    "SELECT 1 FROM ops WHERE kind = "
                    "'STREAM' AND status = 'IN_PROGRESS'",
                ),
                what="a stream in progress",
            )
            run.send_signal(signal.SIGINT)
            stdout, stderr = run.communicate(timeout=60)
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
        kept = read(
            tmp_path / "jobs.db",
            "SELECT j.artifact_id, j.lease_owner, o.progress "
            "FROM jobs j JOIN ops o USING (job_id) WHERE o.kind = 'STREAM' "
            "AND j.state != 'INDEXED'",
        )

        for name in SIZES:
            server.clear_fault(name)
        rerun = cli(tmp_path, "run", "--idempotency", "--no-progress")
        verified = cli(tmp_path, "verify")
        served = server.total_counters()

    assert run.returncode == 130, stderr
    assert "interrupted: progress kept, run again to continue" in stdout
    assert kept and all(k["lease_owner"] is None for k in kept)
    assert any(k["progress"] for k in kept), kept
    partial = [k for k in kept if 0 < k["progress"] < SIZES[k["artifact_id"]]]
    assert "finished 3/3 jobs" in rerun.stdout, rerun.stderr
    assert verified.returncode == 0, verified.stdout
    assert served["range_gets"] == len(partial) and served["full_gets"] == len(SIZES)


# --- errors are one clear line --------------------------------------------------------


def _newer_schema(db: Path) -> None:
    close(connect(db))
    cx = sqlite3.connect(db)
    cx.execute("PRAGMA user_version = 99")
    cx.close()


def _corrupt(db: Path) -> None:
    db.write_bytes(b"this is not a database, only text\n" * 200)


@pytest.mark.parametrize(
    ("command", "broken"),
    [
        *[
            (c, b)
            for c in ("status", "verify")
            for b in ("missing", "newer schema", "corrupt")
        ],
        ("reconcile", "corrupt"),
    ],
)
def test_unusable_database_is_one_clear_line(
    tmp_path: Path, command: str, broken: str
) -> None:
    """A missing, newer-schema or corrupt database: exit 2, one line that names it."""
    db = tmp_path / "jobs.db"
    if broken == "newer schema":
        _newer_schema(db)
    elif broken == "corrupt":
        _corrupt(db)
    before = db.read_bytes() if db.exists() else None

    line = one_error_line(cli(tmp_path, command))

    assert str(db) in line
    words = {
        "missing": "does not exist",
        "newer schema": "schema version 99, newer than",
        "corrupt": "is not a readable SQLite database",
    }
    assert words[broken] in line
    assert (db.read_bytes() if db.exists() else None) == before


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only mount"])
def test_unwritable_output_folder_is_one_clear_line(
    tmp_path: Path, origin: Origin, where: str
) -> None:
    """An --out that cannot be written: exit 2 and one line naming the folder."""
    plan_file = write_plan(tmp_path / "plan.jsonl", origin)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file\n")
    out = {
        "a file": blocker,
        "under a file": blocker / "out",
        "read-only mount": tmp_path / "ro",
    }[where]
    if where == "read-only mount":
        out.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs ({mounted.stderr.strip()})")
    try:
        line = one_error_line(
            cli(tmp_path, "run", "--no-idempotency", "--plan", str(plan_file), out=out)
        )
    finally:
        if where == "read-only mount":
            subprocess.run(["umount", "-l", str(out)], check=True)

    assert f"output folder {str(out)!r} is not writable" in line
    assert origin.total_counters()["requests"] == 0


# --- the feature gate -----------------------------------------------------------------


def test_gate_off_run_downloads_untracked(tmp_path: Path, origin: Origin) -> None:
    """``run --no-idempotency --plan``: files published whole, no database (I11)."""
    plan_file = write_plan(tmp_path / "plan.jsonl", origin)

    done = cli(
        tmp_path,
        "run",
        "--no-idempotency",
        "--plan",
        str(plan_file),
        "--workers",
        "2",
        env={"DOCSTOKG_ENABLE_IDEMPOTENCY": "1"},
    )

    assert done.returncode == 0, done.stderr
    assert "untracked: 3 downloaded, 0 failed" in done.stdout
    assert not (tmp_path / "jobs.db").exists()
    want = expected_files(origin)
    assert set(finals(tmp_path / "out")) == set(want) and parts(tmp_path / "out") == {}
    report = check_gate_off(tmp_path / "jobs.db", tmp_path / "out", expected=want)
    assert report.ok, str(report)


@pytest.mark.parametrize("broken", ["a folder", "corrupt"])
def test_gate_on_with_unusable_database_warns_and_downloads(
    tmp_path: Path, origin: Origin, broken: str
) -> None:
    """Gate on, database unusable: a warning, gate-off downloads, the db left alone."""
    plan_file = write_plan(tmp_path / "plan.jsonl", origin)
    db = tmp_path / "jobs.db"
    db.mkdir() if broken == "a folder" else _corrupt(db)

    done = cli(
        tmp_path,
        "run",
        "--plan",
        str(plan_file),
        env={"DOCSTOKG_ENABLE_IDEMPOTENCY": "yes"},
    )

    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("warning: database unusable (")
    assert "downloading untracked (gate-off behaviour)" in done.stderr
    assert "untracked: 3 downloaded, 0 failed" in done.stdout
    assert set(finals(tmp_path / "out")) == set(expected_files(origin))
    assert (
        (list(db.iterdir()) == [])
        if broken == "a folder"
        else db.read_bytes().startswith(b"this is not a database")
    )


@pytest.mark.parametrize("broken", ["a folder", "corrupt", "newer schema"])
def test_require_idempotency_fails_clearly(
    tmp_path: Path, origin: Origin, broken: str
) -> None:
    """``--require-idempotency``, database unusable: exit 2, one line, no fetch."""
    plan_file = write_plan(tmp_path / "plan.jsonl", origin)
    db = tmp_path / "jobs.db"
    {
        "a folder": db.mkdir,
        "corrupt": lambda: _corrupt(db),
        "newer schema": lambda: _newer_schema(db),
    }[broken]()

    line = one_error_line(
        cli(
            tmp_path,
            "run",
            "--idempotency",
            "--require-idempotency",
            "--plan",
            str(plan_file),
        )
    )

    assert line.startswith(
        "error: idempotency is required but the database is unusable: "
    )
    assert str(db) in line
    assert origin.total_counters()["requests"] == 0
    assert finals(tmp_path / "out") == {}


@pytest.mark.parametrize("value", ["maybe"])
def test_bad_gate_value_is_one_clear_line(tmp_path: Path, value: str) -> None:
    """A non-boolean DOCSTOKG_ENABLE_IDEMPOTENCY: exit 2 naming variable and value."""
    line = one_error_line(
        cli(tmp_path, "run", env={"DOCSTOKG_ENABLE_IDEMPOTENCY": value})
    )

    assert f"DOCSTOKG_ENABLE_IDEMPOTENCY={value!r} is not a boolean" in line


def test_gate_off_without_plan_is_one_clear_line(tmp_path: Path) -> None:
    """Gate off and no --plan: exit 2 saying to pass --plan or --idempotency."""
    line = one_error_line(cli(tmp_path, "run"))

    assert "pass --plan FILE" in line and "--idempotency" in line


# --- the demo -------------------------------------------------------------------------


def test_demo_reports_no_duplicates_and_nothing_lost(tmp_path: Path) -> None:
    """``demo --jobs 30 --crashes 3``: exit 0, duplicates 0, lost 0, invariants hold."""
    done = cli(
        tmp_path,
        "demo",
        "--jobs",
        "30",
        "--crashes",
        "3",
        "--no-progress",
        "--out",
        str(tmp_path / "demo"),
    )

    assert done.returncode == 0, done.stdout + done.stderr
    lines = {
        line.split("  ")[0]: line.split()[-1]
        for line in done.stdout.splitlines()
        if "  " in line
    }
    assert (lines["jobs"], lines["duplicates"], lines["lost"]) == ("30", "0", "0")
    assert re.search(r"^crashes injected +3 ", done.stdout, re.M)
    assert re.search(r"^invariants +all hold$", done.stdout, re.M)


def test_run_without_a_database_says_to_plan_first(tmp_path: Path) -> None:
    """`run --idempotency` on a missing database fails in one line instead of running 0 jobs."""
    result = subprocess.run(
        [sys.executable, "-m", "docstokg_idem.cli", "--db", str(tmp_path / "nope.db"),
         "--out", str(tmp_path / "out"), "run", "--idempotency", "--no-progress"],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 2
    assert "does not exist" in result.stderr and "plan" in result.stderr
    assert not (tmp_path / "nope.db").exists()


def test_plan_row_with_a_number_for_an_id_says_it_must_be_text(tmp_path: Path) -> None:
    """A JSON number where an id belongs is reported as a type error, not as missing."""
    plan = tmp_path / "plan.jsonl"
    plan.write_text('{"work_id": 7, "artifact_id": "a", "url": "http://127.0.0.1:9/a"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "docstokg_idem.cli", "--db", str(tmp_path / "j.db"),
         "plan", str(plan)],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert "plan.jsonl:1: work_id must be text (got {'work_id': 7})" in result.stderr


def test_database_path_that_is_a_folder_is_named_as_such(tmp_path: Path) -> None:
    """--db pointing at a folder gets one line saying it is a folder."""
    result = subprocess.run(
        [sys.executable, "-m", "docstokg_idem.cli", "--db", str(tmp_path), "status"],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 2
    assert "it is a folder, not a database file" in result.stderr


def test_retry_gives_jobs_that_failed_for_good_fresh_attempts(
    tmp_path: Path, origin: Origin
) -> None:
    """A job failed for good by a too-small limit finishes after `retry` and a new run."""
    plan_file = write_plan(tmp_path / "plan.jsonl", origin)
    assert cli(tmp_path, "plan", str(plan_file)).returncode == 0
    first = cli(tmp_path, "run", "--idempotency", "--workers", "1", "--no-progress",
                "--max-body-bytes", "100000", "--retries", "0")
    assert first.returncode == 1 and "docstokg-idem retry" in first.stderr

    retried = cli(tmp_path, "retry")
    second = cli(tmp_path, "run", "--idempotency", "--workers", "1", "--no-progress")
    status = json.loads(cli(tmp_path, "status", "--json").stdout)

    assert retried.stdout.startswith("1 failed jobs will be retried")
    assert second.returncode == 0, second.stderr
    assert status["states"] == {"INDEXED": 3}
    assert cli(tmp_path, "verify").returncode == 0


def test_plan_reports_undecodable_lines_and_plans_the_rest(tmp_path: Path) -> None:
    """A Latin-1 byte, a lone surrogate and a UTF-16 file: bad lines named, good planned."""
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"work_id,artifact_id,url\nW1,a\xe9,http://127.0.0.1:9/a\n"
                      b"W2,b,http://127.0.0.1:9/b\n")
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"work_id":"W","artifact_id":"A\\ud800","url":"http://127.0.0.1:9/x"}\n'
                    '{"work_id":"W","artifact_id":"B","url":"http://127.0.0.1:9/y"}\n')
    wide = tmp_path / "wide.csv"
    wide.write_text("work_id,artifact_id,url\nW1,a,http://127.0.0.1:9/a\n", encoding="utf-16")

    results = {
        f.name: subprocess.run(
            [sys.executable, "-m", "docstokg_idem.cli", "--db", str(tmp_path / f"{f.name}.db"),
             "plan", str(f)], capture_output=True, text=True, timeout=60)
        for f in (latin, lone, wide)
    }

    assert results["latin.csv"].returncode == 1
    assert "latin.csv:2: not UTF-8 (byte 0xe9 at column 5)" in results["latin.csv"].stderr
    assert "planned 1 new jobs" in results["latin.csv"].stdout
    assert results["lone.jsonl"].returncode == 1
    assert "lone.jsonl:1: no job key for this row" in results["lone.jsonl"].stderr
    assert "planned 1 new jobs" in results["lone.jsonl"].stdout
    assert results["wide.csv"].returncode == 0
    assert "planned 1 new jobs" in results["wide.csv"].stdout


def test_plan_rows_naming_one_job_with_two_digests_are_reported(tmp_path: Path) -> None:
    """The second row of a job with another sha256 is a bad row, not silently dropped."""
    plan = tmp_path / "plan.csv"
    plan.write_text("work_id,artifact_id,url,sha256\n"
                    f"W1,a,http://127.0.0.1:9/a,{'a' * 64}\n"
                    f"W1,a,http://127.0.0.1:9/a,{'b' * 64}\n")
    result = subprocess.run(
        [sys.executable, "-m", "docstokg_idem.cli", "--db", str(tmp_path / "j.db"),
         "plan", str(plan)],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert f"plan.csv:3: repeats the job of line 2 with sha256 '{'b' * 64}'" in result.stderr
    assert "planned 1 new jobs" in result.stdout
