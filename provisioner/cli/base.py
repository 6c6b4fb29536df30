"""The click group, shared options and output helpers, and the entry point."""

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
    EXIT_INTERNAL_ERROR,
    EXIT_USER_ERROR,
    ProvisionerError,
)

F = TypeVar("F", bound=Callable[..., Any])


def emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("provisioner")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


#: ``--json``: every command can print its result as JSON instead of text.
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def project_options(func: F) -> F:
    """Options every project-level command shares."""
    func = click.option(
        "--project", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Project directory holding environment-specs/ and lockfiles/ (default: cwd).",
    )(func)
    return func


def make_config(ctx: click.Context, project: Path | None, **overrides: Any) -> Config:
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


def show(as_json: bool, data: object, lines: list[str]) -> None:
    if as_json:
        emit_json(data)
    else:
        for line in lines:
            click.echo(line)


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
        # Exit codes tell user errors (2) from failures of the build or the tool (3).
        click.echo(f"error: {exc.message}", err=True)
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
