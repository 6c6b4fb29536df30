"""The command-line skin: parse options, call one library function, render text or JSON.

Nothing below this module prints or exits; errors arrive as
:class:`~provisioner.errors.ProvisionerError` and become one-line messages with
a hint and an exit code (2 for user errors, 3 for internal ones).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from provisioner import __version__
from provisioner.config import Config, load_config
from provisioner.errors import (
    EXIT_CHECK_FAILED,
    EXIT_INTERNAL_ERROR,
    EXIT_USER_ERROR,
    ProvisionerError,
)

F = TypeVar("F", bound=Callable[..., Any])


def _emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("provisioner")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def project_options(func: F) -> F:
    """Options every project-level command shares."""
    func = click.option(
        "--project", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Project directory holding environment-specs/ and lockfiles/ (default: cwd).",
    )(func)
    return func


def _config(ctx: click.Context, project: Path | None, **overrides: Any) -> Config:
    root = ctx.find_root().params
    return load_config(
        project,
        home=overrides.get("home") or root.get("home"),
        channel_root=overrides.get("channel_root"),
        backend=overrides.get("backend"),
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="provisioner")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="PROVISIONER_HOME", help="Root for built envs (env: PROVISIONER_HOME).")
def cli(verbose: int, quiet: bool, home: Path | None) -> None:
    """Shared, lock-pinned conda environments for GPU models."""
    _setup_logging(verbose, quiet)


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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def lock_cmd(
    ctx: click.Context, keys: tuple[str, ...], project: Path | None, check: bool,
    update: tuple[str, ...], update_all: bool, channel_root: Path | None, skip_pip: bool,
    as_json: bool,
) -> None:
    """Solve KEYS (default: every spec) and write lockfiles/<key>.conda-lock.yml."""
    config = _config(ctx, project, channel_root=channel_root)
    if check:
        from provisioner.lockcheck import check_locks

        results = check_locks(config, list(keys) or None)
        if as_json:
            _emit_json({"ok": all(r.ok for r in results), "keys": [r.to_dict() for r in results]})
        else:
            for r in results:
                if r.ok:
                    click.echo(f"ok      {r.key}")
                else:
                    click.echo(f"STALE   {r.key}: {'; '.join(r.reasons)}")
        if not all(r.ok for r in results):
            ctx.exit(EXIT_CHECK_FAILED)
        return
    from provisioner.locker import lock_envs

    outcomes = lock_envs(
        config, list(keys) or None, update=update, update_all=update_all, skip_pip=skip_pip
    )
    diffs = {}
    if update_all:
        from provisioner.lockdiff import diff_locks, render_text

        diffs = {o.key: diff_locks(o.old, o.new) for o in outcomes if o.old is not None}
    if as_json:
        _emit_json([{**o.to_dict(), **({"diff": diffs[o.key].to_dict()} if o.key in diffs
                                        else {})} for o in outcomes])
        return
    for o in outcomes:
        counts = ", ".join(f"{p}: {n} conda" + (f" + {o.pip_counts[p]} pip" if p in o.pip_counts
                           else "") for p, n in o.counts.items())
        state = "updated" if o.changed else "unchanged"
        click.echo(f"{o.key}: {state} {config.locks_dir.name}/{o.lockfile.name} ({counts})")
        for line in render_text(diffs[o.key]) if o.key in diffs else []:
            click.echo(f"  {line}")


@cli.command("show-lock")
@click.argument("target")
@project_options
@click.option("--platform", default=None, help="Only this platform.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def show_lock_cmd(
    ctx: click.Context, target: str, project: Path | None, platform: str | None, as_json: bool
) -> None:
    """Summarise a conda-lock file (a PATH, or the KEY of a project lock)."""
    from provisioner.showlock import render_summary_text, show_lock

    config = _config(ctx, project)
    summary = show_lock(config, target, platform=platform)
    if as_json:
        _emit_json(summary.to_dict())
    else:
        for line in render_summary_text(summary):
            click.echo(line)


@cli.command("sample")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def sample_cmd(dest: Path, as_json: bool) -> None:
    """Write a ready, offline sample project (local channel, specs, locks) into DEST."""
    from provisioner.sample_project import create_sample_project

    result = create_sample_project(dest)
    if as_json:
        _emit_json(result.to_dict())
        return
    click.echo(f"sample project written to {dest}")
    for key in result.keys:
        click.echo(f"  locked {key}")
    click.echo(f"try: cd {dest} && provisioner lock --check")


class _RichProgress:
    """A rich progress bar for installs; only used on a terminal."""

    def __init__(self, label: str) -> None:
        from rich.progress import Progress

        self._progress = Progress(transient=True)
        self._label = label
        self._task: Any = None

    def start(self, total: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task(self._label, total=total)

    def advance(self) -> None:
        if self._task is not None:
            self._progress.advance(self._task)

    def finish(self) -> None:
        self._progress.stop()


@cli.command("ensure")
@click.argument("key")
@project_options
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--backend", default=None, help="rattler (default), micromamba, mamba or conda.")
@click.option("--lock-timeout", type=float, default=None, metavar="S",
              help="Give up after S seconds waiting for another build of KEY.")
@click.option("--allow-cuda-mismatch", is_flag=True,
              help="Build even if the host CUDA driver is older than the lock needs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def ensure_cmd(
    ctx: click.Context, key: str, project: Path | None, dry_run: bool, backend: str | None,
    lock_timeout: float | None, allow_cuda_mismatch: bool, as_json: bool,
) -> None:
    """Build KEY's env from its lock (or reuse it) and print its python."""
    from provisioner.builder import EnsureOptions, ensure

    config = _config(ctx, project)
    progress = None if as_json or dry_run or not sys.stderr.isatty() else _RichProgress(key)
    result = ensure(config, key, EnsureOptions(
        dry_run=dry_run, backend=backend, lock_timeout=lock_timeout,
        allow_cuda_mismatch=allow_cuda_mismatch, progress=progress,
    ))
    if as_json:
        _emit_json(result.to_dict())
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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def verify_cmd(
    ctx: click.Context, key: str, project: Path | None, deep: bool, as_json: bool
) -> None:
    """Check KEY's active env against its lock; exit 1 if anything is wrong."""
    from provisioner.maintenance import verify_env

    report = verify_env(_config(ctx, project), key, deep=deep)
    if as_json:
        _emit_json(report.to_dict())
    elif report.ok:
        click.echo(f"ok      {key} {report.generation} ({report.packages_checked} packages, "
                   f"{report.files_checked} files{', deep' if deep else ''})")
    else:
        click.echo(f"FAILED  {key} {report.generation or ''}".rstrip())
        for problem in report.problems:
            click.echo(f"  {problem}")
    if not report.ok:
        ctx.exit(EXIT_CHECK_FAILED)


@cli.command("gc")
@project_options
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def gc_cmd(ctx: click.Context, project: Path | None, dry_run: bool, as_json: bool) -> None:
    """Remove interrupted builds, the trash and generations older than the previous one."""
    from provisioner.maintenance import collect_garbage

    report = collect_garbage(_config(ctx, project), dry_run=dry_run)
    if as_json:
        _emit_json(report.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    for item in report.removed:
        click.echo(f"{verb} {item.kind:10} {item.path} ({item.bytes} bytes)")
    for skip in report.skipped:
        click.echo(f"skipped {skip.path}: {skip.reason}")
    freed = "would free" if dry_run else "freed"
    click.echo(f"{freed} {report.bytes_freed} bytes in {len(report.removed)} path(s)")


@cli.command("resolve")
@click.argument("model")
@project_options
@click.option("--policy", type=click.Choice(["prefer", "fallback", "ignore"]), default=None,
              help="How legacy per-model venvs are used (default: config, else prefer).")
@click.option("--no-build", is_flag=True, help="Never build; fail if nothing is ready.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def resolve_cmd(ctx: click.Context, model: str, project: Path | None, policy: str | None,
                no_build: bool, as_json: bool) -> None:
    """Print the python that should run MODEL (building its shared env if needed)."""
    from provisioner.resolve import get_env_for_model

    result = get_env_for_model(model, config=_config(ctx, project), policy=policy,
                               build=not no_build)
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(result.python)


@cli.command("demo")
@click.option("--home", "demo_home", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Empty directory for the demo (default: a new temp dir).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def demo_cmd(demo_home: Path | None, as_json: bool) -> None:
    """Play the four model-load scenarios offline, with a sample channel and an old venv."""
    from provisioner.demo import run_demo

    report = run_demo(demo_home)
    if as_json:
        _emit_json(report.to_dict())
        return
    click.echo("")
    for i, scenario in enumerate(report.scenarios, 1):
        res = scenario.resolution
        click.echo(f"({i}) {scenario.title}: {res.model_id} -> {res.source} [{res.env_key}]")
        click.echo(f"    python {res.python}")
        for attempt in res.attempts:
            click.echo(f"    - {attempt.step}: {attempt.outcome} ({attempt.detail})")
    click.echo("")
    click.echo(f"build of a new shared env:        {report.build_seconds:.2f} s")
    click.echo(f"second model, same key (first):   {report.reuse_ms:.1f} ms")
    click.echo(f"second model, same key (repeat):  {report.repeat_ms:.1f} ms")
    click.echo(f"shared env on disk:               {report.env_bytes / 1024:.1f} KiB, of which "
               f"{report.hardlinked_bytes / 1024:.1f} KiB hardlinked from the package cache")
    click.echo(f"demo files are in {report.root}")
    if report.inventory:
        click.echo("")
        _emit_json(report.inventory)


def _show(as_json: bool, data: object, lines: list[str]) -> None:
    if as_json:
        _emit_json(data)
    else:
        for line in lines:
            click.echo(line)


@cli.command("migrate")
@project_options
@click.option("--model", default=None, help="Migrate this model's legacy venv.")
@click.option("--all", "all_", is_flag=True, help="Migrate every legacy venv.")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--delete-legacy", is_flag=True,
              help="Delete each legacy local_<id> dir once its shared env is healthy.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def migrate_cmd(ctx: click.Context, project: Path | None, model: str | None, all_: bool,
                dry_run: bool, delete_legacy: bool, as_json: bool) -> None:
    """Move legacy per-model venvs onto verified shared envs; exit 1 if any is kept."""
    from provisioner.migrate import migrate, render_report_text

    if (model is None) == (not all_):
        raise click.UsageError("pass exactly one of --model MODEL or --all")
    report = migrate(_config(ctx, project), model=model, all_=all_, dry_run=dry_run,
                     delete_legacy=delete_legacy)
    _show(as_json, report.to_dict(), render_report_text(report))
    if not report.ok:
        ctx.exit(EXIT_CHECK_FAILED)


@cli.command("list")
@project_options
@click.option("--no-probe", is_flag=True, help="Only cached legacy health; never probe.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_cmd(ctx: click.Context, project: Path | None, no_probe: bool, as_json: bool) -> None:
    """List shared envs (every generation) and legacy venvs, with sizes and health."""
    from provisioner.inventory import list_envs, render_inventory_text

    inventory = list_envs(_config(ctx, project), probe=not no_probe)
    _show(as_json, inventory.to_dict(), render_inventory_text(inventory))


@cli.command("health")
@click.argument("key", required=False)
@project_options
@click.option("--legacy", is_flag=True, help="Probe every legacy venv instead.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def health_cmd(ctx: click.Context, key: str | None, project: Path | None, legacy: bool,
               as_json: bool) -> None:
    """Probe KEY's env strictly (default: every built key); exit 1 if any is unhealthy."""
    from provisioner.inventory import health, render_health_text

    rows = health(_config(ctx, project), key, legacy=legacy)
    ok = all(r.healthy for r in rows)
    _show(as_json, {"ok": ok, "envs": [r.to_dict() for r in rows]}, render_health_text(rows))
    if not ok:
        ctx.exit(EXIT_CHECK_FAILED)


@cli.command("run", context_settings={"ignore_unknown_options": True,
                                      "allow_interspersed_args": False})
@project_options
@click.argument("model")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run_cmd(ctx: click.Context, project: Path | None, model: str,
            command: tuple[str, ...]) -> None:
    """Run COMMAND with MODEL's env first on PATH: run [--project P] MODEL -- CMD [ARGS]."""
    from provisioner.inventory import run_in_env

    argv = command[1:] if command[:1] == ("--",) else command
    ctx.exit(run_in_env(_config(ctx, project), model, argv))


@cli.command("doctor")
@project_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def doctor_cmd(ctx: click.Context, project: Path | None, as_json: bool) -> None:
    """Report platform, python, CUDA driver, backends, free disk and paths."""
    from provisioner.inventory import doctor, render_doctor_text

    report = doctor(_config(ctx, project))
    _show(as_json, report.to_dict(), render_doctor_text(report))


@cli.command("diff")
@click.argument("args", nargs=-1, metavar="OLD NEW | [KEY]...")
@project_options
@click.option("--git", "rev", metavar="REV", default=None,
              help="Compare the project's lockfiles at git revision REV with the working tree; "
                   "arguments are then KEYS (default: every lock).")
@click.option("--markdown", is_flag=True, help="Markdown for a pull-request body.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def diff_cmd(ctx: click.Context, args: tuple[str, ...], project: Path | None, rev: str | None,
             markdown: bool, as_json: bool) -> None:
    """Show what changed between lockfiles OLD and NEW, or since git revision REV."""
    from provisioner.lockdiff import diff_files, diff_git, render_markdown, render_text

    if markdown and as_json:
        raise click.UsageError("--markdown and --json cannot be combined")
    if rev is not None:
        diffs = diff_git(_config(ctx, project), rev, list(args) or None)
        if as_json:
            _emit_json({"rev": rev, "keys": [{"key": k, **d.to_dict()} for k, d in diffs]})
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
        _emit_json({"old": str(old), "new": str(new), **diff.to_dict()})
    elif markdown:
        click.echo(render_markdown(diff, f"{old.name} -> {new.name}"))
    else:
        click.echo("\n".join(render_text(diff, f"{old} -> {new}")))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and turn errors into exit codes."""
    try:
        code = cli.main(args=argv, prog_name="provisioner", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = EXIT_USER_ERROR
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        code = EXIT_USER_ERROR
    except ProvisionerError as exc:
        message = exc.message if exc.exit_code == EXIT_USER_ERROR else f"internal: {exc.message}"
        click.echo(f"error: {message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        if os.environ.get("PROVISIONER_DEBUG") and exc.exit_code != EXIT_USER_ERROR:
            raise
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        code = 130
    except Exception as exc:
        if os.environ.get("PROVISIONER_DEBUG"):
            raise
        click.echo(f"internal error: {type(exc).__name__}: {exc}", err=True)
        click.echo("hint: rerun with PROVISIONER_DEBUG=1 for a traceback and report it", err=True)
        code = EXIT_INTERNAL_ERROR
    sys.exit(code if isinstance(code, int) else 0)
