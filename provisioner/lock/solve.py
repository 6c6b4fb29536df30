"""Solving conda specs with py-rattler (imported lazily: it is not needed on the hot path)."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from provisioner.errors import SolveError, SpecError
from provisioner.lock.channels import ChannelSource
from provisioner.lock.lockfile import LockedPackage
from provisioner.lock.platforms import VirtualPackages

_BUILD_NUMBER_RE = re.compile(r"(?:^|_)(\d+)$")
_SETTLE_LIMIT_S = 1.0


def _wait_for_rattler_threads() -> None:
    """Return once no thread that Python did not start is running Python code.

    py-rattler completes a future from a tokio thread that is still inside
    asyncio's ``call_soon_threadsafe`` when the awaiting coroutine resumes. If
    the interpreter exits in that window (a failed solve followed by the CLI's
    exit), the thread dies during finalisation and the process aborts or
    segfaults instead of exiting with the error's code.
    """
    deadline = time.monotonic() + _SETTLE_LIMIT_S
    while time.monotonic() < deadline:
        ours = {t.ident for t in threading.enumerate()}
        if all(ident in ours for ident in sys._current_frames()):
            return
        time.sleep(0.001)  # lets the rattler thread take the GIL and finish


def run_rattler(coroutine: Any) -> Any:
    """``asyncio.run`` a py-rattler coroutine, then let rattler's threads settle."""
    try:
        return asyncio.run(coroutine)
    finally:
        _wait_for_rattler_threads()


def _explain(text: str) -> str:
    """rattler's explanation: on the error's line when it is one line, else indented below."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0].removeprefix("Cannot solve the request because of:").strip() if lines else ""
    rest = lines[1:]
    if not rest:
        return first or text.strip()
    return "\n".join([first or "conflicting requirements", *("  " + ln for ln in rest)])


_VIRTUAL_RE = re.compile(r"(__glibc|__cuda|__linux|__osx|__win)\b\s*([^\s,]*(?:,[^\s,]+)*)")
_LOWER_RE = re.compile(r"^>=?\s*(\d+(?:\.\d+)*)")


def virtual_package_problem(text: str, platform: str,
                            virtual_packages: VirtualPackages) -> tuple[str, str] | None:
    """(what the solve wanted, how to give it) when a virtual package stopped the solve."""
    match = _VIRTUAL_RE.search(text)
    if match is None:
        return None
    name, wanted = match[1], match[2].rstrip(".,;") or "any version"
    have = virtual_packages.get(name)
    locked = f"{name} {have[0]}" if have else f"no {name}"
    lower = _LOWER_RE.match(wanted)
    version = lower[1] if lower else "<version>"
    if name == "__cuda":
        line = f'x-provisioner: cuda: "{version}"'
    else:
        line = f'x-provisioner: virtual-packages: {platform}: {{{name}: "{version}"}}'
    return (
        f"the solve needs the virtual package {name} {wanted}, but {platform} is locked with "
        f"{locked} (provisioner's default or the spec's x-provisioner)",
        f"if the target machines have it, set {line} in the spec",
    )


def _split_dependency(dep: str) -> tuple[str, str]:
    name, _sep, rest = dep.strip().partition(" ")
    return name, rest.strip()


def record_to_locked(record: Any, platform: str, channel: ChannelSource | None) -> LockedPackage:
    """Turn a rattler ``RepoDataRecord`` into a lock entry with a canonical URL."""
    deps: dict[str, str] = {}
    for dep in record.depends:
        name, rest = _split_dependency(dep)
        deps[name] = f"{deps[name]},{rest}" if name in deps and rest else rest
    url = str(record.url)
    if channel is not None:
        url = channel.to_canonical(url)
    return LockedPackage(
        name=record.name.source,
        version=str(record.version),
        manager="conda",
        platform=platform,
        url=url,
        sha256=record.sha256.hex() if record.sha256 else None,
        md5=record.md5.hex() if record.md5 else None,
        dependencies=tuple(sorted(deps.items())),
    )


def _match_specs(specs: Sequence[str]) -> list[Any]:
    import rattler

    result = []
    for spec in specs:
        try:
            result.append(rattler.MatchSpec(spec))
        except Exception as exc:  # rattler raises its own InvalidMatchSpecError
            raise SpecError(f"dependency {spec!r} is not a valid conda match spec: {exc}") from None
    return result


def _virtual_packages(vps: VirtualPackages) -> list[Any]:
    import rattler

    return [
        rattler.GenericVirtualPackage(
            rattler.PackageName(name), rattler.Version(version), rattler.BuildString(build)
        )
        for name, (version, build) in vps.items()
    ]


def solve_platform(
    *,
    key: str,
    channels: Sequence[ChannelSource],
    specs: Sequence[str],
    platform: str,
    virtual_packages: VirtualPackages,
    constraints: Sequence[str] = (),
    preferred: Sequence[Any] = (),
    gateway: Any = None,
) -> list[LockedPackage]:
    """Solve ``specs`` for one ``platform``; return lock entries sorted by name.

    ``constraints`` restrict versions without requiring packages (used to hold
    locked packages in place during ``lock --update``); ``preferred`` records
    are kept where the specs still allow them. A ``gateway`` (:func:`new_gateway`)
    shared between calls reads each channel's metadata once.
    """
    import rattler

    match_specs = _match_specs(specs)
    subdirs: list[Any] = [platform, "noarch"]
    try:
        records = run_rattler(
            rattler.solve(
                sources=[rattler.Channel(c.source) for c in channels],
                specs=match_specs,
                gateway=gateway,
                platforms=subdirs,
                virtual_packages=_virtual_packages(virtual_packages),
                constraints=_match_specs(constraints) if constraints else None,
                locked_packages=list(preferred) or None,
                channel_priority=rattler.ChannelPriority.Strict,
            )
        )
    except Exception as exc:
        name = type(exc).__name__
        text = str(exc).strip() or name
        if "Solver" in name or "Unsolvable" in name or "cannot be installed" in text:
            virtual = virtual_package_problem(text, platform, virtual_packages)
            raise SolveError(
                f"{key} ({platform}): the spec cannot be solved: {_explain(text)}"
                + (f"\n{virtual[0]}" if virtual else ""),
                hint=virtual[1] if virtual else
                "relax a version pin in the spec or add the channel that has the package",
            ) from None
        first = text.splitlines()[0]
        raise SolveError(
            f"{key} ({platform}): could not read channel metadata: {first}",
            hint="check the channel names, [channels] mirrors and --channel-root",
        ) from None
    by_source = {c.source.rstrip("/"): c for c in channels}
    locked = []
    for record in records:
        channel = by_source.get(str(record.channel).rstrip("/"))
        locked.append(record_to_locked(record, platform, channel))
    return sorted(locked, key=lambda p: p.name)


def new_gateway() -> Any:
    """A rattler ``Gateway``: it caches the repodata it reads, so share one per command."""
    import rattler

    return rattler.Gateway()


def locked_to_record(pkg: LockedPackage, url: str, channel_url: str) -> Any:
    """A rattler ``RepoDataRecord`` for a lock entry, fetched from ``url``."""
    import rattler

    match = _BUILD_NUMBER_RE.search(pkg.build)
    record = rattler.PackageRecord(
        name=pkg.name,
        version=pkg.version,
        build=rattler.BuildString(pkg.build),
        build_number=int(match.group(1)) if match else 0,
        subdir=pkg.subdir,
        depends=[f"{name} {spec}".strip() for name, spec in pkg.dependencies],
        sha256=bytes.fromhex(pkg.sha256) if pkg.sha256 else None,
        md5=bytes.fromhex(pkg.md5) if pkg.md5 else None,
    )
    return rattler.RepoDataRecord(record, pkg.file_name, url, channel_url.rstrip("/") + "/")


def exact_constraint(pkg: LockedPackage) -> str:
    """A match spec that holds ``pkg`` at its locked version and build."""
    return f"{pkg.name} =={pkg.version} {pkg.build}" if pkg.build else f"{pkg.name} =={pkg.version}"
