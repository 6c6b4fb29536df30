"""Subprocesses: captured output, exit codes as data, whole-group kill on timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from provisioner.contained import pid_alive
from provisioner.errors import ToolMissingError
from provisioner.processes import ProcResult, run, which

PY = sys.executable
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX process groups")


def _py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie waiting for an absent reaper counts as dead."""
    return pid_alive(pid)


def _wait_dead(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return not _alive(pid)


def _wait_for_file(path: Path, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_captures_exit_code_stdout_and_stderr() -> None:
    result = run(_py("""
        import sys
        print("to out")
        print("to err", file=sys.stderr)
        sys.exit(3)
    """))
    assert isinstance(result, ProcResult)
    assert result.returncode == 3
    assert result.stdout == "to out\n"
    assert result.stderr == "to err\n"
    assert not result.timed_out
    assert not result.ok
    assert result.argv[0] == PY
    assert isinstance(result.seconds, float) and result.seconds > 0  # measured, not a default


def test_success_is_ok() -> None:
    result = run([PY, "-c", "pass"], timeout=30)
    assert result.ok
    assert result.returncode == 0
    assert result.stdout == result.stderr == ""


def test_input_env_and_cwd(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "PROVISIONER_TEST_VALUE": "hello"}
    result = run(
        _py("""
            import os, sys
            print(sys.stdin.read().upper(), os.environ.get("PROVISIONER_TEST_VALUE"),
                  os.getcwd(), sorted(os.environ).count("HOME"))
        """),
        env=env,
        cwd=tmp_path,
        input_text="piped",
    )
    words = result.stdout.split()
    assert words[:2] == ["PIPED", "hello"]
    assert Path(words[2]).resolve() == tmp_path.resolve()
    assert words[3] == "0"


def test_stdin_is_closed_without_input() -> None:
    result = run(_py("import sys; print(repr(sys.stdin.read()))"), timeout=10)
    assert result.stdout.strip() == "''"


def test_undecodable_output_is_replaced() -> None:
    result = run(_py(r"import sys; sys.stdout.buffer.write(b'ok \xff\xfe end')"))
    assert result.stdout == "ok \ufffd\ufffd end"


def test_missing_executable_raises_tool_missing() -> None:
    with pytest.raises(ToolMissingError, match="no-such-tool-provisioner") as info:
        run(["no-such-tool-provisioner", "--version"])
    assert info.value.hint


def test_missing_executable_by_path(tmp_path: Path) -> None:
    with pytest.raises(ToolMissingError, match="nope"):
        run([str(tmp_path / "nope")])


def test_missing_cwd_is_not_reported_as_missing_tool(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run([PY, "-c", "pass"], cwd=tmp_path / "absent")


def test_empty_argv_is_rejected() -> None:
    with pytest.raises(ValueError):
        run([])


def test_which() -> None:
    bindir = str(Path(PY).parent)
    found = which(Path(PY).name, bindir)
    assert found is not None
    assert Path(found).parent == Path(bindir)
    assert which("no-such-tool-provisioner") is None


GRANDCHILD = """
import os, subprocess, sys, time
pidfile = sys.argv[1]
grand = subprocess.Popen([sys.executable, "-c",
    "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)",
    pidfile + ".grand"], start_new_session=ESCAPE)
while not os.path.exists(pidfile + ".grand") or not open(pidfile + ".grand").read():
    time.sleep(0.01)
with open(pidfile, "w") as fh:
    fh.write(str(os.getpid()))
print("started", flush=True)
if HANG:
    time.sleep(60)
"""


def _spawner(tmp_path: Path, *, hang: bool, escape: bool = False) -> list[str]:
    code = GRANDCHILD.replace("ESCAPE", str(escape)).replace("HANG", str(hang))
    return [PY, "-c", code, str(tmp_path / "pid")]


# The spawner's processes sleep 60 s: a run() that waited for them instead of killing
# them would return after 60 s with timed_out False, so the outcome asserts below (not a
# wall-clock bound) are what catch a broken kill. Lower bounds on the time are safe.


@posix_only
def test_timeout_kills_child_and_grandchild(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run(_spawner(tmp_path, hang=True), timeout=1)
    elapsed = time.monotonic() - started

    assert result.timed_out
    assert result.returncode is None
    assert not result.ok
    assert elapsed >= 1.0 and result.seconds >= 1.0, "killed before its timeout"
    assert result.stdout == "started\n"  # the partial output is kept
    child = int((tmp_path / "pid").read_text())
    grandchild = int((tmp_path / "pid.grand").read_text())
    assert _wait_dead(child)
    assert _wait_dead(grandchild)
    with pytest.raises(ProcessLookupError):
        # The group is gone once its last member has been reaped; a zombie whose
        # reaper is slow still counts, so allow it a moment (generous: a loaded host).
        deadline = time.monotonic() + 10
        while True:
            os.killpg(child, 0)
            if time.monotonic() > deadline:
                pytest.skip("orphaned zombies are not reaped on this host")
            time.sleep(0.02)


@posix_only
def test_timeout_when_child_exits_but_grandchild_holds_pipe(tmp_path: Path) -> None:
    result = run(_spawner(tmp_path, hang=False), timeout=1)
    # The child exited at once; only the grandchild (60 s sleep) kept the pipe open, so
    # timed_out proves run() stopped waiting for EOF, and its death that the group was
    # killed although its leader had already exited.
    assert result.timed_out and result.seconds >= 1.0
    assert result.stdout == "started\n"
    assert _wait_dead(int((tmp_path / "pid.grand").read_text()))


@posix_only
def test_timeout_is_bounded_even_if_a_process_escapes_the_group(tmp_path: Path) -> None:
    result = run(_spawner(tmp_path, hang=True, escape=True), timeout=1)
    escaped = int((tmp_path / "pid.grand").read_text())
    try:
        assert result.timed_out
        # Bounded: run() returned while the escaped process (own session, 60 s sleep)
        # still held the output pipe open, so it did not wait for that pipe's EOF.
        assert _alive(escaped), "run() returned only after the escaped process ended"
        assert result.stdout == "started\n"
        assert _wait_dead(int((tmp_path / "pid").read_text()))
    finally:
        os.kill(escaped, signal.SIGKILL)


def test_no_timeout_when_fast() -> None:
    result = run([PY, "-c", "print('quick')"], timeout=30)
    assert not result.timed_out
    assert result.stdout == "quick\n"


# --- builds: tags, process groups, death with the parent ----------------------


def test_children_in_a_build_scope_carry_its_tag_and_are_reported(tmp_path: Path) -> None:
    from provisioner.processes import BUILD_DIR_ENV, build_scope

    spawned: list[int] = []
    # Windows has no process groups (getpgid) and needs SYSTEMROOT to start a python.
    code = ("import os; print(os.getpid(), getattr(os, 'getpgid', lambda _: os.getpid())(0), "
            f"os.environ.get({BUILD_DIR_ENV!r}))")
    keep = {k: v for k, v in os.environ.items() if k.upper() == "SYSTEMROOT"}
    with build_scope(tmp_path, on_spawn=spawned.append):
        inside = run([sys.executable, "-c", code], timeout=60, env={"PATH": os.defpath, **keep})
    outside = run([sys.executable, "-c", code], timeout=60)
    pid, pgid, tag = inside.stdout.split()
    assert tag == str(tmp_path) and spawned == [int(pid)]
    if sys.platform != "win32":
        assert pgid == pid  # it leads its own process group
    assert outside.stdout.split()[2] == "None"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_killed_parent(tmp_path: Path) -> None:
    import subprocess

    pid_file = tmp_path / "child.pid"
    child_code = ("import os, sys, time\n"
                  "open(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    parent_code = ("import sys\nfrom provisioner.processes import run\n"
                   "run([sys.executable, '-c', sys.argv[1], sys.argv[2]], timeout=300)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code, child_code, str(pid_file)])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait(timeout=60)

    def alive() -> bool:
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rfind(")") + 2] not in "ZX"

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not alive(), "the child outlived its SIGKILLed parent"
    finally:
        if alive():
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_run_streaming_kills_the_group_before_an_interrupt_propagates(tmp_path: Path) -> None:
    """The child and its grandchild are gone before the caller's cleanup starts."""
    from provisioner.processes import run_streaming

    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{g.pid}}")
        print("ready", flush=True)
        time.sleep(60)
    """)
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_streaming([sys.executable, "-c", script], on_line=on_line)
    assert lines == ["ready"]
    child, grandchild = (int(p) for p in pids.read_text().split())
    for pid in (child, grandchild):
        deadline = time.monotonic() + 30  # a hang guard only: the poll ends at the death
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(pid)



def test_run_streaming_keeps_the_last_stderr_lines() -> None:
    from provisioner.processes import run_streaming

    code = "import sys; print('out', flush=True); [print(i, file=sys.stderr) for i in range(100)]"
    seen: list[str] = []
    result = run_streaming([sys.executable, "-c", code], on_line=seen.append, stderr_lines=3)
    assert seen == ["out"] and result.returncode == 0
    assert result.stderr.split() == ["97", "98", "99"]


def test_run_contained_keeps_at_most_max_output_bytes() -> None:
    from provisioner.contained import run_contained

    endless = "import sys\nwhile True: sys.stdout.write('x' * 4096)"
    result = run_contained([sys.executable, "-c", endless], timeout=120, max_output=100_000)
    assert result.truncated and not result.timed_out
    assert len(result.stdout) + len(result.stderr) == 100_000


def test_run_contained_returns_small_output_whole() -> None:
    from provisioner.contained import run_contained

    code = "print('out'); import sys; print('err', file=sys.stderr)"
    result = run_contained([sys.executable, "-c", code], timeout=60)
    assert result.ok and result.stdout == "out\n" and result.stderr == "err\n"
    assert not result.truncated


def test_pid_alive_sends_nothing_and_sees_a_running_child() -> None:
    # On Windows os.kill(pid, 0) would terminate the child: here it must still run after.
    child = subprocess.Popen([PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert pid_alive(child.pid)
        assert pid_alive(child.pid)
        assert child.poll() is None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        assert child.wait(timeout=30) == 0  # it ran to its own end, not killed
    assert not pid_alive(child.pid)


def test_pid_alive_of_this_process_and_of_no_process() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0)
    assert not pid_alive(-1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombies are read from /proc")
def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen([PY, "-c", "pass"])
    deadline = time.monotonic() + 30
    while pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(child.pid)
    # Not reaped until now: it was a zombie, and os.kill(pid, 0) alone would call it alive.
    os.kill(child.pid, 0)
    assert child.wait(timeout=30) == 0
