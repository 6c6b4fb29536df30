"""``ensure``: execute an :class:`~provisioner.build.plan.EnsurePlan` safely.

Build into ``.staging/``, verify, write the fingerprint last, promote with one
rename (or a copy into a sibling temp dir, then a rename), switch the pointer
atomically, and check the promoted env. The key's file lock is held from the
re-plan to the pointer switch; a second arrival finds a ready env and reuses it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from provisioner import fsops, processes
from provisioner.build import orphans, trash
from provisioner.build.backends import choose_backend
from provisioner.build.cuda import CudaCheck
from provisioner.build.env_checks import (
    check_python_prefix,
    check_records,
    find_staging_path,
    site_packages,
)
from provisioner.build.fingerprint import (
    Fingerprint,
    read_fingerprint,
    tool_version,
    write_fingerprint,
)
from provisioner.build.home_checks import (
    check_home,
    check_key_dir,
    environment_problem,
    heal_pointer,
)
from provisioner.build.import_memo import ImportCheck, import_check
from provisioner.build.interrupts import interruptible
from provisioner.build.key_lock import hold_key_lock
from provisioner.build.layout import HomeLayout, python_path
from provisioner.build.plan import EnsurePlan, make_plan
from provisioner.config import Config
from provisioner.errors import (
    BuildError,
    CudaMismatchError,
    IntegrityError,
    ProvisionerError,
)
from provisioner.lock.lockfile import LockData, LockedPackage
from provisioner.progress import BYTES, Phase, Progress, ProgressSink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsureOptions:
    """How to ensure an env."""

    dry_run: bool = False
    backend: str | None = None
    lock_timeout: float | None = None
    allow_cuda_mismatch: bool = False
    progress: ProgressSink | None = None


@dataclass(frozen=True)
class EnsureResult:
    """What ``ensure`` did."""

    plan: EnsurePlan
    action: str
    prefix: Path
    python: Path
    generation: str
    backend: str
    backend_reason: str
    seconds: float
    waited_seconds: float = 0.0
    dry_run: bool = False
    cuda: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "key": self.plan.key,
            "action": self.action,
            "reason": self.plan.reason,
            "prefix": str(self.prefix),
            "python": str(self.python),
            "generation": self.generation,
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "seconds": round(self.seconds, 4),
            "waited_seconds": round(self.waited_seconds, 4),
            "dry_run": self.dry_run,
            "cuda": self.cuda,
            "plan": self.plan.to_dict(),
        }


def fault_point(name: str) -> None:
    """Test hook: die (SIGKILL) or pause at named points of a build."""
    if os.environ.get("PROVISIONER_TEST_FAULT") == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
    delay = os.environ.get("PROVISIONER_TEST_STEP_DELAY")
    if delay:
        time.sleep(float(delay))


def _result(plan: EnsurePlan, action: str, start: float, backend: str = "", reason: str = "",
            waited: float = 0.0, cuda: dict[str, object] | None = None) -> EnsureResult:
    return EnsureResult(
        plan=plan, action=action, prefix=plan.prefix, python=plan.python,
        generation=plan.generation, backend=backend, backend_reason=reason,
        seconds=time.monotonic() - start, waited_seconds=waited, cuda=cuda,
    )


def _reused(plan: EnsurePlan, start: float, waited: float = 0.0) -> EnsureResult:
    fp = read_fingerprint(plan.prefix)
    backend = f"{fp.backend} {fp.backend_version}" if fp else ""
    return _result(plan, "reuse", start, fp.backend if fp else "",
                   f"built with {backend} on {fp.created_at}" if fp else "", waited)


def ensure(config: Config, key: str, options: EnsureOptions | None = None) -> EnsureResult:
    """Make sure ``key`` has a ready env matching its lock; build it if needed.

    A full disk, a read-only home or a denied permission raises an
    :class:`~provisioner.errors.EnvironmentProblemError` (exit 2) that names the
    path and what was needed; staging is removed and the pointer left as it was.
    """
    try:
        return _ensure(config, key, options)
    except (OSError, BuildError) as exc:
        problem = environment_problem(exc, config.home, f"ensuring {key}")
        if problem is None:
            raise
        raise problem from exc


def _ensure(config: Config, key: str, options: EnsureOptions | None) -> EnsureResult:
    opts = options or EnsureOptions()
    start = time.monotonic()
    plan = make_plan(config, key)
    if opts.dry_run:
        return _dry_run(config, plan, opts, start)
    layout = HomeLayout(config.home)
    check_home(layout)  # links and files where the home's dirs belong: moved aside or refused
    check_key_dir(layout, key, scan=False)
    if plan.action == "reuse" and plan.active_generation == plan.generation:
        return _reused(plan, start)
    with hold_key_lock(key, layout.lock_file(key), timeout=opts.lock_timeout) as waited:
        check_key_dir(layout, key)
        heal_pointer(layout, key)
        plan = make_plan(config, key)  # another process may have finished while we waited
        if plan.action == "reuse":
            if plan.active_generation != plan.generation:
                fsops.replace_pointer(layout.pointer(key), plan.generation)
            return _reused(plan, start, waited)
        for stale in plan.stale_staging:
            log.info("removing interrupted build %s", stale.name)
            # A kill right after the staging dir's mkdir leaves it without a marker.
            if not fsops.remove_unmarked_stub(stale):
                orphans.stop_build_processes(stale)
                trash.cleanup(layout, stale, f"removing interrupted build {stale.name}")
        if plan.prefix.exists():
            orphans.stop_build_processes(plan.prefix)  # an in-place (conda) build
            # Out of the way first (a refusal fails the build); deleting it never does.
            trashed = trash.move_to_trash(layout, plan.prefix, require_marker=False)
            trash.purge(trashed, f"removing the unfinished {plan.key} {plan.prefix.name}")
        with interruptible():
            try:
                return _build(config, layout, plan, opts, start, waited)
            except KeyboardInterrupt:  # SIGINT, or SIGTERM (Interrupted); the installer is gone
                from provisioner.build.package_cache import clean_partial_entries

                with contextlib.suppress(ProvisionerError, OSError):
                    clean_partial_entries(layout.package_cache)
                raise


def _dry_run(config: Config, plan: EnsurePlan, opts: EnsureOptions, start: float) -> EnsureResult:
    from provisioner.build.artifacts import locate_sizes
    from provisioner.lock.reader import read_lockfile

    choice = choose_backend(opts.backend, config.backend, plan.platform)
    details: dict[str, object] = {}
    cuda = None
    if plan.action != "reuse":
        lock = read_lockfile(plan.lockfile)
        cuda = _cuda_gate(plan, lock, opts).to_dict()  # refuses as the real run would
        packages = lock.for_platform(plan.platform, "conda")
        details = {"packages_to_link": len(packages), **locate_sizes(config, lock, packages)}
    plan = replace(plan, details=details)
    return replace(
        _result(plan, plan.action, start, choice.backend.name, choice.reason, cuda=cuda),
        dry_run=True,
    )


def _cuda_gate(plan: EnsurePlan, lock: LockData, opts: EnsureOptions) -> CudaCheck:
    """The host's CUDA driver against what the lock needs; raises unless allowed."""
    from provisioner.build.cuda import compare_cuda, host_cuda_version, mismatch_hint, required_cuda

    cuda = compare_cuda(required_cuda(lock, plan.platform), host_cuda_version())
    if not cuda.ok:
        if not opts.allow_cuda_mismatch:
            raise CudaMismatchError(f"{plan.key}: {cuda.message}", hint=mismatch_hint())
        log.warning("building %s despite a CUDA mismatch: %s", plan.key, cuda.message)
    return cuda


def _build(config: Config, layout: HomeLayout, plan: EnsurePlan, opts: EnsureOptions,
           start: float, waited: float) -> EnsureResult:
    from provisioner.build import downloads
    from provisioner.build.artifacts import locate_sizes, verify_artifacts
    from provisioner.build.durability import flush_tree
    from provisioner.build.package_cache import prepare as prepare_cache
    from provisioner.build.package_checks import check_packages
    from provisioner.build.path_budget import check_build_paths
    from provisioner.lock.channels import resolve_channels
    from provisioner.lock.check import check_key, platform_virtual_packages
    from provisioner.lock.reader import read_lockfile
    from provisioner.lock.spec import load_spec

    log.info("%s %s: %s", plan.action, plan.key, plan.reason)
    spec = load_spec(config.specs_dir, plan.key)
    freshness = check_key(config, plan.key)
    if not freshness.ok:
        # The lock is what gets built; a spec edited since is only a warning here.
        log.warning("%s: the spec changed since it was locked; building the lock as it is "
                    "(run 'provisioner lock %s' to pick up the change)", plan.key, plan.key)
    lock = read_lockfile(plan.lockfile)
    packages = lock.for_platform(plan.platform, "conda")
    # The same plan fields as --dry-run reports, so that both read alike.
    plan = replace(plan, details={"packages_to_link": len(packages),
                                  **locate_sizes(config, lock, packages)})
    choice = choose_backend(opts.backend, config.backend, plan.platform)
    backend = choice.backend
    log.info("backend %s (%s)", backend.name, choice.reason)

    cuda = _cuda_gate(plan, lock, opts)

    sources = resolve_channels(lock.channels or spec.channels, config)
    one_copy = backend.name == "rattler"  # other backends install from the archives
    progress = Progress(opts.progress, plan.key)
    try:
        with progress.running("download", unit=BYTES) as download:
            artifacts = verify_artifacts(
                packages, sources, layout.package_cache, config=config,
                fetch_timeout=config.fetch_timeout, download=download, cached=(
                    downloads.cached_without_archive(packages, sources, layout.package_cache,
                                                     config.package_limits)
                    if one_copy else frozenset()))
    except IntegrityError as exc:
        raise IntegrityError(f"{plan.key}: {exc.message}", hint=(
            f"if the channel rebuilt that archive, run 'provisioner lock {plan.key}' to relock "
            "it; otherwise restore the archive or fix the mirror")) from None
    checked = check_packages(artifacts, config.package_limits, layout.package_cache)
    final = plan.prefix
    stage_name = f"{layout.staging_prefix(plan.key)}{plan.generation}.{secrets.token_hex(3)}"
    target = final if backend.builds_in_place else layout.staging / stage_name
    check_build_paths(plan.key, [final, target], checked, layout.package_cache)
    prepare_cache(checked, layout.package_cache, copy=config.force_copy)
    target.mkdir(parents=True)
    fsops.write_marker(target, "env")
    orphans.mark_building(target, f"building {plan.key} generation {plan.generation}")
    fault_point("after-mark")
    # Every child started from here on carries the build's tag and is recorded in its marker.
    scope = contextlib.ExitStack()
    scope.enter_context(processes.build_scope(
        Path(orphans.build_tag(target)), on_spawn=lambda pid: orphans.record_child(target, pid)))
    try:
        backend.install(artifacts, target=target, final=final,
                        cache_dir=layout.package_cache, progress=progress)
        fault_point("after-install")
        python_pkg = next((p for p in packages if p.name == "python"), None)
        py_version = python_pkg.version if python_pkg else "3"
        site = site_packages(target, py_version, plan.platform)
        if spec.pip_for(plan.platform):
            vps = platform_virtual_packages(spec, plan.platform)
            wheels = lock.for_platform(plan.platform, "pip")
            with progress.running("pip layer", total=len(wheels), unit="wheels") as layer:
                layer.advance(_install_pip(config, plan, site, py_version, vps, wheels))
        fault_point("after-pip")
        with progress.running("verify", total=3, unit="checks") as checks:
            imports = import_check(
                layout.package_cache, imports=spec.imports, platform=plan.platform,
                packages=[*packages, *lock.for_platform(plan.platform, "pip")],
                backend=f"{backend.name} {backend.version()}", mode=config.import_check)
            imported = _verify_stage(target, final, packages, imports, site, plan, checks)
        # Nothing a package's import started may still write into the env once it is sealed.
        orphans.stop_build_processes(target)
        fault_point("before-fingerprint")
        flush_tree(target)
        write_fingerprint(target, Fingerprint(
            key=plan.key, platform=plan.platform, lock_hash=plan.lock_hash,
            generation=plan.generation, backend=backend.name,
            backend_version=backend.version(), tool_version=tool_version(),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            cuda_mismatch_allowed=not cuda.ok,
        ))
        fault_point("before-promote")
        if target != final:
            _promote(config, target, final)
    except BaseException:
        with contextlib.suppress(OSError):  # must not hide the error that got us here
            orphans.stop_build_processes(target)
        trash.cleanup(layout, target, f"cleaning up the failed build of {plan.key}")  # logs
        raise
    finally:
        scope.close()
    fault_point("before-pointer")
    previous = plan.active_generation
    fsops.replace_pointer(layout.pointer(plan.key), plan.generation)
    _check_promoted(layout, plan, spec.imports, previous)
    if imported:
        imports.record(plan.key)
    if one_copy:
        downloads.drop_downloaded_archives(artifacts, layout.package_cache, config.package_limits)
    log.info("%s is ready at %s", plan.key, final)
    return _result(plan, plan.action, start, backend.name, choice.reason, waited, cuda.to_dict())


def _install_pip(config: Config, plan: EnsurePlan, site: Path, py_version: str,
                 vps: dict[str, tuple[str, str]], entries: Sequence[LockedPackage]) -> int:
    from provisioner.lock.pip_layer import install_pip_layer

    if not entries:
        raise BuildError(f"{plan.key}: the spec has a pip: section but the lock has no pip "
                         f"entries for {plan.platform}", hint=f"run 'provisioner lock {plan.key}'")
    site.mkdir(parents=True, exist_ok=True)
    count = install_pip_layer(entries=entries, site_packages=site, python_version=py_version,
                              platform=plan.platform, virtual_packages=vps, settings=config.pip)
    log.info("installed %d pip wheel(s) with uv", count)
    return count


def _verify_stage(target: Path, final: Path, packages: Sequence[LockedPackage],
                  imports: ImportCheck, site: Path, plan: EnsurePlan, checks: Phase) -> bool:
    records = check_records(target, packages)
    if not records.ok:
        raise BuildError(f"{plan.key}: installed env does not match the lock: "
                         + "; ".join(records.problems[:5]))
    checks.advance()
    if target != final:
        leaked = find_staging_path(target, str(target))
        if leaked:
            raise BuildError(f"{plan.key}: {len(leaked)} file(s) still name the staging path, "
                             f"e.g. {leaked[0]}", hint="the package may not be relocatable")
    checks.advance()
    imported = imports.run(python_path(target, plan.platform), target, site, plan.key)
    checks.advance()
    return imported


def _promote(config: Config, target: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if not config.force_copy:
        try:
            # A just-built tree is what scanners hold ("access denied"): the full budget.
            fsops.rename_with_retry(target, final, denied_budget=fsops.RENAME_RETRY_BUDGET_S)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            log.info("staging and envs are on different filesystems; promoting by copy")
    fsops.copy_tree_into(target, final)
    trash.cleanup(HomeLayout(config.home), target, "removing the copied staging dir")


def _check_promoted(layout: HomeLayout, plan: EnsurePlan, imports: tuple[str, ...],
                    previous: str | None) -> None:
    # The imports were checked in staging; a rename only has to leave a python that starts here.
    report = check_python_prefix(plan.python, plan.prefix)
    if report.ok:
        return
    if previous and previous != plan.generation:
        fsops.replace_pointer(layout.pointer(plan.key), previous)
    else:
        fsops.remove_file(layout.pointer(plan.key))
    trash.cleanup(layout, plan.prefix, f"discarding the broken {plan.key}", require_marker=False)
    raise BuildError(f"{plan.key}: the promoted env does not run from {plan.prefix}: "
                     + "; ".join(report.problems))
