"""Model test of the idempotency core: the real SQLite core against a tiny model.

A Hypothesis state machine drives the core on a file-backed WAL database and a
pure-Python model of it side by side: planning, claims by three owners, renew,
release, state changes, effects (some raise, some "crash" between start and
record, some outlast their lease), failures, clock moves in both directions and
the reconciler. After every step the database must hold what the model says,
and :func:`check_invariants` must find nothing wrong in the history table.

Time: a transaction's "now" is ``max(wall, highwater)``. The highwater is the
highest wall time a claim or the reconciler saw (``meta.wall_highwater``); the
model keeps its own and checks the database's against it. Claims and the
reconciler compare expiries with that "now" (C14: a wall clock moved backwards
cannot bring an expired lease back to life). Renew, release and every fenced
write hold a lease live only while ``lease_until > max(now, updated_at)``, so
an expiry written at a later wall time (a renew with TTL 0) stays in the past
when the wall clock moves back; an op in progress is held only while
``expires_at > max(now, started_at)``.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
)

from docstokg_idem import (
    CrashPointFired,
    FakeClock,
    InvalidTransition,
    JobState,
    LeaseLost,
    advance_state,
    canonical_json,
    canonical_url,
    cleanup_stale_leases,
    cleanup_stale_ops,
    close,
    connect,
    fail_job,
    get_effect_record,
    job_key,
    lease_next_job,
    op_key,
    plan_job_if_absent,
    plan_jobs,
    reconcile_jobs,
    release_lease,
    renew_lease,
    run_effect,
)
from docstokg_idem.core import crashpoints
from docstokg_idem.core.states import ACTIVE, DONE, REPAIR_EDGES, is_allowed

pytestmark = pytest.mark.unit

OWNERS = ("w1", "w2", "w3")
WORKS = ("W1", "W2")
ARTIFACTS = ("pdf", "xml")
LEASE_TTLS = (0, 1, 5, 30)
OP_TTLS = (0, 30, 300)
KINDS = ("HEAD", "STREAM", "FINALIZE")
THEN_STATE = {
    "HEAD": JobState.HEAD_DONE,
    "STREAM": None,
    "FINALIZE": JobState.FINALIZED,
}
MAX_ATTEMPTS = (2, 3)  # small, so that the attempt limit is reached
#: How the machine calls ``run_effect``; see :class:`_Call`.
STYLES = ("tracked", "lean", "atomic")
BACKOFF_S = 1.0  # the core's default
MAX_BACKOFF_S = 300.0


#: Whether a rule uses the job's live lease instead of the drawn handle.
FRESH = st.sampled_from([True, True, False])

#: Whether a renew or release names another owner than the lease's.
IMPOSTOR = st.sampled_from([False, False, False, True])

#: The way a healthy job goes, for the "next" state of the advance rule.
NEXT = {
    JobState.PLANNED: JobState.LEASED,
    JobState.LEASED: JobState.HEAD_DONE,
    JobState.HEAD_DONE: JobState.STREAMING,
    JobState.RESUME_OK: JobState.STREAMING,
    JobState.STREAMING: JobState.FINALIZED,
    JobState.FINALIZED: JobState.INDEXED,
    JobState.INDEXED: JobState.DEDUPED,
    JobState.FAILED: JobState.LEASED,
}


def _url(work: str, artifact: str) -> str:
    return f"https://example.org/{work}/{artifact}"


def _other(owner: str) -> str:
    return OWNERS[(OWNERS.index(owner) + 1) % len(OWNERS)]


# --- the invariant checker --------------------------------------------------------


@dataclass
class _HistLease:
    token: int
    owner: str | None
    until: float
    ended: bool = False


def _lease_ends_with(row: sqlite3.Row) -> bool:
    """Tell whether a history row also dropped the job's lease.

    Only ``fail_job`` and the attempt limit move a job to FAILED, and both clear
    the lease in the same write (``advance_state`` to FAILED is refused). The
    history has no explicit event for it.
    """
    return bool(row["event"] == "state" and row["to_state"] == JobState.FAILED.value)


def check_invariants(cx: sqlite3.Connection) -> list[str]:
    """Read the history, jobs and ops tables; return every broken invariant found.

    I5: each job's history is a chain (each event starts in the state the last
    one ended in) along allowed edges: ``EDGES`` for state changes, PLANNED or
    FAILED to LEASED (or no change) for claims, ``REPAIR_EDGES`` for repairs.
    I6: claim tokens of a job strictly increase, the job's current token is the
    last one claimed, and no claim happened while an earlier lease was live.
    I7: every renew, release and fenced state change carries the token of the
    job's live lease: not ended, and not expired at the event nor at the job's
    previous event (a lease whose expiry was written at a later wall time stays
    expired when the wall clock moves back); every op with a token names a
    token that was claimed for its job.
    I10: every lease and every op in progress has an expiry.
    A failure carries its reason (I1).
    """
    problems: list[str] = []
    state: dict[str, str] = {}
    lease: dict[str, _HistLease | None] = {}
    tokens: dict[str, list[int]] = {}
    last_at: dict[str, float] = {}  # the job row's updated_at, event by event

    for h in cx.execute("SELECT * FROM history ORDER BY seq").fetchall():
        job, what, at = h["job_id"], h["event"], h["at"]
        where = f"history seq {h['seq']} ({what} of job {job[:12]}, token {h['token']})"
        current = state.get(job, JobState.PLANNED.value)
        live = lease.get(job)
        since = last_at.get(job, at)
        last_at[job] = at
        if h["from_state"] is not None and h["from_state"] != current:
            problems.append(
                f"I5 {where}: starts in {h['from_state']}, job was in {current}"
            )

        if what == "claim":
            claimed = tokens.setdefault(job, [])
            if claimed and h["token"] <= claimed[-1]:
                problems.append(
                    f"I6 {where}: token not above earlier token {claimed[-1]}"
                )
            if live is not None and not live.ended and live.until > at:
                problems.append(
                    f"I6 {where}: claimed at {at} while token {live.token} was valid "
                    f"until {live.until}"
                )
            if h["to_state"] != h["from_state"] and not (
                h["from_state"] in ("PLANNED", "FAILED") and h["to_state"] == "LEASED"
            ):
                problems.append(
                    f"I5 {where}: claim moved {h['from_state']} -> {h['to_state']}"
                )
            claimed.append(h["token"])
            lease[job] = _HistLease(h["token"], h["owner"], h["lease_until"])
        elif what in ("renew", "release"):
            _check_fenced(problems, where, h, live, since)
            if live is not None and what == "renew":
                live.until = h["lease_until"]
            if live is not None and what == "release":
                live.ended = True
        elif what == "expire":
            if live is None or live.ended or live.token != h["token"]:
                problems.append(f"I6 {where}: expires a lease the job did not hold")
            elif live.until > at:
                problems.append(
                    f"I6 {where}: expired at {at}, before its end {live.until}"
                )
            if live is not None:
                live.ended = True
        elif what == "state":
            if not is_allowed(h["from_state"], h["to_state"]):
                problems.append(
                    f"I5 {where}: {h['from_state']} -> {h['to_state']} is no edge"
                )
            if h["token"] is not None:
                _check_fenced(problems, where, h, live, since)
            if h["to_state"] == JobState.FAILED.value and h["detail"] is None:
                problems.append(f"I1 {where}: failed without a reason")
            if live is not None and _lease_ends_with(h):
                live.ended = True
        elif what == "repair":
            source = JobState(h["from_state"])
            if REPAIR_EDGES.get(source) != JobState(h["to_state"]):
                problems.append(
                    f"I5 {where}: repair {h['from_state']} -> {h['to_state']}"
                )
        else:
            problems.append(f"{where}: unknown event")
        if h["to_state"] is not None:
            state[job] = h["to_state"]

    problems += _check_jobs(cx, state, lease, tokens)
    problems += _check_ops(cx, tokens)
    return problems


def _check_fenced(
    problems: list[str],
    where: str,
    h: sqlite3.Row,
    live: _HistLease | None,
    since: float,
) -> None:
    if live is None or live.ended:
        problems.append(f"I7 {where}: written while the job had no lease")
    elif live.token != h["token"]:
        problems.append(
            f"I7 {where}: stale token; the live lease has token {live.token}"
        )
    elif h["owner"] is not None and h["owner"] != live.owner:
        problems.append(
            f"I7 {where}: owner {h['owner']!r}, the lease is {live.owner!r}'s"
        )
    elif live.until <= max(h["at"], since):
        problems.append(
            f"I7 {where}: written at {h['at']} (job last written at {since}), "
            f"the lease ended at {live.until}"
        )


def _check_jobs(
    cx: sqlite3.Connection,
    state: dict[str, str],
    lease: dict[str, _HistLease | None],
    tokens: dict[str, list[int]],
) -> list[str]:
    problems = []
    for job in cx.execute("SELECT * FROM jobs").fetchall():
        jid = job["job_id"]
        where = f"job {jid[:12]}"
        if job["state"] != state.get(jid, JobState.PLANNED.value):
            problems.append(
                f"I5 {where}: in {job['state']}, its history ends in {state.get(jid)}"
            )
        last = tokens.get(jid, [0])[-1]
        if job["lease_token"] != last:
            problems.append(
                f"I6 {where}: token {job['lease_token']}, last claimed {last}"
            )
        if job["lease_owner"] is not None:
            if job["lease_until"] is None:
                problems.append(
                    f"I10 {where}: lease of {job['lease_owner']!r} has no expiry"
                )
            live = lease.get(jid)
            if live is None or live.ended:
                problems.append(f"I6 {where}: leased, but its history ended the lease")
    return problems


def _check_ops(cx: sqlite3.Connection, tokens: dict[str, list[int]]) -> list[str]:
    problems = []
    for op in cx.execute("SELECT * FROM ops").fetchall():
        where = (
            f"op {op['kind']} {op['op_key'][:12]} ({op['status']}, token {op['token']})"
        )
        if op["status"] == "IN_PROGRESS" and op["expires_at"] is None:
            problems.append(f"I10 {where}: in progress without an expiry")
        if op["token"] is not None and op["token"] not in tokens.get(op["job_id"], []):
            problems.append(
                f"I7 {where}: token was never claimed for job {op['job_id'][:12]}"
            )
    return problems


# --- the model ---------------------------------------------------------------------


@dataclass
class MJob:
    """What the model knows of one job row."""

    job_id: str
    max_attempts: int
    updated_at: float  #: the time of the row's last write
    state: str = JobState.PLANNED.value
    claimable: bool = True
    attempts: int = 0
    not_before: float = 0.0
    owner: str | None = None
    until: float | None = None
    token: int = 0
    failed_with_reason: bool = False

    def row(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "state": self.state,
            "claimable": int(self.claimable),
            "attempts": self.attempts,
            "not_before": self.not_before,
            "lease_owner": self.owner,
            "lease_until": self.until,
            "lease_token": self.token,
            "has_reason": self.failed_with_reason,
            "updated_at": self.updated_at,
        }


@dataclass
class MOp:
    """What the model knows of one op row."""

    job_id: str
    kind: str
    status: str
    token: int | None
    owner: str | None
    started_at: float
    expires_at: float
    result: bytes | None = None

    def row(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "status": self.status,
            "token": self.token,
            "owner": self.owner,
            "started_at": self.started_at,
            "expires_at": self.expires_at,
            "result": self.result if self.status == "SUCCEEDED" else None,
        }


@dataclass(frozen=True)
class Handle:
    """A lease a worker was handed; it stays in the bundle after it goes stale."""

    job_id: str
    owner: str
    token: int

    def __repr__(self) -> str:
        return f"Handle({self.job_id[:8]}, {self.owner}, token={self.token})"


HistoryRow = tuple[
    str, str | None, str | None, int | None, str | None, float, float | None
]


@dataclass
class Model:
    """The job table, the op ledger, the history and the highwater, as plain Python."""

    jobs: dict[str, MJob] = field(default_factory=dict)
    ops: dict[str, MOp] = field(default_factory=dict)
    history: dict[str, list[HistoryRow]] = field(default_factory=dict)
    highwater: float = 0.0  #: the highest wall time a claim or the reconciler saw

    def now(self, wall: float) -> float:
        """The time a transaction starting at ``wall`` reads and writes."""
        return max(wall, self.highwater)

    def see(self, wall: float) -> float:
        """A claim or reconcile transaction: raise the highwater; return its time."""
        self.highwater = self.now(wall)
        return self.highwater

    def log(
        self,
        job_id: str,
        what: str,
        at: float,
        *,
        from_state: str | None = None,
        to_state: str | None = None,
        token: int | None = None,
        owner: str | None = None,
        lease_until: float | None = None,
    ) -> None:
        row = (what, from_state, to_state, token, owner, at, lease_until)
        self.history.setdefault(job_id, []).append(row)
        # every write to a job row appends its history in the same transaction
        self.jobs[job_id].updated_at = at

    # leases
    def candidates(self, now: float) -> set[str]:
        return {
            j.job_id
            for j in self.jobs.values()
            if j.claimable and (j.until or 0) <= now and j.not_before <= now
        }

    def exhausted(self, job_id: str) -> bool:
        job = self.jobs[job_id]
        return job.attempts >= job.max_attempts

    def _expire_if_held(self, job: MJob, now: float) -> None:
        if job.owner is not None:
            self.log(
                job.job_id,
                "expire",
                now,
                from_state=job.state,
                token=job.token,
                owner=job.owner,
            )

    def fail_exhausted(self, job_id: str, now: float) -> None:
        job = self.jobs[job_id]
        self._expire_if_held(job, now)
        self.log(job_id, "state", now, from_state=job.state, to_state="FAILED")
        job.state, job.claimable, job.failed_with_reason = "FAILED", False, True
        job.owner = job.until = None

    def claim(self, job_id: str, owner: str, ttl: float, now: float) -> MJob:
        job = self.jobs[job_id]
        self._expire_if_held(job, now)
        before = job.state
        if job.state in ("PLANNED", "FAILED"):
            job.state = "LEASED"
        job.token += 1
        job.attempts += 1
        job.owner, job.until = owner, now + ttl
        self.log(
            job_id,
            "claim",
            now,
            from_state=before,
            to_state=job.state,
            token=job.token,
            owner=owner,
            lease_until=job.until,
        )
        return job

    def holds(
        self, job_id: str, token: int, now: float, owner: str | None = None
    ) -> bool:
        job = self.jobs[job_id]
        return (
            job.owner is not None
            and (owner is None or job.owner == owner)
            and job.token == token
            and job.until is not None
            and job.until > max(now, job.updated_at)
        )

    def renew(
        self, job_id: str, owner: str, token: int, ttl: float, now: float
    ) -> bool:
        if not self.holds(job_id, token, now, owner):
            return False
        job = self.jobs[job_id]
        job.until = now + ttl
        for op in self.ops.values():
            if op.job_id == job_id and op.status == "IN_PROGRESS" and op.token == token:
                op.expires_at = max(op.expires_at, job.until)
        self.log(job_id, "renew", now, token=token, owner=owner, lease_until=job.until)
        return True

    def release(self, job_id: str, owner: str, token: int, now: float) -> bool:
        if not self.holds(job_id, token, now, owner):
            return False
        job = self.jobs[job_id]
        job.owner = job.until = None
        self.log(
            job_id,
            "release",
            now,
            from_state=job.state,
            to_state=job.state,
            token=token,
            owner=owner,
        )
        return True

    # states
    def change_state(
        self, job_id: str, dst: str, token: int | None, now: float
    ) -> None:
        job = self.jobs[job_id]
        self.log(job_id, "state", now, from_state=job.state, to_state=dst, token=token)
        job.state = dst
        job.claimable = JobState(dst) in ACTIVE

    def advance(self, job_id: str, dst: str, token: int, now: float) -> bool:
        """``True`` if changed, ``False`` if already there; raises like the core."""
        if dst == JobState.FAILED.value:
            raise InvalidTransition("model: a failure goes through fail_job")
        if not self.holds(job_id, token, now):
            raise LeaseLost("model: stale token")
        job = self.jobs[job_id]
        if job.state == dst:
            return False
        if not is_allowed(job.state, dst):
            raise InvalidTransition("model: no such edge")
        self.change_state(job_id, dst, token, now)
        return True

    def fail(self, job_id: str, token: int, retryable: bool, now: float) -> JobState:
        if not self.holds(job_id, token, now):
            raise LeaseLost("model: stale token")
        job = self.jobs[job_id]
        if JobState(job.state) in DONE:
            raise InvalidTransition("model: a done job cannot fail")
        again = retryable and job.attempts < job.max_attempts
        delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** max(0, job.attempts - 1))
        self.log(
            job_id, "state", now, from_state=job.state, to_state="FAILED", token=token
        )
        job.state, job.claimable, job.failed_with_reason = "FAILED", again, True
        job.not_before = now + delay if again else 0.0
        job.owner = job.until = None
        return JobState.FAILED

    # the reconciler
    def cleanup_leases(self, now: float) -> int:
        # TODO: claims and the reconciler compare lease_until with "now" alone,
        # the fence with max(now, updated_at): a lease renewed with TTL 0 at a
        # later wall time, then the wall clock moved back, is dead for its holder
        # but not claimable, not cleared, and its ops in progress not abandoned
        # (I8) until the wall clock catches up. The model does what the core does.
        count = 0
        for job in self.jobs.values():
            if job.owner is not None and job.until is not None and job.until <= now:
                self._expire_if_held(job, now)
                job.owner = job.until = None
                count += 1
        return count

    def cleanup_ops(self, now: float) -> int:
        count = 0
        for op in self.ops.values():
            if op.status != "IN_PROGRESS":
                continue
            job = self.jobs.get(op.job_id)
            dead = op.token is not None and (
                job is None
                or job.token != op.token
                or job.owner is None
                or job.until is None
                or job.until <= now
            )
            if op.expires_at <= max(now, op.started_at) or dead:
                op.status = "ABANDONED"
                count += 1
        return count

    def repair_missing_finals(self, now: float) -> list[str]:
        """The folder is empty: each FINALIZED or INDEXED job goes back to HEAD_DONE."""
        repaired = []
        for job in self.jobs.values():
            source = JobState(job.state)
            if source not in REPAIR_EDGES:
                continue
            target = REPAIR_EDGES[source].value
            self.log(job.job_id, "repair", now, from_state=job.state, to_state=target)
            job.state, job.claimable = target, True
            for op in self.ops.values():
                redo = op.kind in ("STREAM", "FINALIZE", "INDEX")
                if op.job_id == job.job_id and redo and op.status != "ABANDONED":
                    op.status = "ABANDONED"
            repaired.append(job.job_id)
        return sorted(repaired)


# --- the state machine ---------------------------------------------------------------


class Boom(RuntimeError):
    """What a failing effect raises."""


#: The plans of :meth:`CoreMachine._start_effect` in which the effect runs.
_RUNS = ("run", "raise", "crash after effect", "crash after record")


@dataclass(frozen=True)
class _Call:
    """How the machine calls ``run_effect`` for one kind of op.

    ``tracked``: the default mode with ``then_state`` only. ``lean``: the
    options that save transactions: HEAD ``first_wins``, STREAM with
    ``start_state=STREAMING``, FINALIZE with ``then_release``. ``atomic``: the
    lean options of STREAM and FINALIZE, every kind in ``atomic`` mode.
    """

    kind: str
    style: str

    @property
    def mode(self) -> str:
        if self.style == "atomic":
            return "atomic"
        if self.style == "lean" and self.kind == "HEAD":
            return "first_wins"
        return "tracked"

    @property
    def start_state(self) -> JobState | None:
        lean = self.style != "tracked"
        return JobState.STREAMING if lean and self.kind == "STREAM" else None

    @property
    def then_state(self) -> JobState | None:
        return THEN_STATE[self.kind]

    @property
    def then_release(self) -> bool:
        return self.style != "tracked" and self.kind == "FINALIZE"

    @property
    def crash_point(self) -> str:
        # first_wins writes nothing before the effect: crash right after it;
        # atomic has no moment between start and record: crash after the record
        return {
            "tracked": "op.after_start",
            "first_wins": "op.after_effect",
            "atomic": "op.after_record",
        }[self.mode]

    def options(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "start_state": self.start_state,
            "then_state": self.then_state,
            "then_release": self.then_release,
        }


def _may_move(src: str, dst: JobState | None) -> bool:
    """Tell whether a job in ``src`` may be moved to ``dst`` (``None``: no move)."""
    return dst is None or src == dst.value or is_allowed(src, dst)


class CoreMachine(RuleBasedStateMachine):
    """Drives the core and :class:`Model` side by side and compares them.

    Each owner has its own connection; they share one fake clock. Leases end up
    in the ``leases`` bundle and stay there after they go stale, so that later
    rules write with stale tokens as often as with live ones.
    """

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="idem-model-"))
        self.staging = self.folder / "out"
        self.staging.mkdir()
        self.clock = FakeClock()
        db = self.folder / "jobs.db"
        self.cx = {
            name: connect(db, clock=self.clock) for name in (*OWNERS, "reconciler")
        }
        self.model = Model()
        self.effect_calls = 0

    def teardown(self) -> None:
        crashpoints.disarm()
        for cx in self.cx.values():
            close(cx)
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- reading the database's time and history

    def now(self) -> float:
        """The time of the next transaction: wall time, never below the highwater."""
        return self.model.now(self.clock.wall())

    def _highwater(self) -> float:
        got = (
            self.cx["reconciler"]
            .execute("SELECT value FROM meta WHERE key = 'wall_highwater'")
            .fetchone()
        )
        return float(got[0]) if got else 0.0

    def _last_seq(self) -> int:
        got = self.cx["reconciler"].execute("SELECT max(seq) FROM history").fetchone()
        return int(got[0] or 0)

    def _jobs_touched_since(self, seq: int) -> list[str]:
        touched: list[str] = []
        for h in self.cx["reconciler"].execute(
            "SELECT job_id FROM history WHERE seq > ? ORDER BY seq", (seq,)
        ):
            if not touched or touched[-1] != h["job_id"]:
                touched.append(h["job_id"])
        return touched

    def _pick(self, handle: Handle, fresh: bool) -> Handle:
        """With ``fresh``, the job's live lease instead of the drawn (stale?) one."""
        job = self.model.jobs[handle.job_id]
        if fresh and job.owner is not None:
            return Handle(job.job_id, job.owner, job.token)
        return handle

    # --- planning

    @rule(
        work=st.sampled_from(WORKS),
        artifact=st.sampled_from(ARTIFACTS),
        attempts=st.sampled_from(MAX_ATTEMPTS),
    )
    def plan(self, work: str, artifact: str, attempts: int) -> None:
        job_id = plan_job_if_absent(
            self.cx["w1"],
            work_id=work,
            artifact_id=artifact,
            canonical_url=_url(work, artifact),
            max_attempts=attempts,
        )

        assert job_id == job_key(work, artifact, canonical_url(_url(work, artifact)))
        self.model.jobs.setdefault(job_id, MJob(job_id, attempts, self.clock.wall()))

    @rule(
        pairs=st.lists(
            st.tuples(st.sampled_from(WORKS), st.sampled_from(ARTIFACTS)),
            min_size=1,
            max_size=4,
        ),
        attempts=st.sampled_from(MAX_ATTEMPTS),
    )
    def plan_many(self, pairs: list[tuple[str, str]], attempts: int) -> None:
        rows = [{"work_id": w, "artifact_id": a, "url": _url(w, a)} for w, a in pairs]
        ids = plan_jobs(self.cx["w2"], rows, max_attempts=attempts)

        assert ids == [job_key(w, a, _url(w, a)) for w, a in pairs]
        for job_id in ids:  # planned outside a transaction: at wall time
            self.model.jobs.setdefault(
                job_id, MJob(job_id, attempts, self.clock.wall())
            )

    # --- leases

    @rule(target=leases, owner=st.sampled_from(OWNERS), ttl=st.sampled_from(LEASE_TTLS))
    def lease(self, owner: str, ttl: float) -> Any:
        """Claim; which claimable job comes first is the core's choice."""
        now = self.model.see(self.clock.wall())
        candidates = self.model.candidates(now)
        seq = self._last_seq()

        got = lease_next_job(self.cx[owner], owner=owner, ttl_s=ttl)

        touched = self._jobs_touched_since(seq)
        event(f"lease: {'none' if got is None else 'claimed'}, {len(touched)} touched")
        assert set(touched) <= candidates, (
            "the claim touched a job that was not claimable"
        )
        assert self._highwater() == now, "the claim did not record the time it saw"
        failed = touched[:-1] if got is not None else touched
        for job_id in failed:
            assert self.model.exhausted(job_id), (
                "a job under its attempt limit was failed"
            )
            self.model.fail_exhausted(job_id, now)
        if got is None:
            assert set(failed) == candidates, "no claim although a job was claimable"
            return multiple()
        assert touched[-1] == got.job_id and not self.model.exhausted(got.job_id)
        job = self.model.claim(got.job_id, owner, ttl, now)
        assert (got.token, got.lease_owner, got.lease_until, got.state) == (
            job.token,
            owner,
            job.until,
            job.state,
        )
        return Handle(got.job_id, owner, got.token)

    @rule(
        handle=leases, fresh=FRESH, ttl=st.sampled_from(LEASE_TTLS), impostor=IMPOSTOR
    )
    def renew(self, handle: Handle, fresh: bool, ttl: float, impostor: bool) -> None:
        handle = self._pick(handle, fresh)
        owner = _other(handle.owner) if impostor else handle.owner
        now = self.now()

        renewed = renew_lease(
            self.cx[owner],
            job_id=handle.job_id,
            owner=owner,
            ttl_s=ttl,
            token=handle.token,
        )

        event(f"renew: {renewed}")
        expected = self.model.renew(handle.job_id, owner, handle.token, ttl, now)
        assert renewed == expected, (
            f"renew returned {renewed}, the model says {expected}"
        )

    @rule(handle=leases, fresh=FRESH, impostor=IMPOSTOR)
    def release(self, handle: Handle, fresh: bool, impostor: bool) -> None:
        handle = self._pick(handle, fresh)
        owner = _other(handle.owner) if impostor else handle.owner
        now = self.now()

        released = release_lease(
            self.cx[owner], job_id=handle.job_id, owner=owner, token=handle.token
        )

        event(f"release: {released}")
        expected = self.model.release(handle.job_id, owner, handle.token, now)
        assert released == expected, (
            f"release returned {released}, the model says {expected}"
        )

    # --- states

    @rule(
        handle=leases,
        fresh=FRESH,
        to_state=st.sampled_from(["next", "next", *JobState]),
    )
    def advance(self, handle: Handle, fresh: bool, to_state: JobState | str) -> None:
        handle = self._pick(handle, fresh)
        if to_state == "next":
            to_state = NEXT.get(
                JobState(self.model.jobs[handle.job_id].state), JobState.FAILED
            )
        dst = JobState(to_state)
        now = self.now()

        outcome = _outcome(
            lambda: advance_state(
                self.cx[handle.owner],
                job_id=handle.job_id,
                to_state=dst,
                token=handle.token,
            )
        )

        event(f"advance: {outcome[0]}")
        assert outcome == _outcome(
            lambda: self.model.advance(handle.job_id, dst.value, handle.token, now)
        )

    @rule(handle=leases, fresh=FRESH, retryable=st.booleans())
    def fail(self, handle: Handle, fresh: bool, retryable: bool) -> None:
        handle = self._pick(handle, fresh)
        now = self.now()

        outcome = _outcome(
            lambda: fail_job(
                self.cx[handle.owner],
                job_id=handle.job_id,
                token=handle.token,
                reason="model says so",
                retryable=retryable,
            )
        )

        event(f"fail: {outcome[0]}")
        assert outcome == _outcome(
            lambda: self.model.fail(handle.job_id, handle.token, retryable, now)
        )

    # --- effects

    @rule(
        handle=leases,
        fresh=FRESH,
        kind=st.sampled_from(KINDS),
        mode=st.sampled_from(["ok", "ok", "ok", "raise", "crash"]),
        slow=st.sampled_from([0, 0, 0, 3, 40]),
        op_ttl=st.sampled_from(OP_TTLS),
        style=st.sampled_from(STYLES),
    )
    def effect(
        self,
        handle: Handle,
        fresh: bool,
        kind: str,
        mode: str,
        slow: float,
        op_ttl: float,
        style: str = "tracked",
    ) -> None:
        """Run one effect; ``slow`` seconds pass in it, ``crash`` stops it early.

        ``style`` is how it is called (see :class:`_Call`).
        """
        handle = self._pick(handle, fresh)
        key = op_key(kind, handle.job_id)
        call = _Call(kind, style)
        results: list[dict[str, Any]] = []
        calls_before = self.effect_calls

        def effect_fn() -> Mapping[str, Any]:
            self.effect_calls += 1
            self.clock.advance(slow)
            if mode == "raise":
                raise Boom(f"{kind} failed")
            results.append(
                {"kind": kind, "call": self.effect_calls, "token": handle.token}
            )
            return results[-1]

        plan = self._start_effect(handle, key, call, mode, op_ttl)
        if mode == "crash":
            crashpoints.arm([{"point": call.crash_point, "action": "raise"}])
        try:
            outcome = _outcome(
                lambda: run_effect(
                    self.cx[handle.owner],
                    job_id=handle.job_id,
                    kind=kind,
                    opkey=key,
                    effect_fn=effect_fn,
                    token=handle.token,
                    owner=handle.owner,
                    ttl_s=op_ttl,
                    **call.options(),
                )
            )
        finally:
            crashpoints.disarm()

        event(f"effect {kind} {call.mode}: {plan[0]} -> {outcome[0]}")
        ran = self.effect_calls - calls_before
        assert ran == (plan[0] in _RUNS), f"the effect ran {ran} times: {plan}"
        self._settle_effect(handle, key, call, plan, outcome, results)

    @rule(handle=leases, style=st.sampled_from(STYLES))
    def lifecycle(self, handle: Handle, style: str) -> None:
        """A healthy turn of work under the job's live lease: HEAD to FINALIZE."""
        self.effect(handle, True, "HEAD", "ok", 0, 300, style)
        if _Call("STREAM", style).start_state is None:
            self.advance(handle, True, JobState.STREAMING)
        self.effect(handle, True, "STREAM", "ok", 0, 300, style)
        self.effect(handle, True, "FINALIZE", "ok", 0, 300, style)

    @rule(
        handle=leases,
        kind=st.sampled_from(KINDS),
        style=st.sampled_from(STYLES),
        missing=st.sampled_from(["token", "owner", "empty owner", "both"]),
    )
    def release_without_lease(
        self, handle: Handle, kind: str, style: str, missing: str
    ) -> None:
        """``then_release`` without the lease's token or owner: refused up front.

        The call raises before it reads or writes anything, so even a recorded
        op is not replayed; the invariants check that nothing changed.
        """
        token = None if missing in ("token", "both") else handle.token
        owner = {"owner": None, "empty owner": "", "both": None}.get(
            missing, handle.owner
        )
        ran: list[str] = []

        def effect_fn() -> Mapping[str, Any]:
            ran.append(kind)
            return {"kind": kind}

        with pytest.raises(ValueError, match="then_release"):
            run_effect(
                self.cx[handle.owner],
                job_id=handle.job_id,
                kind=kind,
                opkey=op_key(kind, handle.job_id),
                effect_fn=effect_fn,
                token=token,
                owner=owner,
                mode=_Call(kind, style).mode,
                then_state=THEN_STATE[kind],
                then_release=True,
            )

        assert ran == [], "the effect ran although the call was refused"

    def _catch_up(self, handle: Handle, call: _Call, mode: str) -> None:
        """A replay under the live lease takes the moves its op implies, if allowed."""
        now = self.now()
        if not self.model.holds(handle.job_id, handle.token, now):
            return
        job = self.model.jobs[handle.job_id]
        for dst in (call.start_state, call.then_state):
            if dst is None or job.state == dst.value or not is_allowed(job.state, dst):
                continue
            self.model.change_state(handle.job_id, dst.value, handle.token, now)

    def _start_effect(
        self, handle: Handle, key: str, call: _Call, mode: str, op_ttl: float
    ) -> tuple[str, Any]:
        """Predict how ``run_effect`` starts; apply what its start commits.

        Returns the plan and, for ``atomic``, the time of its one transaction.
        """
        op = self.model.ops.get(key)
        if op is not None and op.status == "SUCCEEDED":
            self._catch_up(handle, call, mode)
            return ("replay", json.loads(op.result or b""))  # whatever the token (I4)
        if call.mode == "first_wins":
            # TODO: first_wins runs the effect before it checks the lease and the
            # then_state edge, so a zombie's HEAD (or one on a job past HEAD_DONE)
            # still goes out and is refused only at the record; harmless for a
            # safe request, but I9 counts it as a run without a crash.
            plans = {"ok": "run", "raise": "raise", "crash": "crash after effect"}
            return (plans[mode], None)
        now = self.now()
        if not self.model.holds(handle.job_id, handle.token, now):
            return ("refused", None)  # I7: a stale token starts nothing
        job = self.model.jobs[handle.job_id]
        started = job.state if call.start_state is None else call.start_state.value
        if not _may_move(job.state, call.start_state) or not _may_move(
            started, call.then_state
        ):
            return ("refused at start", None)  # before the effect runs (I9)
        if call.mode == "atomic":  # nothing commits unless the record does
            plans = {"ok": "run", "raise": "raise", "crash": "crash after record"}
            return (plans[mode], now)
        self._start_op(handle, key, call, now, now + op_ttl)
        if mode == "crash":
            return ("crash", None)
        return ("raise", None) if mode == "raise" else ("run", None)

    def _start_op(
        self, handle: Handle, key: str, call: _Call, now: float, expires_at: float
    ) -> None:
        """Apply a start: the move to ``start_state``, the op in progress."""
        if call.start_state is not None:
            if self.model.jobs[handle.job_id].state != call.start_state.value:
                self.model.change_state(
                    handle.job_id, call.start_state.value, handle.token, now
                )
        self.model.ops[key] = MOp(
            handle.job_id,
            call.kind,
            "IN_PROGRESS",
            handle.token,
            handle.owner,
            now,
            expires_at,
        )

    def _settle_effect(
        self,
        handle: Handle,
        key: str,
        call: _Call,
        plan: tuple[str, Any],
        outcome: tuple[str, Any],
        results: list[dict[str, Any]],
    ) -> None:
        """Check the outcome of ``run_effect`` and apply its record to the model."""
        expected = {
            "replay": ("ok", plan[1]),
            "refused": ("LeaseLost", None),
            "refused at start": ("InvalidTransition", None),
            "crash": ("CrashPointFired", None),
            "crash after effect": ("CrashPointFired", None),
            "raise": ("Boom", None),
        }
        op = self.model.ops.get(key)
        if plan[0] == "raise" and call.mode == "tracked":
            assert op is not None
            op.status, op.expires_at = "FAILED", self.now()
        if plan[0] in expected:
            assert outcome == expected[plan[0]]
            return

        # atomic records in its start's transaction, at the time it started
        now = plan[1] if call.mode == "atomic" else self.now()
        if not self.model.holds(handle.job_id, handle.token, now):
            assert call.mode != "atomic"
            assert outcome == ("LeaseLost", None), (
                "a record under an expired lease was kept"
            )
            return
        job, dst = self.model.jobs[handle.job_id], call.then_state
        if call.mode == "first_wins" and not _may_move(job.state, dst):
            assert outcome == ("InvalidTransition", None)
            return  # the others checked the edge at their start
        if plan[0] == "crash after record":
            assert outcome == ("CrashPointFired", None)
        else:
            assert outcome == ("ok", results[-1])
        if call.mode != "tracked":  # the op starts in the record's transaction
            self._start_op(handle, key, call, now, now)
        op = self.model.ops[key]
        op.status, op.expires_at, op.result = (
            "SUCCEEDED",
            now,
            canonical_json(results[-1]),
        )
        if dst is not None and job.state != dst.value:
            self.model.change_state(handle.job_id, dst.value, handle.token, now)
        if call.then_release:
            assert self.model.release(handle.job_id, handle.owner, handle.token, now)

    # --- time

    @rule(seconds=st.one_of(st.integers(0, 2), st.integers(0, 40)))
    def advance_clock(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule(seconds=st.integers(1, 40))
    def move_clock_back(self, seconds: int) -> None:
        """Wall time only: the fake clock's monotonic time never goes back (C14)."""
        self.clock.move_to(self.clock.wall() - seconds)

    @rule(
        handle=leases,
        ahead=st.integers(1, 10),
        back=st.integers(1, 20),
        write=st.sampled_from(["renew", "op"]),
    )
    def write_ahead_then_clock_back(
        self, handle: Handle, ahead: int, back: int, write: str
    ) -> None:
        """A write at a wall time above the highwater, then the wall clock back.

        The write's time stays in the job's ``updated_at`` (a renew with TTL 0,
        so the lease ends at that time) or the op's ``started_at`` (a STREAM
        with op TTL 0 that crashes after its start), above every time a claim
        saw; the rules that follow compare expiries with it.
        """
        self.advance_clock(ahead)
        if write == "renew":
            self.renew(handle, True, 0, False)
        else:
            self.effect(handle, True, "STREAM", "crash", 0, 0, "tracked")
        self.move_clock_back(back)

    # --- the reconciler

    @rule(which=st.sampled_from(["leases", "ops", "all"]))
    def reconcile(self, which: str) -> None:
        cx = self.cx["reconciler"]
        now = self.model.see(self.clock.wall())
        if which == "leases":
            assert cleanup_stale_leases(cx) == self.model.cleanup_leases(now)
        elif which == "ops":
            assert cleanup_stale_ops(cx) == self.model.cleanup_ops(now)
        else:
            report = reconcile_jobs(cx, self.staging, repair_all=True)
            event(f"reconcile: {len(report.repaired)} repaired")
            assert report.leases_cleared == self.model.cleanup_leases(now)
            assert report.ops_abandoned == self.model.cleanup_ops(now)
            assert sorted(report.repaired) == self.model.repair_missing_finals(now)
            assert not (report.parts_removed or report.adopted or report.strays_removed)

    # --- after every step

    @invariant()
    def database_matches_model(self) -> None:
        """Lease holders, tokens, states, ops, history and highwater are the model's."""
        cx = self.cx["reconciler"]
        assert self._highwater() == self.model.highwater
        jobs = {r["job_id"]: _job_row(r) for r in cx.execute("SELECT * FROM jobs")}
        assert jobs == {k: j.row() for k, j in self.model.jobs.items()}
        ops = {r["op_key"]: _op_row(r) for r in cx.execute("SELECT * FROM ops")}
        assert ops == {k: o.row() for k, o in self.model.ops.items()}
        history: dict[str, list[HistoryRow]] = {}
        for h in cx.execute("SELECT * FROM history ORDER BY seq"):
            history.setdefault(h["job_id"], []).append(
                (
                    h["event"],
                    h["from_state"],
                    h["to_state"],
                    h["token"],
                    h["owner"],
                    h["at"],
                    h["lease_until"],
                )
            )
        assert history == self.model.history

    @invariant()
    def history_keeps_the_invariants(self) -> None:
        """I1 (a failure's reason), I5, I6, I7 and I10, from the database alone."""
        assert check_invariants(self.cx["reconciler"]) == []

    @invariant()
    def recorded_ops_replay_byte_for_byte(self) -> None:
        """I4: the ledger returns the very bytes that were recorded."""
        for key, op in self.model.ops.items():
            if op.status == "SUCCEEDED":
                assert get_effect_record(self.cx["reconciler"], opkey=key) == op.result


def _job_row(r: sqlite3.Row) -> dict[str, Any]:
    fields = (
        "max_attempts",
        "state",
        "claimable",
        "attempts",
        "not_before",
        "lease_owner",
        "lease_until",
        "lease_token",
        "updated_at",
    )
    return {**{k: r[k] for k in fields}, "has_reason": r["fail_reason"] is not None}


def _op_row(r: sqlite3.Row) -> dict[str, Any]:
    # Only a succeeded op's result counts: a restarted op keeps the bytes of its
    # earlier run in the row until it records again, and nothing reads them.
    fields = ("job_id", "kind", "status", "token", "owner", "started_at", "expires_at")
    recorded = r["status"] == "SUCCEEDED" and r["result"] is not None
    return {
        **{k: r[k] for k in fields},
        "result": bytes(r["result"]) if recorded else None,
    }


def _outcome(call: Any) -> tuple[str, Any]:
    """Run ``call``; return ``("ok", value)`` or the name of what it raised."""
    try:
        return ("ok", call())
    except (LeaseLost, InvalidTransition, CrashPointFired, Boom) as exc:
        return (type(exc).__name__, None)


# CI-sized by default; a larger profile (``--idem-profile=nightly``) runs more.
_profile = settings()
CoreMachine.TestCase.settings = settings(
    max_examples=max(50, _profile.max_examples),
    stateful_step_count=max(30, _profile.stateful_step_count),
    deadline=None,
    database=None,  # no example database in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCoreAgainstModel = CoreMachine.TestCase


# --- the checker itself ------------------------------------------------------------

_FORGERIES = {
    # what a core without fencing would have written for the zombie's token
    "state change": (
        "INSERT INTO history (job_id, event, from_state, to_state, token, at) "
        "VALUES (:job, 'state', 'LEASED', 'HEAD_DONE', :token, :at)",
        "UPDATE jobs SET state = 'HEAD_DONE' WHERE job_id = :job",
    ),
    "renew": (
        "INSERT INTO history (job_id, event, token, owner, at, lease_until) "
        "VALUES (:job, 'renew', :token, 'w1', :at, :at + 30)",
    ),
    "release": (
        "INSERT INTO history (job_id, event, from_state, to_state, token, owner, at) "
        "VALUES (:job, 'release', 'LEASED', 'LEASED', :token, 'w1', :at)",
        "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE job_id = :job",
    ),
}


@pytest.mark.parametrize("forged", sorted(_FORGERIES))
def test_check_invariants_flags_a_stale_token_write(
    tmp_path: Path, forged: str
) -> None:
    """check_invariants reports I7 for a stale-token write forced in by raw SQL."""
    clock = FakeClock()
    cx = connect(tmp_path / "jobs.db", clock=clock)
    try:
        job = plan_job_if_absent(
            cx, work_id="W1", artifact_id="pdf", canonical_url=_url("W1", "pdf")
        )
        zombie = lease_next_job(cx, owner="w1", ttl_s=1)
        assert zombie is not None
        clock.advance(2)
        assert lease_next_job(cx, owner="w2", ttl_s=30) is not None
        with pytest.raises(LeaseLost):
            advance_state(
                cx, job_id=job, to_state=JobState.HEAD_DONE, token=zombie.token
            )
        assert check_invariants(cx) == []  # the core's own writes are clean

        for statement in _FORGERIES[forged]:
            cx.execute(
                statement, {"job": job, "token": zombie.token, "at": clock.wall()}
            )

        problems = check_invariants(cx)
        assert problems, "the forged write went unnoticed"
        assert problems[0].startswith("I7 ") and "stale token" in problems[0], problems
    finally:
        close(cx)
