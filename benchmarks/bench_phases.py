"""Where a warm ``ensure`` spends its time, whole process: install / checks / promote / other.

Run from the repository root::

    .venv/bin/python benchmarks/bench_phases.py [--modules 400] [--repeat 5]
                                                [--baseline-src DIR] [--force-copy]

A temporary project holds the sample ``python``, ``--packages`` synthetic packages
and ``benchpy``, a ``noarch: python`` package of ``--modules`` modules (shipped
without ``.pyc``, like packages converted from wheels) that the spec lists under
``x-provisioner: imports``, so the import check compiles and runs real code.
Each run is a fresh interpreter (``python -c`` that calls ``ensure``) against a
warm package cache with the env removed; the parent measures its wall time and
the child times provisioner's own functions:

* install: the backend's ``install`` (rattler linking from the cache);
* checks: ``check_records``, ``find_staging_path``, the staged import check,
  stopping the build's leftover processes, and the check after promotion;
* promote: ``_promote`` (rename, or the copy with ``--force-copy``);
* other: the rest (interpreter start, imports, plan, lock, hashes, fingerprint).

With ``--baseline-src DIR`` (another checkout, e.g. the main worktree) the same
runs are interleaved with runs of that code (``PYTHONPATH=DIR``), for a before /
after table. ``PYTHONDONTWRITEBYTECODE`` is removed from the children's
environment, as on a user's machine. Nothing is asserted; it always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from provisioner import fsops, processes
from provisioner.build.layout import HomeLayout
from provisioner.config import CONFIG_FILE_NAME, SPECS_DIR_NAME, load_config
from provisioner.lock.platforms import host_platform
from provisioner.sample.packages import PackageFile, build_conda_package, index_channel
from provisioner.sample.stack import build_sample_channel, build_synthetic_channel

KEY = "bench-phases"
CHANNEL = "bench"
REPO = Path(__file__).resolve().parent.parent
PHASES = {
    "install": [("provisioner.build.backends", "RattlerBackend.install")],
    "checks": [("provisioner.build.ensure", "check_records"),
               ("provisioner.build.ensure", "find_staging_path"),
               ("provisioner.build.ensure", "check_imports"),
               ("provisioner.build.import_memo", "ImportCheck.run"),  # memo, or the check
               ("provisioner.build.orphans", "stop_build_processes"),
               ("provisioner.build.ensure", "_check_promoted")],
    "promote": [("provisioner.build.ensure", "_promote")],
}
CHILD = r"""
import importlib, json, sys, time
spent = {}
depth = [0]
def wrap(module, attr, label):
    try:
        owner = importlib.import_module(module)
    except ImportError:
        return  # older code without this module
    name = attr
    if "." in attr:
        cls, name = attr.split(".")
        owner = getattr(owner, cls, None)
    original = getattr(owner, name, None) if owner is not None else None
    if original is None:
        return
    def timed(*args, **kwargs):
        if depth[0]:  # nested in another timed call (old _check_promoted calls check_imports)
            return original(*args, **kwargs)
        depth[0] += 1
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            depth[0] -= 1
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
    setattr(owner, name, timed)
for label, targets in json.loads(sys.argv[3]).items():
    for module, attr in targets:
        wrap(module, attr, label)
from provisioner.build.ensure import ensure
from provisioner.config import load_config
result = ensure(load_config(sys.argv[1], home=sys.argv[2]), sys.argv[4])
assert result.action == "build", result.action
print(json.dumps(spent))
"""


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _module_source(i: int, lines: int) -> str:
    body = [f'"""benchpy module {i}."""', "", "import math", ""]
    for j in range(lines // 4):
        body += [f"def f_{j}(x, y={j}):", f"    return math.sqrt(x * x + y) + {j}", ""]
    body.append(f"VALUE = f_0({i})")
    return "\n".join(body) + "\n"


def make_project(root: Path, n_packages: int, n_modules: int, lines: int) -> Path:
    platform = host_platform()
    project = root / "project"
    channel = project / "channel"
    names = build_synthetic_channel(channel, n_packages, 40, platform, 2000)
    files = [PackageFile(f"site-packages/benchpy/m{i:04d}.py", _module_source(i, lines).encode())
             for i in range(n_modules)]
    init = "".join(f"from benchpy import m{i:04d}\n" for i in range(n_modules))
    files.append(PackageFile("site-packages/benchpy/__init__.py", init.encode()))
    build_conda_package(channel, "noarch", "benchpy", "1.0", "py_0", noarch="python",
                        depends=["python"], files=files)
    build_sample_channel(channel, [platform])  # also indexes the channel
    index_channel(channel)
    specs = project / SPECS_DIR_NAME
    specs.mkdir(parents=True)
    spec = {"name": KEY, "channels": [CHANNEL], "platforms": [platform],
            "dependencies": ["python", "benchpy", *names],
            "x-provisioner": {"imports": ["benchpy"]}}
    (specs / f"{KEY}.yml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    (project / CONFIG_FILE_NAME).write_text(
        f'home = "home"\n\n[channels]\n{CHANNEL} = "channel"\n', encoding="utf-8")
    from provisioner.lock.write import lock_envs

    lock_envs(load_config(project, environ={}), [KEY])
    return project


def run_once(project: Path, home: Path, src: Path, force_copy: bool) -> dict[str, float]:
    """One whole-process warm ensure with ``src`` on PYTHONPATH; the env is removed first."""
    layout = HomeLayout(home)
    key_dir = layout.key_dir(KEY)
    if key_dir.is_dir():
        for gen in key_dir.iterdir():
            if gen.is_dir():
                fsops.safe_rmtree(gen)
        fsops.remove_file(layout.pointer(KEY))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PROVISIONER_") and k not in ("PYTHONPATH",
                                                             "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPATH"] = str(src)
    if force_copy:
        env["PROVISIONER_FORCE_COPY"] = "1"
    start = time.perf_counter()
    result = processes.run([sys.executable, "-c", CHILD, str(project), str(home),
                            json.dumps(PHASES), KEY], timeout=1800, env=env, cwd=project)
    total = time.perf_counter() - start
    if not result.ok:
        raise RuntimeError(f"ensure failed ({src}):\n{result.stderr[-2000:]}")
    spent: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    spent = {k: spent.get(k, 0.0) for k in PHASES}
    spent["other"] = total - sum(spent.values())
    spent["total"] = total
    return spent


def _fmt(values: list[float]) -> str:
    return (f"{statistics.median(values):7.3f} s [{min(values):.3f}-{max(values):.3f}]"
            if values else "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=int, default=60)
    parser.add_argument("--modules", type=int, default=400)
    parser.add_argument("--module-lines", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="another checkout to compare with (PYTHONPATH for its runs)")
    parser.add_argument("--force-copy", action="store_true", help="promote by copy")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="provisioner-phases-"))
    try:
        project = make_project(root, args.packages, args.modules, args.module_lines)
        builds = {"after": REPO}
        if args.baseline_src is not None:
            builds = {"before": args.baseline_src.resolve(), **builds}
        times: dict[str, dict[str, list[float]]] = {b: {} for b in builds}
        for label, src in builds.items():  # first build of each fills the cache; not counted
            run_once(project, root / f"home-{label}", src, args.force_copy)
        for i in range(args.repeat):
            order = list(builds.items()) if i % 2 == 0 else list(reversed(builds.items()))
            for label, src in order:
                spent = run_once(project, root / f"home-{label}", src, args.force_copy)
                for phase, value in spent.items():
                    times[label].setdefault(phase, []).append(value)
        say(f"bench_phases: {args.packages} packages + benchpy ({args.modules} modules x "
            f"{args.module_lines} lines), repeat {args.repeat}, force-copy {args.force_copy}, "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        say(f"{'phase':10}" + "".join(f"{label:>32}" for label in builds))
        for phase in ("install", "checks", "promote", "other", "total"):
            say(f"{phase:10}" + "".join(f"{_fmt(times[b].get(phase, [])):>32}" for b in builds))
    finally:
        fsops.safe_rmtree(root, require_marker=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
