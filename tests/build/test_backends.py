"""Backends: choosing one, and driving micromamba/mamba/conda through their command lines.

No conda, mamba or micromamba exists on these machines, so the executable
backends run against a fake: a real executable script that checks its command
line like the real tool, reads the ``@EXPLICIT`` file, verifies each archive's
hash and installs the real archives of the sample channel, patching the prefix
placeholder with ``--relocate-prefix`` the way micromamba does. Tests at the end
run the real tools where one is installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
from winsupport import fake_executable

from provisioner.build.artifacts import VerifiedArtifact, verify_artifacts
from provisioner.build.backends import (
    BACKENDS,
    ExecutableBackend,
    RattlerBackend,
    choose_backend,
    render_explicit,
)
from provisioner.build.ensure import EnsureOptions, EnsureResult, ensure
from provisioner.build.env_checks import check_files, check_records, find_staging_path
from provisioner.build.fingerprint import in_progress_path, read_fingerprint
from provisioner.build.layout import HomeLayout, read_pointer
from provisioner.config import Config, load_config
from provisioner.errors import BuildError, ToolMissingError, UserError
from provisioner.lock.channels import resolve_channels
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lockfile
from provisioner.progress import PhaseEvent
from provisioner.sample.project import SampleProject, create_sample_project

CPU = "sample-cpu-transformers"
CU_PLAIN = "sample-cu121-transformers"

_FAKE_TOOL = r'''
"""A stand-in for @NAME@ that installs an @EXPLICIT file offline, like the real tool."""
import hashlib
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

NAME = "@NAME@"
args = sys.argv[1:]
log = os.environ.get("FAKE_CONDA_LOG")
if log:
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"argv": args, "pkgs_dirs": os.environ.get("CONDA_PKGS_DIRS")}) + "\n")
if args == ["--version"]:
    print(NAME + " 1.5.8")
    sys.exit(0)


def usage(msg):
    sys.stderr.write(NAME + ": error: " + msg + "\n")
    sys.exit(2)


if args[:5] != ["create", "--yes", "--quiet", "--offline", "--prefix"] or len(args) < 8:
    usage("unexpected command line " + repr(args))
if args[6] != "--file":
    usage("expected --file, got " + repr(args[6]))
prefix, explicit, rest = Path(args[5]), Path(args[7]), args[8:]
if NAME == "conda":
    if rest:
        usage("unrecognized arguments: " + " ".join(rest))
    if not (prefix / ".provisioner-in-progress").is_file():
        usage("test expectation: conda builds at the final path behind the in-progress marker")
    final = prefix
else:
    if len(rest) != 2 or rest[0] != "--relocate-prefix":
        usage("expected --relocate-prefix FINAL, got " + repr(rest))
    final = Path(rest[1])
    if prefix.exists() and any(prefix.iterdir()) and not (prefix / "conda-meta").exists():
        # What micromamba (and mamba < 2.4) do with a non-empty, non-conda folder.
        sys.stderr.write("critical libmamba Non-conda folder exists at prefix - aborting.\n")
        sys.exit(1)
if os.environ.get("FAKE_CONDA_DELAY"):
    time.sleep(float(os.environ["FAKE_CONDA_DELAY"]))
if os.environ.get("FAKE_CONDA_FAIL"):
    sys.stderr.write("critical libmamba simulated failure: disk full\n")
    sys.exit(3)
written = str(prefix if os.environ.get("FAKE_CONDA_NO_RELOCATE") else final)

lines = [line.strip() for line in explicit.read_text(encoding="utf-8").splitlines()]
if "@EXPLICIT" not in lines:
    usage("not an explicit file")
urls = [line for line in lines if line and not line.startswith(("#", "@"))]
python_xy = None
for line in urls:
    name = line.partition("#")[0].rsplit("/", 1)[-1]
    if name.startswith("python-"):
        python_xy = ".".join(name.split("-")[1].split(".")[:2])
(prefix / "conda-meta").mkdir(parents=True, exist_ok=True)
for line in urls:
    url, _sep, digest = line.partition("#")
    if not url.startswith("file://"):
        usage("offline mode cannot fetch " + url)
    archive = Path(url2pathname(urlparse(url).path))  # /C:/... is C:\\... on Windows
    data = archive.read_bytes()
    algo = hashlib.md5 if len(digest) == 32 else hashlib.sha256
    if algo(data).hexdigest() != digest:
        sys.stderr.write("critical libmamba hash mismatch for " + archive.name + "\n")
        sys.exit(1)
    records = []
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("info/index.json"))
        paths = json.load(tar.extractfile("info/paths.json"))["paths"]
        for entry in paths:
            member = tar.getmember(entry["_path"])
            content = tar.extractfile(member).read()
            rel = entry["_path"]
            if index.get("noarch") == "python" and rel.startswith("site-packages/"):
                rel = ("Lib/" if os.name == "nt" else "lib/python" + python_xy + "/") + rel
            if entry.get("prefix_placeholder"):
                content = content.replace(entry["prefix_placeholder"].encode(), written.encode())
            out = prefix / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(content)
            os.chmod(out, member.mode)
            records.append({"_path": rel, "path_type": "hardlink", "sha256": entry["sha256"],
                            "sha256_in_prefix": hashlib.sha256(content).hexdigest(),
                            "size_in_bytes": len(content)})
    meta = {k: index[k] for k in ("name", "version", "build", "build_number", "subdir")}
    meta.update(sha256=hashlib.sha256(data).hexdigest(), md5=hashlib.md5(data).hexdigest(),
                url=url, files=[r["_path"] for r in records],
                paths_data={"paths_version": 1, "paths": records})
    stem = index["name"] + "-" + index["version"] + "-" + index["build"]
    (prefix / "conda-meta" / (stem + ".json")).write_text(json.dumps(meta), encoding="utf-8")
# Like conda's entry-point scripts: a generated file that names the prefix it was written for
# (the prefix placeholders of the sample's Windows packages are none).
entry = prefix / ("Scripts" if os.name == "nt" else "bin") / "fake-entry-point"
entry.parent.mkdir(parents=True, exist_ok=True)
entry.write_text("#!" + os.path.join(written, "python") + "\n", encoding="utf-8")
# Like micromamba, log the command line (staging path included) in the history.
(prefix / "conda-meta" / "history").write_text("# cmd: " + " ".join(sys.argv) + "\n",
                                               encoding="utf-8")
print("Transaction finished")
'''


def write_fake_tool(directory: Path, name: str) -> Path:
    """The fake ``name``: a ``#!`` script, or on Windows ``name.bat`` running ``name.py``."""
    return fake_executable(directory, name, _FAKE_TOOL.replace("@NAME@", name))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("backends") / "sp")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")
    for name in ("PROVISIONER_BACKEND", "PROVISIONER_MICROMAMBA_EXE", "PROVISIONER_MAMBA_EXE",
                 "PROVISIONER_CONDA_EXE", "PROVISIONER_TEST_FAULT", "CONDA_PKGS_DIRS",
                 "FAKE_CONDA_FAIL", "FAKE_CONDA_NO_RELOCATE", "FAKE_CONDA_DELAY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "fake-calls.jsonl"
    monkeypatch.setenv("FAKE_CONDA_LOG", str(log))
    return log


def calls(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def config_for(project: SampleProject, tmp_path: Path) -> Config:
    return load_config(project.path, home=tmp_path / "home", environ={})


def staging_entries(layout: HomeLayout) -> list[str]:
    return sorted(p.name for p in layout.staging.iterdir()) if layout.staging.exists() else []


def import_torch(python: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run([str(python), "-c", "import torch; print(torch.__file__)"],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    return out.stdout.strip()


# --- choose_backend ------------------------------------------------------------------------------


def test_default_is_rattler() -> None:
    choice = choose_backend(None, None, "linux-64", environ={})
    assert isinstance(choice.backend, RattlerBackend)
    assert choice.backend.name == "rattler" and not choice.backend.builds_in_place
    assert "default" in choice.reason


def test_precedence_option_env_config(tmp_path: Path) -> None:
    mm = write_fake_tool(tmp_path / "bin", "micromamba")
    conda = write_fake_tool(tmp_path / "bin", "conda")
    environ = {"PROVISIONER_BACKEND": "conda", "PROVISIONER_CONDA_EXE": str(conda),
               "PROVISIONER_MICROMAMBA_EXE": str(mm)}

    by_option = choose_backend("micromamba", "rattler", "linux-64", environ=environ)
    assert by_option.backend.name == "micromamba"
    assert by_option.reason == f"--backend option; micromamba at {mm}"
    assert isinstance(by_option.backend, ExecutableBackend)
    assert by_option.backend.executable == str(mm)

    by_env = choose_backend(None, "micromamba", "linux-64", environ=environ)
    assert by_env.backend.name == "conda" and by_env.backend.builds_in_place
    assert by_env.reason.startswith("PROVISIONER_BACKEND")

    by_config = choose_backend(None, "micromamba", "linux-64",
                               environ={"PROVISIONER_MICROMAMBA_EXE": str(mm)})
    assert by_config.backend.name == "micromamba"
    assert by_config.reason.startswith("provisioner.toml")

    rattler = choose_backend("rattler", "micromamba", "linux-64", environ=environ)
    assert rattler.backend.name == "rattler" and rattler.reason == "--backend option"


def test_config_file_backend_reaches_choose_backend(project: SampleProject,
                                                   tmp_path: Path) -> None:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "provisioner.toml").write_text('backend = "micromamba"\n')
    config = load_config(tmp_path / "proj", environ={})
    assert config.backend == "micromamba"
    with pytest.raises(ToolMissingError, match=r"provisioner\.toml"):
        choose_backend(None, config.backend, "linux-64", environ={})


@pytest.mark.parametrize("where", ["option", "env", "config"])
def test_unknown_backend_is_a_user_error(where: str) -> None:
    option = "pixi" if where == "option" else None
    environ = {"PROVISIONER_BACKEND": "pixi"} if where == "env" else {}
    configured = "pixi" if where == "config" else None
    with pytest.raises(UserError, match="unknown backend 'pixi'") as err:
        choose_backend(option, configured, "linux-64", environ=environ)
    assert err.value.hint is not None
    assert all(name in err.value.hint for name in BACKENDS)


@pytest.mark.parametrize("name", ["micromamba", "mamba", "conda"])
def test_missing_executable_is_reported(name: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ToolMissingError, match=f"no {name} executable") as err:
        choose_backend(name, None, "linux-64", environ={})
    assert err.value.hint is not None and f"PROVISIONER_{name.upper()}_EXE" in err.value.hint


def test_executable_found_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = write_fake_tool(tmp_path / "bin", "mamba")
    monkeypatch.setenv("PATH", str(exe.parent))
    choice = choose_backend("mamba", None, "linux-64", environ={})
    assert isinstance(choice.backend, ExecutableBackend)
    # Windows: found through PATHEXT, whose spelling of the extension (.BAT) may win
    assert os.path.normcase(choice.backend.executable) == os.path.normcase(str(exe))
    assert choice.backend.version() == "mamba 1.5.8"


# --- command lines and explicit files ------------------------------------------------------------


def test_argv_shapes(tmp_path: Path) -> None:
    explicit, staging, final, cache = (tmp_path / n for n in ("e.txt", "stage", "final", "pkgs"))
    mm = ExecutableBackend("micromamba", "/opt/mm", "linux-64")
    assert mm.argv(explicit, staging, final, cache) == [
        "/opt/mm", "create", "--yes", "--quiet", "--offline", "--prefix", str(staging),
        "--file", str(explicit), "--relocate-prefix", str(final)]
    conda = ExecutableBackend("conda", "/opt/conda", "linux-64")
    assert conda.builds_in_place and not mm.builds_in_place
    assert conda.argv(explicit, final, final, cache) == [
        "/opt/conda", "create", "--yes", "--quiet", "--offline", "--prefix", str(final),
        "--file", str(explicit)]


def _artifacts(project: SampleProject, tmp_path: Path, key: str) -> list[VerifiedArtifact]:
    config = config_for(project, tmp_path)
    lock = read_lockfile(project.path / "lockfiles" / f"{key}.conda-lock.yml")
    return verify_artifacts(lock.for_platform(host_platform(), "conda"),
                            resolve_channels(lock.channels, config), tmp_path / "pkgs")


def test_render_explicit(project: SampleProject, tmp_path: Path) -> None:
    artifacts = _artifacts(project, tmp_path, CPU)
    text = render_explicit(artifacts, "linux-64")
    lines = text.splitlines()
    assert text.endswith("\n")
    assert lines[:2] == ["# platform: linux-64", "@EXPLICIT"]
    assert len(lines) == 2 + len(artifacts)
    channel = (project.path / "channel").resolve()
    for line, art in zip(lines[2:], artifacts, strict=True):
        url, _sep, digest = line.partition("#")
        assert url == art.path.as_uri() and url.startswith("file://")
        assert Path(url2pathname(urlparse(url).path)).parent.parent == channel
        assert digest == art.package.md5  # md5 when the lock has one, as conda expects
    no_md5 = dataclasses.replace(artifacts[0].package, md5=None)
    line = render_explicit([VerifiedArtifact(no_md5, artifacts[0].path)], "win-64").splitlines()
    assert line[0] == "# platform: win-64"
    assert line[2] == f"{artifacts[0].url}#{no_md5.sha256}"


# --- the rattler backend -------------------------------------------------------------------------


def test_rattler_reports_extract_and_link(project: SampleProject, tmp_path: Path) -> None:
    events: list[PhaseEvent] = []
    result = ensure(config_for(project, tmp_path), CPU, EnsureOptions(progress=events.append))
    packages = read_lockfile(project.path / "lockfiles" / f"{CPU}.conda-lock.yml") \
        .for_platform(host_platform(), "conda")
    assert result.backend == "rattler"
    ends = {e.phase: e for e in events if e.kind == "end"}
    n = len(packages)
    assert (ends["extract"].done, ends["extract"].total) == (n, n)
    assert (ends["link"].done, ends["link"].total) == (n, n)
    assert ends["extract"].note == f"{n} unpacked, 0 already cached"  # a fresh home
    assert all(e.ok and e.subject == CPU for e in ends.values())


# --- executable backends against the fake tool ---------------------------------------------------


@pytest.mark.parametrize("name", ["micromamba", "mamba"])
def test_relocating_tool_builds_in_staging(project: SampleProject, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, fake_log: Path,
                                           name: str) -> None:
    exe = write_fake_tool(tmp_path / "bin", name)
    monkeypatch.setenv(f"PROVISIONER_{name.upper()}_EXE", str(exe))
    config = config_for(project, tmp_path)
    layout = HomeLayout(config.home)
    result = ensure(config, CPU, EnsureOptions(backend=name))

    assert result.action == "build" and result.backend == name
    assert result.backend_reason == f"--backend option; {name} at {exe}"
    (call,) = [c for c in calls(fake_log) if c["argv"] != ["--version"]]
    argv = call["argv"]
    assert isinstance(argv, list)
    staging_prefix = Path(argv[5])
    assert staging_prefix.parent.parent == layout.staging
    assert argv[-2:] == ["--relocate-prefix", str(result.prefix)]
    assert call["pkgs_dirs"] == str(layout.package_cache)
    assert not list(layout.package_cache.glob("explicit-*"))

    fp = read_fingerprint(result.prefix)
    assert fp is not None and fp.backend == name and fp.backend_version == f"{name} 1.5.8"
    assert read_pointer(layout, CPU) == result.generation
    assert staging_entries(layout) == []
    assert find_staging_path(result.prefix, str(layout.staging), trust_hardlinks=False) == []
    packages = read_lockfile(result.plan.lockfile).for_platform(host_platform(), "conda")
    assert check_records(result.prefix, packages).ok
    assert check_files(result.prefix, deep=True).ok
    assert Path(import_torch(result.python)).is_relative_to(result.prefix)


def test_tool_that_does_not_relocate_is_caught(project: SampleProject, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    exe = write_fake_tool(tmp_path / "bin", "micromamba")
    monkeypatch.setenv("PROVISIONER_MICROMAMBA_EXE", str(exe))
    monkeypatch.setenv("FAKE_CONDA_NO_RELOCATE", "1")
    config = config_for(project, tmp_path)
    layout = HomeLayout(config.home)
    with pytest.raises(BuildError, match="still name the staging path"):
        ensure(config, CPU, EnsureOptions(backend="micromamba"))
    assert staging_entries(layout) == []
    assert not layout.key_dir(CPU).exists()


def test_failing_tool_reports_exit_and_cleans_up(project: SampleProject, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    exe = write_fake_tool(tmp_path / "bin", "micromamba")
    monkeypatch.setenv("PROVISIONER_MICROMAMBA_EXE", str(exe))
    monkeypatch.setenv("FAKE_CONDA_FAIL", "1")
    config = config_for(project, tmp_path)
    layout = HomeLayout(config.home)
    with pytest.raises(BuildError, match=r"micromamba failed .*exit 3.*disk full"):
        ensure(config, CPU, EnsureOptions(backend="micromamba"))
    assert staging_entries(layout) == []
    assert not layout.key_dir(CPU).exists()
    assert not list(layout.package_cache.glob("explicit-*"))


def test_conda_builds_in_place_behind_the_marker(project: SampleProject, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 fake_log: Path) -> None:
    exe = write_fake_tool(tmp_path / "bin", "conda")
    monkeypatch.setenv("PROVISIONER_CONDA_EXE", str(exe))
    monkeypatch.setenv("PROVISIONER_BACKEND", "conda")
    config = config_for(project, tmp_path)
    layout = HomeLayout(config.home)
    result = ensure(config, CPU)
    assert result.backend == "conda" and result.backend_reason.startswith("PROVISIONER_BACKEND")
    (call,) = [c for c in calls(fake_log) if c["argv"] != ["--version"]]
    argv = call["argv"]
    assert isinstance(argv, list)
    assert argv[5] == str(result.prefix) and "--relocate-prefix" not in argv
    assert not layout.staging.exists(), "conda never uses the staging area"
    assert not in_progress_path(result.prefix).exists()
    fp = read_fingerprint(result.prefix)
    assert fp is not None and fp.backend == "conda"
    assert Path(import_torch(result.python)).is_relative_to(result.prefix)
    assert ensure(config, CPU).action == "reuse"


def test_failed_in_place_build_is_discarded(project: SampleProject, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    exe = write_fake_tool(tmp_path / "bin", "conda")
    monkeypatch.setenv("PROVISIONER_CONDA_EXE", str(exe))
    monkeypatch.setenv("FAKE_CONDA_FAIL", "1")
    config = config_for(project, tmp_path)
    layout = HomeLayout(config.home)
    with pytest.raises(BuildError, match="conda failed"):
        ensure(config, CPU, EnsureOptions(backend="conda"))
    assert not layout.key_dir(CPU).exists() or not any(layout.key_dir(CPU).iterdir())
    assert read_pointer(layout, CPU) is None
    assert not layout.trash.exists() or not any(layout.trash.iterdir())


def test_threads_building_two_keys_with_a_tool(project: SampleProject, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each build hands the tool its own explicit file, even from threads of one process."""
    exe = write_fake_tool(tmp_path / "bin", "micromamba")
    monkeypatch.setenv("PROVISIONER_MICROMAMBA_EXE", str(exe))
    monkeypatch.setenv("FAKE_CONDA_DELAY", "0.5")
    config = config_for(project, tmp_path)
    barrier = threading.Barrier(2)
    results: dict[str, EnsureResult] = {}
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            barrier.wait(timeout=10)
            results[key] = ensure(config, key, EnsureOptions(backend="micromamba"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in (CPU, CU_PLAIN)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert set(results) == {CPU, CU_PLAIN}
    for result in results.values():
        assert Path(import_torch(result.python)).is_relative_to(result.prefix)


# --- real tools, where installed -----------------------------------------------------------------


@pytest.mark.parametrize("name", [
    pytest.param(tool, marks=pytest.mark.skipif(
        shutil.which(tool) is None,
        reason=f"{tool} is not installed here (none of conda, mamba, micromamba can be)"))
    for tool in ("micromamba", "mamba", "conda")
])
def test_real_tool_builds_the_sample_env(project: SampleProject, tmp_path: Path,
                                         name: str) -> None:
    config = config_for(project, tmp_path)
    layout = HomeLayout(config.home)
    result = ensure(config, CPU, EnsureOptions(backend=name))
    assert result.backend == name and result.action == "build"
    assert find_staging_path(result.prefix, str(layout.staging), trust_hardlinks=False) == []
    assert Path(import_torch(result.python)).is_relative_to(result.prefix)
