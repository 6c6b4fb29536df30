"""How the phases of a command are shown (see :mod:`provisioner.progress`).

* stderr is a terminal: rich bars on stderr, one per phase (bytes, rate and ETA
  for downloads), drawn while the command runs and cleared at its end;
* stderr is not a terminal (CI logs, pipes), or ``-vv`` (whose debug lines a live
  bar would garble): exactly one line per phase, written when the phase ends;
* ``--no-progress`` or ``-q``: nothing.

stdout is never touched, so ``--json`` output is the same either way.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import click

from provisioner.cli.base import options
from provisioner.progress import BYTES, PhaseEvent, ProgressSink


def human_bytes(n: float) -> str:
    """``1.2 MB``: decimal units, as download tools print them."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def summary(event: PhaseEvent, seconds: float) -> str:
    """The one line for a finished phase, e.g. ``download KEY: 3.1 MB in 0.4 s (7.8 MB/s)``."""
    if event.unit == BYTES:
        rate = f" ({human_bytes(event.done / seconds)}/s)" if seconds > 0 and event.done else ""
        body = f"{human_bytes(event.done)} in {seconds:.1f} s{rate}"
    else:
        total = "" if event.total is None else f"/{event.total}"
        body = f"{event.done}{total} {event.unit} in {seconds:.1f} s".replace("  ", " ")
    return f"{event.phase} {event.subject}: {body}" + (f"; {event.note}" if event.note else "")


class PhaseLines:
    """One line on stderr per finished phase (a failed phase leaves the error to say it)."""

    def __init__(self) -> None:
        self._started: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def __call__(self, event: PhaseEvent) -> None:
        key = (event.phase, event.subject)
        with self._lock:
            if event.kind == "start":
                self._started[key] = time.monotonic()
                return
            if event.kind != "end":
                return
            began = self._started.pop(key, time.monotonic())
        if event.ok:
            click.echo(summary(event, time.monotonic() - began), err=True)


class RichBars:
    """rich bars on stderr: a task per phase, bytes with rate and ETA for downloads."""

    def __init__(self, color: bool | None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        class _Amount(MofNCompleteColumn):  # type: ignore[misc]
            """``3/5 packages``, or bytes and rate for a download."""

            def __init__(self) -> None:
                super().__init__()
                self._bytes = DownloadColumn()
                self._speed = TransferSpeedColumn()

            def render(self, task: Any) -> Any:
                from rich.text import Text

                if task.fields.get("unit") == BYTES:
                    return Text.assemble(self._bytes.render(task), " ",
                                         self._speed.render(task))
                total = "?" if task.total is None else f"{int(task.total)}"
                return Text(f"{int(task.completed)}/{total} {task.fields.get('unit', '')}")

        console = Console(stderr=True, no_color=True if color is False else None,
                          force_terminal=True if color else None)
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), _Amount(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
        self._tasks: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._running = False

    def __call__(self, event: PhaseEvent) -> None:
        key = (event.phase, event.subject)
        with self._lock:
            if not self._running:
                self._progress.start()
                self._running = True
            task = self._tasks.get(key)
            if task is None:
                task = self._tasks[key] = self._progress.add_task(
                    f"{event.phase} {event.subject}", total=event.total, unit=event.unit)
        total = event.total
        if event.kind == "end" and event.ok and total is None:
            total = event.done  # a size never announced: the bar still ends full
        self._progress.update(task, completed=event.done, total=total)
        if event.kind == "end":
            self._progress.stop_task(task)

    def close(self) -> None:
        with self._lock:
            if self._running:
                self._progress.stop()
                self._running = False


@contextlib.contextmanager
def progress_sink(ctx: click.Context) -> Iterator[ProgressSink | None]:
    """The sink for this invocation's phases (``None``: show nothing); bars end on exit."""
    opts = options(ctx)
    if not opts.progress or opts.quiet:
        yield None
        return
    if not sys.stderr.isatty() or opts.verbose >= 2:
        yield PhaseLines()
        return
    bars = RichBars(opts.color_flag)
    try:
        yield bars
    finally:
        bars.close()
