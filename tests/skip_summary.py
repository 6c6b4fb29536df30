"""The skip count of a run, per OS, at its end: CI's legs can be compared at a glance.

Loaded by ``tests/conftest.py``. Prints ``skipped on linux: N (reasons: ...)`` just above
pytest's own count line, each reason once with its count, most frequent first; a leg that
starts skipping more shows.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Generator

import pytest

_OS_NAMES = {"win32": "windows", "darwin": "macos"}


def os_name() -> str:
    """``linux``, ``windows``, ``macos`` (or ``sys.platform`` elsewhere)."""
    return _OS_NAMES.get(sys.platform, "linux" if sys.platform.startswith("linux")
                         else sys.platform)


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason a skipped report gives, without pytest's ``Skipped: `` prefix."""
    longrepr = report.longrepr
    text = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 \
        else str(longrepr)
    return text.removeprefix("Skipped: ")


def summary_line(reasons: Counter[str]) -> str:
    """``skipped on <os>: N`` plus the reasons, most frequent first."""
    total = sum(reasons.values())
    line = f"skipped on {os_name()}: {total}"
    if total:
        ordered = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
        line += " (reasons: " + "; ".join(
            f"{reason} (x{count})" if count > 1 else reason for reason, count in ordered) + ")"
    return line


# The outermost wrapper: its line comes after the other summaries (-ra's short summary too).
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> Generator[None, None, None]:
    """The hook: one line after pytest's own summaries, above its final count."""
    del exitstatus, config
    yield
    skipped = terminalreporter.stats.get("skipped", [])
    terminalreporter.write_line(summary_line(Counter(skip_reason(r) for r in skipped)))
