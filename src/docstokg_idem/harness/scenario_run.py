"""Running one scenario variant: the engine it needs, the checks, the result.

- **steps** (the default, :mod:`.scenario_steps`): free-running worker
  processes driven by explicit steps, then recovered;
- **schedule**: one ``schedule`` step (or a schedule drawn by Hypothesis),
  played by :func:`run_schedule` so that it replays to the same history;
- **untracked**: the gate off; the legacy downloader runs in worker processes
  and :func:`check_gate_off` checks I11;
- **core** (:mod:`.scenario_core`): API calls in this process.

Every engine ends with the exactly-once checker, restricted to the scenario's
invariants, and the scenario's expectations, and returns a
:class:`~.scenario_checks.RunResult` with the crash points reached, a text
timeline and the data of a timeline picture.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core import connect
from ..core.crashpoints import CRASH_POINTS
from ..core.db import close
from ..pipeline.origin import Origin
from .checker import Expected, check_gate_off
from .scenario_checks import (
    WAIT_S,
    WORK_ID,
    Facts,
    RunResult,
    ScenarioStepError,
    expectations,
    picture,
    read_rows,
    restrict,
)
from .scenario_core import CoreRun
from .scenario_format import Variant
from .scenario_steps import Probe, StepRun, probing

# --- entry point ----------------------------------------------------------------------


def run_variant(
    variant: Variant,
    workdir: str | os.PathLike[str],
    *,
    seed: int = 0,
    schedule: Sequence[Sequence[Any]] | None = None,
) -> RunResult:
    """Run one variant in ``workdir``; ``schedule`` overrides the scenario's steps."""
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    scenario = variant.scenario
    seed = scenario.seed if scenario.seed is not None else seed
    with probing(root) as probe:
        if scenario.kind == "core":
            result = CoreRun(variant, root).run()
        elif not variant.gate:
            result = _UntrackedRun(variant, root, seed, probe).run()
        elif schedule is not None or scenario.schedule is not None:
            chosen = schedule if schedule is not None else scenario.schedule
            assert chosen is not None
            result = _ScheduleRun(variant, root, seed, [list(s) for s in chosen]).run()
        else:
            result = StepRun(variant, root, seed, probe).run()
        result.points |= probe.reached()
    result.workdir = str(root)
    return result


# --- engine: one schedule through run_schedule ----------------------------------------


class _ScheduleRun:
    """One schedule played by :func:`run_schedule`, which replays it exactly."""

    def __init__(
        self, variant: Variant, root: Path, seed: int, schedule: list[list[Any]]
    ):
        self.v = variant
        self.s = variant.scenario
        self.root = root
        self.seed = seed
        self.schedule = schedule

    def run(self) -> RunResult:
        from .schedule import START_WALL, World, run_schedule

        s = self.s
        world = World(
            artifacts=dict(s.jobs),
            faults=s.origin_faults(),
            workers=s.workers,
            lease_ttl_s=s.lease_ttl,
            mutant=s.mutant,
            seed=self.seed,
            worker_config=s.worker_config(),
        )
        with Origin(dict(s.jobs), seed=self.seed, faults=s.origin_faults()) as origin:
            outcome = run_schedule(
                self.schedule, world, workdir=self.root, origin=origin
            )
            db, out = self.root / "jobs.db", self.root / "files"
            ids = {n: j for n, j in _read_ids(db).items() if n in s.jobs}
            crashes, clocks, exits = _from_trace(outcome.trace, START_WALL)
            facts = Facts(db, out, ids, origin, exits, self.root / "logs")
            unmet = expectations(s, facts)
        points = {p for _, p in outcome.trace if p in CRASH_POINTS}
        log = [
            f"schedule ({len(self.schedule)} steps): {json.dumps(self.schedule)}",
            "trace: " + " ".join(f"w{w}@{p}" for w, p in outcome.trace),
        ]
        return RunResult(
            self.v.name,
            restrict(outcome.report, s.invariants(True)),
            unmet,
            points=points,
            text_timeline=outcome.timeline,
            log=log,
            picture=picture(db, start=START_WALL, crashes=crashes, clocks=clocks),
            schedule=[list(x) for x in self.schedule],
        )


def _read_ids(db: Path) -> dict[str, str]:
    return {
        r["artifact_id"]: r["job_id"]
        for r in read_rows(db, "SELECT job_id, artifact_id FROM jobs")
    }


def _from_trace(
    trace: Sequence[tuple[int, str | None]], start: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[tuple[str, int | None]]]:
    """Crashes, clock moves and exits of a scheduled run, read from its trace."""
    crashes: list[dict[str, Any]] = []
    clocks: list[dict[str, Any]] = []
    exits: list[tuple[str, int | None]] = []
    at: dict[int, str | None] = {}
    now, generation = start, Counter[int]()
    for index, what in trace:
        what = what or ""
        if index < 0 and what.startswith("clock+"):
            by = float(what.removeprefix("clock+"))
            now += by
            clocks.append({"to": now, "by": by})
            continue
        owner = f"w{index}" + (f".{generation[index]}" if generation[index] else "")
        if what == "killed":
            crashes.append(
                {"owner": owner, "label": f"killed at {at.get(index) or 'start'}"}
            )
            exits.append((owner, -signal.SIGKILL))
            generation[index] += 1
        elif what.startswith("exit "):
            code = (
                int(what.split()[1]) if what.split()[1].lstrip("-").isdigit() else None
            )
            exits.append((owner, code))
            if code not in (0, None):
                crashes.append({"owner": owner, "label": f"exit {code}"})
                generation[index] += 1
        else:
            at[index] = what or None
    return crashes, clocks, exits


# --- engine: the gate off -------------------------------------------------------------


class _UntrackedRun:
    """The legacy downloader in worker processes; I11 checked with check_gate_off."""

    def __init__(self, variant: Variant, root: Path, seed: int, probe: Probe):
        self.v = variant
        self.s = variant.scenario
        self.root = root
        self.seed = seed
        self.probe = probe

    def run(self) -> RunResult:
        import multiprocess as mp

        from ..core.gate import idempotency_enabled
        from ..core.keys import job_key

        s = self.s
        db, out = self.root / "jobs.db", self.root / "files"
        assert not idempotency_enabled(self.v.gate)
        close(connect(db))  # the schema exists; the legacy path must leave it empty
        with Origin(dict(s.jobs), seed=self.seed, faults=s.origin_faults()) as origin:
            rows = [
                {"work_id": WORK_ID, "artifact_id": n, "url": origin.url(n)}
                for n in s.jobs
            ]
            ids = {
                r["artifact_id"]: job_key(WORK_ID, r["artifact_id"], r["url"])
                for r in rows
            }
            http = s.worker_config()["http"]
            ctx = mp.get_context("fork")
            procs = [
                ctx.Process(
                    target=_untracked_main,
                    args=(rows, str(out), http, (i, s.workers)),
                    daemon=True,
                )
                for i in range(s.workers)
            ]
            with self.probe.forking():
                for p in procs:
                    p.start()
            exits = [(f"w{i}", _join(p)) for i, p in enumerate(procs)]
            expected = {
                ids[n]: Expected(origin.expected(n).size, origin.expected(n).sha256)
                for n in s.jobs
            }
            report = check_gate_off(db, out, expected=expected)
            report.jobs = len(s.jobs)
            unmet = expectations(s, Facts(db, out, ids, origin, exits), tracked=False)
        log = [f"gate off: {s.workers} legacy workers, exits {[c for _, c in exits]}"]
        return RunResult(
            self.v.name,
            restrict(report, s.invariants(False)),
            unmet,
            text_timeline="(gate off: no history is written)",
            log=log,
            picture={
                "lanes": [],
                "slots": 0,
                "leases": [],
                "marks": [],
                "crashes": [],
                "clocks": [],
            },
        )


def _join(proc: Any) -> int | None:
    proc.join(WAIT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise ScenarioStepError(f"a legacy worker did not finish in {WAIT_S:.0f} s")
    return int(proc.exitcode) if proc.exitcode is not None else None


def _untracked_main(
    rows: list[dict[str, Any]], out: str, http: Any, shard: tuple[int, int]
) -> None:
    from ..pipeline.legacy import download_untracked

    download_untracked(rows, out, http=http, shard=shard)


__all__ = ["RunResult", "ScenarioStepError", "run_variant"]
