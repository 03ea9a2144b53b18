"""Downloads with the feature gate off: no job or op table is touched (I11).

Each row is fetched into a part file of this process and published with the
same atomic rename as the tracked pipeline; a file already in place is kept.
Without the ledger there is no resume and no exactly-once claim: rows are
split between workers by position, so each row has one worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import urllib3

from ..core.files import final_name, fsync_dir
from ..core.keys import job_key
from .http import Client, HttpConfig, HttpError
from .worker import WorkerStats, suffix_for

log = logging.getLogger("docstokg_idem.legacy")


def download_untracked(
    rows: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    http: HttpConfig | None = None,
    shard: tuple[int, int] = (0, 1),
    *,
    durable: bool = True,
) -> WorkerStats:
    """Fetch every row of this shard (``index % count == shard index``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    client = Client(http, slots_dir=out / ".hosts")
    stats = WorkerStats()
    index, count = shard
    try:
        for n, spec in enumerate(rows):
            if n % count != index:
                continue
            try:
                _fetch_one(client, spec, out, stats, durable)
            except (HttpError, OSError) as exc:
                stats.jobs_failed += 1
                log.warning("failed url=%s (untracked): %s", spec["url"], exc)
    finally:
        client.close()
    return stats


def _fetch_one(
    client: Client,
    spec: Mapping[str, Any],
    out: Path,
    stats: WorkerStats,
    durable: bool,
) -> None:
    job_id = job_key(spec["work_id"], spec["artifact_id"], spec["url"])
    if any(
        p.name.startswith(job_id) and not p.name.endswith(".part")
        for p in out.glob(f"{job_id}*")
    ):
        return
    part = out / f"{job_id}.{os.getpid()}.part"
    try:
        _publish(client, spec, job_id, part, out, stats, durable)
    except urllib3.exceptions.HTTPError as exc:  # a body cut short or reset
        raise HttpError(
            f"{spec['url']}: {type(exc).__name__}: {exc}", retryable=True
        ) from None
    finally:
        part.unlink(missing_ok=True)  # renamed away on success; residue after a failure


def _publish(
    client: Client,
    spec: Mapping[str, Any],
    job_id: str,
    part: Path,
    out: Path,
    stats: WorkerStats,
    durable: bool,
) -> None:
    digest = hashlib.sha256()
    with client.get(spec["url"]) as resp:
        name = final_name(job_id, suffix_for(resp.headers.get("Content-Type")))
        stats.full_gets += 1
        with open(part, "wb") as f:
            for chunk in resp.stream(64 * 1024):
                f.write(chunk)
                digest.update(chunk)
                stats.bytes_received += len(chunk)
            f.flush()
            if durable:
                os.fsync(f.fileno())
    expected = spec.get("sha256")
    if expected and digest.hexdigest() != expected:
        raise HttpError(
            f"{spec['url']}: SHA-256 {digest.hexdigest()} is not the planned "
            f"{expected}",
            retryable=True,
        )
    os.replace(part, out / name)
    fsync_dir(out)
    stats.jobs_done += 1
