"""``provisioner demo``: the four scenarios of a real model load, offline.

It builds the sample channel, specs and locks, creates one sample legacy venv,
and plays: (1) a model with a healthy old env; (2) a model with no env, so the
shared env is built in a temp prefix and promoted; (3) a second model with the
same key, reused at once; (4) a forced build failure that falls back to an old
env in degraded mode. Everything is real except the packages' contents.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from provisioner.config import Config, load_config
from provisioner.errors import UserError
from provisioner.models.inventory import Inventory, list_envs
from provisioner.models.resolve import Resolution, get_env_for_model
from provisioner.paths import os_path

log = logging.getLogger("provisioner.sample.demo")

HEALTHY_MODEL = "meta-llama/Llama-2-7b-hf"  # -> sample-cu121-transformers-bnb, has an old venv
NEW_MODEL = "mistralai/Mistral-7B-v0.1"  # -> sample-cu121-transformers, nothing built yet
SAME_KEY_MODEL = "mistralai/Mixtral-8x7B-v0.1"  # -> the same key, by a glob rule
DEGRADED_MODEL = "gpt2"  # -> sample-cpu-transformers, old venv with outdated transformers
DEMO_PROJECT = "demo-project"  # the sample project and its old venvs, inside the demo's home


@dataclass(frozen=True)
class Scenario:
    """One scenario's resolution."""

    title: str
    resolution: Resolution

    def to_dict(self) -> dict[str, object]:
        return {"title": self.title, **self.resolution.to_dict()}


@dataclass(frozen=True)
class DemoReport:
    """What the demo did and measured."""

    root: Path
    scenarios: tuple[Scenario, ...]
    build_seconds: float
    reuse_ms: float
    env_bytes: int
    hardlinked_bytes: int
    repeat_ms: float
    inventory: Inventory | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "home": str(self.root),
            "project": str(self.root / DEMO_PROJECT),
            "scenarios": [s.to_dict() for s in self.scenarios],
            "build_seconds": round(self.build_seconds, 3),
            "reuse_ms": round(self.reuse_ms, 3),
            "repeat_ms": round(self.repeat_ms, 3),
            "env_bytes": self.env_bytes,
            "hardlinked_bytes": self.hardlinked_bytes,
            "inventory": self.inventory.to_dict() if self.inventory else None,
        }


def _prepare(root: Path) -> Config:
    from provisioner.sample.legacy_venvs import make_legacy_venv
    from provisioner.sample.project import create_sample_project

    project = root / DEMO_PROJECT
    log.info("demo: writing the sample channel, specs and locks into %s", project)
    create_sample_project(project)
    with (project / "environment-specs" / "models.yml").open("a", encoding="utf-8") as fh:
        fh.write("- model: mistralai/*\n  requires: [transformers>=4.36, cuda==12.1]\n")
    config = load_config(project, home=root, environ={})
    assert config.legacy_root is not None
    log.info("demo: creating old per-model venvs under %s", config.legacy_root)
    make_legacy_venv(config.legacy_root, HEALTHY_MODEL, {
        "torch": "2.2.1", "transformers": "4.40.0", "accelerate": "0.26.1",
        "bitsandbytes": "0.43.1"})
    make_legacy_venv(config.legacy_root, DEGRADED_MODEL, {
        "torch": "2.2.1", "transformers": "4.30.0"}, cuda=None)
    return config


def run_demo(root: Path | None = None) -> DemoReport:
    """Play the four scenarios with ``root`` as the home (default: a new temp dir) and report.

    The envs are built in ``root`` itself (it is the demo's home), the sample project
    and its old venvs go to ``root/demo-project``. ``root`` must be new or empty: the
    demo must never mix its sample models into a real home's state.
    """
    from provisioner import fsops

    if root is None:
        root = Path(tempfile.mkdtemp(prefix="provisioner-demo-"))
    elif root.exists() and any(root.iterdir()):
        raise UserError(f"{root} is not empty; the demo needs a new or empty home",
                        hint="give --home a new or empty directory (or unset PROVISIONER_HOME)")
    root = root.absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the demo directory {root}: {exc.strerror}",
                        hint="give --home a new directory you can write") from None
    if "CONDA_OVERRIDE_CUDA" not in os.environ:
        # The sample CUDA keys need a CUDA 12.1 driver; pretend one, as CI runners do.
        os.environ["CONDA_OVERRIDE_CUDA"] = "12.1"
        log.info("demo: no CUDA override set; using CONDA_OVERRIDE_CUDA=12.1")
    config = _prepare(root)
    scenarios = []

    log.info("demo (1/4): %s has a healthy old per-model env", HEALTHY_MODEL)
    scenarios.append(Scenario("healthy old env", get_env_for_model(HEALTHY_MODEL, config=config)))

    log.info("demo (2/4): %s has no env yet", NEW_MODEL)
    t0 = time.monotonic()
    built = get_env_for_model(NEW_MODEL, config=config)
    build_seconds = time.monotonic() - t0
    scenarios.append(Scenario("new shared env built and promoted", built))

    log.info("demo (3/4): %s needs the same key", SAME_KEY_MODEL)
    t0 = time.monotonic()
    reused = get_env_for_model(SAME_KEY_MODEL, config=config)
    reuse_ms = (time.monotonic() - t0) * 1000
    scenarios.append(Scenario("same key reused", reused))

    log.info("demo (4/4): %s, and its channel mirror is unreachable (forced failure)",
             DEGRADED_MODEL)
    broken_mirror = root / DEMO_PROJECT / "unreachable-mirror"
    failing = config.with_overrides(channel_mirrors={"provisioner-sample": str(broken_mirror)})
    broken_mirror.mkdir()
    scenarios.append(Scenario("build failed, old env in degraded mode",
                              get_env_for_model(DEGRADED_MODEL, config=failing)))

    t0 = time.monotonic()
    get_env_for_model(SAME_KEY_MODEL, config=config)
    repeat_ms = (time.monotonic() - t0) * 1000
    env_bytes = fsops.tree_size(Path(built.prefix))
    linked = _hardlinked_bytes(Path(built.prefix))
    inventory = list_envs(config)
    return DemoReport(root, tuple(scenarios), build_seconds, reuse_ms, env_bytes, linked,
                      repeat_ms, inventory)


def _hardlinked_bytes(prefix: Path) -> int:
    """Bytes of regular files in ``prefix`` that share their inode with the package cache."""
    total = 0
    for dirpath, _dirs, files in os.walk(os_path(prefix)):  # \\?\ on Windows: long paths
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1 and not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total
