"""What a scenario run is checked against, and what it reports.

Shared by the engines of :mod:`.scenario_run`: planning the artifacts, the
checker's report restricted to the scenario's invariants, the scenario's
expectations (states, files, crashes, claims, origin request counts), and the
data of a timeline picture drawn from the history table.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import connect, plan_jobs
from ..core.db import close
from ..core.files import list_finals, list_parts
from ..pipeline.origin import Origin
from .checker import Expected, Report
from .scenario_format import Bound, Scenario

#: Bounds every wait on a worker process.
WAIT_S = 60.0
WORK_ID = "W1"


class ScenarioStepError(RuntimeError):
    """A step cannot be carried out (a worker that is not running, ...)."""


@dataclass
class RunResult:
    """What one run of a variant did and what was wrong with it."""

    name: str
    report: Report
    unmet: list[str] = field(default_factory=list)
    points: set[str] = field(default_factory=set)
    text_timeline: str = ""
    picture: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    schedule: list[list[Any]] | None = None
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.unmet


# --- shared pieces --------------------------------------------------------------------


def plan_artifacts(
    db_path: Path, origin: Origin | None, names: Sequence[str], clock: Any
) -> dict[str, str]:
    """Plan one job per artifact; return artifact name -> job id."""
    cx = connect(db_path, clock=clock)
    try:
        rows = [
            {"work_id": WORK_ID, "artifact_id": n, "url": artifact_url(origin, n)}
            for n in names
        ]
        return dict(zip(names, plan_jobs(cx, rows), strict=True))
    finally:
        close(cx)


def artifact_url(origin: Origin | None, name: str) -> str:
    return origin.url(name) if origin is not None else f"http://127.0.0.1/a/{name}"


def expected_of(origin: Origin, ids: dict[str, str]) -> dict[str, Expected]:
    out = {}
    for name, job_id in ids.items():
        want = origin.expected(name)
        out[job_id] = Expected(
            want.size, want.sha256, origin.counters(name)["full_gets"], want.version
        )
    return out


def restrict(report: Report, invariants: Sequence[str]) -> Report:
    """Keep the checks and violations of the scenario's invariants only."""
    keep = set(invariants)
    return Report(
        violations=[v for v in report.violations if v.invariant in keep],
        checked=[c for c in report.checked if c in keep],
        jobs=report.jobs,
    )


def read_rows(db_path: Path, sql: str) -> list[dict[str, Any]]:
    if not db_path.exists():
        return []
    cx = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    cx.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in cx.execute(sql)]
    except sqlite3.OperationalError:
        return []
    finally:
        cx.close()


@dataclass
class Facts:
    """What the expectations are checked against."""

    db_path: Path
    out: Path
    ids: dict[str, str]
    origin: Origin | None = None
    exits: list[tuple[str, int | None]] = field(default_factory=list)
    log_dir: Path | None = None


#: Expectations about job rows, which a run with the gate off never writes.
TRACKED_EXPECTATIONS = ("states", "claims_per_job", "renewals", "lease_lost")


def expectations(
    scenario: Scenario, facts: Facts, *, tracked: bool = True
) -> list[str]:
    """Each expectation the run did not meet, as one line naming the key.

    With ``tracked=False`` (the gate off) expectations about job rows are left
    to the gate-on variant of a ``gate: both`` scenario.
    """
    expect, unmet = dict(scenario.expect), []
    if not tracked:
        for key in TRACKED_EXPECTATIONS:
            expect.pop(key, None)

    def bound(key: str, raw: Any, value: int, what: str) -> None:
        b = Bound.parse(raw)
        if not b.holds(value):
            unmet.append(f"expect.{key}: wanted {b} {what}, got {value}")

    jobs = read_rows(facts.db_path, "SELECT job_id, state FROM jobs")
    history = read_rows(facts.db_path, "SELECT job_id, event FROM history")
    if "states" in expect:
        states = Counter(j["state"] for j in jobs)
        for name, raw in expect["states"].items():
            bound(f"states.{name}", raw, states.get(name, 0), f"jobs {name}")
    finals = list_finals(facts.out)
    files = expect.get("files", {})
    if "count" in files:
        bound("files.count", files["count"], len(finals), "final files")
    for name in files.get("present", []):
        if facts.ids[name] not in finals:
            unmet.append(f"expect.files.present: {name} has no final file")
    for name in files.get("absent", []):
        if facts.ids[name] in finals:
            unmet.append(
                f"expect.files.absent: {name} has a final file "
                f"{finals[facts.ids[name]].name}"
            )
    if "parts" in expect:
        bound("parts", expect["parts"], len(list_parts(facts.out)), "part files")
    if "crashes" in expect:
        crashed = [f"{o} ({c})" for o, c in facts.exits if c not in (None, 0)]
        bound(
            "crashes",
            expect["crashes"],
            len(crashed),
            "crashed workers" + (f" [{', '.join(crashed)}]" if crashed else ""),
        )
    if "claims_per_job" in expect:
        claims = Counter(h["job_id"] for h in history if h["event"] == "claim")
        b = Bound.parse(expect["claims_per_job"])
        names = {v: k for k, v in facts.ids.items()}
        for job_id, name in names.items():
            if not b.holds(claims.get(job_id, 0)):
                unmet.append(
                    f"expect.claims_per_job: wanted {b} claims of each job, "
                    f"{name} was claimed {claims.get(job_id, 0)} times"
                )
    if "renewals" in expect:
        bound(
            "renewals",
            expect["renewals"],
            sum(1 for h in history if h["event"] == "renew"),
            "lease renewals",
        )
    if "lease_lost" in expect:
        bound(
            "lease_lost",
            expect["lease_lost"],
            _lease_lost(facts.log_dir),
            "refused writes (lease_lost events)",
        )
    unmet += _origin_rules(expect.get("origin", []), facts)
    return unmet


def _lease_lost(log_dir: Path | None) -> int:
    if log_dir is None or not log_dir.is_dir():
        return 0
    count = 0
    for path in log_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line and json.loads(line).get("action") == "lease_lost":
                count += 1
    return count


def _origin_rules(rules: Sequence[dict[str, Any]], facts: Facts) -> list[str]:
    if facts.origin is None:
        return []
    unmet = []
    for rule in rules:
        names = [rule["artifact"]] if "artifact" in rule else list(facts.ids)
        for name in names:
            value = _counter(facts.origin.counters(name), rule["counter"])
            b = Bound(rule.get("min", 0), rule.get("max"))
            if not b.holds(value):
                unmet.append(
                    f"expect.origin: wanted {b} {rule['counter']} of {name}, "
                    f"got {value}"
                )
    return unmet


def _counter(counters: dict[str, Any], name: str) -> int:
    if name == "gets":
        return int(counters["methods"].get("GET", 0))
    if name == "heads":
        return int(counters["methods"].get("HEAD", 0))
    return int(counters[name])


# --- timeline pictures ---------------------------------------------------------------


def picture(
    db_path: Path,
    *,
    start: float,
    crashes: Sequence[dict[str, Any]] = (),
    clocks: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The data of a timeline picture: lanes per worker, leases, marks, crashes, clock.

    The x axis is the order of history rows (fake time often stands still);
    each row keeps its fake time in seconds from the start. A crash is placed
    after the last row its worker wrote; a clock move before the first row at
    or after the new time.
    """
    rows = read_rows(db_path, "SELECT * FROM history ORDER BY seq")
    holders = {
        (h["job_id"], h["token"]): h["owner"] for h in rows if h["event"] == "claim"
    }
    jobs = {
        job: f"j{i}" for i, job in enumerate(dict.fromkeys(h["job_id"] for h in rows))
    }
    lanes: list[str] = []

    def lane(name: str) -> str:
        if name not in lanes:
            lanes.append(name)
        return name

    marks, leases = [], []
    for x, h in enumerate(rows):
        who = h["owner"] or holders.get((h["job_id"], h["token"])) or "reconciler"
        label = h["to_state"] if h["event"] == "state" else h["event"]
        if h["event"] == "claim":
            leases.append(
                {
                    "lane": lane(who),
                    "job": jobs[h["job_id"]],
                    "token": h["token"],
                    "x0": x,
                    "x1": _lease_end(rows, x),
                    "until": h["lease_until"],
                }
            )
        marks.append(
            {
                "lane": lane(who),
                "x": x,
                "t": round(h["at"] - start, 3),
                "event": h["event"],
                "label": label,
                "job": jobs[h["job_id"]],
                "detail": h["detail"] or "",
            }
        )
    pictured_crashes = []
    for crash in crashes:
        owned = [
            x
            for x, h in enumerate(rows)
            if h["event"] != "expire"
            and (
                h["owner"] == crash["owner"]
                or holders.get((h["job_id"], h["token"])) == crash["owner"]
            )
        ]
        pictured_crashes.append(
            {
                "lane": lane(crash["owner"]),
                "x": (owned[-1] if owned else -1) + 0.5,
                "label": crash["label"],
            }
        )
    pictured_clocks = []
    for move in clocks:
        later = [x for x, h in enumerate(rows) if h["at"] >= move["to"] - 1e-9]
        pictured_clocks.append(
            {
                "x": (later[0] if later else len(rows)) - 0.5,
                "label": f"+{move['by']:g} s",
            }
        )
    return {
        "lanes": sorted(lanes, key=_lane_order),
        "slots": len(rows),
        "leases": leases,
        "marks": marks,
        "crashes": pictured_crashes,
        "clocks": pictured_clocks,
    }


def _lane_order(name: str) -> tuple[int, list[int], str]:
    """Worker slots in order (w0, w0.1, w1, ...), then recovery, then the rest."""
    if re.fullmatch(r"w\d+(\.\d+)?", name):
        return 0, [int(n) for n in name[1:].split(".")], name
    return (1 if name.startswith("recovery") else 2), [], name


def _lease_end(rows: Sequence[dict[str, Any]], x: int) -> int:
    """The row that ends the lease claimed at row ``x``: its release, expiry or failure,
    or the next claim of the job."""
    claim = rows[x]
    for later in range(x + 1, len(rows)):
        h = rows[later]
        if h["job_id"] != claim["job_id"]:
            continue
        if h["event"] == "claim" or (
            h["token"] == claim["token"]
            and (h["event"] in ("release", "expire") or h["to_state"] == "FAILED")
        ):
            return later
    return len(rows)
