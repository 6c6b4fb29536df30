"""A solve that fails on a virtual package names it, the version it wanted, and the fix."""

from __future__ import annotations

import pytest

from provisioner.errors import SolveError
from provisioner.lock.channels import ChannelSource
from provisioner.lock.platforms import virtual_packages_for
from provisioner.lock.solve import solve_platform
from provisioner.lock.spec import parse_spec
from provisioner.sample.packages import build_conda_package, channel_url, index_channel


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> list[ChannelSource]:
    root = tmp_path_factory.mktemp("virtual") / "channel"
    build_conda_package(root, "linux-64", "debugpy", "1.8.0", "h0", depends=["__glibc >=2.34"])
    build_conda_package(root, "linux-64", "cutool", "1.0", "h0", depends=["__cuda >=12.4"])
    build_conda_package(root, "linux-64", "kern", "1.0", "h0", depends=["__linux >=6.1"])
    build_conda_package(root, "win-64", "winonly", "1.0", "h0", depends=["__win"])
    build_conda_package(root, "linux-64", "winonly", "1.0", "h0", depends=["__win"])
    index_channel(root)
    url = channel_url(root)
    return [ChannelSource("virtual", url, url)]


def _solve(channel: list[ChannelSource], specs: list[str], cuda: str | None = "12.1",
           overrides: dict[str, str] | None = None) -> list[str]:
    return [p.name for p in solve_platform(
        key="k", channels=channel, specs=specs, platform="linux-64",
        virtual_packages=virtual_packages_for("linux-64", cuda, overrides))]


@pytest.mark.parametrize(("spec", "wanted", "locked", "line"), [
    ("debugpy", "__glibc >=2.34", "__glibc 2.28",
     'x-provisioner: virtual-packages: linux-64: {__glibc: "2.34"}'),
    ("cutool", "__cuda >=12.4", "__cuda 12.1", 'x-provisioner: cuda: "12.4"'),
    ("kern", "__linux >=6.1", "__linux 5.10",
     'x-provisioner: virtual-packages: linux-64: {__linux: "6.1"}'),
    ("winonly", "__win *", "no __win",
     'x-provisioner: virtual-packages: linux-64: {__win: "<version>"}'),
])
def test_virtual_package_failures_are_explained(
        channel: list[ChannelSource], spec: str, wanted: str, locked: str, line: str) -> None:
    with pytest.raises(SolveError) as info:
        _solve(channel, [spec])
    message = info.value.message
    assert f"the solve needs the virtual package {wanted}, but linux-64 is locked with " \
        f"{locked}" in message
    assert info.value.hint == f"if the target machines have it, set {line} in the spec"


def test_the_named_line_fixes_the_solve(channel: list[ChannelSource]) -> None:
    spec = parse_spec(
        "name: k\nchannels: [virtual]\nplatforms: [linux-64]\ndependencies: [debugpy]\n"
        'x-provisioner:\n  cuda: "12.4"\n  virtual-packages:\n    linux-64: {__glibc: "2.34"}\n',
        source="k.yml")
    names = _solve(channel, ["debugpy", "cutool"], spec.cuda,
                   dict(spec.virtual_package_overrides["linux-64"]))
    assert names == ["cutool", "debugpy"]


def test_other_failures_keep_the_generic_hint(channel: list[ChannelSource]) -> None:
    with pytest.raises(SolveError) as info:
        _solve(channel, ["debugpy >=2"])
    assert "virtual package" not in info.value.message
    assert info.value.hint == ("relax a version pin in the spec or add the channel that has "
                               "the package")
