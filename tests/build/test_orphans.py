"""No process outlives the build it belongs to, even when ``ensure`` is killed with -9.

A real conda package, ``slowimport``, in a real local channel: importing it
starts three long-running writers that keep creating files in the env (one in
the import check's process group, one in a session of its own, one with an
empty environment whose working directory is inside the env), then sleeps.
``ensure`` runs as a real subprocess and is killed with SIGKILL during that
import, and again while it removes what the dead build left. The next
``ensure`` must complete, no process of the earlier builds may be left, and no
directory may need deleting by hand.
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

from provisioner.build.fingerprint import in_progress_path
from provisioner.build.layout import HomeLayout, python_path, read_pointer
from provisioner.build.maintenance import collect_garbage
from provisioner.build.orphans import read_record
from provisioner.config import load_config
from provisioner.fsops import MARKER_NAME
from provisioner.lock.platforms import host_platform
from provisioner.lock.write import lock_envs
from provisioner.sample.packages import PackageFile, build_conda_package, index_channel
from provisioner.sample.stack import SAMPLE_CHANNEL, build_sample_channel

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="PR_SET_PDEATHSIG and /proc are Linux's"),
]

KEY = "slow-import"
WAIT_S = 60.0

_WRITER = """
import os, sys, time
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
i = 0
while True:
    with open(os.path.join(out, "%s-%d" % (sys.argv[2], i)), "w") as fh:
        fh.write("x")
    i += 1
    time.sleep(0.02)
"""

_MODULE = '''"""Imports slowly and leaves writers behind, like a package that starts a server."""
import os
import subprocess
import sys
import time

_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "written")
_pids = os.environ["SLOWIMPORT_PIDS"]
_null = subprocess.DEVNULL


def _writer(tag, **kw):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, _out, tag],
                            stdin=_null, stdout=_null, stderr=_null, **kw)
    return proc.pid


os.makedirs(_pids, exist_ok=True)
pids = {
    "importer": os.getpid(),
    "in-group": _writer("g"),
    "own-session": _writer("s", start_new_session=True),
    "no-env": _writer("e", env={"PATH": "/usr/bin:/bin"}, cwd=os.path.dirname(_out)),
}
with open(os.path.join(_pids, "pids.json.tmp"), "w") as fh:
    fh.write(__import__("json").dumps(pids))
os.replace(os.path.join(_pids, "pids.json.tmp"), os.path.join(_pids, "pids.json"))
if os.environ.get("SLOWIMPORT_FAIL") == "1":
    raise ImportError("slowimport refuses to import (SLOWIMPORT_FAIL=1)")
time.sleep(float(os.environ.get("SLOWIMPORT_SECONDS", "0")))
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("orphans") / "proj"
    channel = root / "channel"
    platform = host_platform()
    build_sample_channel(channel, [platform])
    source = f"WRITER = {_WRITER!r}\n" + _MODULE
    build_conda_package(channel, "noarch", "slowimport", "1.0", "py_0", noarch="python",
                        depends=["python"],
                        files=[PackageFile("site-packages/slowimport/__init__.py",
                                           source.encode())])
    index_channel(channel)
    specs = root / "environment-specs"
    specs.mkdir(parents=True)
    (specs / f"{KEY}.yml").write_text(
        f"name: {KEY}\nchannels:\n- {SAMPLE_CHANNEL}\nplatforms:\n- {platform}\n"
        "dependencies:\n- python\n- slowimport\nx-provisioner:\n  imports:\n  - slowimport\n",
        encoding="utf-8")
    (root / "provisioner.toml").write_text(
        f'home = "unused-home"\n\n[channels]\n{SAMPLE_CHANNEL} = "channel"\n', encoding="utf-8")
    lock_envs(load_config(root, environ={}), [KEY])
    return root


def _env(home: Path, pids: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PROVISIONER_", "SLOWIMPORT_")) and k != "PYTHONPATH"}
    env.update(PROVISIONER_HOME=str(home), SLOWIMPORT_PIDS=str(pids))
    env.update(extra)
    return env


def _start(project: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "provisioner", "ensure", KEY, "--project", str(project), "--json"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _pids(pids_dir: Path) -> dict[str, int]:
    deadline = time.monotonic() + WAIT_S
    path = pids_dir / "pids.json"
    while not path.exists():
        assert time.monotonic() < deadline, "the import never started"
        time.sleep(0.05)
    data: dict[str, int] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _wait_gone(pids: dict[str, int]) -> list[str]:
    deadline = time.monotonic() + 10.0
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [name for name, pid in pids.items() if _alive(pid)]


def _kill_all(pids: dict[str, int]) -> None:
    for pid in pids.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _staging(home: Path) -> list[Path]:
    staging = HomeLayout(home).staging
    return sorted(staging.iterdir()) if staging.is_dir() else []


def _trash(home: Path) -> list[Path]:
    trash = HomeLayout(home).trash
    return sorted(trash.iterdir()) if trash.is_dir() else []


def _kill_during_import(project: Path, home: Path, pids_dir: Path) -> dict[str, int]:
    """Start ensure, SIGKILL it while the import check sleeps; return the import's pids."""
    proc = _start(project, _env(home, pids_dir, SLOWIMPORT_SECONDS="120"))
    try:
        pids = _pids(pids_dir)
        [stage] = _staging(home)
        written = stage / "lib"
        deadline = time.monotonic() + WAIT_S
        while not list(written.glob("python*/site-packages/slowimport/written/s-*")):
            assert time.monotonic() < deadline, "the writers never wrote"
            time.sleep(0.05)
        # The marker names the builder and the import check's process group.
        record = read_record(stage)
        assert record["pid"] == proc.pid and pids["importer"] in record["children"], record
    finally:
        proc.kill()
        proc.communicate(timeout=WAIT_S)
    assert proc.returncode == -signal.SIGKILL
    return pids


def _assert_complete(project: Path, home: Path, pids_dir: Path) -> None:
    env = _env(home, pids_dir)
    proc = _start(project, env)
    out, err = proc.communicate(timeout=WAIT_S * 2)
    assert proc.returncode == 0, err
    result = json.loads(out)
    prefix = Path(result["prefix"])
    assert read_pointer(HomeLayout(home), KEY) == prefix.name
    assert not in_progress_path(prefix).exists()
    assert python_path(prefix).exists()
    assert _staging(home) == []
    # The writers this build's own import started were stopped before it was promoted.
    assert _wait_gone(_pids(pids_dir)) == []


def test_kill9_during_import_then_during_cleanup(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = _kill_during_import(project, home, tmp_path / "pids-1")
    try:
        # PR_SET_PDEATHSIG took the import check with the builder; its writers survived.
        assert _wait_gone({"importer": first["importer"]}) == []
        assert all(_alive(first[n]) for n in ("in-group", "own-session", "no-env")), first
        [stale] = _staging(home)

        # The next ensure stops the writers, then is itself killed while removing the stale dir.
        proc = _start(project, _env(home, tmp_path / "pids-2",
                                    PROVISIONER_TEST_FAULT="during-rmtree"))
        proc.communicate(timeout=WAIT_S)
        assert proc.returncode == -signal.SIGKILL
        assert _wait_gone(first) == []
        # Moved into the trash whole (one rename), then killed mid-delete there.
        assert not stale.exists() and _staging(home) == []
        [trashed] = _trash(home)
        assert trashed.name.startswith(stale.name.rpartition(".")[0] + ".")
        assert (trashed / MARKER_NAME).is_file(), "the marker goes last"
        assert in_progress_path(trashed).exists(), "and the in-progress marker after the rest"

        _assert_complete(project, home, tmp_path / "pids-3")
        report = collect_garbage(load_config(project, home=home, environ={}))
        assert [(i.kind, i.path) for i in report.removed] == [("trash", trashed)]
        assert _trash(home) == [] and report.in_use == ()
    finally:
        _kill_all(first)


def test_kill9_while_removing_a_failed_build(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = _env(home, tmp_path / "pids-1", SLOWIMPORT_FAIL="1",
               PROVISIONER_TEST_FAULT="during-rmtree")
    proc = _start(project, env)
    try:
        proc.communicate(timeout=WAIT_S)
        assert proc.returncode == -signal.SIGKILL  # killed in the cleanup of the failed build
        first = _pids(tmp_path / "pids-1")
        assert _wait_gone(first) == [], "the failed build stopped its writers before removal"
        assert _staging(home) == []  # moved into the trash whole, then killed there
        [stale] = _trash(home)
        assert (stale / MARKER_NAME).is_file()
        _assert_complete(project, home, tmp_path / "pids-2")
    finally:
        _kill_all(_pids(tmp_path / "pids-1"))


def test_failed_import_exits_2_and_stops_its_children(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = _start(project, _env(home, tmp_path / "pids", SLOWIMPORT_FAIL="1"))
    _out, err = proc.communicate(timeout=WAIT_S)
    pids = _pids(tmp_path / "pids")
    try:
        assert proc.returncode == 2, err
        assert "slowimport" in err and "import check" in err
        assert _wait_gone(pids) == []
        assert _staging(home) == []
    finally:
        _kill_all(pids)


def test_import_check_timeout_is_its_own_error(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = _start(project, _env(home, tmp_path / "pids", SLOWIMPORT_SECONDS="120",
                                PROVISIONER_IMPORT_TIMEOUT="10"))
    _out, err = proc.communicate(timeout=WAIT_S)
    pids = _pids(tmp_path / "pids")
    try:
        assert proc.returncode == 2, err
        assert "timed out" in err and "PROVISIONER_IMPORT_TIMEOUT" in err
        assert _wait_gone(pids) == []
        assert _staging(home) == []
    finally:
        _kill_all(pids)


def test_gc_stops_what_a_dead_build_left_before_removing_it(tmp_path: Path) -> None:
    from provisioner import fsops
    from provisioner.build.orphans import build_tag, mark_building
    from provisioner.processes import BUILD_DIR_ENV

    project = tmp_path / "proj"
    project.mkdir()
    (project / "provisioner.toml").write_text('home = "home"\n', encoding="utf-8")
    config = load_config(project, environ={})
    stage = HomeLayout(config.home).staging / f"{KEY}.0123456789ab.abcdef"
    stage.mkdir(parents=True)
    fsops.write_marker(stage, "env")
    mark_building(stage, "a build that was killed")
    env = {**os.environ, BUILD_DIR_ENV: build_tag(stage)}
    writer = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\nwhile True:\n"
         "    open(os.path.join(sys.argv[1], 'late.pyc'), 'w').close(); time.sleep(0.01)",
         str(stage)], env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (stage / "late.pyc").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        report = collect_garbage(config)
        assert [item.path for item in report.removed] == [stage], report.skipped
        assert writer.wait(timeout=WAIT_S) == -signal.SIGKILL
        assert not stage.exists()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
