"""``get_env_for_model``: the fallback chain, policies, stale envs, the CLI and the hot path.

Everything is real: the sample project (local channel, specs, locks) is created
once per module and copied per test; shared envs are built with rattler into a
per-test home; legacy venvs are real venvs with stub packages under a per-test
legacy root named in the project's ``provisioner.toml``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from legacy_venvs import (
    HEALTHY,
    OUTDATED,
    add_simple,
    create_venv,
    make_legacy,
    populate,
    site_packages,
)
from winsupport import needs_symlinks, venv_interpreter

from provisioner.build.layout import HomeLayout, python_path, read_pointer
from provisioner.config import Config, load_config
from provisioner.errors import ResolutionError
from provisioner.lock.write import lock_envs
from provisioner.models.resolve import Resolution, get_env_for_model
from provisioner.models.state import stat_signature
from provisioner.sample.project import create_sample_project

MISTRAL = "mistralai/Mistral-7B-v0.1"
LLAMA = "meta-llama/Llama-2-7b-hf"
LLAMA13 = "meta-llama/Llama-2-13b-hf"
CU121 = "sample-cu121-transformers"
BNB = "sample-cu121-transformers-bnb"
# built for the python running the tests (the sample channel's python), not always 3.11
BNB_ARCHIVE = "bitsandbytes-0.43.1-py{}{}_cuda_sample_0.tar.bz2".format(*sys.version_info[:2])
CPU = "sample-cpu-transformers"
HEAVY = ("rattler", "conda_lock", "rich")
# With warm caches a resolution parses no spec, rule or lockfile either.
WARM_EXTRA = ("yaml", "packaging")
MIGRATION_LOG = "using healthy old per-model environment (migration fallback)"
DEGRADED_LOG = "new env creation failed, using old environment in degraded mode"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The locked sample project; tests work on copies."""
    return create_sample_project(tmp_path_factory.mktemp("resolve") / "sample").path


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_venv(tmp_path_factory.mktemp("resolve-venv") / "venv")


@dataclass
class World:
    """One test's project copy, home and legacy root."""

    project: Path
    home: Path
    legacy_root: Path
    base_venv: Path

    def config(self, **overrides: object) -> Config:
        return load_config(self.project, home=self.home, environ={}).with_overrides(**overrides)

    def resolve(self, model: str, **kwargs: object) -> Resolution:
        return get_env_for_model(model, project=self.project, home=self.home,
                                 **kwargs)  # type: ignore[arg-type]

    def legacy(self, model: str, versions: dict[str, str], bnb: str | None = None) -> Path:
        return make_legacy(self.base_venv, self.legacy_root, model, versions, bnb=bnb)

    def settings(self, text: str) -> None:
        """Append keys to the project's ``[legacy]`` table."""
        with (self.project / "provisioner.toml").open("a", encoding="utf-8") as fh:
            fh.write(text)

    def corrupt(self, filename: str) -> None:
        """Flip a byte in an archive of the project's channel (its sha256 no longer matches)."""
        paths = sorted((self.project / "channel").glob(f"*/{filename}"))
        assert paths, filename
        for path in paths:  # every platform's copy
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PROVISIONER_") and k != "PYTHONPATH"}
        env.update(PROVISIONER_HOME=str(self.home), CONDA_OVERRIDE_CUDA="12.1")
        return env


@pytest.fixture
def world(sample: Path, base_venv: Path, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> World:
    for name in list(os.environ):
        if name.startswith("PROVISIONER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")
    project = tmp_path / "project"
    shutil.copytree(sample, project, symlinks=True)
    root = tmp_path / "environments"
    root.mkdir()
    w = World(project, tmp_path / "home", root, base_venv)
    w.settings(f"\n[legacy]\nroot = {json.dumps(str(root))}\n")
    return w


@pytest.fixture
def popen_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    real = subprocess.Popen

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(args[0] if args else kwargs.get("args"))
        return real(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "Popen", spy)
    return calls


def _steps(res: Resolution) -> list[tuple[str, str]]:
    return [(a.step, a.outcome) for a in res.attempts]


def _envs_built(home: Path) -> list[str]:
    envs = HomeLayout(home).envs
    return sorted(p.name for p in envs.iterdir()) if envs.is_dir() else []


# --------------------------------------------------------------------------- the chain


def test_ready_shared_env_is_used(world: World) -> None:
    first = world.resolve(MISTRAL)
    assert first.source == "shared"
    second = world.resolve(MISTRAL)
    assert second.source == "shared" and second.env_key == CU121
    assert _steps(second) == [("shared env", "used")]
    gen = read_pointer(HomeLayout(world.home), CU121)
    assert gen is not None and second.generation == gen and first.generation == gen
    prefix = HomeLayout(world.home).generation_dir(CU121, gen)
    assert (second.prefix, second.python) == (str(prefix), str(python_path(prefix)))
    assert second.migration_target is None
    assert json.loads(json.dumps(second.to_dict()))["source"] == "shared"


def test_healthy_legacy_is_preferred(world: World, caplog: pytest.LogCaptureFixture) -> None:
    venv = world.legacy(MISTRAL, HEALTHY)
    with caplog.at_level(logging.INFO, logger="provisioner"):
        res = world.resolve(MISTRAL)
    assert res.source == "legacy"
    assert res.env_key == CU121 and res.migration_target == CU121
    assert (res.prefix, res.python) == (str(venv), str(venv_interpreter(venv)))
    assert _steps(res) == [("shared env", "unavailable"), ("legacy env", "used")]
    assert MIGRATION_LOG in caplog.text
    assert _envs_built(world.home) == [], "nothing is built while a healthy legacy venv serves"
    data = json.loads(json.dumps(res.to_dict()))
    assert data["migration_target"] == CU121 and data["source"] == "legacy"
    assert [a["step"] for a in data["attempts"]] == ["shared env", "legacy env"]


def test_no_env_builds_the_shared_env(world: World, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="provisioner"):
        res = world.resolve(MISTRAL)
    assert res.source == "shared" and res.env_key == CU121
    assert _steps(res) == [("shared env", "unavailable"), ("legacy env", "unavailable"),
                           ("build shared env", "used")]
    assert res.attempts[-1].detail.startswith(f"build {CU121} in ")
    assert f"build shared env: used (build {CU121}" in caplog.text
    assert _envs_built(world.home) == [CU121]
    check = subprocess.run([res.python, "-c", "import torch, transformers, accelerate"],
                           capture_output=True, text=True, timeout=60, env=world.env())
    assert check.returncode == 0, check.stderr


def test_second_model_with_the_same_key_reuses_it(world: World,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = world.resolve(LLAMA)
    assert (first.source, first.env_key) == ("shared", BNB)
    layout = HomeLayout(world.home)

    def snapshot() -> tuple[list[str], list[str], int]:
        staged = sorted(p.name for p in layout.staging.iterdir()) if layout.staging.is_dir() \
            else []
        return (sorted(p.name for p in layout.key_dir(BNB).iterdir()), staged,
                layout.pointer(BNB).stat().st_mtime_ns)

    before = snapshot()
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", _forbidden)  # no build, no solve, no probe
        second = world.resolve(LLAMA13)
    assert (second.source, second.env_key, second.python) == ("shared", BNB, first.python)
    assert _steps(second) == [("shared env", "used")]
    # Reused as it was: the same generation, no new one, nothing staged, pointer untouched.
    assert second.generation == first.generation == read_pointer(layout, BNB)
    assert snapshot() == before
    assert _envs_built(world.home) == [BNB]


def test_build_failure_uses_outdated_legacy_in_degraded_mode(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    venv = world.legacy(MISTRAL, OUTDATED)
    world.corrupt("accelerate-0.26.1-pyh_sample_0.tar.bz2")
    with caplog.at_level(logging.INFO, logger="provisioner"):
        res = world.resolve(MISTRAL)
    assert res.source == "legacy-degraded"
    assert (res.python, res.migration_target) == (str(venv_interpreter(venv)), CU121)
    assert _steps(res) == [("shared env", "unavailable"), ("legacy env", "skipped"),
                           ("build shared env", "failed"), ("legacy env (lenient)", "used")]
    assert "degraded" in res.attempts[1].detail
    assert "accelerate" in res.attempts[2].detail
    assert DEGRADED_LOG in caplog.text
    assert _envs_built(world.home) in ([], [CU121])
    assert read_pointer(HomeLayout(world.home), CU121) is None


@needs_symlinks
def test_filesystem_error_during_build_falls_back(world: World) -> None:
    world.legacy(MISTRAL, OUTDATED)
    world.home.mkdir()
    elsewhere = world.home.parent / "elsewhere"
    elsewhere.mkdir()
    (world.home / "envs").symlink_to(elsewhere)  # refused: never built through
    res = world.resolve(MISTRAL)
    assert res.source == "legacy-degraded"
    assert _steps(res)[2] == ("build shared env", "failed")
    assert list(elsewhere.iterdir()) == []


def test_a_file_where_staging_belongs_is_moved_aside_and_the_build_serves(world: World) -> None:
    world.home.mkdir()
    (world.home / ".staging").write_text("not a directory", encoding="utf-8")
    res = world.resolve(MISTRAL)
    assert res.source == "shared"
    (aside,) = world.home.glob(".staging.moved-aside-*")
    assert aside.read_text(encoding="utf-8") == "not a directory"


def test_nothing_serves_lists_every_attempt(world: World) -> None:
    world.corrupt("accelerate-0.26.1-pyh_sample_0.tar.bz2")
    world.legacy(MISTRAL, {**HEALTHY, "torch": "1.13.1"})
    with pytest.raises(ResolutionError) as info:
        world.resolve(MISTRAL)
    text = str(info.value)
    assert text.startswith(f"no environment can serve model '{MISTRAL}': ")
    for part in ("shared env: unavailable", "legacy env: skipped", "is broken",
                 "build shared env: failed", "legacy env (lenient): failed"):
        assert part in text, part
    assert "\n" not in text
    assert info.value.hint

    shutil.rmtree(world.legacy_root / "local_mistralai--Mistral-7B-v0.1")
    with pytest.raises(ResolutionError) as again:
        world.resolve(MISTRAL)
    assert "legacy env: unavailable (no legacy venv" in str(again.value)
    assert "build shared env: failed" in str(again.value)


def test_no_build_and_nothing_ready(world: World) -> None:
    with pytest.raises(ResolutionError, match="building is disabled"):
        world.resolve(MISTRAL, build=False)
    assert _envs_built(world.home) == []


def test_unknown_model_and_policy(world: World) -> None:
    with pytest.raises(ResolutionError, match=r"no rule in models\.yml"):
        world.resolve("unknown/model")
    with pytest.raises(ResolutionError, match="unknown legacy policy"):
        world.resolve(MISTRAL, policy="sometimes")


# --------------------------------------------------------------------------- policies


def test_fallback_builds_despite_a_healthy_legacy_venv(world: World) -> None:
    world.legacy(MISTRAL, HEALTHY)
    res = world.resolve(MISTRAL, policy="fallback")
    assert res.source == "shared"
    assert _steps(res) == [("shared env", "unavailable"), ("build shared env", "used")]


def test_fallback_uses_the_healthy_legacy_venv_when_the_build_fails(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    venv = world.legacy(MISTRAL, HEALTHY)
    world.corrupt("accelerate-0.26.1-pyh_sample_0.tar.bz2")
    world.settings('policy = "fallback"\n')
    with caplog.at_level(logging.INFO, logger="provisioner"):
        res = world.resolve(MISTRAL)
    assert (res.source, res.prefix) == ("legacy", str(venv))
    assert _steps(res) == [("shared env", "unavailable"), ("build shared env", "failed"),
                           ("legacy env", "used")]
    assert "new env creation failed, using healthy old per-model environment" in caplog.text


def test_ignore_never_uses_legacy(world: World) -> None:
    world.legacy(MISTRAL, HEALTHY)
    res = world.resolve(MISTRAL, policy="ignore")
    assert res.source == "shared"
    world.corrupt(BNB_ARCHIVE)
    world.legacy(LLAMA, HEALTHY, bnb="0.43.1")
    with pytest.raises(ResolutionError) as info:
        world.resolve(LLAMA, policy="ignore")
    assert "legacy" not in str(info.value)
    assert world.resolve(LLAMA).source == "legacy"  # the config's policy (prefer) would


# --------------------------------------------------------------------------- stale envs


def _relock_with(world: World, old: str, new: str, key: str = CU121) -> None:
    spec = world.project / "environment-specs" / f"{key}.yml"
    text = spec.read_text(encoding="utf-8")
    assert old in text
    spec.write_text(text.replace(old, new, 1), encoding="utf-8")
    lock_envs(world.config(), [key])


def test_stale_shared_env_is_rebuilt(world: World) -> None:
    first = world.resolve(MISTRAL)
    _relock_with(world, "- transformers\n", "- transformers=4.36.2\n")
    res = world.resolve(MISTRAL)
    assert res.source == "shared" and res.generation != first.generation
    assert _steps(res) == [("shared env", "unavailable"), ("legacy env", "unavailable"),
                           ("build shared env", "used")]
    assert "stale" in res.attempts[0].detail
    assert res.attempts[-1].detail.startswith(f"rebuild {CU121}")
    assert world.resolve(MISTRAL).generation == res.generation


def test_failed_rebuild_keeps_the_old_generation(world: World) -> None:
    first = world.resolve(MISTRAL)
    _relock_with(world, "- transformers\n", "- transformers=4.36.2\n")
    world.corrupt("transformers-4.36.2-pyh_sample_0.tar.bz2")
    res = world.resolve(MISTRAL)
    assert (res.source, res.generation, res.python) == ("shared", first.generation,
                                                        first.python)
    assert _steps(res) == [("shared env", "unavailable"), ("legacy env", "unavailable"),
                           ("build shared env", "failed"), ("stale shared env", "used")]
    assert read_pointer(HomeLayout(world.home), CU121) == first.generation


# --------------------------------------------------------------------------- CLI


def _cli(world: World, model: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provisioner", "resolve", model, "--project", str(world.project),
         "--json"], capture_output=True, text=True, timeout=120, env=world.env())


def test_cli_resolve_json_in_the_demo_scenarios(world: World) -> None:
    world.legacy(MISTRAL, HEALTHY)
    world.legacy(LLAMA, OUTDATED, bnb="0.43.1")
    world.corrupt(BNB_ARCHIVE)
    expected = [("gpt2", "shared", 3), ("gpt2", "shared", 1), (MISTRAL, "legacy", 2),
                (LLAMA, "legacy-degraded", 4)]
    for model, source, attempts in expected:
        proc = _cli(world, model)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert (data["model_id"], data["source"]) == (model, source)
        assert len(data["attempts"]) == attempts, data["attempts"]
        assert Path(data["python"]).exists()
    assert DEGRADED_LOG in proc.stderr
    world.corrupt("accelerate-0.26.1-pyh_sample_0.tar.bz2")
    shutil.rmtree(world.legacy_root / "local_mistralai--Mistral-7B-v0.1")
    proc = _cli(world, MISTRAL)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"]["type"] == "ResolutionError"  # --json: on stdout
    assert "error: no environment can serve model" in proc.stderr


# --------------------------------------------------------------------------- hot path


def _fresh_process(world: World, model: str) -> tuple[str, list[str]]:
    code = (
        "import subprocess, sys\n"
        "from provisioner import get_env_for_model\n"
        "subprocess.Popen = None  # the hot path must start no process\n"
        f"r = get_env_for_model({model!r}, project={str(world.project)!r}, "
        f"home={str(world.home)!r})\n"
        "print(r.source)\n"
        f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY + WARM_EXTRA!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=world.env())
    assert proc.returncode == 0, proc.stderr
    source, modules = proc.stdout.strip().splitlines()
    return source, json.loads(modules.replace("'", '"'))


def test_importing_the_package_is_light() -> None:
    code = ("import sys; from provisioner import get_env_for_model; "
            f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _median_ms(fn: Callable[[], object], n: int = 200) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def test_hot_path_shared(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.resolve(MISTRAL)
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", _forbidden)
        assert world.resolve(MISTRAL).source == "shared"
        state = HomeLayout(world.home).state_file
        before = stat_signature(state)
        median = _median_ms(lambda: world.resolve(MISTRAL))
        assert stat_signature(state) == before, "the hot path rewrote the state file"
    # Informational only (benchmarks/ measures it): cheap is asserted by the path taken,
    # no process started, no state written, and (below) nothing heavy or parsing imported.
    print(f"hot path (shared): median {median:.3f} ms")
    assert _fresh_process(world, MISTRAL) == ("shared", [])


def test_hot_path_legacy(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.legacy(MISTRAL, HEALTHY)
    assert world.resolve(MISTRAL).source == "legacy"
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", _forbidden)
        res = world.resolve(MISTRAL)
        assert res.source == "legacy" and res.attempts[-1].detail.endswith("(cached)")
        median = _median_ms(lambda: world.resolve(MISTRAL))
    print(f"hot path (legacy): median {median:.3f} ms")  # informational, as above
    assert _fresh_process(world, MISTRAL) == ("legacy", [])


def _forbidden(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"a subprocess was started on the hot path: {args[:1]}")


# --------------------------------------------------------------------------- health cache


def test_unchanged_venv_is_not_reprobed(world: World, popen_calls: list[object]) -> None:
    world.legacy(MISTRAL, HEALTHY)
    assert world.resolve(MISTRAL).source == "legacy"
    assert len(popen_calls) == 1
    for _ in range(3):
        res = world.resolve(MISTRAL)
        assert res.source == "legacy" and "(cached)" in res.attempts[-1].detail
    assert len(popen_calls) == 1


def test_changed_venv_is_reprobed(world: World, popen_calls: list[object]) -> None:
    venv = world.legacy(MISTRAL, HEALTHY)
    assert world.resolve(MISTRAL).source == "legacy"
    (site_packages(venv) / "added.pth").write_text("", encoding="utf-8")
    res = world.resolve(MISTRAL)
    assert res.source == "legacy" and "(cached)" not in res.attempts[-1].detail
    assert len(popen_calls) == 2
    # A downgrade (pip replaces the package) is seen: the venv is now only lenient.
    time.sleep(0.01)
    add_simple(venv, "transformers", "4.30.0")
    res = world.resolve(MISTRAL)
    assert res.source == "shared"
    assert ("legacy env", "skipped") in _steps(res)
    assert "transformers 4.30.0 does not satisfy" in res.attempts[1].detail


def test_health_ttl_expiry_reprobes(world: World, popen_calls: list[object]) -> None:
    world.legacy(MISTRAL, HEALTHY)
    world.settings("health-ttl = 0\n")
    assert world.config().health_ttl == 0
    for n in (1, 2, 3):
        res = world.resolve(MISTRAL)
        assert res.source == "legacy" and "(cached)" not in res.attempts[-1].detail
        assert len(popen_calls) == n


@pytest.mark.skipif(sys.platform == "win32", reason="the base is a symlinked python3; on "
                    "Windows a symlinked python.exe does not find its standard library")
def test_uninstalling_the_base_python_invalidates_cached_health(
        world: World, popen_calls: list[object], tmp_path: Path) -> None:
    """The venv's own interpreter is a copy (as ``Scripts\\python.exe`` is on Windows):
    removing the base Python named by ``home =`` in ``pyvenv.cfg`` changes nothing
    in the venv, yet its cached "healthy" must not be served again."""
    base_dir = tmp_path / "base-python" / "bin"
    base_dir.mkdir(parents=True)
    (base_dir / "python3").symlink_to(os.path.realpath(sys._base_executable))  # type: ignore[attr-defined]
    venv = tmp_path / "environments" / "local_mistralai--Mistral-7B-v0.1" / ".venv"
    subprocess.run([str(base_dir / "python3"), "-m", "venv", "--copies", "--without-pip",
                    str(venv)], check=True, capture_output=True, timeout=120)
    assert f"home = {base_dir}" in (venv / "pyvenv.cfg").read_text(encoding="utf-8")
    assert not (venv / "bin" / "python").is_symlink()
    populate(venv, HEALTHY)
    popen_calls.clear()
    assert world.resolve(MISTRAL).source == "legacy"
    assert "(cached)" in world.resolve(MISTRAL).attempts[-1].detail
    assert len(popen_calls) == 1
    before = (venv / "bin" / "python").stat()

    (base_dir / "python3").unlink()  # the base Python is uninstalled
    assert (venv / "bin" / "python").stat() == before  # the venv's own files did not change
    res = world.resolve(MISTRAL)
    assert "(cached)" not in res.attempts[-1].detail and len(popen_calls) == 2


def test_a_model_without_an_env_key_is_served_by_its_working_old_venv(world: World) -> None:
    world.legacy("someorg/unlisted-model", HEALTHY)
    res = world.resolve("someorg/unlisted-model")
    assert res.source == "legacy-degraded"
    assert res.env_key == "" and res.migration_target is None
    assert [a.step for a in res.attempts] == ["env key", "legacy env (lenient)"]
    assert "no rule in models.yml" in res.attempts[0].detail
    # ...but only with a working interpreter, and never with policy 'ignore'.
    with pytest.raises(ResolutionError, match=r"no rule in models\.yml"):
        world.resolve("someorg/unlisted-model", policy="ignore")
