"""Hot-path benchmark: resolving a model whose env is ready.

Builds a sample project (offline), one shared env and one legacy venv, then measures side
by side in one run:

* in-process ``get_env_for_model`` for a ready shared env and for a legacy venv with a
  cached health result (median of N calls; budget 5 ms);
* ``provisioner resolve MODEL`` wall time against ``python -c "import click"`` (budget 2x);
* ``python -c "from provisioner import get_env_for_model"`` against a bare interpreter, and
  whether that import loaded rattler, conda-lock or rich (budget: none of them).

Run: ``python benchmarks/bench_resolve.py [--calls 500] [--runs 15]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _median_wall(argv: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    os.environ.setdefault("CONDA_OVERRIDE_CUDA", "12.1")

    from provisioner.config import load_config
    from provisioner.models.resolve import get_env_for_model
    from provisioner.sample.legacy_venvs import make_legacy_venv
    from provisioner.sample.project import create_sample_project

    root = Path(tempfile.mkdtemp(prefix="provisioner-bench-resolve-"))
    project = root / "project"
    create_sample_project(project)
    home = root / "home"
    config = load_config(project, home=home, environ={})
    assert config.legacy_root is not None
    make_legacy_venv(config.legacy_root, "meta-llama/Llama-2-7b-hf", {
        "torch": "2.2.1", "transformers": "4.40.0", "accelerate": "0.26.1",
        "bitsandbytes": "0.43.1"})
    shared_model, legacy_model = "mistralai/Mistral-7B-v0.1", "meta-llama/Llama-2-7b-hf"
    first = get_env_for_model(shared_model, config=config)
    assert first.source == "shared", first
    assert get_env_for_model(legacy_model, config=config).source == "legacy"

    rows = []
    cases = (("ready shared env", shared_model), ("legacy, cached health", legacy_model))
    for label, model in cases:
        samples = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            get_env_for_model(model, config=config)
            samples.append(time.perf_counter() - t0)
        rows.append((label, statistics.median(samples) * 1000, max(samples) * 1000))

    env = {**os.environ, "PROVISIONER_HOME": str(home)}
    py = sys.executable
    click_s = _median_wall([py, "-c", "import click"], args.runs, env)
    bare_s = _median_wall([py, "-c", "pass"], args.runs, env)
    import_s = _median_wall([py, "-c", "from provisioner import get_env_for_model"], args.runs, env)
    cli = [py, "-m", "provisioner", "-q", "resolve", shared_model, "--project", str(project)]
    resolve_s = _median_wall(cli, args.runs, env)
    probe = (
        "import sys; from provisioner import get_env_for_model; "
        f"get_env_for_model({shared_model!r}, project={str(project)!r}, home={str(home)!r}); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'rattler', 'conda_lock', 'rich'}))"
    )
    loaded = subprocess.run([py, "-c", probe], check=True, capture_output=True, text=True,
                            env=env).stdout.strip()

    print(f"in-process get_env_for_model, median of {args.calls} calls (budget 5 ms):")
    for label, median_ms, worst_ms in rows:
        verdict = "PASS" if median_ms <= 5 else "MISS"
        print(f"  {label:24} median {median_ms:7.3f} ms   worst {worst_ms:7.3f} ms   {verdict}")
    ratio = resolve_s / click_s
    print(f"wall time, median of {args.runs} runs:")
    print(f"  python -c pass                         {bare_s * 1000:7.1f} ms")
    print(f"  python -c 'import click'               {click_s * 1000:7.1f} ms")
    print(f"  import provisioner.get_env_for_model   {import_s * 1000:7.1f} ms")
    print(f"  provisioner resolve MODEL              {resolve_s * 1000:7.1f} ms   "
          f"{ratio:.2f}x import click (budget 2x) {'PASS' if ratio <= 2 else 'MISS'}")
    print(f"heavy modules loaded by a hot-path resolution: {loaded} "
          f"{'PASS' if loaded == '[]' else 'MISS'}")


if __name__ == "__main__":
    main()
