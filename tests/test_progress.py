"""Phases as data: one start, updates, exactly one end; thread-safe counting; silent sinks."""

from __future__ import annotations

import threading

import pytest

from provisioner.progress import BYTES, PhaseEvent, Progress


class Recorder:
    def __init__(self) -> None:
        self.events: list[PhaseEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: PhaseEvent) -> None:
        with self._lock:
            self.events.append(event)


def test_a_phase_has_one_start_and_one_end() -> None:
    sink = Recorder()
    with Progress(sink, "k").running("link", total=3, unit="packages") as link:
        link.advance()
        link.advance(2)
        link.start()  # a second start is ignored
    link.end()  # and so is a second end
    kinds = [e.kind for e in sink.events]
    assert kinds == ["start", "update", "update", "end"]
    assert sink.events[-1] == PhaseEvent("link", "k", "end", 3, 3, "packages", True, "")


def test_a_phase_that_raises_ends_not_ok() -> None:
    sink = Recorder()
    with pytest.raises(KeyboardInterrupt), Progress(sink, "k").running("download", unit=BYTES):
        raise KeyboardInterrupt
    assert [(e.kind, e.ok) for e in sink.events] == [("start", True), ("end", False)]


def test_concurrent_byte_counts_add_up() -> None:
    sink = Recorder()
    download = Progress(sink, "k").phase("download", unit=BYTES)

    def worker() -> None:
        for _ in range(1000):
            download.add(3, 4)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    download.end()
    assert (download.done, download.total) == (24000, 32000)
    assert sink.events[-1].done == 24000 and sink.events[-1].kind == "end"
    assert [e.kind for e in sink.events].count("start") == 1


def test_updates_after_the_end_are_dropped() -> None:
    sink = Recorder()
    extract = Progress(sink, "k").phase("extract", total=1)
    extract.advance()
    extract.end()
    extract.advance()
    assert extract.done == 1 and sink.events[-1].kind == "end"


def test_no_sink_is_silent_and_unknown_phases_are_refused() -> None:
    with Progress(None, "k").running("verify", total=1) as verify:
        verify.advance()
    assert verify.done == 1 and verify.ended
    with pytest.raises(ValueError):
        Progress(None, "k").phase("compile")
