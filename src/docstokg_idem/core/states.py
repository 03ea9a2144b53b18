"""Job progress states and the edges between them (I5)."""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):
    """How far a job got. Kept apart from the lease, and never moves backwards."""

    PLANNED = "PLANNED"  #: known, never claimed
    LEASED = "LEASED"  #: claimed at least once; nothing fetched yet
    HEAD_DONE = "HEAD_DONE"  #: HEAD recorded: size, validator, content type
    RESUME_OK = "RESUME_OK"  #: a partial body was found recorded; resume allowed
    STREAMING = "STREAMING"  #: the body is being received into a part file
    FINALIZED = "FINALIZED"  #: the final file is in place, with the recorded hash
    INDEXED = "INDEXED"  #: the manifest entry is written
    DEDUPED = "DEDUPED"  #: a later dedupe pass linked the artifact to its twins
    FAILED = "FAILED"  #: failed; retryable until the attempt limit, then final
    SKIPPED_DUPLICATE = "SKIPPED_DUPLICATE"  #: another job already holds this artifact

    def __str__(self) -> str:
        return self.value


S = JobState

#: The allowed forward edges. FAILED -> LEASED is the one retry edge.
EDGES: dict[JobState, frozenset[JobState]] = {
    S.PLANNED: frozenset({S.LEASED, S.FAILED, S.SKIPPED_DUPLICATE}),
    S.LEASED: frozenset({S.HEAD_DONE, S.FAILED, S.SKIPPED_DUPLICATE}),
    S.HEAD_DONE: frozenset({S.RESUME_OK, S.STREAMING, S.FAILED, S.SKIPPED_DUPLICATE}),
    S.RESUME_OK: frozenset({S.STREAMING, S.FAILED}),
    S.STREAMING: frozenset({S.FINALIZED, S.FAILED}),
    S.FINALIZED: frozenset({S.INDEXED, S.DEDUPED}),
    S.INDEXED: frozenset({S.DEDUPED}),
    S.DEDUPED: frozenset(),
    S.FAILED: frozenset({S.LEASED}),
    S.SKIPPED_DUPLICATE: frozenset(),
}

#: States a worker may still claim a job in (FAILED only while retryable).
ACTIVE = frozenset({S.PLANNED, S.LEASED, S.HEAD_DONE, S.RESUME_OK, S.STREAMING})

#: States at which a job is done (I1), FAILED counting only when final.
DONE = frozenset({S.FINALIZED, S.INDEXED, S.DEDUPED, S.SKIPPED_DUPLICATE})

#: The one backward edge, taken only by the reconciler with a recorded reason:
#: a FINALIZED job whose file vanished goes back to be downloaded again.
REPAIR_EDGES: dict[JobState, JobState] = {
    S.FINALIZED: S.HEAD_DONE,
    S.INDEXED: S.HEAD_DONE,
}


def is_allowed(src: JobState | str, dst: JobState | str) -> bool:
    """Tell whether ``src -> dst`` is a forward edge."""
    return JobState(dst) in EDGES[JobState(src)]


def parse_state(value: str) -> JobState:
    """Turn a name into a state, with an error that lists the valid names."""
    try:
        return JobState(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a job state; use one of "
            f"{', '.join(s.value for s in JobState)}"
        ) from None
