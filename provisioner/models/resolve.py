"""``get_env_for_model``: which Python runs this model? Asked on every model load.

The chain, each step logged in one plain line:

1. a ready shared env for the model's key (fingerprint matches the lock);
2. a healthy legacy per-model venv (policy ``prefer``);
3. build the shared env (``ensure``); a stale one is rebuilt, and its old
   generation serves if the rebuild fails;
4. a legacy venv that passes the lenient check, in degraded mode.

The hot path (a ready env, or a legacy venv with a cached health result) spawns
no subprocess and imports neither rattler, conda-lock nor rich: it costs a few
``stat`` calls and small JSON reads, with model->key and lock hashes cached in
the state file by the stat signatures of their inputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.build.layout import HomeLayout, python_path
from provisioner.config import Config, load_config
from provisioner.errors import ProvisionerError, ResolutionError
from provisioner.lock.platforms import host_platform
from provisioner.models.legacy import LegacyEnv, legacy_for_model
from provisioner.models.resolve_cache import active_env, cached_health, cached_key, cached_lock_hash
from provisioner.models.state import StateFile

log = logging.getLogger("provisioner.models.resolve")
LAST_USED_RESOLUTION_S = 60.0


@dataclass(frozen=True)
class Attempt:
    """One step of the fallback chain and how it went."""

    step: str
    outcome: str  # "used", "skipped", "failed", "unavailable"
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"step": self.step, "outcome": self.outcome, "detail": self.detail}


@dataclass(frozen=True)
class Resolution:
    """The answer for one model load."""

    model_id: str
    env_key: str
    python: str
    prefix: str
    source: str  # shared | legacy | legacy-degraded
    migration_target: str | None = None
    attempts: tuple[Attempt, ...] = ()
    seconds: float = 0.0
    generation: str | None = None
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "model_id": self.model_id, "env_key": self.env_key, "python": self.python,
            "prefix": self.prefix, "source": self.source,
            "migration_target": self.migration_target, "generation": self.generation,
            "attempts": [a.to_dict() for a in self.attempts], "seconds": round(self.seconds, 6),
        }


class _Trail:
    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    def add(self, step: str, outcome: str, detail: str) -> None:
        self.attempts.append(Attempt(step, outcome, detail))
        log.info("%s: %s (%s)", step, outcome, detail)


def get_env_for_model(
    model_id: str,
    *,
    project: Path | str | None = None,
    home: Path | str | None = None,
    policy: str | None = None,
    config: Config | None = None,
    build: bool = True,
) -> Resolution:
    """Return the Python environment that should run ``model_id``; never breaks a working setup."""
    start = time.monotonic()
    cfg = config or load_config(project, home=home)
    if policy is not None:
        from provisioner.config import LEGACY_POLICIES

        if policy not in LEGACY_POLICIES:
            raise ResolutionError(f"unknown legacy policy {policy!r}",
                                  hint=f"choose one of {', '.join(LEGACY_POLICIES)}")
        cfg = cfg.with_overrides(legacy_policy=policy)
    state = StateFile(HomeLayout(cfg.home).state_file)
    try:
        result = _resolve(cfg, state, model_id, build, start)
    finally:
        state.save()
    return result


def _legacy_resolution(model_id: str, key: str, env: LegacyEnv, source: str, trail: _Trail,
                       start: float) -> Resolution:
    return Resolution(
        model_id=model_id, env_key=key, python=str(env.python), prefix=str(env.venv),
        source=source, migration_target=key or None, attempts=tuple(trail.attempts),
        seconds=time.monotonic() - start,
    )


def _shared_resolution(model_id: str, key: str, prefix: Path, gen: str, trail: _Trail,
                       start: float) -> Resolution:
    return Resolution(
        model_id=model_id, env_key=key, python=str(python_path(prefix)), prefix=str(prefix),
        source="shared", attempts=tuple(trail.attempts), seconds=time.monotonic() - start,
        generation=gen,
    )


def _resolve(cfg: Config, state: StateFile, model_id: str, build: bool,
             start: float) -> Resolution:
    trail = _Trail()
    try:
        key, provides, imports = cached_key(cfg, state, model_id)
    except ProvisionerError as exc:
        # No env key for this model (no rule, or a broken models.yml): a working old venv
        # must still serve it.
        return _legacy_without_key(cfg, state, model_id, exc, trail, start)
    platform = host_platform()
    policy = cfg.legacy_policy
    lock_hash = cached_lock_hash(cfg, state, key, platform)
    active = active_env(cfg, key)
    built = f"built from {(active[2] or '-')[:12]}" if active else "none"
    log.debug("%s: env key %s, legacy policy %s, lock %s, active env %s", model_id, key, policy,
              (lock_hash or "-")[:12], built)
    stale: tuple[Path, str] | None = None
    if active is not None:
        prefix, gen, built_from = active
        if lock_hash is not None and built_from == lock_hash:
            trail.add("shared env", "used", f"{key} generation {gen} is ready")
            return _remember(state, _shared_resolution(model_id, key, prefix, gen, trail, start))
        stale = (prefix, gen)
        trail.add("shared env", "unavailable", f"{key} generation {gen} is stale (lock changed)")
    else:
        trail.add("shared env", "unavailable", f"{key} has no ready env")

    legacy = None if policy == "ignore" else legacy_for_model(
        cfg.legacy_root, model_id, cfg.legacy_models)
    health = None
    if legacy is not None and policy == "prefer":
        health, cached = cached_health(cfg, state, legacy, provides, imports)
        note = " (cached)" if cached else ""
        if health.status == "healthy":
            trail.add("legacy env", "used", f"{legacy.venv} is healthy{note}")
            log.info("using healthy old per-model environment (migration fallback); "
                     "delete %s after 'provisioner migrate --model %s'", legacy.root, model_id)
            return _remember(state, _legacy_resolution(model_id, key, legacy, "legacy",
                                                       trail, start))
        trail.add("legacy env", "skipped",
                  f"{legacy.venv} is {health.status}: {'; '.join(health.reasons) or '-'}{note}")
    elif policy == "prefer":
        trail.add("legacy env", "unavailable", f"no legacy venv for {model_id}")

    if not build:
        raise ResolutionError(f"no ready env for model '{model_id}' and building is disabled",
                              hint=_attempts_hint(trail))
    build_error: ProvisionerError | None = None
    try:
        from provisioner.build.ensure import ensure

        result = ensure(cfg, key)
        trail.add("build shared env", "used", f"{result.action} {key} in {result.seconds:.2f} s")
        return _remember(state, _shared_resolution(model_id, key, result.prefix,
                                                   result.generation, trail, start))
    except ProvisionerError as exc:
        build_error = exc
        trail.add("build shared env", "failed", (exc.message.splitlines() or ["-"])[0])
    except OSError as exc:  # a filesystem failure must not break a load that an old env serves
        trail.add("build shared env", "failed", f"{type(exc).__name__}: {exc}")
    if stale is not None:
        trail.add("stale shared env", "used", f"old generation {stale[1]} serves until a rebuild "
                                              "succeeds")
        return _remember(state, _shared_resolution(model_id, key, stale[0], stale[1],
                                                   trail, start))
    if legacy is not None and policy != "ignore":
        if health is None or policy == "fallback":
            health, _cached = cached_health(cfg, state, legacy, provides, imports)
        if health.status == "healthy":
            trail.add("legacy env", "used", f"{legacy.venv} is healthy")
            log.info("new env creation failed, using healthy old per-model environment")
            return _remember(state, _legacy_resolution(model_id, key, legacy, "legacy",
                                                       trail, start))
        if health.lenient:
            trail.add("legacy env (lenient)", "used", f"{legacy.venv} passes the lenient check")
            log.warning("new env creation failed, using old environment in degraded mode")
            return _remember(state, _legacy_resolution(model_id, key, legacy, "legacy-degraded",
                                                       trail, start))
        trail.add("legacy env (lenient)", "failed", f"{legacy.venv} is {health.status}")
    raise ResolutionError(
        f"no environment can serve model '{model_id}': "
        + "; ".join(f"{a.step}: {a.outcome} ({a.detail})" for a in trail.attempts),
        hint=build_error.hint if build_error and build_error.hint else _attempts_hint(trail),
    )


def _legacy_without_key(cfg: Config, state: StateFile, model_id: str, error: ProvisionerError,
                        trail: _Trail, start: float) -> Resolution:
    trail.add("env key", "failed", error.message.splitlines()[0])
    legacy = None if cfg.legacy_policy == "ignore" else legacy_for_model(
        cfg.legacy_root, model_id, cfg.legacy_models)
    if legacy is None:
        raise error
    health, _cached = cached_health(cfg, state, legacy, (), ("torch",))
    if not health.lenient:
        trail.add("legacy env (lenient)", "failed", f"{legacy.venv} is {health.status}")
        raise error
    trail.add("legacy env (lenient)", "used",
              f"{legacy.venv} imports torch; no key to check it against")
    log.warning("no shared env serves %s (%s); using old environment in degraded mode",
                model_id, error.message.splitlines()[0])
    return _remember(state, _legacy_resolution(model_id, "", legacy, "legacy-degraded",
                                               trail, start))


def _attempts_hint(trail: _Trail) -> str:
    return "run 'provisioner ensure KEY' to see the build error in full"


def _remember(state: StateFile, res: Resolution) -> Resolution:
    """Record the resolution; last_used is refreshed at most once a minute (no write per load)."""
    models = state.section("models")
    old = models.get(res.model_id)
    now = time.time()
    entry = {"env_key": res.env_key, "source": res.source, "python": res.python,
             "prefix": res.prefix, "migration_target": res.migration_target,
             "generation": res.generation}
    if isinstance(old, dict) and all(old.get(k) == v for k, v in entry.items()) and \
            now - float(old.get("last_used", 0)) < LAST_USED_RESOLUTION_S:
        return res
    state.put("models", res.model_id, {**entry, "last_used": now})
    return res
