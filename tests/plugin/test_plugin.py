"""The pytest plugin from the outside: loading, options, fixtures, markers, failures.

Every run goes through ``pytester.runpytest_subprocess()``: the plugin loads
Hypothesis profiles and kills worker processes, neither of which may leak into
this test process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

PLUGIN = ("-p", "docstokg_idem")

USES_IDEM_DB = """
def test_db(idem_db):
    assert idem_db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider", *args)


# --- loading --------------------------------------------------------------------------


def test_loads_with_plugin_autoload_disabled(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-p docstokg_idem loads the plugin even with PYTEST_DISABLE_PLUGIN_AUTOLOAD=1."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(USES_IDEM_DB)
    result = _run(pytester)
    result.assert_outcomes(passed=1)


def test_no_plugin_turns_it_off(pytester: pytest.Pytester) -> None:
    """-p no:docstokg_idem removes the plugin: its fixtures are unknown."""
    pytester.makepyfile(USES_IDEM_DB)
    result = pytester.runpytest_subprocess("-p", "no:docstokg_idem")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'idem_db' not found*"])
    result.stdout.no_fnmatch_line("docstokg-idem: profile*")


def test_import_of_plugin_is_light() -> None:
    """Importing docstokg_idem.plugin imports neither Hypothesis nor the harness."""
    code = (
        "import sys, docstokg_idem.plugin; print(sorted(m for m in sys.modules if "
        "m.split('.')[0] == 'hypothesis' or m.startswith('docstokg_idem.harness')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.strip() == "[]"


# --- options and the report header ----------------------------------------------------


def test_header_shows_profile_and_seed(pytester: pytest.Pytester) -> None:
    """The report header names the profile and the seed, defaults and overrides."""
    pytester.makepyfile("def test_nothing(): pass")
    _run(pytester).stdout.fnmatch_lines(["docstokg-idem: profile ci, seed 0*"])
    result = _run(pytester, "--idem-profile=nightly", "--idem-seed=42")
    result.stdout.fnmatch_lines(["docstokg-idem: profile nightly, seed 42*"])


@pytest.mark.parametrize(
    "option, value",
    [
        ("--idem-profile", "weekly"),
        ("--idem-replay", '[["run", 0'),
        ("--idem-replay", '[["jump", 0]]'),
    ],
)
def test_bad_option_is_a_usage_error(
    pytester: pytest.Pytester, option: str, value: str
) -> None:
    """A bad --idem-profile or --idem-replay is a usage error that shows the value."""
    pytester.makepyfile("def test_nothing(): pass")
    result = _run(pytester, f"{option}={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"{option}={value!r}" in result.stderr.str()


# --- fixtures, used as the README shows -----------------------------------------------


def test_idem_db_is_wal_with_the_schema(pytester: pytest.Pytester) -> None:
    """idem_db is a fresh WAL database with the schema; idem_memory_db is in memory."""
    pytester.makepyfile("""
        from docstokg_idem import SCHEMA_VERSION, get_schema_version, plan_jobs

        def test_file(idem_db):
            assert idem_db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert get_schema_version(idem_db) == SCHEMA_VERSION
            assert idem_db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0

        def test_memory(idem_memory_db):
            plan_jobs(idem_memory_db, [{"work_id": "W", "artifact_id": "a",
                                        "url": "https://example.org/a.pdf"}])
            count = idem_memory_db.execute("SELECT count(*) FROM jobs").fetchone()[0]
            assert count == 1
    """)
    _run(pytester).assert_outcomes(passed=2)


def test_feature_gate_restores_the_environment(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """feature_gate sets the gate for one test and its children, then restores it."""
    monkeypatch.setenv("DOCSTOKG_ENABLE_IDEMPOTENCY", "off")
    pytester.makepyfile("""
        import os, subprocess, sys
        from docstokg_idem import idempotency_enabled

        def test_a_sets(feature_gate):
            feature_gate.enable()
            assert idempotency_enabled()
            child = subprocess.run([sys.executable, "-c",
                "from docstokg_idem import idempotency_enabled as e; print(e())"],
                capture_output=True, text=True, check=True)
            assert child.stdout.strip() == "True"
            feature_gate.set(None)
            assert "DOCSTOKG_ENABLE_IDEMPOTENCY" not in os.environ

        def test_b_enabled(feature_gate_enabled):
            assert os.environ["DOCSTOKG_ENABLE_IDEMPOTENCY"] == "1"

        def test_c_restored():
            assert os.environ["DOCSTOKG_ENABLE_IDEMPOTENCY"] == "off"
    """)
    _run(pytester, "-p", "no:randomly").assert_outcomes(passed=3)


def test_fake_clock_keeps_monotonic_and_shares_wall(pytester: pytest.Pytester) -> None:
    """C14: monotonic never goes back while wall does; a child sees the same wall."""
    pytester.makepyfile("""
        import subprocess, sys, time

        CHILD = ("from docstokg_idem.core.clock import default_clock; "
                 "print(repr(default_clock().wall()))")

        def test_clock(fake_clock):
            wall, mono = fake_clock.wall(), fake_clock.monotonic()
            fake_clock.advance(30)
            assert (fake_clock.wall(), fake_clock.monotonic()) == (wall + 30, mono + 30)
            fake_clock.move_to(wall - 3600)
            assert fake_clock.wall() == wall - 3600
            assert fake_clock.monotonic() == mono + 30
            assert time.monotonic() == mono + 30
            assert time.time() == wall - 3600
            child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True,
                                   text=True, check=True)
            assert float(child.stdout) == wall - 3600
    """)
    _run(pytester).assert_outcomes(passed=1)


def test_fault_injector_unknown_point_lists_known(pytester: pytest.Pytester) -> None:
    """fault_injector.arm() of an undeclared point raises and names the known points."""
    pytester.makepyfile("""
        import pytest
        from docstokg_idem import CRASH_POINTS, UnknownCrashPoint

        def test_unknown(fault_injector):
            with pytest.raises(UnknownCrashPoint) as info:
                fault_injector.arm("stream.after_lunch")
            message = str(info.value)
            assert "'stream.after_lunch'" in message
            assert all(point in message for point in CRASH_POINTS)
            assert isinstance(info.value, ValueError)
    """)
    _run(pytester).assert_outcomes(passed=1)


def test_kill_at_a_point_then_exactly_once(pytester: pytest.Pytester) -> None:
    """worker_pool + fault_injector kill w0 mid-stream; exactly_once passes after."""
    pytester.makepyfile("""
        from docstokg_idem import connect, plan_jobs

        def test_kill_mid_stream(tmp_path, idem_origin, fault_injector, worker_pool,
                                 exactly_once):
            idem_origin.add("a.pdf", 300_000)
            cx = connect(tmp_path / "jobs.db")
            plan_jobs(cx, [{"work_id": "W", "artifact_id": "a",
                            "url": idem_origin.url("a.pdf")}])
            fault_injector.arm("stream.after_chunk", action="kill", hit=2, worker="w0")
            pool = worker_pool(cx, workers=1, out_dir=tmp_path / "files")
            assert pool.run_until_crash().exitcode == -9
            assert pool.workers[0].points == []  # free running: no scheduling points
            assert pool.expire_dead_leases() == 1
            pool.restart(0)
            assert pool.run_until_idle() == [0]
            report = exactly_once(cx, tmp_path / "files")
            assert report.ok and report.jobs == 1
            assert idem_origin.counters("a.pdf")["full_gets"] == 2  # I9: 1 + 1 crash
    """)
    _run(pytester).assert_outcomes(passed=1)


def test_idem_origin_counts_requests(pytester: pytest.Pytester) -> None:
    """idem_origin serves on 127.0.0.1 and counts HEAD, full GETs and ranges."""
    pytester.makepyfile("""
        import http.client

        def test_counters(idem_origin):
            idem_origin.add("x.pdf", 1000)
            host, path = "127.0.0.1", "/a/x.pdf"
            cx = http.client.HTTPConnection(host, idem_origin.port, timeout=10)
            cx.request("HEAD", path); cx.getresponse().read()
            cx.request("GET", path); body = cx.getresponse().read()
            cx.request("GET", path, headers={"Range": "bytes=10-"})
            cx.getresponse().read()
            cx.close()
            assert idem_origin.base_url.startswith("http://127.0.0.1:")
            assert body == idem_origin.expected("x.pdf").content
            counters = idem_origin.counters("x.pdf")
            assert counters["methods"] == {"HEAD": 1, "GET": 2}
            assert (counters["full_gets"], counters["range_gets"]) == (1, 1)
            assert counters["range_starts"] == {10: 1}
    """)
    _run(pytester).assert_outcomes(passed=1)


# --- properties over interleavings ----------------------------------------------------

#: The README's property, with settings that keep this test fast and repeatable:
#: derandomized, no database, and no "explain" phase (which replays the failure
#: dozens of times to annotate it).
PROPERTY = """
from hypothesis import Phase, given, settings
from docstokg_idem.harness import World, schedules

@settings(max_examples={examples}, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate, Phase.shrink])
@given(schedule=schedules(workers=2, max_steps=8))
def test_any_interleaving_is_exactly_once(idem_interleave, schedule):
    idem_interleave(schedule, World(workers=2, lease_ttl_s=10, mutant={mutant!r},
                                    artifacts={{"a.pdf": 1}}))
"""


def test_interleaving_property_passes_on_the_real_code(
    pytester: pytest.Pytester,
) -> None:
    """A user's Hypothesis property over interleavings passes on the real code."""
    pytester.makepyfile(PROPERTY.format(examples=10, mutant=None))
    _run(pytester).assert_outcomes(passed=1)


def test_mutant_fails_with_schedule_and_replays(pytester: pytest.Pytester) -> None:
    """With a mutant the property fails with schedule, invariant, timeline and a replay
    command; that command reproduces the failure."""
    pytester.makepyfile(PROPERTY.format(examples=60, mutant="token_reused"))
    result = _run(pytester)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*schedule (* steps): [[]*",
            "*I6 (single owner): job * token 1 claimed after token 1*",
            "*timeline:*",
            "*replay: pytest -p docstokg_idem *test_any_interleaving_is_exactly_once*"
            " --idem-replay=*",
        ]
    )
    command = re.findall(
        r"replay: pytest -p docstokg_idem '(\S+)' --idem-replay='([^']*)'", out
    )[-1]
    nodeid, schedule = command
    assert any(step[0] == "kill" for step in json.loads(schedule))

    steps = len(json.loads(schedule))
    again = _run(pytester, nodeid, f"--idem-replay={schedule}")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(
        [
            f"docstokg-idem: profile ci, seed 0, replaying {steps} steps",
            "*I6 (single owner): job * token 1 claimed after token 1*",
        ]
    )


# --- markers --------------------------------------------------------------------------


def test_nightly_marker_runs_only_under_nightly(pytester: pytest.Pytester) -> None:
    """Tests marked nightly are skipped under ci, run under --idem-profile=nightly."""
    pytester.makepyfile("""
        import pytest

        @pytest.mark.nightly
        def test_long():
            pass

        def test_short():
            pass
    """)
    ci = _run(pytester, "-rs", "--strict-markers")
    ci.assert_outcomes(passed=1, skipped=1)
    ci.stdout.fnmatch_lines(["*nightly test: run with --idem-profile=nightly*"])
    _run(pytester, "--idem-profile=nightly").assert_outcomes(passed=2)


def test_gate_both_runs_twice(pytester: pytest.Pytester) -> None:
    """idem_gate_both runs a test as gate-on and gate-off, with the gate set in each."""
    pytester.makepyfile("""
        import pytest
        from docstokg_idem import idempotency_enabled

        @pytest.mark.idem_gate_both
        def test_either(request):
            on = request.node.callspec.id == "gate-on"
            assert idempotency_enabled() is on
    """)
    result = _run(pytester, "-v", "--strict-markers")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*test_either?gate-on? PASSED*", "*test_either?gate-off? PASSED*"]
    )


def test_works_under_xdist(pytester: pytest.Pytester) -> None:
    """Under -n 2 fixtures work, the header shows, and interleavings run in workers."""
    pytester.makepyfile(
        USES_IDEM_DB
        + """
import os
from docstokg_idem.harness import World

def test_clock(fake_clock):
    assert os.environ["DOCSTOKG_IDEM_CLOCK_FILE"] == fake_clock.path

def test_interleave(idem_interleave):
    assert idem_interleave([["run", 0], ["kill", 0]], World(artifacts={"a.pdf": 1})).ok

def test_interleave_again(idem_interleave):
    assert idem_interleave([["run", 1]], World(artifacts={"a.pdf": 1})).ok
"""
    )
    result = _run(pytester, "-n", "2")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["docstokg-idem: profile ci, seed 0*", "*2 workers*"])
