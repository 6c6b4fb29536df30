"""Progress through the real console script, stderr not a terminal: one line per phase.

The project is the sample one with a pip layer (``peft`` from local wheels), so a
build goes through every phase: download, extract, link, pip layer, verify; ``lock``
reports its solve.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner.progress import PHASES
from provisioner.sample.stack import build_wheel

PROVISIONER = Path(sysconfig.get_path("scripts")) / (
    "provisioner.exe" if sys.platform == "win32" else "provisioner")
CPU = "sample-cpu-transformers"
PHASE_LINE = re.compile(r"^(?P<phase>" + "|".join(PHASES) + r") (?P<key>\S+): (?P<body>.+)$")
BUILD_PHASES = ["download", "extract", "link", "pip layer", "verify"]


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(PROVISIONER), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def phase_lines(stderr: str) -> list[tuple[str, str, str]]:
    return [(m["phase"], m["key"], m["body"]) for line in stderr.splitlines()
            if (m := PHASE_LINE.match(line))]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("progress-env")
    result = {k: v for k, v in os.environ.items()
              if not k.startswith(("PROVISIONER_", "XDG_", "CONDA_", "UV_", "RUST_LOG"))}
    result.update(HOME=str(base), XDG_CACHE_HOME=str(base / "cache"), UV_OFFLINE="1")
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> dict[str, Any]:
    """The sample project, the cpu key with ``pip: [peft]``; and the lock command's output."""
    work = tmp_path_factory.mktemp("progress")
    assert run(["sample", "proj"], work, env).returncode == 0
    proj = work / "proj"
    wheels = proj / "wheels"
    build_wheel(wheels, "torch", "2.2.1")
    build_wheel(wheels, "transformers", "4.40.0")
    build_wheel(wheels, "peft", "0.10.0", requires=["torch>=1.13", "transformers"])
    with (proj / "provisioner.toml").open("a", encoding="utf-8") as fh:
        fh.write('\n[pip]\nno-index = true\nfind-links = ["wheels"]\n')
    spec_file = proj / "environment-specs" / f"{CPU}.yml"
    spec = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
    spec["dependencies"].append({"pip": ["peft>=0.10"]})
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    locked = run(["lock", CPU], proj, env)
    assert locked.returncode == 0, locked.stderr
    return {"path": proj, "lock": locked, "platforms": len(spec["platforms"])}


def test_lock_reports_its_solve(project: dict[str, Any]) -> None:
    n = project["platforms"]
    lines = phase_lines(project["lock"].stderr)
    assert [(p, k) for p, k, _ in lines] == [("solve", CPU)]
    assert lines[0][2].startswith(f"{n}/{n} platforms in ")


def test_one_line_per_phase_in_order(project: dict[str, Any], env: dict[str, str],
                                     tmp_path: Path) -> None:
    result = run(["ensure", CPU, "--home", str(tmp_path / "h")], project["path"], env)
    assert result.returncode == 0, result.stderr
    lines = phase_lines(result.stderr)
    assert [p for p, _, _ in lines] == BUILD_PHASES
    assert {k for _, k, _ in lines} == {CPU}
    body = dict((p, b) for p, _, b in lines)
    assert body["download"].endswith("; 0 of 5 archives fetched")  # a local mirror
    assert body["extract"].startswith("5/5 packages in ")
    assert body["extract"].endswith("; 5 unpacked, 0 already cached")
    assert body["link"].startswith("5/5 packages in ")
    assert body["pip layer"].startswith("1/1 wheels in ")
    assert body["verify"].startswith("3/3 checks in ")
    assert not re.search(r"\x1b\[", result.stderr)  # no bar, no colour off a terminal
    # A reuse has no long phases, so it says nothing.
    again = run(["ensure", CPU, "--home", str(tmp_path / "h")], project["path"], env)
    assert again.returncode == 0 and phase_lines(again.stderr) == []
    # verify --deep hashes every file: its own verify phase, counted in packages.
    deep = run(["verify", CPU, "--deep", "--home", str(tmp_path / "h")], project["path"], env)
    assert deep.returncode == 0, deep.stderr
    [(phase, key, body)] = phase_lines(deep.stderr)
    assert (phase, key) == ("verify", CPU) and body.startswith("5/5 packages in ")


@pytest.mark.parametrize("flag", ["--no-progress", "-q"])
def test_no_progress_and_quiet_show_none(project: dict[str, Any], env: dict[str, str],
                                         tmp_path: Path, flag: str) -> None:
    result = run(["ensure", CPU, flag, "--home", str(tmp_path / "h")], project["path"], env)
    assert result.returncode == 0, result.stderr
    assert phase_lines(result.stderr) == []
    assert result.stdout.strip().endswith(("python", "python.exe"))  # the build happened


def test_json_output_is_unaffected(project: dict[str, Any], env: dict[str, str],
                                   tmp_path: Path) -> None:
    result = run(["ensure", CPU, "--json", "--home", str(tmp_path / "h")], project["path"], env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # stdout is the one JSON object, nothing else
    assert data["action"] == "build" and data["key"] == CPU
    assert [p for p, _, _ in phase_lines(result.stderr)] == BUILD_PHASES
    locked = run(["lock", CPU, "--json"], project["path"], env)
    assert json.loads(locked.stdout)["ok"] is True
