"""SIGINT and SIGTERM during ``ensure`` (issue 9, acceptance 2, the signal part).

Real child processes: the CLI builds the sample env; its installer child is held
mid-install by a test hook (after the first package reaches the cache), and the
``ensure`` process gets the signal. It must stop the installer (its whole process
group), remove the staging dir and the partial cache entries, and exit 130 / 143
with one line; ``gc`` and the next ``ensure`` clean any leftovers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioner.build.layout import HomeLayout
from provisioner.build.package_cache import partial_entries

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals and /proc")

KEY = "sample-cpu-transformers"
TIMEOUT_S = 120.0


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    env.update(PROVISIONER_HOME=str(home), CONDA_OVERRIDE_CUDA="12.1", **extra)
    return env


def _cli(project: Path, home: Path, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "provisioner", *args, "--project",
                             str(project)], env=_env(home, **extra), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)


def _installers(home: Path) -> list[int]:
    """Installer children of builds in ``home`` that are still alive."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"provisioner.build.installer" in cmd and f"PROVISIONER_HOME={home}".encode() in env:
            found.append(int(entry.name))
    return found


def _wait_for(condition: object, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():  # type: ignore[operator]
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never reached the install"
        time.sleep(0.02)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_install_cleans_up_and_exits_128_plus_n(
        shared_project: Path, tmp_path: Path, signum: int, code: int) -> None:
    home = tmp_path / "home"
    layout = HomeLayout(home)
    proc = _cli(shared_project, home, "ensure", KEY, PROVISIONER_TEST_INSTALL_PAUSE="300")

    def installing() -> bool:
        cached = layout.package_cache.is_dir() and any(
            (p / "info" / "paths.json").is_file() for p in layout.package_cache.iterdir())
        return cached and bool(_installers(home))

    _wait_for(installing, proc)
    staging = [p for p in layout.staging.iterdir()]
    assert staging, "the build is staged while it installs"
    # What rattler leaves when it is stopped while extracting a package:
    partial = layout.package_cache / ".pytorch-2.2.1-py3.11_cpu_0Xk3j9Q"
    (partial / "lib").mkdir(parents=True)
    (partial / "lib" / "half.so").write_bytes(b"\0" * 4096)

    proc.send_signal(signum)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == code, err
    said = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert said == [f"error: interrupted (exit {code}): stopped; any build in progress was "
                    "cleaned up"], err
    assert _installers(home) == []
    assert list(layout.staging.iterdir()) == []
    assert partial_entries(layout.package_cache) == []
    assert not (layout.envs / KEY).exists() or not any(
        p.is_dir() for p in (layout.envs / KEY).iterdir())

    # The next ensure builds the env; a later leftover goes with the next gc.
    proc = _cli(shared_project, home, "ensure", KEY, "--json")
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err
    assert json.loads(out)["action"] == "build"
    (partial / "lib").mkdir(parents=True)
    gc = _cli(shared_project, home, "gc", "--json")
    out, err = gc.communicate(timeout=TIMEOUT_S)
    assert gc.returncode == 0, err
    removed = json.loads(out)["removed"]
    assert {"kind": "cache-partial", "path": str(partial)}.items() <= {
        k: v for item in removed for k, v in item.items() if k in ("kind", "path")}.items()
    assert partial_entries(layout.package_cache) == []


def test_gc_leaves_partial_entries_while_a_build_installs(shared_project: Path,
                                                          tmp_path: Path) -> None:
    home = tmp_path / "home"
    layout = HomeLayout(home)
    proc = _cli(shared_project, home, "ensure", KEY, PROVISIONER_TEST_INSTALL_PAUSE="300")
    try:
        _wait_for(lambda: bool(_installers(home)) and layout.package_cache.is_dir(), proc)
        partial = layout.package_cache / ".numpy-1.26.4-py311h_sample_0Ab12Cd"
        partial.mkdir()
        gc = _cli(shared_project, home, "gc", "--json")
        out, err = gc.communicate(timeout=TIMEOUT_S)
        assert gc.returncode == 0, err
        skipped = json.loads(out)["skipped"]
        assert any(s["path"] == str(partial) and "in use" in s["reason"] for s in skipped)
        assert partial.is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 143
    assert partial_entries(layout.package_cache) == []


def test_a_host_apps_own_sigterm_handler_is_left_alone() -> None:
    from provisioner.build.interrupts import interruptible

    def host_handler(signum: int, frame: object) -> None: ...

    previous = signal.signal(signal.SIGTERM, host_handler)
    try:
        with interruptible():
            assert signal.getsignal(signal.SIGTERM) is host_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_interrupted_once_then_waits_for_cleanup() -> None:
    from provisioner.build.interrupts import interruptible
    from provisioner.errors import Interrupted

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with interruptible():
            with pytest.raises(Interrupted) as info:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises at the next bytecode
            assert info.value.exit_code == 143
            os.kill(os.getpid(), signal.SIGTERM)  # a second one, during cleanup: no raise
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
