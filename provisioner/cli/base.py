"""The click group, the global options, output helpers, and the entry point.

Global options (``--home``, ``-v``, ``-q``, ``--color``, ``--no-progress``) are
accepted before or after the subcommand: the group adds a copy of each to every
command, and both copies write into one :class:`GlobalOptions` on the root context.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from provisioner import __version__
from provisioner.config import Config, load_config
from provisioner.errors import (
    EXIT_INTERNAL_ERROR,
    EXIT_USER_ERROR,
    ProvisionerError,
    environment_error,
)

F = TypeVar("F", bound=Callable[..., Any])

EPILOG = """\b
Exit codes:
  0  ok
  1  a check failed (lock --check, verify, health, migrate)
  2  a user or environment problem (one error line and a hint)
  3  a bug in provisioner (rerun with PROVISIONER_DEBUG=1 and report it)

\b
Global options work before or after the command:
  provisioner ensure KEY --home DIR
"""

#: Logger for the output of the tools provisioner runs (uv, probes, git): shown at ``-vv``.
TOOLS_LOGGER = "provisioner.tools"
#: What ``-vv`` puts in ``RUST_LOG`` (unless set) for uv and other Rust tools.
RUST_LOG_DETAIL = "uv=debug,rattler=debug"


@dataclass
class GlobalOptions:
    """The global options, wherever on the command line they were given."""

    home: Path | None = None
    verbose: int = 0
    quiet: bool = False
    color: str = "auto"
    progress: bool = True

    @property
    def color_flag(self) -> bool | None:
        """click's ``color``: True/False forced, None lets click decide by the terminal."""
        if self.color == "always":
            return True
        if self.color == "never" or os.environ.get("NO_COLOR"):
            return False
        return None


_current = GlobalOptions()


def options(ctx: click.Context) -> GlobalOptions:
    """The global options of this invocation."""
    root = ctx.find_root()
    if not isinstance(root.obj, GlobalOptions):
        root.obj = GlobalOptions()
    return root.obj


def emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str), color=False)


def _apply(ctx: click.Context, opts: GlobalOptions) -> None:
    global _current
    _current = opts
    ctx.color = opts.color_flag
    level = logging.WARNING if opts.quiet else (logging.DEBUG if opts.verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("provisioner")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # -v is provisioner's own decisions; the tools' chatter needs -vv.
    tools = logging.getLogger(TOOLS_LOGGER)
    tools.setLevel(logging.DEBUG if opts.verbose >= 2 else max(level, logging.INFO))
    if opts.verbose >= 2:
        os.environ.setdefault("RUST_LOG", RUST_LOG_DETAIL)


def _store(field: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        opts = options(ctx)
        if value in (None, False, 0):
            _apply(ctx, opts)
            return
        if field == "home":
            opts.home = Path(value).absolute()
        elif field == "verbose":
            opts.verbose += int(value)
        elif field == "quiet":
            opts.quiet = True
        elif field == "color":
            opts.color = str(value)
        elif field == "no_progress":
            opts.progress = False
        _apply(ctx, opts)

    return callback


def global_params(*, top: bool) -> list[click.Parameter]:
    """Fresh copies of the global options (the group's reads ``PROVISIONER_HOME``)."""
    def opt(decls: list[str], field: str, **kwargs: Any) -> click.Option:
        return click.Option(decls, expose_value=False, callback=_store(field), **kwargs)

    return [
        opt(["--home"], "home", type=click.Path(file_okay=False, path_type=Path),
            envvar="PROVISIONER_HOME" if top else None, metavar="DIR",
            help="Root for built envs (env: PROVISIONER_HOME)."),
        opt(["-v", "--verbose"], "verbose", count=True,
            help="-v: provisioner's decisions (debug); -vv: also uv's and rattler's detail."),
        opt(["-q", "--quiet"], "quiet", is_flag=True, help="Only warnings and errors on stderr."),
        opt(["--color"], "color", type=click.Choice(["auto", "always", "never"]), default=None,
            help="Colour output (default auto: on a terminal, unless NO_COLOR is set)."),
        opt(["--no-progress"], "no_progress", is_flag=True,
            help="No progress (bars on a terminal, one line per phase otherwise)."),
    ]


class ProvisionerGroup(click.Group):
    """A group whose commands also accept the global options."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(global_params(top=False))
        super().add_command(cmd, name)


#: ``--json``: every command can print its result as JSON instead of text.
json_option = click.option("--json", "as_json", is_flag=True,
                           help="One JSON object on stdout (schema: docs/schemas/).")


def project_options(func: F) -> F:
    """Options every project-level command shares."""
    func = click.option(
        "--project", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Project directory holding environment-specs/ and lockfiles/ (default: cwd).",
    )(func)
    return func


def make_config(ctx: click.Context, project: Path | None, **overrides: Any) -> Config:
    config = load_config(
        project,
        home=overrides.get("home") or options(ctx).home,
        channel_root=overrides.get("channel_root"),
        backend=overrides.get("backend"),
    )
    logging.getLogger("provisioner.cli").debug("project %s, home %s, backend %s",
                                               config.project, config.home,
                                               config.backend or "default")
    return config


def status(word: str, ok: bool) -> str:
    """A status word, green when good and red when not (where colour is on)."""
    return click.style(word, fg="green" if ok else "red", bold=not ok)


@click.group(cls=ProvisionerGroup, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="provisioner")
def cli() -> None:
    """Shared, lock-pinned conda environments for GPU models."""


cli.params.extend(global_params(top=True))


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion_cmd(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash: eval "$(provisioner completion bash)"   (in ~/.bashrc)
    zsh:  eval "$(provisioner completion zsh)"    (in ~/.zshrc)
    fish: provisioner completion fish > ~/.config/fish/completions/provisioner.fish
    """
    from click.shell_completion import get_completion_class

    completion = get_completion_class(shell)
    assert completion is not None  # click ships all three
    click.echo(completion(cli, {}, "provisioner", "_PROVISIONER_COMPLETE").source())


def show(as_json: bool, data: object, lines: list[str]) -> None:
    if as_json:
        emit_json(data)
    else:
        for line in lines:
            click.echo(line)


def _wants_json(args: Sequence[str]) -> bool:
    before = args[: list(args).index("--")] if "--" in args else args
    return "--json" in before


def _fail(as_json: bool, kind: str, message: str, hint: str | None, code: int,
          usage: click.ClickException | None = None) -> int:
    """Report an error: text on stderr, and with --json one error object on stdout."""
    color = _current.color_flag
    if usage is not None:
        usage.show()
    else:
        click.echo(click.style("error:", fg="red", bold=True) + f" {message}", err=True,
                   color=color)
        if hint:
            click.echo(f"hint: {hint}", err=True, color=color)
    if as_json:
        emit_json({"error": {"type": kind, "message": message, "hint": hint,
                             "exit_code": code}})
    return code


def _interrupted(as_json: bool, exc: KeyboardInterrupt) -> int:
    """SIGINT (130), or SIGTERM during a build (``errors.Interrupted``, 143): one line."""
    code: int = getattr(exc, "exit_code", 130)
    return _fail(as_json, type(exc).__name__,
                 f"interrupted (exit {code}): stopped; any build in progress was cleaned up",
                 None, code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and turn errors into exit codes."""
    global _current
    _current = GlobalOptions()
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(args)
    try:
        code = cli.main(args=args, prog_name="provisioner", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        hint = (f"see '{exc.ctx.command_path} --help'"
                if isinstance(exc, click.UsageError) and exc.ctx else None)
        code = _fail(as_json, type(exc).__name__, exc.format_message(), hint, EXIT_USER_ERROR,
                     usage=exc)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # click wraps Ctrl-C (and SIGTERM)
            code = _interrupted(as_json, exc.__context__)
        else:
            code = _fail(as_json, "Abort", "aborted", None, EXIT_USER_ERROR)
    except ProvisionerError as exc:
        if os.environ.get("PROVISIONER_DEBUG") and exc.exit_code != EXIT_USER_ERROR:
            raise
        code = _fail(as_json, type(exc).__name__, exc.message, exc.hint, exc.exit_code)
    except KeyboardInterrupt as exc:
        code = _interrupted(as_json, exc)
    except Exception as exc:
        # A full disk, a read-only home or a denied permission is no bug: exit 2.
        problem = environment_error(exc) if isinstance(exc, OSError) else None
        if problem is not None:
            sys.exit(_fail(as_json, type(problem).__name__, problem.message, problem.hint,
                           problem.exit_code))
        if os.environ.get("PROVISIONER_DEBUG"):
            raise
        code = _fail(as_json, type(exc).__name__, f"internal error: {type(exc).__name__}: {exc}",
                     "rerun with PROVISIONER_DEBUG=1 for a traceback and report it",
                     EXIT_INTERNAL_ERROR)
    sys.exit(code if isinstance(code, int) else 0)
