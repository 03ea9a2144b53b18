"""Read plan files: JSON lines or CSV rows of work_id, artifact_id, url[, sha256].

Bad rows are reported with their line number and reason; good rows are kept,
so one typo never stops the rest of a plan.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import canonical_url, job_key
from ..core.errors import IdemError

FIELDS = ("work_id", "artifact_id", "url")

csv.field_size_limit(16 << 20)  # a URL may be long; a 16 MiB cell is still an error
SHA_RE = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class PlanRow:
    line: int
    work_id: str
    artifact_id: str
    url: str
    sha256: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "work_id": self.work_id,
            "artifact_id": self.artifact_id,
            "url": self.url,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class PlanError:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def read_plan(path: str | Path) -> tuple[list[PlanRow], list[PlanError]]:
    """Parse a plan file; JSON lines if it ends in .jsonl/.json or starts with '{'."""
    p = Path(path)
    text, errors = _decode(str(p), p.read_bytes())
    first = text.lstrip()[:1]
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson") or first == "{":
        rows, more = _read_jsonl(str(p), text)
    else:
        rows, more = _read_csv(str(p), text)
    rows, conflicts = _drop_conflicts(str(p), rows)
    return rows, sorted(errors + more + conflicts, key=lambda e: e.line)


def _drop_conflicts(
    path: str, rows: list[PlanRow]
) -> tuple[list[PlanRow], list[PlanError]]:
    """A row naming the same job as an earlier one with another sha256 is an error."""
    first: dict[tuple[str, str, str], PlanRow] = {}
    kept, errors = [], []
    for row in rows:
        key = (row.work_id, row.artifact_id, row.url)
        seen = first.setdefault(key, row)
        if seen is not row and seen.sha256 != row.sha256:
            errors.append(
                PlanError(
                    path,
                    row.line,
                    f"repeats the job of line {seen.line} with sha256 {row.sha256!r} instead "
                    f"of {seen.sha256!r}; keep one of the two rows",
                )
            )
            continue
        kept.append(row)
    return kept, errors


def _decode(path: str, data: bytes) -> tuple[str, list[PlanError]]:
    """The file's text, line by line; a line that is not UTF-8 becomes an error.

    A UTF-16 file (with its byte order mark) is decoded as such.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16"), []
        except UnicodeDecodeError as exc:
            return "", [
                PlanError(
                    path, 1, f"not valid UTF-16 ({exc.reason}); save the file as UTF-8"
                )
            ]
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    lines, errors = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            errors.append(
                PlanError(
                    path,
                    number,
                    f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                    "save the file as UTF-8",
                )
            )
            lines.append("")  # keeps the line numbers of the rows after it
    return "\n".join(lines), errors


def _read_jsonl(path: str, text: str) -> tuple[list[PlanRow], list[PlanError]]:
    rows, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(
                PlanError(
                    path,
                    number,
                    f"not valid JSON ({exc.msg} at column "
                    f"{exc.colno}); each line must be one "
                    "JSON object",
                )
            )
            continue
        if not isinstance(raw, dict):
            errors.append(
                PlanError(
                    path,
                    number,
                    f"expected a JSON object, got {type(raw).__name__} {raw!r:.60}",
                )
            )
            continue
        _check(path, number, raw, rows, errors)
    return rows, errors


def _read_csv(path: str, text: str) -> tuple[list[PlanRow], list[PlanError]]:
    rows: list[PlanRow] = []
    errors: list[PlanError] = []
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append(PlanError(path, reader.line_num, f"not a CSV row ({exc})"))
            continue
        number = reader.line_num
        if not record or not any(cell.strip() for cell in record):
            continue
        if header is None:
            cells = [c.strip().lower() for c in record]
            if set(FIELDS) <= set(cells):
                header = cells
                continue
            header = [*FIELDS, "sha256"]
        raw = dict(zip(header, (c.strip() for c in record), strict=False))
        if len(record) > len(header):
            errors.append(
                PlanError(
                    path,
                    number,
                    f"{len(record)} columns, expected at most "
                    f"{len(header)} ({', '.join(header)})",
                )
            )
            continue
        _check(path, number, raw, rows, errors)
    return rows, errors


def _check(
    path: str,
    number: int,
    raw: dict[str, Any],
    rows: list[PlanRow],
    errors: list[PlanError],
) -> None:
    wrong = [
        f for f in FIELDS if raw.get(f) is not None and not isinstance(raw[f], str)
    ]
    if wrong:
        shown = {f: raw[f] for f in wrong}
        errors.append(
            PlanError(
                path,
                number,
                f"{', '.join(wrong)} must be text (got {shown!r}); quote the value, "
                'e.g. "work_id": "7"',
            )
        )
        return
    missing = [
        f for f in FIELDS if not isinstance(raw.get(f), str) or not raw[f].strip()
    ]
    if missing:
        shown = {f: raw.get(f) for f in missing}
        errors.append(
            PlanError(
                path,
                number,
                f"missing or empty {', '.join(missing)} "
                f"(got {shown!r}); every row needs work_id, "
                "artifact_id and url",
            )
        )
        return
    sha = raw.get("sha256") or None
    if sha is not None and (not isinstance(sha, str) or not SHA_RE.match(sha)):
        errors.append(
            PlanError(
                path,
                number,
                f"sha256 {sha!r} is not 64 hex digits; "
                "leave it empty or give the full digest",
            )
        )
        return
    try:
        url = canonical_url(raw["url"])
    except (IdemError, ValueError) as exc:
        errors.append(PlanError(path, number, f"url {raw['url']!r}: {exc}"))
        return
    try:
        job_key(raw["work_id"], raw["artifact_id"], url)
    except (IdemError, ValueError) as exc:
        errors.append(PlanError(path, number, f"no job key for this row: {exc}"))
        return
    rows.append(
        PlanRow(
            number,
            raw["work_id"],
            raw["artifact_id"],
            url,
            sha.lower() if sha else None,
        )
    )
