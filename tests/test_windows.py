"""Real Windows checks: long paths, a real venv's Scripts/python.exe, renames under a held handle.

The rest of the suite simulates Windows (``windows=True``, injected renames); these
run only on a real Windows host, such as CI's windows-latest runners.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from provisioner import fsops
from provisioner.models.legacy import LEGACY_DIR_PREFIX, VENV_DIR, discover_legacy, legacy_for_model

pytestmark = [
    pytest.mark.windows_only,
    pytest.mark.skipif(sys.platform != "win32", reason="needs a real Windows filesystem and API"),
]


def test_extended_length_path_round_trip(tmp_path: Path) -> None:
    top = tmp_path / "owned"
    top.mkdir()
    fsops.write_marker(top, "test")
    deep = top
    while len(str(deep)) < 300:
        deep = deep / ("d" * 40)
    assert len(str(deep)) > 260
    os.makedirs(fsops.to_extended_path(deep))
    target = deep / ("file-" + "f" * 30 + ".txt")
    assert len(str(target)) > 260
    fsops.atomic_write_text(target, "long paths work\n")
    extended = fsops.to_extended_path(target)
    assert extended.startswith("\\\\?\\")
    with open(extended, encoding="utf-8") as fh:
        assert fh.read() == "long paths work\n"
    fsops.atomic_write_text(target, "replaced\n")
    with open(extended, encoding="utf-8") as fh:
        assert fh.read() == "replaced\n"
    fsops.safe_rmtree(top)
    assert not top.exists()


def test_legacy_discovery_of_a_real_windows_venv(tmp_path: Path) -> None:
    root = tmp_path / "environments"
    venv = root / f"{LEGACY_DIR_PREFIX}meta-llama--Llama-2-7b-hf" / VENV_DIR
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert (venv / "Scripts" / "python.exe").is_file()
    [env] = discover_legacy(root)
    assert env.model_id == "meta-llama/Llama-2-7b-hf"
    assert env.layout == "windows"
    assert env.python == venv / "Scripts" / "python.exe"
    found = legacy_for_model(root, "meta-llama/Llama-2-7b-hf")
    assert found is not None and found.python == env.python
    ran = subprocess.run([str(env.python), "-c", "import sys; print(sys.prefix)"],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert Path(ran.stdout.strip()).resolve() == venv.resolve()


_HOLDER = """
import sys, time
with open(sys.argv[1], "rb") as fh:
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_rename_with_retry_outlasts_a_handle_held_by_another_process(tmp_path: Path) -> None:
    src = tmp_path / "staging"
    src.mkdir()
    held = src / "held.bin"
    held.write_bytes(b"x")
    dst = tmp_path / "promoted"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(held), "1.5"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        # Best effort: a plain rename usually fails now (WinError 5 or 32); with retries it
        # succeeds once the other process lets go.
        try:
            os.rename(src, tmp_path / "probe")
        except PermissionError as exc:
            assert getattr(exc, "winerror", None) in (5, 32)
        else:
            os.rename(tmp_path / "probe", src)
        # The outcome is the proof: it returned instead of raising the sharing violation,
        # so a retry outlasted the handle (the holder lets go after 1.5 s of a 20 s budget).
        fsops.rename_with_retry(src, dst, budget=20.0)
    finally:
        holder.wait(timeout=30)
    assert (dst / "held.bin").read_bytes() == b"x"
    assert not src.exists()
