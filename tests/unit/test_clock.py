"""Tests of docstokg_idem.core.clock: fake and shared clocks (C14)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from docstokg_idem import (
    FakeClock,
    SharedClock,
    SystemClock,
    default_clock,
    set_default_clock,
)
from docstokg_idem.core.clock import CLOCK_FILE_ENV

T0 = 1_700_000_000.0

# Hypothesis must not write an example database into the checkout.
no_database = settings(database=None, max_examples=200)

moves = st.lists(
    st.tuples(
        st.sampled_from(["advance", "move_to"]),
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    ),
    max_size=30,
)


@pytest.fixture(autouse=True)
def _default_clock_restored() -> Iterator[None]:
    yield
    set_default_clock(None)


def _apply(clock: FakeClock, move: str, amount: float) -> None:
    if move == "advance":
        clock.advance(abs(amount))
    else:
        clock.move_to(T0 + amount)


def test_fake_clock_starts_where_told() -> None:
    """A fake clock starts at the given wall and monotonic times and stays there."""
    clock = FakeClock(start=T0, monotonic_start=5.0)

    assert (clock.wall(), clock.monotonic()) == (T0, 5.0)
    assert (clock.wall(), clock.monotonic()) == (T0, 5.0)


def test_advance_moves_both_clocks() -> None:
    """advance(s) moves wall and monotonic time by s."""
    clock = FakeClock(start=T0)

    clock.advance(2.5)

    assert (clock.wall(), clock.monotonic()) == (T0 + 2.5, 2.5)


def test_backward_wall_move_keeps_monotonic() -> None:
    """Moving wall time back leaves monotonic time where it was (C14)."""
    clock = FakeClock(start=T0)
    clock.advance(10)

    clock.move_to(T0 - 3_600)

    assert (clock.wall(), clock.monotonic()) == (T0 - 3_600, 10.0)


def test_forward_wall_move_moves_monotonic() -> None:
    """Moving wall time forward moves monotonic time by the same amount."""
    clock = FakeClock(start=T0)
    clock.move_to(T0 - 100)

    clock.move_to(T0 + 50)

    assert (clock.wall(), clock.monotonic()) == (T0 + 50, 150.0)


@pytest.mark.parametrize("clock", [FakeClock(), "shared"], ids=["fake", "shared"])
def test_negative_advance_is_refused(clock: Any, tmp_path: Path) -> None:
    """advance() with a negative number raises ValueError and moves nothing."""
    if clock == "shared":
        clock = SharedClock(tmp_path / "clock", start=T0)
    before = (clock.wall(), clock.monotonic())

    with pytest.raises(ValueError, match="-1"):
        clock.advance(-1)

    assert (clock.wall(), clock.monotonic()) == before


@no_database
@given(moves)
def test_fake_monotonic_never_decreases(steps: list[tuple[str, float]]) -> None:
    """Whatever the moves, monotonic time never decreases; wall time is as set."""
    clock = FakeClock(start=T0)
    last = clock.monotonic()
    for move, amount in steps:
        wall_before = clock.wall()
        _apply(clock, move, amount)
        assert clock.monotonic() >= last
        expected = wall_before + abs(amount) if move == "advance" else T0 + amount
        assert clock.wall() == expected
        last = clock.monotonic()


def test_shared_clock_is_seen_by_every_instance(tmp_path: Path) -> None:
    """Two SharedClocks over one file read the same times after either moves."""
    writer = SharedClock(tmp_path / "clock", start=T0)
    reader = SharedClock(tmp_path / "clock")

    writer.advance(7)
    seen = (reader.wall(), reader.monotonic())
    reader.move_to(T0 - 50)

    assert seen == (T0 + 7, 7.0)
    assert (writer.wall(), writer.monotonic()) == (T0 - 50, 7.0)


@no_database
@given(moves)
def test_shared_monotonic_never_decreases(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, float]]
) -> None:
    """A shared clock keeps monotonic time non-decreasing, as the fake clock does."""
    path = tmp_path_factory.mktemp("clock") / "clock"
    clock = SharedClock(path, start=T0)
    twin = SharedClock(path)
    last = 0.0
    for move, amount in steps:
        _apply(clock, move, amount)
        assert twin.monotonic() >= last
        assert twin.wall() == clock.wall()
        last = twin.monotonic()


def _read_default_clock(out: Any) -> None:
    clock = default_clock()
    out.put((type(clock).__name__, clock.wall(), clock.monotonic()))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_children_share_the_clock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A child reads the parent's SharedClock through DOCSTOKG_IDEM_CLOCK_FILE."""
    clock = SharedClock(tmp_path / "clock", start=T0)
    clock.advance(42)
    clock.move_to(T0)
    monkeypatch.setenv(CLOCK_FILE_ENV, clock.path)
    set_default_clock(None)
    ctx = multiprocessing.get_context(method)
    out = ctx.Queue()
    child = ctx.Process(target=_read_default_clock, args=(out,))

    child.start()
    got = out.get(timeout=30)
    child.join(30)

    assert child.exitcode == 0
    assert got == ("SharedClock", T0, 42.0)


def test_subprocess_sees_a_later_move(tmp_path: Path) -> None:
    """A separate interpreter sees the shared time as it is when it reads it."""
    clock = SharedClock(tmp_path / "clock", start=T0)
    clock.advance(3)
    env = {**os.environ, CLOCK_FILE_ENV: clock.path}
    code = "from docstokg_idem import default_clock as d; c = d(); "
    code += "print(c.wall(), c.monotonic())"

    shown = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()

    assert [float(x) for x in shown] == [T0 + 3, 3.0]


def test_default_clock_can_be_replaced() -> None:
    """set_default_clock installs a clock; None goes back to the environment's."""
    fake = FakeClock(start=T0)

    set_default_clock(fake)
    chosen = default_clock()
    set_default_clock(None)

    assert chosen is fake
    assert isinstance(default_clock(), SystemClock) == (
        CLOCK_FILE_ENV not in os.environ
    )


def test_system_clock_reads_real_time() -> None:
    """The system clock reads epoch wall time and non-decreasing monotonic time."""
    import time

    clock = SystemClock()
    first = clock.monotonic()

    assert abs(clock.wall() - time.time()) < 5
    assert clock.monotonic() >= first
