"""Names and durable moves of the files a job writes.

File names come from the job key and the lease token, never from URL or
artifact id text, so no planned row can name a path outside the output folder.
Part files live in the final file's folder, so publishing is a rename within
one file system.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

PART_RE = re.compile(r"^(?P<job>[0-9a-f]{64})\.(?P<token>\d+)\.part$")
FINAL_RE = re.compile(r"^(?P<job>[0-9a-f]{64})(?P<suffix>\.[a-z0-9]{1,8})?$")
SUFFIXES = frozenset({".pdf", ".html", ".xml", ".bin", ".txt", ".json"})


def part_name(job_id: str, token: int) -> str:
    """The part file of one lease token: ``<job_id>.<token>.part``."""
    return f"{job_id}.{int(token)}.part"


def final_name(job_id: str, suffix: str = ".bin") -> str:
    """The published file: ``<job_id><suffix>``, the suffix from a fixed list."""
    if suffix not in SUFFIXES:
        suffix = ".bin"
    return f"{job_id}{suffix}"


def sha256_file(
    path: str | os.PathLike[str], limit: int | None = None
) -> tuple[str, int]:
    """SHA-256 hex and size of a file (of its first ``limit`` bytes)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            want = 1 << 20 if limit is None else min(1 << 20, limit - size)
            if want <= 0:
                break
            block = f.read(want)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_parts(folder: str | os.PathLike[str]) -> list[tuple[Path, str, int]]:
    """The part files in ``folder`` as (path, job id, token)."""
    found: list[tuple[Path, str, int]] = []
    root = Path(folder)
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        match = PART_RE.match(entry.name)
        if match:
            found.append((entry, match["job"], int(match["token"])))
    return found


def list_finals(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """The published files in ``folder`` by job id."""
    found: dict[str, Path] = {}
    root = Path(folder)
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        match = FINAL_RE.match(entry.name)
        if match and entry.is_file():
            found[match["job"]] = entry
    return found
