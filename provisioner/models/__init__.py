"""The models domain: which env runs a model, and the legacy venvs it replaces.

Owns model rules and key choice, ``get_env_for_model`` and its stat-keyed cache,
legacy venv discovery and health probes, migration, the inventory (``list``,
``health``, ``run``), ``doctor`` and the state file. Imports build, lock and the
shared core.
"""
