"""Crash scenarios as pytest tests: one file, one item per crash point and gate.

The plugin collects every file matching ``--idem-scenarios`` (ini
``idem_scenarios``, default ``scenarios/**/*.yaml``) as a
:class:`ScenarioFile`. Each scenario document becomes one
:class:`ScenarioItem`, or one per crash point when it says ``crash: all`` (or
names several points), or one per gate value when it says ``gate: both``:
``scenarios/mid_stream.yaml::mid_stream[stream.after_chunk]``.

A document that breaks the format becomes an :class:`InvalidScenarioItem`,
which errors at setup with every problem as ``file:line:column: message``;
the other files still run.

A scenario with ``interleavings:`` lets Hypothesis draw schedules of worker
steps, kills and clock moves, each played over real workers. A failure is
shrunk to a minimal schedule, which ``--idem-write-failures=DIR`` writes as a
new scenario that replays it deterministically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .scenario_format import (
    Scenario,
    ScenarioError,
    Variant,
    dump,
    load_file,
    variants,
)
from .scenario_run import RunResult, ScenarioStepError, run_variant

_PACKAGE = str(Path(__file__).resolve().parent.parent)

WRITTEN_HEADER = (
    "# A minimal failing schedule, written by docstokg-idem (--idem-write-failures).\n"
    "# Run it with: pytest -p docstokg_idem {path}\n"
)


class ScenarioFailed(AssertionError):
    """A scenario broke an invariant or missed an expectation."""

    def __init__(self, result: RunResult):
        self.result = result
        broken = ", ".join(result.report.broken()) or "no invariant"
        super().__init__(
            f"scenario {result.name}: {broken} broken, "
            f"{len(result.unmet)} expectations not met"
        )


class ScenarioFile(pytest.File):
    """A YAML file of crash scenarios (one per document)."""

    def collect(self) -> Iterator[pytest.Item]:
        root = self.config.rootpath
        shown = (
            self.path.relative_to(root) if self.path.is_relative_to(root) else self.path
        )
        for entry in load_file(self.path, display=str(shown)):
            if isinstance(entry, ScenarioError):
                yield InvalidScenarioItem.from_parent(
                    self, name=_error_name(self, entry), error=entry
                )
                continue
            for variant in variants(entry):
                yield ScenarioItem.from_parent(self, name=variant.name, variant=variant)


def _error_name(file: ScenarioFile, error: ScenarioError) -> str:
    return getattr(error, "scenario_name", None) or file.path.stem


class InvalidScenarioItem(pytest.Item):
    """Stands for a scenario document that breaks the format; errors at setup."""

    def __init__(self, *, error: ScenarioError, **kwargs: Any):
        super().__init__(**kwargs)
        self.error = error

    def setup(self) -> None:
        problems = len(self.error.problems)
        head = f"invalid scenario ({problems} problem{'s' if problems > 1 else ''}):"
        pytest.fail(
            f"{head}\n{self.error}\nSee docs/scenarios.md for the format.",
            pytrace=False,
        )

    def runtest(self) -> None:  # pragma: no cover - setup always fails
        raise self.error

    def reportinfo(self) -> tuple[Path, int, str]:
        where = self.error.problems[0][0] if self.error.problems else f"{self.path}:1:1"
        line = int(where.rsplit(":", 2)[1]) - 1
        return self.path, line, f"invalid scenario: {self.name}"

    def idem_report_data(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": str(self.path),
            "line": self.reportinfo()[1] + 1,
            "description": "",
            "points": [],
            "invalid": True,
            "text": str(self.error),
            "picture": None,
        }


class ScenarioItem(pytest.Item):
    """One variant of one scenario: run it, check it, report it."""

    def __init__(self, *, variant: Variant, **kwargs: Any):
        super().__init__(**kwargs)
        self.variant = variant
        self.result: RunResult | None = None
        self.points: set[str] = set()
        self.written: Path | None = None
        self.examples = 0
        if variant.scenario.kind == "pipeline":
            self.add_marker("chaos")
        if variant.xfail:
            self.add_marker(pytest.mark.xfail(reason=variant.xfail, strict=True))

    @property
    def scenario(self) -> Scenario:
        return self.variant.scenario

    # --- running ---

    def runtest(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="idem-scenario-"))
        try:
            if self.scenario.interleavings is not None:
                self._interleave(base)
            else:
                self._once(base, None)
        except ScenarioFailed:
            raise
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        shutil.rmtree(base, ignore_errors=True)

    def _once(self, base: Path, schedule: list[list[Any]] | None) -> RunResult:
        workdir = Path(tempfile.mkdtemp(dir=base))
        result = run_variant(
            self.variant, workdir, seed=self._seed(), schedule=schedule
        )
        self.result = result
        self.points |= result.points
        if not result.ok:
            raise ScenarioFailed(result)
        shutil.rmtree(workdir, ignore_errors=True)
        return result

    def _seed(self) -> int:
        return int(_option(self.config, "idem_seed") or 0)

    def _interleave(self, base: Path) -> None:
        replay = _option(self.config, "idem_replay")
        if replay:
            self._once(base, json.loads(replay) if isinstance(replay, str) else replay)
            return
        from hypothesis import HealthCheck, given, seed, settings

        from .strategies import CLOCK_MOVES, schedules

        spec = self.scenario.interleavings or {}
        strategy = schedules(
            self.scenario.workers,
            min_steps=spec.get("min_steps", 0),
            max_steps=spec.get("max_steps", 12),
            clock_moves=tuple(spec.get("clock_moves", CLOCK_MOVES)),
        )

        def play(schedule: list[list[Any]]) -> None:
            self.examples += 1
            self._once(base, schedule)

        # One database key per scenario variant, not one for every scenario.
        play._hypothesis_internal_add_digest = self.nodeid.encode()  # type: ignore[attr-defined]
        test = settings(
            max_examples=self._examples(spec),
            deadline=None,
            print_blob=False,
            suppress_health_check=list(HealthCheck),
        )(given(strategy)(play))
        test = seed(spec.get("seed", self._seed()))(test)
        try:
            test()
        except ScenarioFailed as failure:
            self._write_back(failure.result)
            raise

    def _examples(self, spec: dict[str, Any]) -> int:
        from hypothesis import settings

        profile = settings()  # the loaded profile (ci or nightly)
        wanted = int(spec.get("examples", profile.max_examples))
        if _option(self.config, "idem_profile") == "nightly":
            return max(wanted, profile.max_examples)
        return wanted

    def _write_back(self, result: RunResult) -> None:
        folder = _option(self.config, "idem_write_failures")
        if not folder or result.schedule is None:
            return
        self.written = write_failure(
            self.variant, result, Path(folder), seed=self._seed()
        )

    # --- reporting ---

    def repr_failure(
        self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None
    ) -> str | Any:
        error = excinfo.value
        if isinstance(error, ScenarioFailed):
            return self.describe(error.result)
        if isinstance(error, ScenarioStepError):
            notes = "".join(f"\n  {n}" for n in getattr(error, "__notes__", []))
            return f"{self._head()}\nstep failed: {error}{notes}\n\n{self._replay()}"
        return super().repr_failure(excinfo, style=style)

    def _traceback_filter(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Any:
        """Show only the harness's own frames of an unexpected error."""
        ours = excinfo.traceback.filter(lambda entry: _PACKAGE in str(entry.path))
        return ours or excinfo.traceback

    def describe(self, result: RunResult) -> str:
        """The failure as text: what broke, expectations, steps, timeline, replay."""
        lines = [self._head()]
        if result.report.violations:
            names = ", ".join(
                f"{i} ({_INVARIANTS()[i]})" for i in result.report.broken()
            )
            lines += ["", f"invariant broken: {names}"]
            lines += [f"  - {v}" for v in result.report.violations]
        if result.unmet:
            lines += ["", "expectation not met:"] + [f"  - {u}" for u in result.unmet]
        if result.log:
            lines += ["", "steps:"] + [
                f"  {i}. {s}" for i, s in enumerate(result.log, 1)
            ]
        lines += ["", "timeline per worker:"]
        lines += ["  " + line for line in result.text_timeline.splitlines()]
        lines += ["", self._replay(result)]
        return "\n".join(lines)

    def _head(self) -> str:
        s = self.scenario
        variant = []
        for crash in self.variant.crashes:
            who = "every worker" if crash.worker is None else f"worker {crash.worker}"
            variant.append(f"{crash.action} at {crash.point} (hit {crash.hit}, {who})")
        variant.append(f"gate {'on' if self.variant.gate else 'off'}")
        head = [f"scenario {self.name} failed ({s.path}:{s.line})"]
        if s.description:
            head.append("  " + s.description.splitlines()[0])
        head.append("  variant: " + "; ".join(variant))
        if s.interleavings is not None:
            head.append(f"  interleavings: {self.examples} schedules played")
        return "\n".join(head)

    def _replay(self, result: RunResult | None = None) -> str:
        hint = [f"replay: pytest -p docstokg_idem '{self.nodeid}'"]
        if (
            result is not None
            and result.schedule is not None
            and self.scenario.interleavings is not None
        ):
            schedule = json.dumps(result.schedule)
            hint = [
                f"minimal failing schedule ({len(result.schedule)} steps): {schedule}",
                f"replay: pytest -p docstokg_idem '{self.nodeid}' "
                f"--idem-replay='{schedule}'",
            ]
            if self.written is not None:
                hint.append(
                    f"written as a scenario: {self.written}; replay: "
                    f"pytest -p docstokg_idem {self.written}"
                )
            else:
                hint.append("write it as a scenario with --idem-write-failures=DIR")
        return "\n".join(hint)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, self.scenario.line - 1, f"scenario: {self.name}"

    def idem_report_data(self) -> dict[str, Any]:
        """What the scenario reporter needs (plain data: it crosses xdist)."""
        result = self.result
        failed = result is not None and not result.ok
        return {
            "name": self.name,
            "file": str(self.path),
            "line": self.scenario.line,
            "description": self.scenario.description,
            "points": sorted(self.points),
            "invalid": False,
            "text": self.describe(result) if failed and result else "",
            "picture": result.picture if failed and result else None,
        }


def _INVARIANTS() -> dict[str, str]:
    from .checker import INVARIANTS

    return INVARIANTS


def _option(config: pytest.Config, name: str) -> Any:
    value = config.getoption(name, default=None)
    if value is None:
        try:
            value = config.getini(name)
        except ValueError:
            value = None
    return value


def write_failure(
    variant: Variant, result: RunResult, folder: Path, *, seed: int
) -> Path:
    """Write the minimal failing schedule of ``variant`` as a scenario replaying it."""
    assert result.schedule is not None
    scenario = variant.scenario
    digest = hashlib.sha256(json.dumps([scenario.name, result.schedule]).encode())
    name = f"{scenario.name}_found_{digest.hexdigest()[:8]}"
    broken = ", ".join(result.report.broken()) or "expectations"
    document: dict[str, Any] = {
        "name": name,
        "description": (
            f"Minimal failing schedule found by Hypothesis for scenario "
            f"{scenario.name} ({scenario.path}), seed {seed}; it breaks "
            f"{broken}. Replays deterministically."
        ),
    }
    skip = {
        "name",
        "description",
        "interleavings",
        "steps",
        "crash",
        "crashes",
        "disk_full",
        "xfail",
    }
    for key, value in scenario.raw.items():
        if key not in skip and key != "expect":
            document[key] = value
    document.setdefault("seed", scenario.seed if scenario.seed is not None else seed)
    document["steps"] = [{"schedule": result.schedule}]
    if "expect" in scenario.raw:
        document["expect"] = scenario.raw["expect"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(WRITTEN_HEADER.format(path=path) + dump(document), encoding="utf-8")
    return path


__all__ = [
    "InvalidScenarioItem",
    "ScenarioFailed",
    "ScenarioFile",
    "ScenarioItem",
    "write_failure",
]
