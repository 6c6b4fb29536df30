"""Leases: a generation in use is never collected.

Whoever runs code from a generation (``provisioner run``, a host app serving a
model) holds a *shared* OS lock on that generation's lease file,
``<home>/locks/<key>.<generation>.lease``; ``gc`` takes the same lock
*exclusively* and without waiting before it deletes a generation, and keeps the
generation when it cannot. OS locks die with their holder, so a crashed holder
never blocks ``gc`` for good; nothing has to expire.

On POSIX the lock is ``flock``: it belongs to the open file, so a child that
inherits the lease's descriptor (``provisioner run`` passes it to the command it
starts) keeps the lease alive even if its parent is killed. Windows has no
shared ``msvcrt`` lock; there each holder locks one byte at a random offset and
``gc`` tries to lock the whole range, which fails while any holder exists.

Host app (a model server that runs for hours)::

    from provisioner import get_env_for_model, lease

    res = get_env_for_model(model_id)
    with lease(res):                      # held until the block ends
        subprocess.run([res.python, "serve.py"])
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from provisioner import fsops
from provisioner.build.home_checks import check_home, is_ready_generation
from provisioner.build.layout import HomeLayout, is_generation_name
from provisioner.errors import BuildError, ResolutionError

LEASE_SUFFIX = ".lease"
_POLL_S = 0.05
_WIN_RANGE = 2**31 - 2  # bytes 1.._WIN_RANGE: one per holder; gc locks them all


class Leasable(Protocol):
    """What :func:`lease` needs to know: a :class:`~provisioner.Resolution` has it."""

    @property
    def source(self) -> str: ...

    @property
    def env_key(self) -> str: ...

    @property
    def generation(self) -> str | None: ...

    @property
    def prefix(self) -> str: ...


def lease_path(layout: HomeLayout, key: str, generation: str) -> Path:
    """The lease file of one generation (outside the env, so the env can go)."""
    if not is_generation_name(generation):
        raise BuildError(f"{generation!r} is not a generation name")
    return layout.locks / f"{key}.{generation}{LEASE_SUFFIX}"


def _lock(fd: int, *, exclusive: bool) -> bool:
    """Try once, without waiting; on Windows the shared lock is one random byte."""
    if sys.platform == "win32":
        import msvcrt

        offset, size = (0, _WIN_RANGE + 1) if exclusive else (
            1 + secrets.randbelow(_WIN_RANGE), 1)
        os.lseek(fd, offset, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, size)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open_locked(path: Path, *, exclusive: bool, deadline: float) -> int | None:
    """An fd of ``path`` locked as asked, or ``None`` once ``deadline`` passed.

    The lock must be on the file that is still at ``path``: ``gc`` unlinks a
    lease file while it holds it exclusively, and a lock on the old inode is no lease.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if _lock(fd, exclusive=exclusive):
                st = os.fstat(fd)
                try:
                    same = os.stat(path).st_ino == st.st_ino or sys.platform == "win32"
                except FileNotFoundError:
                    same = False
                if same:
                    return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # closing drops whatever lock this fd got
        if time.monotonic() >= deadline:
            return None
        time.sleep(_POLL_S)


@dataclass
class Lease:
    """A held (or, for envs gc never collects, empty) lease; release it or use ``with``."""

    key: str
    generation: str | None
    path: Path | None = None
    fd: int | None = field(default=None, repr=False)

    @property
    def held(self) -> bool:
        """Whether this lease holds an OS lock."""
        return self.fd is not None

    def release(self) -> None:
        """Drop the lease (children that inherited its descriptor keep it until they exit)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_lease(home: Path | str, key: str, generation: str, *,
                  timeout: float = 30.0) -> Lease:
    """Take a shared lease on ``key``'s ``generation`` under ``home``.

    Waits up to ``timeout`` seconds while ``gc`` is deleting that generation,
    then checks that it is still a ready generation; raises
    :class:`~provisioner.errors.ResolutionError` (exit 2) when it is gone.
    """
    layout = HomeLayout(Path(home))
    check_home(layout)
    path = lease_path(layout, key, generation)
    fd = _open_locked(path, exclusive=False, deadline=time.monotonic() + timeout)
    if fd is None:
        raise ResolutionError(f"timed out waiting for gc to release {path}",
                              hint="retry when 'provisioner gc' has finished")
    if not is_ready_generation(layout.generation_dir(key, generation), key):
        os.close(fd)
        raise ResolutionError(f"generation {generation} of {key} is gone or not ready",
                              hint="resolve the model again (gc may have collected it)")
    return Lease(key, generation, path, fd)


def lease(target: Leasable, *, timeout: float = 30.0) -> Lease:
    """Lease the generation a resolution points at, for as long as the host app uses it.

    Use it as a context manager around the work (a model server's lifetime).
    Legacy venvs are never collected, so their lease holds no lock.
    """
    if target.source != "shared" or not target.generation:
        return Lease(target.env_key, None)
    prefix = Path(target.prefix)
    if prefix.name != target.generation or prefix.parent.name != target.env_key:
        raise ResolutionError(f"{prefix} is not a generation of {target.env_key}")
    home = prefix.parent.parent.parent
    return acquire_lease(home, target.env_key, target.generation, timeout=timeout)


@contextlib.contextmanager
def exclusive_lease(layout: HomeLayout, key: str, generation: str, *,
                    probe_only: bool = False) -> Iterator[bool]:
    """Yield whether no one leases the generation; hold it exclusively meanwhile.

    With ``probe_only`` the lock is dropped before yielding (a dry run). After
    a real (non-probe) use, the caller may remove the lease file with
    :func:`remove_lease_file` while still inside the block.
    """
    path = lease_path(layout, key, generation)
    if probe_only and not path.exists():
        yield True  # never leased since gc last removed it; a dry run creates nothing
        return
    fd = _open_locked(path, exclusive=True, deadline=time.monotonic())
    if fd is None:
        yield False
        return
    if probe_only:
        os.close(fd)
        yield True
        return
    try:
        yield True
    finally:
        os.close(fd)


def remove_lease_file(layout: HomeLayout, key: str, generation: str) -> None:
    """Unlink a lease file; only while holding it via :func:`exclusive_lease`."""
    fsops.remove_file(lease_path(layout, key, generation))
