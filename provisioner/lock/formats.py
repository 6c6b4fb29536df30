"""The lock formats conda users commit, read-only, for ``show-lock`` and ``diff``.

* conda-lock files (``version: 1``, ``metadata:``, ``package:``): :mod:`provisioner.lock.reader`;
* ``pixi.lock`` (``version: 6``, ``environments:``, ``packages:``): read with rattler's lock
  reader, every environment and platform. Each environment's platforms are named
  ``<environment>/<platform>``; ``pixi.lock#<environment>`` selects one environment and keeps
  plain platform names, so it compares with a conda-lock file;
* ``@EXPLICIT`` files (``conda list --explicit``, ``conda-lock render --kind explicit``): one
  URL a line, with ``#<md5>`` or ``#sha256:<hex>``; name, version and build come from the file
  name, the platform from the ``# platform:`` comment (else the URLs' subdir).

Anything else is one error line that says what was seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provisioner.errors import LockfileError
from provisioner.lock.lockfile import LockData, LockedPackage

_MD5_LEN = 32


def read_any_lock(target: Path) -> LockData:
    """A lock of any known format; ``<path>#<environment>`` picks one pixi environment."""
    path, environment = target, None
    if not target.exists() and "#" in target.name:
        name, _sep, environment = target.name.partition("#")
        path = target.with_name(name)
    if not path.is_file():
        raise LockfileError(f"lockfile {path} does not exist",
                            hint="pass the path of a conda-lock, pixi.lock or @EXPLICIT file")
    head = _head(path)
    if _is_explicit(head):
        if environment is not None:
            raise LockfileError(f"{path.name}: '#{environment}' selects a pixi.lock "
                                "environment, and this is an @EXPLICIT file")
        return read_explicit(path)
    from provisioner.lock.reader import load_document, lock_from_document

    first = next((ln.strip() for ln in head.splitlines()
                  if ln.strip() and not ln.startswith("#")), "")
    unknown = LockfileError(
        f"{path.name}: not a lock format provisioner reads (saw {first[:60]!r}; expected a "
        "conda-lock file, a pixi.lock or an @EXPLICIT file)")
    try:
        data = load_document(path)
    except LockfileError:
        raise unknown from None
    if "environments" in data and "packages" in data:
        return read_pixi(path, environment)
    if environment is not None:
        raise LockfileError(f"{path.name}: '#{environment}' selects a pixi.lock environment, "
                            "and this is not a pixi.lock")
    if "metadata" in data or "package" in data:
        return lock_from_document(data, path.name, check_hashes=False)
    raise unknown


def _head(path: Path) -> str:
    with path.open("rb") as fh:
        return fh.read(8192).decode("utf-8", errors="replace")


def _is_explicit(head: str) -> bool:
    return any(line.strip() == "@EXPLICIT" for line in head.splitlines())


def read_explicit(path: Path) -> LockData:
    """An ``@EXPLICIT`` file as :class:`LockData` (manager ``conda``)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    platform = next((ln.split(":", 1)[1].strip() for ln in lines
                     if ln.startswith("# platform:")), "")
    urls = [ln.strip() for ln in lines
            if ln.strip() and not ln.startswith("#") and ln.strip() != "@EXPLICIT"]
    if not platform:
        subdirs = [u.split("#")[0].rstrip("/").split("/")[-2] for u in urls if u.count("/") > 1]
        platform = next((s for s in subdirs if s != "noarch"), "noarch")
    packages = [_explicit_entry(u, platform, path.name, i) for i, u in enumerate(urls)]
    channels = tuple(dict.fromkeys(p.channel_url for p in packages))
    return LockData(platforms=(platform,), channels=channels, content_hash={},
                    packages=tuple(packages))


def _explicit_entry(line: str, platform: str, name: str, index: int) -> LockedPackage:
    url, _sep, digest = line.partition("#")
    file_name = url.rstrip("/").rsplit("/", 1)[-1]
    stem = file_name.removesuffix(".conda").removesuffix(".tar.bz2")
    parts = stem.rsplit("-", 2)
    if "://" not in url or stem == file_name or len(parts) != 3:
        raise LockfileError(f"{name}: line {index + 1} of the @EXPLICIT list is not a package "
                            f"URL (saw {line[:60]!r})")
    md5 = digest if len(digest) == _MD5_LEN else None
    sha256 = digest.removeprefix("sha256:") if digest.startswith("sha256:") else None
    return LockedPackage(name=parts[0], version=parts[1], manager="conda", platform=platform,
                         url=url, sha256=sha256, md5=md5)


def read_pixi(path: Path, environment: str | None = None) -> LockData:
    """A ``pixi.lock`` through rattler's reader: every environment, or the one named."""
    import rattler

    try:
        lock = rattler.LockFile.from_path(path)
    except Exception as exc:  # rattler raises its own parse errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LockfileError(f"{path.name}: not a readable pixi.lock: {first}") from None
    environments = dict(lock.environments())
    if environment is not None and environment not in environments:
        raise LockfileError(
            f"{path.name}: no environment '{environment}'",
            hint=f"its environments: {', '.join(sorted(environments)) or 'none'}")
    chosen = [environment] if environment is not None else sorted(environments)
    platforms: list[str] = []
    channels: list[str] = []
    packages: list[LockedPackage] = []
    for name in chosen:
        env = environments[name]
        channels += [str(c) for c in _channels(env)]
        for platform in sorted(env.platforms(), key=str):
            label = str(platform) if environment is not None else f"{name}/{platform}"
            platforms.append(label)
            packages += [_conda_entry(r, label) for r in
                         env.conda_repodata_records_for_platform(platform) or []]
            packages += [_pypi_entry(p, label) for p in
                         env.pypi_packages_for_platform(platform) or []]
    return LockData(platforms=tuple(platforms), channels=tuple(dict.fromkeys(channels)),
                    content_hash={}, packages=tuple(packages))


def _channels(env: Any) -> list[Any]:
    try:
        return list(env.channels())
    except TypeError:  # a property in some py-rattler versions
        return list(env.channels)


def _conda_entry(record: Any, platform: str) -> LockedPackage:
    deps: dict[str, str] = {}
    for dep in record.depends:
        dep_name, _sep, rest = str(dep).strip().partition(" ")
        deps[dep_name] = rest.strip()
    return LockedPackage(
        name=record.name.source, version=str(record.version), manager="conda",
        platform=platform, url=str(record.url),
        sha256=record.sha256.hex() if record.sha256 else None,
        md5=record.md5.hex() if record.md5 else None,
        dependencies=tuple(sorted(deps.items())))


def _pypi_entry(package: Any, platform: str) -> LockedPackage:
    hashes = getattr(package, "hashes", None)
    sha = getattr(hashes, "sha256", None) if hashes is not None else None
    return LockedPackage(
        name=str(package.name), version=str(package.version), manager="pip",
        platform=platform, url=str(package.location),
        sha256=sha.hex() if isinstance(sha, bytes) else sha,
        dependencies=tuple(sorted((r.split(";")[0].strip(), "") for r in package.requires_dist)))
