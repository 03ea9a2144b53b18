"""Crash scenarios written as YAML: loading, validation and the model.

A scenario file holds one or more YAML documents, each one scenario. A
document is parsed with ruamel.yaml's round-trip loader, which keeps the line
and column of every key and value, checked against the JSON Schema shipped
beside this module (``scenario.schema.json``), then against the rules a schema
cannot state: declared crash points, worker indexes, artifact names, keys that
do not apply to the scenario's kind or gate, and expectations that no run could
meet. Every problem is reported as ``file:line:column: message``, with the
value and the valid choices, and all problems of a document are reported
together. ``docs/scenarios.md`` is the reference of the format.
"""

from __future__ import annotations

import difflib
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.crashpoints import CRASH_POINTS
from ..core.states import JobState
from ..pipeline.origin import Fault as OriginFault

#: Where the fake clock starts unless a scenario says otherwise.
DEFAULT_CLOCK_START = 1_700_000_000.0
#: Worker settings for scenarios: small chunks, so that a few KB cross many points.
DEFAULT_WORKER = {"chunk_bytes": 16 * 1024, "progress_every_bytes": 16 * 1024}
#: HTTP settings for scenarios: the origin is local, so retries are quick.
DEFAULT_HTTP = {
    "connect_timeout_s": 5.0,
    "read_timeout_s": 10.0,
    "retries": 2,
    "backoff_s": 0.01,
    "backoff_max_s": 0.05,
    "retry_after_max_s": 1,
}
DEFAULT_SIZE = 40_000

#: Invariants the checker can show for a tracked run (I11 needs the gate off).
TRACKED_INVARIANTS = (
    "I1",
    "I2",
    "I3",
    "I4",
    "I5",
    "I6",
    "I7",
    "I8",
    "I9",
    "I10",
    "I12",
)
#: With the gate off: nothing written (I11) and whole files (I2).
UNTRACKED_INVARIANTS = ("I11", "I2")
#: A core scenario recovers nothing, so its jobs may stay unfinished (no I1).
CORE_INVARIANTS = tuple(i for i in TRACKED_INVARIANTS if i != "I1")

#: Keys that only a pipeline scenario (worker processes, an origin) uses.
PIPELINE_KEYS = (
    "workers",
    "faults",
    "worker",
    "mutant",
    "crash",
    "crashes",
    "disk_full",
    "steps",
    "interleavings",
    "recover",
    "seed",
)
#: Keys that need tracked jobs (the gate on).
TRACKED_KEYS = ("crash", "crashes", "disk_full", "steps", "interleavings", "mutant")

#: Core errors a ``kind: core`` call may expect to raise.
CORE_ERRORS = (
    "LeaseLost",
    "InvalidTransition",
    "ConfigError",
    "DatabaseUnavailable",
    "DatabaseCorrupt",
    "KeyFieldMissing",
    "InvalidURL",
    "PayloadMismatch",
    "OpInProgress",
    "SchemaTooNew",
)

STEP_KINDS = (
    "run",
    "crash",
    "clock",
    "pause",
    "resume",
    "stop",
    "restart",
    "reconcile",
    "expire_dead",
    "schedule",
)


class ScenarioError(ValueError):
    """A scenario document breaks the format; each problem names file:line:column."""

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.problems = list(problems)
        #: the name of the test standing for the broken document
        self.scenario_name: str | None = None
        super().__init__(
            "\n".join(f"{where}: {message}" for where, message in self.problems)
        )


# --- the model ---------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """An expected count: exactly n, or between ``low`` and ``high`` (open if None)."""

    low: int = 0
    high: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> Bound:
        if isinstance(raw, int):
            return cls(raw, raw)
        return cls(int(raw.get("min", 0)), raw.get("max"))

    def holds(self, value: int) -> bool:
        return value >= self.low and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.high == self.low:
            return f"exactly {self.low}"
        if self.high is None:
            return f"at least {self.low}"
        return f"{self.low} to {self.high}" if self.low else f"at most {self.high}"


@dataclass(frozen=True)
class Crash:
    """One armed crash point of a worker slot (``worker`` None: every slot)."""

    point: str
    worker: int | None = 0
    hit: int = 1
    action: str = "kill"
    arg: float = 0.0

    def fault(self) -> dict[str, Any]:
        """The spec a worker process is armed with."""
        return {
            "point": self.point,
            "action": self.action,
            "hit": self.hit,
            "worker": None,
            "arg": self.arg,
        }


@dataclass(frozen=True)
class Step:
    """One explicit step; ``where`` is its file:line:column, for runtime errors."""

    kind: str
    arg: Any
    where: str


@dataclass
class Scenario:
    """One validated scenario document (before expanding crash points and gates)."""

    name: str
    path: Path
    line: int
    raw: dict[str, Any]
    description: str = ""
    kind: str = "pipeline"
    gates: tuple[bool, ...] = (True,)
    workers: int = 2
    lease_ttl: float = 10.0
    clock_start: float = DEFAULT_CLOCK_START
    seed: int | None = None
    jobs: dict[str, int] = field(default_factory=dict)
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)
    worker: dict[str, Any] = field(default_factory=dict)
    mutant: str | None = None
    crash_specs: list[dict[str, Any]] = field(default_factory=list)
    disk_full: dict[str, Any] | None = None
    steps: list[Step] = field(default_factory=list)
    interleavings: dict[str, Any] | None = None
    recover: bool = True
    api: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    expect: dict[str, Any] = field(default_factory=dict)
    xfail: dict[str, str] = field(default_factory=dict)

    @property
    def schedule(self) -> list[list[Any]] | None:
        """The explicit schedule, when the steps are one ``schedule`` step."""
        if len(self.steps) == 1 and self.steps[0].kind == "schedule":
            return [list(s) for s in self.steps[0].arg]
        return None

    def origin_faults(self) -> dict[str, OriginFault]:
        return {name: _origin_fault(spec) for name, spec in self.faults.items()}

    def worker_config(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~docstokg_idem.pipeline.worker.WorkerConfig`."""
        from ..pipeline.http import HttpConfig

        config = {
            **DEFAULT_WORKER,
            **{k: v for k, v in self.worker.items() if k != "http"},
        }
        if "renew_every" in config:
            config["renew_every_s"] = config.pop("renew_every")
        config["http"] = HttpConfig(**{**DEFAULT_HTTP, **self.worker.get("http", {})})
        return config

    def invariants(self, gate: bool) -> tuple[str, ...]:
        """The invariants to check: the ones listed, else every one that applies."""
        wanted = self.expect.get("invariants", "all")
        applies: tuple[str, ...]
        if not gate:
            applies = UNTRACKED_INVARIANTS
        elif self.kind == "core":
            applies = CORE_INVARIANTS
        else:
            applies = TRACKED_INVARIANTS
        if wanted == "all":
            return applies
        return tuple(i for i in wanted if i in applies)


@dataclass
class Variant:
    """One test of a scenario: its crash point (from ``all`` or a list) and gate."""

    scenario: Scenario
    param: str | None
    gate: bool
    crashes: list[Crash]

    @property
    def name(self) -> str:
        return (
            f"{self.scenario.name}[{self.param}]" if self.param else self.scenario.name
        )

    @property
    def xfail(self) -> str | None:
        reasons = self.scenario.xfail
        return reasons.get(self.param or "", reasons.get("*"))


def variants(scenario: Scenario) -> list[Variant]:
    """One variant per crash point of an expanding spec, and per gate value."""
    fixed = [
        c for spec in scenario.crash_specs for c in _crashes(spec) if not _expands(spec)
    ]
    expanding = [spec for spec in scenario.crash_specs if _expands(spec)]
    out: list[Variant] = []
    for gate in scenario.gates:
        gate_id = (
            None if len(scenario.gates) == 1 else ("gate-on" if gate else "gate-off")
        )
        if expanding and gate:
            spec = expanding[0]
            for point in _points(spec["point"]):
                crash = _crash({**spec, "point": point})
                param = point if gate_id is None else f"{point}-{gate_id}"
                out.append(Variant(scenario, param, gate, [*fixed, crash]))
        else:
            out.append(Variant(scenario, gate_id, gate, fixed if gate else []))
    return out


def _expands(spec: Mapping[str, Any]) -> bool:
    point = spec["point"]
    return point == "all" or (isinstance(point, list) and len(point) > 1)


def _points(point: str | list[str]) -> list[str]:
    if point == "all":
        return sorted(CRASH_POINTS)
    return [point] if isinstance(point, str) else list(point)


def _crashes(spec: Mapping[str, Any]) -> list[Crash]:
    return [_crash({**spec, "point": p}) for p in _points(spec["point"])]


def _crash(spec: Mapping[str, Any]) -> Crash:
    worker = spec.get("worker", 0)
    return Crash(
        point=spec["point"],
        worker=None if worker == "any" else int(worker),
        hit=int(spec.get("hit", 1)),
        action=spec.get("action", "kill"),
        arg=float(spec.get("arg", 0.0)),
    )


def _origin_fault(spec: Mapping[str, Any]) -> OriginFault:
    fields = dict(spec)
    if "status_methods" in fields:
        fields["status_methods"] = frozenset(fields["status_methods"])
    return OriginFault(**fields)


# --- loading -----------------------------------------------------------------------


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema of one scenario document."""
    text = resources.files(__package__).joinpath("scenario.schema.json").read_text()
    return dict(json.loads(text))


def load_file(
    path: str | os.PathLike[str], *, display: str | None = None
) -> list[Scenario | ScenarioError]:
    """Every document of a scenario file: a :class:`Scenario` or the error it raised.

    A YAML syntax error makes the whole file one error. Problems name the file
    as ``display`` (by default its path as given).
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError

    file = Path(path)
    shown = Path(display) if display else file
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [
            ScenarioError([(f"{shown}:1:1", f"cannot read the scenario file: {exc}")])
        ]
    try:
        docs = [d for d in YAML(typ="rt").load_all(text) if d is not None]
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else f"{shown}:1:1"
        why = str(exc.problem or "")
        if exc.context and exc.context_mark:
            start = exc.context_mark
            why = f"{exc.context} (from {start.line + 1}:{start.column + 1}): {why}"
        return [ScenarioError([(where, f"not valid YAML: {why}")])]
    if not docs:
        return [
            ScenarioError(
                [
                    (
                        f"{shown}:1:1",
                        "the file holds no scenario; write at "
                        "least `name:` and `jobs:`",
                    )
                ]
            )
        ]
    default = file.stem if len(docs) == 1 else None
    out: list[Scenario | ScenarioError] = []
    for index, doc in enumerate(docs):
        name = default or f"{file.stem}_{index + 1}"
        try:
            out.append(parse(doc, file, name, shown=shown))
        except ScenarioError as exc:
            given = doc.get("name") if isinstance(doc, dict) else None
            valid = (
                isinstance(given, str)
                and given.replace("-", "_").replace(".", "_").isidentifier()
            )
            exc.scenario_name = given if valid else name
            out.append(exc)
    seen: set[str] = set()
    for i, s in enumerate(out):
        if isinstance(s, Scenario) and s.name not in seen:
            seen.add(s.name)
        elif isinstance(s, Scenario):
            error = ScenarioError(
                [
                    (
                        f"{shown}:{s.line}:1",
                        f"scenario name {s.name!r} is used "
                        "twice in this file; give each document its own name",
                    )
                ]
            )
            error.scenario_name = f"{s.name}_{i + 1}"
            out[i] = error
    return out


def parse(
    doc: Any, file: Path, default_name: str, *, shown: Path | None = None
) -> Scenario:
    """Validate one loaded document and build its :class:`Scenario`."""
    where = _Where(doc, shown or file)
    if not isinstance(doc, dict):
        raise ScenarioError(
            [
                (
                    where.at(()),
                    f"a scenario is a mapping of keys, got "
                    f"{type(doc).__name__} {_show(doc)}",
                )
            ]
        )
    problems = _schema_problems(doc, where)
    if problems:
        raise ScenarioError(problems)
    plain = _plain(doc)
    scenario = _build(plain, where, default_name)
    problems = _Rules(scenario, plain, where).check()
    if problems:
        raise ScenarioError(problems)
    return scenario


def _plain(value: Any) -> Any:
    """ruamel's round-trip containers and scalars as plain Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


class _Where:
    """file:line:column of a path of keys and indexes in a round-trip document."""

    def __init__(self, doc: Any, file: Path):
        self.doc, self.file = doc, file

    def at(self, path: Sequence[Any], *, key: bool = False) -> str:
        line, col = self.position(path, key=key)
        return f"{self.file}:{line + 1}:{col + 1}"

    def position(self, path: Sequence[Any], *, key: bool = False) -> tuple[int, int]:
        node: Any = self.doc
        pos = _start(self.doc)
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            lines: Any = getattr(node, "lc", None)  # ruamel's line/column record
            try:
                if isinstance(node, dict) and part in node:
                    pos = lines.key(part) if (key and last) else lines.value(part)
                elif (
                    isinstance(node, list)
                    and isinstance(part, int)
                    and part < len(node)
                ):
                    pos = lines.item(part)
                else:
                    break
            except (AttributeError, KeyError, TypeError):
                break
            node = node[part]
        return pos

    def line(self) -> int:
        return _start(self.doc)[0] + 1


def _start(node: Any) -> tuple[int, int]:
    try:
        return int(node.lc.line), int(node.lc.col)
    except AttributeError:
        return 0, 0


def _show(value: Any) -> str:
    text = json.dumps(_plain(value), default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += (
            f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        )
    return out or "the document"


# --- schema problems -----------------------------------------------------------------


def _schema_problems(doc: Any, where: _Where) -> list[tuple[str, str]]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    problems = []
    for error in validator.iter_errors(doc):
        error = _deepest(error)
        problems.append(_explain(error, where))
    problems.sort(key=lambda p: _sort_key(p[0]))
    return _unique(problems)


def _unique(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for problem in problems:
        if problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out


def _sort_key(where: str) -> tuple[int, int]:
    _, line, col = where.rsplit(":", 2)
    return int(line), int(col)


def _deepest(error: Any) -> Any:
    """For anyOf, the error of the branch that fits the value's type best."""
    from jsonschema.exceptions import best_match

    while error.validator in ("anyOf", "oneOf") and error.context:
        typed = [e for e in error.context if e.validator != "type" or len(e.path)]
        candidate = best_match(typed or error.context)
        if candidate is None:
            break
        if (
            candidate.validator in ("type", "enum", "const")
            and not candidate.relative_path
            and len(error.context) > 1
        ):
            return error  # no branch fits the value: say what the key accepts
        error = candidate
    return error


def _explain(error: Any, where: _Where) -> tuple[str, str]:
    path = list(error.absolute_path)
    name = _dotted(path)
    value = error.instance
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(k for k in value if k not in error.schema.get("properties", {}))
        key = extra[0]
        hint = difflib.get_close_matches(str(key), allowed, n=1)
        close = f" (did you mean {hint[0]!r}?)" if hint else ""
        valid = (
            f"valid keys: {', '.join(allowed)}" if allowed else "it takes no other keys"
        )
        return (
            where.at([*path, key], key=True),
            f"unknown key {str(key)!r} in {name}{close}; {valid}",
        )
    if kind == "enum":
        choices = ", ".join(_show(c) for c in error.validator_value)
        return where.at(
            path
        ), f"{name} is {_show(value)}, which is not one of: {choices}"
    if kind == "const":
        return where.at(
            path
        ), f"{name} is {_show(value)}; it must be {_show(error.validator_value)}"
    if kind == "type":
        want = error.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return where.at(path), f"{name} must be {_article(want)} (got {_show(value)})"
    if kind in ("minimum", "maximum", "exclusiveMinimum"):
        sign = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">"}[kind]
        return where.at(
            path
        ), f"{name} must be {sign} {error.validator_value} (got {_show(value)})"
    if kind == "required":
        missing = [k for k in error.validator_value if k not in value]
        return where.at(
            path
        ), f"{name} needs the key {missing[0]!r} (got {_show(value)})"
    if kind in ("minProperties", "maxProperties") and path and path[0] == "steps":
        return where.at(path), (
            f"a step has exactly one key naming its kind, one of "
            f"{', '.join(STEP_KINDS)} (got {_show(value)})"
        )
    if kind == "pattern":
        return where.at(path), (
            f"{name} is {_show(value)}, which does not match {error.validator_value!r}"
        )
    if kind in ("anyOf", "oneOf"):
        return where.at(
            path
        ), f"{name} has the wrong form (got {_show(value)}); " + _forms(
            error.validator_value
        )
    if kind in ("minItems", "maxItems", "uniqueItems", "minLength", "minProperties"):
        return where.at(path), f"{name}: {error.message}"
    return where.at(path), f"{name}: {error.message}"


def _article(word: str) -> str:
    return {
        "integer": "an integer",
        "object": "a mapping",
        "array": "a list",
        "string": "a string",
        "number": "a number",
        "boolean": "true or false",
        "null": "null",
    }.get(word, word)


def _forms(branches: Sequence[Mapping[str, Any]]) -> str:
    forms = []
    for branch in branches:
        ref = branch.get("$ref", "")
        sub = schema()["$defs"].get(ref.rsplit("/", 1)[-1], branch) if ref else branch
        if "enum" in sub:
            forms.append("one of " + ", ".join(_show(v) for v in sub["enum"]))
        elif "const" in sub:
            forms.append(_show(sub["const"]))
        elif sub.get("type") == "object":
            forms.append(
                "a mapping with keys " + ", ".join(sorted(sub.get("properties", {})))
            )
        elif "type" in sub:
            forms.append(_article(str(sub["type"])))
        elif "anyOf" in sub:
            forms.append(_forms(sub["anyOf"]))
    return "use " + "; or ".join(forms)


# --- building the model --------------------------------------------------------------


def _build(doc: dict[str, Any], where: _Where, default_name: str) -> Scenario:
    gate = doc.get("gate", "on")
    gates = {
        "on": (True,),
        True: (True,),
        "off": (False,),
        False: (False,),
        "both": (True, False),
    }[gate]
    crash_specs = list(doc.get("crashes", []))
    if "crash" in doc:
        shorthand = doc["crash"]
        crash_specs.insert(
            0, shorthand if isinstance(shorthand, dict) else {"point": shorthand}
        )
    scenario = Scenario(
        name=doc.get("name", default_name),
        path=where.file,
        line=where.line(),
        raw=doc,
        description=doc.get("description", "").strip(),
        kind=doc.get("kind", "pipeline"),
        gates=gates,
        workers=doc.get("workers", 1 if doc.get("kind") == "core" else 2),
        lease_ttl=float(doc.get("lease_ttl", 10.0)),
        clock_start=float(doc.get("clock", {}).get("start", DEFAULT_CLOCK_START)),
        seed=doc.get("seed"),
        jobs=_jobs(doc.get("jobs", {"count": 1})),
        faults=dict(doc.get("faults", {})),
        worker=dict(doc.get("worker", {})),
        mutant=doc.get("mutant"),
        crash_specs=crash_specs,
        disk_full=doc.get("disk_full"),
        interleavings=doc.get("interleavings"),
        recover=doc.get("recover", True),
        expect=dict(doc.get("expect", {})),
        xfail=dict(doc.get("xfail", {})),
    )
    scenario.steps = [
        _step(raw, where.at(["steps", i])) for i, raw in enumerate(doc.get("steps", []))
    ]
    scenario.api = [
        (dict(call), where.at(["api", i])) for i, call in enumerate(doc.get("api", []))
    ]
    return scenario


def _jobs(raw: Any) -> dict[str, int]:
    if isinstance(raw, list):
        return {j["artifact"]: int(j.get("size", DEFAULT_SIZE)) for j in raw}
    count = raw["count"]
    sizes = raw.get("sizes") or [raw.get("size", DEFAULT_SIZE)]
    suffix = raw.get("type", "pdf")
    return {f"a{i}.{suffix}": int(sizes[i % len(sizes)]) for i in range(count)}


def _step(raw: Any, where: str) -> Step:
    if isinstance(raw, str):
        return Step(
            raw, {"until": "idle", "workers": None} if raw == "run" else None, where
        )
    ((kind, arg),) = raw.items()
    if kind == "run":
        arg = (
            {"until": arg, "workers": None}
            if isinstance(arg, str)
            else {"until": arg.get("until", "idle"), "workers": arg.get("workers")}
        )
    elif kind in ("pause", "restart", "resume") and isinstance(arg, int):
        arg = {"worker": arg}
    return Step(kind, arg, where)


# --- semantic rules ------------------------------------------------------------------


class _Rules:
    """The checks a JSON Schema cannot state, each with its position."""

    def __init__(self, scenario: Scenario, doc: dict[str, Any], where: _Where):
        self.s, self.doc, self.where = scenario, doc, where
        self.problems: list[tuple[str, str]] = []

    def fail(self, path: Sequence[Any], message: str, *, key: bool = False) -> None:
        self.problems.append((self.where.at(path, key=key), message))

    def check(self) -> list[tuple[str, str]]:
        self.check_kind()
        self.check_jobs()
        self.check_faults()
        self.check_crashes()
        self.check_steps()
        self.check_api()
        self.check_expect()
        self.check_xfail()
        self.check_mutant()
        return sorted(_unique(self.problems), key=lambda p: _sort_key(p[0]))

    def check_kind(self) -> None:
        if self.s.kind == "core":
            for key in PIPELINE_KEYS:
                if key in self.doc:
                    self.fail(
                        [key],
                        f"key {key!r} does not apply to kind: core (core "
                        "scenarios call the API in this process; they start "
                        "no workers); remove it or use kind: pipeline",
                        key=True,
                    )
            if "gate" in self.doc and self.s.gates != (True,):
                self.fail(
                    ["gate"], "a core scenario runs with the gate on; remove `gate`"
                )
            if not self.s.api:
                self.fail([], "kind: core needs an `api:` list of calls")
            return
        if "api" in self.doc:
            self.fail(
                ["api"],
                "key 'api' applies only to kind: core; use `steps:` for a "
                "pipeline scenario",
                key=True,
            )
        if False in self.s.gates:
            for key in TRACKED_KEYS:
                if key in self.doc:
                    gate = self.doc.get("gate")
                    self.fail(
                        [key],
                        f"key {key!r} needs tracked jobs, but gate is "
                        f"{_show(gate)}: with the gate off the legacy "
                        "downloader runs, which has no crash points or "
                        "scheduled steps; set gate: on",
                        key=True,
                    )
        modes = [k for k in ("steps", "interleavings") if k in self.doc]
        if len(modes) == 2:
            self.fail(
                ["interleavings"],
                "use either `steps:` or `interleavings:` (Hypothesis "
                "draws the schedules), not both",
                key=True,
            )

    def check_jobs(self) -> None:
        raw = self.doc.get("jobs")
        if isinstance(raw, dict) and len(raw.get("sizes", [])) > raw["count"]:
            self.fail(
                ["jobs", "sizes"],
                f"jobs.sizes has {len(raw['sizes'])} sizes for "
                f"{raw['count']} jobs; the sizes are used in turn, "
                "so give at most one per job",
            )
        if isinstance(raw, list):
            names = [j["artifact"] for j in raw]
            for i, name in enumerate(names):
                if names.index(name) != i:
                    self.fail(
                        ["jobs", i, "artifact"],
                        f"artifact {name!r} is planned twice; "
                        "artifact names are unique",
                    )

    def check_faults(self) -> None:
        for name, spec in self.s.faults.items():
            if name not in self.s.jobs:
                self.fail(
                    ["faults", name],
                    f"faults name artifact {name!r}, which is not "
                    f"planned; planned artifacts: "
                    f"{', '.join(self.s.jobs)}",
                    key=True,
                )
                continue
            try:
                _origin_fault(spec)
            except ValueError as exc:
                self.fail(["faults", name], f"faults.{name}: {exc}")

    def _point(self, path: Sequence[Any], point: Any, *, all_ok: bool = True) -> None:
        names = point if isinstance(point, list) else [point]
        for i, name in enumerate(names):
            at = [*path, i] if isinstance(point, list) else list(path)
            if name == "all" and all_ok and not isinstance(point, list):
                continue
            if name not in CRASH_POINTS:
                hint = difflib.get_close_matches(name, list(CRASH_POINTS), n=1)
                close = f" (did you mean {hint[0]!r}?)" if hint else ""
                allowed = ", ".join(sorted(CRASH_POINTS)) + (
                    ", or all" if all_ok else ""
                )
                self.fail(
                    at,
                    f"crash point {name!r} is not declared{close}; declared "
                    f"points: {allowed}",
                )

    def _worker(self, path: Sequence[Any], index: Any) -> None:
        if isinstance(index, int) and index >= self.s.workers:
            self.fail(
                path,
                f"worker {index} does not exist: the scenario has "
                f"{self.s.workers} workers, numbered 0 to {self.s.workers - 1}",
            )

    def check_crashes(self) -> None:
        specs: list[tuple[list[Any], dict[str, Any]]] = []
        if "crash" in self.doc:
            raw = self.doc["crash"]
            specs.append((["crash"], raw if isinstance(raw, dict) else {"point": raw}))
        specs += [
            (["crashes", i], c) for i, c in enumerate(self.doc.get("crashes", []))
        ]
        expanding = 0
        for path, spec in specs:
            point_path = (
                [*path, "point"] if isinstance(self.doc_at(path), dict) else path
            )
            self._point(point_path, spec["point"])
            self._worker([*path, "worker"], spec.get("worker", 0))
            expanding += _expands(spec)
        if expanding > 1:
            self.fail(
                specs[-1][0],
                "only one crash spec may name several points (or all); "
                "each of its points becomes one test",
            )
        if self.s.disk_full:
            self._point(["disk_full", "at"], self.s.disk_full["at"], all_ok=False)
            self._worker(["disk_full", "worker"], self.s.disk_full.get("worker", 0))
        if self.s.schedule is not None or self.s.interleavings is not None:
            for key in ("crash", "crashes", "disk_full"):
                if key in self.doc:
                    self.fail(
                        [key],
                        f"key {key!r} cannot be combined with a schedule: in a "
                        "schedule the `kill` steps are the crashes",
                        key=True,
                    )
            if "clock" in self.doc:
                self.fail(
                    ["clock"],
                    "a schedule's fake clock starts at 1700000000 (run_schedule); "
                    "remove `clock`",
                    key=True,
                )

    def doc_at(self, path: Sequence[Any]) -> Any:
        node: Any = self.doc
        for part in path:
            node = node[part]
        return node

    def check_steps(self) -> None:
        started: set[int] = set()
        kinds = [s.kind for s in self.s.steps]
        if "schedule" in kinds and len(kinds) > 1:
            self.fail(
                ["steps", kinds.index("schedule")],
                "a `schedule` step runs the whole scenario through run_schedule (its "
                "recovery included), so it must be the only step",
            )
        for i, step in enumerate(self.s.steps):
            path: list[Any] = ["steps", i, step.kind]
            arg = step.arg
            if step.kind == "run" and arg["workers"]:
                for j, w in enumerate(arg["workers"]):
                    self._worker([*path, "workers", j], w)
                started.update(arg["workers"])
            elif step.kind == "run":
                started.update(range(self.s.workers))
            elif step.kind in ("crash", "stop"):
                self._worker(path, arg)
            elif step.kind in ("pause", "restart", "resume"):
                self._worker(
                    [*path, "worker"] if isinstance(self.doc_at(path), dict) else path,
                    arg["worker"],
                )
                if step.kind == "resume" and "until" in arg:
                    self._point([*path, "until"], arg["until"], all_ok=False)
                if step.kind == "pause" and "at" in arg:
                    self._point([*path, "at"], arg["at"], all_ok=False)
                    if arg["worker"] in started:
                        self.fail(
                            path,
                            f"pause at a crash point starts worker "
                            f"{arg['worker']}, but an earlier step already "
                            "started it; pause it first, or use `pause: "
                            f"{arg['worker']}` to stop it wherever it is",
                        )
                    started.add(arg["worker"])
                for j, crash in enumerate(arg.get("crashes", [])):
                    self._point(
                        [*path, "crashes", j, "point"], crash["point"], all_ok=False
                    )
            elif step.kind == "schedule" and self.s.gates != (True,):
                self.fail(path, "a schedule needs the gate on")

    def check_api(self) -> None:
        names: set[str] = set()
        for i, (call, _) in enumerate(self.s.api):
            path: list[Any] = ["api", i]
            if "lease" in call and call["lease"] not in names:
                known = ", ".join(sorted(names)) or "none yet"
                self.fail(
                    [*path, "lease"],
                    f"lease {call['lease']!r} is not defined by an "
                    f"earlier call's `as:`; defined: {known}",
                )
            if "as" in call:
                if call["call"] != "claim":
                    self.fail(
                        [*path, "as"],
                        "`as:` names the lease a `claim` call returns; "
                        f"this call is {call['call']!r}",
                    )
                names.add(call["as"])
            if "job" in call and call["job"] >= len(self.s.jobs):
                self.fail(
                    [*path, "job"],
                    f"job {call['job']} does not exist: the scenario "
                    f"plans {len(self.s.jobs)} jobs, numbered from 0",
                )
            for key in ("to",):
                if key in call:
                    self._state([*path, key], call[key])
            for j, state in enumerate(call.get("from", [])):
                self._state([*path, "from", j], state)
            if "raises" in call and call["raises"] not in CORE_ERRORS:
                self.fail(
                    [*path, "raises"],
                    f"raises {call['raises']!r} is not a core error; "
                    f"use one of {', '.join(CORE_ERRORS)}",
                )
            needs = {
                "advance": "to",
                "connect": "database",
                "clock": "seconds",
                "expire": "owner",
            }
            if call["call"] in needs and needs[call["call"]] not in call:
                self.fail(
                    path, f"call {call['call']!r} needs the key {needs[call['call']]!r}"
                )
            if (
                call["call"] in ("renew", "release", "advance", "fail")
                and "lease" not in call
                and "job" not in call
            ):
                self.fail(
                    path,
                    f"call {call['call']!r} needs `lease:` (a name from an "
                    "earlier claim's `as:`) or `job:`",
                )

    def _state(self, path: Sequence[Any], name: Any) -> None:
        valid = [s.value for s in JobState]
        if name not in valid:
            self.fail(
                path, f"{name!r} is not a job state; use one of {', '.join(valid)}"
            )

    def check_expect(self) -> None:
        expect = self.s.expect
        jobs = len(self.s.jobs)
        invariants = expect.get("invariants", "all")
        if isinstance(invariants, list):
            for i, name in enumerate(invariants):
                gate_on = True in self.s.gates
                if name == "I11" and gate_on:
                    self.fail(
                        ["expect", "invariants", i],
                        "I11 (gate off writes nothing) is "
                        "checked only with gate: off (check_gate_off); drop it or set "
                        "gate: off",
                    )
                if name == "I1" and self.s.kind == "core":
                    self.fail(
                        ["expect", "invariants", i],
                        "I1 (no lost jobs) needs a "
                        "recovery, which a core scenario does not run; drop it",
                    )
        states = expect.get("states", {})
        low_total = 0
        for name, raw in states.items():
            self._state(["expect", "states", name], name)
            bound = Bound.parse(raw)
            low_total += bound.low
            if bound.low > jobs:
                self.fail(
                    ["expect", "states", name],
                    f"expect.states.{name} wants "
                    f"{bound} jobs, but only {jobs} are planned",
                )
        if low_total > jobs and all(
            Bound.parse(r).low <= jobs for r in states.values()
        ):
            self.fail(
                ["expect", "states"],
                f"expect.states wants at least {low_total} jobs "
                f"in these states together, but only {jobs} are "
                "planned; a job is in one state",
            )
        if states and self.s.gates == (False,):
            self.fail(
                ["expect", "states"],
                "expect.states needs job rows, which the gate "
                "off never writes; use expect.files",
                key=True,
            )
        self._bound_le(
            ["expect", "files", "count"],
            expect.get("files", {}).get("count"),
            jobs,
            "final files",
            "jobs are planned",
        )
        for key in ("present", "absent"):
            for i, name in enumerate(expect.get("files", {}).get(key, [])):
                self._artifact(["expect", "files", key, i], name)
        for i, rule in enumerate(expect.get("origin", [])):
            if "artifact" in rule:
                self._artifact(["expect", "origin", i, "artifact"], rule["artifact"])
            if (
                rule.get("min") is not None
                and rule.get("max") is not None
                and rule["min"] > rule["max"]
            ):
                self.fail(
                    ["expect", "origin", i],
                    f"origin rule min {rule['min']} is above max {rule['max']}",
                )
        for key in (
            "states",
            "parts",
            "crashes",
            "claims_per_job",
            "renewals",
            "lease_lost",
        ):
            for name, raw in (
                expect.get(key, {}).items()
                if key == "states"
                else [(None, expect.get(key))]
            ):
                if (
                    isinstance(raw, dict)
                    and raw.get("max") is not None
                    and raw.get("min", 0) > raw["max"]
                ):
                    path = ["expect", key] + ([name] if name else [])
                    self.fail(path, f"min {raw['min']} is above max {raw['max']}")
        self._crashes_possible()

    def _crashes_possible(self) -> None:
        raw = self.s.expect.get("crashes")
        if raw is None or self.s.interleavings is not None:
            return
        schedule = self.s.schedule or []
        possible = sum(1 for s in schedule if s[0] == "kill")
        possible += sum(1 for st in self.s.steps if st.kind == "crash")
        for spec in self.s.crash_specs:
            if spec.get("action", "kill") in ("kill", "exit", "raise"):
                possible += self.s.workers if spec.get("worker") == "any" else 1
        for step in self.s.steps:
            if step.kind == "restart":
                possible += len(step.arg.get("crashes", []))
        if Bound.parse(raw).low > possible:
            self.fail(
                ["expect", "crashes"],
                f"expect.crashes wants {Bound.parse(raw)} "
                f"crashed workers, but the scenario can crash at most {possible} "
                "(armed kill/exit/raise crash points, crash steps and schedule kills)",
            )

    def _bound_le(
        self, path: list[Any], raw: Any, limit: int, what: str, unit: str
    ) -> None:
        if raw is not None and Bound.parse(raw).low > limit:
            self.fail(
                path,
                f"{_dotted(path)} wants {Bound.parse(raw)} {what}, but only "
                f"{limit} {unit}",
            )

    def _artifact(self, path: list[Any], name: str) -> None:
        if name not in self.s.jobs:
            self.fail(
                path,
                f"artifact {name!r} is not planned; planned artifacts: "
                f"{', '.join(self.s.jobs)}",
            )

    def check_xfail(self) -> None:
        ids = {v.param or "" for v in variants(self.s)} | {"*"}
        for key in self.s.xfail:
            if key not in ids:
                valid = ", ".join(sorted(i for i in ids if i)) or "*"
                self.fail(
                    ["xfail", key],
                    f"xfail names variant {key!r}, which this scenario "
                    f"does not have; its variants: {valid}",
                    key=True,
                )

    def check_mutant(self) -> None:
        if self.s.mutant is None:
            return
        try:
            from . import mutants
        except ImportError:
            self.fail(
                ["mutant"],
                "mutants are not available in this version of the harness "
                "(docstokg_idem.harness.mutants is missing)",
            )
            return
        known = _mutant_names(mutants)
        if known is not None and self.s.mutant not in known:
            self.fail(
                ["mutant"],
                f"mutant {self.s.mutant!r} is not known; known mutants: "
                f"{', '.join(sorted(known))}",
            )


def _mutant_names(module: Any) -> list[str] | None:
    for attr in ("MUTANTS", "NAMES", "mutants"):
        value = getattr(module, attr, None)
        if isinstance(value, Mapping | list | tuple | set | frozenset):
            return [str(v) for v in value]
    names = getattr(module, "names", None)
    return list(names()) if callable(names) else None


# --- writing -------------------------------------------------------------------------


def dump(document: Mapping[str, Any]) -> str:
    """A scenario document as YAML text, schedules and short lists in flow style."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    def convert(value: Any, depth: int = 0) -> Any:
        if isinstance(value, Mapping):
            out = CommentedMap()
            for k, v in value.items():
                out[k] = convert(v, depth + 1)
            return out
        if isinstance(value, list | tuple):
            seq = CommentedSeq(convert(v, depth + 1) for v in value)
            if all(not isinstance(v, Mapping | list | tuple) for v in value):
                seq.fa.set_flow_style()
            return seq
        return value

    yaml = YAML(typ="rt")
    yaml.width = 100
    yaml.indent(mapping=2, sequence=4, offset=2)
    buffer = io.StringIO()
    yaml.dump(convert(document), buffer)
    return buffer.getvalue()


def iter_scenario_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Every ``*.yaml`` / ``*.yml`` file under ``root``, sorted."""
    base = Path(root)
    yield from sorted(p for p in base.rglob("*") if p.suffix in (".yaml", ".yml"))
