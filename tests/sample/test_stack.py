"""The sample channel and wheels are real: rattler indexes, solves and installs them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import rattler
import yaml
from rattler import BuildString, Channel, GenericVirtualPackage, MatchSpec, PackageName, Version

from provisioner.build.layout import python_path
from provisioner.config import load_config
from provisioner.errors import UserError
from provisioner.lock.platforms import host_platform, virtual_packages_for
from provisioner.lock.spec import list_spec_keys, load_spec
from provisioner.sample.project import write_sample_project
from provisioner.sample.stack import (
    PREFIX_PLACEHOLDER,
    SAMPLE_CHANNEL,
    PackageFile,
    build_conda_package,
    build_sample_channel,
    build_synthetic_channel,
    build_wheel,
    channel_url,
    host_python,
)

CU121_BNB = ["python", "pytorch=2.2.1=*cuda12.1*", "transformers", "accelerate", "bitsandbytes"]
CPU = ["python", "pytorch=2.2.1=*cpu*", "transformers"]


def solve(url: str, specs: list[str], platform: str, cuda: str | None) -> list[Any]:
    virtual = [
        GenericVirtualPackage(PackageName(n), Version(v), BuildString(b))
        for n, (v, b) in virtual_packages_for(platform, cuda).items()
    ]
    return list(asyncio.run(rattler.solve(
        sources=[Channel(url)], specs=[MatchSpec(s) for s in specs],
        platforms=[platform, "noarch"], virtual_packages=virtual,
    )))


def names(records: list[Any]) -> dict[str, str]:
    return {r.name.normalized: f"{r.version}={r.build}" for r in records}


def read_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()


def sha256s(channel: Path) -> dict[str, str]:
    return {
        str(p.relative_to(channel)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(channel.rglob("*.tar.bz2"))
    }


def test_channel_is_indexed(sample_channel: Path) -> None:
    for subdir in ["noarch", "linux-64", "win-64", host_platform()]:
        repodata = json.loads((sample_channel / subdir / "repodata.json").read_text())
        assert repodata["info"]["subdir"] == subdir
        assert repodata["packages"], subdir
    linux = json.loads((sample_channel / "linux-64" / "repodata.json").read_text())["packages"]
    torch = {k: v for k, v in linux.items() if v["name"] == "pytorch"}
    assert len(torch) == 6
    noarch = json.loads((sample_channel / "noarch" / "repodata.json").read_text())["packages"]
    assert noarch["transformers-4.40.0-pyh_sample_0.tar.bz2"]["noarch"] == "python"
    assert not (sample_channel / ".tmp").exists()


def test_package_metadata(sample_channel: Path, host_python_xy: str) -> None:
    build = f"py{host_python_xy}_cuda12.1_cudnn8.9.2_0"
    cuda = sample_channel / "linux-64" / f"pytorch-2.2.1-{build}.tar.bz2"
    index = json.loads(read_member(cuda, "info/index.json"))
    assert index["subdir"] == "linux-64" and index["arch"] == "x86_64"
    assert "pytorch-mutex 1.0 cuda" in index["depends"]
    assert "pytorch-cuda >=12.1,<12.2" in index["depends"]
    major, minor = host_python_xy.split(".")
    assert f"python >={host_python_xy},<{major}.{int(minor) + 1}.0a0" in index["depends"]

    python = next((sample_channel / "linux-64").glob("python-*.tar.bz2"))
    paths = json.loads(read_member(python, "info/paths.json"))
    assert paths["paths_version"] == 1
    by_path = {e["_path"]: e for e in paths["paths"]}
    launcher = by_path["bin/python"]
    assert launcher["file_mode"] == "text" and launcher["prefix_placeholder"] == PREFIX_PLACEHOLDER
    content = read_member(python, "bin/python")
    assert launcher["sha256"] == hashlib.sha256(content).hexdigest()
    assert launcher["size_in_bytes"] == len(content)
    assert all(e["path_type"] == "hardlink" for e in paths["paths"])
    files = read_member(python, "info/files").decode().splitlines()
    assert sorted(files) == sorted(by_path)

    transformers = sample_channel / "noarch" / "transformers-4.40.0-pyh_sample_0.tar.bz2"
    link = json.loads(read_member(transformers, "info/link.json"))
    assert link == {"noarch": {"type": "python"}, "package_metadata_version": 1}
    assert "site-packages/transformers/__init__.py" in read_member(
        transformers, "info/files").decode().splitlines()

    cuda_version = sample_channel / "noarch" / "cuda-version-12.1-h_sample_0.tar.bz2"
    assert json.loads(read_member(cuda_version, "info/index.json"))["constrains"] == [
        "__cuda >=12.1"]


def test_artifacts_are_deterministic(sample_channel: Path, tmp_path: Path) -> None:
    again = build_sample_channel(tmp_path / "again", ["linux-64", "win-64", host_platform()])
    assert sha256s(again) == sha256s(sample_channel)
    files = [PackageFile("share/a.txt", f"{PREFIX_PLACEHOLDER}\n".encode(), text_placeholder=True)]
    one = build_conda_package(tmp_path / "c1", "linux-64", "a", "1.0", "0", files=files)
    two = build_conda_package(tmp_path / "c2", "linux-64", "a", "1.0", "0", files=files)
    assert one.read_bytes() == two.read_bytes()


def test_build_conda_package_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="noarch"):
        build_conda_package(tmp_path, "linux-64", "a", "1", "0", noarch="python")
    with pytest.raises(ValueError, match="relative"):
        build_conda_package(tmp_path, "linux-64", "a", "1", "0", files=[PackageFile("/x", b"")])
    with pytest.raises(ValueError, match="placeholder"):
        build_conda_package(tmp_path, "linux-64", "a", "1", "0",
                            files=[PackageFile("x", b"no", text_placeholder=True)])


@pytest.mark.parametrize(
    ("specs", "cuda"), [(CU121_BNB, "12.1"), (CPU, None)], ids=["cu121", "cpu"]
)
def test_install_relocated_env_imports(
    sample_channel_url: str, tmp_path: Path, specs: list[str], cuda: str | None
) -> None:
    records = solve(sample_channel_url, specs, host_platform(), cuda)
    staging, final = tmp_path / "envs" / ".staging-x1", tmp_path / "envs" / "final-env"
    asyncio.run(rattler.install(records, target_prefix=staging, alternative_target_prefix=final,
                                cache_dir=tmp_path / "pkgs", show_progress=False))
    os.replace(staging, final)

    python = python_path(final)  # bin/python, or on Windows the venv launcher python.exe
    assert os.access(python, os.X_OK)
    code = (
        "import importlib.metadata as md, torch, transformers, numpy\n"
        "print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), "
        "md.version('torch'), md.version('transformers'), numpy.__version__, torch.__file__)\n"
        "try:\n    import yaml\nexcept ImportError:\n    print('isolated')\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    version, torch_cuda, available, md_torch, md_tf, np_version, torch_file, isolated = out.split()
    assert (version, md_torch, md_tf, np_version) == ("2.2.1", "2.2.1", "4.40.0", "1.26.4")
    assert torch_cuda == str(cuda)
    assert available == str(cuda is not None)
    assert Path(torch_file).is_relative_to(final)
    assert isolated == "isolated"  # the test venv's packages do not leak in
    if sys.platform == "win32":  # a real venv there: the env is sys.prefix
        prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"],
                                capture_output=True, text=True, check=True).stdout.strip()
        assert Path(prefix).resolve() == final.resolve()

    staging_bytes = str(staging).encode()
    for path in final.rglob("*"):
        if path.is_file():
            assert staging_bytes not in path.read_bytes(), path

    if cuda:
        hidden = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        probe = (
            "import torch, accelerate, bitsandbytes as b; from bitsandbytes import cextension as c;"
            "print(torch.cuda.is_available(), b.__version__, c.COMPILED_WITH_CUDA, c.BNB_BACKEND)"
        )
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True,
                             env=hidden).stdout.split()
        assert out == ["False", "0.43.1", "True", "CUDA"]
        args = subprocess.run([python, "-c", "import sys; print(sys.argv[1:])", "a b", "c"],
                              capture_output=True, text=True, check=True).stdout
        assert args.strip() == "['a b', 'c']"


def test_solves_pick_the_right_builds(sample_channel_url: str) -> None:
    cu121 = names(solve(sample_channel_url, CU121_BNB, "linux-64", "12.1"))
    assert "cuda12.1" in cu121["pytorch"] and cu121["cuda-version"].startswith("12.1=")
    assert cu121["pytorch-mutex"] == "1.0=cuda"
    cpu = names(solve(sample_channel_url, CPU, "linux-64", None))
    assert "_cpu_" in cpu["pytorch"] and "pytorch-cuda" not in cpu
    win = names(solve(sample_channel_url, CU121_BNB, "win-64", "12.1"))
    assert {"python", "pytorch", "transformers", "accelerate", "bitsandbytes"} <= set(win)
    with pytest.raises(Exception, match="cuda"):  # cuda-version 12.1 constrains __cuda >=12.1
        solve(sample_channel_url, ["python", "pytorch", "pytorch-cuda=12.1"], "linux-64", "11.8")


def test_win_64_layout(sample_channel: Path) -> None:
    torch = next((sample_channel / "win-64").glob("pytorch-2.2.1-*cuda12.1*.tar.bz2"))
    files = read_member(torch, "info/files").decode().splitlines()
    assert "Lib/site-packages/torch/__init__.py" in files
    python = next((sample_channel / "win-64").glob("python-*.tar.bz2"))
    files = read_member(python, "info/files").decode().splitlines()
    assert {"python.exe", "python._pth", "pyvenv.cfg", "Scripts/python.exe"} <= set(files)
    paths = json.loads(read_member(python, "info/paths.json"))["paths"]
    assert not [p for p in paths if "prefix_placeholder" in p]  # runs in staging and promoted
    launcher = read_member(python, "python.exe")
    assert launcher == read_member(python, "Scripts/python.exe")
    if sys.platform == "win32":
        assert launcher[:2] == b"MZ"  # the host's real venvlauncher.exe
    else:
        assert b"stand-in" in launcher


def test_build_wheel_installs_with_uv(tmp_path: Path) -> None:
    from uv import find_uv_bin

    wheels = tmp_path / "wheels"
    dep = build_wheel(wheels, "sample-dep", "1.2.0")
    app = build_wheel(wheels, "sample-app", "0.1.0", requires=["sample-dep>=1.0"])
    assert app.name == "sample_app-0.1.0-py3-none-any.whl"
    assert build_wheel(tmp_path / "again", "sample-dep", "1.2.0").read_bytes() == dep.read_bytes()
    with zipfile.ZipFile(app) as zf:
        metadata = zf.read("sample_app-0.1.0.dist-info/METADATA").decode()
    assert "Requires-Dist: sample-dep>=1.0" in metadata.splitlines()

    target = tmp_path / "target"
    subprocess.run(
        [find_uv_bin(), "pip", "install", "--no-config", "--offline", "--no-index",
         "--find-links", str(wheels), "--target", str(target), "--python", sys.executable,
         "--cache-dir", str(tmp_path / "uv-cache"), "sample-app"],
        check=True, capture_output=True, text=True,
    )
    assert (target / "sample_app" / "__init__.py").read_text() == '__version__ = "0.1.0"\n'
    assert (target / "sample_dep-1.2.0.dist-info" / "METADATA").is_file()


def test_synthetic_channel(tmp_path: Path) -> None:
    channel = tmp_path / "synth"
    pkgs = build_synthetic_channel(channel, 10, 5, "linux-64")
    assert len(pkgs) == 10
    repodata = json.loads((channel / "linux-64" / "repodata.json").read_text())["packages"]
    assert len(repodata) == 10 and any(r["depends"] for r in repodata.values())
    records = solve(channel_url(channel), pkgs, "linux-64", None)
    assert len(records) == 10
    prefix = tmp_path / "env"
    asyncio.run(rattler.install(records, target_prefix=prefix, cache_dir=tmp_path / "pkgs",
                                show_progress=False))
    first = (prefix / "share" / "synth" / pkgs[0] / "f0000.txt").read_text()
    assert PREFIX_PLACEHOLDER not in first and "prefix = " in first
    assert len(list((prefix / "share" / "synth").rglob("*.txt"))) == 50


def test_write_sample_project(tmp_path: Path) -> None:
    dest = tmp_path / "proj"
    written = write_sample_project(dest)
    assert written == [dest / "channel", dest / "environment-specs", dest / "provisioner.toml"]
    specs_dir = dest / "environment-specs"
    keys = list_spec_keys(specs_dir)
    assert keys == ["sample-cpu-transformers", "sample-cu121-transformers",
                    "sample-cu121-transformers-bnb"]
    config = load_config(dest, environ={})
    assert Path(config.channel_mirrors[SAMPLE_CHANNEL]) == dest / "channel"
    assert config.home == dest / ".provisioner-home"
    url = channel_url(dest / "channel")
    for key in keys:
        spec = load_spec(specs_dir, key)
        assert spec.channels == (SAMPLE_CHANNEL,)
        assert {"linux-64", "win-64", host_platform()} == set(spec.platforms)
        for platform in spec.platforms:
            got = names(solve(url, list(spec.dependencies), platform, spec.cuda))
            assert set(spec.imports) - {"torch"} <= set(got)
            assert ("cuda12.1" in got["pytorch"]) == (spec.cuda == "12.1")
    bnb = load_spec(specs_dir, "sample-cu121-transformers-bnb")
    assert "bitsandbytes>=0.43" in bnb.provides and bnb.cuda == "12.1"
    rules = yaml.safe_load((specs_dir / "models.yml").read_text())["rules"]
    assert {"model": "gpt2", "env": "sample-cpu-transformers"} in rules
    assert all(str(tmp_path) not in p.read_text() for p in specs_dir.iterdir())

    with pytest.raises(UserError) as err:
        write_sample_project(dest)
    assert err.value.hint
    (tmp_path / "empty").mkdir()
    assert write_sample_project(tmp_path / "empty")


def test_host_python_queries_other_interpreters() -> None:
    expected = ".".join(str(n) for n in sys.version_info[:3])
    other = host_python(str(Path(sys.executable).resolve()))
    assert other.version == expected and Path(other.executable).is_absolute()
    with pytest.raises(UserError, match="cannot run"):
        host_python(str(Path(sys.executable).parent / "no-such-python"))
