"""Commands of the build domain: ensure, verify, gc, pack, mirror."""

from __future__ import annotations

from pathlib import Path

import click

from provisioner.cli.base import (
    cli,
    emit_json,
    json_option,
    make_config,
    project_options,
    status,
)
from provisioner.cli.progress_view import progress_sink
from provisioner.errors import EXIT_CHECK_FAILED


@cli.command("ensure")
@click.argument("key")
@project_options
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--backend", default=None, help="rattler (default), micromamba, mamba or conda.")
@click.option("--lock-timeout", type=float, default=None, metavar="S",
              help="Give up after S seconds waiting for another build of KEY.")
@click.option("--allow-cuda-mismatch", is_flag=True,
              help="Build even if the host CUDA driver is older than the lock needs.")
@click.option("--from", "pack", default=None, metavar="PACK",
              help="Build from a pack (a path, https:// or s3:// URL) and nothing else.")
@click.option("--use-pack-lock", is_flag=True,
              help="With --from: build the pack's own lock when it differs from the project's.")
@click.option("--recheck", is_flag=True,
              help="Run the import check even if this package set passed it before.")
@json_option
@click.pass_context
def ensure_cmd(
    ctx: click.Context, key: str, project: Path | None, dry_run: bool, backend: str | None,
    lock_timeout: float | None, allow_cuda_mismatch: bool, pack: str | None,
    use_pack_lock: bool, recheck: bool, as_json: bool,
) -> None:
    """Build KEY's env from its lock (or reuse it) and print its python."""
    from provisioner.build.ensure import EnsureOptions, ensure

    if use_pack_lock and pack is None:
        raise click.UsageError("--use-pack-lock needs --from PACK")
    config = make_config(ctx, project).with_overrides(import_check="always" if recheck else None)
    with progress_sink(ctx) as progress:
        opts = EnsureOptions(dry_run=dry_run, backend=backend, lock_timeout=lock_timeout,
                             allow_cuda_mismatch=allow_cuda_mismatch, progress=progress)
        if pack is not None:
            from provisioner.build.from_pack import ensure_from_pack

            packed = ensure_from_pack(config, key, pack, opts, use_pack_lock=use_pack_lock)
            result, data = packed.result, packed.to_dict()
        else:
            result = ensure(config, key, opts)
            data = result.to_dict()
    if as_json:
        emit_json(data)
    elif dry_run:
        plan = result.plan.to_dict()
        click.echo(f"plan for {key}: {result.action} ({result.plan.reason})")
        for field in ("generation", "prefix", "python", "lockfile", "packages_to_link",
                      "archive_bytes", "stale_staging"):
            if field in plan:
                click.echo(f"  {field:17} {plan[field]}")
        click.echo(f"  {'backend':17} {result.backend} ({result.backend_reason})")
    else:
        click.echo(str(result.python))


@cli.command("verify")
@click.argument("key")
@project_options
@click.option("--deep", is_flag=True, help="Also hash every file against its recorded sha256.")
@click.option("--repair", is_flag=True,
              help="With --deep: restore missing or altered files from the package cache.")
@json_option
@click.pass_context
def verify_cmd(
    ctx: click.Context, key: str, project: Path | None, deep: bool, repair: bool, as_json: bool
) -> None:
    """Check KEY's active env against its lock; exit 1 if anything is wrong."""
    from provisioner.build.maintenance import verify_env
    from provisioner.build.repair import repair_env

    deep = deep or repair
    with progress_sink(ctx) as progress:
        report = (repair_env(make_config(ctx, project), key) if repair
                  else verify_env(make_config(ctx, project), key, deep=deep, progress=progress))
    if as_json:
        emit_json(report.to_dict())
    elif report.ok:
        click.echo(f"{status('ok', True)}      {key} {report.generation} "
                   f"({report.packages_checked} packages, "
                   f"{report.files_checked} files{', deep' if deep else ''})")
    else:
        click.echo(f"{status('FAILED', False)}  {key} {report.generation or ''}".rstrip())
        for problem in report.problems:
            click.echo(f"  {problem}")
    if not report.ok:
        ctx.exit(EXIT_CHECK_FAILED)


@cli.command("gc")
@project_options
@click.option("--dry-run", is_flag=True,
              help="Only report what would be removed, and why the rest is kept.")
@click.option("--keep", type=click.IntRange(0, 1000), default=None, metavar="N",
              help="Previous generations kept per key for rollback (default: [gc] keep, 1).")
@click.option("--cache", is_flag=True,
              help="Also remove package-cache entries and archives no generation uses, and "
                   "partial downloads (only while no build runs).")
@json_option
@click.pass_context
def gc_cmd(ctx: click.Context, project: Path | None, dry_run: bool, keep: int | None,
           cache: bool, as_json: bool) -> None:
    """Remove interrupted builds, the trash and old generations (never active or leased ones)."""
    from provisioner.build.maintenance import collect_garbage

    report = collect_garbage(make_config(ctx, project), dry_run=dry_run, keep=keep, cache=cache)
    if as_json:
        emit_json(report.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    for item in report.removed:
        click.echo(f"{verb} {item.kind:10} {item.path} ({item.bytes} bytes)")
    for kept in report.why_kept if dry_run else ():
        click.echo(f"keep {kept.path}: {kept.reason}")
    for skip in report.skipped:
        click.echo(f"skipped {skip.path}: {skip.reason}")
    for held in report.in_use:
        click.echo(f"in use  {held.path}: {len(held.files)} file(s) held open by another "
                   "process (e.g. " + held.files[0] + "); the next gc retries it")
    freed = "would free" if dry_run else "freed"
    click.echo(f"{freed} {report.bytes_freed} bytes in {len(report.removed)} path(s)"
               " (hard links counted once)")


@cli.command("pack")
@click.argument("key")
@project_options
@click.option("--platform", default=None, metavar="P",
              help="The platform to pack (default: this host's), e.g. linux-64.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The pack file (default: KEY-PLATFORM.tar here).")
@json_option
@click.pass_context
def pack_cmd(ctx: click.Context, key: str, project: Path | None, platform: str | None,
             output: Path | None, as_json: bool) -> None:
    """Write one file with KEY's lock, spec and every archive of one platform."""
    from provisioner.build.pack import make_pack

    result = make_pack(make_config(ctx, project), key, platform=platform, output=output)
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(f"{result.path} ({result.conda_packages} conda archives, "
                   f"{result.pip_wheels} wheels, {result.bytes} bytes, sha256 {result.sha256})")


@cli.command("mirror")
@click.argument("keys", nargs=-1, required=True)
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@project_options
@click.option("--platform", "platforms", multiple=True, metavar="P",
              help="Only these platforms (repeatable; default: every locked one).")
@json_option
@click.pass_context
def mirror_cmd(ctx: click.Context, keys: tuple[str, ...], directory: Path,
               project: Path | None, platforms: tuple[str, ...], as_json: bool) -> None:
    """Add the conda archives of KEYS to DIRECTORY, a static channel mirror, and index it."""
    from provisioner.build.mirror import make_mirror

    result = make_mirror(make_config(ctx, project), keys, directory, platforms=platforms)
    if as_json:
        emit_json(result.to_dict())
        return
    for name, count in sorted(result.channels.items()):
        click.echo(f"{result.directory / name}: {count} archives")
    click.echo(f"added {result.added} archive(s) ({result.bytes_added} bytes), "
               f"{result.present} already there")
