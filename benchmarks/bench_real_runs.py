"""The measurements of ``bench_real.py``: whole processes, interleaved repeats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench_real import (
    IMPORT_TEST,
    KEY_A,
    KEY_B,
    drop,
    env_prefix,
    reset_env,
    say,
    size_and_files,
)
from wholeproc import BARE_INSTALL, BARE_SOLVE, child_env, cli_argv, load, run_herd, run_timed

from provisioner.build.layout import HomeLayout
from provisioner.lock.platforms import host_platform


def _orders(i: int, a: str, b: str) -> tuple[str, str]:
    return (a, b) if i % 2 == 0 else (b, a)


def run_all(root: Path, project: Path, url: str, args: argparse.Namespace,
            records: list[dict[str, Any]], specs_a: list[str], server: Any) -> dict[str, Any]:
    env = child_env()
    cli = cli_argv()
    n = args.repeats
    res: dict[str, Any] = {k: [] for k in (
        "lock", "solve", "cold", "cold_bare", "warm", "warm_bare", "warm_recheck", "cp", "reuse",
        "verify",
        "deep", "herd", "herd_one")}
    res["load_before"] = load()
    recs_json = root / "records.json"
    recs_json.write_text(json.dumps(records), encoding="utf-8")
    lockfile = project / "lockfiles" / f"{KEY_A}.conda-lock.yml"

    def bare_install(target: Path, cache: Path) -> float:
        took, _ = run_timed([sys.executable, "-c", BARE_INSTALL, str(recs_json), str(target),
                             str(cache)], env=env)
        return took

    say(f"lock vs bare solve x{n} ...")
    for i in range(n):
        for which in _orders(i, "lock", "solve"):
            if which == "lock":
                lockfile.unlink()
                res["lock"].append(run_timed([*cli, "lock", KEY_A], env=env, cwd=project)[0])
            else:
                res["solve"].append(run_timed([sys.executable, "-c", BARE_SOLVE, url,
                                               host_platform(), "python", *specs_a],
                                              env=env)[0])

    say(f"cold ensure vs bare install x{n} (load {load()}) ...")
    for i in range(n):
        for which in _orders(i, "ensure", "bare"):
            if which == "ensure":
                home = root / f"cold-home-{i}"
                res["cold"].append(run_timed([*cli, "--home", str(home), "ensure", KEY_A],
                                             env=env, cwd=project)[0])
                drop(home)
            else:
                target, cache = root / f"cold-bare-{i}", root / f"cold-cache-{i}"
                res["cold_bare"].append(bare_install(target, cache))
                drop(target)
                drop(cache)

    say(f"warm ensure vs bare install vs cp -al x{n} (load {load()}) ...")
    home = project / "home"
    ensure = [*cli, "ensure", KEY_A]
    run_timed(ensure, env=env, cwd=project)  # fills the package cache; not counted
    cache = HomeLayout(home).package_cache
    bare_install(root / "bare-warmup", cache)
    drop(root / "bare-warmup")
    order = ("ensure", "recheck", "bare")
    for i in range(n):
        for which in order[i % 3:] + order[:i % 3]:
            if which in ("ensure", "recheck"):  # recheck: the import check every time (no memo)
                reset_env(home, KEY_A)
                argv = ensure if which == "ensure" else [*ensure, "--recheck"]
                res["warm" if which == "ensure" else "warm_recheck"].append(
                    run_timed(argv, env=env, cwd=project)[0])
            else:
                res["warm_bare"].append(bare_install(root / f"warm-bare-{i}", cache))
                drop(root / f"warm-bare-{i}")
        res["cp"].append(run_timed(["cp", "-al", str(env_prefix(home, KEY_A)),
                                    str(root / f"cp-{i}")], env=env)[0])
        drop(root / f"cp-{i}")

    prefix = env_prefix(home, KEY_A)
    out = run_timed([str(prefix / "bin" / "python"), "-c", IMPORT_TEST], env=env)[1]
    res["import_out"] = out.stdout.strip()
    res["env_bytes"], res["env_files"] = size_and_files(prefix)

    say(f"reuse, verify, verify --deep x{n} (load {load()}) ...")
    for _ in range(2 * n):
        res["reuse"].append(run_timed(ensure, env=env, cwd=project)[0])
    for i in range(n):
        for which in _orders(i, "quick", "deep"):
            deep = ["--deep"] if which == "deep" else []
            took = run_timed([*cli, "verify", KEY_A, *deep], env=env, cwd=project)[0]
            res["deep" if deep else "verify"].append(took)

    say(f"herd of {args.herd} vs one x{n} (load {load()}) ...")
    for i in range(n):
        for which in _orders(i, "herd", "one"):
            reset_env(home, KEY_A)
            if which == "herd":
                res["herd"].append(run_herd(ensure, args.herd, env=env, cwd=project)[0])
            else:
                res["herd_one"].append(run_timed(ensure, env=env, cwd=project)[0])

    say("second key ...")
    seen: set[tuple[int, int]] = set()
    size_and_files(HomeLayout(home).envs, seen)
    res["b_time"] = run_timed([*cli, "ensure", KEY_B], env=env, cwd=project)[0]
    res["b_added"], _files = size_and_files(env_prefix(home, KEY_B), seen)
    res["requests"], res["served"] = server.stats["requests"], server.stats["bytes"]
    return res
