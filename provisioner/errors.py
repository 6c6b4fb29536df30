"""The one exception hierarchy of provisioner.

Every error carries a one-line ``message`` and an optional ``hint`` that tells
the user what to do next. ``UserError`` subclasses describe mistakes in input
(specs, keys, options, lockfiles) and map to exit code 2; everything else is an
internal failure (exit code 3). The CLI prints neither as a traceback for a
``UserError``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


class ProvisionerError(Exception):
    """Root of every error provisioner raises on purpose."""

    exit_code = EXIT_INTERNAL_ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UserError(ProvisionerError):
    """The input was wrong; the user can fix it."""

    exit_code = EXIT_USER_ERROR


class InvalidKeyError(UserError):
    """An env key that is not a safe, portable name."""


class SpecError(UserError):
    """An environment spec, models.yml or config file is malformed."""


class LockfileError(UserError):
    """A lockfile is missing, malformed or does not match its spec."""


class SolveError(UserError):
    """The solver found no set of packages that satisfies a spec."""


class PipLayerError(UserError):
    """The pip layer of a spec cannot be locked or installed."""


class BuildError(ProvisionerError):
    """Building or promoting an environment failed."""


class IntegrityError(BuildError):
    """A package's content does not match the hash in the lock.

    Exit code 2: the archive or the lock changed (a relock or a restored mirror
    fixes it), which is not a bug of provisioner.
    """

    exit_code = EXIT_USER_ERROR


class ImportCheckError(UserError):
    """A freshly built env cannot import a module its spec lists, or the import hung."""


class UnsafePackageError(IntegrityError):
    """A package would write outside its prefix, or past the configured limits (exit 2)."""

    exit_code = EXIT_USER_ERROR


class FetchError(BuildError):
    """A package could not be downloaded (network, mirror): the environment's problem."""

    exit_code = EXIT_USER_ERROR


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a build; the CLI exits ``128 + signum``.

    A ``KeyboardInterrupt``, not a ``ProvisionerError``: no fallback chain may
    swallow it, and code that cleans up on Ctrl-C cleans up on SIGTERM too.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


class LockTimeoutError(UserError):
    """Another process held the key's lock for longer than allowed."""


class CudaMismatchError(UserError):
    """The host's CUDA driver is older than the lock needs."""


class ResolutionError(UserError):
    """No environment can serve a model."""


class ToolMissingError(UserError):
    """An external program that the chosen configuration needs is not installed."""


class HomeLayoutError(UserError):
    """Something in provisioner's home is not what provisioner put there (a link, a file)."""


class EnvironmentProblemError(UserError):
    """The machine refused an operation: a full disk, a read-only filesystem, no permission."""


# errno name -> (what the operation needed, what the user can do), for an OS refusal.
_NEEDS = {
    "ENOSPC": ("free disk space", "free some space there"),
    "EDQUOT": ("disk quota", "free some space there or raise the quota"),
    "EROFS": ("a writable filesystem", "remount it read-write"),
    "EACCES": ("permission to write there", "fix the permissions"),
    "EPERM": ("permission to write there", "fix the permissions"),
    "EMFILE": ("more open files", "raise the open-file limit (ulimit -n)"),
    "ENAMETOOLONG": ("a shorter path", "use a shorter PROVISIONER_HOME"),
}


def environment_error(exc: OSError, doing: str = "") -> EnvironmentProblemError | None:
    """An exit-2 error for an OS refusal the user can fix (full disk, read-only, permission).

    Returns ``None`` for every other ``OSError``, which stays a bug (exit 3).
    The message names the path and what was needed.
    """
    import errno as _errno
    import os as _os

    name = _errno.errorcode.get(exc.errno or 0, "")
    if name not in _NEEDS:
        return None
    need, fix = _NEEDS[name]
    path = exc.filename if exc.filename is not None else "?"
    what = f" while {doing}" if doing else ""
    reason = exc.strerror or _os.strerror(exc.errno or 0)
    return EnvironmentProblemError(
        f"{reason} at {path}{what}: needs {need}",
        hint=f"{fix}, or choose another PROVISIONER_HOME; then retry ({name})",
    )
