"""Whole-process timing helpers shared by ``bench_real.py`` and ``bench_build.py``.

A user pays interpreter start and imports on every call, so these time child
processes from the outside: median [min-max] of interleaved repeats, ratios of
medians with the spread of the per-repeat (paired) ratios, and the load average.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from provisioner import processes
from provisioner.lock.platforms import host_platform

BARE_SOLVE = r"""
import asyncio, sys, rattler
specs = [rattler.MatchSpec(s) for s in sys.argv[3:]]
recs = asyncio.run(rattler.solve(sources=[rattler.Channel(sys.argv[1])], specs=specs,
                                 platforms=[sys.argv[2], "noarch"]))
print(len(recs))
"""
BARE_INSTALL = r"""
import asyncio, json, sys, rattler
records = []
for r in json.load(open(sys.argv[1])):
    rec = rattler.PackageRecord(name=r["name"], version=r["version"],
        build=rattler.BuildString(r["build"]), build_number=r["build_number"],
        subdir=r["subdir"], depends=r["depends"], sha256=bytes.fromhex(r["sha256"]),
        md5=bytes.fromhex(r["md5"]) if r["md5"] else None)
    records.append(rattler.RepoDataRecord(rec, r["file_name"], r["url"], r["channel"]))
asyncio.run(rattler.install(records, target_prefix=sys.argv[2], cache_dir=sys.argv[3],
                            show_progress=False, execute_link_scripts=False))
import os, pathlib
linked = len(list(pathlib.Path(sys.argv[2], "conda-meta").glob("*.json")))
print(linked, flush=True)
# rattler's worker threads can outlive the install and abort the interpreter's
# finalisation (PyGILState_Release) when linking from a warm cache: leave at once.
os._exit(0 if linked == len(records) else 1)
"""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without provisioner's variables and without PYTHONDONTWRITEBYTECODE.

    The machines here set PYTHONDONTWRITEBYTECODE; a user's machine does not, and
    without ``.pyc`` files whole-process timings overstate start-up cost.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PROVISIONER_") and k not in ("PYTHONPATH",
                                                             "PYTHONDONTWRITEBYTECODE")}
    env.update(extra or {})
    return env


def cli_argv() -> list[str]:
    """How a user starts provisioner: the console script next to this interpreter."""
    script = Path(sys.executable).parent / "provisioner"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "provisioner"]


def run_timed(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path | None = None,
              timeout: float = 3600) -> tuple[float, processes.ProcResult]:
    """Wall seconds of one child process; raise with its stderr when it fails."""
    start = time.perf_counter()
    result = processes.run(list(argv), timeout=timeout, env=env, cwd=cwd)
    took = time.perf_counter() - start
    if not result.ok:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({result.returncode}):\n"
                           f"{result.stderr[-3000:]}{result.stdout[-1000:]}")
    return took, result


def run_all(argvs: Sequence[Sequence[str]], *, env: Mapping[str, str], cwd: Path | None = None,
            timeout: float = 3600) -> tuple[float, list[processes.ProcResult]]:
    """Start every argv at once; wall seconds until the last one ends (raise if one fails)."""
    n = len(argvs)
    results: list[processes.ProcResult | None] = [None] * n
    gate = threading.Barrier(n + 1)

    def one(i: int) -> None:
        gate.wait()
        results[i] = processes.run(list(argvs[i]), timeout=timeout, env=env, cwd=cwd)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    took = time.perf_counter() - start
    done = [r for r in results if r is not None]
    failed = [r for r in done if not r.ok]
    if failed or len(done) != n:
        raise RuntimeError(f"{len(failed)} of {n} failed:\n{failed[0].stderr[-3000:]}"
                           if failed else "a child did not finish")
    return took, done


def run_herd(argv: Sequence[str], n: int, *, env: Mapping[str, str], cwd: Path | None = None,
             timeout: float = 3600) -> tuple[float, list[processes.ProcResult]]:
    """Start ``n`` copies of ``argv`` at once; wall seconds until the last one ends."""
    return run_all([argv] * n, env=env, cwd=cwd, timeout=timeout)


def spread(values: Sequence[float], unit: str = "s", digits: int = 2) -> str:
    """``median [min-max] unit`` (the dash is an en dash)."""
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.{digits}f} [{min(values):.{digits}f}\u2013{max(values):.{digits}f}] {unit}"


def ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, str]:
    """Ratio of medians, and the spread of the paired per-repeat ratios."""
    r = statistics.median(num) / statistics.median(den)
    pairs = [a / b for a, b in zip(num, den, strict=False) if b > 0]
    return r, (f"[{min(pairs):.2f}\u2013{max(pairs):.2f}]" if pairs else "")


def load() -> str:
    """The 1, 5 and 15 minute load averages (numbers are noisy on a busy machine)."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def lock_records(lockfile: Path, url: str) -> list[dict[str, Any]]:
    """The conda records of ``lockfile`` for this platform, fetched from the channel at ``url``.

    What ``BARE_INSTALL`` reads: the same records ``ensure`` installs.
    """
    from provisioner.lock.reader import read_lockfile
    from provisioner.lock.solve import _BUILD_NUMBER_RE

    lock = read_lockfile(lockfile)
    out = []
    for p in lock.for_platform(host_platform(), "conda"):
        match = _BUILD_NUMBER_RE.search(p.build)
        out.append({"name": p.name, "version": p.version, "build": p.build,
                    "build_number": int(match.group(1)) if match else 0, "subdir": p.subdir,
                    "depends": [f"{n} {s}".strip() for n, s in p.dependencies],
                    "sha256": p.sha256, "md5": p.md5, "file_name": p.file_name,
                    "url": f"{url}/{p.subdir}/{p.file_name}", "channel": url + "/"})
    return out
