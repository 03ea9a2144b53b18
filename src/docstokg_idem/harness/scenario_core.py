"""The core engine: ``kind: core`` scenarios call the core API in this process.

Each call runs against a fresh database on a fake clock and is checked on the
spot (``raises``, ``match``, ``returns``, ``is``); then the checker runs over
the database like for any other scenario.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core import connect, plan_jobs
from ..core.db import close
from ..core.jobs import expire_owner_leases
from ..core.reconcile import reconcile_jobs
from .checker import check, timeline
from .scenario_checks import (
    WORK_ID,
    Facts,
    RunResult,
    ScenarioStepError,
    artifact_url,
    expectations,
    picture,
    restrict,
)
from .scenario_format import Variant

# --- engine: calls to the core API ----------------------------------------------------


class CoreRun:
    """``kind: core``: API calls in this process on a fake clock, each checked."""

    def __init__(self, variant: Variant, root: Path):
        from ..core.clock import FakeClock

        self.v, self.s, self.root = variant, variant.scenario, root
        self.db, self.out = root / "jobs.db", root / "files"
        self.out.mkdir(parents=True, exist_ok=True)
        self.clock = FakeClock(start=self.s.clock_start)
        self.leases: dict[str, Any] = {}
        self.clocks: list[dict[str, Any]] = []
        self.log: list[str] = []
        self.unmet: list[str] = []

    def run(self) -> RunResult:
        self.cx = connect(self.db, clock=self.clock)
        try:
            self.ids = _plan_core(self.cx, list(self.s.jobs))
            self.order = list(self.ids.values())
            for call, where in self.s.api:
                self.call(call, where)
        finally:
            close(self.cx)
        report = check(self.db, self.out, now=self.clock.wall())
        unmet = self.unmet + expectations(self.s, Facts(self.db, self.out, self.ids))
        return RunResult(
            self.v.name,
            restrict(report, self.s.invariants(True)),
            unmet,
            text_timeline=timeline(self.db),
            log=self.log,
            picture=picture(self.db, start=self.s.clock_start, clocks=self.clocks),
        )

    def call(self, call: dict[str, Any], where: str) -> None:
        from ..core.errors import IdemError

        name = call["call"]
        shown = ", ".join(
            f"{k}={v!r}"
            for k, v in call.items()
            if k not in ("call", "raises", "match", "returns", "is")
        )
        text = f"{name}({shown})"
        try:
            value = getattr(self, f"call_{name}")(call)
        except IdemError as exc:
            self.log.append(f"{text} -> raised {type(exc).__name__}")
            self.raised(call, where, text, exc)
            return
        self.log.append(f"{text} -> {_brief(value)}")
        if "raises" in call:
            self.unmet.append(
                f"{where}: {text} should raise {call['raises']}, but returned "
                f"{_brief(value)}"
            )
            return
        if "returns" in call and _plain(value) != call["returns"]:
            self.unmet.append(
                f"{where}: {text} returned {_brief(value)}, expected "
                f"{call['returns']!r}"
            )
        for key, want in call.get("is", {}).items():
            got = self.field(value, key)
            if got != want:
                self.unmet.append(
                    f"{where}: {text} gave {key}={got!r}, expected {want!r}"
                )

    def raised(
        self, call: dict[str, Any], where: str, text: str, exc: Exception
    ) -> None:
        import re

        names = {c.__name__ for c in type(exc).__mro__}
        if call.get("raises") not in names:
            want = (
                f"expected {call['raises']}"
                if "raises" in call
                else "expected no error"
            )
            self.unmet.append(
                f"{where}: {text} raised {type(exc).__name__}: {exc} ({want})"
            )
        elif "match" in call and not re.search(call["match"], str(exc)):
            self.unmet.append(
                f"{where}: {text} raised {type(exc).__name__} as expected, "
                f"but its message does not match {call['match']!r}: {exc}"
            )

    def field(self, value: Any, key: str) -> Any:
        if not isinstance(value, Mapping):
            return None
        if key == "job":
            return self.order.index(value["job_id"]) if "job_id" in value else None
        return _plain(value.get("lease_owner" if key == "owner" else key))

    # --- calls ---

    def target(self, call: dict[str, Any]) -> tuple[str, str, int | None]:
        """Job id, owner and token of a call: from its lease, overridden by its keys."""
        lease = self.leases.get(call.get("lease", ""))
        if "job" in call:
            job_id = self.order[call["job"]]
        elif lease is not None:
            job_id = lease.job_id
        else:
            raise ScenarioStepError(f"call {call['call']!r} names no lease and no job")
        owner = call.get("owner") or (lease.lease_owner if lease else "w1")
        token = call["token"] if "token" in call else (lease.token if lease else None)
        return job_id, owner, token

    def callplan_artifacts(self, call: dict[str, Any]) -> int:
        again = _plan_core(self.cx, list(self.s.jobs))
        return sum(1 for k, v in again.items() if self.ids[k] == v)

    def call_claim(self, call: dict[str, Any]) -> Any:
        from ..core import lease_next_job

        lease = lease_next_job(
            self.cx,
            owner=call.get("owner", "w1"),
            ttl_s=call.get("ttl", self.s.lease_ttl),
        )
        if "as" in call:
            if lease is None:
                raise ScenarioStepError(f"claim as {call['as']!r} claimed nothing")
            self.leases[call["as"]] = lease
        return lease

    def call_renew(self, call: dict[str, Any]) -> Any:
        from ..core import renew_lease

        job_id, owner, token = self.target(call)
        lease = self.leases.get(call.get("lease", ""))
        ttl = call.get("ttl", lease.ttl_s if lease else self.s.lease_ttl)
        return renew_lease(
            self.cx, job_id=job_id, owner=owner, ttl_s=ttl, token=token, strict=True
        )

    def call_release(self, call: dict[str, Any]) -> Any:
        from ..core import release_lease

        job_id, owner, token = self.target(call)
        return release_lease(
            self.cx, job_id=job_id, owner=owner, token=token, strict=True
        )

    def call_advance(self, call: dict[str, Any]) -> Any:
        from ..core import advance_state

        job_id, _, token = self.target(call)
        return advance_state(
            self.cx,
            job_id=job_id,
            to_state=call["to"],
            allowed_from=call.get("from"),
            token=token,
        )

    def call_fail(self, call: dict[str, Any]) -> Any:
        from ..core import fail_job

        job_id, _, token = self.target(call)
        return fail_job(
            self.cx,
            job_id=job_id,
            token=token,
            reason=call.get("reason", "failed by the scenario"),
            retryable=call.get("retryable", True),
        ).value

    def call_state(self, call: dict[str, Any]) -> Any:
        from ..core import get_current_state

        job_id = (
            self.target(call)[0] if "lease" in call else self.order[call.get("job", 0)]
        )
        state = get_current_state(self.cx, job_id=job_id)
        return None if state is None else state.value

    def call_clock(self, call: dict[str, Any]) -> float:
        seconds = float(call["seconds"])
        if seconds >= 0:
            self.clock.advance(seconds)
        else:
            self.clock.move_to(self.clock.wall() + seconds)
        self.clocks.append({"to": self.clock.wall(), "by": seconds})
        return self.clock.wall() - self.s.clock_start

    def call_expire(self, call: dict[str, Any]) -> int:
        return expire_owner_leases(self.cx, owner=call["owner"], why="scenario")

    def call_reconcile(self, call: dict[str, Any]) -> int:
        return reconcile_jobs(self.cx, self.out).total()

    def call_connect(self, call: dict[str, Any]) -> bool:
        kind = call["database"]
        path = self.root / f"other-{kind}" / "jobs.db"
        if kind == "corrupt":
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"this is not a SQLite database, only some text " * 40)
        elif kind == "directory":
            path.mkdir(parents=True, exist_ok=True)
        other = connect(path, clock=self.clock)
        close(other)
        return True


def _plan_core(cx: Any, names: Sequence[str]) -> dict[str, str]:
    rows = [
        {"work_id": WORK_ID, "artifact_id": n, "url": artifact_url(None, n)}
        for n in names
    ]
    return dict(zip(names, plan_jobs(cx, rows), strict=True))


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _brief(value: Any) -> str:
    if value is None:
        return "None"
    if hasattr(value, "token") and hasattr(value, "lease_owner"):
        return (
            f"lease(owner={value.lease_owner!r}, token={value.token}, "
            f"state={value.state})"
        )
    return repr(value)
