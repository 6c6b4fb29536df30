"""``bench_pack.py --real quick|full``: packs and mirrors on bench_real's real-size channel.

Reuses ``bench_real``'s channel cache (``~/.cache/provisioner-bench/channel-<stack>-v<N>``),
its project writer and its throttled 127.0.0.1 server (``--latency-ms``, ``--bandwidth-mb``
shared by all connections). If the channel is not built yet it says what it would download
and stops, unless ``--yes``. Whole processes, interleaved (the order rotates), median
[min-max]:

* ``pack`` (the CLI) and the pack's size and members against the env's bytes and files;
* cold ``ensure --from PACK`` (local file) in a checkout without channels;
* cold ``ensure --from http://.../pack.tar`` from the throttled server;
* cold ``ensure`` from the channel over the server;
* a bare rattler install of the same records from the server with an empty cache;
* cold ``ensure`` from ``provisioner mirror`` served by the server: one node alone,
  and ``--nodes`` nodes (one home each) at once (wall until the last one ends).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path

from bench_real import (
    CHANNEL,
    KEY_A,
    STACKS,
    build_channel,
    download,
    drop,
    env_prefix,
    plan_download,
    resolve_wheels,
    say,
    size_and_files,
    write_project,
)
from wheel_conda import CONVERTER_VERSION, serve_channel
from wholeproc import (
    BARE_INSTALL,
    child_env,
    cli_argv,
    load,
    lock_records,
    run_all,
    run_timed,
    spread,
)


def ready_channel(stack: str, cache: Path, yes: bool) -> Path | None:
    """The cached channel of ``stack``; build it only with ``yes`` (else say what it needs)."""
    channel = cache / f"channel-{stack}-v{CONVERTER_VERSION}"
    if (channel / ".indexed").is_file():
        return channel
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        wheels = resolve_wheels(STACKS[stack], Path(scratch))
    cached, local, remote = plan_download(wheels, wheel_dir)
    say(f"no channel at {channel}: {len(wheels)} wheels, {cached / 1e9:.2f} GB already in "
        f"{wheel_dir}, {local / 1e9:.2f} GB from pip's local copies, {len(remote)} to fetch"
        + (f" ({', '.join(remote)})" if remote else ""))
    if not yes:
        say("not downloading without --yes")
        return None
    build_channel(download(wheels, wheel_dir), channel)
    return channel


def run_many(argvs: list[list[str]], cwd: Path) -> float:
    """Start every argv at once; wall seconds until the last one ends (raise if one fails)."""
    return run_all(argvs, env=child_env(), cwd=cwd)[0]


def checkout(project: Path, node: Path, channel_url: str | None) -> Path:
    """A node's checkout: specs and locks, and ``channel_url`` as the channel (or none)."""
    for part in ("environment-specs", "lockfiles"):
        shutil.copytree(project / part, node / part)
    toml = 'home = "home"\n'
    if channel_url:
        toml += f'\n[channels]\n{CHANNEL} = "{channel_url}"\n'
    (node / "provisioner.toml").write_text(toml, encoding="utf-8")
    return node


def run_real(args: argparse.Namespace) -> int:
    cache = args.cache_dir.expanduser().resolve()
    channel = ready_channel(args.real, cache, args.yes)
    if channel is None:
        return 0
    root = Path(tempfile.mkdtemp(prefix="bench-pack-real-", dir=cache))
    site = root / "site"  # what the server serves: the channel, the pack, the mirror
    site.mkdir()
    (site / CHANNEL).symlink_to(channel, target_is_directory=True)
    server, base = serve_channel(site, args.latency_ms / 1000, args.bandwidth_mb * 1e6)
    try:
        measure(root, site, base, args)
    finally:
        server.shutdown()
        server.server_close()
        drop(root)
    return 0


def measure(root: Path, site: Path, base: str, args: argparse.Namespace) -> None:
    from packaging.utils import canonicalize_name

    env, cli, n = child_env(), cli_argv(), args.repeat
    load_before = load()
    url = f"{base}/{CHANNEL}"
    project = root / "project"
    names = [canonicalize_name(s.split("=")[0]) for s in STACKS[args.real]]
    write_project(project, url, names, names)
    run_timed([*cli, "lock", KEY_A], env=env, cwd=project)
    records = lock_records(project / "lockfiles" / f"{KEY_A}.conda-lock.yml", url)
    recs_json = root / "records.json"
    recs_json.write_text(json.dumps(records), encoding="utf-8")
    # The packer's home holds the package cache pack and mirror read from.
    run_timed([*cli, "ensure", KEY_A], env=env, cwd=project)
    env_bytes, env_files = size_and_files(env_prefix(project / "home", KEY_A))
    pack = site / "pack.tar"
    pack_s = []
    for _ in range(n):
        pack.unlink(missing_ok=True)
        pack_s.append(run_timed([*cli, "pack", KEY_A, "-o", str(pack)], env=env,
                                cwd=project)[0])
    with tarfile.open(pack) as tf:
        pack_files = sum(1 for m in tf.getmembers() if m.isfile())
    run_timed([*cli, "mirror", KEY_A, str(site / "mirror")], env=env, cwd=project)
    local = checkout(project, root / "node-local", None)
    web = checkout(project, root / "node-web", f"{base}/mirror/{CHANNEL}")

    def ensure(cwd: Path, home: Path, *extra: str) -> float:
        took = run_timed([*cli, "--home", str(home), "ensure", KEY_A, *extra], env=env,
                         cwd=cwd)[0]
        drop(home)
        return took

    def bare(i: int) -> float:
        target, pkgs = root / f"bare-{i}", root / f"bare-cache-{i}"
        took = run_timed([sys.executable, "-c", BARE_INSTALL, str(recs_json), str(target),
                          str(pkgs)], env=env)[0]
        drop(target)
        drop(pkgs)
        return took

    runs = {
        "ensure --from PACK (local file)":
            lambda i: ensure(local, root / f"h-pf-{i}", "--from", str(pack)),
        "ensure --from http://.../pack.tar":
            lambda i: ensure(local, root / f"h-ph-{i}", "--from", f"{base}/pack.tar"),
        "ensure from the channel (HTTP)": lambda i: ensure(project, root / f"h-ch-{i}"),
        "bare rattler install (HTTP, empty cache)": bare,
        "ensure from the mirror (HTTP), one node": lambda i: ensure(web, root / f"h-m1-{i}"),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    names_order = list(runs)
    say(f"cold builds x{n}, interleaved (load {load()}) ...")
    for i in range(n):
        for name in names_order[i % len(names_order):] + names_order[:i % len(names_order)]:
            times[name].append(runs[name](i))
            say(f"  {i} {name}: {times[name][-1]:.2f} s")
    say(f"{args.nodes} nodes from the mirror at once x{n} (load {load()}) ...")
    fleet: list[float] = []
    need = args.nodes * 2 * env_bytes  # each home: its env plus its package cache
    free = shutil.disk_usage(root).free
    if free < need:
        say(f"  skipped: {args.nodes} homes need about {need / 1e9:.0f} GB, "
            f"{free / 1e9:.0f} GB free")
    for i in range(n if free >= need else 0):
        homes = [root / f"h-n{k}-{i}" for k in range(args.nodes)]
        fleet.append(run_many([[*cli, "--home", str(h), "ensure", KEY_A] for h in homes], web))
        for h in homes:
            drop(h)
        say(f"  {i} {args.nodes} nodes: {fleet[-1]:.2f} s")
    one = times["ensure from the mirror (HTTP), one node"]
    say("")
    say(f"bench_pack --real {args.real}: {len(records)} packages; server "
        f"{args.latency_ms:g} ms per request, {args.bandwidth_mb:g} MB/s shared; "
        f"load before/after {load_before} -> {load()}")
    say(f"env {env_bytes / 1e9:.3f} GB in {env_files:,} files; pack "
        f"{pack.stat().st_size / 1e9:.3f} GB in {pack_files:,} files "
        f"(pack/env bytes {pack.stat().st_size / env_bytes:.2f})")
    say("")
    say(f"| whole process, n={n}, median [min\u2013max] | time |")
    say("|---|---|")
    say(f"| provisioner pack | {spread(pack_s)} |")
    for name, values in times.items():
        say(f"| cold {name} | {spread(values)} |")
    say(f"| {args.nodes} nodes from one mirror at once (wall) | {spread(fleet)} |")
    if fleet:
        say(f"| ratio {args.nodes} nodes / one node (medians) | "
            f"{statistics.median(fleet) / statistics.median(one):.2f}\u00d7 |")
