"""The exactly-once checker: I1–I12 over the database, the files and the origin.

It reads the job database with plain SQL (it does not trust the code it
checks), the output folder, and optionally what the origin served. Each
violation names its invariant, says what is wrong, and carries the rows that
show it. ``verify`` in the CLI and the pytest plugin both print these.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.files import PART_RE, list_finals, list_parts, sha256_file
from ..core.keys import canonical_json, job_key
from ..core.states import DONE, EDGES, REPAIR_EDGES, JobState

INVARIANTS = {
    "I1": "no lost jobs",
    "I2": "one artifact",
    "I3": "one finalize",
    "I4": "one recorded result",
    "I5": "forward only",
    "I6": "single owner",
    "I7": "fencing",
    "I8": "no residue",
    "I9": "bounded re-execution",
    "I10": "no expiry-less lease",
    "I11": "gate off writes nothing",
    "I12": "deterministic keys",
}

EPS = 1e-6


@dataclass(frozen=True)
class Violation:
    invariant: str
    message: str
    rows: tuple[dict[str, Any], ...] = ()
    #: an effect that never happened (an INDEX lost), as opposed to one done twice
    lost: bool = False

    def __str__(self) -> str:
        head = f"{self.invariant} ({INVARIANTS[self.invariant]}): {self.message}"
        shown = "".join(
            f"\n      {json.dumps(r, default=str, sort_keys=True)}"
            for r in self.rows[:8]
        )
        more = f"\n      … {len(self.rows) - 8} more rows" if len(self.rows) > 8 else ""
        return head + shown + more


@dataclass
class Expected:
    """What the origin served for one job: size and SHA-256, and request counts."""

    size: int
    sha256: str
    full_gets: int | None = None
    #: how often the origin changed the artifact (a new validator) meanwhile;
    #: each change allows one more full GET (the stream restarts from byte 0)
    validator_changes: int = 0


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    jobs: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def broken(self) -> list[str]:
        return sorted({v.invariant for v in self.violations}, key=lambda s: int(s[1:]))

    def __str__(self) -> str:
        if self.ok:
            return f"exactly-once: {self.jobs} jobs, {', '.join(self.checked)} hold"
        lines = [
            f"exactly-once: {len(self.violations)} violations of "
            f"{', '.join(self.broken())} over {self.jobs} jobs"
        ]
        lines += [f"  - {v}" for v in self.violations]
        return "\n".join(lines)


def _rows(cx: sqlite3.Connection, sql: str, *args: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in cx.execute(sql, args).fetchall()]


def open_readonly(db_path: str | os.PathLike[str]) -> sqlite3.Connection:
    cx = sqlite3.connect(
        f"file:{os.fspath(db_path)}?mode=ro", uri=True, isolation_level=None
    )
    cx.row_factory = sqlite3.Row
    return cx


def check(
    db_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    expected: Mapping[str, Expected] | None = None,
    after_reconcile: bool = True,
    now: float | None = None,
    skip: Iterable[str] = (),
) -> Report:
    """Check every invariant that the database and folder can show."""
    cx = open_readonly(db_path)
    try:
        cx.execute("BEGIN")  # every table read from one snapshot, even mid-run
        return _check(
            cx, Path(out_dir), expected or {}, after_reconcile, now, set(skip)
        )
    finally:
        cx.close()


def check_gate_off(
    db_path: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    expected: Mapping[str, Expected] | None = None,
) -> Report:
    """I11: with the gate off the job and op tables are empty; files still whole."""
    report = Report(checked=["I11", "I2"])
    if db_path is not None and Path(db_path).exists():
        cx = open_readonly(db_path)
        try:
            tables = {r[0] for r in cx.execute("SELECT name FROM sqlite_master")}
            for table in ("jobs", "ops", "history", "manifest"):
                if table in tables:
                    n = cx.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                    if n:
                        report.violations.append(
                            Violation(
                                "I11", f"gate off, yet table {table} has {n} rows"
                            )
                        )
        finally:
            cx.close()
    parts = list_parts(out_dir)
    if parts:
        report.violations.append(
            Violation(
                "I2",
                "gate off left part files",
                tuple({"part": p.name} for p, _, _ in parts),
            )
        )
    for job_id, path in list_finals(out_dir).items():
        want = (expected or {}).get(job_id)
        if want is not None:
            digest, size = sha256_file(path)
            if (digest, size) != (want.sha256, want.size):
                report.violations.append(
                    Violation(
                        "I2",
                        f"{path.name} differs from the origin",
                        ({"sha256": digest, "size": size},),
                    )
                )
    report.jobs = len(list_finals(out_dir))
    return report


def _check(
    cx: sqlite3.Connection,
    out: Path,
    expected: Mapping[str, Expected],
    after_reconcile: bool,
    now: float | None,
    skip: set[str],
) -> Report:
    report = Report()
    jobs = {j["job_id"]: j for j in _rows(cx, "SELECT * FROM jobs")}
    report.jobs = len(jobs)
    hist: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for h in _rows(cx, "SELECT * FROM history ORDER BY seq"):
        hist[h["job_id"]].append(h)
    ops = _rows(cx, "SELECT * FROM ops")
    manifest = {m["job_id"]: m for m in _rows(cx, "SELECT * FROM manifest")}
    finals = list_finals(out)
    if now is None:
        meta = cx.execute(
            "SELECT value FROM meta WHERE key = 'wall_highwater'"
        ).fetchone()
        now = float(meta[0]) if meta else 0.0
    leases = {job_id: _leases(h) for job_id, h in hist.items()}

    checks = {
        "I1": lambda: _i1(jobs, now),
        "I2": lambda: _i2(jobs, finals, expected),
        "I3": lambda: _i3(jobs, hist, manifest, now if after_reconcile else None),
        "I4": lambda: _i4(ops),
        "I5": lambda: _i5(jobs, hist),
        "I6": lambda: _i6(leases),
        "I7": lambda: _i7(hist, ops, manifest, leases),
        "I8": lambda: _i8(jobs, ops, out, now) if after_reconcile else [],
        "I9": lambda: _i9(jobs, ops, hist, expected),
        "I10": lambda: _i10(jobs, ops),
        "I12": lambda: _i12(jobs),
    }
    for name, fn in checks.items():
        if name in skip:
            continue
        report.checked.append(name)
        report.violations.extend(fn())
    return report


def _terminal(job: Mapping[str, Any]) -> bool:
    state = job["state"]
    if state in {s.value for s in DONE}:
        return True
    return bool(state == "FAILED" and not job["claimable"] and job["fail_reason"])


def _i1(jobs: Mapping[str, dict[str, Any]], now: float) -> list[Violation]:
    lost = [j for j in jobs.values() if not _terminal(j)]
    if not lost:
        return []
    return [
        Violation(
            "I1",
            f"{len(lost)} planned jobs are not terminal after recovery",
            tuple(_brief(j) for j in lost),
        )
    ]


def _brief(job: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "job_id",
        "state",
        "lease_owner",
        "lease_until",
        "lease_token",
        "attempts",
        "fail_reason",
    )
    return {k: job[k] for k in keys if k in job}


def _i2(
    jobs: Mapping[str, dict[str, Any]],
    finals: Mapping[str, Path],
    expected: Mapping[str, Expected],
) -> list[Violation]:
    out = []
    published = {
        JobState.FINALIZED.value,
        JobState.INDEXED.value,
        JobState.DEDUPED.value,
    }
    for job_id, job in jobs.items():
        path = finals.get(job_id)
        if job["state"] in published:
            if path is None:
                out.append(
                    Violation(
                        "I2",
                        f"job {job_id[:12]} is {job['state']} but has no final file",
                        (_brief(job),),
                    )
                )
                continue
            digest, size = sha256_file(path)
            want = expected.get(job_id)
            ok = (digest, size) == (job["sha256"], job["size"])
            if want is not None:
                ok = ok and (digest, size) == (want.sha256, want.size)
            if job["expected_sha256"]:
                ok = ok and digest == job["expected_sha256"]
            if not ok:
                out.append(
                    Violation(
                        "I2",
                        f"final file {path.name} does not match what the origin served",
                        (
                            {
                                "file_sha256": digest,
                                "file_size": size,
                                "recorded_sha256": job["sha256"],
                                "recorded_size": job["size"],
                                "origin_sha256": want.sha256 if want else None,
                                "origin_size": want.size if want else None,
                            },
                        ),
                    )
                )
        elif path is not None:
            out.append(
                Violation(
                    "I2",
                    f"final file {path.name} exists for job {job_id[:12]} "
                    f"in state {job['state']}",
                    (_brief(job),),
                )
            )
    for job_id, path in finals.items():
        if job_id not in jobs:
            out.append(
                Violation("I2", f"final file {path.name} belongs to no planned job")
            )
    return out


def _i3(
    jobs: Mapping[str, dict[str, Any]],
    hist: Mapping[str, list[dict[str, Any]]],
    manifest: Mapping[str, dict[str, Any]],
    recovered_at: float | None,
) -> list[Violation]:
    """One FINALIZED transition and one manifest entry per published job.

    After recovery (``recovered_at`` set) a FINALIZED job that nobody holds
    must have its manifest entry too: else its INDEX was lost.
    """
    out = []
    for job_id, job in jobs.items():
        events = hist.get(job_id, [])
        last_repair = max(
            (i for i, h in enumerate(events) if h["event"] == "repair"), default=-1
        )
        finals = [
            h
            for h in events[last_repair + 1 :]
            if h["event"] == "state" and h["to_state"] == "FINALIZED"
        ]
        done = job["state"] in {"FINALIZED", "INDEXED", "DEDUPED"}
        if done and len(finals) != 1 or not done and finals:
            out.append(
                Violation(
                    "I3",
                    f"job {job_id[:12]} has {len(finals)} FINALIZED "
                    f"transitions in state {job['state']}",
                    tuple(finals),
                )
            )
        indexed = job["state"] in {"INDEXED", "DEDUPED"}
        if indexed and job_id not in manifest:
            out.append(
                Violation(
                    "I3",
                    f"job {job_id[:12]} is {job['state']} with no manifest entry",
                    (_brief(job),),
                )
            )
        unindexed = job["state"] == "FINALIZED" and job_id not in manifest
        if unindexed and recovered_at is not None and not _held(job, recovered_at):
            out.append(
                Violation(
                    "I3",
                    f"job {job_id[:12]} stayed FINALIZED with no manifest "
                    "entry after recovery: its INDEX was lost",
                    (_brief(job),),
                    lost=True,
                )
            )
        if job_id in manifest and not indexed and job["state"] != "FINALIZED":
            out.append(
                Violation(
                    "I3",
                    f"manifest entry for job {job_id[:12]} in state {job['state']}",
                    (manifest[job_id],),
                )
            )
    return out


def _held(job: Mapping[str, Any], now: float) -> bool:
    return job["lease_owner"] is not None and job["lease_until"] > now


def _i4(ops: list[dict[str, Any]]) -> list[Violation]:
    out = []
    for op in ops:
        if op["status"] != "SUCCEEDED":
            continue
        raw = bytes(op["result"] or b"")
        try:
            again = canonical_json(json.loads(raw))
        except ValueError:
            again = b""
        if again != raw:
            out.append(
                Violation(
                    "I4",
                    f"op {op['op_key'][:12]} ({op['kind']}) result does "
                    "not replay byte for byte",
                    (
                        {
                            "op_key": op["op_key"],
                            "result": raw[:200].decode("utf-8", "replace"),
                        },
                    ),
                )
            )
    return out


def _i5(
    jobs: Mapping[str, dict[str, Any]], hist: Mapping[str, list[dict[str, Any]]]
) -> list[Violation]:
    out = []
    for job_id, events in hist.items():
        state = "PLANNED"
        for h in events:
            if h["event"] not in ("state", "claim", "repair"):
                continue
            src, dst = h["from_state"], h["to_state"]
            if src != state:
                out.append(
                    Violation(
                        "I5",
                        f"job {job_id[:12]} history jumps from {state} "
                        f"to an edge out of {src}",
                        (h,),
                    )
                )
            ok = (
                (
                    h["event"] == "claim"
                    and (
                        src == dst or (src in ("PLANNED", "FAILED") and dst == "LEASED")
                    )
                )
                or (h["event"] == "state" and JobState(dst) in EDGES[JobState(src)])
                or (
                    h["event"] == "repair"
                    and REPAIR_EDGES.get(JobState(src)) == JobState(dst)
                    and (h["detail"] or "").startswith("repair:")
                )
            )
            if not ok:
                out.append(
                    Violation(
                        "I5",
                        f"job {job_id[:12]} took edge {src} -> {dst} "
                        f"({h['event']}), which is not allowed",
                        (h,),
                    )
                )
            state = dst
        if job_id in jobs and jobs[job_id]["state"] != state and events:
            out.append(
                Violation(
                    "I5",
                    f"job {job_id[:12]} is {jobs[job_id]['state']} but its "
                    f"history ends in {state}",
                    (events[-1],),
                )
            )
    return out


@dataclass
class _Lease:
    token: int
    owner: str
    start: float
    end: float
    seq: int
    #: (when, valid until) of an expiry with no reason before the lease's end
    cut: tuple[float, float] | None = None


def _leases(events: list[dict[str, Any]]) -> list[_Lease]:
    """Every claim of one job in order; a reused token is a lease of its own (I6)."""
    chain: list[_Lease] = []
    latest: dict[int, _Lease] = {}
    for h in events:
        token = h["token"]
        if h["event"] == "claim":
            latest[token] = _Lease(
                token, h["owner"], h["at"], h["lease_until"], h["seq"]
            )
            chain.append(latest[token])
        elif token in latest:
            lease = latest[token]
            if h["event"] == "renew":
                lease.end = (
                    max(lease.end, h["lease_until"])
                    if h["at"] < lease.end + EPS
                    else lease.end
                )
            elif h["event"] == "state" and h["to_state"] == "FAILED":
                lease.end = min(lease.end, h["at"])  # fail_job ends the lease
            elif h["event"] in ("release", "expire"):
                # Only the end of a dead owner's leases comes with a reason; any
                # other expiry before the lease's end took a live lease away.
                if (
                    h["event"] == "expire"
                    and not h["detail"]
                    and h["at"] < lease.end - EPS
                ):
                    lease.cut = (h["at"], lease.end)
                lease.end = min(lease.end, h["at"])
    return chain


def _i6(leases: Mapping[str, list[_Lease]]) -> list[Violation]:
    out = []
    for job_id, chain in leases.items():
        out += [
            Violation(
                "I6",
                f"job {job_id[:12]}: {lease.owner}'s token {lease.token} "
                f"was expired at {lease.cut[0]:.3f} while valid until "
                f"{lease.cut[1]:.3f}",
                (lease.__dict__,),
            )
            for lease in chain
            if lease.cut is not None
        ]
        for before, after in zip(chain, chain[1:], strict=False):
            if after.token <= before.token:
                out.append(
                    Violation(
                        "I6",
                        f"job {job_id[:12]}: token {after.token} claimed "
                        f"after token {before.token}",
                        (before.__dict__, after.__dict__),
                    )
                )
            if after.start < before.end - EPS:
                out.append(
                    Violation(
                        "I6",
                        f"job {job_id[:12]}: {after.owner} claimed token "
                        f"{after.token} at {after.start:.3f} while "
                        f"{before.owner}'s token {before.token} was valid "
                        f"until {before.end:.3f}",
                        (before.__dict__, after.__dict__),
                    )
                )
    return out


def _valid(chain: list[_Lease], token: int | None, at: float) -> bool:
    for lease in chain:
        if lease.token == token:
            return lease.start - EPS <= at <= lease.end + EPS
    return False


def _i7(
    hist: Mapping[str, list[dict[str, Any]]],
    ops: list[dict[str, Any]],
    manifest: Mapping[str, dict[str, Any]],
    leases: Mapping[str, list[_Lease]],
) -> list[Violation]:
    out = []
    for job_id, events in hist.items():
        chain = leases.get(job_id, [])
        for h in events:
            if (
                h["event"] == "state"
                and h["token"] is not None
                and not _valid(chain, h["token"], h["at"])
            ):
                out.append(
                    Violation(
                        "I7",
                        f"job {job_id[:12]}: state change to {h['to_state']} "
                        f"accepted with token {h['token']} outside its "
                        "lease",
                        (h,),
                    )
                )
    for op in ops:
        if op["status"] == "SUCCEEDED" and op["token"] is not None:
            if not _valid(leases.get(op["job_id"], []), op["token"], op["finished_at"]):
                out.append(
                    Violation(
                        "I7",
                        f"op {op['kind']} of job {op['job_id'][:12]} "
                        f"recorded with token {op['token']} outside its "
                        "lease",
                        ({k: op[k] for k in ("op_key", "token", "finished_at")},),
                    )
                )
    for job_id, entry in manifest.items():
        if entry["token"] is not None and not _valid(
            leases.get(job_id, []), entry["token"], entry["recorded_at"]
        ):
            out.append(
                Violation(
                    "I7",
                    f"manifest entry of job {job_id[:12]} written with a "
                    f"stale token {entry['token']}",
                    (entry,),
                )
            )
    return out


def _referenced(
    jobs: Mapping[str, dict[str, Any]], ops: list[dict[str, Any]]
) -> set[tuple[str, int]]:
    """Part files the ledger still points at, for a job not published yet.

    The recorded progress of an unfinished op names its token's part file, and
    a recorded STREAM result names the part FINALIZE will publish: a new lease
    resumes from them (I9), so they are not residue.
    """
    published = {"FINALIZED", "INDEXED", "DEDUPED", "SKIPPED_DUPLICATE"}
    keep: set[tuple[str, int]] = set()
    for op in ops:
        job = jobs.get(op["job_id"])
        if job is None or job["state"] in published:
            continue
        if op["status"] != "SUCCEEDED" and op["progress"] and op["progress_meta"]:
            token = json.loads(op["progress_meta"]).get("token")
            if isinstance(token, int):
                keep.add((op["job_id"], token))
        elif op["status"] == "SUCCEEDED" and op["result"]:
            try:
                name = str(json.loads(bytes(op["result"])).get("part") or "")
            except (ValueError, AttributeError):
                continue  # not a recorded STREAM result (I4 reports a broken one)
            match = PART_RE.match(name)
            if match:
                keep.add((op["job_id"], int(match["token"])))
    return keep


def _i8(
    jobs: Mapping[str, dict[str, Any]],
    ops: list[dict[str, Any]],
    out_dir: Path,
    now: float,
) -> list[Violation]:
    out = []
    keep = _referenced(jobs, ops)
    for path, job_id, token in list_parts(out_dir):
        job = jobs.get(job_id)
        live = (
            job is not None
            and job["lease_owner"] is not None
            and job["lease_until"] > now
            and job["lease_token"] == token
        )
        if not live and (job_id, token) not in keep:
            out.append(
                Violation(
                    "I8",
                    f"part file {path.name} left without a live lease",
                    ({"part": path.name, "job_state": job and job["state"]},),
                )
            )
    for op in ops:
        if op["status"] != "IN_PROGRESS":
            continue
        job = jobs.get(op["job_id"])
        live = (
            job is not None
            and job["lease_owner"] is not None
            and job["lease_until"] > now
            and (op["token"] is None or job["lease_token"] == op["token"])
        )
        if not live or op["expires_at"] <= now:
            out.append(
                Violation(
                    "I8",
                    f"op {op['kind']} of job {op['job_id'][:12]} in "
                    "progress under a dead lease",
                    ({k: op[k] for k in ("op_key", "token", "expires_at")},),
                )
            )
    return out


def _i9(
    jobs: Mapping[str, dict[str, Any]],
    ops: list[dict[str, Any]],
    hist: Mapping[str, list[dict[str, Any]]],
    expected: Mapping[str, Expected],
) -> list[Violation]:
    out = []
    claims = {
        job_id: sum(1 for h in events if h["event"] == "claim")
        for job_id, events in hist.items()
    }
    for op in ops:
        allowed = max(1, claims.get(op["job_id"], 0))
        if op["runs"] > allowed:
            out.append(
                Violation(
                    "I9",
                    f"op {op['kind']} of job {op['job_id'][:12]} ran "
                    f"{op['runs']} times over {allowed} leases",
                    ({k: op[k] for k in ("op_key", "runs", "status")},),
                )
            )
    for job_id, want in expected.items():
        if want.full_gets is None or job_id not in jobs:
            continue
        allowed = max(1, claims.get(job_id, 0)) + want.validator_changes
        if want.full_gets > allowed:
            out.append(
                Violation(
                    "I9",
                    f"artifact of job {job_id[:12]} was fetched in full "
                    f"{want.full_gets} times over {allowed} leases",
                    ({"job_id": job_id, "full_gets": want.full_gets},),
                )
            )
    return out


def _i10(
    jobs: Mapping[str, dict[str, Any]], ops: list[dict[str, Any]]
) -> list[Violation]:
    out = []
    for job in jobs.values():
        if job["lease_owner"] is not None and job["lease_until"] is None:
            out.append(
                Violation(
                    "I10",
                    f"job {job['job_id'][:12]} has a lease with no expiry",
                    (_brief(job),),
                )
            )
    for op in ops:
        if op["status"] == "IN_PROGRESS" and op["expires_at"] is None:
            out.append(
                Violation("I10", f"op {op['op_key'][:12]} in progress with no expiry")
            )
    return out


def _i12(jobs: Mapping[str, dict[str, Any]]) -> list[Violation]:
    out = []
    for job_id, job in jobs.items():
        again = job_key(job["work_id"], job["artifact_id"], job["url"])
        if again != job_id:
            out.append(
                Violation(
                    "I12",
                    f"job id {job_id[:12]} is not the key of its fields "
                    f"(recomputed {again[:12]})",
                    (_brief(job),),
                )
            )
    return out


def timeline(db_path: str | os.PathLike[str], *, job_id: str | None = None) -> str:
    """The history as text, one lane per worker: what each owner did and when."""
    cx = open_readonly(db_path)
    try:
        sql = (
            "SELECT * FROM history"
            + (" WHERE job_id = ?" if job_id else "")
            + " ORDER BY seq"
        )
        rows = _rows(cx, sql, *([job_id] if job_id else []))
    finally:
        cx.close()
    if not rows:
        return "(no history)"
    t0 = rows[0]["at"]
    owners = {
        (h["job_id"], h["token"]): h["owner"] for h in rows if h["event"] == "claim"
    }
    lanes: dict[str, list[str]] = defaultdict(list)
    for h in rows:
        who = h["owner"] or owners.get((h["job_id"], h["token"])) or "reconciler"
        what = h["event"]
        if h["from_state"] or h["to_state"]:
            what += f" {h['from_state'] or ''}->{h['to_state'] or ''}"
        if h["detail"]:
            what += f" ({h['detail']})"
        token = f"t{h['token']}" if h["token"] is not None else "--"
        lanes[who].append(
            f"+{h['at'] - t0:8.3f}s job {h['job_id'][:8]} {token:>3} {what}"
        )
    return "\n".join(
        f"[{who}]\n  " + "\n  ".join(lines) for who, lines in lanes.items()
    )
