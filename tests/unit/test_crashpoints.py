"""Tests of docstokg_idem.core.crashpoints: the registry, arming and firing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from docstokg_idem import (
    CRASH_POINTS,
    CrashPointFired,
    Fault,
    UnknownCrashPoint,
    arm,
    crashpoint,
    disarm,
)
from docstokg_idem.core import crashpoints
from docstokg_idem.core.crashpoints import FAULTS_ENV, WORKER_ENV, hits, set_hook

SRC = Path(crashpoints.__file__).resolve().parents[1]
CALL = re.compile(r"""\bcrashpoint\(\s*(?P<arg>[^)]*)\)""")


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    yield
    disarm()
    crashpoints.set_worker_name(None)


def _child(
    code: str, faults: str | None, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (FAULTS_ENV, WORKER_ENV)}
    if faults is not None:
        env[FAULTS_ENV] = faults
    env.update(extra)
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


TWO_CLAIMS = (
    "from docstokg_idem.core.crashpoints import crashpoint\n"
    "print('one', flush=True); crashpoint('claim.after_commit')\n"
    "print('two', flush=True); crashpoint('claim.after_commit')\n"
    "print('survived', flush=True)\n"
)


# --- the registry ---------------------------------------------------------------------


def test_points_are_named_phase_dot_moment() -> None:
    """Every declared point is <phase>.<moment> with a sentence saying where it sits."""
    for name, where in CRASH_POINTS.items():
        assert re.fullmatch(r"[a-z]+\.[a-z_]+", name), name
        assert len(where.split()) >= 4, name


def _calls_in_source() -> list[tuple[Path, str]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for match in CALL.finditer(path.read_text()):
            found.append((path, match["arg"].strip()))
    return found


def test_every_crashpoint_call_uses_a_declared_name() -> None:
    """Each crashpoint("...") call in the package names a point of the registry."""
    calls = [(p, arg) for p, arg in _calls_in_source() if p.name != "crashpoints.py"]
    names = [arg.strip("\"'") for _, arg in calls]

    assert len(calls) >= 10
    assert [
        arg for _, arg in calls if not re.fullmatch(r"""(["'])[\w.]+\1""", arg)
    ] == []
    assert sorted(set(names) - set(CRASH_POINTS)) == []


def test_every_declared_point_is_placed_somewhere() -> None:
    """Each point of the registry is marked at least once in the package's code."""
    used = {arg.strip("\"'") for _, arg in _calls_in_source()}

    assert sorted(set(CRASH_POINTS) - used) == []


@pytest.mark.parametrize("arming", ["fault", "mapping"])
def test_unknown_point_lists_known_points(arming: str) -> None:
    """Arming an undeclared point raises UnknownCrashPoint listing every known point."""
    with pytest.raises(UnknownCrashPoint) as info:
        if arming == "fault":
            Fault("claim.after_comit")
        else:
            arm([{"point": "claim.after_comit", "action": "kill"}])

    message = str(info.value)
    assert "'claim.after_comit' is not declared" in message
    assert ", ".join(sorted(CRASH_POINTS)) in message
    assert isinstance(info.value, ValueError)


def test_unknown_point_reached_while_armed_raises() -> None:
    """An armed process reaching an undeclared point raises UnknownCrashPoint."""
    set_hook(lambda name: None)

    with pytest.raises(UnknownCrashPoint, match="'nowhere.at_all'"):
        crashpoint("nowhere.at_all")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"action": "explode"}, "kill, raise, hang, sleep, exit"),
        ({"hit": 0}, "integer >= 1"),
        ({"hit": 1.5}, "integer >= 1"),
    ],
)
def test_bad_fault_spec_is_refused(spec: dict[str, object], match: str) -> None:
    """An unknown action or a hit below 1 raises ValueError naming the rule."""
    with pytest.raises(ValueError, match=match):
        Fault("renew.before", **spec)  # type: ignore[arg-type]


# --- firing ---------------------------------------------------------------------------


def test_disarmed_point_does_nothing() -> None:
    """A disarmed process passes every crash point and counts nothing."""
    arm([Fault("renew.before", "raise")])
    disarm()

    crashpoint("renew.before")

    assert hits() == {}


def test_raise_fires_on_the_nth_hit_only() -> None:
    """A fault with hit=3 raises CrashPointFired on the 3rd pass only."""
    arm([Fault("renew.before", "raise", hit=3)], worker="w1")
    crashpoint("renew.before")
    crashpoint("renew.before")
    crashpoint("release.before")

    with pytest.raises(CrashPointFired) as info:
        crashpoint("renew.before")
    crashpoint("renew.before")

    assert str(info.value) == "crash point 'renew.before' fired on hit 3 (worker 'w1')"
    assert isinstance(info.value, RuntimeError)
    assert hits() == {"renew.before": 4, "release.before": 1}


def test_worker_filter() -> None:
    """A fault for worker w2 does not fire in w1 and fires in w2."""
    arm([Fault("op.after_start", "raise", worker="w2")], worker="w1")
    crashpoint("op.after_start")

    arm([Fault("op.after_start", "raise", worker="w2")], worker="w2")
    with pytest.raises(CrashPointFired, match="worker 'w2'"):
        crashpoint("op.after_start")


def test_arm_replaces_faults_and_resets_hits() -> None:
    """Arming again replaces the earlier faults and restarts the hit counts."""
    arm([Fault("renew.before", "raise", hit=2)])
    crashpoint("renew.before")
    arm([Fault("renew.before", "raise", hit=2)])
    crashpoint("renew.before")

    with pytest.raises(CrashPointFired):
        crashpoint("renew.before")


def test_hook_sees_every_point_in_order() -> None:
    """A hook is called with each point reached; disarm removes it."""
    seen: list[str] = []
    set_hook(seen.append)
    crashpoint("claim.after_commit")
    crashpoint("op.after_start")
    disarm()
    crashpoint("op.after_record")

    assert seen == ["claim.after_commit", "op.after_start"]


def test_fault_round_trips_through_env_encoding() -> None:
    """faults_to_env gives the JSON that a child arms from."""
    fault = Fault("stream.after_chunk", "sleep", hit=4, worker="w3", arg=0.5)

    encoded = crashpoints.faults_to_env([fault])

    assert Fault.from_mapping(json.loads(encoded)[0]) == fault


# --- arming a child through the environment -------------------------------------------


def test_env_kill_ends_child_by_sigkill() -> None:
    """A child armed by DOCSTOKG_IDEM_FAULTS with kill dies by SIGKILL at the point."""
    child = _child(TWO_CLAIMS, '[{"point": "claim.after_commit", "action": "kill"}]')

    assert child.returncode == -signal.SIGKILL
    assert child.stdout.split() == ["one"]


def test_env_kill_on_second_hit_for_named_worker() -> None:
    """hit and worker from the environment hold: worker w7 dies on the 2nd pass."""
    faults = (
        '[{"point": "claim.after_commit", "action": "kill", "hit": 2, "worker": "w7"}]'
    )

    other = _child(TWO_CLAIMS, faults, **{WORKER_ENV: "w6"})
    named = _child(TWO_CLAIMS, faults, **{WORKER_ENV: "w7"})

    assert (other.returncode, other.stdout.split()) == (0, ["one", "two", "survived"])
    assert (named.returncode, named.stdout.split()) == (-signal.SIGKILL, ["one", "two"])


def test_env_from_file_and_exit_action(tmp_path: Path) -> None:
    """@path arms from a file; the exit action ends the child with the given code."""
    spec = tmp_path / "faults.json"
    spec.write_text('[{"point": "claim.after_commit", "action": "exit", "arg": 3}]')

    child = _child(TWO_CLAIMS, f"@{spec}")

    assert (child.returncode, child.stdout.split()) == (3, ["one"])


def test_env_raise_action_in_child() -> None:
    """The raise action in a child ends it with CrashPointFired in its traceback."""
    child = _child(TWO_CLAIMS, '[{"point": "claim.after_commit", "action": "raise"}]')

    assert child.returncode == 1
    assert (
        "CrashPointFired: crash point 'claim.after_commit' fired on hit 1"
        in child.stderr
    )


def test_env_with_bad_json_names_the_variable() -> None:
    """Malformed DOCSTOKG_IDEM_FAULTS stops the child with an error naming it."""
    child = _child(TWO_CLAIMS, "[{not json")

    assert child.returncode == 1
    assert f"{FAULTS_ENV} must hold a JSON list of fault specs" in child.stderr
