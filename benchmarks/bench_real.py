"""Real-size benchmark: a GPU stack from real wheels, served over HTTP, whole processes.

Opt-in (never run by the test suite). From the repository root::

    .venv/bin/python benchmarks/bench_real.py [--quick] [--repeats 5] [--latency-ms 20]
                                              [--bandwidth-mb 200] [--herd 8] [--yes]

1. Resolves the stack with pip (``pip install --dry-run --report`` for this Python,
   ``--only-binary=:all:``), prints what it will download and the disk it needs, then
   downloads the wheels with ``pip download --no-deps`` into ``--cache-dir`` (default
   ``~/.cache/provisioner-bench``; pip takes local copies where it has them).
   Full stack: torch 2.14.1 with its CUDA 13 ``nvidia-*`` wheels and triton (this channel's
   CUDA is 13, not 12.1: what matters here is real size and real files), numpy,
   transformers, tokenizers, safetensors, huggingface_hub, accelerate, bitsandbytes and
   their dependencies. ``--quick``: torch 2.13.0 CPU, numpy, transformers, tokenizers,
   safetensors, huggingface_hub.
2. Converts each wheel to a ``.conda`` package (``benchmarks/wheel_conda.py``), adds the
   sample stack's ``python`` and indexes the channel with rattler (cached between runs).
3. Serves the channel on 127.0.0.1 with ``--latency-ms`` per request and ``--bandwidth-mb``
   MB/s shared by all connections, and measures whole processes, ``--repeats`` times,
   interleaved (the order alternates), as median [min-max]:
   ``lock`` vs a bare rattler solve; cold ``ensure`` vs a bare rattler install from the same
   server with an empty cache; warm ``ensure`` vs a bare rattler install (same package
   cache) vs ``cp -al`` of the env; reuse; ``verify`` and ``verify --deep`` (MB/s); a herd of
   ``--herd`` concurrent ``ensure`` vs one; a second key holding 90% of the first key's
   packages (bytes it adds to ``envs/``, hardlinks counted once).
4. Runs ``import torch, transformers; print(torch.ones(2) @ torch.ones(2))`` in the env.
5. With ``--profile``, splits warm and cold ``ensure`` into phases (``bench_real_profile``).

The bare rattler children get the same records as ``ensure`` (from the lock, written to a
JSON file by this script), so the comparison is provisioner's whole cost against rattler's
alone. Nothing is asserted; it prints PASS / MISS per target and exits 0. Temporary homes
and envs live under a temp dir that is removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml
from wheel_conda import (
    CONVERTER_VERSION,
    add_sample_python,
    convert_wheel,
    serve_channel,
    wheel_facts,
)
from wholeproc import child_env, cli_argv, load, lock_records, ratio, run_timed, spread

from provisioner import fsops
from provisioner.build.layout import HomeLayout
from provisioner.lock.platforms import host_platform

STACKS = {
    "full": ["torch==2.14.1", "numpy", "transformers", "tokenizers", "safetensors",
             "huggingface_hub", "accelerate", "bitsandbytes"],
    "quick": ["torch==2.13.0+cpu", "numpy", "transformers", "tokenizers", "safetensors",
              "huggingface_hub"],
}
KEY_A, KEY_B, CHANNEL = "real-a", "real-b", "bench"
TARGETS = {"warm": 1.25, "cold": 1.1, "herd": 1.3, "lock": 2.0, "shared": 15.0}
IMPORT_TEST = "import torch, transformers; print(torch.ones(2) @ torch.ones(2))"
def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- wheels and channel


def resolve_wheels(reqs: list[str], scratch: Path) -> list[dict[str, Any]]:
    """What pip would install for this Python: name, version, url (no download yet)."""
    report = scratch / "pip-report.json"
    _t, _r = run_timed([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                        "--ignore-installed", "--only-binary=:all:", "--report", str(report),
                        *reqs], env=child_env())
    items = json.loads(report.read_text(encoding="utf-8"))["install"]
    return [{"name": i["metadata"]["name"], "version": i["metadata"]["version"],
             "url": i["download_info"]["url"]} for i in items]


def plan_download(wheels: list[dict[str, Any]], wheel_dir: Path) -> tuple[int, int, list[str]]:
    """(bytes already cached, bytes in local copies, names fetched from the index)."""
    cached = local = 0
    remote = []
    for w in wheels:
        file_name = unquote(w["url"].rsplit("/", 1)[-1])
        if (wheel_dir / file_name).is_file():
            cached += (wheel_dir / file_name).stat().st_size
        elif w["url"].startswith("file://"):
            local += Path(unquote(w["url"][len("file://"):])).stat().st_size
        else:
            remote.append(f"{w['name']} {w['version']}")
    return cached, local, remote


def download(wheels: list[dict[str, Any]], wheel_dir: Path) -> list[Path]:
    pins = [f"{w['name']}=={w['version']}" for w in wheels]
    run_timed([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "-d", str(wheel_dir), *pins], env=child_env())
    return [wheel_dir / unquote(w["url"].rsplit("/", 1)[-1]) for w in wheels]


def build_channel(files: list[Path], channel: Path) -> dict[str, Any]:
    """Convert, add python, index; a second build of every tenth package for key B."""
    from packaging.utils import canonicalize_name

    from provisioner.sample.packages import index_channel

    subdir = host_platform()
    xy = f"{sys.version_info[0]}.{sys.version_info[1]}"
    known = {}
    for f in files:
        with zipfile.ZipFile(f) as zf:
            facts = wheel_facts(zf)[1]
        known[canonicalize_name(facts["name"])] = facts["requires"]
    converted, links, dropped = [], 0, set()
    for f in sorted(files, key=lambda p: -p.stat().st_size):
        c = convert_wheel(f, channel, subdir, xy, known)
        converted.append((f, c))
        links += c.symlinks
        dropped |= set(c.dropped_deps)
    swap = set(swapped_names([c.name for _f, c in converted]))
    swaps = []
    for f, c in converted:
        if c.name in swap:
            alt = convert_wheel(f, channel, subdir, xy, known, tag=1)
            swaps.append((c.name, c.build, alt.build, alt.path))
    python = add_sample_python(channel, subdir)
    stamp = channel / ".indexed"
    names = "\n".join(sorted(p.name for p in channel.glob("*/*.conda"))) + "\n"
    # The sample python is a launcher for the interpreter running this (another checkout's
    # venv makes other bytes): its sha256 is in the stamp, so the index follows it.
    names += hashlib.sha256(python.read_bytes()).hexdigest() + "\n"
    if not stamp.is_file() or stamp.read_text(encoding="utf-8") != names:
        index_channel(channel)
        stamp.write_text(names, encoding="utf-8")
    return {"packages": [c for _f, c in converted], "links": links,
            "dropped": sorted(dropped), "swaps": swaps}


# --------------------------------------------------------------------------- project


def write_project(project: Path, url: str, specs_a: list[str], specs_b: list[str]) -> None:
    specs = project / "environment-specs"
    specs.mkdir(parents=True, exist_ok=True)
    for key, deps in ((KEY_A, specs_a), (KEY_B, specs_b)):
        spec = {"name": key, "channels": [CHANNEL], "platforms": [host_platform()],
                "dependencies": ["python", *deps],
                "x-provisioner": {"imports": ["torch", "transformers"]}}
        (specs / f"{key}.yml").write_text(yaml.safe_dump(spec, sort_keys=False),
                                          encoding="utf-8")
    (project / "provisioner.toml").write_text(
        f'home = "home"\n\n[channels]\n{CHANNEL} = "{url}"\n', encoding="utf-8")


def swapped_names(names: list[str]) -> list[str]:
    """Every tenth package by name (python and torch stay shared): key B's own builds."""
    pool = sorted(n for n in names if n not in ("python", "torch"))
    return pool[5::10] or pool[:1]


def reset_env(home: Path, key: str) -> None:
    """Remove ``key``'s generations and pointer; the package cache stays warm."""
    layout = HomeLayout(home)
    if layout.key_dir(key).is_dir():
        for gen in layout.key_dir(key).iterdir():
            if gen.is_dir() and not gen.is_symlink():
                fsops.safe_rmtree(gen)
    layout.pointer(key).unlink(missing_ok=True)


def drop(path: Path) -> None:
    if path.exists():
        fsops.safe_rmtree(path, require_marker=False)


def size_and_files(path: Path, seen: set[tuple[int, int]] | None = None) -> tuple[int, int]:
    """Bytes (each inode once, skipping inodes in ``seen``, which is updated) and files."""
    seen = set() if seen is None else seen
    total = files = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            files += 1
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total, files


def env_prefix(home: Path, key: str) -> Path:
    from provisioner.build.layout import read_pointer

    layout = HomeLayout(home)
    generation = read_pointer(layout, key)
    if generation is None:
        raise RuntimeError(f"{key} has no active generation in {home}")
    return layout.generation_dir(key, generation)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="torch CPU, no CUDA wheels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--bandwidth-mb", type=float, default=200.0, help="MB/s, all connections")
    parser.add_argument("--herd", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path,
                        default=Path.home() / ".cache" / "provisioner-bench")
    parser.add_argument("--profile", action="store_true",
                        help="also split warm and cold ensure into phases")
    parser.add_argument("--yes", action="store_true", help="do not wait 5 s after the plan")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    stack = "quick" if args.quick else "full"
    cache = args.cache_dir.expanduser().resolve()
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-real-", dir=cache))
    server = None
    try:
        say(f"bench_real ({stack}): resolving {' '.join(STACKS[stack])} with pip ...")
        wheels = resolve_wheels(STACKS[stack], root)
        cached, local, remote = plan_download(wheels, wheel_dir)
        total = cached + local
        say(f"  {len(wheels)} wheels: {cached / 1e9:.2f} GB already in {wheel_dir}, "
            f"{local / 1e9:.2f} GB copied from pip's local wheel copies, "
            f"{len(remote)} fetched from the package index"
            + (f" ({', '.join(remote)}; sizes unknown until fetched)" if remote else ""))
        say(f"  disk: about {total * 1.1 / 1e9:.1f} GB of wheels + {total * 1.1 / 1e9:.1f} GB "
            f"channel in {cache}; envs, caches and homes in {root} (about "
            f"{total * 5 / 1e9:.0f} GB at peak, removed at the end)")
        if not args.yes:
            time.sleep(5)
        t0 = time.perf_counter()
        files = download(wheels, wheel_dir)
        t_dl = time.perf_counter() - t0
        channel = cache / f"channel-{stack}-v{CONVERTER_VERSION}"
        built = build_channel(files, channel)
        t_conv = time.perf_counter() - t0 - t_dl
        archives = sum(c.path.stat().st_size for c in built["packages"])
        say(f"  wheels ready in {t_dl:.0f} s; {len(built['packages'])} .conda packages "
            f"({archives / 1e9:.2f} GB, {built['links']} .so copies made symlinks) in "
            f"{t_conv:.0f} s; requirements left out (extras/markers elsewhere): "
            f"{len(built['dropped'])}")
        server, url = serve_channel(channel, args.latency_ms / 1000, args.bandwidth_mb * 1e6)
        say(f"  serving on {url} with {args.latency_ms:g} ms per request, "
            f"{args.bandwidth_mb:g} MB/s shared")
        measure(root, server, url, args, built, archives)
    finally:
        if server is not None:
            server.shutdown()
        if args.keep:
            say(f"kept {root}")
        else:
            drop(root)
    return 0


def measure(root: Path, server: Any, url: str, args: argparse.Namespace,
            built: dict[str, Any], archives: int) -> None:
    from bench_real_runs import run_all
    from packaging.utils import canonicalize_name

    project = root / "project"
    stack = STACKS["quick" if args.quick else "full"]
    names_a = [canonicalize_name(s.split("=")[0]) for s in stack]
    swaps = built["swaps"]
    specs_a = names_a + [f"{n} * {b0}" for n, b0, _b1, _p in swaps]
    specs_b = names_a + [f"{n} * {b1}" for n, _b0, b1, _p in swaps]
    write_project(project, url, specs_a, specs_b)
    t_lock, _ = run_timed([*cli_argv(), "lock", KEY_A, KEY_B], env=child_env(), cwd=project)
    records = lock_records(project / "lockfiles" / f"{KEY_A}.conda-lock.yml", url)
    say(f"  first lock of both keys {t_lock:.1f} s: {len(records)} packages; key B has its "
        f"own build of {len(swaps)}: {', '.join(n for n, *_r in swaps)}")
    results = run_all(root, project, url, args, records, specs_a, server)
    report(results, args, records, swaps, archives)
    if args.profile:
        from bench_real_profile import profile

        say("")
        say(f"where ensure's time goes (load {load()}):")
        for line in profile(project, project / "home", root, KEY_A):
            say(line)


def report(res: dict[str, Any], args: argparse.Namespace, records: list[dict[str, Any]],
           swaps: list[Any], archives: int) -> None:
    say("")
    say(f"env {KEY_A}: {len(records)} packages, {archives / 1e9:.2f} GB of archives; "
        f"env {res['env_bytes'] / 1e9:.2f} GB in {res['env_files']:,} files; "
        f"{os.cpu_count()} CPUs; load before/after {res['load_before']} -> {load()}")
    say(f"import test in the env: {res['import_out']!r}")
    say("")
    rows = [
        ("lock / bare rattler solve", "lock", "solve", "lock"),
        ("cold ensure / bare rattler install (HTTP, empty cache)", "cold", "cold_bare", "cold"),
        ("warm ensure / bare rattler install (same cache)", "warm", "warm_bare", "warm"),
        ("warm ensure --recheck (no import memo) / bare install", "warm_recheck", "warm_bare",
         "warm"),
        (f"herd of {args.herd} / one ensure (env missing, warm cache)", "herd", "herd_one",
         "herd"),
    ]
    say(f"| measurement (whole process, n={args.repeats}, median [min\u2013max]) "
        "| provisioner | baseline | ratio [paired] | target | |")
    say("|---|---|---|---|---|---|")
    for label, a, b, target in rows:
        r, pairs = ratio(res[a], res[b])
        ok = "PASS" if r <= TARGETS[target] else "MISS"
        say(f"| {label} | {spread(res[a])} | {spread(res[b])} | {r:.2f}\u00d7 {pairs} "
            f"| \u2264 {TARGETS[target]}\u00d7 | {ok} |")
    pct = 100 * res["b_added"] / res["env_bytes"]
    ok = "PASS" if pct <= TARGETS["shared"] else "MISS"
    say(f"| second key ({len(records) - len(swaps)} of {len(records)} packages shared, "
        f"{len(swaps)} its own builds): bytes added / first env "
        f"| {res['b_added'] / 1e6:.1f} MB | {res['env_bytes'] / 1e6:.0f} MB "
        f"| {pct:.1f} % | \u2264 {TARGETS['shared']:g} % | {ok} |")
    say("")
    say("context (whole process, median [min\u2013max]):")
    say(f"  cp -al of the env            {spread(res['cp'])}")
    say(f"  reuse (ensure, env ready)    {spread(res['reuse'], digits=3)}")
    say(f"  verify                       {spread(res['verify'])}")
    deep_rate = [res["env_bytes"] / 1e6 / t for t in res["deep"]]
    say(f"  verify --deep                {spread(res['deep'])} = {spread(deep_rate, 'MB/s', 0)}")
    say(f"  second key ensure (n=1)      {res['b_time']:.2f} s")
    say(f"  server: {res['requests']} requests, {res['served'] / 1e9:.2f} GB sent")


if __name__ == "__main__":
    sys.exit(main())
