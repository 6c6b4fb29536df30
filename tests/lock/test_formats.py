"""pixi.lock and @EXPLICIT files, read-only, in show-lock and diff (and diff across formats).

The test data is made here from the committed locks with the formats' own writers: rattler's
lock writer (the library pixi writes pixi.lock with) and ``conda-lock render --kind explicit``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from provisioner.config import load_config
from provisioner.errors import LockfileError
from provisioner.lock.diff import diff_files
from provisioner.lock.formats import read_any_lock
from provisioner.lock.reader import read_lockfile
from provisioner.lock.show import show_lock

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(sysconfig.get_path("scripts"))
PROVISIONER = SCRIPTS / ("provisioner.exe" if sys.platform == "win32" else "provisioner")
PLAIN = REPO / "lockfiles" / "torch-cu121-transformers.conda-lock.yml"
BNB = REPO / "lockfiles" / "torch-cu121-transformers-bnb.conda-lock.yml"


@pytest.fixture(scope="module")
def pixi_lock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pixi.lock with two environments: ``default`` (PLAIN) and ``bnb`` (BNB, pip too)."""
    import rattler

    from provisioner.lock.solve import locked_to_record

    lock = rattler.LockFile([rattler.LockPlatform("linux-64")])
    [platform] = lock.platforms()
    for env, path in (("default", PLAIN), ("bnb", BNB)):
        data = read_lockfile(path)
        lock.set_channels(env, [rattler.LockChannel(f"https://conda.anaconda.org/{c}/")
                                for c in data.channels])
        for pkg in data.for_platform("linux-64", "conda"):
            lock.add_conda_package(env, platform, locked_to_record(pkg, pkg.url, pkg.channel_url))
        for pkg in data.for_platform("linux-64", "pip"):
            lock.add_pypi_package(env, platform, pkg.name, pkg.version, pkg.url)
    out = tmp_path_factory.mktemp("pixi") / "pixi.lock"
    lock.to_path(out)
    text = out.read_text(encoding="utf-8")
    assert text.startswith("version: ") and "environments:" in text
    return out


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``conda-lock render --kind explicit`` of PLAIN: conda's own explicit format, md5 form."""
    out = tmp_path_factory.mktemp("explicit")
    result = subprocess.run(
        [str(SCRIPTS / "conda-lock"), "render", "--kind", "explicit", "-p", "linux-64",
         "--filename-template", str(out / "plain-{platform}.txt"), str(PLAIN)],
        capture_output=True, text=True, timeout=300, cwd=out,
    )
    assert result.returncode == 0, result.stderr
    path = out / "plain-linux-64.txt"
    assert "@EXPLICIT" in path.read_text(encoding="utf-8")
    return path


def test_pixi_lock_every_environment_and_platform(pixi_lock: Path) -> None:
    data = read_any_lock(pixi_lock)
    assert data.platforms == ("bnb/linux-64", "default/linux-64")
    assert [p.name for p in data.for_platform("bnb/linux-64", "pip")] == ["bitsandbytes"]
    assert len(data.for_platform("default/linux-64", "conda")) == 177
    plain = read_lockfile(PLAIN).for_platform("linux-64", "conda")
    ours = data.for_platform("default/linux-64", "conda")
    assert [(p.name, p.version, p.build, p.url, p.sha256) for p in ours] == \
        [(p.name, p.version, p.build, p.url, p.sha256) for p in plain]

    summary = show_lock(load_config(pixi_lock.parent, environ={}), str(pixi_lock))
    by_platform = {ps.platform: ps for ps in summary.per_platform}
    assert by_platform["bnb/linux-64"].bitsandbytes == "0.43.3 (pip)"
    assert by_platform["default/linux-64"].bitsandbytes is None
    assert by_platform["default/linux-64"].pytorch == "2.2.1 (py3.11_cuda12.1_cudnn8.9.2_0)"
    assert by_platform["default/linux-64"].cuda_driver_required == ">=12"


def test_pixi_environment_selected_with_a_hash(pixi_lock: Path) -> None:
    data = read_any_lock(Path(f"{pixi_lock}#bnb"))
    assert data.platforms == ("linux-64",)
    with pytest.raises(LockfileError) as info:
        read_any_lock(Path(f"{pixi_lock}#nope"))
    assert "no environment 'nope'" in info.value.message
    assert info.value.hint == "its environments: bnb, default"


def test_diff_across_formats(pixi_lock: Path, explicit: Path) -> None:
    same = diff_files(BNB, Path(f"{pixi_lock}#bnb"))
    assert not same.has_changes
    added = diff_files(PLAIN, Path(f"{pixi_lock}#bnb"))
    [pd] = added.platforms
    assert [(c.manager, c.name) for c in pd.added] == [("pip", "bitsandbytes")]
    assert not pd.removed and not pd.changed
    assert not diff_files(explicit, PLAIN).has_changes
    assert not diff_files(explicit, Path(f"{pixi_lock}#default")).has_changes


def test_explicit_file(explicit: Path, tmp_path: Path) -> None:
    data = read_any_lock(explicit)
    assert data.platforms == ("linux-64",)
    plain = {p.name: p for p in read_lockfile(PLAIN).for_platform("linux-64")}
    assert len(data.packages) == len(plain) == 177
    for pkg in data.packages:
        assert (pkg.version, pkg.build, pkg.md5) == (
            plain[pkg.name].version, plain[pkg.name].build, plain[pkg.name].md5)
    # sha256 digests, no platform comment: the platform comes from the URLs.
    torch = plain["pytorch"]
    hand = tmp_path / "hand.txt"
    hand.write_text(f"@EXPLICIT\n{torch.url}#sha256:{torch.sha256}\n", encoding="utf-8")
    [entry] = read_any_lock(hand).packages
    assert (entry.name, entry.version, entry.build, entry.sha256, entry.platform) == (
        "pytorch", torch.version, torch.build, torch.sha256, "linux-64")
    bad = tmp_path / "bad.txt"
    bad.write_text("@EXPLICIT\nnot-a-url\n", encoding="utf-8")
    with pytest.raises(LockfileError, match="line 1 of the @EXPLICIT list is not a package URL"):
        read_any_lock(bad)


@pytest.mark.parametrize(("text", "seen"), [
    ("[project]\nname = 'x'\n", "'[project]'"),
    ("requests==2.31\n", "'requests==2.31'"),
    ("version: 1\nsomething: else\n", "'version: 1'"),
])
def test_unknown_format_is_one_line_saying_what_was_seen(tmp_path: Path, text: str,
                                                         seen: str) -> None:
    path = tmp_path / "weird.lock"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LockfileError) as info:
        read_any_lock(path)
    assert info.value.message == (
        f"weird.lock: not a lock format provisioner reads (saw {seen}; expected a conda-lock "
        "file, a pixi.lock or an @EXPLICIT file)")


def test_cli_show_lock_and_diff(pixi_lock: Path, explicit: Path, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(PROVISIONER), *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)

    shown = cli("show-lock", str(pixi_lock), "--json")
    assert shown.returncode == 0, shown.stderr
    assert [p["platform"] for p in json.loads(shown.stdout)["per_platform"]] == [
        "bnb/linux-64", "default/linux-64"]
    shown = cli("show-lock", str(explicit))
    assert shown.returncode == 0, shown.stderr
    assert "linux-64: 177 packages (conda 177)" in shown.stdout
    diffed = cli("diff", str(PLAIN), f"{pixi_lock}#bnb")
    assert diffed.returncode == 0, diffed.stderr
    assert "linux-64: 0 changed, 1 added, 0 removed" in diffed.stdout
