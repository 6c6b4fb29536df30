"""Shared fixtures: the sample channel (once per session) and a locked sample project."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from skip_summary import pytest_terminal_summary  # noqa: F401  (a hook: pytest finds it here)

from provisioner.config import Config, load_config
from provisioner.sample.project import create_sample_project, sample_platforms
from provisioner.sample.stack import build_sample_channel, channel_url


@pytest.fixture(scope="session")
def sample_channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample channel: linux-64, win-64, the host platform and noarch. Do not modify it."""
    root = tmp_path_factory.mktemp("sample-channel")
    return build_sample_channel(root / "channel", sample_platforms())


@pytest.fixture(scope="session")
def sample_channel_url(sample_channel: Path) -> str:
    """``file://`` URL of :func:`sample_channel`."""
    return channel_url(sample_channel)


@pytest.fixture(scope="session")
def host_python_xy() -> str:
    """``X.Y`` of the interpreter running the tests (the sample channel's python)."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def shared_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One locked sample project per test module. Copy it before changing it."""
    return create_sample_project(tmp_path_factory.mktemp("shared") / "sp").path


@pytest.fixture
def config(shared_project: Path, tmp_path: Path) -> Config:
    """The shared project with a fresh home and a fresh, empty legacy root."""
    (tmp_path / "legacy").mkdir()
    return load_config(shared_project, home=tmp_path / "home", environ={}).with_overrides(
        legacy_root=tmp_path / "legacy")


class LongSpelling:
    """Windows without long paths: a path reaches the disk only in its ``\\\\?\\`` spelling.

    ``plain`` (under a directory that does not exist) stands for an env's path as
    a user writes it, past 260 characters; ``os_path`` of the patched modules maps
    it to ``real``, as the extended-length spelling does on Windows. A walk that
    skips ``os_path`` finds nothing there.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.monkeypatch = monkeypatch
        self.plain = tmp_path / "not-reachable-without-the-prefix" / "env"
        self.mapped: list[str] = []

    def route(self, real: Path, *modules: object) -> Path:
        def os_path(path: str | os.PathLike[str]) -> str:
            text = os.fspath(path)
            if text == str(self.plain) or text.startswith(str(self.plain) + os.sep):
                self.mapped.append(text)
                return str(real) + text[len(str(self.plain)):]
            return text

        for module in modules:
            self.monkeypatch.setattr(module, "os_path", os_path)
        return self.plain


@pytest.fixture
def long_spelling(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> LongSpelling:
    """See :class:`LongSpelling`."""
    return LongSpelling(monkeypatch, tmp_path)
