"""Commands of the models domain: resolve, migrate, list, health, run, doctor."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from provisioner.cli.base import (
    cli,
    emit_json,
    json_option,
    make_config,
    options,
    project_options,
    show,
)
from provisioner.errors import EXIT_CHECK_FAILED


@cli.command("resolve")
@click.argument("model")
@project_options
@click.option("--policy", type=click.Choice(["prefer", "fallback", "ignore"]), default=None,
              help="How legacy per-model venvs are used (default: config, else prefer).")
@click.option("--no-build", is_flag=True, help="Never build; fail if nothing is ready.")
@json_option
@click.pass_context
def resolve_cmd(ctx: click.Context, model: str, project: Path | None, policy: str | None,
                no_build: bool, as_json: bool) -> None:
    """Print the python that should run MODEL (building its shared env if needed)."""
    from provisioner.models.resolve import get_env_for_model

    result = get_env_for_model(model, config=make_config(ctx, project), policy=policy,
                               build=not no_build)
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(result.python)


@cli.command("migrate")
@project_options
@click.option("--model", default=None, help="Migrate this model's legacy venv.")
@click.option("--all", "all_", is_flag=True, help="Migrate every legacy venv.")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--delete-legacy", is_flag=True,
              help="Delete each legacy local_<id> dir once its shared env is healthy.")
@json_option
@click.pass_context
def migrate_cmd(ctx: click.Context, project: Path | None, model: str | None, all_: bool,
                dry_run: bool, delete_legacy: bool, as_json: bool) -> None:
    """Move legacy per-model venvs onto verified shared envs; exit 1 if any is kept."""
    from provisioner.models.migrate import migrate, render_report_text

    if (model is None) == (not all_):
        raise click.UsageError("pass exactly one of --model MODEL or --all")
    report = migrate(make_config(ctx, project), model=model, all_=all_, dry_run=dry_run,
                     delete_legacy=delete_legacy)
    show(as_json, report.to_dict(), render_report_text(report))
    if not report.ok:
        ctx.exit(EXIT_CHECK_FAILED)


@cli.command("list")
@project_options
@click.option("--no-probe", is_flag=True, help="Only cached legacy health; never probe.")
@json_option
@click.pass_context
def list_cmd(ctx: click.Context, project: Path | None, no_probe: bool, as_json: bool) -> None:
    """List shared envs (every generation) and legacy venvs, with sizes and health."""
    from provisioner.models.inventory import list_envs, render_inventory_text

    inventory = list_envs(make_config(ctx, project), probe=not no_probe)
    show(as_json, inventory.to_dict(), render_inventory_text(inventory))


@cli.command("health")
@click.argument("key", required=False)
@project_options
@click.option("--legacy", is_flag=True, help="Probe every legacy venv instead.")
@json_option
@click.pass_context
def health_cmd(ctx: click.Context, key: str | None, project: Path | None, legacy: bool,
               as_json: bool) -> None:
    """Probe KEY's env strictly (default: every built key); exit 1 if any is unhealthy."""
    from provisioner.models.inventory import health, render_health_text

    rows = health(make_config(ctx, project), key, legacy=legacy)
    ok = all(r.healthy for r in rows)
    show(as_json, {"ok": ok, "envs": [r.to_dict() for r in rows]}, render_health_text(rows))
    if not ok:
        ctx.exit(EXIT_CHECK_FAILED)


class _RunCommand(click.Command):
    """``run MODEL [OPTIONS] -- CMD [ARGS]``: everything after ``--`` is the child's."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            at = args.index("--")
            args, ctx.meta["provisioner.run.argv"] = args[:at], tuple(args[at + 1:])
        return super().parse_args(ctx, args)


@cli.command("run", cls=_RunCommand)
@click.argument("model")
@project_options
@click.option("--policy", type=click.Choice(["prefer", "fallback", "ignore"]), default=None,
              help="How legacy per-model venvs are used (default: config, else prefer).")
@click.option("--no-build", is_flag=True, help="Never build; fail if nothing is ready.")
@click.pass_context
def run_cmd(ctx: click.Context, model: str, project: Path | None, policy: str | None,
            no_build: bool) -> None:
    """Run a command with MODEL's env first on PATH: run MODEL [OPTIONS] -- CMD [ARGS].

    Options before -- are provisioner's, everything after it is the command's.
    provisioner's own log lines stay out of the command's stderr unless -v.
    """
    from provisioner.models.inventory import run_in_env

    if not options(ctx).verbose:
        logging.getLogger("provisioner").setLevel(logging.ERROR)
    argv = ctx.meta.get("provisioner.run.argv", ())
    ctx.exit(run_in_env(make_config(ctx, project), model, argv, policy=policy,
                        build=not no_build))


@cli.command("doctor")
@project_options
@json_option
@click.pass_context
def doctor_cmd(ctx: click.Context, project: Path | None, as_json: bool) -> None:
    """Report platform, python, CUDA driver, backends, free disk and paths."""
    from provisioner.models.doctor import doctor, render_doctor_text

    report = doctor(make_config(ctx, project))
    show(as_json, report.to_dict(), render_doctor_text(report))
