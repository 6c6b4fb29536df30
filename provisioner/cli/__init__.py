"""The command-line skin: parse options, call one library function, render text or JSON.

Nothing below this package prints or exits; errors arrive as
:class:`~provisioner.errors.ProvisionerError` and become one-line messages with
a hint and an exit code (2 for user errors, 3 for internal ones). Command
modules import the library lazily, inside each command, so that
``provisioner resolve`` stays on the hot path's budget.
"""

from __future__ import annotations

from provisioner.cli import build, lock, models, sample  # noqa: F401  (registers the commands)
from provisioner.cli.base import cli, main

__all__ = ["cli", "main"]
