"""``ensure KEY --from PACK``: pack on one machine, build on another with nothing but the pack.

The "node" is a project with only the specs and locks (no channel, no
provisioner.toml) and a fresh home; where ``unshare -rn`` works, the build runs
in a network namespace with no network at all.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import S3_KEY, S3_SECRET, s3_server, static_server

from provisioner.build.layout import HomeLayout
from provisioner.build.pack import MANIFEST, make_pack, write_tar
from provisioner.build.plan import make_plan
from provisioner.config import load_config
from provisioner.lock.platforms import host_platform
from provisioner.sample.project import SampleProject, create_sample_project

CPU = "sample-cpu-transformers"
CU = "sample-cu121-transformers-bnb"


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


UNSHARE = _unshare_works()
needs_unshare = pytest.mark.skipif(not UNSHARE, reason=(
    "Linux namespaces: no 'unshare -rn' on Windows or macOS" if not sys.platform.startswith("linux")
    else "'unshare -rn' (a user and network namespace) is not allowed on this machine"))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("from-pack") / "sp")


@pytest.fixture(scope="module")
def packs(project: SampleProject, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("packs")
    config = load_config(project.path, home=out / "home", environ={})
    result = {key: make_pack(config, key, output=out / f"{key}.tar").path for key in (CPU, CU)}
    other = "win-64" if host_platform() != "win-64" else "linux-64"
    result["other-platform"] = make_pack(config, CPU, platform=other,
                                         output=out / "other.tar").path
    return result


def node(project: SampleProject, tmp_path: Path) -> Path:
    """A project on a node: specs and locks only."""
    dest = tmp_path / "node"
    for part in ("environment-specs", "lockfiles"):
        shutil.copytree(project.path / part, dest / part)
    return dest


def cli(args: list[str], cwd: Path, *, offline: bool = False) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("provisioner")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "provisioner"]
    if offline:
        argv = ["unshare", "-rn", *argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    env.update(CONDA_OVERRIDE_CUDA="12.1", UV_OFFLINE="1")
    result = subprocess.run([*argv, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def refused(result: subprocess.CompletedProcess[str], *phrases: str) -> str:
    """Exit 2 and one error line (plus its hint) naming what is wrong."""
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for phrase in phrases:
        assert phrase in errors[0], result.stderr
    return errors[0]


def nothing_promoted(home: Path, key: str) -> None:
    layout = HomeLayout(home)
    assert not layout.pointer(key).exists()
    assert not layout.key_dir(key).exists() or not any(
        p for p in layout.key_dir(key).iterdir() if p.name != "current")
    assert not layout.staging.exists() or list(layout.staging.iterdir()) == []


def run_python(python: Path, code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# --- acceptance: pack -> ensure --from with the network cut --------------------------------


@needs_unshare
def test_the_namespace_really_has_no_network(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)"
        inside = subprocess.run(["unshare", "-rn", sys.executable, "-c", code],
                                capture_output=True, text=True, timeout=60, check=False)
        outside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=60, check=False)
    assert outside.returncode == 0, outside.stderr
    assert inside.returncode != 0 and "unreachable" in inside.stderr.lower(), inside.stderr


@needs_unshare
@pytest.mark.parametrize("key", [CPU, CU])
def test_ensure_from_a_pack_offline_builds_a_verified_env(
        project: SampleProject, packs: dict[str, Path], tmp_path: Path, key: str) -> None:
    where = node(project, tmp_path)
    home = tmp_path / "home"
    result = cli(["ensure", key, "--from", str(packs[key]), "--home", str(home), "--json"],
                 where, offline=True)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["action"] == "build" and data["pack"]["used_pack_lock"] is False
    assert data["pack"]["key"] == key and data["pack"]["source"] == str(packs[key])
    # The env is the one the node's own lock names (same generation as a normal build).
    assert data["generation"] == make_plan(load_config(where, home=home, environ={}),
                                           key).generation
    deep = cli(["verify", key, "--deep", "--home", str(home)], where, offline=True)
    assert deep.returncode == 0, deep.stdout + deep.stderr
    assert "deep" in deep.stdout
    assert run_python(Path(data["python"]), "import torch, transformers; print('ok')") == "ok"
    assert list((home / ".staging").iterdir()) == []  # the unpacked pack is gone
    remembered = json.loads((home / "pkgs" / "verified-sha256.json").read_text())
    assert not [path for path in remembered if ".staging" in Path(path).parts]  # and its hashes
    # Again: the ready env is reused, the pack is only read for its identity.
    again = cli(["ensure", key, "--from", str(packs[key]), "--home", str(home), "--json"],
                where, offline=True)
    assert json.loads(again.stdout)["action"] == "reuse"


@needs_unshare
def test_ensure_from_a_pack_installs_its_pip_wheels_offline(project: SampleProject,
                                                            tmp_path: Path) -> None:
    from provisioner.lock.wheels import build_wheel
    from provisioner.lock.write import lock_envs

    src = Path(shutil.copytree(project.path, tmp_path / "src"))
    build_wheel(src / "wheels", "tinywheel", "1.0", requires=["numpy"])
    spec = src / "environment-specs" / f"{CPU}.yml"
    spec.write_text(spec.read_text().replace(
        "- transformers\nx-provisioner:", "- transformers\n- pip:\n  - tinywheel==1.0\n"
        "x-provisioner:"), encoding="utf-8")
    with (src / "provisioner.toml").open("a", encoding="utf-8") as fh:
        fh.write('\n[pip]\nno-index = true\nfind-links = ["wheels"]\n')
    lock_envs(load_config(src, environ={}), [CPU])
    pack = make_pack(load_config(src, home=tmp_path / "h0", environ={}), CPU,
                     output=tmp_path / "pip.tar").path
    where = tmp_path / "node"
    for part in ("environment-specs", "lockfiles"):
        shutil.copytree(src / part, where / part)
    home = tmp_path / "home"
    result = cli(["ensure", CPU, "--from", str(pack), "--home", str(home)], where, offline=True)
    assert result.returncode == 0, result.stderr
    python = Path(result.stdout.strip().splitlines()[-1])
    assert run_python(python, "import tinywheel, numpy; print(tinywheel.__version__)") == "1.0"


# --- refusals: nothing promoted ------------------------------------------------------------


def test_a_pack_for_another_platform_is_refused(project: SampleProject, packs: dict[str, Path],
                                                tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = cli(["ensure", CPU, "--from", str(packs["other-platform"]), "--home", str(home)],
                 node(project, tmp_path))
    refused(result, f"is for {'win-64' if host_platform() != 'win-64' else 'linux-64'}",
            f"this host is {host_platform()}")
    nothing_promoted(home, CPU)


def test_a_pack_of_another_key_is_refused(project: SampleProject, packs: dict[str, Path],
                                          tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = cli(["ensure", CU, "--from", str(packs[CPU]), "--home", str(home)],
                 node(project, tmp_path))
    refused(result, f"holds {CPU}, not {CU}")
    nothing_promoted(home, CU)


def test_a_pack_of_another_lock_is_refused_unless_asked(project: SampleProject,
                                                        packs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    where = node(project, tmp_path)
    pack_generation = make_plan(load_config(where, home=tmp_path / "x", environ={}),
                                CPU).generation
    lock = where / "lockfiles" / f"{CPU}.conda-lock.yml"
    lock.write_text(lock.read_text() + "# edited on the node\n", encoding="utf-8")
    before = lock.read_bytes()
    home = tmp_path / "home"
    result = cli(["ensure", CPU, "--from", str(packs[CPU]), "--home", str(home)], where)
    refused(result, "was made from another lock of")
    assert "pass --use-pack-lock to build the pack's own lock" in result.stderr  # the hint
    nothing_promoted(home, CPU)
    built = cli(["ensure", CPU, "--from", str(packs[CPU]), "--use-pack-lock", "--home",
                 str(home), "--json"], where)
    assert built.returncode == 0, built.stderr
    data = json.loads(built.stdout)
    assert data["pack"]["used_pack_lock"] is True
    assert data["generation"] == pack_generation  # the pack's lock, not the node's edited one
    assert lock.read_bytes() == before  # the project's lock is left as it was
    assert list((home / ".staging").iterdir()) == []
    usage = cli(["ensure", CPU, "--use-pack-lock", "--home", str(home)], where)
    assert usage.returncode == 2 and "--use-pack-lock needs --from" in usage.stderr


def test_a_truncated_pack_is_refused(project: SampleProject, packs: dict[str, Path],
                                     tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar"
    cut.write_bytes(packs[CU].read_bytes()[: packs[CU].stat().st_size // 2])
    home = tmp_path / "home"
    result = cli(["ensure", CU, "--from", str(cut), "--home", str(home)],
                 node(project, tmp_path))
    refused(result, "truncated")
    nothing_promoted(home, CU)


def _altered(pack: Path, tmp_path: Path, *, fix_manifest: bool) -> Path:
    """The pack with one archive's bytes changed (same size); its manifest updated or not."""
    root = tmp_path / "tree"
    with tarfile.open(pack) as tar:
        tar.extractall(root, filter="data")
    victim = next((root / "channel").glob("*/python-*.tar.bz2"))
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    if fix_manifest:
        import hashlib

        manifest = json.loads((root / MANIFEST).read_text())
        name = victim.relative_to(root).as_posix()
        manifest["files"][name]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        (root / MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "altered.tar"
    with out.open("wb") as fh:
        write_tar(fh, root)
    return out


@pytest.mark.parametrize("fix_manifest", [False, True], ids=["vs-manifest", "vs-lock"])
def test_a_tampered_archive_is_refused(project: SampleProject, packs: dict[str, Path],
                                       tmp_path: Path, fix_manifest: bool) -> None:
    altered = _altered(packs[CPU], tmp_path, fix_manifest=fix_manifest)
    home = tmp_path / "home"
    result = cli(["ensure", CPU, "--from", str(altered), "--home", str(home)],
                 node(project, tmp_path))
    if fix_manifest:  # the manifest was forged too: the lock's sha256 still catches it
        refused(result, "sha256 mismatch for python")
    else:
        refused(result, "does not match the pack's manifest")
    nothing_promoted(home, CPU)


def test_an_unpacked_pack_left_by_a_killed_run_is_removed(project: SampleProject,
                                                          packs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    from provisioner import fsops

    home = tmp_path / "home"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    left = home / ".staging" / f".pack-{dead}-0badc0de"
    (left / "pack" / "channel").mkdir(parents=True)
    fsops.write_marker(left, "unpacked pack")
    unowned = home / ".staging" / f".pack-{dead}-notours"
    unowned.mkdir()  # no marker: not provably provisioner's, so left alone
    result = cli(["ensure", CPU, "--from", str(packs[CPU]), "--home", str(home)],
                 node(project, tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (home / ".staging").iterdir()) == [unowned.name]


def test_a_dry_run_checks_the_pack_and_writes_nothing(project: SampleProject,
                                                      packs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    where = node(project, tmp_path)
    pack_generation = make_plan(load_config(where, home=tmp_path / "x", environ={}),
                                CPU).generation
    home = tmp_path / "home"
    dry = cli(["ensure", CPU, "--from", str(packs[CPU]), "--dry-run", "--home", str(home),
               "--json"], where)
    assert dry.returncode == 0, dry.stderr
    data = json.loads(dry.stdout)
    assert data["dry_run"] is True and data["action"] == "build"
    assert data["generation"] == pack_generation
    assert not home.exists()
    refused(cli(["ensure", CPU, "--from", str(packs["other-platform"]), "--dry-run", "--home",
                 str(home)], where), "this host is")
    lock = where / "lockfiles" / f"{CPU}.conda-lock.yml"
    lock.write_text(lock.read_text() + "# edited on the node\n", encoding="utf-8")
    other = cli(["ensure", CPU, "--from", str(packs[CPU]), "--use-pack-lock", "--dry-run",
                 "--home", str(home), "--json"], where)
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["generation"] == pack_generation  # the pack's lock
    assert not home.exists()


def test_ensure_from_a_pack_on_a_web_server(project: SampleProject, packs: dict[str, Path],
                                            tmp_path: Path) -> None:
    where = node(project, tmp_path)
    home = tmp_path / "home"
    with static_server(packs[CU].parent) as (base, paths):
        url = f"{base}/{packs[CU].name}"
        result = cli(["ensure", CU, "--from", url, "--home", str(home), "--json"], where)
        fetched = list(paths)
        missing = cli(["ensure", CU, "--from", f"{base}/no-such.tar", "--home",
                       str(tmp_path / "h2")], where)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["action"] == "build" and data["pack"]["source"] == url
    assert fetched == [f"/{packs[CU].name}"]  # the pack, and nothing else from the network
    assert run_python(Path(data["python"]), "import torch; print('ok')") == "ok"
    assert list((home / ".staging").iterdir()) == []  # the downloaded pack is gone too
    line = refused(missing, "no-such.tar")
    assert "404" in line
    nothing_promoted(tmp_path / "h2", CU)


@pytest.fixture
def s3_bucket(packs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
              tmp_path: Path) -> Iterator[str]:
    """An S3 server whose bucket ``fleet`` holds the CUDA pack; no AWS setting of this
    machine leaks in."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with s3_server({"fleet": {f"packs/{packs[CU].name}": packs[CU]}}) as endpoint:
        yield endpoint


def test_ensure_from_a_pack_in_an_s3_bucket(project: SampleProject, packs: dict[str, Path],
                                            tmp_path: Path, s3_bucket: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    where = node(project, tmp_path)
    (where / "provisioner.toml").write_text(
        f'[s3-options.fleet]\nendpoint-url = "{s3_bucket}"\nregion = "us-east-1"\n'
        "force-path-style = true\n")
    url = f"s3://fleet/packs/{packs[CU].name}"
    no_credentials = cli(["ensure", CU, "--from", url, "--home", str(tmp_path / "h0")], where)
    line = refused(no_credentials, url)
    assert "credentials" in line
    nothing_promoted(tmp_path / "h0", CU)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    home = tmp_path / "home"
    result = cli(["ensure", CU, "--from", url, "--home", str(home), "--json"], where)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["action"] == "build" and data["pack"]["source"] == url
    assert run_python(Path(data["python"]), "import torch; print('ok')") == "ok"
