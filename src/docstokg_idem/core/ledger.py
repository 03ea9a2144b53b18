"""The operation ledger: each side effect's result recorded once, replayed after.

An op is one side effect of a job (HEAD, STREAM, FINALIZE, INDEX), named by its
op key. :func:`run_effect` records the op as in progress (with an expiry, I10),
runs the effect, and records its result; the next call with the same key
replays the recorded result byte for byte instead of running the effect again
(I4). An op whose runner died between start and record is taken over by the
next runner (I9): never left stuck, never replayed as ``{}``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection, Mapping
from typing import Any

from . import telemetry
from .crashpoints import crashpoint
from .db import Connection, ensure_own, q, row, write
from .errors import (
    InvalidTransition,
    LeaseLost,
    OpInProgress,
    PayloadMismatch,
    ResultTooLarge,
)
from .jobs import _now, change_state, check_ttl, ensure_fence, history
from .keys import canonical_json, request_fingerprint
from .states import JobState, is_allowed

DEFAULT_OP_TTL_S = 300.0
MAX_RESULT_BYTES = 1 << 20

Effect = Callable[[], Mapping[str, Any]]
OnRecord = Callable[[Connection, dict[str, Any]], None]


def get_effect_result(cx: sqlite3.Connection, *, opkey: str) -> dict[str, Any] | None:
    """The recorded result of a succeeded op, or ``None``."""
    raw = get_effect_record(cx, opkey=opkey)
    return None if raw is None else _decode(raw)


def get_effect_record(cx: sqlite3.Connection, *, opkey: str) -> bytes | None:
    """The recorded result bytes (canonical JSON) of a succeeded op, or ``None``."""
    got = row(ensure_own(cx), "get_op", {"op_key": opkey})
    if got is None or got["status"] != "SUCCEEDED":
        return None
    return bytes(got["result"])


def get_op(cx: sqlite3.Connection, *, opkey: str) -> dict[str, Any] | None:
    got = row(ensure_own(cx), "get_op", {"op_key": opkey})
    return None if got is None else dict(got)


def _decode(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    assert isinstance(value, dict)
    return value


def _encode(result: Mapping[str, Any], opkey: str, limit: int) -> bytes:
    if not isinstance(result, Mapping):
        raise TypeError(
            f"effect of op {opkey!r} returned {type(result).__name__} {result!r:.80}; "
            "an effect must return a mapping that canonical JSON can encode"
        )
    raw = canonical_json(dict(result))
    if len(raw) > limit:
        raise ResultTooLarge(
            f"result of op {opkey!r} is {len(raw)} bytes of canonical JSON, over the "
            f"limit of {limit}; record a digest or a path instead of the payload, or "
            "raise max_result_bytes"
        )
    return raw


MODES = ("tracked", "atomic", "first_wins")


def _default_fingerprint(kind: str, job_id: str) -> str:
    """The fingerprint of an op called with no request: its kind and job."""
    return request_fingerprint({"kind": kind, "job_id": job_id})


def run_effect(
    cx: sqlite3.Connection,
    *,
    job_id: str,
    kind: str,
    opkey: str,
    effect_fn: Effect,
    token: int | None = None,
    owner: str | None = None,
    fingerprint: str | None = None,
    request: Any = None,
    ttl_s: float | None = DEFAULT_OP_TTL_S,
    mode: str = "tracked",
    start_state: JobState | str | None = None,
    then_state: JobState | str | None = None,
    allowed_from: Collection[JobState | str] | None = None,
    on_record: OnRecord | None = None,
    then_release: bool = False,
    locked: bool = False,
    max_result_bytes: int = MAX_RESULT_BYTES,
) -> dict[str, Any]:
    """Run ``effect_fn`` once for ``opkey`` and record its result; replay after.

    Args:
        token: the lease token the effect runs under. The start, the record and
            the state change are refused with :class:`LeaseLost` once that lease
            moved on (I7). Without a token the op is guarded by its own
            in-progress record and expiry only.
        fingerprint: what identifies the request (or ``request``, hashed); the
            same op key with another fingerprint raises :class:`PayloadMismatch`.
        ttl_s: how long the in-progress record holds off other runners; 0 means
            expired at once. ``None`` is an error.
        mode: ``"tracked"`` (default) commits an in-progress record, runs the
            effect, then commits the result. ``"atomic"`` does all three in one
            transaction, for an effect with nothing outside the database (an
            index entry). ``"first_wins"`` records nothing before the effect and
            keeps the first result recorded, for a safe, repeatable effect
            (HEAD).
        start_state: a state the job moves to in the start's transaction.
        then_state: a state the job moves to in the same transaction as the
            record (from ``allowed_from``, or from any state with a forward edge).
        on_record: called inside the record's transaction with the result, for
            writes that must commit with it (a manifest entry).
        then_release: release the lease in the record's transaction.
        locked: run the effect inside the record's transaction, holding the
            write lock, after the lease was checked (a rename into place).

    Raises:
        PayloadMismatch, OpInProgress, LeaseLost, ResultTooLarge; and whatever
        the effect raised, after recording it as FAILED (the op runs again on
        the next call).
    """
    own = ensure_own(cx)
    if mode not in MODES:
        raise ValueError(f"run_effect mode={mode!r} is not a mode; use one of {MODES}")
    ttl = check_ttl(ttl_s, "op ttl_s")
    if fingerprint is not None:
        fp = fingerprint
    elif request is not None:
        fp = request_fingerprint(request)
    else:
        fp = _default_fingerprint(kind, job_id)
    if then_release and (token is None or not owner):
        raise ValueError(
            f"run_effect(then_release=True) for op {opkey!r} needs the lease's token and "
            f"owner (got token={token!r}, owner={owner!r}); pass both, or release the "
            "lease yourself after the call"
        )
    ident = {"op_key": opkey, "token": token, "owner": owner}

    def record(tx: Connection, result: Mapping[str, Any]) -> bytes:
        return _record(
            tx,
            job_id,
            kind,
            ident,
            result,
            max_result_bytes,
            then_state,
            allowed_from,
            on_record,
            then_release,
        )

    then = None if then_state is None else (JobState(then_state), allowed_from)
    if mode == "first_wins":
        return _first_wins(own, job_id, kind, fp, ident, effect_fn, record, then)
    if mode == "atomic":
        return _atomic(
            own, job_id, kind, fp, ttl, ident, effect_fn, record, start_state, then
        )

    replay = write(
        own,
        lambda tx: _start(tx, job_id, kind, fp, ttl, ident, start_state, then),
    )
    own.last_replayed = replay is not None
    if replay is not None:
        return _replayed(own, job_id, kind, ident, replay)
    telemetry.emit("op_started", job=job_id, token=token, op=kind, key=opkey[:12])
    crashpoint("op.after_start")

    if locked:
        raised: list[BaseException] = []

        def run_and_record(tx: Connection) -> bytes:
            if token is not None:
                ensure_fence(tx, job_id, token, f"{kind} effect")
            try:
                result = effect_fn()
            except Exception as exc:
                raised.append(exc)  # recorded once this transaction rolled back
                raise
            crashpoint("op.after_effect")
            return record(tx, result)

        raw = _write_or_fail(own, run_and_record, job_id, kind, ident, raised)
    else:
        result = _call(own, effect_fn, job_id, kind, ident)
        crashpoint("op.after_effect")
        raw = _write_or_fail(own, lambda tx: record(tx, result), job_id, kind, ident)
    crashpoint("op.after_record")
    _completed(job_id, kind, ident, then_state)
    return _decode(raw)


def _completed(
    job_id: str, kind: str, ident: dict[str, Any], then_state: JobState | str | None
) -> None:
    telemetry.emit(
        "op_completed",
        job=job_id,
        token=ident["token"],
        op=kind,
        key=ident["op_key"][:12],
        state=str(then_state) if then_state else None,
    )
    if then_state is not None:
        telemetry.emit(
            "state_changed",
            job=job_id,
            token=ident["token"],
            state=str(JobState(then_state)),
        )


def _replayed(
    cx: Connection, job_id: str, kind: str, ident: dict[str, Any], raw: bytes
) -> dict[str, Any]:
    cx.last_replayed = True
    if cx.caught_up:  # the replay moved the state: that commit is a crash point too
        cx.caught_up = False
        crashpoint("state.after_commit")
    telemetry.emit(
        "op_replayed",
        job=job_id,
        token=ident["token"],
        op=kind,
        key=ident["op_key"][:12],
    )
    return _decode(raw)


def _first_wins(
    cx: Connection,
    job_id: str,
    kind: str,
    fp: str,
    ident: dict[str, Any],
    effect_fn: Effect,
    record: Callable[[Connection, Mapping[str, Any]], bytes],
    then: tuple[JobState, Collection[JobState | str] | None] | None = None,
) -> dict[str, Any]:
    """A repeatable effect: run it unless recorded, then keep the first result."""
    known = row(cx, "get_op", {"op_key": ident["op_key"]})
    if known is not None:
        _same_request(known, fp, ident, job_id, kind)
        if known["status"] == "SUCCEEDED":
            if then is not None and ident["token"] is not None:
                token, at = ident["token"], None
                write(cx, lambda tx: _catch_up(tx, job_id, token, at, None, then))
            return _replayed(cx, job_id, kind, ident, bytes(known["result"]))
    cx.last_replayed = False
    result = effect_fn()
    crashpoint("op.after_effect")

    def keep_first(tx: Connection) -> tuple[bytes, bool]:
        op = row(tx, "get_op", {"op_key": ident["op_key"]})
        if op is not None:
            _same_request(op, fp, ident, job_id, kind)
            if op["status"] == "SUCCEEDED":
                return bytes(op["result"]), True
        if ident["token"] is not None:
            ensure_fence(tx, job_id, ident["token"], f"record of {kind}")
        tx.execute(
            q("start_op"),
            {
                **ident,
                "job_id": job_id,
                "kind": kind,
                "fingerprint": fp,
                "now": _now(tx),
                "expires_at": _now(tx),
            },
        )
        return record(tx, result), False

    raw, first = write(cx, keep_first)
    if first:
        return _replayed(cx, job_id, kind, ident, raw)
    crashpoint("op.after_record")
    _completed(job_id, kind, ident, None)
    return _decode(raw)


def _atomic(
    cx: Connection,
    job_id: str,
    kind: str,
    fp: str,
    ttl: float,
    ident: dict[str, Any],
    effect_fn: Effect,
    record: Callable[[Connection, Mapping[str, Any]], bytes],
    start_state: JobState | str | None,
    then: tuple[JobState, Collection[JobState | str] | None] | None,
) -> dict[str, Any]:
    """Start, run and record in one transaction: no window for a crash between."""

    def once(tx: Connection) -> tuple[bytes, bool]:
        replay = _start(tx, job_id, kind, fp, ttl, ident, start_state, then)
        if replay is not None:
            return replay, True
        return record(tx, effect_fn()), False

    raw, replayed = write(cx, once)
    cx.last_replayed = replayed
    if replayed:
        return _replayed(cx, job_id, kind, ident, raw)
    crashpoint("op.after_record")
    _completed(job_id, kind, ident, then[0] if then else None)
    return _decode(raw)


def _catch_up(
    tx: Connection,
    job_id: str,
    token: int,
    now: float | None,
    start_state: JobState | str | None,
    then: tuple[JobState, Collection[JobState | str] | None] | None,
) -> None:
    """On a replay under a live lease, take the state moves the op implies.

    A job retried out of FAILED is LEASED again while its HEAD is recorded:
    replaying HEAD brings it back to HEAD_DONE. Moves the job is already past
    are skipped; a replay under a lease that is not live writes nothing.
    """
    at = _now(tx) if now is None else now
    got = row(tx, "fence", {"job_id": job_id, "token": token, "now": at})
    if got is None:
        return
    state = str(got[0])
    moves: list[tuple[JobState, Collection[JobState | str] | None]] = []
    if start_state is not None:
        moves.append((JobState(start_state), None))
    if then is not None:
        moves.append(then)
    for dst, allowed in moves:
        if state == dst.value:
            continue
        try:
            _ensure_edge(job_id, state, dst, allowed)
        except InvalidTransition:
            continue  # the job is past this move already
        change_state(tx, job_id, state, dst, at=at, token=token)
        tx.caught_up = True
        state = dst.value


def _same_request(
    op: sqlite3.Row, fp: str, ident: dict[str, Any], job_id: str, kind: str
) -> None:
    if (op["job_id"], op["kind"]) != (job_id, kind):
        raise PayloadMismatch(
            f"op key {ident['op_key']!r} belongs to {op['kind']} of job "
            f"{op['job_id']!r}, and is now asked for as {kind} of job {job_id!r}; "
            "derive op keys with op_key(kind, job_id, ...) so that each names one op"
        )
    if op["fingerprint"] != fp:
        raise PayloadMismatch(
            f"op key {ident['op_key']!r} ({op['kind']} of job {op['job_id']!r}) was "
            f"recorded with request fingerprint {op['fingerprint'][:16]}…, and is now "
            f"asked for with {fp[:16]}…; an op key names one request. Derive a new "
            "op key for the new request (the recorded result is unchanged)"
        )


def _start(
    tx: Connection,
    job_id: str,
    kind: str,
    fp: str,
    ttl: float,
    ident: dict[str, Any],
    start_state: JobState | str | None = None,
    then: tuple[JobState, Collection[JobState | str] | None] | None = None,
) -> bytes | None:
    now = _now(tx)
    op = row(tx, "get_op", {"op_key": ident["op_key"]})
    if op is not None:
        _same_request(op, fp, ident, job_id, kind)
        if op["status"] == "SUCCEEDED":
            if ident["token"] is not None:
                _catch_up(tx, job_id, ident["token"], now, start_state, then)
            return bytes(op["result"])
        held = op["status"] == "IN_PROGRESS" and op["expires_at"] > max(
            now, op["started_at"]
        )
        if held and ident["token"] is None:
            raise OpInProgress(
                f"op {ident['op_key']!r} ({kind}) is in progress by {op['owner']!r} until "
                f"{op['expires_at']:.3f} (now {now:.3f}); retry after it expires"
            )
    state = None
    if ident["token"] is not None:
        state = ensure_fence(tx, job_id, ident["token"], f"start of {kind}", now)
    if start_state is not None:
        _move(tx, job_id, state, JobState(start_state), None, ident["token"], now)
        state = JobState(start_state).value
    if then is not None:  # refuse before the effect runs, not after (I9)
        _ensure_edge(job_id, _current(tx, job_id, state), then[0], then[1])
    tx.execute(
        q("start_op"),
        {
            **ident,
            "job_id": job_id,
            "kind": kind,
            "fingerprint": fp,
            "now": now,
            "expires_at": now + ttl,
        },
    )
    return None


def _call(
    cx: Connection, fn: Effect, job_id: str, kind: str, ident: dict[str, Any]
) -> Mapping[str, Any]:
    try:
        return fn()
    except Exception as exc:
        _record_failure(cx, job_id, kind, ident, exc)
        raise


def _write_or_fail(
    cx: Connection,
    fn: Callable[[Connection], bytes],
    job_id: str,
    kind: str,
    ident: dict[str, Any],
    effect_errors: list[BaseException] | None = None,
) -> bytes:
    """Run the record's transaction; record a failure after it rolled back.

    An unrecordable result, or an error of an effect run inside the
    transaction (``effect_errors``), marks the op FAILED so that it runs again.
    """
    try:
        return write(cx, fn)
    except Exception as exc:
        if isinstance(exc, (ResultTooLarge, TypeError)) or (
            effect_errors and exc is effect_errors[-1]
        ):
            _record_failure(cx, job_id, kind, ident, exc)
        raise


def _record_failure(
    cx: Connection, job_id: str, kind: str, ident: dict[str, Any], exc: BaseException
) -> None:
    error = f"{type(exc).__name__}: {exc}"[:2000]
    done = write(
        cx,
        lambda tx: (
            tx.execute(
                q("fail_op"), {**ident, "error": error, "now": _now(tx)}
            ).rowcount
        ),
    )
    exc.add_note(
        f"op {kind} of job {job_id} (token {ident['token']}) "
        + (
            "recorded as FAILED; it runs again on the next call"
            if done
            else "was taken over by another runner meanwhile"
        )
    )
    telemetry.emit("op_failed", job=job_id, token=ident["token"], op=kind, error=error)


def _record(
    tx: Connection,
    job_id: str,
    kind: str,
    ident: dict[str, Any],
    result: Mapping[str, Any],
    limit: int,
    then_state: JobState | str | None,
    allowed_from: Collection[JobState | str] | None,
    on_record: OnRecord | None,
    then_release: bool = False,
) -> bytes:
    raw = _encode(result, ident["op_key"], limit)
    now = _now(tx)
    token = ident["token"]
    state = ensure_fence(tx, job_id, token, f"record of {kind}", now) if token else None
    done = tx.execute(q("record_op"), {**ident, "result": raw, "now": now}).rowcount
    if done != 1:
        raise LeaseLost(
            f"record of {kind} refused for job {job_id!r}: the op {ident['op_key']!r} is no "
            f"longer in progress under token {token} / owner {ident['owner']!r} (another "
            "runner took it over); stop working on this job"
        )
    if then_state is not None:
        _move(tx, job_id, state, JobState(then_state), allowed_from, token, now)
    if on_record is not None:
        on_record(tx, _decode(raw))
    if then_release:
        released = row(
            tx,
            "release",
            {"job_id": job_id, "owner": ident["owner"], "token": token, "now": now},
        )
        if released is None:
            raise LeaseLost(
                f"release with the record of {kind} refused for job {job_id!r}"
            )
        history(
            tx,
            job_id,
            "release",
            at=now,
            token=released[0],
            owner=ident["owner"],
            from_state=released[1],
            to_state=released[1],
        )
    return raw


def _current(tx: Connection, job_id: str, state: str | None) -> str:
    if state is not None:
        return state
    got = row(tx, "get_job", {"job_id": job_id})
    assert got is not None
    return str(got["state"])


def _ensure_edge(
    job_id: str,
    state: str,
    dst: JobState,
    allowed_from: Collection[JobState | str] | None,
) -> None:
    """Raise :class:`InvalidTransition` unless ``state -> dst`` may be taken."""
    if state == dst.value:
        return
    allowed = {JobState(s) for s in allowed_from} if allowed_from is not None else None
    if (allowed is not None and JobState(state) not in allowed) or not is_allowed(
        state, dst
    ):
        sources = (
            allowed
            if allowed is not None
            else {s for s in JobState if is_allowed(s, dst)}
        )
        raise InvalidTransition(
            f"job {job_id!r} cannot move to {dst} with its op record: it is in {state}, "
            f"and the change is allowed only from {sorted(s.value for s in sources)} "
            "along a forward edge; the effect was not run"
        )


def _move(
    tx: Connection,
    job_id: str,
    state: str | None,
    dst: JobState,
    allowed_from: Collection[JobState | str] | None,
    token: int | None,
    now: float,
) -> None:
    state = _current(tx, job_id, state)
    if state == dst.value:
        return
    _ensure_edge(job_id, state, dst, allowed_from)
    change_state(tx, job_id, state, dst, at=now, token=token)


def record_progress(
    cx: sqlite3.Connection,
    *,
    opkey: str,
    token: int | None,
    owner: str | None,
    job_id: str,
    progress: int,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Record how far an in-progress op got (bytes received), fenced by the token."""
    own = ensure_own(cx)

    def save(tx: Connection) -> int:
        if token is not None:
            ensure_fence(tx, job_id, token, "progress record")
        return int(
            tx.execute(
                q("op_progress"),
                {
                    "op_key": opkey,
                    "token": token,
                    "owner": owner,
                    "progress": progress,
                    "meta": canonical_json(dict(meta or {})).decode(),
                },
            ).rowcount
        )

    if write(own, save) != 1:
        raise LeaseLost(f"progress record refused: op {opkey!r} is no longer ours")


def reopen_op(
    cx: sqlite3.Connection, *, opkey: str, job_id: str, token: int, reason: str
) -> bool:
    """Set a succeeded op aside so that it runs again, under the live lease.

    For a result that points at something the world lost (a part file removed
    by the reconciler). The old record stays in the row's error text.
    """
    own = ensure_own(cx)

    def reopen(tx: Connection) -> int:
        ensure_fence(tx, job_id, token, "reopen of an op")
        return int(
            tx.execute(
                q("reopen_op"), {"op_key": opkey, "reason": reason, "now": _now(tx)}
            ).rowcount
        )

    done = write(own, reopen) == 1
    if done:
        telemetry.emit(
            "recovered", job=job_id, token=token, what="op reopened", reason=reason
        )
    return done


def add_manifest_entry(
    tx: Connection,
    *,
    job_id: str,
    final_name: str,
    sha256: str,
    size: int,
    token: int | None,
) -> None:
    """Write the job's manifest entry inside the caller's transaction (I3)."""
    tx.execute(
        q("insert_manifest"),
        {
            "job_id": job_id,
            "final_name": final_name,
            "sha256": sha256,
            "size": size,
            "token": token,
            "now": _now(tx),
        },
    )


def set_digest(
    tx: Connection, *, job_id: str, final_name: str, sha256: str, size: int
) -> None:
    """Record the digest and final name a job's body must publish under."""
    tx.execute(
        q("set_final"),
        {"job_id": job_id, "final_name": final_name, "sha256": sha256, "size": size},
    )


def manifest_entries(cx: sqlite3.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in ensure_own(cx).execute(q("manifest_entries")).fetchall()]
