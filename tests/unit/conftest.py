"""Fixtures the unit tests share: a fake clock, and no crash point left armed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from docstokg_idem import FakeClock, disarm

#: The wall time every fake clock of the unit tests starts at.
T0 = 1_700_000_000.0


@pytest.fixture(autouse=True)
def _no_faults() -> Iterator[None]:
    """Disarm every crash point after each test, whatever the test armed."""
    yield
    disarm()


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at :data:`T0`."""
    return FakeClock(start=T0)
