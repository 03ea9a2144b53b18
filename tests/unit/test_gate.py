"""Tests of docstokg_idem.core.gate: the DOCSTOKG_ENABLE_IDEMPOTENCY switch (I11)."""

from __future__ import annotations

import pytest

from docstokg_idem import GATE_ENV, GateValueError, idempotency_enabled

ON = [
    "1",
    "true",
    "TRUE",
    "True",
    "tRUE",
    "yes",
    "YES",
    "Yes",
    "on",
    "ON",
    "On",
    " on ",
    "\ttrue\n",
]
OFF = [
    "0",
    "false",
    "FALSE",
    "False",
    "fALSE",
    "no",
    "NO",
    "No",
    "off",
    "OFF",
    "Off",
    " 0 ",
    "\toff\n",
]
BAD = [
    "maybe",
    "2",
    "-1",
    "y",
    "n",
    "t",
    "enable",
    "tru",
    "on off",
    "1.0",
    "null",
    "\u00e9",
]


def test_gate_variable_name() -> None:
    """The gate reads the documented variable name."""
    assert GATE_ENV == "DOCSTOKG_ENABLE_IDEMPOTENCY"


@pytest.mark.parametrize("value", ON)
def test_on_spellings(value: str) -> None:
    """Every spelling of on, in any case and with blanks around, turns it on."""
    assert idempotency_enabled(env={GATE_ENV: value}) is True


@pytest.mark.parametrize("value", OFF)
def test_off_spellings(value: str) -> None:
    """Every spelling of off, in any case and with blanks around, turns it off."""
    assert idempotency_enabled(env={GATE_ENV: value}) is False


@pytest.mark.parametrize("env", [{}, {GATE_ENV: ""}, {GATE_ENV: "   "}, {"OTHER": "1"}])
def test_missing_or_empty_is_off(env: dict[str, str]) -> None:
    """A missing or blank variable means off."""
    assert idempotency_enabled(env=env) is False


@pytest.mark.parametrize(
    ("explicit", "value"),
    [
        (True, "0"),
        (True, "off"),
        (False, "1"),
        (False, "yes"),
        (True, "garbage"),
        (False, "garbage"),
        (True, None),
        (False, None),
    ],
)
def test_explicit_argument_wins(explicit: bool, value: str | None) -> None:
    """An explicit argument decides, whatever the variable holds (even a bad value)."""
    env = {} if value is None else {GATE_ENV: value}

    assert idempotency_enabled(explicit, env=env) is explicit


@pytest.mark.parametrize("value", BAD)
def test_bad_value_names_variable_value_and_choices(value: str) -> None:
    """A bad value raises GateValueError naming variable, value and choices."""
    with pytest.raises(GateValueError) as info:
        idempotency_enabled(env={GATE_ENV: value})

    message = str(info.value)
    assert f"{GATE_ENV}={value!r}" in message
    for choice in ["1", "true", "yes", "on", "0", "false", "no", "off"]:
        assert choice in message
    assert "unset" in message
    assert isinstance(info.value, ValueError)


def test_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without env=, the gate reads os.environ."""
    monkeypatch.setenv(GATE_ENV, "Yes")
    on = idempotency_enabled()
    monkeypatch.setenv(GATE_ENV, "sometimes")
    with pytest.raises(GateValueError, match="'sometimes'"):
        idempotency_enabled()
    monkeypatch.delenv(GATE_ENV)

    assert on is True
    assert idempotency_enabled() is False
