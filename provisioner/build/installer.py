"""rattler's installer, run in a child process so that it cannot take its caller down.

A rattler panic aborts the whole process (a panic crossing a Rayon thread), and
an interrupted install leaves rattler's threads linking for a while. So the
parent (:func:`install_in_child`) sends a JSON request to ``python -m
provisioner.build.installer_child`` through :mod:`provisioner.processes`, reads its
progress lines, and turns an abort, a segfault or an error into a
``BuildError`` carrying the child's last stderr lines. The child runs in its own
process group; when the parent is interrupted the group is killed and reaped
before any cleanup starts. The child also dies with its parent (Linux
``PR_SET_PDEATHSIG``), so a kill -9 of ``ensure`` never leaves it linking into
a staging dir that the next ``ensure`` removes.

While the child runs, the parent holds the package cache's shared lock.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import provisioner
from provisioner import processes
from provisioner.build.artifacts import VerifiedArtifact
from provisioner.build.installer_child import PROGRESS
from provisioner.build.package_cache import cache_lock
from provisioner.errors import BuildError
from provisioner.progress import Progress

_SHOWN_LINES = 5
_tools_log = logging.getLogger("provisioner.tools")  # shown at -vv


def request_for(artifacts: Sequence[VerifiedArtifact], target: Path, final: Path,
                cache_dir: Path) -> dict[str, Any]:
    """The JSON request the child installs from."""
    return {
        "parent": os.getpid(),
        "target": str(target),
        "final": str(final),
        "cache_dir": str(cache_dir),
        "packages": [{"package": asdict(a.package), "url": a.url} for a in artifacts],
    }


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child imports this very provisioner, installed or not.
    root = str(Path(provisioner.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _describe(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited {returncode}"


class _InstallPhases:
    """The child's progress lines as the ``extract`` and ``link`` phases."""

    def __init__(self, progress: Progress | None, cached: int) -> None:
        self.progress = progress or Progress(None, "")
        self.extract = self.progress.phase("extract", unit="packages")
        self.link = self.progress.phase("link", unit="packages")
        self.cached = cached

    def on_line(self, line: str) -> None:
        word, _sep, rest = line.partition(" ")
        if word != PROGRESS:
            return
        if rest.startswith("start "):
            total = int(rest.split()[1])
            _tools_log.debug("rattler: %s: transaction of %d operation(s)",
                             self.progress.subject, total)
            self.extract.set_total(total)
            self.link.set_total(total)
            self.extract.set_note(f"{total - self.cached} unpacked, {self.cached} already cached")
            self.extract.start()
        elif rest == "cached":
            self.extract.advance()
            if self.extract.total is not None and self.extract.done >= self.extract.total:
                self.extract.end()
        elif rest == "linked":
            self.link.advance()
            _tools_log.debug("rattler: %s: package %d/%s linked", self.progress.subject,
                             self.link.done, self.link.total)

    def finish(self, ok: bool) -> None:
        self.extract.end(ok)
        self.link.end(ok)


def install_in_child(artifacts: Sequence[VerifiedArtifact], *, target: Path, final: Path,
                     cache_dir: Path, progress: Progress | None) -> None:
    """Install ``artifacts`` into ``target`` (patched for ``final``) in a child process."""
    request = request_for(artifacts, target, final, cache_dir)
    # rattler reports no difference between unpacking and finding a package in its cache.
    cached = sum((cache_dir / a.package.file_name.removesuffix(".conda")
                  .removesuffix(".tar.bz2")).is_dir() for a in artifacts)
    phases = _InstallPhases(progress, cached)
    argv = [sys.executable, "-m", "provisioner.build.installer_child"]
    ok = False
    try:
        with cache_lock(cache_dir, exclusive=False):
            result = processes.run_streaming(argv, on_line=phases.on_line,
                                             input_text=json.dumps(request), env=_child_env())
        ok = result.returncode == 0
    finally:
        phases.finish(ok)
    if result.returncode == 0:
        return
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    panicked = any("panic" in ln for ln in lines)
    if result.returncode == 1 and lines and lines[-1].startswith("error: ") and not panicked:
        raise BuildError(f"rattler could not install the env: {lines[-1][len('error: '):]}")
    raise BuildError(
        f"the installer {_describe(result.returncode)}: "
        + (" | ".join([*[ln for ln in lines if "panicked" in ln][:1], *lines[-_SHOWN_LINES:]])
           or "no output"),
        hint="this is a bug in the installer (rattler) or a hostile package; "
             "provisioner itself is unaffected")
