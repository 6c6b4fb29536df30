"""Health probes against real venvs with stub packages: verdicts, timeouts, isolation."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from legacy_venvs import (
    HEALTHY,
    OUTDATED,
    add_broken,
    add_torch,
    clone_venv,
    create_venv,
    hanging_python,
    pid_alive,
    populate,
    script_python,
    site_packages,
)

from provisioner.models.legacy import discover_legacy, venv_python
from provisioner.models.probe import Health, judge, probe_env

PROVIDES = ("torch>=2.2", "transformers>=4.36", "accelerate>=0.26", "cuda==12.1")
IMPORTS = ("torch", "transformers", "accelerate")
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="shell-script interpreters")


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_venv(tmp_path_factory.mktemp("probe-base") / "venv")


@pytest.fixture
def venv(base_venv: Path, tmp_path: Path) -> Path:
    return clone_venv(base_venv, tmp_path / "local_x" / ".venv")


def _probe(venv: Path, timeout: float = 30.0, provides: tuple[str, ...] = PROVIDES,
           imports: tuple[str, ...] = IMPORTS) -> Health:
    python, _layout = venv_python(venv)
    return probe_env(python, provides, imports, timeout=timeout)


def test_healthy_venv_is_strict(venv: Path) -> None:
    populate(venv, HEALTHY)
    health = _probe(venv)
    assert health.status == "healthy", health.reasons
    assert health.strict and health.lenient and health.reasons == ()
    assert health.facts["torch_cuda"] == "12.1"
    assert health.facts["cuda_available"] is True
    assert health.seconds > 0 and health.checked_at > 0


def test_bitsandbytes_cuda_fact(venv: Path) -> None:
    populate(venv, HEALTHY, bnb="0.43.1")
    health = _probe(venv, provides=(*PROVIDES, "bitsandbytes>=0.43"),
                    imports=(*IMPORTS, "bitsandbytes"))
    assert health.status == "healthy", health.reasons
    assert health.facts["bnb_cuda"] is True


def test_outdated_package_is_degraded(venv: Path) -> None:
    populate(venv, OUTDATED)
    health = _probe(venv)
    assert health.status == "degraded"
    assert not health.strict and health.lenient
    assert health.reasons == ("transformers 4.30.0 does not satisfy transformers>=4.36",)


def test_major_version_mismatch_is_broken(venv: Path) -> None:
    populate(venv, {**HEALTHY, "torch": "1.13.1"})
    health = _probe(venv, provides=("torch>=2.1", "transformers>=4.36"))
    assert health.status == "broken"
    assert not health.strict and not health.lenient
    assert any("torch 1.13.1 does not satisfy torch>=2.1" in r for r in health.reasons)


def test_cuda_mismatch_is_not_strict(venv: Path) -> None:
    populate(venv, {**HEALTHY, "cuda": "11.8"})
    health = _probe(venv)
    assert not health.strict
    assert health.status != "healthy"
    assert any("cuda 11.8 does not satisfy cuda==12.1" in r for r in health.reasons)


def test_cpu_only_torch_has_no_cuda(venv: Path) -> None:
    populate(venv, HEALTHY)
    add_torch(venv, "2.2.1", cuda=None, available=False)
    health = _probe(venv)
    assert health.status == "broken"
    assert "cuda: not found" in health.reasons
    assert health.facts["cuda_available"] is False


def test_import_error_is_broken_with_reason(venv: Path) -> None:
    populate(venv, HEALTHY)
    add_broken(venv, "transformers", "boom: missing libcudart")
    health = _probe(venv)
    assert health.status == "broken"
    assert not health.lenient
    assert any("import transformers failed: ImportError: boom: missing libcudart" in r
               for r in health.reasons), health.reasons


def test_missing_interpreter(venv: Path) -> None:
    populate(venv, HEALTHY)
    (venv / "bin" / "python").unlink()
    python, layout = venv_python(venv)
    assert python is None and layout == "posix"
    health = probe_env(python, PROVIDES, IMPORTS, timeout=5)
    assert health.status == "missing"
    assert health.reasons == ("interpreter not found",)
    assert probe_env(venv / "bin" / "python", PROVIDES, IMPORTS).status == "missing"


@posix_only
def test_hanging_interpreter_is_killed_with_its_children(venv: Path, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    hanging_python(venv, pids)
    start = time.monotonic()
    health = _probe(venv, timeout=2)
    took = time.monotonic() - start
    assert health.status == "broken"
    assert health.reasons == ("probe timed out after 2 s",)
    assert took >= 2.0, "the probe gave up before its timeout"
    # Both processes sleep 600 s, so the probe returning at all, with them dead, is the
    # proof that it killed them rather than waited; the 10 s poll is only a hang guard.
    recorded = [int((pids / n).read_text().strip()) for n in ("sh.pid", "child.pid")]
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in recorded) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p for p in recorded if pid_alive(p)] == [], "a probe process survived"


@posix_only
@pytest.mark.parametrize("body, reason", [
    ("echo 'hello, this is not json'", "probe gave no result (exit 0)"),
    ("echo 'PROVISIONER-PROBE {not json'", "probe printed malformed JSON"),
    ("echo 'PROVISIONER-PROBE [1, 2]'", "probe printed malformed JSON"),
    ("echo 'Fatal Python error' >&2; exit 1", "probe gave no result (exit 1): Fatal Python"),
])
def test_garbage_output_is_broken(venv: Path, body: str, reason: str) -> None:
    script_python(venv, body)
    health = _probe(venv, timeout=10)
    assert health.status == "broken"
    assert health.reasons[0].startswith(reason), health.reasons


def test_probe_is_isolated_from_pythonpath(venv: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           base_venv: Path) -> None:
    # A good torch elsewhere, on PYTHONPATH: it must not rescue a venv without torch.
    donor = clone_venv(base_venv, tmp_path / "donor")
    populate(donor, HEALTHY)
    monkeypatch.setenv("PYTHONPATH", str(site_packages(donor)))
    populate(venv, {k: v for k, v in HEALTHY.items() if k not in ("torch", "cuda")})
    health = _probe(venv)
    assert health.status == "broken"
    assert any(r.startswith("import torch failed") for r in health.reasons), health.reasons
    assert _probe(donor).status == "healthy"


def test_windows_layout_is_discovered(tmp_path: Path) -> None:
    venv = tmp_path / "root" / "local_org--win" / ".venv"
    (venv / "Scripts").mkdir(parents=True)
    (venv / "Scripts" / "python.exe").write_bytes(b"MZ")
    (found,) = discover_legacy(tmp_path / "root")
    assert (found.model_id, found.layout) == ("org/win", "windows")
    assert found.python == venv / "Scripts" / "python.exe"
    # A Scripts dir without an interpreter: windows layout, interpreter missing.
    (venv / "Scripts" / "python.exe").unlink()
    (found,) = discover_legacy(tmp_path / "root")
    assert (found.layout, found.python) == ("windows", None)


def test_health_round_trips_through_json(venv: Path) -> None:
    populate(venv, OUTDATED)
    health = _probe(venv)
    again = Health.from_dict(json.loads(json.dumps(health.to_dict())))
    assert again == health


def test_judge_without_probe_facts() -> None:
    health = judge({"imports": {}}, ("torch>=2.1",), ("torch",))
    assert health.status == "broken"
    assert health.reasons == ("import torch failed: not probed", "torch: not found")
    assert Health.from_dict({"reasons": "x", "facts": []}).status == "broken"


# --------------------------------------------------------------------------- nothing left behind

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="setsid orphans are found through Linux's /proc")
_FACTS = '{"python": "3.11.0", "platform": "linux", "machine": "x86_64", "imports": {}}'
# A daemon that leaves the probe's session (setsid) and its group; the pid goes to a file.
_SETSID_DAEMON = ('import os, sys, time\n'
                  'os.setsid()\n'
                  'if os.fork():\n'
                  '    os._exit(0)\n'  # double fork: the daemon's parent is gone at once
                  'open(sys.argv[1], "w").write(str(os.getpid()))\n'
                  'time.sleep(300)\n')


def _wait_for_pid(path: Path) -> int:
    for _ in range(500):
        if path.exists() and path.read_text(encoding="utf-8").strip():
            return int(path.read_text(encoding="utf-8"))
        time.sleep(0.01)
    raise AssertionError(f"no pid written to {path}")


@posix_only
@linux_only
def test_a_setsid_grandchild_of_a_probe_is_gone_after_the_probe(venv: Path,
                                                              tmp_path: Path) -> None:
    daemon, pidfile = tmp_path / "daemon.py", tmp_path / "daemon.pid"
    daemon.write_text(_SETSID_DAEMON, encoding="utf-8")
    python = script_python(venv, f"{sys.executable} {daemon} {pidfile} &\n"
                                 f"while [ ! -s {pidfile} ]; do sleep 0.01; done\n"
                                 f"echo 'PROVISIONER-PROBE {_FACTS}'")
    health = probe_env(python, (), ())
    pid = _wait_for_pid(pidfile)
    assert health.status == "healthy", health.reasons
    assert not pid_alive(pid), "the setsid daemon survived the probe"


@posix_only
def test_a_background_grandchild_is_gone_even_when_the_probe_succeeds(venv: Path,
                                                                      tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    python = script_python(venv, f"sleep 300 &\necho $! > {pidfile}\n"
                                 f"echo 'PROVISIONER-PROBE {_FACTS}'")
    health = probe_env(python, (), ())
    assert health.status == "healthy", health.reasons
    assert not pid_alive(_wait_for_pid(pidfile))


@posix_only
def test_probe_output_is_capped_at_one_mib(venv: Path) -> None:
    python = script_python(venv, "exec yes 0123456789abcdef0123456789abcdef")  # endless output
    health = probe_env(python, (), (), timeout=120)
    assert health.status == "broken"
    assert "more than 1048576 bytes" in health.reasons[0]
