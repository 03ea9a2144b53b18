"""The pytest plugin ``docstokg_idem``: fixtures, markers, profiles, reports.

Loaded by ``pytest -p docstokg_idem`` (or its ``pytest11`` entry point); turned
off with ``-p no:docstokg_idem``. It is a thin layer over
:mod:`docstokg_idem.harness`: importing it imports neither Hypothesis nor the
harness until a test asks for them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .harness import FakeClock, FaultInjector, FeatureGate, Outcome, World

PROFILES = ("ci", "nightly")

_outcomes = pytest.StashKey[list["Outcome"]]()
_settings = pytest.StashKey[dict[str, Any]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("docstokg_idem", "docstokg-idem exactly-once chaos harness")
    options = [
        (
            "--idem-profile",
            "idem_profile",
            "Hypothesis profile: ci (fast) or nightly.",
            "ci",
        ),
        (
            "--idem-seed",
            "idem_seed",
            "Seed of the origin's content and the demo data.",
            "0",
        ),
        (
            "--idem-replay",
            "idem_replay",
            "Replay this schedule (JSON) in interleaving tests.",
            None,
        ),
        (
            "--idem-write-failures",
            "idem_write_failures",
            "Write each minimal failing schedule as a YAML scenario into this folder.",
            None,
        ),
        (
            "--idem-report",
            "idem_report",
            "Write an HTML report with timelines here.",
            None,
        ),
        (
            "--idem-min-coverage",
            "idem_min_coverage",
            "Fail the run if fewer crash points than this fraction (0-1) were exercised.",
            None,
        ),
        (
            "--idem-scenarios",
            "idem_scenarios",
            "Glob of crash scenario files to collect.",
            "scenarios/**/*.yaml",
        ),
    ]
    for flag, name, help_text, default in options:
        group.addoption(
            flag, dest=name, default=None, help=f"{help_text} (ini: {name})"
        )
        parser.addini(name, help_text, default=default)


def _option(config: pytest.Config, name: str) -> Any:
    value = config.getoption(name)
    return config.getini(name) if value is None else value


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "idem_gate_both: run the test with the idempotency "
        "gate on and again with it off",
    )
    config.addinivalue_line(
        "markers", "nightly: runs only under --idem-profile=nightly"
    )
    config.addinivalue_line("markers", "chaos: kills real worker processes")
    profile = _option(config, "idem_profile")
    if profile not in PROFILES:
        raise pytest.UsageError(
            f"--idem-profile={profile!r} is not a profile; use one of {', '.join(PROFILES)}"
        )
    try:
        seed = int(_option(config, "idem_seed"))
    except ValueError:
        raise pytest.UsageError(
            f"--idem-seed={_option(config, 'idem_seed')!r} must be an integer"
        ) from None
    replay = _option(config, "idem_replay")
    if replay:
        try:
            replay = _parse_replay(replay)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
    config.stash[_settings] = {"profile": profile, "seed": seed, "replay": replay}
    _register_profiles(profile, replay=bool(replay))


def _parse_replay(text: str) -> list[list[Any]]:
    try:
        schedule = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"--idem-replay={text!r} is not JSON ({exc.msg}); pass the schedule "
            'printed by the failing test, e.g. \'[["run", 0], ["kill", 0]]\''
        ) from None
    if not isinstance(schedule, list) or not all(
        isinstance(s, list)
        and len(s) == 2
        and s[0] in ("run", "kill", "clock", "restart")
        for s in schedule
    ):
        raise ValueError(
            f"--idem-replay={text!r} must be a list of [kind, n] steps with kind "
            "run, kill, clock or restart"
        )
    return schedule


def _register_profiles(active: str, *, replay: bool = False) -> None:
    from hypothesis import HealthCheck, Phase, settings

    slow = [
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ]
    settings.register_profile(
        "ci",
        max_examples=15,
        deadline=None,
        suppress_health_check=slow,
        stateful_step_count=30,
    )
    settings.register_profile(
        "nightly",
        max_examples=400,
        deadline=None,
        suppress_health_check=slow,
        stateful_step_count=100,
    )
    if replay:  # one example, the replayed schedule: nothing to search or shrink
        settings.register_profile(
            "idem-replay",
            parent=settings.get_profile(active),
            max_examples=1,
            phases=[Phase.explicit, Phase.generate],
        )
        active = "idem-replay"
    settings.load_profile(active)


def pytest_report_header(config: pytest.Config) -> str:
    s = config.stash[_settings]
    replay = f", replaying {len(s['replay'])} steps" if s["replay"] else ""
    return f"docstokg-idem: profile {s['profile']}, seed {s['seed']}{replay}"


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if config.stash[_settings]["profile"] == "nightly":
        return
    skip = pytest.mark.skip(reason="nightly test: run with --idem-profile=nightly")
    for item in items:
        if item.get_closest_marker("nightly"):
            item.add_marker(skip)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("idem_gate_both"):
        metafunc.fixturenames.append("_idem_gate_value")
        metafunc.parametrize(
            "_idem_gate_value", [True, False], ids=["gate-on", "gate-off"]
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[Any]:
    report = yield
    if report.when == "call" and report.failed:
        for outcome in item.stash.get(_outcomes, [])[-1:]:
            if not outcome.ok:
                report.sections.append(
                    ("docstokg-idem schedule and timeline", outcome.describe())
                )
    return report


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(name="idem_db_factory")
def _idem_db_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Any]]:
    """Make a fresh file-backed WAL database with the schema (one per call)."""
    from .core import connect
    from .core.db import close

    opened: list[Any] = []

    def make(**kwargs: Any) -> Any:
        folder = tmp_path_factory.mktemp("idem-db")
        cx = connect(folder / "jobs.db", **kwargs)
        opened.append(cx)
        return cx

    yield make
    for cx in opened:
        close(cx)


@pytest.fixture(name="idem_db")
def _idem_db(idem_db_factory: Callable[..., Any]) -> Any:
    """A file-backed WAL job database with the schema, fresh for this test."""
    return idem_db_factory()


@pytest.fixture(name="idem_memory_db")
def _idem_memory_db() -> Iterator[Any]:
    """An in-memory job database for pure unit tests (no WAL, no other process)."""
    from .core import connect
    from .core.db import close

    cx = connect(":memory:")
    yield cx
    close(cx)


@pytest.fixture(name="feature_gate")
def _feature_gate(monkeypatch: pytest.MonkeyPatch) -> FeatureGate:
    """Set the idempotency gate for this test and the processes it starts."""
    from .harness import FeatureGate

    return FeatureGate(
        monkeypatch.setenv, lambda k: monkeypatch.delenv(k, raising=False)
    )


@pytest.fixture(name="feature_gate_enabled")
def _feature_gate_enabled(feature_gate: FeatureGate) -> FeatureGate:
    """The gate on for this test."""
    feature_gate.enable()
    return feature_gate


@pytest.fixture(name="feature_gate_disabled")
def _feature_gate_disabled(feature_gate: FeatureGate) -> FeatureGate:
    """The gate off for this test."""
    feature_gate.disable()
    return feature_gate


@pytest.fixture(autouse=True)
def _idem_gate_both(request: pytest.FixtureRequest) -> None:
    """Under ``@pytest.mark.idem_gate_both``, set the gate of this run's variant."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or "_idem_gate_value" not in callspec.params:
        return
    gate: FeatureGate = request.getfixturevalue("feature_gate")
    gate.set(bool(callspec.params["_idem_gate_value"]))


@pytest.fixture(name="fake_clock")
def _fake_clock(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeClock]:
    """A fake clock shared with worker processes; freezegun for this process."""
    from .core.clock import CLOCK_FILE_ENV
    from .harness import FakeClock

    clock = FakeClock(
        tmp_path_factory.mktemp("idem-clock") / "clock", start=1_700_000_000.0
    )
    monkeypatch.setenv(CLOCK_FILE_ENV, clock.path)
    clock.start()
    yield clock
    clock.stop()


@pytest.fixture(name="idem_origin")
def _idem_origin(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A real HTTP origin on 127.0.0.1 with faults and request counters."""
    from .pipeline.origin import Origin

    seed = request.config.stash[_settings]["seed"]
    with Origin(seed=seed) as origin:
        yield origin


@pytest.fixture(name="fault_injector")
def _fault_injector() -> Iterator[FaultInjector]:
    """Arm declared crash points for this test's worker processes."""
    from .harness import FaultInjector

    injector = FaultInjector()
    yield injector
    injector.clear()


@pytest.fixture(name="worker_pool")
def _worker_pool(
    tmp_path: Path, fault_injector: FaultInjector
) -> Iterator[Callable[..., Any]]:
    """Start N real worker processes over a database: ``worker_pool(db, workers=2)``."""
    from .harness import WorkerPool

    pools: list[WorkerPool] = []

    def make(
        db: Any,
        *,
        workers: int = 2,
        out_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> WorkerPool:
        path = getattr(db, "db_path", db)
        out = out_dir or tmp_path / "files"
        clock_file = os.environ.get("DOCSTOKG_IDEM_CLOCK_FILE")
        clock = kwargs.pop("clock", None)
        if clock is None and clock_file:
            from .core.clock import SharedClock

            clock = SharedClock(clock_file)
        kwargs.setdefault("faults", fault_injector.by_index(workers))
        pool = WorkerPool(
            path,
            out,
            workers=workers,
            clock=getattr(clock, "shared", clock),
            log_dir=tmp_path / "worker-logs",
            **kwargs,
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture(name="exactly_once")
def _exactly_once(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Check I1–I12 over a database and folder; fail with every violation and a timeline."""
    from .harness import check, timeline

    def verify(db: Any, out_dir: str | os.PathLike[str], **kwargs: Any) -> Any:
        path = getattr(db, "db_path", db)
        report = check(path, out_dir, **kwargs)
        if not report.ok:
            pytest.fail(
                f"{report}\n\ntimeline per worker:\n{timeline(path)}", pytrace=False
            )
        return report

    return verify


@pytest.fixture(name="idem_interleave")
def _idem_interleave(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Outcome]:
    """Play a schedule over real workers and check it: ``idem_interleave(schedule, world)``.

    Fails with the schedule, the violated invariants, the timeline and a
    command that replays it. A schedule run twice must give the same trace.
    """
    from .harness import World, run_schedule

    settings = request.config.stash[_settings]
    seen: dict[str, list[Any]] = {}

    def play(
        schedule: list[list[Any]], world: World | None = None, *, expect_ok: bool = True
    ) -> Outcome:
        if settings["replay"] is not None:
            schedule = settings["replay"]
        world = world or World(seed=settings["seed"])
        outcome = run_schedule(
            schedule, world, workdir=tmp_path_factory.mktemp("sched")
        )
        request.node.stash.setdefault(_outcomes, []).append(outcome)
        key = json.dumps(schedule)
        if key in seen and seen[key] != outcome.trace:
            pytest.fail(
                f"schedule {key} replayed to a different trace:\n  first: "
                f"{seen[key]}\n  again: {outcome.trace}",
                pytrace=False,
            )
        seen[key] = outcome.trace
        if expect_ok and not outcome.ok:
            error = AssertionError(outcome.describe())
            error.add_note(
                f"replay: pytest -p docstokg_idem '{request.node.nodeid}' "
                f"--idem-replay='{key}'"
            )
            raise error
        return outcome

    return play


# --- crash scenarios written as YAML ---------------------------------------------


def pytest_collect_file(
    parent: pytest.Collector, file_path: Path
) -> pytest.Collector | None:
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    pattern = _option(parent.config, "idem_scenarios")
    rel = (
        file_path.relative_to(parent.config.rootpath)
        if file_path.is_relative_to(parent.config.rootpath)
        else file_path
    )
    named = parent.session.isinitpath(file_path)  # given on the command line
    if not (
        named
        or rel.match(pattern)
        or Path(*rel.parts[1:]).match(pattern.removeprefix("**/"))
        or _glob_match(str(rel), pattern)
    ):
        return None
    from .harness.scenarios import ScenarioFile

    return ScenarioFile.from_parent(parent, path=file_path)


def _glob_match(path: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(
        path, pattern.replace("**/", "")
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    reports = _ScenarioReports(
        config,
        min_coverage=_min_coverage(config),
        html_path=_option(config, "idem_report") or None,
    )
    config.pluginmanager.register(reports, "docstokg_idem-scenario-reports")


def _min_coverage(config: pytest.Config) -> float | None:
    raw = _option(config, "idem_min_coverage")
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise pytest.UsageError(
            f"--idem-min-coverage={raw!r} must be a fraction from 0 to 1; 0.8 means "
            "the scenario runs must reach 80% of the declared crash points"
        )
    return value


class _ScenarioReports:
    """Gathers scenario results (also from xdist workers), reports coverage and HTML."""

    def __init__(
        self,
        config: pytest.Config,
        *,
        min_coverage: float | None,
        html_path: str | None,
    ):
        self.config = config
        self.min_coverage = min_coverage
        self.html_path = Path(html_path) if html_path else None
        self.points: set[str] = set()
        self.runs: list[dict[str, Any]] = []
        self.below = False

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Iterator[Any]:
        report = yield
        data = getattr(item, "idem_report_data", None)
        invalid = getattr(item, "error", None) is not None
        if data is not None and (
            report.when == "call" or invalid and report.when == "setup"
        ):
            # plain data, so that xdist carries it to the controller
            report.idem_scenario = data()
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = getattr(report, "idem_scenario", None)
        if not data:
            return
        self.points.update(data["points"])
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        self.runs.append(
            {
                **data,
                "nodeid": report.nodeid,
                "duration": report.duration,
                "outcome": "error" if data["invalid"] else outcome,
            }
        )

    def _declared(self) -> dict[str, str]:
        from .core.crashpoints import CRASH_POINTS

        return CRASH_POINTS

    def _coverage(self) -> tuple[list[str], list[str], float]:
        declared = self._declared()
        reached = sorted(self.points & set(declared))
        missed = sorted(set(declared) - self.points)
        return reached, missed, len(reached) / len(declared)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):
            return  # an xdist worker: the controller reports
        if (
            self.min_coverage is not None
            and self._coverage()[2] < self.min_coverage - 1e-9
        ):
            self.below = True
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.html_path is not None:
            from .harness.scenario_report import render_report

            s = self.config.stash[_settings]
            self.html_path.parent.mkdir(parents=True, exist_ok=True)
            self.html_path.write_text(
                render_report(
                    self.runs,
                    self.points,
                    header=f"profile {s['profile']}, seed {s['seed']}",
                ),
                encoding="utf-8",
            )

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workerinput") or (
            not self.runs and self.min_coverage is None
        ):
            return
        reached, missed, fraction = self._coverage()
        runs = sum(1 for r in self.runs if not r["invalid"])
        tr = terminalreporter
        tr.write_sep("-", "docstokg-idem crash scenarios")
        tr.write_line(
            f"crash points exercised by {runs} scenario runs: {len(reached)}/"
            f"{len(reached) + len(missed)} ({fraction:.0%}): "
            f"{', '.join(reached) or 'none'}; never reached: "
            f"{', '.join(missed) or 'none'}"
        )
        if self.min_coverage is not None:
            verdict = "FAILED: under" if self.below else "ok: meets"
            tr.write_line(
                f"crash point coverage {fraction:.0%} {verdict} "
                f"--idem-min-coverage={self.min_coverage:g}",
                red=self.below,
                green=not self.below,
            )
        if self.html_path is not None:
            tr.write_line(f"scenario report: {self.html_path}")
