"""Packs and mirrors: pack size against env size, and cold builds from each source.

Run from the repository root::

    .venv/bin/python benchmarks/bench_pack.py [--packages 150] [--files 40] [--file-size 4096]
                                              [--repeat 5] [--nodes 8]
    .venv/bin/python benchmarks/bench_pack.py --real quick|full [--repeat 3] [--nodes 8] [--yes]

``--real`` measures on bench_real's real-size channel instead (``bench_pack_real``).

Offline, in a temporary project (``bench_build.make_project``'s synthetic channel
plus the sample python). Each build is a whole ``provisioner ensure`` process in
a fresh home (a cold package cache, as on a new node), the sources interleaved
run by run:

* ``channel``: the project's local channel (``[channels]`` mirror on disk);
* ``pack``: ``ensure --from`` a pack file, from a node checkout without the channel;
* ``http mirror``: ``provisioner mirror`` served by a static HTTP server on 127.0.0.1.

Then ``--nodes`` homes build from the one HTTP mirror at once, against one alone.
Prints medians [min-max]; asserts nothing and always exits 0.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_build import CHANNEL, KEY_A, make_project

from provisioner.build.mirror import make_mirror
from provisioner.build.pack import make_pack
from provisioner.config import load_config


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def cli() -> list[str]:
    script = Path(sys.executable).with_name("provisioner")
    return [str(script)] if script.exists() else [sys.executable, "-m", "provisioner"]


def ensure(project: Path, home: Path, *extra: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    start = time.perf_counter()
    subprocess.run([*cli(), "-q", "ensure", KEY_A, "--home", str(home), *extra], cwd=project,
                   env=env, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


def tree_bytes(path: Path) -> int:
    seen: set[int] = set()
    total = 0
    for p in path.rglob("*"):
        st = p.lstat()
        if p.is_file() and not p.is_symlink() and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_size
    return total


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=int, default=150)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--file-size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--real", choices=("quick", "full"), default=None,
                        help="bench_real's real-size channel (see bench_pack_real.py)")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path.home() / ".cache" / "provisioner-bench")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--bandwidth-mb", type=float, default=200.0, help="MB/s, shared")
    parser.add_argument("--yes", action="store_true",
                        help="with --real: download and build the channel if it is missing")
    args = parser.parse_args()
    if args.real:
        from bench_pack_real import run_real

        run_real(args)
        return
    root = Path(tempfile.mkdtemp(prefix="bench-pack-"))
    try:
        project, counts = make_project(root, args.packages, args.files, args.file_size)
        config = load_config(project, home=root / "packer-home", environ={})
        start = time.perf_counter()
        pack = make_pack(config, KEY_A, output=root / "a.tar")
        pack_s = time.perf_counter() - start
        mirror = root / "mirror"
        make_mirror(config, [KEY_A], mirror)
        node = root / "node"  # a checkout without the channel
        for part in ("environment-specs", "lockfiles"):
            shutil.copytree(project / part, node / part)
        server = ThreadingHTTPServer(("127.0.0.1", 0),
                                     functools.partial(_Quiet, directory=str(mirror)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        web = root / "web-node"
        shutil.copytree(node, web)
        (web / "provisioner.toml").write_text(
            f'[channels]\n{CHANNEL} = "http://127.0.0.1:{server.server_address[1]}/{CHANNEL}"\n',
            encoding="utf-8")
        times: dict[str, list[float]] = {"channel": [], "pack": [], "http mirror": []}
        env_bytes = 0
        try:
            for i in range(args.repeat):
                times["channel"].append(ensure(project, root / f"c{i}"))
                times["pack"].append(ensure(node, root / f"p{i}", "--from", str(pack.path)))
                times["http mirror"].append(ensure(web, root / f"w{i}"))
                if not env_bytes:
                    env_bytes = tree_bytes(root / "c0" / "envs" / KEY_A)
                for home in ("c", "p", "w"):
                    shutil.rmtree(root / f"{home}{i}")
            one = ensure(web, root / "solo")
            threads = []
            walls: list[float] = []
            start = time.perf_counter()
            for n in range(args.nodes):
                t = threading.Thread(target=lambda n=n: walls.append(ensure(web, root / f"n{n}")))
                t.start()
                threads.append(t)
            for t in threads:
                t.join()
            fleet = time.perf_counter() - start
        finally:
            server.shutdown()
            server.server_close()
        say(f"{counts[KEY_A]} packages, {args.files} files of {args.file_size} B each; "
            f"load {os.getloadavg()[0]:.1f}")
        say(f"pack: {pack.bytes / 1e6:.1f} MB in {pack_s:.2f} s; env {env_bytes / 1e6:.1f} MB "
            f"(pack/env {pack.bytes / max(env_bytes, 1):.2f})")
        for name, values in times.items():
            say(f"cold ensure from {name:12} {spread(values)}")
        say(f"{args.nodes} homes from one HTTP mirror at once: {fleet:.2f} s wall "
            f"(each {spread(walls)}), one alone {one:.2f} s, ratio {fleet / one:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
