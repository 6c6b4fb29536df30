"""Commands of the sample domain: sample, demo."""

from __future__ import annotations

from pathlib import Path

import click

from provisioner.cli.base import cli, emit_json, json_option, options


@cli.command("sample")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@json_option
def sample_cmd(dest: Path, as_json: bool) -> None:
    """Write a ready, offline sample project (local channel, specs, locks) into DEST."""
    from provisioner.sample.project import create_sample_project

    result = create_sample_project(dest.absolute())
    if as_json:
        emit_json(result.to_dict())
        return
    click.echo(f"sample project written to {dest}")
    for key in result.keys:
        click.echo(f"  locked {key}")
    click.echo(f"try: cd {dest} && provisioner lock --check")


@cli.command("demo")
@json_option
@click.pass_context
def demo_cmd(ctx: click.Context, as_json: bool) -> None:
    """Play the four model-load scenarios offline, with a sample channel and an old venv.

    The demo's home is --home (or PROVISIONER_HOME), which must be new or empty;
    without either, a new temp dir.
    """
    from provisioner.sample.demo import DEMO_PROJECT, run_demo

    report = run_demo(options(ctx).home)
    if as_json:
        emit_json(report.to_dict())
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
    click.echo(f"demo home (envs, package cache, state): {report.root}")
    click.echo(f"demo project (specs, locks, old venvs): {report.root / DEMO_PROJECT}")
    if report.inventory is not None:
        from provisioner.models.inventory import render_inventory_text

        click.echo("")
        click.echo("provisioner list:")
        for line in render_inventory_text(report.inventory):
            click.echo(line)
