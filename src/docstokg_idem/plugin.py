"""The pytest plugin ``docstokg_idem`` (loaded by ``pytest -p docstokg_idem``)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("docstokg_idem", "exactly-once chaos harness")
    group.addoption("--idem-profile", dest="idem_profile", default=None,
                    help="Hypothesis settings profile: ci (default) or nightly")
    parser.addini("idem_profile", "Hypothesis settings profile: ci or nightly", default="ci")
