"""Benchmark ``ensure`` against a bare ``rattler.install`` of the same records, side by side.

Run from the repository root::

    .venv/bin/python benchmarks/bench_build.py [--packages 150] [--files 40] [--repeat 3]

Everything happens offline in a temporary project: a synthetic channel of
``--packages`` packages with ``--files`` files each (plus 10% extra packages and
the sample channel's ``python``, which every env needs for the final import
check), two specs locked with ``lock_envs``:

* ``bench-a``: python and every synthetic package;
* ``bench-b``: the same minus the last 10% of the synthetic packages, plus the
  10% extra ones (so about 90% of its packages are shared with ``bench-a``).

It prints medians of ``--repeat`` runs measured in one process, ratios against
the targets, then the same comparisons as whole processes (the ``provisioner``
console script against a bare rattler child given the same records, interleaved,
median [min-max]: in-process numbers alone hide the start-up cost a user pays),
and where the time of one warm ``ensure`` goes (phase timers
wrapped around provisioner's functions; ``--profile`` adds a cProfile listing).
Nothing is asserted: it always exits 0 and prints PASS or MISS per target.
``benchmarks/bench_phases.py`` splits a whole-process warm ensure into install /
checks / promote, before and after a change (``--baseline-src``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import stat
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from provisioner import fsops, processes
from provisioner.build.layout import HomeLayout
from provisioner.config import CONFIG_FILE_NAME, SPECS_DIR_NAME, Config, load_config
from provisioner.lock.platforms import host_platform
from provisioner.sample.stack import (
    build_sample_channel,
    build_synthetic_channel,
    channel_url,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wholeproc import (  # a sibling module of this script
    BARE_INSTALL,
    child_env,
    cli_argv,
    lock_records,
    ratio,
    run_timed,
    spread,
)

CHANNEL = "bench"
KEY_A = "bench-a"
KEY_B = "bench-b"
TARGET_WARM_RATIO = 1.25
TARGET_REUSE_MS = 50.0
TARGET_SHARED_PCT = 15.0


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- setup


def _extra_packages(channel: Path, subdir: str, count: int, files: int,
                    file_size: int) -> list[str]:
    """``count`` packages shaped like the synthetic ones, under other names, no deps."""
    return build_synthetic_channel(channel, count, files, subdir, file_size,
                                   name_prefix="synthx-", with_deps=False)


def _write_spec(specs_dir: Path, key: str, deps: list[str], platform: str) -> None:
    data = {"name": key, "channels": [CHANNEL], "platforms": [platform],
            "dependencies": deps, "x-provisioner": {"imports": []}}
    (specs_dir / f"{key}.yml").write_text(yaml.safe_dump(data, sort_keys=False),
                                          encoding="utf-8")


def make_project(
    root: Path, n_packages: int, n_files: int, file_size: int = 200
) -> tuple[Path, dict[str, int]]:
    """Channel, two specs and their locks under ``root``; return (project, counts)."""
    from provisioner.lock.write import lock_envs

    platform = host_platform()
    project = root / "project"
    channel = project / "channel"
    names = build_synthetic_channel(channel, n_packages, n_files, platform, file_size)
    n_swap = max(1, round(n_packages * 0.10))
    extras = _extra_packages(channel, platform, n_swap, n_files, file_size)
    # The sample python (a launcher for this interpreter); this also re-indexes the channel.
    build_sample_channel(channel, [platform])
    specs = project / SPECS_DIR_NAME
    specs.mkdir(parents=True)
    _write_spec(specs, KEY_A, ["python", *names], platform)
    _write_spec(specs, KEY_B, ["python", *names[: n_packages - n_swap], *extras], platform)
    (project / CONFIG_FILE_NAME).write_text(
        f'home = "home"\n\n[channels]\n{CHANNEL} = "channel"\n', encoding="utf-8"
    )
    outcomes = lock_envs(load_config(project, environ={}), [KEY_A, KEY_B])
    return project, {o.key: o.counts[platform] for o in outcomes}


def config_for(project: Path, home: Path) -> Config:
    return load_config(project, home=home, environ={})


def bare_records(config: Config, key: str, scratch: Path) -> list[Any]:
    """The rattler records ``ensure`` installs, built the way the builder builds them."""
    from provisioner.build.artifacts import verify_artifacts
    from provisioner.lock.channels import resolve_channels
    from provisioner.lock.check import lockfile_path
    from provisioner.lock.reader import read_lockfile
    from provisioner.lock.solve import locked_to_record

    lock = read_lockfile(lockfile_path(config.locks_dir, key))
    packages = lock.for_platform(host_platform(), "conda")
    artifacts = verify_artifacts(packages, resolve_channels(lock.channels, config), scratch)
    return [locked_to_record(a.package, a.url, a.url.rsplit("/", 2)[0]) for a in artifacts]


# --------------------------------------------------------------------------- measuring


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def ensure_key(config: Config, key: str) -> Any:
    from provisioner.build.ensure import ensure

    return ensure(config, key)


def reset_env(config: Config, key: str, prefix: Path) -> None:
    """Forget ``key``'s env (generation dir and pointer); keep the warm package cache."""
    fsops.safe_rmtree(prefix)  # generation dirs carry provisioner's marker
    HomeLayout(config.home).pointer(key).unlink(missing_ok=True)


def bare_install(records: list[Any], target: Path, cache: Path) -> None:
    import rattler

    asyncio.run(rattler.install(records, target_prefix=target, cache_dir=cache,
                                show_progress=False, execute_link_scripts=False))


def drop(path: Path) -> None:
    """Remove a scratch tree of this benchmark (it has no provisioner marker)."""
    fsops.safe_rmtree(path, require_marker=False)


def cp_al(src: Path, dst: Path) -> None:
    result = processes.run(["cp", "-al", str(src), str(dst)], timeout=600)
    if not result.ok:
        raise RuntimeError(f"cp -al failed: {result.stderr.strip()}")


def _inodes(path: Path) -> set[tuple[int, int]]:
    seen = set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(st.st_mode):
                seen.add((st.st_dev, st.st_ino))
    return seen


def added_breakdown(prefix: Path, before: set[tuple[int, int]], new_pkgs: tuple[str, ...]
                    ) -> dict[str, list[int]]:
    """Bytes (and files) under ``prefix`` whose inode was not on disk before, by kind."""
    buckets: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    counted: set[tuple[int, int]] = set()
    for root, _dirs, files in os.walk(prefix):
        rel_root = os.path.relpath(root, prefix).replace(os.sep, "/")
        for name in files:
            st = os.lstat(os.path.join(root, name))
            ident = (st.st_dev, st.st_ino)
            if not stat.S_ISREG(st.st_mode) or ident in before or ident in counted:
                continue
            counted.add(ident)
            if rel_root.startswith("conda-meta"):
                kind = "conda-meta/*.json (one record per package)"
            elif rel_root.startswith("share/synth/") and rel_root.split("/")[2] in new_pkgs:
                kind = "files of the packages bench-a does not have"
            elif rel_root.startswith("share/synth/"):
                kind = "prefix-rewritten copies of shared packages' files"
            else:
                kind = "other (python launchers, provisioner's own files)"
            buckets[kind][0] += st.st_size
            buckets[kind][1] += 1
    return dict(buckets)


# --------------------------------------------------------------------------- phases


_PHASES = [  # (module, attribute, label); class methods as "Class.method"
    ("provisioner.build.ensure", "make_plan", "make_plan (x2: before and under the key lock)"),
    ("provisioner.lock.reader", "read_lockfile", "read_lockfile (structural reader)"),
    ("provisioner.lock.spec", "load_spec", "load_spec"),
    ("provisioner.build.cuda", "required_cuda", "required_cuda (summarize_lock)"),
    ("provisioner.build.cuda", "host_cuda_version", "host_cuda_version (virtual pkgs)"),
    ("provisioner.build.artifacts", "verify_artifacts", "verify_artifacts (sha256 memo)"),
    ("provisioner.build.backends", "RattlerBackend.install", "rattler.install (backend)"),
    ("provisioner.build.backends", "RattlerBackend.version", "backend.version (metadata)"),
    ("provisioner.build.ensure", "check_records", "check_records (conda-meta)"),
    ("provisioner.build.ensure", "find_staging_path", "find_staging_path (read every file)"),
    ("provisioner.build.env_checks", "check_imports", "check_imports (staged; subprocess)"),
    ("provisioner.build.import_memo", "ImportCheck.run", "ImportCheck.run (memo or the check)"),
    ("provisioner.build.orphans", "stop_build_processes", "stop_build_processes (/proc scan)"),
    ("provisioner.build.ensure", "write_fingerprint", "write_fingerprint"),
    ("provisioner.build.ensure", "_promote", "_promote (rename)"),
    ("provisioner.build.ensure", "_check_promoted", "_check_promoted (sys.prefix subprocess)"),
    ("provisioner.build.package_checks", "check_packages", "check_packages (paths, limits)"),
    ("provisioner.build.package_cache", "prepare", "package_cache.prepare (cache check, space)"),
    ("provisioner.build.durability", "flush_tree", "flush_tree (syncfs before fingerprint)"),
]


@contextlib.contextmanager
def phase_timers() -> Iterator[dict[str, list[float]]]:
    """Wrap provisioner's functions with timers; ``_check_promoted`` excludes its nested call."""
    import importlib

    spent: dict[str, list[float]] = defaultdict(list)
    restore = []
    for module_name, attr, label in _PHASES:
        owner: Any = importlib.import_module(module_name)
        name = attr
        if "." in attr:
            cls, name = attr.split(".")
            owner = getattr(owner, cls)
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)

        def wrapper(*args: Any, _orig: Any = original, _label: str = label,
                    **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _orig(*args, **kwargs)
            finally:
                spent[_label].append(time.perf_counter() - start)

        setattr(owner, name, wrapper)
        restore.append((owner, name, original))
    try:
        yield spent
    finally:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)


# --------------------------------------------------------------------------- report


def fmt_s(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):8.3f} s  (min {min(values):.3f}, n={len(values)})"


def _load() -> str:
    """1-minute load average (this benchmark is sensitive to other work on the machine)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "n/a"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=int, default=150)
    parser.add_argument("--files", type=int, default=40, help="files per package")
    parser.add_argument("--file-size", type=int, default=200,
                        help="bytes per file (real packages average several KiB)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reuse-calls", type=int, default=200)
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile listing of one warm ensure")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-whole-process", dest="whole_process", action="store_false",
                        help="skip the whole-process comparisons")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="provisioner-bench-"))
    try:
        run(root, args)
    finally:
        if args.keep:
            say(f"\nkept {root}")
        else:
            drop(root)
    return 0


def run(root: Path, args: argparse.Namespace) -> None:
    posix = os.name == "posix" and shutil.which("cp") is not None
    load_before = _load()
    say(f"bench_build: {args.packages} packages x {args.files} files, repeat {args.repeat}, "
        f"{host_platform()}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    t_setup, (project, counts) = timed(
        lambda: make_project(root, args.packages, args.files, args.file_size))
    say(f"setup (channel + lock): {t_setup:.1f} s; locked packages: "
        + ", ".join(f"{k} {v}" for k, v in counts.items()))

    warm = config_for(project, root / "warm-home")
    cache = HomeLayout(warm.home).package_cache
    t_first, first = timed(lambda: ensure_key(warm, KEY_A))
    prefix_a: Path = first.prefix
    records = bare_records(warm, KEY_A, root / "scratch-memo")
    bare_install(records, root / "bare-warmup", cache)  # untimed, like the first ensure
    drop(root / "bare-warmup")

    # a/b/c interleaved per repetition, so drift hits all three alike.
    t_ensure: list[float] = []
    t_bare: list[float] = []
    t_cp: list[float] = []
    for i in range(args.repeat):
        target = root / f"bare-{i}"
        for which in (("ensure", "bare") if i % 2 == 0 else ("bare", "ensure")):
            if which == "ensure":
                reset_env(warm, KEY_A, prefix_a)
                dt, res = timed(lambda: ensure_key(warm, KEY_A))
                assert res.action == "build", res.action
                t_ensure.append(dt)
            else:
                t_bare.append(timed(partial(bare_install, records, target, cache))[0])
                drop(target)
        if posix:
            dst = root / f"cpal-{i}"
            t_cp.append(timed(partial(cp_al, prefix_a, dst))[0])
            drop(dst)

    # e: reuse of the ready env.
    t_reuse = []
    for _ in range(args.reuse_calls):
        dt, res = timed(lambda: ensure_key(warm, KEY_A))
        assert res.action == "reuse", res.action
        t_reuse.append(dt)

    # f: a second key sharing ~90% of its packages, same home and cache.
    envs = HomeLayout(warm.home).envs
    a_bytes = fsops.tree_size(prefix_a)
    a_files = sum(len(f) for _r, _d, f in os.walk(prefix_a))
    before_bytes = fsops.tree_size(envs)
    before_inodes = _inodes(envs)
    t_b, res_b = timed(lambda: ensure_key(warm, KEY_B))
    added = fsops.tree_size(envs) - before_bytes
    new_pkgs = tuple(f"synthx-{i:05d}" for i in range(max(1, round(args.packages * 0.10))))
    breakdown = added_breakdown(res_b.prefix, before_inodes, new_pkgs)

    # d: cold cache (fresh home, empty package cache and hash memo).
    t_cold = []
    for i in range(args.repeat):
        cold = config_for(project, root / f"cold-home-{i}")
        t_cold.append(timed(partial(ensure_key, cold, KEY_A))[0])
        drop(cold.home)

    # Where the time of one warm ensure goes (not part of the medians above).
    reset_env(warm, KEY_A, prefix_a)
    with phase_timers() as spent:
        t_phased, _ = timed(lambda: ensure_key(warm, KEY_A))
    profile_text = ""
    if args.profile:
        reset_env(warm, KEY_A, prefix_a)
        prof = cProfile.Profile()
        prof.enable()
        ensure_key(warm, KEY_A)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        profile_text = buf.getvalue()

    med_ensure, med_bare = statistics.median(t_ensure), statistics.median(t_bare)
    reuse_ms = statistics.median(t_reuse) * 1000
    ratio = med_ensure / med_bare
    shared_pct = 100.0 * added / a_bytes if a_bytes else float("nan")

    say("")
    say(f"{'measurement':44} {'median':>10}")
    say("-" * 90)
    say(f"{'a. warm ensure (build, warm pkgs cache)':44} {fmt_s(t_ensure)}")
    say(f"{'b. bare rattler.install, same records+cache':44} {fmt_s(t_bare)}")
    say(f"{'c. cp -al of the finished prefix':44} "
        + (fmt_s(t_cp) if posix else "skipped (not POSIX / no cp)"))
    say(f"{'d. cold ensure (fresh home, empty cache)':44} {fmt_s(t_cold)}")
    say(f"{'e. reuse ensure (ready env)':44} {reuse_ms:8.3f} ms (p95 "
        f"{sorted(t_reuse)[int(0.95 * (len(t_reuse) - 1))] * 1000:.3f} ms, n={len(t_reuse)})")
    say(f"{'f. bench-b ensure (90% shared, same home)':44} {t_b:8.3f} s  (n=1)")
    say(f"{'   first ensure of bench-a (cache filling)':44} {t_first:8.3f} s  (n=1)")
    say("")
    say(f"bench-a env: {a_bytes:,} bytes in {a_files:,} files; bench-b added {added:,} bytes "
        "to envs/ (hardlinked inodes counted once)")
    for kind, (size, n) in sorted(breakdown.items(), key=lambda kv: -kv[1][0]):
        say(f"   {size:>12,} bytes {n:>6,} files  {kind}")
    meta_kind = next((k for k in breakdown if k.startswith("conda-meta")), None)
    a_meta = fsops.tree_size(prefix_a / "conda-meta")
    b_meta = breakdown[meta_kind][0] if meta_kind else 0
    if a_bytes > a_meta:
        say(f"   without conda-meta records on both sides: {added - b_meta:,} / "
            f"{a_bytes - a_meta:,} bytes = {100 * (added - b_meta) / (a_bytes - a_meta):.1f} % "
            "(the synthetic files are tiny, so per-package records dominate)")
    say("")
    say("targets")
    say(f"  warm ensure / bare rattler install  {ratio:6.2f}x   target <= {TARGET_WARM_RATIO}x"
        f"   {verdict(ratio <= TARGET_WARM_RATIO)}")
    say(f"  reuse ensure                        {reuse_ms:6.2f} ms  "
        f"target <= {TARGET_REUSE_MS:g} ms   {verdict(reuse_ms <= TARGET_REUSE_MS)}")
    say(f"  bench-b added bytes / bench-a bytes {shared_pct:6.1f} %   target <= "
        f"{TARGET_SHARED_PCT:g} %    {verdict(shared_pct <= TARGET_SHARED_PCT)}")
    paired = statistics.median(e / b for e, b in zip(t_ensure, t_bare, strict=True))
    say(f"  (same ratio, paired per repetition: median {paired:.2f}x; of the minimums: "
        f"{min(t_ensure) / min(t_bare):.2f}x; load average {load_before} -> {_load()})")
    say("  context: cold ensure / warm ensure "
        f"{statistics.median(t_cold) / med_ensure:.2f}x"
        + (f"; cp -al / bare install {statistics.median(t_cp) / med_bare:.2f}x" if t_cp else ""))
    say("")
    say(f"one warm ensure with phase timers: {t_phased:.3f} s")
    accounted = 0.0
    for _module, _attr, label in _PHASES:
        values = spent.get(label, [])
        total = sum(values)
        if label.startswith("check_imports"):
            continue  # nested: the promoted call is inside _check_promoted, listed below
        accounted += total
        say(f"  {total:8.3f} s {100 * total / t_phased:5.1f}%  {label}  (calls: {len(values)})")
    imports = spent.get(_PHASES[10][2], [])
    if imports:
        say("    of which check_imports calls: "
            + ", ".join(f"{v * 1000:.1f} ms" for v in imports)
            + " (the bench specs list no imports; after promotion only sys.prefix is checked)")
    install = sum(spent.get(_PHASES[6][2], []))
    say(f"  => ensure overhead beyond rattler.install in this run: {t_phased - install:.3f} s")
    say(f"  {t_phased - accounted:8.3f} s {100 * (t_phased - accounted) / t_phased:5.1f}%  "
        "everything else (key lock, staging mkdir/marker, pointer, etc.)")
    if profile_text:
        say("")
        say(profile_text)
    if args.whole_process:
        whole_process(root, project, warm, prefix_a, args.repeat)


def whole_process(root: Path, project: Path, warm: Config, prefix_a: Path, repeat: int) -> None:
    """Warm and cold ``ensure`` against bare rattler children, reuse and ``cp -al``, as
    separate processes, interleaved; ``repeat`` (at least 5) times each."""
    n = max(5, repeat)
    env = child_env()
    cli = cli_argv()
    records = root / "records.json"
    channel = channel_url(project / "channel")
    records.write_text(json.dumps(lock_records(
        project / "lockfiles" / f"{KEY_A}.conda-lock.yml", channel)), encoding="utf-8")
    cache = HomeLayout(warm.home).package_cache
    ensure = [*cli, "--home", str(warm.home), "ensure", KEY_A]

    def bare(target: Path, cache_dir: Path) -> float:
        took = run_timed([sys.executable, "-c", BARE_INSTALL, str(records), str(target),
                          str(cache_dir)], env=env)[0]
        drop(target)
        return took

    t: dict[str, list[float]] = defaultdict(list)
    say("")
    say(f"whole process, n={n}, interleaved (load {_load()}) ...")
    order = ("ensure", "recheck", "bare")
    for i in range(n):
        for which in order[i % 3:] + order[:i % 3]:
            if which in ("ensure", "recheck"):  # recheck: the import check every time (no memo)
                reset_env(warm, KEY_A, prefix_a)
                argv = ensure if which == "ensure" else [*ensure, "--recheck"]
                t["warm" if which == "ensure" else "warm_recheck"].append(
                    run_timed(argv, env=env, cwd=project)[0])
            else:
                t["warm_bare"].append(bare(root / f"wp-bare-{i}", cache))
        if os.name == "posix":
            t["cp"].append(run_timed(["cp", "-al", str(prefix_a), str(root / f"wp-cp-{i}")],
                                     env=env)[0])
            drop(root / f"wp-cp-{i}")
        t["reuse"].append(run_timed(ensure, env=env, cwd=project)[0])
    for i in range(n):
        for which in (("ensure", "bare") if i % 2 == 0 else ("bare", "ensure")):
            if which == "ensure":
                home = root / f"wp-cold-home-{i}"
                t["cold"].append(run_timed([*cli, "--home", str(home), "ensure", KEY_A],
                                           env=env, cwd=project)[0])
                drop(home)
            else:
                t["cold_bare"].append(bare(root / f"wp-cold-bare-{i}", root / f"wp-cache-{i}"))
                drop(root / f"wp-cache-{i}")
    warm_r, warm_pairs = ratio(t["warm"], t["warm_bare"])
    recheck_r, recheck_pairs = ratio(t["warm_recheck"], t["warm_bare"])
    cold_r, cold_pairs = ratio(t["cold"], t["cold_bare"])
    say(f"{'measurement (whole process)':44} median [min\u2013max]")
    say("-" * 90)
    say(f"{'warm ensure (build, warm package cache)':44} {spread(t['warm'])}")
    say(f"{'warm ensure --recheck (no import memo)':44} {spread(t['warm_recheck'])}")
    say(f"{'bare rattler install child, same cache':44} {spread(t['warm_bare'])}")
    say(f"{'cp -al of the finished prefix':44} {spread(t['cp'])}")
    say(f"{'cold ensure (fresh home, file channel)':44} {spread(t['cold'])}")
    say(f"{'bare rattler install child, empty cache':44} {spread(t['cold_bare'])}")
    say(f"{'reuse ensure (ready env)':44} {spread(t['reuse'], digits=3)}")
    say(f"  warm ensure / bare install  {warm_r:.2f}x {warm_pairs} (paired)  target <= "
        f"{TARGET_WARM_RATIO}x  {verdict(warm_r <= TARGET_WARM_RATIO)}")
    say(f"  warm --recheck / bare install  {recheck_r:.2f}x {recheck_pairs} (paired)  "
        "before the import memo")
    say(f"  cold ensure / bare install  {cold_r:.2f}x {cold_pairs} (paired)  context "
        f"(load {_load()})")


if __name__ == "__main__":
    sys.exit(main())
