"""``provisioner pack``: pixi-pack's layout, a sha256 manifest, and the same bytes every time."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from provisioner.build.pack import TAR_MTIME, make_pack
from provisioner.config import load_config
from provisioner.errors import IntegrityError, LockfileError, UserError
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lockfile
from provisioner.sample.project import SampleProject, create_sample_project

CPU = "sample-cpu-transformers"
CU = "sample-cu121-transformers-bnb"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("pack") / "sp")


def members(pack: Path) -> dict[str, bytes]:
    with tarfile.open(pack) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
                for m in tar.getmembers()}


def test_pack_layout_follows_pixi_pack_and_lists_every_file(project: SampleProject,
                                                            tmp_path: Path) -> None:
    config = load_config(project.path, home=tmp_path / "home", environ={})
    result = make_pack(config, CPU, output=tmp_path / "cpu.tar")
    plat = host_platform()
    files = members(result.path)
    lock = read_lockfile(project.path / "lockfiles" / f"{CPU}.conda-lock.yml")
    conda = lock.for_platform(plat, "conda")
    assert result.conda_packages == len(conda) > 0 and result.pip_wheels == 0
    # pixi-pack's metadata file and its environment.yml (exact name=version=build specs)
    assert json.loads(files["pixi-pack.json"]) == {"platform": plat, "version": "1"}
    env_lines = files["environment.yml"].decode().splitlines()
    assert env_lines[:4] == ["channels:", "  - ./channel", "  - nodefaults", "dependencies:"]
    assert env_lines[4:] == [f"  - {p.name}={p.version}={p.build}" for p in conda]
    # every locked archive, with the lock's bytes, in channel/<subdir>/, indexed by rattler
    for pkg in conda:
        data = files[f"channel/{pkg.subdir}/{pkg.file_name}"]
        assert hashlib.sha256(data).hexdigest() == pkg.sha256
    for subdir in {p.subdir for p in conda} | {"noarch"}:
        repodata = json.loads(files[f"channel/{subdir}/repodata.json"])
        listed = set(repodata.get("packages", {})) | set(repodata.get("packages.conda", {}))
        assert listed == {p.file_name for p in conda if p.subdir == subdir}
        assert all("indexed_timestamp" not in r for r in repodata["packages"].values())
    archives = [n for n in files if n.endswith(".tar.bz2")]
    assert len(archives) == len(conda)  # nothing the lock does not pin (no other pytorch build)
    # the lock and the spec it was made from, and a manifest of every other file
    assert files[f"provisioner/{CPU}.conda-lock.yml"] == (
        project.path / "lockfiles" / f"{CPU}.conda-lock.yml").read_bytes()
    manifest = json.loads(files["provisioner/manifest.json"])
    assert manifest["key"] == CPU and manifest["platform"] == plat
    assert manifest["lock_sha256"] == result.lock_sha256 == hashlib.sha256(
        files[f"provisioner/{CPU}.conda-lock.yml"]).hexdigest()
    regular = {n for n, m in _infos(result.path).items() if m.isfile()}
    assert set(manifest["files"]) == regular - {"provisioner/manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": hashlib.sha256(files[name]).hexdigest(),
                         "bytes": len(files[name])}
    assert result.sha256 == hashlib.sha256(result.path.read_bytes()).hexdigest()


def _infos(pack: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(pack) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_pack_twice_gives_identical_bytes(project: SampleProject, tmp_path: Path) -> None:
    # Two homes (a cold cache each), two output dirs, and a second, separately written project.
    other = create_sample_project(tmp_path / "other")
    first = make_pack(load_config(project.path, home=tmp_path / "h1", environ={}), CU,
                      output=tmp_path / "a" / "p.tar")
    second = make_pack(load_config(other.path, home=tmp_path / "h2", environ={}), CU,
                       output=tmp_path / "b" / "p.tar")
    assert first.path.read_bytes() == second.path.read_bytes()
    infos = _infos(first.path)
    names = list(infos)
    assert names == sorted(names)
    for info in infos.values():
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (TAR_MTIME, 0, 0, "", "")
        assert info.mode == (0o755 if info.isdir() else 0o644)
        assert info.isdir() or info.isfile()
    # uncompressed: a plain tar whose first block is the first member's header
    assert first.path.read_bytes()[257:262] == b"ustar"
    assert not list(first.path.parent.glob(".provisioner-pack-*"))  # the scratch dir is gone


def test_pack_includes_the_pip_layer_wheels(project: SampleProject, tmp_path: Path) -> None:
    from provisioner.lock.wheels import build_wheel
    from provisioner.lock.write import lock_envs

    dest = Path(shutil.copytree(project.path, tmp_path / "sp"))
    build_wheel(dest / "wheels", "tinywheel", "1.0", requires=["numpy"])
    spec = dest / "environment-specs" / f"{CPU}.yml"
    spec.write_text(spec.read_text().replace(
        "- transformers\nx-provisioner:", "- transformers\n- pip:\n  - tinywheel==1.0\n"
        "x-provisioner:"), encoding="utf-8")
    with (dest / "provisioner.toml").open("a", encoding="utf-8") as fh:
        fh.write('\n[pip]\nno-index = true\nfind-links = ["wheels"]\n')
    lock_envs(load_config(dest, environ={}), [CPU])
    result = make_pack(load_config(dest, home=tmp_path / "home", environ={}), CPU,
                       output=tmp_path / "p.tar")
    files = members(result.path)
    [wheel] = [n for n in files if n.startswith("pypi/")]
    [entry] = read_lockfile(dest / "lockfiles" / f"{CPU}.conda-lock.yml").for_platform(
        host_platform(), "pip")
    assert wheel == f"pypi/{entry.file_name}" and result.pip_wheels == 1
    assert hashlib.sha256(files[wheel]).hexdigest() == entry.sha256
    assert files["environment.yml"].decode().endswith(
        "  - pip:\n    - --no-index\n    - --find-links ./pypi\n    - tinywheel==1.0\n")
    # Without the wheel anywhere, pack refuses rather than write a pack that cannot build.
    shutil.rmtree(dest / "wheels")
    with pytest.raises(UserError, match="no wheel with the locked sha256 for tinywheel"):
        make_pack(load_config(dest, home=tmp_path / "home", environ={}), CPU,
                  output=tmp_path / "q.tar")
    assert not (tmp_path / "q.tar").exists()


def test_pack_refuses_an_unlocked_platform_or_key(project: SampleProject, tmp_path: Path) -> None:
    config = load_config(project.path, home=tmp_path / "home", environ={})
    with pytest.raises(UserError, match="has no osx-arm64 packages"):
        make_pack(config, CPU, platform="osx-arm64", output=tmp_path / "x.tar")
    with pytest.raises(LockfileError, match="no-such-key has no lock"):
        make_pack(config, "no-such-key", output=tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_pack_for_another_platform_holds_that_platforms_archives(project: SampleProject,
                                                                 tmp_path: Path) -> None:
    config = load_config(project.path, home=tmp_path / "home", environ={})
    result = make_pack(config, CPU, platform="win-64", output=tmp_path / "w.tar")
    files = members(result.path)
    assert json.loads(files["pixi-pack.json"])["platform"] == "win-64"
    assert any(n.startswith("channel/win-64/") and n.endswith(".tar.bz2") for n in files)
    assert not any(n.startswith("channel/linux-64/") for n in files)


def test_a_channel_archive_that_no_longer_matches_the_lock_is_not_packed(
        project: SampleProject, tmp_path: Path) -> None:
    dest = Path(shutil.copytree(project.path, tmp_path / "sp"))
    lock = read_lockfile(dest / "lockfiles" / f"{CPU}.conda-lock.yml")
    pkg = next(p for p in lock.for_platform(host_platform(), "conda") if p.name == "numpy")
    archive = dest / "channel" / pkg.subdir / pkg.file_name
    data = bytearray(archive.read_bytes())
    data[-1] ^= 1
    archive.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 mismatch for numpy"):
        make_pack(load_config(dest, home=tmp_path / "home", environ={}), CPU,
                  output=tmp_path / "p.tar")
    assert not (tmp_path / "p.tar").exists()



def test_the_pack_installs_from_its_repodata_alone_as_pixi_unpack_does(
        project: SampleProject, tmp_path: Path) -> None:
    """pixi-unpack's procedure (its src/unpack.rs), with py-rattler: no lock, no provisioner.

    Read pixi-pack.json, take every record of every channel/<subdir>/repodata.json, install
    them all into a prefix; the env must be the lock's and its python must run.
    """
    import rattler

    from provisioner.build.layout import python_path
    from provisioner.lock.solve import run_rattler

    pack = make_pack(load_config(project.path, home=tmp_path / "home", environ={}), CPU,
                     output=tmp_path / "p.tar").path
    root = tmp_path / "unpacked"
    with tarfile.open(pack) as tar:
        tar.extractall(root, filter="data")
    meta = json.loads((root / "pixi-pack.json").read_text())
    assert meta == {"platform": host_platform(), "version": "1"}
    records = []
    for subdir in sorted(p for p in (root / "channel").iterdir() if p.is_dir()):
        repodata = rattler.RepoData.from_path(subdir / "repodata.json")
        records += repodata.into_repo_data(rattler.Channel(subdir.parent.as_uri()))
    lock = read_lockfile(project.path / "lockfiles" / f"{CPU}.conda-lock.yml")
    assert sorted(r.file_name for r in records) == sorted(
        p.file_name for p in lock.for_platform(host_platform(), "conda"))
    prefix = tmp_path / "env"
    run_rattler(rattler.install(records, target_prefix=prefix, cache_dir=tmp_path / "cache",
                                show_progress=False))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    ran = subprocess.run([str(python_path(prefix)), "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert ran.returncode == 0 and ran.stdout.strip() == "2.2.1", ran.stderr


def test_an_archive_that_changes_while_it_is_packed_stops_the_pack(tmp_path: Path) -> None:
    from provisioner.build.pack import write_tar

    root = tmp_path / "tree"
    (root / "channel" / "noarch").mkdir(parents=True)
    (root / "channel" / "noarch" / "a-1-0.tar.bz2").write_bytes(b"changed in the cache")
    out = tmp_path / "p.tar"
    with out.open("wb") as fh, pytest.raises(IntegrityError, match="changed while it was packed"):
        write_tar(fh, root, {"channel/noarch/a-1-0.tar.bz2": hashlib.sha256(b"locked").hexdigest()})
    with out.open("wb") as fh:
        write_tar(fh, root, {"channel/noarch/a-1-0.tar.bz2": hashlib.sha256(
            b"changed in the cache").hexdigest()})
    assert "channel/noarch/a-1-0.tar.bz2" in members(out)
