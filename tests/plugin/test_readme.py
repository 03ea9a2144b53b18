"""The README's plugin examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The API example plans, leases, runs an effect, renews and releases."""
    monkeypatch.chdir(tmp_path)
    code = _python_blocks()[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    cx = namespace["cx"]
    state = cx.execute("SELECT state, lease_owner FROM jobs").fetchone()  # type: ignore[attr-defined]
    assert tuple(state) == ("HEAD_DONE", None)


def test_readme_plugin_examples_pass(pytester: pytest.Pytester) -> None:
    """The kill-at-a-point test and the interleaving property pass as written."""
    blocks = _python_blocks()
    kill_test = next(b for b in blocks if "def test_kill_mid_stream" in b)
    property_test = next(b for b in blocks if "def test_any_interleaving" in b)
    pytester.makepyfile(test_readme_examples=kill_test + "\n\n" + property_test)
    result = pytester.runpytest_subprocess("-p", "docstokg_idem", "-q")
    result.assert_outcomes(passed=2)
