"""``bench_real.py --profile``: where a warm and a cold ``ensure`` of the real stack go.

Each run is a fresh interpreter with ``bench_phases.py``'s timers around provisioner's
functions (nested timed calls counted once); "other" is the rest of the whole process
(interpreter start, imports, plan, lock reading, fingerprint).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from bench_phases import CHILD, PHASES
from wholeproc import child_env, run_timed

PROFILE_PHASES = {
    "fetch + sha256": [("provisioner.build.artifacts", "verify_artifacts")],
    "package checks": [("provisioner.build.package_checks", "check_packages"),
                       ("provisioner.build.package_cache", "prepare")],
    **PHASES,
    "flush": [("provisioner.build.durability", "flush_tree")],
}


def _once(project: Path, home: Path, key: str) -> dict[str, float]:
    start = time.perf_counter()
    _t, result = run_timed([sys.executable, "-c", CHILD, str(project), str(home),
                            json.dumps(PROFILE_PHASES), key], env=child_env(), cwd=project)
    total = time.perf_counter() - start
    spent: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    spent = {k: spent.get(k, 0.0) for k in PROFILE_PHASES}
    spent["other"] = total - sum(spent.values())
    spent["total"] = total
    return spent


def profile(project: Path, warm_home: Path, root: Path, key: str, warm_runs: int = 3,
            cold_runs: int = 2) -> list[str]:
    """Lines of a phase table (median [min-max] s) for warm and cold builds of ``key``."""
    from bench_real import drop, reset_env

    runs: dict[str, list[dict[str, float]]] = {"warm": [], "cold": []}
    for _ in range(warm_runs):
        reset_env(warm_home, key)
        runs["warm"].append(_once(project, warm_home, key))
    for i in range(cold_runs):
        home = root / f"profile-cold-{i}"
        runs["cold"].append(_once(project, home, key))
        drop(home)

    def cell(kind: str, phase: str) -> str:
        values = [r[phase] for r in runs[kind]]
        return (f"{statistics.median(values):.2f} [{min(values):.2f}\u2013{max(values):.2f}]"
                if values else "-")

    lines = [f"| phase (n={warm_runs} warm, {cold_runs} cold) | warm ensure, s | cold ensure, s |",
             "|---|---|---|"]
    for phase in [*PROFILE_PHASES, "other", "total"]:
        lines.append(f"| {phase} | {cell('warm', phase)} | {cell('cold', phase)} |")
    return lines
