"""``provisioner lock`` against a bare rattler solve of the same specs, whole processes.

Run from the repository root::

    .venv/bin/python benchmarks/bench_lock.py [--repeat 7] [--key torch-cu121-transformers]

The spec is the repository's own (``environment-specs/<key>.yml``: python 3.11,
pytorch with pytorch-cuda 12.1, transformers, accelerate) solved against the
offline snapshot of the pytorch, nvidia and conda-forge channels in
``tests/data/conda-mirror`` (``--channel-root``), so nothing is downloaded. Every
sample is a fresh interpreter (with bytecode, as an installed package has it), and
the kinds are interleaved, so start-up and import costs count as a user pays them:

* ``bare solve``: ``python -c`` importing rattler and solving the same specs with the
  same virtual packages and channel priority (what provisioner solves, no more);
* ``lock (unchanged)``: ``provisioner lock KEY`` over its existing, current lock (a
  relock that changes nothing: CI, pre-commit): solve, compare, no write;
* ``lock (write)``: the same with the lock removed first, so it is hashed and written
  by conda-lock (the one case that imports it).

It prints medians with [min-max] and the ratios to the bare solve (target: lock
<= 2x a bare solve). Nothing is asserted; it always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO / "tests" / "data" / "conda-mirror"
TARGET = 2.0

BARE = """
import asyncio, json, sys
import rattler
args = json.loads(sys.argv[1])
vps = [rattler.GenericVirtualPackage(rattler.PackageName(n), rattler.Version(v),
                                     rattler.BuildString(b)) for n, (v, b) in args["vps"].items()]
records = asyncio.run(rattler.solve(
    sources=[rattler.Channel(c) for c in args["channels"]],
    specs=[rattler.MatchSpec(s) for s in args["specs"]],
    platforms=[args["platform"], "noarch"], virtual_packages=vps,
    channel_priority=rattler.ChannelPriority.Strict))
print(len(records))
"""


def _bare_args(project: Path, key: str) -> str:
    """The specs, channels and virtual packages provisioner solves ``key`` with."""
    sys.path.insert(0, str(REPO))
    from provisioner.config import load_config
    from provisioner.lock.channels import resolve_channels
    from provisioner.lock.check import platform_virtual_packages
    from provisioner.lock.spec import load_spec
    from provisioner.lock.write import channel_specs

    config = load_config(project, channel_root=str(MIRROR), environ={})
    spec = load_spec(config.specs_dir, key)
    platform = spec.platforms[0]
    sources = resolve_channels(spec.channels, config)
    return json.dumps({
        "channels": [c.source for c in sources],
        "specs": channel_specs(spec.dependencies_for(platform), sources),
        "platform": platform,
        "vps": {n: list(v) for n, v in platform_virtual_packages(spec, platform).items()},
    })


def _time(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed:\n{result.stderr}")
    return seconds


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.3f} s [{min(values):.3f}-{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="samples per kind (>= 5)")
    parser.add_argument("--key", default="torch-cu121-transformers")
    opts = parser.parse_args()
    exe = Path(sys.executable).with_name("provisioner")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PROVISIONER_", "CONDA_")) and k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryDirectory(prefix="bench-lock-") as tmp:
        # Bytecode as an installed package has it (the warm-up run writes it), kept out of
        # the source tree; without it every run compiles provisioner's modules again.
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        project = Path(tmp) / "project"
        shutil.copytree(REPO / "environment-specs", project / "environment-specs")
        lock = project / "lockfiles" / f"{opts.key}.conda-lock.yml"
        lock.parent.mkdir()
        shutil.copy2(REPO / "lockfiles" / lock.name, lock)
        committed = lock.read_bytes()
        lock_argv = [str(exe), "lock", opts.key, "--skip-pip", "--channel-root", str(MIRROR),
                     "--no-progress"]
        bare_argv = [sys.executable, "-c", BARE, _bare_args(project, opts.key)]

        def write_run() -> float:
            lock.unlink()
            seconds = _time(lock_argv, project, env)
            assert lock.read_bytes() == committed, "the relock differs from the committed lock"
            return seconds

        kinds = {
            "bare solve": lambda: _time(bare_argv, project, env),
            "lock (unchanged)": lambda: _time(lock_argv, project, env),
            "lock (write)": write_run,
        }
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        for run in kinds.values():  # warm the OS caches and write bytecode, unmeasured
            run()
        for _ in range(max(5, opts.repeat)):
            for name, run in kinds.items():
                samples[name].append(run())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{opts.key}, {max(5, opts.repeat)} interleaved runs each, load {load:.1f}")
    bare = statistics.median(samples["bare solve"])
    for name, values in samples.items():
        ratio = statistics.median(values) / bare
        lo = min(values) / max(samples["bare solve"])
        hi = max(values) / min(samples["bare solve"])
        verdict = "" if name == "bare solve" else (
            f"  {ratio:.2f}x [{lo:.2f}-{hi:.2f}] {'PASS' if ratio <= TARGET else 'MISS'}")
        print(f"  {name:17} {_spread(values)}{verdict}")
    print(f"target: lock <= {TARGET:g}x a bare solve (ratio of medians; [worst-best pairing])")


if __name__ == "__main__":
    main()
