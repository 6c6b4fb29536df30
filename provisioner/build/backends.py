"""Backends that turn verified package archives into a conda prefix.

* ``rattler`` (default): py-rattler, in a child process. Installs into the staging prefix
  while writing the final path into every file (``alternative_target_prefix``),
  hardlinking from the shared package cache and running no link scripts.
* ``micromamba`` / ``mamba``: ``create -p STAGING --relocate-prefix FINAL`` from
  an explicit file rendered from the lock.
* ``conda``: has no relocation, so it builds at the final path, behind the
  in-progress marker.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from provisioner import fsops, processes
from provisioner.errors import BuildError, ToolMissingError, UserError
from provisioner.progress import Progress

if TYPE_CHECKING:  # fetching (urllib, threads) loads only when a build runs
    from provisioner.build.artifacts import VerifiedArtifact

BACKENDS = ("rattler", "micromamba", "mamba", "conda")
EXECUTABLE_TIMEOUT_S = 3600.0
# micromamba (and mamba before 2.4) abort on an existing folder without conda-meta/
# ("Non-conda folder exists at prefix"), and a staging dir already holds provisioner's
# marker files; so they create a fresh prefix inside it, whose entries are then moved up.
FRESH_PREFIX_NAME = ".provisioner-prefix"


class Backend(Protocol):
    """Creates a prefix from verified archives."""

    @property
    def name(self) -> str: ...

    @property
    def builds_in_place(self) -> bool: ...

    def version(self) -> str: ...

    def install(
        self,
        artifacts: Sequence[VerifiedArtifact],
        *,
        target: Path,
        final: Path,
        cache_dir: Path,
        progress: Progress | None,
    ) -> None: ...


@dataclass
class RattlerBackend:
    """py-rattler, in a child process (:mod:`provisioner.build.installer`)."""

    name: str = "rattler"
    builds_in_place: bool = False

    def version(self) -> str:
        from importlib.metadata import version

        return version("py-rattler")

    def install(
        self,
        artifacts: Sequence[VerifiedArtifact],
        *,
        target: Path,
        final: Path,
        cache_dir: Path,
        progress: Progress | None,
    ) -> None:
        from provisioner.build.installer import install_in_child

        # In a child process: a rattler panic aborts its process, and must not abort ours.
        install_in_child(artifacts, target=target, final=final, cache_dir=cache_dir,
                         progress=progress)


def render_explicit(artifacts: Sequence[VerifiedArtifact], platform: str) -> str:
    """An ``@EXPLICIT`` file that conda, mamba and micromamba install without solving."""
    lines = ["# platform: " + platform, "@EXPLICIT"]
    lines += [f"{a.url}#{a.package.md5 or a.package.sha256}" for a in artifacts]
    return "\n".join(lines) + "\n"


@dataclass
class ExecutableBackend:
    """micromamba, mamba or conda, driven through their command lines."""

    name: str
    executable: str
    platform: str

    @property
    def builds_in_place(self) -> bool:
        return self.name == "conda"

    def version(self) -> str:
        result = processes.run([self.executable, "--version"], timeout=60)
        return result.stdout.strip().splitlines()[-1] if result.ok and result.stdout else "unknown"

    def argv(self, explicit: Path, target: Path, final: Path, cache_dir: Path) -> list[str]:
        """The command line for one build."""
        if self.name == "conda":
            return [self.executable, "create", "--yes", "--quiet", "--offline",
                    "--prefix", str(final), "--file", str(explicit)]
        argv = [self.executable, "create", "--yes", "--quiet", "--offline",
                "--prefix", str(target), "--file", str(explicit)]
        if target != final:
            argv += ["--relocate-prefix", str(final)]
        return argv

    def install(
        self,
        artifacts: Sequence[VerifiedArtifact],
        *,
        target: Path,
        final: Path,
        cache_dir: Path,
        progress: Progress | None,
    ) -> None:
        # Unique per call: threads of one process may build several keys at once.
        explicit = cache_dir / f"explicit-{os.getpid()}-{secrets.token_hex(4)}.txt"
        cache_dir.mkdir(parents=True, exist_ok=True)
        explicit.write_text(render_explicit(artifacts, self.platform), encoding="utf-8")
        env = dict(os.environ)
        env.setdefault("CONDA_PKGS_DIRS", str(cache_dir))
        prefix = target if target == final else target / FRESH_PREFIX_NAME
        # One phase: the tool extracts and links in one go, and reports neither here.
        with (progress or Progress(None, "")).running(
                "link", total=len(artifacts), unit="packages") as link:
            try:
                result = processes.run(self.argv(explicit, prefix, final, cache_dir),
                                       timeout=EXECUTABLE_TIMEOUT_S, env=env)
            finally:
                fsops.remove_file(explicit)
            link.set_note(f"by {self.name}")
            link.advance(len(artifacts) if result.ok else 0)
        if not result.ok:
            detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise BuildError(
                f"{self.name} failed to create the env (exit {result.returncode}): "
                + " | ".join(detail)
            )
        if prefix != target:
            for entry in sorted(prefix.iterdir()):
                fsops.rename_with_retry(entry, target / entry.name)
            prefix.rmdir()
            _relocate_history(target, str(prefix), str(final))


def _relocate_history(target: Path, built_at: str, final: str) -> None:
    """micromamba logs its command line, staging path included, in conda-meta/history."""
    history = target / "conda-meta" / "history"
    if history.is_file():
        text = history.read_text(encoding="utf-8", errors="surrogateescape")
        if built_at in text:
            fsops.atomic_write_text(history, text.replace(built_at, final))


@dataclass(frozen=True)
class BackendChoice:
    """The backend that won, and why."""

    backend: Backend
    reason: str


def choose_backend(
    option: str | None,
    configured: str | None,
    platform: str,
    environ: Mapping[str, str] | None = None,
) -> BackendChoice:
    """Pick a backend: ``--backend``, then ``PROVISIONER_BACKEND``/config, then rattler."""
    env = os.environ if environ is None else environ
    if option:
        name, why = option, "--backend option"
    elif env.get("PROVISIONER_BACKEND"):
        name, why = env["PROVISIONER_BACKEND"], "PROVISIONER_BACKEND"
    elif configured:
        name, why = configured, "provisioner.toml"
    else:
        name, why = "rattler", "the default, embedded"
    if name not in BACKENDS:
        raise UserError(f"unknown backend '{name}'", hint=f"choose one of {', '.join(BACKENDS)}")
    if name == "rattler":
        return BackendChoice(RattlerBackend(), why)
    exe = env.get(f"PROVISIONER_{name.upper()}_EXE") or processes.which(name)
    if exe is None:
        raise ToolMissingError(
            f"backend '{name}' was chosen ({why}) but no {name} executable is on PATH",
            hint="install it, set PROVISIONER_" + name.upper() + "_EXE, or use --backend rattler",
        )
    return BackendChoice(ExecutableBackend(name, exe, platform), f"{why}; {name} at {exe}")
