"""provisioner: shared, lock-pinned conda environments for GPU models.

The host application calls :func:`get_env_for_model` on every model load::

    from provisioner import get_env_for_model
    res = get_env_for_model("meta-llama/Llama-2-7b-hf", project="path/to/project")
    subprocess.run([res.python, "serve.py"])

The public API, re-exported here and loaded only when first used (importing
this package loads no solver, conda-lock or rich):

* models → envs: :func:`get_env_for_model` and its :class:`Resolution`;
  :func:`list_envs`, :func:`migrate`.
* building: :func:`ensure` with :class:`EnsureOptions` and :class:`EnsureResult`;
  :func:`verify_env`, :func:`collect_garbage`; :func:`lease` (a :class:`Lease`)
  keeps the generation a host app runs from safe from ``gc``.
* locking: :func:`lock_envs`, :func:`check_locks`.
* configuration and errors: :func:`load_config`, :class:`Config`,
  :class:`ProvisionerError` (every error carries a ``hint`` and an ``exit_code``).

The packages behind them are described in ``docs/architecture.md``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it; imported on first attribute access
_EXPORTS = {
    "get_env_for_model": "provisioner.models.resolve",
    "Resolution": "provisioner.models.resolve",
    "list_envs": "provisioner.models.inventory",
    "migrate": "provisioner.models.migrate",
    "ensure": "provisioner.build.ensure",
    "EnsureOptions": "provisioner.build.ensure",
    "EnsureResult": "provisioner.build.ensure",
    "verify_env": "provisioner.build.maintenance",
    "collect_garbage": "provisioner.build.maintenance",
    "lock_envs": "provisioner.lock.write",
    "check_locks": "provisioner.lock.check",
    "load_config": "provisioner.config",
    "Config": "provisioner.config",
    "ProvisionerError": "provisioner.errors",
    "lease": "provisioner.build.leases",
    "Lease": "provisioner.build.leases",
}
__all__ = [
    "Config", "EnsureOptions", "EnsureResult", "Lease", "ProvisionerError", "Resolution",
    "__version__", "check_locks", "collect_garbage", "ensure", "get_env_for_model", "lease",
    "list_envs", "load_config", "lock_envs", "migrate", "verify_env",
]

if TYPE_CHECKING:
    from provisioner.build.ensure import EnsureOptions, EnsureResult, ensure
    from provisioner.build.leases import Lease, lease
    from provisioner.build.maintenance import collect_garbage, verify_env
    from provisioner.config import Config, load_config
    from provisioner.errors import ProvisionerError
    from provisioner.lock.check import check_locks
    from provisioner.lock.write import lock_envs
    from provisioner.models.inventory import list_envs
    from provisioner.models.migrate import migrate
    from provisioner.models.resolve import Resolution, get_env_for_model


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'provisioner' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
