"""Deliberately broken variants of the core and the pipeline.

Each mutant is one small, obviously wrong patch. :func:`apply` installs it in
the current process only: the worker pool and the recovery pass call it at the
start of each child process (``WorkerSpec.mutant``, ``World.mutant``), so the
test process and every other test stay on the real code. The chaos tests in
``tests/chaos/test_mutants.py`` prove that the harness catches every one of
them, which is what makes a passing run of the real code mean something.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any

#: Every mutant, with what it breaks. The one registry.
MUTANTS: dict[str, str] = {
    "claim_ignores_live_lease": "the claim takes a job whose lease is still live",
    "finalize_without_fence": "FINALIZE renames and records without checking the token",
    "op_done_before_effect": "FINALIZE is recorded as done before its rename runs",
    "stale_lease_cleared_unclaimable": "clearing an expired lease sets claimable = 0",
    "results_truncated": "recorded op results are cut to their first 64 bytes",
    "shared_part_file": "one part file per job for every token, opened without O_EXCL",
    "ttl0_no_expiry": "a TTL of 0 is read as 'no expiry' (ten years)",
    "renew_without_token": "renew ignores the token and the expiry of the lease",
    "token_reused": "a claim keeps the job's token instead of taking a new one",
    "index_outside_transaction": "the manifest entry is written after the INDEX record",
    "no_dir_fsync": "FINALIZE does not fsync the folder after the rename",
}

TRUNCATE_AT = 64
TEN_YEARS_S = 10 * 365 * 24 * 3600.0

_applied: set[str] = set()


def apply(name: str) -> None:
    """Install mutant ``name`` in this process (once; a second call does nothing).

    Raises:
        ValueError: ``name`` is not in :data:`MUTANTS`.
    """
    if name not in MUTANTS:
        raise ValueError(
            f"mutant {name!r} is not known; known mutants: {', '.join(sorted(MUTANTS))}"
        )
    if name in _applied:
        return
    _PATCHES[name]()
    _applied.add(name)


# --- the patches ----------------------------------------------------------------------


def _replace_sql(name: str, pattern: str, new: str) -> None:
    """Rewrite the named query of the core in this process (a regex substitution)."""
    from ..core import db

    text, count = re.subn(pattern, new, db._QUERIES[name], flags=re.S)
    if not count:
        raise RuntimeError(
            f"mutant cannot find {pattern!r} in query {name!r}: "
            f"{db._QUERIES[name]!r}; update the mutant"
        )
    db._QUERIES[name] = text


def _claim_ignores_live_lease() -> None:
    # BUG: the expiry condition is gone, so a live lease is no obstacle.
    for query in ("next_claimable", "claim"):
        _replace_sql(query, r"ifnull\(lease_until, 0\) <= :now", "1 = 1")


def _finalize_without_fence() -> None:
    from ..core import jobs, ledger

    real = ledger.ensure_fence

    def ensure_fence(
        tx: Any, job_id: str, token: int, what: str, now: float | None = None
    ) -> str:
        if "FINALIZE" in what:  # BUG: FINALIZE trusts its token blindly
            return str(jobs.row(tx, "get_job", {"job_id": job_id})["state"])
        return real(tx, job_id, token, what, now)

    ledger.ensure_fence = ensure_fence


def _op_done_before_effect() -> None:
    from ..core import ledger
    from ..pipeline import worker

    real = ledger.run_effect

    @functools.wraps(real)
    def run_effect(
        cx: Any, *, effect_fn: Callable[[], Any], locked: bool = False, **kw: Any
    ) -> dict[str, Any]:
        if not locked:
            return real(cx, effect_fn=effect_fn, **kw)
        # BUG: the record (and the state change) commits first, the effect after.
        real(cx, effect_fn=lambda: {"promised": True}, **kw)
        return dict(effect_fn())

    ledger.run_effect = worker.run_effect = run_effect


def _stale_lease_cleared_unclaimable() -> None:
    # BUG: a job whose holder died can never be claimed again.
    _replace_sql(
        "clear_lease",
        r"SET lease_owner = NULL,",
        "SET claimable = 0, lease_owner = NULL,",
    )


def _results_truncated() -> None:
    from ..core import ledger

    real = ledger._encode

    def encode(result: Any, opkey: str, limit: int) -> bytes:
        return real(result, opkey, limit)[:TRUNCATE_AT]  # BUG: silently cut

    ledger._encode = encode


def _shared_part_file() -> None:
    from ..pipeline import worker

    # BUG: one part file per job, shared by every token, opened without O_EXCL.
    worker.part_name = lambda job_id, token: f"{job_id}.0.part"
    worker.os = _OsWithoutExcl()


class _OsWithoutExcl:
    """The ``os`` module, except that ``open`` drops ``O_EXCL``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        return os.open(path, flags & ~os.O_EXCL, mode, **kw)


def _ttl0_no_expiry() -> None:
    from ..core import jobs, ledger

    real = jobs.check_ttl

    def check_ttl(ttl_s: float | None, what: str = "ttl_s") -> float:
        ttl = real(ttl_s, what)
        return TEN_YEARS_S if ttl == 0 else ttl  # BUG: 0 means "never expires"

    jobs.check_ttl = ledger.check_ttl = check_ttl


def _renew_without_token() -> None:
    # BUG: any renew by the owner name succeeds, expired or reclaimed.
    _replace_sql(
        "renew",
        r"WHERE .*?(?=RETURNING)",
        "WHERE job_id = :job_id AND lease_owner = :owner\n",
    )


def _token_reused() -> None:
    # BUG: the next claim gets the same token as the last one.
    _replace_sql(
        "claim", r"lease_token = lease_token \+ 1", "lease_token = max(lease_token, 1)"
    )


def _index_outside_transaction() -> None:
    from ..core.db import write
    from ..pipeline import worker

    pending: list[dict[str, Any]] = []
    real_index = worker.Worker._index

    def add_later(tx: Any, **entry: Any) -> None:
        pending.append(entry)  # BUG: not written in the INDEX record's transaction

    def index(self: Any, stream: dict[str, Any]) -> dict[str, Any]:
        result = real_index(self, stream)
        while pending:
            entry = pending.pop()
            write(self.cx, lambda tx, e=entry: worker_add(tx, **e))
        return result

    worker_add = worker.add_manifest_entry
    worker.add_manifest_entry = add_later
    worker.Worker._index = index


def _no_dir_fsync() -> None:
    from ..pipeline import worker

    worker.fsync_dir = lambda folder: None  # BUG: the rename is not made durable


_PATCHES: dict[str, Callable[[], None]] = {
    "claim_ignores_live_lease": _claim_ignores_live_lease,
    "finalize_without_fence": _finalize_without_fence,
    "op_done_before_effect": _op_done_before_effect,
    "stale_lease_cleared_unclaimable": _stale_lease_cleared_unclaimable,
    "results_truncated": _results_truncated,
    "shared_part_file": _shared_part_file,
    "ttl0_no_expiry": _ttl0_no_expiry,
    "renew_without_token": _renew_without_token,
    "token_reused": _token_reused,
    "index_outside_transaction": _index_outside_transaction,
    "no_dir_fsync": _no_dir_fsync,
}
