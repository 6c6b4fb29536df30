"""``ensure KEY --from PACK``: the normal build, with a pack as the only source of packages.

The pack (a path, or an ``https://``/``s3://`` URL fetched by ``build.transport``)
is checked before use: its key, its platform against this host, and its lock
against the project's (the same LF bytes, so the same generation). It is then
unpacked into the home (every member against the pack's manifest), and
``ensure`` runs as always, with every channel of the lock mapped to the pack's
channel and the pip layer to the pack's wheels with no index: the trust, URL,
sha256-against-the-lock, relocation and import checks and the promotion are
``ensure``'s own, and nothing else is fetched. The unpacked copy is removed
afterwards; a ready env of the same lock is reused without unpacking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from provisioner import fscopy, fsops
from provisioner.build.artifacts import forget_verified
from provisioner.build.ensure import EnsureOptions, EnsureResult, ensure
from provisioner.build.home_checks import check_home
from provisioner.build.layout import HomeLayout
from provisioner.build.pack import CHANNEL, PYPI
from provisioner.build.pack_read import PackError, PackInfo, read_pack_info, unpack_pack
from provisioner.config import LOCKS_DIR_NAME, SPECS_DIR_NAME, Config, PipSettings
from provisioner.contained import pid_alive
from provisioner.keys import validate_env_key
from provisioner.lock.channels import canonical_channel_url, file_url_to_path, path_to_file_url
from provisioner.lock.eol import read_lf_bytes
from provisioner.lock.lockfile import lockfile_path
from provisioner.lock.platforms import host_platform

REMOTE_SCHEMES = ("https", "http", "s3")
_UNPACK_PREFIX = ".pack-"


@dataclass(frozen=True)
class FromPackResult:
    """``ensure``'s result and the pack it was built from."""

    result: EnsureResult
    pack: PackInfo
    used_pack_lock: bool

    def to_dict(self) -> dict[str, object]:
        return {**self.result.to_dict(),
                "pack": {**self.pack.to_dict(), "used_pack_lock": self.used_pack_lock}}


def ensure_from_pack(config: Config, key: str, source: str, options: EnsureOptions | None = None,
                     *, use_pack_lock: bool = False) -> FromPackResult:
    """Ensure ``key`` from the pack at ``source``; see the module doc.

    A pack of another key, platform or lock (unless ``use_pack_lock``), a
    truncated or altered one is refused with a :class:`PackError` (exit 2) and
    nothing is promoted.
    """
    validate_env_key(key)
    opts = options or EnsureOptions()
    if opts.dry_run and "://" not in source:
        return _dry_run(config, key, source, opts, use_pack_lock)
    layout = HomeLayout(config.home)
    check_home(layout)
    layout.staging.mkdir(parents=True, exist_ok=True)
    _remove_dead_unpacks(layout.staging)
    # Not a "<key>.<gen>.<hex>" name: gc leaves it to its owner, which removes it below.
    work = layout.staging / f"{_UNPACK_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    work.mkdir()
    fsops.write_marker(work, "unpacked pack")
    try:
        info = read_pack_info(_obtain(source, work, config), source)
        own_lock = _check_identity(config, key, info, use_pack_lock)
        if own_lock:
            from provisioner.build.plan import make_plan

            if make_plan(config, key).action == "reuse":
                return FromPackResult(ensure(config, key, opts), info, False)
        unpacked = work / "pack"
        unpacked.mkdir()
        unpack_pack(info, unpacked)
        built = _pack_config(config, key, info, unpacked, work, own_lock)
        return FromPackResult(ensure(built, key, opts), info, not own_lock)
    finally:
        fsops.safe_rmtree(work)
        with contextlib.suppress(OSError):  # only bookkeeping: never hide the real outcome
            forget_verified(layout.package_cache, work)


def _dry_run(config: Config, key: str, source: str, opts: EnsureOptions,
             use_pack_lock: bool) -> FromPackResult:
    """The checks and the plan, writing nothing in the home (the lock read from the pack)."""
    import tempfile

    from provisioner.build.pack import lock_member, spec_member

    info = read_pack_info(_obtain(source, Path(), config), source)
    own_lock = _check_identity(config, key, info, use_pack_lock)
    with tempfile.TemporaryDirectory(prefix="provisioner-pack-plan-") as tmp:
        unpacked = Path(tmp) / "pack"
        unpacked.mkdir()
        unpack_pack(info, unpacked, only=frozenset({lock_member(key), spec_member(key)}))
        built = _pack_config(config, key, info, unpacked, Path(tmp), own_lock)
        return FromPackResult(ensure(built, key, opts), info, not own_lock)


def _remove_dead_unpacks(staging: Path) -> None:
    """Unpacked packs left by a killed ``ensure --from`` (its pid is in the name)."""
    for entry in staging.glob(f"{_UNPACK_PREFIX}*"):
        pid = entry.name[len(_UNPACK_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) \
                and fsops.has_marker(entry):
            with contextlib.suppress(OSError):
                fsops.safe_rmtree(entry)


def _obtain(source: str, work: Path, config: Config) -> Path:
    """A local path of the pack: the file itself, or a download into ``work``.

    ``https://`` and ``s3://`` go through ``build.transport`` (rattler's client: its
    authentication storage, S3 credentials and ``[s3-options]``, proxies); the
    pack's integrity is its manifest's and the lock's business, checked after.
    """
    scheme, sep, _rest = source.partition("://")
    if not sep:
        return Path(source).expanduser().absolute()
    if scheme.lower() == "file":
        return file_url_to_path(source)
    if scheme.lower() not in REMOTE_SCHEMES:
        raise PackError(f"pack {source}: unsupported URL scheme {scheme!r}",
                        hint="give a path, or an https:// or s3:// URL")
    from provisioner.build.transport import download, make_client

    target = work / "pack.tar"
    # s3:// is fetched in a child process (transport's rule); only http(s) needs a client here.
    client = None if scheme.lower() == "s3" else make_client(config)
    download(source, target, timeout=config.fetch_timeout, client=client,
             s3_options=config.s3_options)
    return target


def lock_sha256(path: Path) -> str | None:
    """sha256 of a lock's LF text, as a pack's manifest records it; ``None`` if there is none."""
    try:
        return hashlib.sha256(read_lf_bytes(path)).hexdigest()
    except FileNotFoundError:
        return None


def _check_identity(config: Config, key: str, info: PackInfo, use_pack_lock: bool) -> bool:
    """Refuse a pack of another key or platform; True when it holds the project's own lock."""
    if info.key != key:
        raise PackError(f"pack {info.label} holds {info.key}, not {key}",
                        hint=f"make a pack of {key} with 'provisioner pack {key}'")
    host = host_platform()
    if info.platform != host:
        raise PackError(f"pack {info.label} is for {info.platform}; this host is {host}",
                        hint=f"make one with 'provisioner pack {key} --platform {host}'")
    project = lock_sha256(lockfile_path(config.locks_dir, key))
    if project == info.lock_sha256:
        return True
    if use_pack_lock:
        return False
    if project is None:
        raise PackError(f"{key} has no lock in this project, and pack {info.label} brings its own",
                        hint="pass --use-pack-lock to build the pack's lock")
    raise PackError(
        f"pack {info.label} was made from another lock of {key} "
        f"(pack {info.lock_sha256[:12]}, project {project[:12]})",
        hint=f"make the pack from this lock ('provisioner pack {key}'), or pass "
             "--use-pack-lock to build the pack's own lock")


def _pack_config(config: Config, key: str, info: PackInfo, unpacked: Path, work: Path,
                 own_lock: bool) -> Config:
    """``config`` with the pack as every channel's mirror and its wheels as the only index."""
    from provisioner.lock.reader import read_lockfile
    from provisioner.lock.spec import load_spec

    project = config.project
    if not own_lock:
        from provisioner.build.pack import lock_member, spec_member

        lock_file = unpacked / lock_member(key)
        if lock_sha256(lock_file) != info.lock_sha256:
            raise PackError(f"pack {info.label}: its lock does not match its manifest",
                            hint="the pack was altered; make it again with 'provisioner pack'")
        # The pack's lock and spec stand in for the project's, for this build only.
        project = work / "project"
        fscopy.link_or_copy(lock_file, lockfile_path(project / LOCKS_DIR_NAME, key))
        fscopy.link_or_copy(unpacked / spec_member(key),
                           project / SPECS_DIR_NAME / f"{key}.yml")
    locks_dir, specs_dir = project / LOCKS_DIR_NAME, project / SPECS_DIR_NAME
    names = {*read_lockfile(lockfile_path(locks_dir, key)).channels,
             *load_spec(specs_dir, key).channels}
    channel = path_to_file_url(unpacked / CHANNEL)
    mirrors: dict[str, str] = {}
    for name in names:
        mirrors[name.strip("/") if "://" not in name else name] = channel
        mirrors[canonical_channel_url(name)] = channel
    return dataclasses.replace(
        config, project=project, channel_root=None, channel_mirrors=mirrors,
        pip=PipSettings(no_index=True, find_links=(str(unpacked / PYPI),)))
