"""provisioner: shared, lock-pinned conda environments for GPU models.

The host application calls :func:`get_env_for_model` on every model load::

    from provisioner import get_env_for_model
    res = get_env_for_model("meta-llama/Llama-2-7b-hf", project="path/to/project")
    subprocess.run([res.python, "serve.py"])

Importing this package is light: it loads no solver, conda-lock or rich.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Resolution", "__version__", "get_env_for_model"]

if TYPE_CHECKING:
    from provisioner.resolve import Resolution, get_env_for_model


def __getattr__(name: str) -> Any:
    if name in ("get_env_for_model", "Resolution"):
        from provisioner import resolve

        return getattr(resolve, name)
    raise AttributeError(f"module 'provisioner' has no attribute {name!r}")
