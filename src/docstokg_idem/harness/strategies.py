"""Hypothesis strategies for interleavings of workers, crashes and clock moves.

Every choice of an interleaving is drawn from Hypothesis, the only source of
randomness, so every failing schedule replays and shrinks. Steps shrink
towards ``["run", 0]``, so a minimal failure keeps only the kills and clock
moves that matter.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

#: Step kinds, "run" repeated so that it is drawn most often and shrunk to.
_KINDS = ["run", "run", "run", "run", "kill", "clock", "restart"]

#: Clock moves that matter against a lease TTL of 10 s: small, past it, far past.
CLOCK_MOVES = (1.0, 4.0, 11.0, 31.0)


def steps(
    workers: int = 2, clock_moves: tuple[float, ...] = CLOCK_MOVES
) -> st.SearchStrategy[list[Any]]:
    """One step: ``["run", k]``, ``["kill", k]``, ``["clock", s]`` or ``["restart", k]``."""
    width = max(workers, len(clock_moves))

    def build(choice: tuple[str, int]) -> list[Any]:
        kind, n = choice
        return [
            kind,
            clock_moves[n % len(clock_moves)] if kind == "clock" else n % workers,
        ]

    return st.tuples(st.sampled_from(_KINDS), st.integers(0, width - 1)).map(build)


def schedules(
    workers: int = 2,
    *,
    min_steps: int = 0,
    max_steps: int = 24,
    clock_moves: tuple[float, ...] = CLOCK_MOVES,
) -> st.SearchStrategy[list[list[Any]]]:
    """A whole schedule: a list of steps (any list is valid; indexes wrap)."""
    return st.lists(steps(workers, clock_moves), min_size=min_steps, max_size=max_steps)
