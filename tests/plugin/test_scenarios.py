"""Crash scenarios written as YAML: collection, validation, runs, reports.

The format is checked directly (``load_file``, ``variants``); everything that
runs scenarios goes through ``pytester.runpytest_subprocess()``, because the
runs fork and kill worker processes and load Hypothesis profiles, none of
which may leak into this test process.
"""

from __future__ import annotations

import json
import re
import textwrap
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from docstokg_idem.core.crashpoints import CRASH_POINTS
from docstokg_idem.harness.scenario_format import (
    Scenario,
    ScenarioError,
    load_file,
    schema,
    variants,
)

PLUGIN = ("-p", "docstokg_idem", "-p", "no:cacheprovider")
ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "scenarios"

#: A core scenario: no processes, a few crash points in this process.
CORE_OK = """
name: core_ok
kind: core
jobs: {count: 1}
api:
  - {call: claim, owner: w1, as: held, is: {token: 1}}
  - {call: advance, lease: held, to: HEAD_DONE, returns: true}
"""

#: A core scenario whose expectation no run meets (the job is HEAD_DONE).
CORE_FAILING = """
name: core_failing
kind: core
description: Expects a state the calls never reach.
jobs: {count: 1}
api:
  - {call: claim, owner: w1, as: held}
  - {call: advance, lease: held, to: HEAD_DONE, returns: true}
  - {call: renew, lease: held, owner: w2}
expect:
  states: {STREAMING: 1}
"""

#: Two workers, one killed mid-stream, a clock move, an expectation not met.
PIPELINE_FAILING = """
name: pipeline_failing
description: A crash and a clock move, then an expectation no run meets.
workers: 2
jobs: [{artifact: a.pdf, size: 60000}, {artifact: b.pdf, size: 9000}]
crash: {point: stream.after_chunk, worker: 0}
steps:
  - run
  - clock: 11
expect:
  claims_per_job: 3
"""


def _scenario(pytester: pytest.Pytester, name: str, text: str) -> Path:
    folder = pytester.path / "scenarios"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*PLUGIN, *args)


def _load_one(tmp_path: Path, text: str) -> Scenario | ScenarioError:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    (entry,) = load_file(path, display="scenarios/s.yaml")
    return entry


# --- validation: every class of error names file:line:column, value, choices -----

#: (scenario text, where, fragments of the message)
BROKEN = {
    "unknown key": (
        """
        name: s
        workrs: 2
        """,
        "scenarios/s.yaml:2:1",
        ["unknown key 'workrs'", "did you mean 'workers'", "valid keys: api, clock"],
    ),
    "wrong type": (
        """
        name: s
        jobs: {count: two}
        """,
        "scenarios/s.yaml:2:15",
        ["jobs.count must be an integer", '(got "two")'],
    ),
    "unknown enum value": (
        """
        name: s
        crashes:
          - {point: stream.after_chunk, action: kil}
        """,
        "scenarios/s.yaml:3:41",
        ['crashes[0].action is "kil"', '"kill", "raise", "hang", "sleep", "exit"'],
    ),
    "unknown crash point": (
        """
        name: s
        crash: stream.after_chunkk
        """,
        "scenarios/s.yaml:2:8",
        [
            "crash point 'stream.after_chunkk' is not declared",
            "did you mean 'stream.after_chunk'",
            "declared points: claim.after_commit",
        ],
    ),
    "more jobs in a state than planned": (
        """
        name: s
        jobs: {count: 2}
        expect:
          states: {INDEXED: 3}
        """,
        "scenarios/s.yaml:4:21",
        ["expect.states.INDEXED wants exactly 3 jobs, but only 2 are planned"],
    ),
    "more crashes than possible": (
        """
        name: s
        expect:
          crashes: 1
        """,
        "scenarios/s.yaml:3:12",
        ["expect.crashes wants exactly 1 crashed workers", "can crash at most 0"],
    ),
    "I11 with the gate on": (
        """
        name: s
        expect:
          invariants: [I1, I11]
        """,
        "scenarios/s.yaml:3:20",
        ["I11 (gate off writes nothing) is checked only with gate: off"],
    ),
    "worker out of range": (
        """
        name: s
        workers: 2
        steps:
          - crash: 2
        """,
        "scenarios/s.yaml:4:12",
        ["worker 2 does not exist", "numbered 0 to 1"],
    ),
    "unplanned artifact": (
        """
        name: s
        jobs: [{artifact: a.pdf}]
        faults:
          b.pdf: {status: 503}
        """,
        "scenarios/s.yaml:4:3",
        ["artifact 'b.pdf', which is not planned", "planned artifacts: a.pdf"],
    ),
    "YAML syntax": (
        """
        name: s
        jobs: [{artifact: a.pdf}
        workers: 2
        """,
        "scenarios/s.yaml:3:1",
        [
            "not valid YAML: while parsing a flow sequence (from 2:7)",
            "expected ',' or ']'",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validation_error_names_file_line_column(tmp_path: Path, case: str) -> None:
    """Each class of error is reported at file:line:column with value and choices."""
    text, where, fragments = BROKEN[case]
    error = _load_one(tmp_path, text)
    assert isinstance(error, ScenarioError)
    (problem,) = [p for p in error.problems if p[0] == where] or [error.problems]
    assert problem[0] == where, error
    for fragment in fragments:
        assert fragment in problem[1], problem[1]
    assert isinstance(error, ValueError)


def test_every_problem_of_a_document_is_reported(tmp_path: Path) -> None:
    """Several semantic problems in one document are reported together, in order."""
    error = _load_one(
        tmp_path,
        """
        name: s
        workers: 2
        jobs: {count: 2}
        crashes:
          - {point: stream.after_chunkk, worker: 3}
        expect:
          states: {INDEXED: 3}
        """,
    )
    assert isinstance(error, ScenarioError)
    assert [p[0] for p in error.problems] == [
        "scenarios/s.yaml:5:13",
        "scenarios/s.yaml:5:42",
        "scenarios/s.yaml:7:21",
    ]


def test_duplicate_names_in_one_file_are_an_error(tmp_path: Path) -> None:
    """Two documents of a file with one name: the second is an error."""
    path = tmp_path / "two.yaml"
    path.write_text(CORE_OK + "---\n" + CORE_OK)
    first, second = load_file(path)
    assert isinstance(first, Scenario)
    assert isinstance(second, ScenarioError)
    assert "is used twice" in str(second)


# --- ids and parametrization ---------------------------------------------------------


def test_crash_all_makes_one_variant_per_declared_point(tmp_path: Path) -> None:
    """crash: all expands to every point of the registry, in sorted order."""
    scenario = _load_one(tmp_path, "name: sweep\ncrash: all\n")
    assert isinstance(scenario, Scenario)
    names = [v.name for v in variants(scenario)]
    assert names == [f"sweep[{p}]" for p in sorted(CRASH_POINTS)]


def test_ids_and_parametrization(pytester: pytest.Pytester) -> None:
    """Node ids: file::name, [point] per listed point, [gate-on]/[gate-off] for both."""
    _scenario(pytester, "plain.yaml", "name: plain\njobs: {count: 1}\n")
    _scenario(
        pytester,
        "points.yaml",
        "name: mid_stream\ncrash: [stream.after_chunk, finalize.after_replace]\n",
    )
    _scenario(pytester, "gates.yaml", "name: gates\ngate: both\n")
    _scenario(pytester, "multi.yaml", CORE_OK + "---\n" + CORE_FAILING)
    result = _run(pytester, "--collect-only", "-q", "scenarios")
    result.stdout.fnmatch_lines(
        [
            "scenarios/gates.yaml::gates[gate-on]",
            "scenarios/gates.yaml::gates[gate-off]",
            "scenarios/multi.yaml::core_ok",
            "scenarios/multi.yaml::core_failing",
            "scenarios/plain.yaml::plain",
            "scenarios/points.yaml::mid_stream[stream.after_chunk]",
            "scenarios/points.yaml::mid_stream[finalize.after_replace]",
            "7 tests collected*",
        ]
    )


def test_yaml_outside_the_glob_is_collected_only_when_named(
    pytester: pytest.Pytester,
) -> None:
    """A YAML file outside --idem-scenarios is collected only when named."""
    other = pytester.path / "found"
    other.mkdir()
    (other / "core_ok.yaml").write_text(CORE_OK)
    _run(pytester, "--collect-only", "-q").stdout.fnmatch_lines(["no tests collected*"])
    result = _run(pytester, "found/core_ok.yaml")
    result.assert_outcomes(passed=1)


# --- runs, failures, JUnit ------------------------------------------------------------


def test_broken_file_does_not_stop_the_others(pytester: pytest.Pytester) -> None:
    """An invalid file is one error at setup; the other scenarios still run."""
    _scenario(pytester, "bad.yaml", "name: bad\nworkers: two\n")
    _scenario(pytester, "good.yaml", CORE_OK)
    result = _run(pytester, "scenarios")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of invalid scenario: bad*",
            "invalid scenario (1 problem):",
            'scenarios/bad.yaml:2:10: workers must be an integer (got "two")',
        ]
    )


def test_failure_reads_scenario_broken_steps_timeline_replay(
    pytester: pytest.Pytester,
) -> None:
    """A failing scenario shows what broke, each call, a timeline per worker, replay."""
    _scenario(pytester, "core_failing.yaml", CORE_FAILING)
    result = _run(pytester, "scenarios")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "scenario core_failing failed (scenarios/core_failing.yaml:1)",
            "  Expects a state the calls never reach.",
            "expectation not met:",
            "  - scenarios/core_failing.yaml:8:5: renew(lease='held', owner='w2') "
            "raised LeaseLost*(expected no error)",
            "  - expect.states.STREAMING: wanted exactly 1 jobs STREAMING, got 0",
            "steps:",
            "  1. claim(owner='w1', as='held') -> lease(owner='w1', token=1, "
            "state=LEASED)",
            "timeline per worker:",
            "  [w1]",
            "*claim PLANNED->LEASED",
            "replay: pytest -p docstokg_idem "
            "'scenarios/core_failing.yaml::core_failing'",
        ]
    )


def test_junit_xml_carries_the_failure_text(pytester: pytest.Pytester) -> None:
    """The JUnit XML failure of a scenario holds the same readable text."""
    _scenario(pytester, "core_failing.yaml", CORE_FAILING)
    _scenario(pytester, "bad.yaml", "name: bad\ncrash: nowhere.at_all\n")
    result = _run(pytester, "scenarios", "--junitxml=junit.xml")
    result.assert_outcomes(failed=1, errors=1)
    tree = ET.parse(pytester.path / "junit.xml")
    cases = {c.get("name"): c for c in tree.iter("testcase")}
    failure = cases["core_failing"].find("failure")
    assert failure is not None
    for fragment in (
        "scenario core_failing failed",
        "expect.states.STREAMING: wanted exactly 1 jobs STREAMING, got 0",
        "timeline per worker:",
        "replay: pytest -p docstokg_idem",
    ):
        assert fragment in (failure.text or "")
    error = cases["bad"].find("error")
    assert error is not None
    assert "scenarios/bad.yaml:2:8: crash point 'nowhere.at_all'" in (error.text or "")


def test_xfail_names_a_variant_strictly(pytester: pytest.Pytester) -> None:
    """xfail marks one variant as a strict xfail; the others run as usual."""
    _scenario(
        pytester,
        "x.yaml",
        CORE_FAILING.replace("name: core_failing", "name: x")
        + 'xfail: {"*": "known: the expectation is wrong"}\n',
    )
    _scenario(pytester, "ok.yaml", CORE_OK + 'xfail: {"*": "wrongly marked"}\n')
    result = _run(pytester, "scenarios", "-rxX")
    result.assert_outcomes(xfailed=1, failed=1)
    result.stdout.fnmatch_lines(["*XPASS(strict)*wrongly marked*"])


# --- the gate, interleavings and write-back -------------------------------------------


@pytest.mark.chaos
def test_gate_both_checks_i11_with_the_gate_off(pytester: pytest.Pytester) -> None:
    """gate: both runs the tracked pipeline and the legacy one; each checks its own."""
    _scenario(
        pytester,
        "gates.yaml",
        """
        name: gates
        gate: both
        jobs: {count: 3, size: 20000}
        expect:
          states: {INDEXED: 3}
          files: {count: 3}
        """,
    )
    result = _run(pytester, "scenarios", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*gates[[]gate-on[]] PASSED*", "*gates[[]gate-off[]] PASSED*"]
    )


@pytest.mark.chaos
def test_write_back_replays_the_minimal_failure(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing interleaving is shrunk and written as a scenario that fails alike."""
    monkeypatch.setenv("HYPOTHESIS_STORAGE_DIRECTORY", str(pytester.path / "hyp"))
    _scenario(
        pytester,
        "reused.yaml",
        """
        name: reused
        description: A claim that keeps its token; a reclaim shows it.
        workers: 2
        mutant: token_reused
        jobs: [{artifact: a.pdf, size: 30000}, {artifact: b.pdf, size: 9000}]
        interleavings: {examples: 40, seed: 3, max_steps: 6}
        """,
    )
    result = _run(pytester, "scenarios/reused.yaml", "--idem-write-failures=found")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "invariant broken: I6 (single owner)*",
            "minimal failing schedule (* steps): *",
            "written as a scenario: found/reused_found_*.yaml; replay: *",
        ]
    )
    (written,) = (pytester.path / "found").glob("reused_found_*.yaml")
    (replayed,) = load_file(written)
    assert isinstance(replayed, Scenario)
    assert replayed.schedule is not None and replayed.mutant == "token_reused"
    shown = re.search(
        r"minimal failing schedule \(\d+ steps\): (.*)", result.stdout.str()
    )
    assert shown is not None and json.loads(shown.group(1)) == replayed.schedule

    again = _run(pytester, str(written))
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["invariant broken: I6 (single owner)*"])


# --- coverage and the HTML report -----------------------------------------------------


CLAIM_ADVANCE = """
name: claim_advance
kind: core
jobs: {count: 1}
api:
  - {call: claim, owner: w1, as: held}
  - {call: advance, lease: held, to: HEAD_DONE}
"""

CLAIM_RENEW_RELEASE = """
name: claim_renew_release
kind: core
jobs: {count: 1}
api:
  - {call: claim, owner: w1, as: held}
  - {call: renew, lease: held}
  - {call: release, lease: held}
"""


@pytest.mark.parametrize(
    ("threshold", "outcome", "xdist"),
    [("0.2", "ok: meets", ["-n", "2"]), ("0.25", "FAILED: under", [])],
)
def test_coverage_line_and_threshold(
    pytester: pytest.Pytester, threshold: str, outcome: str, xdist: list[str]
) -> None:
    """The summary lists reached and missed points (all xdist workers); a threshold."""
    _scenario(pytester, "a.yaml", CLAIM_ADVANCE)
    _scenario(pytester, "b.yaml", CLAIM_RENEW_RELEASE)
    result = _run(pytester, "scenarios", *xdist, f"--idem-min-coverage={threshold}")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*docstokg-idem crash scenarios*",
            "crash points exercised by 2 scenario runs: 4/19 (21%): "
            "claim.after_commit, release.before, renew.before, state.after_commit; "
            "never reached: finalize.after_dirsync, *",
            f"crash point coverage 21% {outcome} --idem-min-coverage={threshold}",
        ]
    )
    assert result.ret == (0 if outcome.startswith("ok") else 1)


def test_min_coverage_must_be_a_fraction(pytester: pytest.Pytester) -> None:
    """--idem-min-coverage outside 0..1 is a usage error that says what it means."""
    _scenario(pytester, "a.yaml", CLAIM_ADVANCE)
    result = _run(pytester, "scenarios", "--idem-min-coverage=80")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--idem-min-coverage='80' must be a fraction from 0 to 1*"]
    )


class _Svg(HTMLParser):
    """Collects the lanes, leases, crashes and clock moves of each timeline."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: list[dict[str, Any]] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key) and not str(a[key]).startswith("#"):
                self.external.append(str(a[key]))
        if tag == "svg":
            self.svgs.append({"lanes": [], "leases": 0, "crashes": 0, "clocks": 0})
        elif self.svgs and tag == "g" and a.get("class") in ("lane", "crash", "clock"):
            kind = a["class"]
            if kind == "lane":
                self.svgs[-1]["lanes"].append(a["data-lane"])
            else:
                self.svgs[-1][f"{kind}es" if kind == "crash" else f"{kind}s"] += 1
        elif self.svgs and tag == "rect" and a.get("class") == "lease":
            self.svgs[-1]["leases"] += 1


@pytest.mark.chaos
def test_html_report_draws_a_lane_per_worker(pytester: pytest.Pytester) -> None:
    """--idem-report writes self-contained HTML: a timeline per failing scenario."""
    _scenario(pytester, "failing.yaml", PIPELINE_FAILING)
    _scenario(pytester, "good.yaml", CORE_OK)
    result = _run(pytester, "scenarios", "--idem-report=out/report.html")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["scenario report: out/report.html"])
    page = (pytester.path / "out" / "report.html").read_text()
    parser = _Svg()
    parser.feed(page)
    assert parser.external == []
    (svg,) = parser.svgs
    assert svg["lanes"] == ["w0", "w1", "recovery"]
    assert svg["leases"] >= 3 and svg["crashes"] == 1 and svg["clocks"] == 1
    assert "killed at stream.after_chunk" in page
    assert "scenarios/failing.yaml::pipeline_failing" in page
    assert "expect.claims_per_job: wanted exactly 3 claims of each job" in page
    assert "<td>scenarios/good.yaml::core_ok</td><td>passed</td>" in page


# --- the shipped library, the schema and the docs -------------------------------------


def test_shipped_library_is_valid_and_covers_the_brief() -> None:
    """Every shipped scenario loads; there are at least 12, with unique names."""
    entries = [e for p in sorted(LIBRARY.glob("*.yaml")) for e in load_file(p)]
    errors = [str(e) for e in entries if isinstance(e, ScenarioError)]
    assert errors == []
    names = [e.name for e in entries if isinstance(e, Scenario)]
    assert len(names) >= 12 and len(set(names)) == len(names)
    sweep = [
        e for e in entries if isinstance(e, Scenario) and e.name == "sweep_crash_points"
    ]
    assert {v.param for v in variants(sweep[0])} == set(CRASH_POINTS)


def test_schema_is_valid_and_every_key_is_documented() -> None:
    """The shipped JSON Schema is itself valid; docs/scenarios.md names each key."""
    jsonschema.Draft202012Validator.check_schema(schema())
    docs = (ROOT / "docs" / "scenarios.md").read_text()
    defs = schema()["$defs"]
    keys = set(schema()["properties"])
    for name in (
        "job_count",
        "job",
        "origin_fault",
        "worker",
        "crash",
        "call",
        "expect",
        "interleavings",
        "origin_rule",
    ):
        keys |= set(defs[name]["properties"])
    keys |= set(defs["step"]["anyOf"][1]["properties"])
    missing = sorted(k for k in keys if f"`{k}`" not in docs)
    assert missing == []
