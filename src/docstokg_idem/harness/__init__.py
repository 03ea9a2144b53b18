"""The chaos harness: worker pools, schedules, strategies and the checker.

It uses the pipeline and the core; the pytest plugin sits on top of it. Names
are imported on first use, so that the checker (used by the CLI) does not pull
in Hypothesis.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "INVARIANTS": "checker",
    "Expected": "checker",
    "Report": "checker",
    "Violation": "checker",
    "check": "checker",
    "check_gate_off": "checker",
    "timeline": "checker",
    "FakeClock": "control",
    "FaultInjector": "control",
    "FeatureGate": "control",
    "SchedulerStuck": "pool",
    "WorkerPool": "pool",
    "Outcome": "schedule",
    "World": "schedule",
    "run_schedule": "schedule",
    "schedules": "strategies",
    "steps": "strategies",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(
            f"module 'docstokg_idem.harness' has no attribute {name!r}"
        )
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
