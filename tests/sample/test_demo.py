"""``provisioner demo``: the four model-load scenarios, played for real offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import LongSpelling

from provisioner.errors import UserError
from provisioner.models.resolve import Resolution
from provisioner.sample import demo
from provisioner.sample.demo import run_demo


def test_demo_plays_the_four_scenarios(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first, so that monkeypatch also undoes the variable the demo sets itself.
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "placeholder")
    monkeypatch.delenv("CONDA_OVERRIDE_CUDA")
    resolutions: list[Resolution] = []
    real = demo.get_env_for_model

    def recorded(*args: Any, **kwargs: Any) -> Resolution:
        resolutions.append(real(*args, **kwargs))
        return resolutions[-1]

    monkeypatch.setattr(demo, "get_env_for_model", recorded)
    report = run_demo(tmp_path / "demo")
    sources = [s.resolution.source for s in report.scenarios]
    assert sources == ["legacy", "shared", "shared", "legacy-degraded"]
    healthy, built, reused, degraded = (s.resolution for s in report.scenarios)
    assert healthy.migration_target == "sample-cu121-transformers-bnb"
    assert built.env_key == reused.env_key == "sample-cu121-transformers"
    assert built.python == reused.python and Path(built.python).is_file()
    assert [a.step for a in reused.attempts] == ["shared env"]
    assert any(a.step == "build shared env" and a.outcome == "failed" for a in degraded.attempts)
    assert report.build_seconds > 0 and report.repeat_ms >= 0  # measured (a coarse clock may say 0)
    # The timed repeat is the cheap path: the built generation used as it is, nothing built.
    assert len(resolutions) == 5 and resolutions[3] is degraded
    repeat = resolutions[4]
    assert [(a.step, a.outcome) for a in repeat.attempts] == [("shared env", "used")]
    assert (repeat.env_key, repeat.generation) == (built.env_key, built.generation)
    assert report.inventory is not None
    assert [e.key for e in report.inventory.shared] == ["sample-cu121-transformers"]
    # The demo pretends a CUDA 12.1 driver for itself only when none is configured.
    assert os.environ["CONDA_OVERRIDE_CUDA"] == "12.1"
    json.dumps(report.to_dict())


def test_demo_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep me", encoding="utf-8")
    with pytest.raises(UserError, match="not empty"):
        run_demo(tmp_path)
    assert (tmp_path / "x").read_text(encoding="utf-8") == "keep me"


def test_demo_command_prints_every_scenario(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    result = subprocess.run(
        [sys.executable, "-m", "provisioner", "demo", "--home", str(tmp_path / "d")],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    for line in ("(1) healthy old env", "(2) new shared env built and promoted",
                 "(3) same key reused", "(4) build failed, old env in degraded mode",
                 "provisioner list:"):
        assert line in result.stdout
    assert "using healthy old per-model environment (migration fallback)" in result.stderr
    assert "new env creation failed, using old environment in degraded mode" in result.stderr
    assert "Traceback" not in result.stderr


def test_hardlinked_bytes_use_the_extended_length_spelling(tmp_path: Path,
                                                           long_spelling: LongSpelling) -> None:
    from provisioner.sample import demo

    cache = tmp_path / "pkgs" / "torch-2.2.1-0"
    cache.mkdir(parents=True)
    (cache / "torch_cpu.dll").write_bytes(b"x" * 500)
    real = tmp_path / "env"
    (real / "Lib").mkdir(parents=True)
    os.link(cache / "torch_cpu.dll", real / "Lib" / "torch_cpu.dll")
    (real / "own.txt").write_bytes(b"y" * 7)
    plain = long_spelling.route(real, demo)
    assert not plain.exists() and demo._hardlinked_bytes(plain) == 500
