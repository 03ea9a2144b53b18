"""The chaos harness: worker pools, schedules, strategies and the checker.

It uses the pipeline and the core; the pytest plugin sits on top of it.
"""

from .checker import INVARIANTS, Expected, Report, Violation, check, check_gate_off, timeline
from .control import FakeClock, FaultInjector, FeatureGate
from .pool import SchedulerStuck, WorkerPool
from .schedule import Outcome, World, run_schedule
from .strategies import schedules, steps

__all__ = [
    "INVARIANTS", "Expected", "FakeClock", "FaultInjector", "FeatureGate", "Outcome",
    "Report", "SchedulerStuck", "Violation", "World", "WorkerPool", "check",
    "check_gate_off", "run_schedule", "schedules", "steps", "timeline",
]
