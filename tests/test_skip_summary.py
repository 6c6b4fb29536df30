"""The per-OS skip count printed at the end of a run, checked on a real pytest subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import conftest
import skip_summary
from skip_summary import os_name

TESTS = Path(__file__).resolve().parent


def run_pytest(folder: Path, source: str) -> subprocess.CompletedProcess[str]:
    (folder / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")  # not the repo's config
    (folder / "test_sample.py").write_text(textwrap.dedent(source), encoding="utf-8")
    path = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "skip_summary", str(folder)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_count_and_each_reason_are_printed_at_the_end(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, '''
        import pytest

        def test_runs():
            pass

        @pytest.mark.skip(reason="POSIX permission bits")
        def test_marked():
            pass

        @pytest.mark.skipif(True, reason="POSIX permission bits")
        def test_conditional():
            pass

        def test_at_run_time():
            pytest.skip("fork")

        def test_fails():
            assert False
    ''')
    assert result.returncode == 1, result.stdout + result.stderr  # the failure still counts
    *_, ours, counts = result.stdout.strip().splitlines()  # just above pytest's count line
    assert ours == f"skipped on {os_name()}: 3 (reasons: POSIX permission bits (x2); fork)"
    assert counts.startswith("1 failed, 1 passed, 3 skipped")


def test_a_run_without_skips_says_zero(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "def test_runs():\n    pass\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-2] == f"skipped on {os_name()}: 0"


def test_the_suite_itself_loads_the_hook() -> None:
    assert conftest.pytest_terminal_summary is skip_summary.pytest_terminal_summary
    assert os_name() in ("linux", "windows", "macos") or os_name() == sys.platform
