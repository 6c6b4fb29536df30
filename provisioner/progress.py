"""Progress of the long phases, as data; the CLI decides how to show it.

A command's long work is reported as named phases (:data:`PHASES`): ``solve``
(``lock``), then for a build ``download`` (bytes), ``extract``, ``link``, ``pip
layer`` and ``verify``. Library code opens a :class:`Phase` on an optional sink
(any callable taking a :class:`PhaseEvent`) and advances it; the sink receives
one ``start``, any number of ``update`` and exactly one ``end`` event per phase.
The CLI's sink draws bars on a terminal or writes one line per phase
(``provisioner.cli.progress_view``). Nothing here draws, prints or measures time:
renderers do, so events stay plain, comparable data.

The lock and build domains both report phases, so this lives in the shared core.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

#: The phases, in the order a build goes through them (``solve`` belongs to ``lock``).
PHASES = ("solve", "download", "extract", "link", "pip layer", "verify")
BYTES = "bytes"

EventKind = Literal["start", "update", "end"]


@dataclass(frozen=True)
class PhaseEvent:
    """One step of one phase.

    ``done`` and ``total`` count ``unit`` (``"bytes"`` for downloads, otherwise a
    noun such as ``"packages"``); ``total`` is ``None`` while unknown. ``ok`` is
    false only on the ``end`` event of a phase stopped by an error or an interrupt.
    """

    phase: str
    subject: str
    kind: EventKind
    done: int = 0
    total: int | None = None
    unit: str = ""
    ok: bool = True
    note: str = ""


ProgressSink = Callable[[PhaseEvent], None]


class Phase:
    """One running phase. Thread-safe: download workers advance it concurrently.

    With no sink every method is a cheap no-op, so library code never branches
    on whether anyone is watching.
    """

    def __init__(self, sink: ProgressSink | None, phase: str, subject: str, *,
                 total: int | None = None, unit: str = "") -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self._sink = sink
        self._lock = threading.Lock()
        self.phase = phase
        self.subject = subject
        self.unit = unit
        self.total = total
        self.done = 0
        self.note = ""
        self.started = False
        self.ended = False

    def _event(self, kind: EventKind, ok: bool = True) -> PhaseEvent:
        return PhaseEvent(self.phase, self.subject, kind, self.done, self.total, self.unit,
                          ok, self.note)

    def _emit(self, event: PhaseEvent) -> None:
        if self._sink is not None:
            self._sink(event)

    def start(self) -> Phase:
        """Announce the phase (once; later calls do nothing)."""
        with self._lock:
            if self.started:
                return self
            self.started = True
            event = self._event("start")
        self._emit(event)
        return self

    def advance(self, amount: int = 1) -> None:
        """Count ``amount`` more units done (starts the phase if needed)."""
        self.add(amount)

    def set_total(self, total: int | None) -> None:
        """Say how many units the phase has, once that is known."""
        with self._lock:
            self.total = total
            event = self._event("update") if self.started and not self.ended else None
        if event is not None:
            self._emit(event)

    def add(self, done: int, total: int = 0) -> None:
        """Count ``done`` more units and ``total`` more expected ones (either may be negative)."""
        self.start()
        with self._lock:
            if self.ended:
                return
            self.done += done
            if total:
                self.total = (self.total or 0) + total
            event = self._event("update")
        self._emit(event)

    def set_note(self, note: str) -> None:
        """A short fact shown with the phase's summary (``"3 of 5 cached"``)."""
        with self._lock:
            self.note = note

    def end(self, ok: bool = True) -> None:
        """Close the phase (once); starts it first, so every phase has both events."""
        self.start()
        with self._lock:
            if self.ended:
                return
            self.ended = True
            event = self._event("end", ok)
        self._emit(event)


class Progress:
    """Where one subject (an env key) reports its phases; ``Progress(None, key)`` is silent."""

    def __init__(self, sink: ProgressSink | None, subject: str) -> None:
        self.sink = sink
        self.subject = subject

    def phase(self, name: str, *, total: int | None = None, unit: str = "") -> Phase:
        """A phase not yet started: for phases driven by callbacks (``start``/``end``)."""
        return Phase(self.sink, name, self.subject, total=total, unit=unit)

    @contextlib.contextmanager
    def running(self, name: str, *, total: int | None = None,
                unit: str = "") -> Iterator[Phase]:
        """A phase around a block: ``end(ok=False)`` when it raises (Ctrl-C included)."""
        current = self.phase(name, total=total, unit=unit).start()
        try:
            yield current
        except BaseException:
            current.end(ok=False)
            raise
        current.end()
