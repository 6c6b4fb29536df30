"""``provisioner pack``: one file with a key's lock, spec and every archive of one platform.

The file is an uncompressed tar in pixi-pack's layout (format ``1``), so that
``pixi-unpack`` can read it as well as ``provisioner ensure --from``::

    pixi-pack.json                      {"platform": ..., "version": "1"}
    environment.yml                     exact conda specs; pip wheels from ./pypi
    channel/<subdir>/<archive>          every conda archive, indexed by rattler
    channel/<subdir>/repodata.json
    pypi/<wheel>                        the pip layer's wheels
    provisioner/<key>.conda-lock.yml    the lock it was made from (LF text)
    provisioner/<key>.yml               the spec (LF text)
    provisioner/manifest.json           key, platform, the lock's sha256, sha256 of every file

The same lock, spec and archives give the same bytes: members sorted, fixed
mtimes, owners and modes, no compression, and rattler's ``indexed_timestamp``
dropped from repodata (the conda archives are compressed already). All channels
of the lock share the pack's one channel, as in pixi-pack.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from provisioner import fscopy, fsops
from provisioner.build.artifacts import sha256_file, verify_artifacts
from provisioner.build.layout import HomeLayout
from provisioner.config import Config
from provisioner.errors import IntegrityError, LockfileError, UserError
from provisioner.lock.channels import file_url_to_path, resolve_channels
from provisioner.lock.eol import read_lf_bytes
from provisioner.lock.lockfile import LockedPackage, lockfile_path
from provisioner.lock.platforms import host_platform, validate_platform
from provisioner.lock.spec import spec_path

PACK_FORMAT = "1"  # pixi-pack's format version
METADATA = "pixi-pack.json"
ENVIRONMENT = "environment.yml"
CHANNEL = "channel"
PYPI = "pypi"
OWN = "provisioner"
MANIFEST = f"{OWN}/manifest.json"
# pixi-pack's deterministic tar header time (2006-07-26), so that both tools' packs look alike.
TAR_MTIME = 1153704088


@dataclass(frozen=True)
class PackResult:
    """What ``pack`` wrote."""

    key: str
    platform: str
    path: Path
    sha256: str
    bytes: int
    conda_packages: int
    pip_wheels: int
    lock_sha256: str

    def to_dict(self) -> dict[str, object]:
        return {"key": self.key, "platform": self.platform, "path": str(self.path),
                "sha256": self.sha256, "bytes": self.bytes,
                "conda_packages": self.conda_packages, "pip_wheels": self.pip_wheels,
                "lock_sha256": self.lock_sha256}


def lock_member(key: str) -> str:
    return f"{OWN}/{key}.conda-lock.yml"


def spec_member(key: str) -> str:
    return f"{OWN}/{key}.yml"


def default_pack_name(key: str, platform: str) -> str:
    return f"{key}-{platform}.tar"


def make_pack(config: Config, key: str, *, platform: str | None = None,
              output: Path | None = None) -> PackResult:
    """Write the pack of ``key`` for ``platform`` (default: this host) to ``output``."""
    from provisioner.lock.reader import read_lockfile

    plat = validate_platform(platform) if platform else host_platform()
    lock_path = lockfile_path(config.locks_dir, key)
    if not lock_path.is_file():
        raise LockfileError(f"{key} has no lock ({lock_path.name})",
                            hint=f"run 'provisioner lock {key}' first")
    lock = read_lockfile(lock_path)
    if plat not in lock.platforms:
        raise UserError(f"the lock of {key} has no {plat} packages "
                        f"(it locks {', '.join(lock.platforms)})",
                        hint=f"add {plat} to the spec's platforms and relock, or pick --platform")
    out = (output or Path(default_pack_name(key, plat))).absolute()
    lock_bytes = read_lf_bytes(lock_path)
    spec_bytes = read_lf_bytes(spec_path(config.specs_dir, key))
    conda = lock.for_platform(plat, "conda")
    wheels = lock.for_platform(plat, "pip")
    cache = HomeLayout(config.home).package_cache
    artifacts = verify_artifacts(conda, resolve_channels(lock.channels, config), cache,
                                 fetch_timeout=config.fetch_timeout, config=config)
    wheel_files = [locate_wheel(config, w, cache) for w in wheels]
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside the output: hardlinks work when the cache is on that filesystem, and /tmp may be small.
    with tempfile.TemporaryDirectory(prefix=".provisioner-pack-", dir=out.parent) as tmp:
        root = Path(tmp)
        known: dict[str, str | None] = {}  # sha256 checked against the lock just now
        for art in artifacts:
            name = f"{CHANNEL}/{art.package.subdir}/{art.package.file_name}"
            _place(art.path, root / name, art.package.sha256)
            known[name] = art.package.sha256
        for entry, path in zip(wheels, wheel_files, strict=True):
            _place(path, root / PYPI / entry.file_name, entry.sha256)
            known[f"{PYPI}/{entry.file_name}"] = entry.sha256
        index_pack_channel(root / CHANNEL)
        fsops.atomic_write_bytes(root / METADATA, _json({"platform": plat,
                                                         "version": PACK_FORMAT}))
        fsops.atomic_write_text(root / ENVIRONMENT, environment_yml(conda, wheels))
        (root / OWN).mkdir()
        fsops.atomic_write_bytes(root / lock_member(key), lock_bytes)
        fsops.atomic_write_bytes(root / spec_member(key), spec_bytes)
        lock_sha = hashlib.sha256(lock_bytes).hexdigest()
        files = sorted(_relative_files(root))
        fsops.atomic_write_bytes(root / MANIFEST, _json({
            "format": 1, "key": key, "platform": plat, "lock": lock_member(key),
            "spec": spec_member(key), "lock_sha256": lock_sha,
            "files": {name: {"sha256": known.get(name) or sha256_file(root / name),
                             "bytes": (root / name).stat().st_size} for name in files},
        }))
        expected = {name: entry for name, entry in known.items() if entry}
        fsops.atomic_write_with(out, lambda fh: write_tar(fh, root, expected))
    return PackResult(key=key, platform=plat, path=out, sha256=sha256_file(out),
                      bytes=out.stat().st_size, conda_packages=len(conda),
                      pip_wheels=len(wheels), lock_sha256=lock_sha)


def locate_wheel(config: Config, entry: LockedPackage, cache: Path) -> Path:
    """A local file with the locked bytes of the pip entry ``entry``.

    Looked up in the configured ``find-links`` folders, then at a ``file://``
    URL, then downloaded (sha256 checked) into the package cache.
    """
    from provisioner.build.fetch import FetchJob, fetch_all

    if not entry.sha256:
        raise LockfileError(f"{entry.name} {entry.version} has no sha256 in the lock",
                            hint="regenerate the lock with 'provisioner lock'")
    candidates = [Path(link) / entry.file_name for link in config.pip.find_links
                  if "://" not in link]
    if entry.url.startswith("file://"):
        candidates.append(file_url_to_path(entry.url))
    for path in candidates:
        if path.is_file() and sha256_file(path) == entry.sha256:
            return path
    if entry.url.startswith(("https://", "http://")):
        target = cache / "downloads" / entry.file_name
        if not (target.is_file() and sha256_file(target) == entry.sha256):
            fetch_all([FetchJob(entry, entry.url, target)], timeout=config.fetch_timeout,
                      config=config)
        return target
    raise UserError(f"no wheel with the locked sha256 for {entry.name} {entry.version} "
                    f"({entry.file_name})",
                    hint="put the wheel in a [pip] find-links folder of provisioner.toml")


def _place(src: Path, dst: Path, sha256: str | None) -> None:
    if dst.exists():
        if sha256_file(dst) != sha256:
            raise IntegrityError(f"two archives named {dst.name} with different contents in "
                                 f"the lock's channels; one pack channel cannot hold both",
                                 hint="pack a lock whose channels do not share file names")
        return
    fscopy.link_or_copy(src, dst)


def index_pack_channel(channel: Path) -> None:
    """rattler's indexer over ``channel``, without its per-run ``indexed_timestamp``."""
    import rattler.index

    from provisioner.lock.solve import run_rattler

    (channel / "noarch").mkdir(parents=True, exist_ok=True)
    run_rattler(rattler.index.index_fs(channel, write_zst=False, write_shards=False, force=True))
    scratch = channel / ".tmp"
    if scratch.is_dir() and not any(scratch.iterdir()):
        scratch.rmdir()
    for repodata in sorted(channel.glob("*/repodata.json")):
        data = json.loads(repodata.read_text(encoding="utf-8"))
        for section in ("packages", "packages.conda"):
            for record in (data.get(section) or {}).values():
                record.pop("indexed_timestamp", None)
        fsops.atomic_write_bytes(repodata, _json(data))


def environment_yml(conda: Sequence[LockedPackage], wheels: Sequence[LockedPackage]) -> str:
    """pixi-pack's ``environment.yml``: exact specs from the pack's own channel."""
    lines = ["channels:", f"  - ./{CHANNEL}", "  - nodefaults", "dependencies:"]
    lines += [f"  - {p.name}={p.version}={p.build}" for p in conda]
    if wheels:
        lines += ["  - pip:", "    - --no-index", f"    - --find-links ./{PYPI}"]
        lines += [f"    - {w.name}=={w.version}" for w in wheels]
    return "\n".join(lines) + "\n"


def _json(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _relative_files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


class _Hashing:
    """A file read through ``read`` that hashes what it hands out."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.digest.update(data)
        return data


def write_tar(fh: BinaryIO, root: Path, expected: dict[str, str] | None = None) -> None:
    """Every dir and file under ``root``, sorted, with fixed headers.

    A file named in ``expected`` must still have that sha256 as it is written (an
    archive changed in the cache since it was verified stops the pack).
    """
    entries = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    with tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in entries:
            path = root / name
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = TAR_MTIME, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            info.size, info.mode = path.stat().st_size, 0o644
            with path.open("rb") as data:
                reader = _Hashing(data)
                tar.addfile(info, reader)  # type: ignore[arg-type]  # only read() is used
            want = (expected or {}).get(name)
            if want is not None and reader.digest.hexdigest() != want:
                raise IntegrityError(f"{name} changed while it was packed (sha256 "
                                     f"{reader.digest.hexdigest()}, the lock has {want})",
                                     hint="something wrote into the package cache or channel; "
                                          "pack again")

