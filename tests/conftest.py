"""Shared fixtures: a sample conda channel built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from provisioner.sample import build_sample_channel, channel_url
from provisioner.sample_project import sample_platforms


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
