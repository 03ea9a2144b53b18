"""The reference download worker: claim, HEAD, stream, finalize, index, release.

Each step is an op of the ledger (see DESIGN's effect table):

- ``HEAD`` is safe to repeat; its first recorded result wins.
- ``STREAM`` writes into a part file of the worker's own lease token, created
  exclusively in the output folder. Progress (bytes whose receipt was flushed)
  is recorded as it goes; a worker that takes over a job copies only recorded
  bytes from the old token's part file and asks the origin for the rest with
  ``Range`` and ``If-Range``; a changed validator restarts from byte 0.
- ``FINALIZE`` runs while holding the database's write lock after checking the
  lease: if the final file already holds the recorded digest it does nothing,
  else it fsyncs the part, renames it into place and fsyncs the folder.
- ``INDEX`` writes the manifest entry in the same transaction as its record.

The lease is renewed on a schedule while streaming; a refused renewal stops
the job at once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import (
    JobState,
    Lease,
    LeaseLost,
    add_manifest_entry,
    connect,
    get_op,
    lease_next_job,
    op_key,
    record_progress,
    reopen_op,
    run_effect,
    set_digest,
)
from ..core.crashpoints import crashpoint, set_worker_name
from ..core.db import Connection, close
from ..core.files import final_name, fsync_dir, part_name, sha256_file
from .http import BodyTooLarge, Client, HttpConfig, HttpError

log = logging.getLogger("docstokg_idem.worker")

SUFFIX_BY_TYPE = {
    "application/pdf": ".pdf",
    "text/html": ".html",
    "application/xml": ".xml",
    "text/xml": ".xml",
    "application/json": ".json",
    "text/plain": ".txt",
}


#: errno values that say the output folder or its disk is at fault, not the job
_ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
)


class EnvironmentTrouble(RuntimeError):
    """The output folder cannot be written: the worker stops; no job is failed."""


class Stopping(Exception):
    """The worker was asked to stop; the job is released with its progress."""


class PartMissing(RuntimeError):
    """The recorded part file is gone (removed by the reconciler)."""


class ChecksumMismatch(RuntimeError):
    """The body's SHA-256 is not the digest the plan expected."""


@dataclass
class WorkerConfig:
    """How one worker process runs."""

    out_dir: str
    db_path: str
    owner: str = "worker"
    lease_ttl_s: float = 60.0
    renew_every_s: float | None = None
    chunk_bytes: int = 64 * 1024
    progress_every_bytes: int = 256 * 1024
    durable: bool = True
    http: HttpConfig = field(default_factory=HttpConfig)
    max_jobs: int | None = None
    synchronous: str = "NORMAL"
    #: log level of the worker process (None: leave logging as it is)
    log_level: int | None = None
    #: append every telemetry event of the worker to this JSON-lines file
    events_path: str | None = None

    @property
    def renew_every(self) -> float:
        return (
            self.renew_every_s
            if self.renew_every_s is not None
            else self.lease_ttl_s / 3
        )


@dataclass
class WorkerStats:
    """What one worker did; the harness and the demo add these up."""

    jobs_done: int = 0
    jobs_failed: int = 0
    lease_lost: int = 0
    replays: int = 0
    full_gets: int = 0
    range_gets: int = 0
    restarts_from_zero: int = 0
    bytes_received: int = 0
    bytes_copied: int = 0
    renewals: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def suffix_for(content_type: str | None) -> str:
    """A file suffix from a fixed list, chosen by the Content-Type (never by URL)."""
    base = (content_type or "").split(";")[0].strip().lower()
    return SUFFIX_BY_TYPE.get(base, ".bin")


class Worker:
    """One worker: a database connection, an HTTP client and a loop of jobs."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        cx: Connection | None = None,
        client: Client | None = None,
        stop: threading.Event | None = None,
    ):
        self.config = config
        self.out = Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cx = cx or connect(config.db_path, synchronous=config.synchronous)
        self._own_cx = cx is None
        self.client = client or Client(config.http, slots_dir=self.out / ".hosts")
        self.stop = stop or threading.Event()
        self.stats = WorkerStats()
        set_worker_name(config.owner)

    def close(self) -> None:
        self.client.close()
        if self._own_cx:
            close(self.cx)

    # --- the loop -------------------------------------------------------------

    def run(self) -> WorkerStats:
        """Claim and process jobs until none is claimable or stop is set."""
        done = 0
        while not self.stop.is_set():
            if self.config.max_jobs is not None and done >= self.config.max_jobs:
                break
            lease = lease_next_job(
                self.cx, owner=self.config.owner, ttl_s=self.config.lease_ttl_s
            )
            if lease is None:
                break
            self.process(lease)
            done += 1
        return self.stats

    def process(self, lease: Lease) -> None:
        """Take one claimed job as far as it goes; never raises for the job's faults."""
        job = lease.job_id[:12]
        try:
            self._process(lease)
        except LeaseLost as exc:
            self.stats.lease_lost += 1
            log.warning(
                "lease_lost job=%s token=%s owner=%s: %s",
                job,
                lease.token,
                self.config.owner,
                exc,
            )
        except Stopping:
            log.info(
                "stopping job=%s token=%s: progress kept, lease released",
                job,
                lease.token,
            )
            self._release_quietly(lease)
        except OSError as exc:
            if exc.errno in _ENVIRONMENT_ERRNOS:
                # The folder, not the job, is at fault: keep the job's attempts.
                self._release_quietly(lease)
                raise EnvironmentTrouble(
                    f"{exc.strerror} writing {exc.filename or self.out}: "
                    "free space or fix the folder's permissions, then run again; "
                    "the job keeps its recorded progress"
                ) from exc
            self._fail(lease, exc)
        except sqlite3.Error:
            raise  # the database is at fault, not the job: the worker stops
        except Exception as exc:  # an HTTP, checksum or transport fault of this job
            self._fail(lease, exc)

    def _fail(self, lease: Lease, exc: Exception) -> None:
        retryable = not isinstance(exc, (BodyTooLarge,)) and getattr(
            exc, "retryable", True
        )
        reason = f"{type(exc).__name__}: {exc}"
        self.stats.jobs_failed += 1
        try:
            lease.fail(reason, retryable=bool(retryable))
            log.warning(
                "failed job=%s token=%s state=FAILED retryable=%s: %s",
                lease.job_id[:12],
                lease.token,
                retryable,
                reason,
            )
        except LeaseLost:
            self.stats.lease_lost += 1

    def _release_quietly(self, lease: Lease) -> None:
        try:
            self.lease.release()
        except LeaseLost:
            pass

    def _process(self, lease: Lease) -> None:
        self.lease = lease
        head = self._head()
        if (
            head.get("size") is not None
            and head["size"] > self.config.http.max_body_bytes
        ):
            raise BodyTooLarge(
                f"{lease.url}: HEAD says {head['size']} bytes, over the "
                f"maximum of {self.config.http.max_body_bytes}"
            )
        stream = self._stream(head)
        if not self._publishable(stream):
            stream = self._stream_again(
                head,
                f"part file {stream['part']} recorded by "
                "STREAM is gone; streaming again",
            )
        try:
            self._finalize(stream)
        except PartMissing as exc:
            # The reconciler keeps a part a recorded STREAM names, so only a part
            # removed by hand between the check above and the rename gets here;
            # FINALIZE then starts a second time under one lease (I9 reports it).
            stream = self._stream_again(head, str(exc))
            self._finalize(stream)
        self._index(stream)
        self.stats.jobs_done += 1
        log.info(
            "done job=%s token=%s state=INDEXED size=%s",
            lease.job_id[:12],
            lease.token,
            stream["size"],
        )

    def _publishable(self, stream: dict[str, Any]) -> bool:
        """Check the world before FINALIZE starts: the part or the final file is there."""
        if (self.out / stream["part"]).exists():
            return True
        final = self.out / stream["final"]
        return final.exists() and sha256_file(final) == (
            stream["sha256"],
            stream["size"],
        )

    def _stream_again(self, head: dict[str, Any], reason: str) -> dict[str, Any]:
        """Set the recorded STREAM aside (its part file is gone) and stream anew."""
        reopen_op(
            self.cx,
            opkey=self._key("STREAM"),
            job_id=self.lease.job_id,
            token=self.lease.token,
            reason=reason,
        )
        return self._stream(head)

    @property
    def _power_safe(self) -> bool:
        """Whether recorded progress must survive power loss (synchronous=FULL)."""
        return self.config.durable and self.config.synchronous.upper() in (
            "FULL",
            "EXTRA",
        )

    def _key(self, kind: str) -> str:
        return op_key(kind, self.lease.job_id)

    def _effect(
        self, kind: str, fn: Any, *, stoppable: bool = True, **kw: Any
    ) -> dict[str, Any]:
        if stoppable:
            self._check_stop()
        result = run_effect(
            self.cx,
            job_id=self.lease.job_id,
            kind=kind,
            opkey=self._key(kind),
            effect_fn=fn,
            token=self.lease.token,
            owner=self.config.owner,
            ttl_s=self.lease.ttl_s,
            **kw,
        )
        if self.cx.last_replayed:
            self.stats.replays += 1
        return result

    # --- HEAD -----------------------------------------------------------------

    def _head(self) -> dict[str, Any]:
        def head() -> dict[str, Any]:
            crashpoint("head.before_request")
            answer = self.client.head(self.lease.url).as_dict()
            crashpoint("head.after_response")
            return answer

        answer = self._effect(
            "HEAD", head, then_state=JobState.HEAD_DONE, allowed_from={JobState.LEASED}
        )
        if self.lease.state == JobState.LEASED:
            # A retry out of FAILED is claimed as LEASED and replays the recorded
            # HEAD, which moves no state: take the HEAD_DONE edge here.
            self.lease.advance(JobState.HEAD_DONE, {JobState.LEASED})
        return answer

    # --- STREAM ---------------------------------------------------------------

    def _stream(self, head: dict[str, Any]) -> dict[str, Any]:
        lease = self.lease
        name = final_name(lease.job_id, suffix_for(head.get("content_type")))

        def record(tx: Connection, result: dict[str, Any]) -> None:
            set_digest(
                tx,
                job_id=lease.job_id,
                final_name=result["final"],
                sha256=result["sha256"],
                size=result["size"],
            )

        result = self._effect(
            "STREAM",
            lambda: self._receive(head, name),
            on_record=record,
            start_state=JobState.STREAMING,
        )
        if self.cx.last_replayed:
            # A replay moves no state: a retry out of FAILED that replays its
            # recorded STREAM takes the STREAMING edge here (FINALIZE needs it).
            self.lease.advance(
                JobState.STREAMING, {JobState.HEAD_DONE, JobState.RESUME_OK}
            )
        return result

    def _receive(self, head: dict[str, Any], name: str) -> dict[str, Any]:
        lease = self.lease
        part = self.out / part_name(lease.job_id, lease.token)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb", buffering=0) as f:
            crashpoint("stream.after_open")
            body = _Body(f)
            validator = self._adopt_recorded(body)
            self._remove_stale_parts(part)
            resumed = body.received
            validator = self._fetch(body, validator, head)
            crashpoint("stream.before_fsync")
            if self._power_safe:
                os.fsync(f.fileno())  # else FINALIZE's fsync before the rename suffices
            crashpoint("stream.after_fsync")
        sha = body.digest.hexdigest()
        expected_size = head.get("size")
        if (
            expected_size is not None
            and body.received != expected_size
            and not body.restarts
        ):
            part.unlink(missing_ok=True)
            raise HttpError(
                f"{lease.url}: received {body.received} bytes, HEAD said "
                f"{expected_size}",
                retryable=True,
            )
        if lease.expected_sha256 and sha != lease.expected_sha256.lower():
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{lease.url}: body SHA-256 {sha} is not the planned {lease.expected_sha256}"
            )
        return {
            "part": part.name,
            "final": name,
            "size": body.received,
            "sha256": sha,
            "etag": validator,
            "resumed_from": resumed,
            "restarted": body.restarts > 0,
            "content_type": head.get("content_type"),
        }

    def _remove_stale_parts(self, own: Path) -> None:
        """Remove part files of this job's older tokens: this lease holds the job now."""
        for token in range(1, self.lease.token):  # tokens of a job count up from 1
            other = self.out / part_name(self.lease.job_id, token)
            if other != own and other.exists():
                other.unlink(missing_ok=True)
                log.info(
                    "removed stale part job=%s token=%s file=%s",
                    self.lease.job_id[:12],
                    self.lease.token,
                    other.name,
                )

    def _adopt_recorded(self, body: _Body) -> str | None:
        """Copy the bytes an earlier token recorded into this token's part file.

        Only bytes whose receipt was recorded are copied (I9); anything the
        old part file holds past them is fetched again.
        """
        op = get_op(self.cx, opkey=self._key("STREAM"))
        if op is None or not op["progress"] or not op["progress_meta"]:
            return None
        meta = json.loads(op["progress_meta"])
        old = self.out / part_name(self.lease.job_id, int(meta.get("token", -1)))
        recorded = int(op["progress"])
        if meta.get("token") == self.lease.token or not old.exists():
            return None
        if old.stat().st_size < recorded:
            return None
        with open(old, "rb") as src:
            left = recorded
            while left:
                block = src.read(min(1 << 20, left))
                if not block:
                    break
                body.write(block)
                left -= len(block)
        if left:
            body.restart()
            return None
        self.stats.bytes_copied += recorded
        old.unlink(missing_ok=True)
        return str(meta.get("etag")) if meta.get("etag") else None

    def _fetch(
        self, body: _Body, validator: str | None, head: dict[str, Any]
    ) -> str | None:
        url = head.get("url") or self.lease.url
        failures = 0
        while True:
            try:
                start = body.received
                if start and start == head.get("size"):
                    return (
                        validator  # every byte is here and recorded: a range would 416
                    )
                with self.client.get(
                    url, start=start, if_range=validator if start else None
                ) as resp:
                    if start and resp.status == 200:
                        log.info(
                            "restart job=%s token=%s: validator changed, from byte 0",
                            self.lease.job_id[:12],
                            self.lease.token,
                        )
                        body.restart()
                        self.stats.restarts_from_zero += 1
                    if body.received:
                        self.stats.range_gets += 1
                    else:
                        self.stats.full_gets += 1
                    validator = resp.headers.get("ETag") or resp.headers.get(
                        "Last-Modified"
                    )
                    self._copy_body(resp, body, validator)
                    return validator
            except HttpError as exc:
                if exc.status == 416 and body.received:
                    body.restart()  # the resource shrank: start again from byte 0
                    self.stats.restarts_from_zero += 1
                    continue
                failures += 1
                if not exc.retryable or failures > self.config.http.retries:
                    raise
            except (Stopping, LeaseLost, BodyTooLarge):
                raise
            except Exception as exc:  # a short read or a reset mid-body: resume
                failures += 1
                if failures > self.config.http.retries or not _is_transport(exc):
                    raise
                log.info(
                    "resume job=%s token=%s at=%s after %s",
                    self.lease.job_id[:12],
                    self.lease.token,
                    body.received,
                    type(exc).__name__,
                )

    def _copy_body(self, resp: Any, body: _Body, validator: str | None) -> None:
        limit = self.config.http.max_body_bytes
        length = resp.headers.get("Content-Length")
        total = body.received + int(length) if length and length.isdigit() else None
        since = body.received
        for chunk in _whole_chunks(resp, self.config.chunk_bytes, body):
            self.stats.bytes_received += len(chunk)
            if body.received > limit:
                raise BodyTooLarge(f"{self.lease.url}: body passed {limit} bytes")
            crashpoint("stream.after_chunk")
            more = total is None or body.received < total
            if more and body.received - since >= self.config.progress_every_bytes:
                self._checkpoint(body, validator)
                since = body.received
            self._check_stop(body, validator)
            self._maybe_renew()

    def _checkpoint(self, body: _Body, validator: str | None) -> None:
        # Bytes written survive a killed process without fsync; with FULL
        # (power-loss) durability they are made durable before being recorded.
        if self._power_safe:
            os.fsync(body.file.fileno())
        record_progress(
            self.cx,
            opkey=self._key("STREAM"),
            token=self.lease.token,
            owner=self.config.owner,
            job_id=self.lease.job_id,
            progress=body.received,
            meta={"token": self.lease.token, "etag": validator},
        )
        crashpoint("stream.after_progress")

    def _maybe_renew(self) -> None:
        lease = self.lease
        spent = lease.ttl_s - lease.remaining()
        if spent >= self.config.renew_every:
            self.lease = lease.renew()
            self.stats.renewals += 1

    def _check_stop(
        self, body: _Body | None = None, validator: str | None = None
    ) -> None:
        if not self.stop.is_set():
            return
        if body is not None and body.received:
            self._checkpoint(body, validator)
        raise Stopping()

    # --- FINALIZE and INDEX ------------------------------------------------------

    def _finalize(self, stream: dict[str, Any]) -> dict[str, Any]:
        final = self.out / stream["final"]
        part = self.out / stream["part"]

        def publish() -> dict[str, Any]:
            result = {
                "final": final.name,
                "sha256": stream["sha256"],
                "size": stream["size"],
            }
            if final.exists() and sha256_file(final) == (
                stream["sha256"],
                stream["size"],
            ):
                return {**result, "already_in_place": True}
            if not part.exists():
                raise PartMissing(
                    f"part file {part.name} recorded by STREAM is gone; streaming again"
                )
            fd = os.open(part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            crashpoint("finalize.before_replace")
            os.replace(part, final)
            crashpoint("finalize.after_replace")
            fsync_dir(self.out)
            crashpoint("finalize.after_dirsync")
            return {**result, "already_in_place": False}

        try:
            return self._effect(
                "FINALIZE",
                publish,
                then_state=JobState.FINALIZED,
                allowed_from={JobState.STREAMING},
                locked=True,
            )
        except PartMissing:
            raise
        except OSError as exc:
            exc.add_note(
                "finalize never falls back to copy-and-delete; the job stays retryable"
            )
            raise

    def _index(self, stream: dict[str, Any]) -> dict[str, Any]:
        lease = self.lease

        def entry(tx: Connection, result: dict[str, Any]) -> None:
            crashpoint("index.before_record")
            add_manifest_entry(
                tx,
                job_id=lease.job_id,
                final_name=result["final"],
                sha256=result["sha256"],
                size=result["size"],
                token=lease.token,
            )

        # Not stoppable: a FINALIZED job is no longer claimable, so a stop here
        # would leave it published without its manifest entry.
        result = self._effect(
            "INDEX",
            lambda: {
                "final": stream["final"],
                "sha256": stream["sha256"],
                "size": stream["size"],
            },
            stoppable=False,
            then_state=JobState.INDEXED,
            mode="atomic",
            then_release=True,
            allowed_from={JobState.FINALIZED},
            on_record=entry,
        )
        crashpoint("index.after_record")
        return result


def _whole_chunks(resp: Any, size: int, body: _Body) -> Iterator[bytes]:
    """Write the body in chunks of exactly ``size`` bytes (the last may be short).

    The socket hands out bytes in whatever pieces arrived; regrouping them
    makes the chunk boundaries, and so the crash points, the same on every
    run. Bytes already received are written before a transport error
    propagates, so a resume starts after them.
    """
    pending = bytearray()
    try:
        while piece := resp.read1(size - len(pending)):
            pending += piece
            if len(pending) == size:
                chunk = bytes(pending)
                pending.clear()
                body.write(chunk)
                yield chunk
    finally:
        rest = bytes(pending)
        pending.clear()
        if rest:
            body.write(rest)
    if rest:
        yield rest


class _Body:
    """The part file being written, its running digest and its length."""

    def __init__(self, file: Any):
        self.file = file
        self.digest = hashlib.sha256()
        self.received = 0
        self.restarts = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.file.write(view)
            view = view[n:]
        self.digest.update(data)
        self.received += len(data)

    def restart(self) -> None:
        """Drop everything written: the validator changed, start from byte 0."""
        self.file.seek(0)
        self.file.truncate(0)
        self.digest = hashlib.sha256()
        self.received = 0
        self.restarts += 1


def _is_transport(exc: BaseException) -> bool:
    import urllib3

    return isinstance(
        exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)
    )


def run_worker(
    config: WorkerConfig, stop: threading.Event | None = None
) -> WorkerStats:
    """Run one worker until no job is claimable; the entry point of a worker process."""
    worker = Worker(config, stop=stop)
    try:
        return worker.run()
    finally:
        worker.close()


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the worker keeps its progress and releases."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


__all__ = [
    "Worker",
    "WorkerConfig",
    "WorkerStats",
    "run_worker",
    "suffix_for",
    "install_stop_signals",
    "shutil",
]
