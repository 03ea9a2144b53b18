"""The reconciler: heal what crashed workers left behind (I1, I8).

- an expired lease is cleared; its job stays at its last durable state and can
  be claimed again;
- an op in progress under a dead lease, or past its expiry, is marked
  ABANDONED, so that the next runner takes it over;
- a part file whose token is not the active lease of its job is removed;
- a FINALIZED job whose file vanished goes back to be downloaded again, with
  the reason in its history;
- a FINALIZED job whose worker died before writing its manifest entry is
  indexed, once its file is checked against the recorded digest;
- a complete file in place whose job is not FINALIZED (a worker died between
  the rename and its record) is hashed; if it matches the recorded digest the
  job is finalized and indexed, otherwise the file is removed.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import telemetry
from .db import Connection, ensure_own, q, row, write
from .files import PART_RE, list_finals, list_parts, sha256_file
from .jobs import _claim_now, change_state, history
from .states import DONE, REPAIR_EDGES, JobState

#: The op kinds a repaired job must run again.
REDO_KINDS = json.dumps(["STREAM", "FINALIZE", "INDEX"])


@dataclass
class ReconcileReport:
    """What one reconcile pass healed."""

    leases_cleared: int = 0
    ops_abandoned: int = 0
    parts_removed: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    indexed: list[str] = field(default_factory=list)
    strays_removed: list[str] = field(default_factory=list)

    def total(self) -> int:
        return (
            self.leases_cleared
            + self.ops_abandoned
            + len(self.parts_removed)
            + len(self.repaired)
            + len(self.adopted)
            + len(self.indexed)
            + len(self.strays_removed)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "leases_cleared": self.leases_cleared,
            "ops_abandoned": self.ops_abandoned,
            "parts_removed": len(self.parts_removed),
            "repaired": len(self.repaired),
            "adopted": len(self.adopted),
            "indexed": len(self.indexed),
            "strays_removed": len(self.strays_removed),
        }


def cleanup_stale_leases(cx: sqlite3.Connection, now: float | None = None) -> int:
    """Clear every expired lease; return how many. States are kept."""
    own = ensure_own(cx)

    def clear(tx: Connection) -> int:
        at = _claim_now(tx) if now is None else now
        count = 0
        for lease in tx.execute(q("expired_leases"), {"now": at}).fetchall():
            done = tx.execute(
                q("clear_lease"),
                {"job_id": lease["job_id"], "token": lease["lease_token"], "now": at},
            ).rowcount
            if done:
                history(
                    tx,
                    lease["job_id"],
                    "expire",
                    at=at,
                    token=lease["lease_token"],
                    owner=lease["lease_owner"],
                    from_state=lease["state"],
                )
                telemetry.emit(
                    "recovered",
                    job=lease["job_id"],
                    token=lease["lease_token"],
                    state=lease["state"],
                    what="expired lease cleared",
                )
                count += 1
        return count

    return write(own, clear)


def cleanup_stale_ops(cx: sqlite3.Connection, now: float | None = None) -> int:
    """Mark ops in progress under a dead lease or past their expiry ABANDONED."""
    own = ensure_own(cx)

    def abandon(tx: Connection) -> int:
        at = _claim_now(tx) if now is None else now
        count = 0
        for op in tx.execute(q("stale_ops"), {"now": at}).fetchall():
            reason = (
                f"abandoned at {at:.3f}: its runner (token {op['token']}) died "
                "or its lease ended before the result was recorded"
            )
            count += tx.execute(
                q("abandon_op"), {"op_key": op["op_key"], "reason": reason, "now": at}
            ).rowcount
            telemetry.emit(
                "recovered",
                job=op["job_id"],
                token=op["token"],
                op=op["kind"],
                what="abandoned op",
            )
        return count

    return write(own, abandon)


def reconcile_jobs(
    cx: sqlite3.Connection,
    staging_root: str | os.PathLike[str],
    *,
    now: float | None = None,
    repair_all: bool = False,
) -> ReconcileReport:
    """Run every healing step over the database and the output folder.

    Raises:
        ValueError: ``staging_root`` does not exist, or every published job's
            file is missing from it (a wrong folder, most likely) and
            ``repair_all`` is not set: nothing is changed then.
    """
    own = ensure_own(cx)
    _ensure_output_folder(own, staging_root, repair_all)
    report = ReconcileReport()
    report.leases_cleared = cleanup_stale_leases(own, now)
    report.ops_abandoned = cleanup_stale_ops(own, now)
    _remove_dead_parts(own, staging_root, report, now)
    _repair_missing(own, staging_root, report)
    _adopt_or_remove_finals(own, staging_root, report)
    _index_finalized(own, staging_root, report)
    return report


def _ensure_output_folder(
    cx: Connection, root: str | os.PathLike[str], repair_all: bool
) -> None:
    """Refuse a folder that cannot be the one the jobs were published to.

    A missing folder, or one holding none of two or more published files, is
    most likely a wrong ``--out``; taking it at its word would send every
    published job back to be downloaded.
    """
    published = cx.execute(q("jobs_in_states"), {"states": _PUBLISHED}).fetchall()
    if repair_all or not published:
        return
    if not os.path.isdir(root):
        raise ValueError(
            f"output folder {os.fspath(root)!r} does not exist, yet {len(published)} jobs "
            "were published; pass the folder the files were downloaded to (--out), or "
            "repair_all=True (reconcile --repair-all) to download them all again"
        )
    finals = list_finals(root)
    if len(published) > 1 and not any(job["job_id"] in finals for job in published):
        raise ValueError(
            f"none of the {len(published)} published files is in {os.fspath(root)!r}; "
            "is it the right output folder? Pass the folder the files were downloaded "
            "to, or repair_all=True (reconcile --repair-all) to download them again"
        )


_PUBLISHED = json.dumps(["FINALIZED", "INDEXED", "DEDUPED"])


def _referenced_parts(tx: Connection) -> set[tuple[str, int]]:
    """(job, token) of part files the ledger still points at (see the query)."""
    keep: set[tuple[str, int]] = set()
    for op in tx.execute(q("referenced_parts")).fetchall():
        if op["status"] != "SUCCEEDED" and op["progress_meta"]:
            token = json.loads(op["progress_meta"]).get("token")
            if isinstance(token, int):
                keep.add((op["job_id"], token))
        elif op["status"] == "SUCCEEDED" and op["result"]:
            try:
                part = json.loads(op["result"]).get("part")
            except (ValueError, AttributeError):
                continue  # a result that is not a JSON object names no part
            match = PART_RE.match(str(part or ""))
            if match:
                keep.add((op["job_id"], int(match["token"])))
    return keep


def _live_token(tx: Connection, job_id: str, now: float) -> int | None:
    job = row(tx, "get_job", {"job_id": job_id})
    if job is None or job["lease_owner"] is None or job["lease_until"] <= now:
        return None
    return int(job["lease_token"])


def _remove_dead_parts(
    cx: Connection,
    root: str | os.PathLike[str],
    report: ReconcileReport,
    now: float | None,
) -> None:
    for path, job_id, token in list_parts(root):

        def check(
            tx: Connection, path: Path = path, job_id: str = job_id, token: int = token
        ) -> bool:
            at = _claim_now(tx) if now is None else now
            if _live_token(tx, job_id, at) == token:
                return False
            if (job_id, token) in _referenced_parts(tx):
                return False  # recorded bytes a new lease resumes from (I9)
            path.unlink(missing_ok=True)  # under the write lock: no claim races it
            return True

        if write(cx, check):
            report.parts_removed.append(path.name)
            telemetry.emit(
                "recovered", job=job_id, token=token, what="part file removed"
            )


def _repair_missing(
    cx: Connection, root: str | os.PathLike[str], report: ReconcileReport
) -> None:
    finals = list_finals(root)
    done = json.dumps([s.value for s in DONE if s in REPAIR_EDGES])
    rows = cx.execute(q("jobs_in_states"), {"states": done}).fetchall()
    for job in rows:
        if job["job_id"] in finals:
            continue

        def repair(tx: Connection, job_id: str = job["job_id"]) -> bool:
            current = row(tx, "get_job", {"job_id": job_id})
            assert current is not None
            state = JobState(current["state"])
            if state not in REPAIR_EDGES or (_exists(root, current["final_name"])):
                return False
            at = _claim_now(tx)
            reason = f"repair: final file {current['final_name']!r} is missing"
            tx.execute(
                q("repair_job"),
                {"to_state": REPAIR_EDGES[state].value, "now": at, "job_id": job_id},
            )
            tx.execute(
                q("abandon_job_ops"),
                {
                    "reason": reason,
                    "job_id": job_id,
                    "kinds": REDO_KINDS,
                    "only_open": 0,
                },
            )
            tx.execute(q("delete_manifest"), {"job_id": job_id})
            history(
                tx,
                job_id,
                "repair",
                at=at,
                from_state=state.value,
                to_state=REPAIR_EDGES[state].value,
                detail=reason,
            )
            return True

        if write(cx, repair):
            report.repaired.append(job["job_id"])
            telemetry.emit(
                "recovered",
                job=job["job_id"],
                token=None,
                state=REPAIR_EDGES[JobState(job["state"])].value,
                what="final file missing: download again",
            )


def _exists(root: str | os.PathLike[str], name: str | None) -> bool:
    return bool(name) and os.path.exists(os.path.join(root, str(name)))


def _adopt_or_remove_finals(
    cx: Connection, root: str | os.PathLike[str], report: ReconcileReport
) -> None:
    for job_id, path in list_finals(root).items():
        job = row(cx, "get_job", {"job_id": job_id})
        if job is not None and JobState(job["state"]) in DONE:
            continue

        def settle(tx: Connection, job_id: str = job_id, path: Path = path) -> str:
            current = row(tx, "get_job", {"job_id": job_id})
            at = _claim_now(tx)
            if current is not None and JobState(current["state"]) in DONE:
                return "done"
            if current is not None and _live_token(tx, job_id, at) is not None:
                return "busy"
            if not path.exists():
                return "gone"
            digest, size = sha256_file(path)
            if (
                current is not None
                and current["sha256"] == digest
                and current["size"] == size
                and current["state"] == "STREAMING"
            ):
                _adopt(tx, current, path.name, at)
                return "adopted"
            if current is not None and (current["sha256"], current["size"]) == (
                digest,
                size,
            ):
                return "kept"  # the recorded body: a worker's FINALIZE will find it
            path.unlink()
            return "removed"

        outcome = write(cx, settle)
        if outcome == "adopted":
            report.adopted.append(job_id)
            telemetry.emit(
                "recovered",
                job=job_id,
                token=None,
                state="INDEXED",
                what="complete file adopted",
            )
        elif outcome == "removed":
            report.strays_removed.append(path.name)
            telemetry.emit(
                "recovered", job=job_id, token=None, what="stray file removed"
            )


def _adopt(tx: Connection, job: sqlite3.Row, name: str, at: float) -> None:
    job_id = job["job_id"]
    detail = "adopted by reconcile: the file in place matches the recorded digest"
    change_state(
        tx, job_id, "STREAMING", JobState.FINALIZED, at=at, token=None, detail=detail
    )
    tx.execute(
        q("set_final"),
        {
            "job_id": job_id,
            "final_name": name,
            "sha256": job["sha256"],
            "size": job["size"],
        },
    )
    tx.execute(
        q("insert_manifest"),
        {
            "job_id": job_id,
            "final_name": name,
            "sha256": job["sha256"],
            "size": job["size"],
            "token": None,
            "now": at,
        },
    )
    change_state(
        tx, job_id, "FINALIZED", JobState.INDEXED, at=at, token=None, detail=detail
    )
    tx.execute(
        q("abandon_job_ops"),
        {"reason": detail, "job_id": job_id, "kinds": None, "only_open": 1},
    )


def _index_finalized(
    cx: Connection, root: str | os.PathLike[str], report: ReconcileReport
) -> None:
    """Write the manifest entry of FINALIZED jobs whose worker died before it."""
    at = cx.clock.wall()
    for job in cx.execute(q("finalized_unindexed"), {"now": at}).fetchall():
        path = os.path.join(root, str(job["final_name"] or ""))
        if not job["final_name"] or not os.path.exists(path):
            continue  # _repair_missing sends it back to be downloaded
        if sha256_file(path) != (job["sha256"], job["size"]):
            continue

        def index(tx: Connection, job_id: str = job["job_id"]) -> bool:
            current = row(tx, "get_job", {"job_id": job_id})
            now = _claim_now(tx)
            if current is None or current["state"] != "FINALIZED":
                return False
            if current["lease_owner"] is not None and current["lease_until"] > now:
                return False
            detail = "indexed by reconcile: the worker died after FINALIZE"
            tx.execute(
                q("insert_manifest"),
                {
                    "job_id": job_id,
                    "final_name": current["final_name"],
                    "sha256": current["sha256"],
                    "size": current["size"],
                    "token": None,
                    "now": now,
                },
            )
            change_state(
                tx,
                job_id,
                "FINALIZED",
                JobState.INDEXED,
                at=now,
                token=None,
                detail=detail,
            )
            tx.execute(
                q("abandon_job_ops"),
                {"reason": detail, "job_id": job_id, "kinds": None, "only_open": 1},
            )
            return True

        if write(cx, index):
            report.indexed.append(job["job_id"])
            telemetry.emit(
                "recovered",
                job=job["job_id"],
                token=None,
                state="INDEXED",
                what="manifest entry written for a finalized job",
            )
