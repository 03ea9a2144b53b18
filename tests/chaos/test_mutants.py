"""The harness catches every mutant: each broken variant fails the invariant it breaks.

A mutant (``docstokg_idem.harness.mutants``) is one deliberately wrong patch,
installed only in the worker and recovery processes. For each one a small
schedule, a crash at a chosen point or a tracer shows a violation of the
expected invariant, and the same experiment on the real code passes. Hand
schedules are written against named crash points of a reference run of the
real code, so that they keep their meaning when a crash point is added.
"""

from __future__ import annotations

import functools
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, find, settings

from docstokg_idem.core import close, connect, lease_next_job, plan_jobs, telemetry
from docstokg_idem.core import db as core_db
from docstokg_idem.core.clock import SharedClock, set_default_clock
from docstokg_idem.core.crashpoints import arm
from docstokg_idem.core.reconcile import reconcile_jobs
from docstokg_idem.harness import (
    Expected,
    Report,
    Violation,
    WorkerPool,
    World,
    check,
    run_schedule,
)
from docstokg_idem.harness.mutants import MUTANTS, apply
from docstokg_idem.harness.schedule import START_WALL
from docstokg_idem.harness.strategies import schedules
from docstokg_idem.pipeline import worker as worker_module
from docstokg_idem.pipeline.origin import Origin
from docstokg_idem.pipeline.worker import WorkerConfig, run_worker

pytestmark = pytest.mark.chaos

Step = list[Any]

#: One artifact of one byte: one chunk, so every run reaches the same points.
ONE_BYTE: dict[str, Any] = {"artifacts": {"a.pdf": 1}}
#: The same with one worker: after the schedule no second worker races the first.
SOLO: dict[str, Any] = {**ONE_BYTE, "workers": 1}
#: Three chunks, progress recorded after each: a stream that can be resumed.
STREAMED: dict[str, Any] = {
    "artifacts": {"a.pdf": 40_000},
    "worker_config": {"chunk_bytes": 16 * 1024, "progress_every_bytes": 1},
}
FORK = multiprocessing.get_context("fork")
CHILD_TIMEOUT_S = 60.0


# --- schedules written against named crash points -------------------------------------


@functools.cache
def _reference(world_json: str) -> tuple[str, ...]:
    """The crash points worker 0 reaches alone on the real code, in order."""
    outcome = run_schedule([["run", 0]] * 80, World(**json.loads(world_json)))
    return tuple(str(p) for w, p in outcome.trace if w == 0 and p is not None)


def _at(point: str, world: dict[str, Any] = ONE_BYTE) -> list[Step]:
    """Steps that leave worker 0 standing at the first ``point``."""
    points = _reference(json.dumps(world, sort_keys=True))
    return [["run", 0]] * (points.index(point) + 1)


def _before(point: str, world: dict[str, Any] = ONE_BYTE) -> list[Step]:
    """Steps that leave worker 0 at the crash point just before the first ``point``."""
    return _at(point, world)[:-1]


#: mutant -> (world, schedule, the invariant it must break)
SCHEDULED: dict[str, tuple[dict[str, Any], Callable[[], list[Step]], str]] = {
    "results_truncated": (SOLO, lambda: [], "I4"),
    "claim_ignores_live_lease": (ONE_BYTE, lambda: [["run", 0], ["run", 1]], "I6"),
    "token_reused": (SOLO, lambda: _at("claim.after_commit") + [["kill", 0]], "I6"),
    "stale_lease_cleared_unclaimable": (
        SOLO,
        lambda: _at("claim.after_commit") + [["kill", 0]],
        "I1",
    ),
    "renew_without_token": (
        SOLO,
        lambda: _at("stream.after_chunk") + [["clock", 11]],
        "I7",
    ),
    "finalize_without_fence": (
        SOLO,
        lambda: _before("finalize.before_replace") + [["clock", 11]],
        "I7",
    ),
    "index_outside_transaction": (
        SOLO,
        lambda: _at("index.after_record") + [["kill", 0]],
        "I3",
    ),
    "shared_part_file": (
        STREAMED,
        lambda: _at("stream.after_progress", STREAMED) + [["kill", 0], ["clock", 11]],
        "I9",
    ),
}

#: Mutants no schedule can show after recovery, each with its own test below.
ELSEWHERE = {"op_done_before_effect", "ttl0_no_expiry", "no_dir_fsync"}


def test_every_mutant_has_a_test() -> None:
    """Each registered mutant is caught by a test of this module."""
    assert set(SCHEDULED) | ELSEWHERE == set(MUTANTS)


def test_unknown_mutant_lists_the_known_ones() -> None:
    """apply() of an unknown name raises ValueError naming it and every known mutant."""
    with pytest.raises(ValueError, match="'no_such_bug' is not known") as info:
        apply("no_such_bug")
    assert all(name in str(info.value) for name in MUTANTS)


def test_apply_patches_only_the_calling_process() -> None:
    """A mutant applied in a child leaves the parent's queries untouched."""
    before = dict(core_db._QUERIES)
    proc = FORK.Process(target=_apply_and_check, args=("claim_ignores_live_lease",))
    proc.start()
    proc.join(CHILD_TIMEOUT_S)
    assert proc.exitcode == 0
    assert core_db._QUERIES == before


def _apply_and_check(name: str) -> None:
    apply(name)
    os._exit(0 if "1 = 1" in core_db._QUERIES["claim"] else 3)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_applies(name: str) -> None:
    """Each mutant finds what it patches (a child that fails to apply it exits 1)."""
    proc = FORK.Process(target=_apply_only, args=(name,))
    proc.start()
    proc.join(CHILD_TIMEOUT_S)
    assert proc.exitcode == 0


def _apply_only(name: str) -> None:
    try:
        apply(name)
    except Exception as exc:
        print(f"mutant {name!r} does not apply: {exc}")
        os._exit(1)
    os._exit(0)


@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_schedule_catches_mutant(name: str, tmp_path: Path) -> None:
    """A short schedule breaks the mutant's invariant; on the real code it passes."""
    world, build, invariant = SCHEDULED[name]
    schedule = build()

    broken = run_schedule(schedule, World(mutant=name, **world), workdir=tmp_path / "m")
    assert invariant in broken.report.broken(), broken.describe()

    real = run_schedule(schedule, World(**world), workdir=tmp_path / "real")
    assert real.ok, real.describe()


# --- crashes at a chosen point, checked before recovery -------------------------------


def _pool_killed_at(point: str, mutant: str | None, root: Path) -> Report:
    """One worker killed at ``point``; the checker looks before anyone recovers."""
    root.mkdir()
    with Origin({"a.pdf": 1}) as origin:
        db_path, out = root / "jobs.db", root / "files"
        clock = SharedClock(root / "clock", start=START_WALL)
        cx = connect(db_path, clock=clock)
        ids = plan_jobs(
            cx, [{"work_id": "W1", "artifact_id": "a", "url": origin.url("a.pdf")}]
        )
        close(cx)
        faults = {0: [{"point": point, "action": "kill"}]}
        with WorkerPool(
            db_path,
            out,
            workers=1,
            clock=clock,
            faults=faults,
            mutant=mutant,
            log_dir=root / "logs",
        ) as pool:
            crashed = pool.run_until_crash()
        assert crashed is not None and crashed.exitcode == -9
        want = origin.expected("a.pdf")
        expected = {ids[0]: Expected(want.size, want.sha256)}
        return check(
            db_path, out, expected=expected, after_reconcile=False, skip=("I1",)
        )


def test_op_done_before_effect_leaves_finalized_job_without_file(
    tmp_path: Path,
) -> None:
    """A crash between FINALIZE's early record and its rename leaves no file (I2)."""
    broken = _pool_killed_at(
        "finalize.before_replace", "op_done_before_effect", tmp_path / "m"
    )
    assert "I2" in broken.broken(), str(broken)

    real = _pool_killed_at("finalize.before_replace", None, tmp_path / "real")
    assert real.ok, str(real)


# --- C01: a TTL of zero ---------------------------------------------------------------


def _claim_with_ttl0(db_path: str, clock_file: str, mutant: str | None) -> None:
    """Claim with TTL 0, then die by SIGKILL right after the claim commits."""
    set_default_clock(SharedClock(clock_file))
    if mutant:
        apply(mutant)
    arm([{"point": "claim.after_commit", "action": "kill"}])
    cx = connect(db_path)
    lease_next_job(cx, owner="first", ttl_s=0)
    os._exit(5)  # not reached: the crash point kills


def _recover(config: WorkerConfig, clock_file: str, mutant: str | None) -> None:
    """Reconcile, run a fresh worker to the end, reconcile again (as run_schedule)."""
    set_default_clock(SharedClock(clock_file))
    if mutant:
        apply(mutant)
    cx = connect(config.db_path)
    reconcile_jobs(cx, config.out_dir)
    run_worker(config)
    reconcile_jobs(cx, config.out_dir)
    close(cx)
    os._exit(0)


def _run_child(target: Callable[..., None], *args: Any) -> int | None:
    proc = FORK.Process(target=target, args=args)
    proc.start()
    proc.join(CHILD_TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"{target.__name__} still running after {CHILD_TIMEOUT_S}s")
    return proc.exitcode


def _ttl0_experiment(root: Path, mutant: str | None) -> Report:
    root.mkdir()
    db_path, out, clock_file = root / "jobs.db", root / "files", root / "clock"
    clock = SharedClock(clock_file, start=START_WALL)
    with Origin({"a.pdf": 1}) as origin:
        cx = connect(db_path, clock=clock)
        ids = plan_jobs(
            cx, [{"work_id": "W1", "artifact_id": "a", "url": origin.url("a.pdf")}]
        )
        close(cx)
        assert _run_child(_claim_with_ttl0, str(db_path), str(clock_file), mutant) == -9

        clock.advance(1.0)
        config = WorkerConfig(
            out_dir=str(out), db_path=str(db_path), owner="second", lease_ttl_s=10.0
        )
        assert _run_child(_recover, config, str(clock_file), mutant) == 0
        want = origin.expected("a.pdf")
    return check(db_path, out, expected={ids[0]: Expected(want.size, want.sha256)})


def test_ttl0_no_expiry_leaves_the_job_stuck(tmp_path: Path) -> None:
    """C01: TTL 0 read as 'no expiry': a killed claim strands its job (I1)."""
    broken = _ttl0_experiment(tmp_path / "m", "ttl0_no_expiry")
    assert "I1" in broken.broken(), str(broken)

    real = _ttl0_experiment(tmp_path / "real", None)
    assert real.ok, str(real)


# --- C10: a tracer of the rename and the folder fsync ---------------------------------


class _FsTracer:
    """Records renames, folder fsyncs and FINALIZE records of forked workers, in order.

    Installed in the test process before the workers fork, so every worker and
    the recovery process inherit it; each event is one ``O_APPEND`` write.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._sink: Callable[[dict[str, Any]], None] | None = None

    def log(self, **event: Any) -> None:
        os.write(self._fd, (json.dumps({"pid": os.getpid(), **event}) + "\n").encode())

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_fsync_dir, tracer = worker_module.fsync_dir, self

        class TracedOs:
            def __getattr__(self, name: str) -> Any:
                return getattr(os, name)

            def replace(self, src: Any, dst: Any) -> None:
                os.replace(src, dst)
                tracer.log(call="replace", dst=os.fspath(dst))

        def fsync_dir(folder: Any) -> None:
            real_fsync_dir(folder)
            self.log(call="fsync_dir", folder=os.fspath(folder))

        def sink(event: dict[str, Any]) -> None:
            if event["action"] == "op_completed" and event.get("op") == "FINALIZE":
                self.log(call="finalize_recorded")

        monkeypatch.setattr(worker_module, "os", TracedOs())
        monkeypatch.setattr(worker_module, "fsync_dir", fsync_dir)
        telemetry.add_sink(sink)
        self._sink = sink

    def close(self) -> None:
        if self._sink is not None:
            telemetry.remove_sink(self._sink)
        os.close(self._fd)

    def violations(self) -> list[Violation]:
        """C10: each rename is followed by an fsync of its folder before the record."""
        found, pending = [], {}
        for line in self.path.read_text().splitlines():
            event = json.loads(line)
            pid, call = event["pid"], event["call"]
            if call == "replace":
                pending[pid] = event["dst"]
            elif call == "fsync_dir" and pending.get(pid, "").startswith(
                event["folder"]
            ):
                pending.pop(pid)
            elif call == "finalize_recorded" and pid in pending:
                found.append(
                    Violation(
                        "I2",
                        f"{pending.pop(pid)} was renamed into place "
                        "and FINALIZE recorded with no fsync of its "
                        "folder in between (C10)",
                    )
                )
        return found


@pytest.fixture(name="fs_tracer")
def _fs_tracer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_FsTracer]:
    tracer = _FsTracer(tmp_path / "fs-trace.jsonl")
    tracer.install(monkeypatch)
    yield tracer
    tracer.close()


def test_tracer_sees_no_dir_fsync(fs_tracer: _FsTracer, tmp_path: Path) -> None:
    """C10: the tracer reports a rename with no folder fsync; the real code has none."""
    world = {"artifacts": {"a.pdf": 1, "b.pdf": 1}}
    broken = run_schedule(
        [], World(mutant="no_dir_fsync", **world), workdir=tmp_path / "m"
    )
    assert broken.ok  # the database and the files alone cannot show it
    assert {v.invariant for v in fs_tracer.violations()} == {"I2"}

    fs_tracer.path.write_text("")
    real = run_schedule([], World(**world), workdir=tmp_path / "real")
    assert real.ok, real.describe()
    assert fs_tracer.violations() == []
    assert "replace" in fs_tracer.path.read_text()


# --- Hypothesis finds them too --------------------------------------------------------


def _search(
    mutant: str,
    invariant: str,
    root: Path,
    *,
    budget: int,
    shrink: bool,
    world: dict[str, Any] = SOLO,
    prefix: tuple[Step, ...] = (),
) -> list[Step]:
    """Let Hypothesis find the steps after ``prefix`` that break ``invariant``."""
    runs = itertools.count()

    def breaks(tail: list[Step]) -> bool:
        outcome = run_schedule(
            [*prefix, *tail],
            World(mutant=mutant, **world),
            workdir=root / f"run-{next(runs)}",
        )
        return invariant in outcome.report.broken()

    phases = [Phase.generate, Phase.shrink] if shrink else [Phase.generate]
    return find(
        schedules(workers=world.get("workers", 2), max_steps=12),
        breaks,
        settings=settings(
            max_examples=budget,
            phases=phases,
            database=None,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_hypothesis_finds_a_killed_claim(tmp_path: Path) -> None:
    """A small Hypothesis search finds a killed worker's job stranded (I1)."""
    found = _search(
        "stale_lease_cleared_unclaimable",
        "I1",
        tmp_path / "search",
        budget=60,
        shrink=False,
        world=ONE_BYTE,
    )
    assert any(kind == "kill" for kind, _ in found)
    assert run_schedule(found, World(**ONE_BYTE), workdir=tmp_path / "real").ok


#: Where Hypothesis starts searching: a whole job takes about 20 run steps, and
#: ``steps()`` draws a clock move for every other step, so a search from the
#: empty schedule rarely reaches FINALIZE or INDEX. These prefixes take worker 0
#: to the phase under test; Hypothesis finds the rest.
PREFIXES: dict[str, Callable[[], list[Step]]] = {
    "renew_without_token": lambda: _at("stream.after_chunk"),
    "finalize_without_fence": lambda: _before("finalize.before_replace"),
    "index_outside_transaction": lambda: _before("index.before_record"),
    "shared_part_file": lambda: _at("stream.after_open", STREAMED),
}


@pytest.mark.nightly
@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_hypothesis_finds_and_shrinks(name: str, tmp_path: Path) -> None:
    """Hypothesis finds each scheduled mutant and shrinks its steps to at most 5."""
    world, _, invariant = SCHEDULED[name]
    prefix = PREFIXES.get(name, list)()
    tail = _search(
        name,
        invariant,
        tmp_path / "search",
        budget=400,
        shrink=True,
        world=world,
        prefix=tuple(prefix),
    )
    assert len(tail) <= 5, tail
    assert run_schedule(prefix + tail, World(**world), workdir=tmp_path / "real").ok
