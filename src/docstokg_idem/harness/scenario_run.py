"""Running one scenario variant: workers, steps, recovery, checks, expectations.

Four engines, chosen by the scenario:

- **steps** (the default): real worker processes of a :class:`WorkerPool`
  run freely; explicit steps start, kill, pause (SIGSTOP), resume (SIGCONT),
  stop (SIGTERM) and restart them, move the shared fake clock and reconcile.
- **schedule**: one ``schedule`` step, played by :func:`run_schedule` so that
  it replays to the same history.
- **untracked**: the gate off; the legacy downloader runs in worker processes
  and :func:`check_gate_off` checks I11.
- **core**: ``kind: core``; calls to the core API in this process, on a fake
  clock.

Every engine ends with the exactly-once checker (restricted to the scenario's
invariants) and the scenario's expectations, and returns a :class:`RunResult`
with the crash points reached, a text timeline and the data of a timeline
picture.

Crash points reached by free-running workers are recorded by a hook installed
in this process before the workers are forked (the pool forks them, so they
inherit it); the same hook can make one worker stop itself (SIGSTOP) at a crash
point, or fail a write with ENOSPC there, for the ``pause`` step and
``disk_full``. Scheduled workers replace the hook with the scheduler's, which
reports each point through the pool's trace.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import connect, plan_jobs
from ..core.clock import SharedClock, set_default_clock
from ..core.crashpoints import CRASH_POINTS, set_hook
from ..core.db import close
from ..core.files import list_finals, list_parts
from ..core.jobs import expire_owner_leases
from ..core.reconcile import reconcile_jobs
from ..pipeline.origin import Origin
from .checker import Expected, Report, Violation, check, check_gate_off, timeline
from .scenario_format import Bound, Scenario, Step, Variant

#: Bounds every wait on a worker process.
WAIT_S = 60.0
#: Recovery workers run again after a retry backoff at most this often.
RECOVERY_ROUNDS = 6
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


# --- the coverage and injection hook ---------------------------------------------------


@dataclass
class _Plan:
    """Something a forked worker does at the ``hit``-th time it reaches ``point``.

    Hits count from the start of the worker's process.
    """

    point: str
    hit: int
    action: str  # "pause" (SIGSTOP itself) or "disk_full" (raise ENOSPC)


class _Probe:
    """The crash point hook of a run; forked workers inherit it with their plans.

    In this process it only records the points reached. In a worker it also
    carries out the plans given at fork, and those the controller writes later
    into the worker's plan file (read when the file changes), which is how a
    paused worker is resumed until another point.
    """

    def __init__(self, path: Path):
        self.parent = os.getpid()
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.seen: set[str] = set()
        self.plans: list[_Plan] = []
        self.plan_file: str | None = None
        self.plan_stamp: float | None = None
        self.later: list[_Plan] = []
        self.hits: Counter[str] = Counter()

    def __call__(self, point: str) -> None:
        if point not in self.seen:
            self.seen.add(point)
            os.write(self.fd, f"{point}\n".encode())
        if os.getpid() == self.parent:
            return
        self.hits[point] += 1
        for plan in [*self.plans, *self._later()]:
            if plan.point == point and plan.hit == self.hits[point]:
                if plan.action == "pause":
                    os.kill(os.getpid(), signal.SIGSTOP)
                else:
                    raise OSError(errno.ENOSPC, "No space left on device (injected by the "
                                                f"scenario at {point}, hit {plan.hit})")

    def _later(self) -> list[_Plan]:
        if self.plan_file is None:
            return []
        try:
            stamp = os.stat(self.plan_file).st_mtime_ns
        except FileNotFoundError:
            return []
        if stamp != self.plan_stamp:
            self.plan_stamp = stamp
            with open(self.plan_file, encoding="utf-8") as f:
                self.later = [_Plan(**p) for p in json.load(f)]
        return self.later

    @contextmanager
    def forking(self, plans: Sequence[_Plan] = (), plan_file: Path | None = None
                ) -> Iterator[None]:
        """Give the next forked process these plans and this plan file."""
        self.plans, self.plan_file = list(plans), str(plan_file) if plan_file else None
        try:
            yield
        finally:
            self.plans, self.plan_file = [], None

    def reached(self) -> set[str]:
        return {p for p in self.path.read_text().split() if p in CRASH_POINTS}

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def _probing(root: Path) -> Iterator[_Probe]:
    probe = _Probe(root / "points.txt")
    set_hook(probe)
    try:
        yield probe
    finally:
        set_hook(None)
        probe.close()


# --- entry point -----------------------------------------------------------------------


def run_variant(variant: Variant, workdir: str | os.PathLike[str], *, seed: int = 0,
                schedule: Sequence[Sequence[Any]] | None = None) -> RunResult:
    """Run one variant in ``workdir``; ``schedule`` overrides the scenario's steps."""
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    scenario = variant.scenario
    seed = scenario.seed if scenario.seed is not None else seed
    with _probing(root) as probe:
        if scenario.kind == "core":
            result = _CoreRun(variant, root).run()
        elif not variant.gate:
            result = _UntrackedRun(variant, root, seed, probe).run()
        elif schedule is not None or scenario.schedule is not None:
            chosen = schedule if schedule is not None else scenario.schedule
            assert chosen is not None
            result = _ScheduleRun(variant, root, seed, [list(s) for s in chosen]).run()
        else:
            result = _StepRun(variant, root, seed, probe).run()
        result.points |= probe.reached()
    result.workdir = str(root)
    return result


# --- shared pieces -----------------------------------------------------------------------


def _plan(db_path: Path, origin: Origin | None, names: Sequence[str],
          clock: Any) -> dict[str, str]:
    """Plan one job per artifact; return artifact name -> job id."""
    cx = connect(db_path, clock=clock)
    try:
        rows = [{"work_id": WORK_ID, "artifact_id": n, "url": _url(origin, n)} for n in names]
        return dict(zip(names, plan_jobs(cx, rows)))
    finally:
        close(cx)


def _url(origin: Origin | None, name: str) -> str:
    return origin.url(name) if origin is not None else f"http://127.0.0.1/a/{name}"


def _expected(origin: Origin, ids: dict[str, str]) -> dict[str, Expected]:
    out = {}
    for name, job_id in ids.items():
        want = origin.expected(name)
        out[job_id] = Expected(want.size, want.sha256, origin.counters(name)["full_gets"],
                               want.version)
    return out


def _restrict(report: Report, invariants: Sequence[str]) -> Report:
    """Keep the checks and violations of the scenario's invariants only."""
    keep = set(invariants)
    return Report(violations=[v for v in report.violations if v.invariant in keep],
                  checked=[c for c in report.checked if c in keep], jobs=report.jobs)


def _read_rows(db_path: Path, sql: str) -> list[dict[str, Any]]:
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
class _Facts:
    """What the expectations are checked against."""

    db_path: Path
    out: Path
    ids: dict[str, str]
    origin: Origin | None = None
    exits: list[tuple[str, int | None]] = field(default_factory=list)
    log_dir: Path | None = None


#: Expectations about job rows, which a run with the gate off never writes.
TRACKED_EXPECTATIONS = ("states", "claims_per_job", "renewals", "lease_lost")


def _expectations(scenario: Scenario, facts: _Facts, *, tracked: bool = True) -> list[str]:
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

    jobs = _read_rows(facts.db_path, "SELECT job_id, state FROM jobs")
    history = _read_rows(facts.db_path, "SELECT job_id, event FROM history")
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
            unmet.append(f"expect.files.absent: {name} has a final file "
                         f"{finals[facts.ids[name]].name}")
    if "parts" in expect:
        bound("parts", expect["parts"], len(list_parts(facts.out)), "part files")
    if "crashes" in expect:
        crashed = [f"{o} ({c})" for o, c in facts.exits if c not in (None, 0)]
        bound("crashes", expect["crashes"], len(crashed),
              "crashed workers" + (f" [{', '.join(crashed)}]" if crashed else ""))
    if "claims_per_job" in expect:
        claims = Counter(h["job_id"] for h in history if h["event"] == "claim")
        b = Bound.parse(expect["claims_per_job"])
        names = {v: k for k, v in facts.ids.items()}
        for job_id, name in names.items():
            if not b.holds(claims.get(job_id, 0)):
                unmet.append(f"expect.claims_per_job: wanted {b} claims of each job, "
                             f"{name} was claimed {claims.get(job_id, 0)} times")
    if "renewals" in expect:
        bound("renewals", expect["renewals"],
              sum(1 for h in history if h["event"] == "renew"), "lease renewals")
    if "lease_lost" in expect:
        bound("lease_lost", expect["lease_lost"], _lease_lost(facts.log_dir),
              "refused writes (lease_lost events)")
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


def _origin_rules(rules: Sequence[dict[str, Any]], facts: _Facts) -> list[str]:
    if facts.origin is None:
        return []
    unmet = []
    for rule in rules:
        names = [rule["artifact"]] if "artifact" in rule else list(facts.ids)
        for name in names:
            value = _counter(facts.origin.counters(name), rule["counter"])
            b = Bound(rule.get("min", 0), rule.get("max"))
            if not b.holds(value):
                unmet.append(f"expect.origin: wanted {b} {rule['counter']} of {name}, "
                             f"got {value}")
    return unmet


def _counter(counters: dict[str, Any], name: str) -> int:
    if name == "gets":
        return int(counters["methods"].get("GET", 0))
    if name == "heads":
        return int(counters["methods"].get("HEAD", 0))
    return int(counters[name])


# --- timeline pictures ---------------------------------------------------------------


def picture(db_path: Path, *, start: float, crashes: Sequence[dict[str, Any]] = (),
            clocks: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The data of a timeline picture: lanes per worker, leases, marks, crashes, clock.

    The x axis is the order of history rows (fake time often stands still);
    each row keeps its fake time in seconds from the start. A crash is placed
    after the last row its worker wrote; a clock move before the first row at
    or after the new time.
    """
    rows = _read_rows(db_path, "SELECT * FROM history ORDER BY seq")
    holders = {(h["job_id"], h["token"]): h["owner"] for h in rows if h["event"] == "claim"}
    jobs = {job: f"j{i}" for i, job in enumerate(dict.fromkeys(h["job_id"] for h in rows))}
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
            leases.append({"lane": lane(who), "job": jobs[h["job_id"]], "token": h["token"],
                           "x0": x, "x1": _lease_end(rows, x), "until": h["lease_until"]})
        marks.append({"lane": lane(who), "x": x, "t": round(h["at"] - start, 3),
                      "event": h["event"], "label": label, "job": jobs[h["job_id"]],
                      "detail": h["detail"] or ""})
    pictured_crashes = []
    for crash in crashes:
        owned = [x for x, h in enumerate(rows) if h["owner"] == crash["owner"] or
                 holders.get((h["job_id"], h["token"])) == crash["owner"]
                 and h["event"] in ("state", "renew", "release")]
        pictured_crashes.append({"lane": lane(crash["owner"]), "x": (owned[-1] if owned
                                                                     else -1) + 0.5,
                                 "label": crash["label"]})
    pictured_clocks = []
    for move in clocks:
        later = [x for x, h in enumerate(rows) if h["at"] >= move["to"] - 1e-9]
        pictured_clocks.append({"x": (later[0] if later else len(rows)) - 0.5,
                                "label": f"+{move['by']:g} s"})
    return {"lanes": lanes, "slots": len(rows), "leases": leases, "marks": marks,
            "crashes": pictured_crashes, "clocks": pictured_clocks}


def _lease_end(rows: Sequence[dict[str, Any]], x: int) -> int:
    """The row that ends the lease claimed at row ``x``: its release, expiry or failure,
    or the next claim of the job."""
    claim = rows[x]
    for later in range(x + 1, len(rows)):
        h = rows[later]
        if h["job_id"] != claim["job_id"]:
            continue
        if h["event"] == "claim" or (h["token"] == claim["token"] and (
                h["event"] in ("release", "expire") or h["to_state"] == "FAILED")):
            return later
    return len(rows)


# --- engine: explicit steps over free-running workers -----------------------------------


class _StepRun:
    """Real worker processes driven by explicit steps, then recovered and checked."""

    def __init__(self, variant: Variant, root: Path, seed: int, probe: _Probe):
        self.v, self.s, self.root, self.seed, self.probe = variant, variant.scenario, root, \
            seed, probe
        self.db, self.out = root / "jobs.db", root / "files"
        self.exits: list[tuple[str, int | None]] = []
        self.paused: set[int] = set()
        self.started: set[int] = set()
        self.crashes: list[dict[str, Any]] = []
        self.clocks: list[dict[str, Any]] = []
        self.log: list[str] = []

    def run(self) -> RunResult:
        from .pool import WorkerPool

        s = self.s
        with Origin(dict(s.jobs), seed=self.seed, faults=s.origin_faults()) as origin:
            self.clock = SharedClock(self.root / "clock", start=s.clock_start)
            self.ids = _plan(self.db, origin, list(s.jobs), self.clock)
            faults = {i: [c.fault() for c in self.v.crashes if c.worker in (None, i)]
                      for i in range(s.workers)}
            self.pool = WorkerPool(self.db, self.out, workers=s.workers, clock=self.clock,
                                   lease_ttl_s=s.lease_ttl, faults=faults, mutant=s.mutant,
                                   start_method="fork", log_dir=self.root / "logs",
                                   config=s.worker_config())
            with self.pool:
                for step in s.steps or [Step("run", {"until": "idle", "workers": None}, "")]:
                    try:
                        self.do(step)
                    except ScenarioStepError as exc:
                        exc.add_note(f"step at {step.where}")
                        raise
                if s.recover:
                    self.recover()
                else:
                    self.finish()
            expected = _expected(origin, self.ids)
            report = check(self.db, self.out, expected=expected, now=self.clock.wall())
            facts = _Facts(self.db, self.out, self.ids, origin, self.exits, self.root / "logs")
            unmet = _expectations(s, facts)
        return RunResult(
            self.v.name, _restrict(report, s.invariants(True)), unmet,
            text_timeline=timeline(self.db), log=self.log,
            picture=picture(self.db, start=s.clock_start, crashes=self.crashes,
                            clocks=self.clocks))

    # --- steps ---

    def do(self, step: Step) -> None:
        handler: Callable[[Any], None] = getattr(self, f"step_{step.kind}")
        handler(step.arg)

    def step_run(self, arg: dict[str, Any]) -> None:
        targets = arg["workers"] if arg["workers"] is not None else range(self.s.workers)
        for i in targets:
            if i not in self.started:
                self.start(i)
        crashed = self.wait(list(targets), until_crash=arg["until"] == "crash")
        who = "all workers" if arg["workers"] is None else f"workers {list(targets)}"
        codes = ", ".join(f"{w.owner} {w.exitcode}" for w in self.pool.workers
                          if w.index in targets and w.exitcode is not None)
        self.log.append(f"run {who} until {arg['until']}"
                        + (f": {crashed} crashed" if crashed else "")
                        + (f" (exit codes: {codes})" if codes else ""))

    def step_crash(self, index: int) -> None:
        w = self.pool.workers[index]
        if not self.running(index, "crash"):
            return
        self.pool.kill(index)
        self.paused.discard(index)
        self.exited(index, "SIGKILL by a crash step")
        self.log.append(f"crash worker {index} ({w.owner}) with SIGKILL")

    def step_clock(self, seconds: float) -> None:
        self.clock.advance(float(seconds))
        self.clocks.append({"to": self.clock.wall(), "by": float(seconds)})
        self.log.append(f"clock +{seconds:g} s")

    def step_pause(self, arg: dict[str, Any]) -> None:
        index = arg["worker"]
        if "at" in arg:
            self.start(index, [_Plan(arg["at"], arg.get("hit", 1), "pause")])
            self.hold(index, arg["at"], arg.get("hit", 1), "pause")
            return
        if not self.running(index, "pause"):
            return
        self.pool.pause(index)
        self.paused.add(index)
        self.log.append(f"pause worker {index} (SIGSTOP) wherever it is")

    def step_resume(self, arg: dict[str, Any]) -> None:
        index = arg["worker"]
        if index not in self.paused:
            self.running(index, "resume")
            if self.pool.workers[index].alive:
                raise ScenarioStepError(f"resume: worker {index} is running, not paused")
            return
        until = arg.get("until")
        if until:
            plans = [{"point": until, "hit": arg.get("hit", 1), "action": "pause"}]
            self.plan_file(index).write_text(json.dumps(plans), encoding="utf-8")
        self.pool.resume(index)
        self.paused.discard(index)
        if until:
            self.hold(index, until, arg.get("hit", 1), "resume")
        else:
            self.log.append(f"resume worker {index} (SIGCONT)")

    def step_stop(self, index: int) -> None:
        if not self.running(index, "stop"):
            return
        os.kill(self.pool.workers[index].process.pid, signal.SIGTERM)
        held = " (delivered when it resumes)" if index in self.paused else ""
        self.log.append(f"stop worker {index} (SIGTERM: keep progress, release){held}")

    def running(self, index: int, what: str) -> bool:
        """Whether worker ``index`` runs; a step on a dead worker does nothing, and says so."""
        w = self.pool.workers[index]
        if w.alive and not w.process.is_alive():
            _reap(self.pool, w)  # it exited on its own since the last step
            self.exited(index, None)
        if w.alive:
            return True
        self.log.append(f"{what} worker {index}: not running ({w.owner} exited with "
                        f"{w.exitcode}); nothing to do")
        return False

    def plan_file(self, index: int, generation: int | None = None) -> Path:
        """Where the controller writes later plans for the process in slot ``index``."""
        folder = self.root / "plans"
        folder.mkdir(exist_ok=True)
        if generation is None:
            generation = self.pool.workers[index].generation
        return folder / f"slot{index}-{generation}.json"

    def hold(self, index: int, point: str, hit: int, what: str) -> None:
        """Wait until worker ``index`` stops itself at ``point`` (or exits first)."""
        how = f"{what} worker {index} {'at' if what == 'pause' else 'until'} {point} (hit {hit})"
        if self.wait_stopped(index):
            self.paused.add(index)
            self.log.append(f"{how}: held there (SIGSTOP)")
            return
        self.wait([index], until_crash=False)
        w = self.pool.workers[index]
        self.log.append(f"{how}: it exited with {w.exitcode} before reaching it")

    def step_restart(self, arg: dict[str, Any]) -> None:
        index = arg["worker"]
        if self.pool.workers[index].alive:
            raise ScenarioStepError(f"restart: worker {index} is still running; crash it "
                                    "or let it finish first")
        faults = [{"point": c["point"], "action": c.get("action", "kill"),
                   "hit": c.get("hit", 1), "worker": None, "arg": c.get("arg", 0.0)}
                  for c in arg.get("crashes", [])]
        next_plans = self.plan_file(index, self.pool.workers[index].generation + 1)
        with self.probe.forking(plan_file=next_plans):
            self.pool.restart(index, faults=faults)
        self.started.add(index)
        self.log.append(f"restart worker {index} as {self.pool.workers[index].owner}")

    def step_reconcile(self, _: Any) -> None:
        self.with_db(lambda cx: reconcile_jobs(cx, self.out))
        self.log.append("reconcile")

    def step_expire_dead(self, _: Any) -> None:
        ended = self.expire_dead()
        self.log.append(f"expire the leases of dead workers ({ended} ended)")

    # --- helpers ---

    def start(self, index: int, plans: Sequence[_Plan] = ()) -> None:
        if index in self.started:
            raise ScenarioStepError(f"worker {index} was started before; use `restart` to "
                                    "start a new process in its slot")
        disk = self.s.disk_full
        if disk and disk.get("worker", 0) == index:
            plans = [*plans, _Plan(disk["at"], disk.get("hit", 1), "disk_full")]
        with self.probe.forking(plans, self.plan_file(index)):
            self.pool.start(index)
        self.started.add(index)

    def wait(self, indexes: Sequence[int], *, until_crash: bool) -> str | None:
        from multiprocess.connection import wait

        deadline = time.monotonic() + WAIT_S
        while True:
            live = [w for w in self.pool.workers if w.index in indexes and w.alive
                    and w.index not in self.paused]
            if not live:
                return None
            ready = wait([w.process.sentinel for w in live],
                         timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ScenarioStepError(f"workers {[w.owner for w in live]} still run after "
                                        f"{WAIT_S:.0f} s")
            for w in live:
                if w.process.sentinel in ready:
                    _reap(self.pool, w)
                    self.exited(w.index, None)
                    if until_crash and w.exitcode not in (0, None):
                        return w.owner

    def exited(self, index: int, how: str | None) -> None:
        w = self.pool.workers[index]
        self.exits.append((w.owner, w.exitcode))
        if w.exitcode in (0, None):
            return
        armed = [c.point for c in self.v.crashes if c.worker in (None, index)]
        label = how or (f"killed at {armed[0]}" if armed and w.generation == 0 and
                        w.exitcode == -signal.SIGKILL else f"exit {w.exitcode}")
        self.crashes.append({"owner": w.owner, "label": label})

    def wait_stopped(self, index: int) -> bool:
        """True once the worker stopped itself; False if it exited first."""
        pid = self.pool.workers[index].process.pid
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            flags = os.WSTOPPED | os.WEXITED | os.WNOHANG | os.WNOWAIT
            info = os.waitid(os.P_PID, pid, flags)
            if info is not None:
                return bool(info.si_code == os.CLD_STOPPED)
            time.sleep(0.002)
        raise ScenarioStepError(f"worker {index} neither stopped nor exited in "
                                f"{WAIT_S:.0f} s")

    def with_db(self, fn: Callable[[Any], Any]) -> Any:
        cx = connect(self.db, clock=self.clock)
        try:
            return fn(cx)
        finally:
            close(cx)

    def dead_owners(self) -> list[str]:
        return sorted({o for o, code in self.exits if code not in (None, 0)})

    def expire_dead(self) -> int:
        return int(self.with_db(lambda cx: sum(
            expire_owner_leases(cx, owner=o, why="scenario: worker died")
            for o in self.dead_owners())))

    def finish(self) -> None:
        for index in sorted(self.paused):
            self.pool.resume(index)
        self.paused.clear()
        self.wait(range(self.s.workers), until_crash=False)

    def recover(self) -> None:
        """As the supervisor would: end dead leases, reconcile, fresh workers until
        nothing is left (waiting out retry backoffs on the fake clock), reconcile."""
        self.finish()
        self.expire_dead()
        self.with_db(lambda cx: reconcile_jobs(cx, self.out))
        for round_ in range(RECOVERY_ROUNDS):
            owner = "recovery" if round_ == 0 else f"recovery.{round_}"
            with self.probe.forking():
                code = _run_recovery_worker(self.s, self.db, self.out, self.clock.path,
                                            owner)
            self.exits.append((owner, code))
            wait = self.with_db(_backoff_left)
            if code != 0 or wait is None:
                break
            self.step_clock(round(wait + 0.001, 3))
        self.with_db(lambda cx: reconcile_jobs(cx, self.out))
        self.log.append(f"recovery: leases of {self.dead_owners() or 'no'} dead workers "
                        "ended, reconcile, fresh workers until done, reconcile")


def _backoff_left(cx: Any) -> float | None:
    """Seconds until the earliest retry, when every unfinished job waits out a backoff."""
    from ..core.jobs import counts

    snapshot = counts(cx)
    waiting = snapshot["total"] - snapshot["finished"]
    if waiting <= 0 or snapshot["next_retry_at"] is None or \
            snapshot["backing_off"] != waiting:
        return None
    return max(0.0, float(snapshot["next_retry_at"]) - cx.clock.wall())


def _reap(pool: Any, w: Any) -> None:
    """Record the exit of a pool worker whose process ended.

    The pool reaps only in its own waits, and ``multiprocess`` may already have
    reaped the process (any later ``Process.start`` does), so this joins
    instead of signalling (``pool.kill`` would raise ProcessLookupError).
    """
    w.process.join(WAIT_S)
    w.exitcode = w.process.exitcode
    w.at, w.ready, w.holds_lock = None, False, False
    if w.exitcode not in (0, None) and w.owner not in pool.dead_owners:
        pool.dead_owners.append(w.owner)


def _run_recovery_worker(s: Scenario, db: Path, out: Path, clock_path: str,
                         owner: str) -> int | None:
    import multiprocess as mp

    from ..pipeline.worker import WorkerConfig

    config = WorkerConfig(out_dir=str(out), db_path=str(db), owner=owner,
                          lease_ttl_s=s.lease_ttl, **s.worker_config())
    proc = mp.get_context("fork").Process(target=_recovery_main,
                                          args=(config, clock_path, s.mutant), daemon=True)
    proc.start()
    proc.join(WAIT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise ScenarioStepError(f"the recovery worker did not finish in {WAIT_S:.0f} s")
    return int(proc.exitcode) if proc.exitcode is not None else None


def _recovery_main(config: Any, clock_path: str, mutant: str | None) -> None:
    from ..pipeline.worker import run_worker

    set_default_clock(SharedClock(clock_path))
    if mutant:
        from . import mutants  # type: ignore[attr-defined]

        mutants.apply(mutant)
    run_worker(config)


# --- engine: one schedule through run_schedule ------------------------------------------


class _ScheduleRun:
    """One schedule played by :func:`run_schedule`, which replays it exactly."""

    def __init__(self, variant: Variant, root: Path, seed: int, schedule: list[list[Any]]):
        self.v, self.s, self.root, self.seed, self.schedule = variant, variant.scenario, \
            root, seed, schedule

    def run(self) -> RunResult:
        from .schedule import START_WALL, World, run_schedule

        s = self.s
        world = World(artifacts=dict(s.jobs), faults=s.origin_faults(), workers=s.workers,
                      lease_ttl_s=s.lease_ttl, mutant=s.mutant, seed=self.seed,
                      worker_config=s.worker_config())
        with Origin(dict(s.jobs), seed=self.seed, faults=s.origin_faults()) as origin:
            outcome = run_schedule(self.schedule, world, workdir=self.root, origin=origin)
            db, out = self.root / "jobs.db", self.root / "files"
            ids = {n: j for n, j in _read_ids(db).items() if n in s.jobs}
            crashes, clocks, exits = _from_trace(outcome.trace, START_WALL)
            facts = _Facts(db, out, ids, origin, exits, self.root / "logs")
            unmet = _expectations(s, facts)
        points = {p for _, p in outcome.trace if p in CRASH_POINTS}
        log = [f"schedule ({len(self.schedule)} steps): {json.dumps(self.schedule)}",
               "trace: " + " ".join(f"w{w}@{p}" for w, p in outcome.trace)]
        return RunResult(self.v.name, _restrict(outcome.report, s.invariants(True)), unmet,
                         points=points, text_timeline=outcome.timeline, log=log,
                         picture=picture(db, start=START_WALL, crashes=crashes,
                                         clocks=clocks),
                         schedule=[list(x) for x in self.schedule])


def _read_ids(db: Path) -> dict[str, str]:
    return {r["artifact_id"]: r["job_id"] for r in
            _read_rows(db, "SELECT job_id, artifact_id FROM jobs")}


def _from_trace(trace: Sequence[tuple[int, str | None]], start: float
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                           list[tuple[str, int | None]]]:
    """Crashes, clock moves and exits of a scheduled run, read from its trace."""
    crashes, clocks, exits = [], [], []
    now, at, generation = start, {}, Counter[int]()
    for index, what in trace:
        what = what or ""
        if index < 0 and what.startswith("clock+"):
            by = float(what.removeprefix("clock+"))
            now += by
            clocks.append({"to": now, "by": by})
            continue
        owner = f"w{index}" + (f".{generation[index]}" if generation[index] else "")
        if what == "killed":
            crashes.append({"owner": owner, "label": f"killed at {at.get(index) or 'start'}"})
            exits.append((owner, -signal.SIGKILL))
            generation[index] += 1
        elif what.startswith("exit "):
            code = int(what.split()[1]) if what.split()[1].lstrip("-").isdigit() else None
            exits.append((owner, code))
            if code not in (0, None):
                crashes.append({"owner": owner, "label": f"exit {code}"})
                generation[index] += 1
        else:
            at[index] = what or None
    return crashes, clocks, exits


# --- engine: the gate off ------------------------------------------------------------------


class _UntrackedRun:
    """The legacy downloader in worker processes; I11 checked with check_gate_off."""

    def __init__(self, variant: Variant, root: Path, seed: int, probe: _Probe):
        self.v, self.s, self.root, self.seed, self.probe = variant, variant.scenario, root, \
            seed, probe

    def run(self) -> RunResult:
        import multiprocess as mp

        from ..core.gate import idempotency_enabled
        from ..core.keys import job_key

        s = self.s
        db, out = self.root / "jobs.db", self.root / "files"
        assert not idempotency_enabled(self.v.gate)
        close(connect(db))  # the schema exists; the legacy path must leave it empty
        with Origin(dict(s.jobs), seed=self.seed, faults=s.origin_faults()) as origin:
            rows = [{"work_id": WORK_ID, "artifact_id": n, "url": origin.url(n)}
                    for n in s.jobs]
            ids = {r["artifact_id"]: job_key(WORK_ID, r["artifact_id"], r["url"])
                   for r in rows}
            http = s.worker_config()["http"]
            ctx = mp.get_context("fork")
            procs = [ctx.Process(target=_untracked_main, args=(rows, str(out), http,
                                                               (i, s.workers)), daemon=True)
                     for i in range(s.workers)]
            with self.probe.forking():
                for p in procs:
                    p.start()
            exits = [(f"w{i}", _join(p)) for i, p in enumerate(procs)]
            expected = {ids[n]: Expected(origin.expected(n).size, origin.expected(n).sha256)
                        for n in s.jobs}
            report = check_gate_off(db, out, expected=expected)
            report.jobs = len(s.jobs)
            unmet = _expectations(s, _Facts(db, out, ids, origin, exits), tracked=False)
        log = [f"gate off: {s.workers} legacy workers, exits {[c for _, c in exits]}"]
        return RunResult(self.v.name, _restrict(report, s.invariants(False)), unmet,
                         text_timeline="(gate off: no history is written)", log=log,
                         picture={"lanes": [], "slots": 0, "leases": [], "marks": [],
                                  "crashes": [], "clocks": []})


def _join(proc: Any) -> int | None:
    proc.join(WAIT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise ScenarioStepError(f"a legacy worker did not finish in {WAIT_S:.0f} s")
    return int(proc.exitcode) if proc.exitcode is not None else None


def _untracked_main(rows: list[dict[str, Any]], out: str, http: Any,
                    shard: tuple[int, int]) -> None:
    from ..pipeline.legacy import download_untracked

    download_untracked(rows, out, http=http, shard=shard)


# --- engine: calls to the core API -----------------------------------------------------------


class _CoreRun:
    """``kind: core``: API calls in this process on a fake clock, each checked."""

    def __init__(self, variant: Variant, root: Path):
        from ..core.clock import FakeClock

        self.v, self.s, self.root = variant, variant.scenario, root
        self.db, self.out = root / "jobs.db", root / "files"
        self.out.mkdir(parents=True, exist_ok=True)
        self.clock = FakeClock(start=self.s.clock_start)
        self.leases: dict[str, Any] = {}
        self.clocks: list[dict[str, Any]] = []
        self.log: list[str] = []
        self.unmet: list[str] = []

    def run(self) -> RunResult:
        self.cx = connect(self.db, clock=self.clock)
        try:
            self.ids = _plan_core(self.cx, list(self.s.jobs))
            self.order = list(self.ids.values())
            for call, where in self.s.api:
                self.call(call, where)
        finally:
            close(self.cx)
        report = check(self.db, self.out, now=self.clock.wall())
        unmet = self.unmet + _expectations(self.s, _Facts(self.db, self.out, self.ids))
        return RunResult(self.v.name, _restrict(report, self.s.invariants(True)), unmet,
                         text_timeline=timeline(self.db), log=self.log,
                         picture=picture(self.db, start=self.s.clock_start,
                                         clocks=self.clocks))

    def call(self, call: dict[str, Any], where: str) -> None:
        from ..core.errors import IdemError

        name = call["call"]
        shown = ", ".join(f"{k}={v!r}" for k, v in call.items()
                          if k not in ("call", "raises", "match", "returns", "is"))
        text = f"{name}({shown})"
        try:
            value = getattr(self, f"call_{name}")(call)
        except IdemError as exc:
            self.log.append(f"{text} -> raised {type(exc).__name__}")
            self.raised(call, where, text, exc)
            return
        self.log.append(f"{text} -> {_brief(value)}")
        if "raises" in call:
            self.unmet.append(f"{where}: {text} should raise {call['raises']}, but returned "
                              f"{_brief(value)}")
            return
        if "returns" in call and _plain(value) != call["returns"]:
            self.unmet.append(f"{where}: {text} returned {_brief(value)}, expected "
                              f"{call['returns']!r}")
        for key, want in call.get("is", {}).items():
            got = self.field(value, key)
            if got != want:
                self.unmet.append(f"{where}: {text} gave {key}={got!r}, expected {want!r}")

    def raised(self, call: dict[str, Any], where: str, text: str, exc: Exception) -> None:
        import re

        names = {c.__name__ for c in type(exc).__mro__}
        if call.get("raises") not in names:
            want = f"expected {call['raises']}" if "raises" in call else "expected no error"
            self.unmet.append(f"{where}: {text} raised {type(exc).__name__}: {exc} "
                              f"({want})")
        elif "match" in call and not re.search(call["match"], str(exc)):
            self.unmet.append(f"{where}: {text} raised {type(exc).__name__} as expected, "
                              f"but its message does not match {call['match']!r}: {exc}")

    def field(self, value: Any, key: str) -> Any:
        if not isinstance(value, Mapping):
            return None
        if key == "job":
            return self.order.index(value["job_id"]) if "job_id" in value else None
        return _plain(value.get("lease_owner" if key == "owner" else key))

    # --- calls ---

    def target(self, call: dict[str, Any]) -> tuple[str, str, int | None]:
        """Job id, owner and token of a call: from its lease, overridden by its keys."""
        lease = self.leases.get(call.get("lease", ""))
        job_id = self.order[call["job"]] if "job" in call else lease.job_id
        owner = call.get("owner") or (lease.lease_owner if lease else "w1")
        token = call["token"] if "token" in call else (lease.token if lease else None)
        return job_id, owner, token

    def call_plan(self, call: dict[str, Any]) -> int:
        again = _plan_core(self.cx, list(self.s.jobs))
        return sum(1 for k, v in again.items() if self.ids[k] == v)

    def call_claim(self, call: dict[str, Any]) -> Any:
        from ..core import lease_next_job

        lease = lease_next_job(self.cx, owner=call.get("owner", "w1"),
                               ttl_s=call.get("ttl", self.s.lease_ttl))
        if "as" in call:
            if lease is None:
                raise ScenarioStepError(f"claim as {call['as']!r} claimed nothing")
            self.leases[call["as"]] = lease
        return lease

    def call_renew(self, call: dict[str, Any]) -> Any:
        from ..core import renew_lease

        job_id, owner, token = self.target(call)
        lease = self.leases.get(call.get("lease", ""))
        ttl = call.get("ttl", lease.ttl_s if lease else self.s.lease_ttl)
        return renew_lease(self.cx, job_id=job_id, owner=owner, ttl_s=ttl, token=token,
                           strict=True)

    def call_release(self, call: dict[str, Any]) -> Any:
        from ..core import release_lease

        job_id, owner, token = self.target(call)
        return release_lease(self.cx, job_id=job_id, owner=owner, token=token, strict=True)

    def call_advance(self, call: dict[str, Any]) -> Any:
        from ..core import advance_state

        job_id, _, token = self.target(call)
        return advance_state(self.cx, job_id=job_id, to_state=call["to"],
                             allowed_from=call.get("from"), token=token)

    def call_fail(self, call: dict[str, Any]) -> Any:
        from ..core import fail_job

        job_id, _, token = self.target(call)
        return fail_job(self.cx, job_id=job_id, token=token,
                        reason=call.get("reason", "failed by the scenario"),
                        retryable=call.get("retryable", True)).value

    def call_state(self, call: dict[str, Any]) -> Any:
        from ..core import get_current_state

        job_id = self.target(call)[0] if "lease" in call else self.order[call.get("job", 0)]
        state = get_current_state(self.cx, job_id=job_id)
        return None if state is None else state.value

    def call_clock(self, call: dict[str, Any]) -> float:
        seconds = float(call["seconds"])
        if seconds >= 0:
            self.clock.advance(seconds)
        else:
            self.clock.move_to(self.clock.wall() + seconds)
        self.clocks.append({"to": self.clock.wall(), "by": seconds})
        return self.clock.wall() - self.s.clock_start

    def call_expire(self, call: dict[str, Any]) -> int:
        return expire_owner_leases(self.cx, owner=call["owner"], why="scenario")

    def call_reconcile(self, call: dict[str, Any]) -> int:
        return reconcile_jobs(self.cx, self.out).total()

    def call_connect(self, call: dict[str, Any]) -> bool:
        kind = call["database"]
        path = self.root / f"other-{kind}" / "jobs.db"
        if kind == "corrupt":
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"this is not a SQLite database, only some text " * 40)
        elif kind == "directory":
            path.mkdir(parents=True, exist_ok=True)
        other = connect(path, clock=self.clock)
        close(other)
        return True



def _plan_core(cx: Any, names: Sequence[str]) -> dict[str, str]:
    rows = [{"work_id": WORK_ID, "artifact_id": n, "url": _url(None, n)} for n in names]
    return dict(zip(names, plan_jobs(cx, rows)))


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _brief(value: Any) -> str:
    if value is None:
        return "None"
    if hasattr(value, "token") and hasattr(value, "lease_owner"):
        return (f"lease(owner={value.lease_owner!r}, token={value.token}, "
                f"state={value.state})")
    return repr(value)


def violation_lines(report: Report) -> list[str]:
    """The checker's violations, one block each."""
    return [str(v) for v in report.violations]


__all__ = ["RunResult", "ScenarioStepError", "Violation", "picture", "run_variant",
           "violation_lines"]
