"""Missing test dependencies skip locally but fail under PROTOSAM_REQUIRE_ALL (as .ci/run sets it)."""
import pathlib
import re
import subprocess
import sys

import pytest
from required_modules import REQUIRE_ALL_VARIABLE, require_module

TESTING = pathlib.Path(__file__).resolve().parents[1]
ABSENT = "protosam_no_such_module_for_this_test"


def test_a_missing_module_fails_under_require_all(monkeypatch):
    monkeypatch.setenv(REQUIRE_ALL_VARIABLE, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{ABSENT} is not installed.*{REQUIRE_ALL_VARIABLE} is set"):
        require_module(ABSENT, "pip install it")


@pytest.mark.parametrize("value", [None, "", "0"])
def test_a_missing_module_skips_otherwise(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(REQUIRE_ALL_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(REQUIRE_ALL_VARIABLE, value)
    with pytest.raises(pytest.skip.Exception, match=f"{ABSENT} is not installed"):
        require_module(ABSENT)


def test_a_present_module_is_returned(monkeypatch):
    monkeypatch.setenv(REQUIRE_ALL_VARIABLE, "1")
    assert require_module("json") is sys.modules["json"]


def test_a_test_module_needing_a_missing_module_fails_the_run_under_require_all(tmp_path):
    """End to end, as CI runs it: pytest exits non-zero (not 'skipped') when a test module needs
    a missing dependency at import time."""
    (tmp_path / "test_needs_it.py").write_text(
        "from required_modules import require_module\n"
        f"require_module({ABSENT!r})\n"
        "def test_it():\n    pass\n"
    )
    env_base = {"PYTHONPATH": str(TESTING / "support"), "PATH": "/usr/bin:/bin"}
    runs = {}
    for value in ("1", "0"):
        runs[value] = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**env_base, REQUIRE_ALL_VARIABLE: value},
        )
    assert runs["1"].returncode != 0 and "is not installed" in runs["1"].stdout, runs["1"].stdout
    # 5: pytest's "no tests collected" (the module skipped as a whole), not a failure.
    assert runs["0"].returncode in (0, 5) and "1 skipped" in runs["0"].stdout, runs["0"].stdout


def test_no_test_uses_importorskip():
    """Skips for missing dependencies go through required_modules, so CI turns them into failures."""
    offenders = [
        f"{path.relative_to(TESTING)}:{number}"
        for path in TESTING.rglob("*.py") if path.name != "required_modules.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bimportorskip\s*\(", line) and path.resolve() != pathlib.Path(__file__).resolve()
    ]
    assert offenders == []
