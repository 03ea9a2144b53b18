"""Planning, leasing and progress states of jobs.

A lease is temporary ownership of one job: an owner name, an expiry in wall
time, and a fencing token that is strictly greater than every earlier token of
that job (I6). Every write made under a lease names its token and is refused
with :class:`LeaseLost` once the lease moved on or expired (I7).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import telemetry
from .crashpoints import crashpoint
from .db import Connection, ensure_own, q, row, write
from .errors import ConfigError, InvalidTransition, LeaseLost
from .keys import job_key_and_url
from .states import ACTIVE, DONE, JobState, is_allowed

DEFAULT_MAX_ATTEMPTS = 5
#: the longest TTL taken (a year): anything longer is a lease that never ends
MAX_TTL_S = 365 * 24 * 3600.0
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0


def check_ttl(ttl_s: float | None, what: str = "ttl_s") -> float:
    """Validate a TTL in seconds; 0 means "expired now" (I10, C01).

    The TTL is rounded to whole milliseconds, so a budget under half a
    millisecond is 0: expired at once, never "no expiry".

    Raises:
        ConfigError: ``None``, negative, or not a number.
    """
    if ttl_s is None or isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)):
        raise ConfigError(
            f"{what}={ttl_s!r} is not a TTL; give a number of seconds from 0 to "
            f"{MAX_TTL_S:.0f} (0 means expired at once; there is no 'never expires')"
        )
    if not 0 <= ttl_s <= MAX_TTL_S:
        raise ConfigError(
            f"{what}={ttl_s!r} must be a number of seconds from 0 to {MAX_TTL_S:.0f} "
            "(a year); 0 means expired at once"
        )
    return round(float(ttl_s) * 1000) / 1000


def _now(cx: Connection) -> float:
    """Wall time; inside a transaction, the database's time of :func:`_claim_now`.

    Every expiry written or compared in a transaction uses the same clock, so
    a lease renewed (or an op started) after wall time moved backwards is not
    already expired for the next claim (C14).
    """
    if not cx.in_transaction:
        return cx.clock.wall()
    if getattr(cx, "tx_now", None) is None:
        wall = cx.clock.wall()
        seen = row(cx, "get_meta", {"key": "wall_highwater"})
        cx.tx_now = max(wall, float(seen[0])) if seen else wall
    assert cx.tx_now is not None
    return cx.tx_now


def _claim_now(tx: Connection) -> float:
    """Wall time, never below the highest wall time this database has seen (C14).

    A wall clock moved backwards cannot bring an expired lease back to life.
    """
    wall = tx.clock.wall()
    seen = row(tx, "get_meta", {"key": "wall_highwater"})
    high = float(seen[0]) if seen else 0.0
    if wall > high:
        tx.execute(q("set_meta"), {"key": "wall_highwater", "value": repr(wall)})
        high = wall
    tx.tx_now = high
    return high


def history(
    tx: Connection,
    job_id: str,
    event: str,
    *,
    at: float,
    from_state: str | None = None,
    to_state: str | None = None,
    token: int | None = None,
    owner: str | None = None,
    lease_until: float | None = None,
    detail: str | None = None,
) -> None:
    """Append one row to the history table (inside the caller's transaction)."""
    tx.execute(
        q("insert_history"),
        {
            "job_id": job_id,
            "event": event,
            "from_state": from_state,
            "to_state": to_state,
            "token": token,
            "owner": owner,
            "at": at,
            "lease_until": lease_until,
            "detail": detail,
        },
    )


# --- planning ---------------------------------------------------------------


def _job_params(
    spec: Mapping[str, Any], now: float, max_attempts: int
) -> dict[str, Any]:
    url = spec.get("canonical_url", spec.get("url"))
    work_id, artifact_id = spec.get("work_id"), spec.get("artifact_id")
    key, canonical = job_key_and_url(work_id, artifact_id, url)
    return {
        "job_id": key,
        "work_id": work_id,
        "artifact_id": artifact_id,
        "url": canonical,
        "expected_sha256": spec.get("sha256") or spec.get("expected_sha256"),
        "max_attempts": int(spec.get("max_attempts") or max_attempts),
        "now": now,
    }


def plan_job_if_absent(
    cx: sqlite3.Connection,
    *,
    work_id: str,
    artifact_id: str,
    canonical_url: str,
    expected_sha256: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> str:
    """Plan one job unless it exists; return its job id (the job key).

    Planning the same job from many processes at once yields one row.
    """
    return plan_jobs(
        cx,
        [
            {
                "work_id": work_id,
                "artifact_id": artifact_id,
                "url": canonical_url,
                "sha256": expected_sha256,
            }
        ],
        max_attempts=max_attempts,
    )[0]


def plan_jobs(
    cx: sqlite3.Connection,
    rows: Iterable[Mapping[str, Any]],
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> list[str]:
    """Plan many jobs in one transaction; return their job ids in input order.

    Each row has ``work_id``, ``artifact_id``, ``url`` and optionally
    ``sha256``. Keys are derived before anything is written, so one bad row
    raises (with its index added as a note) and plans nothing.
    """
    own = ensure_own(cx)
    now = _now(own)
    params = []
    for index, spec in enumerate(rows):
        try:
            params.append(_job_params(spec, now, max_attempts))
        except (ValueError, TypeError) as exc:
            exc.add_note(f"plan_jobs: row {index} {dict(spec)!r}")
            raise

    def insert(tx: Connection) -> int:
        before = tx.total_changes
        tx.executemany(q("insert_job"), params)
        return tx.total_changes - before

    added = write(own, insert)
    if added:
        telemetry.emit("planned", jobs=added, submitted=len(params))
    return [p["job_id"] for p in params]


# --- leases -------------------------------------------------------------------


@dataclass(frozen=True)
class Lease(Mapping[str, Any]):
    """A claimed job: who holds it, until when, and its fencing token.

    Reads like a mapping (``lease["job_id"]``, ``lease["state"]``,
    ``lease["lease_owner"]``, ``lease["lease_until"]``, ``lease["token"]``) and
    offers the writes a holder makes, each fenced by the token.
    """

    job_id: str
    work_id: str
    artifact_id: str
    url: str
    expected_sha256: str | None
    state: str
    attempts: int
    lease_owner: str
    lease_until: float
    token: int
    ttl_s: float
    acquired_monotonic: float
    cx: Connection = field(repr=False, compare=False)

    def __getitem__(self, key: str) -> Any:
        if key == "owner":
            key = "lease_owner"
        if key in ("cx",) or key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(k for k in self.__dataclass_fields__ if k != "cx")

    def __len__(self) -> int:
        return len(self.__dataclass_fields__) - 1

    def remaining(self) -> float:
        """Seconds left on this lease by the monotonic clock, between 0 and the TTL."""
        spent = self.cx.clock.monotonic() - self.acquired_monotonic
        return min(self.ttl_s, max(0.0, self.ttl_s - spent))

    def renew(self, ttl_s: float | None = None) -> Lease:
        """Extend the lease; return the renewed lease. Raises :class:`LeaseLost`."""
        ttl = self.ttl_s if ttl_s is None else ttl_s
        mono = self.cx.clock.monotonic()
        until = renew_lease(
            self.cx,
            job_id=self.job_id,
            owner=self.lease_owner,
            ttl_s=ttl,
            token=self.token,
            strict=True,
        )
        assert isinstance(until, float)
        return _replace(
            self, lease_until=until, ttl_s=check_ttl(ttl), acquired_monotonic=mono
        )

    def release(self) -> None:
        """Give the job back. Raises :class:`LeaseLost` if it was no longer ours."""
        release_lease(
            self.cx,
            job_id=self.job_id,
            owner=self.lease_owner,
            token=self.token,
            strict=True,
        )

    def advance(
        self,
        to_state: JobState | str,
        allowed_from: Collection[JobState | str] | None = None,
    ) -> bool:
        """Move the job forward under this lease (see :func:`advance_state`)."""
        return advance_state(
            self.cx,
            job_id=self.job_id,
            to_state=to_state,
            allowed_from=allowed_from,
            token=self.token,
        )

    def fail(self, reason: str, *, retryable: bool = True) -> JobState:
        """Mark the job FAILED under this lease and release it."""
        return fail_job(
            self.cx,
            job_id=self.job_id,
            token=self.token,
            reason=reason,
            retryable=retryable,
        )

    def current_state(self) -> JobState:
        state = get_current_state(self.cx, job_id=self.job_id)
        assert state is not None
        return state


def _replace(lease: Lease, **changes: Any) -> Lease:
    values = {k: getattr(lease, k) for k in lease.__dataclass_fields__}
    values.update(changes)
    return Lease(**values)


def lease_next_job(
    cx: sqlite3.Connection,
    *,
    owner: str,
    ttl_s: float = 120.0,
) -> Lease | None:
    """Claim the next claimable job for ``owner``, or return ``None``.

    Claimable: an active state (or FAILED and retryable), past its backoff, and
    with no lease or an expired one. The claim takes a new token, keeps the
    progress state (PLANNED and FAILED become LEASED) and counts an attempt; a
    job over its attempt limit turns FAILED with the reason instead.
    """
    own = ensure_own(cx)
    if not owner or not isinstance(owner, str):
        raise ConfigError(
            f"owner={owner!r} must be a non-empty string naming the worker"
        )
    ttl = check_ttl(ttl_s)

    def claim(tx: Connection) -> sqlite3.Row | None:
        now = _claim_now(tx)
        while True:
            cand = row(tx, "next_claimable", {"now": now, "limit": 1})
            if cand is None:
                return None
            if cand["lease_owner"] is not None:
                history(
                    tx,
                    cand["job_id"],
                    "expire",
                    at=now,
                    token=cand["lease_token"],
                    owner=cand["lease_owner"],
                    from_state=cand["state"],
                )
            if cand["attempts"] >= cand["max_attempts"]:
                _fail_exhausted(tx, cand, now)
                continue
            got = row(
                tx,
                "claim",
                {
                    "job_id": cand["job_id"],
                    "owner": owner,
                    "until": now + ttl,
                    "ttl": ttl,
                    "now": now,
                },
            )
            assert got is not None
            history(
                tx,
                got["job_id"],
                "claim",
                at=now,
                from_state=cand["state"],
                to_state=got["state"],
                token=got["lease_token"],
                owner=owner,
                lease_until=got["lease_until"],
            )
            return got

    mono = own.clock.monotonic()
    got = write(own, claim)
    if got is None:
        return None
    crashpoint("claim.after_commit")
    telemetry.emit(
        "leased",
        job=got["job_id"],
        token=got["lease_token"],
        state=got["state"],
        owner=owner,
        attempt=got["attempts"],
    )
    return Lease(
        job_id=got["job_id"],
        work_id=got["work_id"],
        artifact_id=got["artifact_id"],
        url=got["url"],
        expected_sha256=got["expected_sha256"],
        state=got["state"],
        attempts=got["attempts"],
        lease_owner=owner,
        lease_until=float(got["lease_until"]),
        token=got["lease_token"],
        ttl_s=ttl,
        acquired_monotonic=mono,
        cx=own,
    )


def _fail_exhausted(tx: Connection, cand: sqlite3.Row, now: float) -> None:
    reason = (
        f"attempt limit {cand['max_attempts']} reached in state {cand['state']}; "
        "the last lease expired without finishing"
    )
    tx.execute(
        q("fail_exhausted"), {"job_id": cand["job_id"], "reason": reason, "now": now}
    )
    history(
        tx,
        cand["job_id"],
        "state",
        at=now,
        from_state=cand["state"],
        to_state="FAILED",
        detail=reason,
    )
    telemetry.emit(
        "state_changed", job=cand["job_id"], token=None, state="FAILED", reason=reason
    )


def renew_lease(
    cx: sqlite3.Connection,
    *,
    job_id: str,
    owner: str,
    ttl_s: float,
    token: int | None = None,
    strict: bool = False,
) -> bool | float:
    """Extend a live lease by ``ttl_s`` from now.

    Returns ``True`` when renewed (the new expiry with ``strict=True``) and
    ``False`` when the lease is no longer this owner's (or no longer this
    token's): expired, released or reclaimed. With ``strict=True`` that case
    raises :class:`LeaseLost` instead. Ops in progress under the lease are
    extended with it.
    """
    own = ensure_own(cx)
    ttl = check_ttl(ttl_s)
    crashpoint("renew.before")

    def renew(tx: Connection) -> float | None:
        now = _now(tx)
        got = row(
            tx,
            "renew",
            {
                "job_id": job_id,
                "owner": owner,
                "token": token,
                "until": now + ttl,
                "ttl": ttl,
                "now": now,
            },
        )
        if got is None:
            return None
        tx.execute(
            q("extend_ops"), {"until": now + ttl, "job_id": job_id, "token": got[0]}
        )
        history(
            tx,
            job_id,
            "renew",
            at=now,
            token=got[0],
            owner=owner,
            lease_until=now + ttl,
        )
        return now + ttl

    until = write(own, renew)
    if until is None:
        return _lost(own, "renew", job_id, owner, token, strict)
    telemetry.emit("renewed", job=job_id, token=token, owner=owner, until=until)
    return until if strict else True


def release_lease(
    cx: sqlite3.Connection,
    *,
    job_id: str,
    owner: str,
    token: int | None = None,
    strict: bool = False,
) -> bool:
    """Give a job back; its progress state stays. ``False`` if it was not held."""
    own = ensure_own(cx)
    crashpoint("release.before")

    def release(tx: Connection) -> sqlite3.Row | None:
        now = _now(tx)
        got = row(
            tx,
            "release",
            {"job_id": job_id, "owner": owner, "token": token, "now": now},
        )
        if got is not None:
            history(
                tx,
                job_id,
                "release",
                at=now,
                token=got[0],
                owner=owner,
                from_state=got[1],
                to_state=got[1],
            )
        return got

    got = write(own, release)
    if got is None:
        return bool(_lost(own, "release", job_id, owner, token, strict))
    telemetry.emit("released", job=job_id, token=got[0], state=got[1], owner=owner)
    return True


def _lost(
    cx: Connection, what: str, job_id: str, owner: str, token: int | None, strict: bool
) -> bool:
    current = row(cx, "get_job", {"job_id": job_id})
    telemetry.emit(
        "lease_lost",
        job=job_id,
        token=token,
        owner=owner,
        refused=what,
        holder=current["lease_owner"] if current else None,
        holder_token=current["lease_token"] if current else None,
    )
    if strict:
        raise LeaseLost(_lost_message(what, job_id, owner, token, current, _now(cx)))
    return False


def _lost_message(
    what: str,
    job_id: str,
    owner: str | None,
    token: int | None,
    current: sqlite3.Row | None,
    now: float,
) -> str:
    if current is None:
        return f"{what} refused: job {job_id!r} does not exist"
    if current["lease_owner"] is None:
        where = "the job has no lease now (released or expired and cleared)"
    elif current["lease_until"] <= now:
        where = f"the lease expired at {current['lease_until']:.3f} (now {now:.3f})"
    else:
        where = (
            f"the job is leased by {current['lease_owner']!r} with token "
            f"{current['lease_token']}"
        )
    return (
        f"{what} refused for job {job_id!r} (owner {owner!r}, token {token}): {where}; "
        "stop working on this job and claim another"
    )


def ensure_fence(
    tx: Connection, job_id: str, token: int, what: str, now: float | None = None
) -> str:
    """Inside a transaction, check that ``token`` holds the job's live lease.

    Returns the job's state. Raises :class:`LeaseLost` otherwise.
    """
    at = _now(tx) if now is None else now
    got = row(tx, "fence", {"job_id": job_id, "token": token, "now": at})
    if got is None:
        current = row(tx, "get_job", {"job_id": job_id})
        telemetry.emit("lease_lost", job=job_id, token=token, refused=what)
        raise LeaseLost(_lost_message(what, job_id, None, token, current, at))
    return str(got[0])


# --- states -------------------------------------------------------------------


def _claimable(state: JobState) -> int:
    return 1 if state in ACTIVE else 0


def change_state(
    tx: Connection,
    job_id: str,
    src: str,
    dst: JobState,
    *,
    at: float,
    token: int | None,
    detail: str | None = None,
) -> None:
    """Write one forward edge inside the caller's transaction (I5)."""
    cur = tx.execute(
        q("set_state"),
        {
            "job_id": job_id,
            "from_state": src,
            "to_state": dst.value,
            "claimable": _claimable(dst),
            "now": at,
        },
    )
    if cur.rowcount != 1:
        raise InvalidTransition(
            f"job {job_id!r} left state {src} while changing to {dst}"
        )
    history(
        tx,
        job_id,
        "state",
        at=at,
        from_state=src,
        to_state=dst.value,
        token=token,
        detail=detail,
    )


def advance_state(
    cx: sqlite3.Connection,
    *,
    job_id: str,
    to_state: JobState | str,
    allowed_from: Collection[JobState | str] | None = None,
    token: int | None = None,
    detail: str | None = None,
) -> bool:
    """Move a job forward to ``to_state``.

    Returns ``True`` when the state changed and ``False`` when the job is
    already in ``to_state`` (a replay after a crash changes nothing).

    Raises:
        InvalidTransition: the job is in none of ``allowed_from``, or the edge
            is not a forward edge of :data:`~docstokg_idem.core.states.EDGES`.
        LeaseLost: ``token`` is not the job's live lease.
    """
    own = ensure_own(cx)
    if JobState(to_state) is JobState.FAILED:
        raise InvalidTransition(
            f"advance_state(job_id={job_id!r}, to_state='FAILED') is refused: a failure "
            "needs its reason and ends the lease; call fail_job(cx, job_id=..., "
            "token=..., reason=...) instead"
        )
    dst = JobState(to_state)
    allowed = {JobState(s) for s in allowed_from} if allowed_from is not None else None

    def advance(tx: Connection) -> str | None:
        now = _now(tx)
        if token is not None:
            actual = ensure_fence(tx, job_id, token, f"state change to {dst}", now)
        else:
            current = row(tx, "get_job", {"job_id": job_id})
            if current is None:
                raise InvalidTransition(f"job {job_id!r} does not exist; plan it first")
            actual = current["state"]
        if actual == dst.value:
            return None
        if (allowed is not None and JobState(actual) not in allowed) or not is_allowed(
            actual, dst
        ):
            sources = (
                allowed
                if allowed is not None
                else {s for s in JobState if is_allowed(s, dst)}
            )
            names = sorted(s.value for s in sources)
            raise InvalidTransition(
                f"job {job_id!r} cannot move to {dst}: it is in {actual}, and the change "
                f"is allowed only from {names} along a forward edge; check the job's "
                "state with get_current_state() before advancing"
            )
        change_state(tx, job_id, actual, dst, at=now, token=token, detail=detail)
        return actual

    src = write(own, advance)
    if src is None:
        return False
    crashpoint("state.after_commit")
    telemetry.emit(
        "state_changed", job=job_id, token=token, state=dst.value, previous=src
    )
    return True


def get_current_state(cx: sqlite3.Connection, *, job_id: str) -> JobState | None:
    """The job's progress state, or ``None`` if no such job is planned."""
    got = row(ensure_own(cx), "get_job", {"job_id": job_id})
    return None if got is None else JobState(got["state"])


def get_job(cx: sqlite3.Connection, *, job_id: str) -> dict[str, Any] | None:
    """The job's row as a dict, or ``None``."""
    got = row(ensure_own(cx), "get_job", {"job_id": job_id})
    return None if got is None else dict(got)


def fail_job(
    cx: sqlite3.Connection,
    *,
    job_id: str,
    token: int | None,
    reason: str,
    retryable: bool = True,
    backoff_s: float = DEFAULT_BACKOFF_S,
) -> JobState:
    """Mark the job FAILED with ``reason`` and drop its lease.

    A retryable failure under the attempt limit can be claimed again after an
    exponential backoff; otherwise the failure is final.
    """
    own = ensure_own(cx)

    def fail(tx: Connection) -> bool:
        now = _now(tx)
        if token is not None:
            actual = ensure_fence(tx, job_id, token, "fail", now)
        else:
            current = row(tx, "get_job", {"job_id": job_id})
            if current is None:
                raise InvalidTransition(f"job {job_id!r} does not exist")
            actual = current["state"]
        job = row(tx, "get_job", {"job_id": job_id})
        assert job is not None
        again = retryable and job["attempts"] < job["max_attempts"]
        if JobState(actual) in DONE:
            raise InvalidTransition(
                f"job {job_id!r} is {actual}; a done job cannot fail"
            )
        delay = min(MAX_BACKOFF_S, backoff_s * 2 ** max(0, job["attempts"] - 1))
        tx.execute(
            q("set_failed"),
            {
                "job_id": job_id,
                "claimable": int(again),
                "reason": reason,
                "now": now,
                "not_before": now + delay if again else 0,
            },
        )
        kind = "retryable" if again else "final"
        history(
            tx,
            job_id,
            "state",
            at=now,
            from_state=actual,
            to_state="FAILED",
            token=token,
            detail=f"{kind}: {reason}",
        )
        return again

    again = write(own, fail)
    telemetry.emit(
        "state_changed",
        job=job_id,
        token=token,
        state="FAILED",
        retryable=again,
        reason=reason,
    )
    return JobState.FAILED


def expire_owner_leases(cx: sqlite3.Connection, *, owner: str, why: str) -> int:
    """End every live lease of ``owner`` now; return how many.

    Only for an owner known to be dead (its process was reaped): its jobs
    become claimable at once instead of after their TTL. Fencing still guards
    any write it might make (I7).
    """
    own = ensure_own(cx)

    def expire(tx: Connection) -> list[sqlite3.Row]:
        now = _claim_now(tx)
        rows = tx.execute(q("expire_owner"), {"owner": owner, "now": now}).fetchall()
        for lease in rows:
            history(
                tx,
                lease["job_id"],
                "expire",
                at=now,
                token=lease["lease_token"],
                owner=owner,
                from_state=lease["state"],
                detail=why,
            )
        return rows

    rows = write(own, expire)
    for lease in rows:
        telemetry.emit(
            "recovered",
            job=lease["job_id"],
            token=lease["lease_token"],
            state=lease["state"],
            what=f"lease of dead owner ended: {why}",
        )
    return len(rows)


def counts(cx: sqlite3.Connection) -> dict[str, Any]:
    """Jobs per state (FAILED split into retryable and final) and lease counts."""
    own = ensure_own(cx)
    states: dict[str, int] = {}
    for got in own.execute(q("state_counts")).fetchall():
        name = got["state"]
        if name == "FAILED":
            name = "FAILED_RETRYABLE" if got["claimable"] else "FAILED_FINAL"
        states[name] = states.get(name, 0) + got["n"]
    leases = row(own, "lease_counts", {"now": _now(own)})
    assert leases is not None
    total = sum(states.values())
    finished = sum(
        n
        for s, n in states.items()
        if s in {d.value for d in DONE} or s == "FAILED_FINAL"
    )
    return {
        "total": total,
        "finished": finished,
        "states": states,
        "leases_live": leases["live"] or 0,
        "leases_expired": leases["expired"] or 0,
        "backing_off": leases["backing_off"] or 0,
        "next_retry_at": leases["next_retry"],
        "next_lease_expiry": leases["next_expiry"],
    }


def retry_failed(cx: sqlite3.Connection) -> int:
    """Make every job that failed for good claimable again, with fresh attempts.

    For failures whose cause was fixed outside the job (an origin that was
    down, a limit that was too low). Each job keeps its progress and its
    failure reason in history; the next claim takes the FAILED -> LEASED edge.
    """
    own = ensure_own(cx)

    def retry(tx: Connection) -> list[sqlite3.Row]:
        now = _now(tx)
        rows = tx.execute(q("retry_failed"), {"now": now}).fetchall()
        for job in rows:
            history(
                tx,
                job["job_id"],
                "retry",
                at=now,
                from_state="FAILED",
                to_state="FAILED",
                detail=f"retry after: {job['fail_reason']}",
            )
        return rows

    rows = write(own, retry)
    for job in rows:
        telemetry.emit(
            "recovered",
            job=job["job_id"],
            token=None,
            state="FAILED",
            what="failed job made retryable",
        )
    return len(rows)
