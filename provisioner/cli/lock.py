"""Commands of the lock domain: lock, show-lock, diff."""

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


@cli.command("lock")
@click.argument("keys", nargs=-1)
@project_options
@click.option("--check", is_flag=True, help="Only check that locks match their specs (no solve).")
@click.option("--update", "update", multiple=True, metavar="PKG",
              help="Relock only PKG, holding every other package at its locked version.")
@click.option("--update-all", is_flag=True, help="Relock letting every package move.")
@click.option("--channel-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory whose <name> subdirs mirror each named channel.")
@click.option("--skip-pip", is_flag=True,
              help="Keep the existing pip-layer locks instead of re-resolving them (offline).")
@json_option
@click.pass_context
def lock_cmd(
    ctx: click.Context, keys: tuple[str, ...], project: Path | None, check: bool,
    update: tuple[str, ...], update_all: bool, channel_root: Path | None, skip_pip: bool,
    as_json: bool,
) -> None:
    """Solve KEYS (default: every spec) and write lockfiles/<key>.conda-lock.yml."""
    config = make_config(ctx, project, channel_root=channel_root)
    if check:
        from provisioner.lock.check import check_locks

        results = check_locks(config, list(keys) or None)
        if as_json:
            emit_json({"check": True, "ok": all(r.ok for r in results), "keys": [
                {**r.to_dict(), "lockfile": str(config.locks_dir / Path(r.lockfile).name)}
                for r in results]})
        else:
            for r in results:
                if r.ok:
                    click.echo(f"{status('ok', True)}      {r.key}")
                else:
                    click.echo(f"{status('STALE', False)}   {r.key}: {'; '.join(r.reasons)}")
        if not all(r.ok for r in results):
            ctx.exit(EXIT_CHECK_FAILED)
        return
    from provisioner.lock.write import lock_envs

    with progress_sink(ctx) as progress:
        outcomes = lock_envs(config, list(keys) or None, update=update, update_all=update_all,
                             skip_pip=skip_pip, progress=progress)
    diffs = {}
    if update_all:
        from provisioner.lock.diff import diff_locks, render_text

        diffs = {o.key: diff_locks(o.old, o.new) for o in outcomes if o.old is not None}
    if as_json:
        emit_json({"check": False, "ok": True, "keys": [
            {**o.to_dict(), "diff": diffs[o.key].to_dict() if o.key in diffs else None}
            for o in outcomes]})
        return
    for o in outcomes:
        counts = ", ".join(f"{p}: {n} conda" + (f" + {o.pip_counts[p]} pip" if p in o.pip_counts
                           else "") for p, n in o.counts.items())
        state = "updated" if o.changed else "unchanged"
        click.echo(f"{o.key}: {state} {config.locks_dir.name}/{o.lockfile.name} ({counts})")
        for item in o.refreshed:
            click.echo(f"  relocked {item.describe()}")
        for line in render_text(diffs[o.key]) if o.key in diffs else []:
            click.echo(f"  {line}")


@cli.command("show-lock")
@click.argument("target")
@project_options
@click.option("--platform", default=None, help="Only this platform.")
@json_option
@click.pass_context
def show_lock_cmd(
    ctx: click.Context, target: str, project: Path | None, platform: str | None, as_json: bool
) -> None:
    """Summarise a conda-lock file (a PATH, or the KEY of a project lock)."""
    from provisioner.lock.check import lockfile_path
    from provisioner.lock.show import render_summary_text, show_lock

    config = make_config(ctx, project)
    summary = show_lock(config, target, platform=platform)
    if as_json:
        is_file = Path(target).is_file()
        path = Path(target).absolute() if is_file else lockfile_path(config.locks_dir, target)
        emit_json({**summary.to_dict(), "path": str(path), "key": None if is_file else target})
    else:
        for line in render_summary_text(summary):
            click.echo(line)


@cli.command("diff")
@click.argument("args", nargs=-1, metavar="OLD NEW | [KEY]...")
@project_options
@click.option("--git", "rev", metavar="REV", default=None,
              help="Compare the project's lockfiles at git revision REV with the working tree; "
                   "arguments are then KEYS (default: every lock).")
@click.option("--markdown", is_flag=True, help="Markdown for a pull-request body.")
@json_option
@click.pass_context
def diff_cmd(ctx: click.Context, args: tuple[str, ...], project: Path | None, rev: str | None,
             markdown: bool, as_json: bool) -> None:
    """Show what changed between lockfiles OLD and NEW, or since git revision REV."""
    from provisioner.lock.diff import diff_files, diff_git, render_markdown, render_text

    if markdown and as_json:
        raise click.UsageError("--markdown and --json cannot be combined")
    if rev is not None:
        diffs = diff_git(make_config(ctx, project), rev, list(args) or None)
        if as_json:
            emit_json({"rev": rev, "keys": [{"key": k, **d.to_dict()} for k, d in diffs]})
        elif markdown:
            click.echo("\n".join(render_markdown(d, k) for k, d in diffs))
        else:
            click.echo("\n\n".join("\n".join(render_text(d, k)) for k, d in diffs))
        return
    if len(args) != 2:
        raise click.UsageError("pass two lockfiles OLD NEW, or --git REV [KEY]...")
    old, new = Path(args[0]), Path(args[1])
    diff = diff_files(old, new)
    if as_json:
        emit_json({"old": str(old.absolute()), "new": str(new.absolute()), **diff.to_dict()})
    elif markdown:
        click.echo(render_markdown(diff, f"{old.name} -> {new.name}"))
    else:
        click.echo("\n".join(render_text(diff, f"{old} -> {new}")))
