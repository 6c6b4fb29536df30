"""Platforms and the fixed virtual packages used when locking for them."""

from __future__ import annotations

import pytest

from provisioner.errors import SpecError
from provisioner.lock.platforms import (
    SUPPORTED_PLATFORMS,
    host_platform,
    is_windows_platform,
    validate_platform,
    virtual_packages_for,
)


def test_linux_64_with_cuda() -> None:
    assert virtual_packages_for("linux-64", "12.1") == {
        "__archspec": ("1", "x86_64"),
        "__cuda": ("12.1", "0"),
        "__glibc": ("2.28", "0"),
        "__linux": ("5.10", "0"),
        "__unix": ("0", "0"),
    }


def test_linux_aarch64_defaults() -> None:
    assert virtual_packages_for("linux-aarch64", None) == {
        "__archspec": ("1", "aarch64"),
        "__glibc": ("2.28", "0"),
        "__linux": ("5.10", "0"),
        "__unix": ("0", "0"),
    }


def test_result_is_sorted_by_name() -> None:
    names = list(virtual_packages_for("linux-64", "12.1"))
    assert names == sorted(names)


@pytest.mark.parametrize("cuda", [None, ""])
def test_no_cuda_without_a_version(cuda: str | None) -> None:
    assert "__cuda" not in virtual_packages_for("linux-64", cuda)


def test_win_64() -> None:
    packages = virtual_packages_for("win-64", "11.8")
    assert packages == {
        "__archspec": ("1", "x86_64"),
        "__cuda": ("11.8", "0"),
        "__win": ("0", "0"),
    }
    assert "__unix" not in packages


@pytest.mark.parametrize(("platform", "arch"), [("osx-64", "x86_64"), ("osx-arm64", "arm64")])
def test_osx_has_no_cuda(platform: str, arch: str) -> None:
    assert virtual_packages_for(platform, "12.1") == {
        "__archspec": ("1", arch),
        "__osx": ("11.0", "0"),
        "__unix": ("0", "0"),
    }


def test_overrides_replace_versions_and_keep_builds() -> None:
    packages = virtual_packages_for(
        "linux-64", "12.1", {"__glibc": "2.17", "__cuda": "12.4", "__archspec": "2"}
    )
    assert packages["__glibc"] == ("2.17", "0")
    assert packages["__cuda"] == ("12.4", "0")
    assert packages["__archspec"] == ("2", "x86_64")
    assert packages["__linux"] == ("5.10", "0")


def test_overrides_may_add_packages() -> None:
    assert virtual_packages_for("osx-arm64", None, {"__foo": "1"})["__foo"] == ("1", "0")


def test_defaults_are_not_mutated() -> None:
    virtual_packages_for("linux-64", "12.1", {"__glibc": "2.17"})
    packages = virtual_packages_for("linux-64", None)
    assert packages["__glibc"] == ("2.28", "0")
    assert "__cuda" not in packages


@pytest.mark.parametrize("platform", ["linux-65", "linux-32", "win-32", "noarch", "", "Linux-64"])
def test_unknown_platform(platform: str) -> None:
    with pytest.raises(SpecError, match="unknown platform") as info:
        virtual_packages_for(platform, None)
    assert info.value.hint == f"supported platforms: {', '.join(SUPPORTED_PLATFORMS)}"
    with pytest.raises(SpecError):
        validate_platform(platform)


def test_supported_platforms() -> None:
    assert set(SUPPORTED_PLATFORMS) == {
        "linux-64", "linux-aarch64", "osx-64", "osx-arm64", "win-64"
    }
    for platform in SUPPORTED_PLATFORMS:
        assert validate_platform(platform) == platform


def test_host_platform_is_supported() -> None:
    assert host_platform() in SUPPORTED_PLATFORMS


def test_is_windows_platform() -> None:
    assert is_windows_platform("win-64")
    assert not is_windows_platform("linux-64")
    assert not is_windows_platform("osx-arm64")
