"""The sample project: a local channel, three specs, models.yml and a config, all offline.

``provisioner sample DIR`` and ``provisioner demo`` use it so that every command
can be tried without a conda channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from provisioner.config import CONFIG_FILE_NAME, SPECS_DIR_NAME, load_config
from provisioner.errors import UserError
from provisioner.lock.platforms import host_platform
from provisioner.sample.stack import SAMPLE_CHANNEL, SAMPLE_PLATFORMS, build_sample_channel


def sample_platforms() -> list[str]:
    """linux-64, win-64 and the host platform if it is neither."""
    return list(dict.fromkeys([*SAMPLE_PLATFORMS, host_platform()]))


def _sample_specs(platforms: list[str]) -> dict[str, dict[str, object]]:
    cu121 = ["python", "pytorch=2.2.1", "pytorch-cuda=12.1", "transformers", "accelerate"]
    provides = ["torch>=2.2", "transformers>=4.36", "accelerate>=0.26"]
    imports = ["torch", "transformers", "accelerate"]

    def spec(key: str, deps: list[str], own: dict[str, object]) -> dict[str, object]:
        return {"name": key, "channels": [SAMPLE_CHANNEL], "platforms": platforms,
                "dependencies": deps, "x-provisioner": own}

    return {
        "sample-cu121-transformers-bnb": spec(
            "sample-cu121-transformers-bnb", [*cu121, "bitsandbytes"],
            {"cuda": "12.1", "provides": [*provides, "bitsandbytes>=0.43", "cuda==12.1"],
             "imports": [*imports, "bitsandbytes"]}),
        "sample-cu121-transformers": spec(
            "sample-cu121-transformers", cu121,
            {"cuda": "12.1", "provides": [*provides, "cuda==12.1"], "imports": imports}),
        "sample-cpu-transformers": spec(
            "sample-cpu-transformers", ["python", "pytorch=2.2.1=*cpu*", "transformers"],
            {"provides": ["torch>=2.2", "transformers>=4.36"],
             "imports": ["torch", "transformers"]}),
    }


_MODELS_RULES = [
    {"model": "gpt2", "env": "sample-cpu-transformers"},
    {"model": "mistralai/Mistral-7B-v0.1", "env": "sample-cu121-transformers"},
    {"model": "meta-llama/*", "requires": ["bitsandbytes>=0.43", "cuda==12.1"]},
]
_CONFIG_TOML = f'home = ".provisioner-home"\n\n[channels]\n{SAMPLE_CHANNEL} = "channel"\n'


def write_sample_project(dest: Path, *, python_executable: str | None = None) -> list[Path]:
    """Write a sample project (channel, specs, models.yml, provisioner.toml) into ``dest``.

    Nothing is locked; returns the top-level paths written.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(
            f"{dest} already exists and is not an empty directory",
            hint="choose a new or empty directory for the sample project",
        )
    channel = build_sample_channel(dest / "channel", sample_platforms(), python_executable)
    specs_dir = dest / SPECS_DIR_NAME
    specs_dir.mkdir(parents=True, exist_ok=True)
    for key, data in _sample_specs(sample_platforms()).items():
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
        (specs_dir / f"{key}.yml").write_text(text, encoding="utf-8")
    (specs_dir / "models.yml").write_text(
        yaml.safe_dump({"rules": _MODELS_RULES}, sort_keys=False), encoding="utf-8"
    )
    config = dest / CONFIG_FILE_NAME
    config.write_text(_CONFIG_TOML, encoding="utf-8")
    return [channel, specs_dir, config]


@dataclass(frozen=True)
class SampleProject:
    """What ``provisioner sample`` wrote."""

    path: Path
    keys: tuple[str, ...]
    lockfiles: tuple[Path, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "keys": list(self.keys),
            "lockfiles": [str(p) for p in self.lockfiles],
        }


def create_sample_project(dest: Path, *, python_executable: str | None = None) -> SampleProject:
    """Write the sample project into ``dest`` and lock every spec against its local channel."""
    from provisioner.errors import UserError
    from provisioner.lock.write import lock_envs

    try:
        write_sample_project(dest, python_executable=python_executable)
    except OSError as exc:
        raise UserError(f"cannot write the sample project into {dest}: "
                        f"{exc.strerror} ({exc.filename})",
                        hint="choose a new directory you can write") from None
    outcomes = lock_envs(load_config(dest, environ={}))
    return SampleProject(
        path=Path(dest).absolute(),
        keys=tuple(o.key for o in outcomes),
        lockfiles=tuple(o.lockfile for o in outcomes),
    )
