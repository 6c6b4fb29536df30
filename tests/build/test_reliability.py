"""Reliability of ``ensure`` under kill -9, thundering herds and lock contention.

Every build here is real: the sample project's local channel of real conda
packages, its real locks, and the real CLI (``python -m provisioner ensure``) in
subprocesses with their own ``PROVISIONER_HOME``. The invariant checked after
every kill is the one a user relies on: the key's env is either absent or
complete (the pointer names a fingerprinted env whose python imports torch),
and the next ``ensure`` recovers without help.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from winsupport import IS_WINDOWS, SELF_KILLED_RC, needs_symlinks

from provisioner.build.fingerprint import in_progress_path, read_fingerprint
from provisioner.build.layout import (
    POINTER_NAME,
    HomeLayout,
    generation_name,
    python_path,
    read_pointer,
)
from provisioner.build.plan import locked_hash
from provisioner.config import load_config
from provisioner.fsops import MARKER_NAME, remove_unmarked_stub, write_marker
from provisioner.lock.platforms import host_platform
from provisioner.sample.project import create_sample_project

pytestmark = pytest.mark.slow

T = TypeVar("T")
KEY = "sample-cu121-transformers"
CPU_KEY = "sample-cpu-transformers"
FAULT_POINTS = ("after-mark", "after-install", "after-pip", "before-fingerprint",
                "before-promote", "before-pointer")
STEP_DELAY = "0.02"  # seconds slept at each fault point: widens the windows between steps
PROC_TIMEOUT_S = 120.0
SPEC_FILE = f"environment-specs/{KEY}.yml"
LOCK_FILE = f"lockfiles/{KEY}.conda-lock.yml"

# A second process that holds a key's lock the way provisioner takes it (an OS file lock).
HOLDER = """
import os, sys
from filelock import FileLock
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
lock = FileLock(sys.argv[1], is_singleton=False)
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


# --------------------------------------------------------------------------- helpers


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PROVISIONER_") and k != "PYTHONPATH"}
    env.update(PROVISIONER_HOME=str(home), CONDA_OVERRIDE_CUDA="12.1")
    env.update(extra)
    return env


def _start(project: Path, home: Path, key: str, *args: str, **extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "provisioner", "ensure", key, "--project", str(project),
           "--json", *args]
    return subprocess.Popen(cmd, env=_env(home, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=PROC_TIMEOUT_S)
    return proc.returncode, out, err


def _ensure(project: Path, home: Path, key: str = KEY, **extra: str) -> dict[str, object]:
    """One unkilled ``ensure``; must exit 0 and print its JSON result."""
    rc, out, err = _finish(_start(project, home, key, **extra))
    assert rc == 0, f"ensure {key} exited {rc}:\n{err}"
    result = json.loads(out)
    assert isinstance(result, dict)
    return result


def _generation_of(project: Path, key: str = KEY) -> str:
    """The generation that the project's current lock of ``key`` builds (as the planner says)."""
    config = load_config(project, environ={})
    return generation_name(locked_hash(config, key, host_platform()))


def _staging_dirs(home: Path) -> list[Path]:
    staging = HomeLayout(home).staging
    return sorted(staging.iterdir()) if staging.is_dir() else []


def _assert_runs(prefix: Path) -> None:
    """The env's python imports torch and transformers from the env itself."""
    code = "import torch, transformers; print(torch.__file__)"
    proc = subprocess.run([str(python_path(prefix)), "-c", code], capture_output=True,
                          text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, f"{prefix}: python cannot import torch:\n{proc.stderr}"
    assert proc.stdout.strip().startswith(str(prefix) + os.sep), proc.stdout


def _assert_complete(prefix: Path, key: str) -> None:
    fp = read_fingerprint(prefix)
    assert fp is not None, f"{prefix} has no valid fingerprint"
    assert (fp.key, fp.generation) == (key, prefix.name), fp
    assert generation_name(fp.lock_hash) == prefix.name, fp
    assert not in_progress_path(prefix).exists(), f"{prefix} is still marked in progress"
    assert python_path(prefix).exists(), f"{prefix} has no python"


def _assert_absent_or_complete(home: Path, key: str = KEY) -> str | None:
    """The key's env is absent or complete; returns the active generation.

    The pointer, if any, names a complete env whose python runs. Stronger, since
    generations are promoted by one rename after the fingerprint is written:
    every generation dir under ``envs/<key>/`` is complete, pointed to or not.
    """
    layout = HomeLayout(home)
    key_dir = layout.key_dir(key)
    if key_dir.is_dir():
        for entry in key_dir.iterdir():
            if entry.name == POINTER_NAME or entry.name.startswith("."):
                continue  # the pointer, and temp files of an interrupted atomic write
            assert entry.is_dir(), f"unexpected file {entry}"
            _assert_complete(entry, key)
    active = read_pointer(layout, key)
    if active is not None:
        prefix = layout.generation_dir(key, active)
        assert prefix.is_dir(), f"the pointer names {active}, which does not exist"
        _assert_complete(prefix, key)
        _assert_runs(prefix)
    return active


def _assert_recovered(home: Path, result: dict[str, object], gen: str, key: str = KEY) -> None:
    """After an unkilled ensure: the lock's generation is active, complete, and nothing is left."""
    prefix = HomeLayout(home).generation_dir(key, gen)
    assert result["python"] == str(python_path(prefix)), result
    assert _assert_absent_or_complete(home, key) == gen
    assert _staging_dirs(home) == [], "a staging dir was left behind"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample project, locked. Tests that change it work on a copy."""
    return create_sample_project(tmp_path_factory.mktemp("reliability") / "project").path


@pytest.fixture(scope="module")
def variants(project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Two (spec, lock) texts for KEY with different packages, so two generations.

    ``a`` is the sample's; ``b`` pins transformers 4.36.2, locked with the real CLI.
    """
    scratch = tmp_path_factory.mktemp("variant") / "project"
    shutil.copytree(project, scratch)
    spec = scratch / SPEC_FILE
    a = {"spec": spec.read_text(encoding="utf-8"),
         "lock": (scratch / LOCK_FILE).read_text(encoding="utf-8")}
    spec.write_text(a["spec"].replace("- transformers\n", "- transformers=4.36.2\n", 1),
                    encoding="utf-8")
    assert spec.read_text(encoding="utf-8") != a["spec"]
    proc = subprocess.run([sys.executable, "-m", "provisioner", "lock", KEY, "--project",
                           str(scratch)], capture_output=True, text=True, env=_env(scratch),
                          timeout=PROC_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    b = {"spec": spec.read_text(encoding="utf-8"),
         "lock": (scratch / LOCK_FILE).read_text(encoding="utf-8")}
    assert "4.36.2" in b["lock"] and b["lock"] != a["lock"]
    return {"a": a, "b": b}


def _use_variant(project: Path, variant: dict[str, str]) -> None:
    (project / SPEC_FILE).write_text(variant["spec"], encoding="utf-8")
    (project / LOCK_FILE).write_text(variant["lock"], encoding="utf-8")


@pytest.fixture
def own_project(project: Path, tmp_path: Path) -> Path:
    """A private copy of the sample project (its lock of KEY gets switched)."""
    dest = tmp_path / "project"
    shutil.copytree(project, dest)
    return dest


class _Rebuilds:
    """A home whose KEY is built; each ``arm()`` switches the lock to the other variant."""

    def __init__(self, project: Path, home: Path, variants: dict[str, dict[str, str]]) -> None:
        self.project, self.home, self.variants = project, home, variants
        self.current = "a"

    def arm(self) -> tuple[str, str]:
        """Switch the lock; returns (active generation, generation to build)."""
        active = read_pointer(HomeLayout(self.home), KEY)
        assert active is not None
        self.current = "b" if self.current == "a" else "a"
        _use_variant(self.project, self.variants[self.current])
        target = _generation_of(self.project)
        assert target != active
        # An older complete build of the target would be reused: collect it, as a GC would.
        shutil.rmtree(HomeLayout(self.home).generation_dir(KEY, target), ignore_errors=True)
        return active, target


# --------------------------------------------------------------------------- kill -9


def _next_line(proc: subprocess.Popen[str]) -> str:
    """Block until the process logs its next line (the first: it holds the lock and builds).

    Read byte by byte from the descriptor, so that ``communicate`` loses nothing later.
    """
    assert proc.stderr is not None
    fd, line = proc.stderr.fileno(), b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    return line.decode("utf-8", "replace")


def _in_parallel(*lanes: Callable[[], T]) -> list[T]:
    """Run independent lanes (own homes, own projects) at once; re-raise the first failure."""
    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        futures = [pool.submit(lane) for lane in lanes]
        return [f.result() for f in futures]


def _wait_until(proc: subprocess.Popen[str], condition: Callable[[], bool]) -> float:
    """Poll ``condition`` until it holds or ``proc`` exits; returns the time it held."""
    while not condition() and proc.poll() is None:
        time.sleep(0.003)
    return time.monotonic()


def _kill_lane(project: Path, homes: Path, rebuilds: _Rebuilds | None, seed: int,
               kills: int) -> Counter[str]:
    """``kills`` builds killed at random moments; each checked, then recovered.

    Without ``rebuilds`` every build starts in a fresh home (cold package cache);
    with it, every build is a rebuild beside a working generation in one kept home.
    A kill moment is a random delay after an anchor: for every third kill the
    build's first log line (it holds the key's lock and starts reading the lock
    file, which takes most of the time and writes nothing), for the others the
    appearance of its staging dir (it starts writing). The delays are stratified
    over the span from the anchor to the pointer switch of an unkilled build,
    plus a tenth for what follows the switch.
    """
    def arm() -> tuple[Path, str | None, str]:
        if rebuilds is None:
            shutil.rmtree(homes / "fresh", ignore_errors=True)
            return homes / "fresh", None, _generation_of(project)
        previous, target = rebuilds.arm()
        return rebuilds.home, previous, target

    def switched(home: Path, target: str) -> Callable[[], bool]:
        return lambda: read_pointer(HomeLayout(home), KEY) == target

    def staging(home: Path) -> Callable[[], bool]:
        return lambda: bool(_staging_dirs(home))

    if rebuilds is not None:
        assert _ensure(project, rebuilds.home)["action"] == "build"
    # Calibrate on one unkilled build of the same kind.
    home, _previous, target = arm()
    proc = _start(project, home, KEY, PROVISIONER_TEST_STEP_DELAY=STEP_DELAY)
    _next_line(proc)
    t_first = time.monotonic()
    t_stage = _wait_until(proc, staging(home))
    t_switch = _wait_until(proc, switched(home, target))
    rc, out, err = _finish(proc)
    assert rc == 0, err
    _assert_recovered(home, json.loads(out), target)
    spans = {"log": 1.1 * (t_switch - t_first), "staging": 1.1 * (t_switch - t_stage)}

    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    anchors = ["log" if k % 3 == 0 else "staging" for k in range(kills)]
    for k, anchor in enumerate(anchors):
        home, previous, target = arm()
        stratum, strata = anchors[:k].count(anchor), anchors.count(anchor)
        delay = spans[anchor] * (stratum + rng.random()) / strata
        where = f"{'rebuild' if previous else 'fresh'} kill {k}: {anchor} + {delay:.3f}s"
        proc = _start(project, home, KEY, PROVISIONER_TEST_STEP_DELAY=STEP_DELAY)
        first = _next_line(proc)
        if anchor == "staging":
            _wait_until(proc, staging(home))
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)  # a no-op on an exited, not yet reaped child
        rc, _out, err = _finish(proc)
        assert rc in (0, -signal.SIGKILL), f"{where}: exited {rc}:\n{first}{err}"

        active = _assert_absent_or_complete(home)
        if previous is not None:
            # A killed rebuild never takes the working env away.
            assert active in (previous, target), where
        outcomes["exited" if rc == 0 else "killed"] += 1
        outcomes["left staging"] += bool(_staging_dirs(home))
        outcomes["switched"] += active == target

        result = _ensure(project, home)
        allowed = {"build", "repair", "reuse"} | ({"rebuild"} if previous else set())
        assert result["action"] in allowed, (where, result["action"])
        _assert_recovered(home, result, target)
    outcomes.update({f"{name} span ms": round(s * 1000) for name, s in spans.items()})
    return outcomes


@pytest.mark.skipif(IS_WINDOWS, reason="a kill mid-install leaves the installer child running on "
                    "Windows (no PR_SET_PDEATHSIG, no job object; orphans.py records none there)")
def test_kill9_at_random_moments_leaves_env_absent_or_complete(
    project: Path, own_project: Path, variants: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    _use_variant(own_project, variants["a"])
    rebuilds = _Rebuilds(own_project, tmp_path / "home-kept", variants)
    fresh, kept = _in_parallel(
        lambda: _kill_lane(project, tmp_path, None, seed=11, kills=10),
        lambda: _kill_lane(own_project, tmp_path, rebuilds, seed=12, kills=10),
    )
    print(f"\nfresh homes: {dict(fresh)}\nkept home:   {dict(kept)}")
    # The kills must land inside builds, not only after them.
    assert fresh["killed"] + kept["killed"] >= 10, (fresh, kept)
    assert fresh["left staging"] + kept["left staging"] >= 2, (fresh, kept)


def _fault_lane(project: Path, home: Path, rebuilds: _Rebuilds | None,
                points: tuple[str, ...]) -> None:
    """A deterministic kill at each of ``points``: in fresh homes, or as rebuilds in a kept one."""
    if rebuilds is not None:
        _ensure(project, home)
    for point in points:
        if rebuilds is None:
            shutil.rmtree(home, ignore_errors=True)
            previous, target = None, _generation_of(project)
        else:
            previous, target = rebuilds.arm()
        rc, _out, err = _finish(_start(project, home, KEY, PROVISIONER_TEST_FAULT=point))
        assert rc == SELF_KILLED_RC, f"{point}: exited {rc}, not killed:\n{err}"

        active = _assert_absent_or_complete(home)
        assert active == previous, f"{point}: the pointer moved to {active}"
        built = HomeLayout(home).generation_dir(KEY, target)
        staged = _staging_dirs(home)
        if point == "before-pointer":
            _assert_complete(built, KEY)
            assert staged == []
        else:
            assert not built.exists(), f"{point}: {built} exists before promotion"
            assert len(staged) == 1, staged
            assert (staged[0] / MARKER_NAME).is_file()
            # The fingerprint is written last, and it clears the in-progress marker.
            assert in_progress_path(staged[0]).exists() == (point != "before-promote"), point

        result = _ensure(project, home)
        expected = "reuse" if point == "before-pointer" else "rebuild" if previous else "repair"
        assert result["action"] == expected, (point, result["reason"])
        _assert_recovered(home, result, target)


def test_kill9_at_each_fault_point_recovers(
    project: Path, own_project: Path, variants: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    """Each fault point once: alternately in a fresh home and as a rebuild beside a working env."""
    _use_variant(own_project, variants["a"])
    kept = tmp_path / "home-kept"
    _in_parallel(
        lambda: _fault_lane(project, tmp_path / "home-fresh", None, FAULT_POINTS[0::2]),
        lambda: _fault_lane(own_project, kept, _Rebuilds(own_project, kept, variants),
                            FAULT_POINTS[1::2]),
    )


def test_unmarked_staging_dir_from_an_early_kill_is_recovered(
    project: Path, tmp_path: Path
) -> None:
    """A kill between creating the staging dir and renaming its marker into place.

    No fault point sits in that window, so the leftover is made by hand: the
    directory and the temp file of the interrupted marker write. Anything else
    without a marker is still never deleted.
    """
    home = tmp_path / "home"
    layout = HomeLayout(home)
    gen = _generation_of(project)
    stage = layout.staging / f"{layout.staging_prefix(KEY)}{gen}.0a1b2c"
    stage.mkdir(parents=True)
    (stage / f".{MARKER_NAME}.tmp-0a1b2c3d").write_text('{"owner": "prov', encoding="utf-8")
    result = _ensure(project, home)
    assert result["action"] == "repair"
    _assert_recovered(home, result, gen)

    foreign = layout.staging / f"{layout.staging_prefix(KEY)}{gen}.d4e5f6"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not provisioner's", encoding="utf-8")
    shutil.rmtree(layout.key_dir(KEY))  # so that ensure must build, and clean staging first
    rc, _out, err = _finish(_start(project, home, KEY))
    # A leftover that does not block the build never fails it: refused, logged, kept.
    assert rc == 0 and "refusing to delete" in err and "no .provisioner-owned marker" in err, err
    assert (foreign / "notes.txt").is_file()
    assert not layout.trash.exists() or not any(layout.trash.iterdir())


@needs_symlinks
def test_remove_unmarked_stub_takes_only_what_an_early_kill_leaves(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert remove_unmarked_stub(empty) and not empty.exists()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / f".{MARKER_NAME}.tmp-12345678").write_text("{", encoding="utf-8")
    assert remove_unmarked_stub(partial) and not partial.exists()

    marked = tmp_path / "marked"
    marked.mkdir()
    write_marker(marked, "env")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data").write_text("x", encoding="utf-8")
    link = tmp_path / "link"
    link.symlink_to(empty.parent / "marked", target_is_directory=True)
    for keep in (marked, foreign, link, tmp_path / "missing"):
        assert not remove_unmarked_stub(keep), keep
    assert (foreign / "data").is_file() and (marked / MARKER_NAME).is_file()


# --------------------------------------------------------------------------- herds


def test_herd_of_eight_builds_the_key_once(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    procs = [_start(project, home, KEY, PROVISIONER_TEST_STEP_DELAY=STEP_DELAY)
             for _ in range(8)]
    finished = [_finish(p) for p in procs]
    for rc, _out, err in finished:
        assert rc == 0, err
    results = [json.loads(out) for _rc, out, _err in finished]
    actions = Counter(str(r["action"]) for r in results)
    assert actions["build"] + actions["repair"] == 1, actions
    assert actions["reuse"] == 7, actions
    assert len({r["python"] for r in results}) == 1
    waited = sum(1 for r in results if float(r["waited_seconds"]) > 0.05)
    print(f"\nherd of 8: {dict(actions)}, {waited} waited for the builder's lock")
    _assert_recovered(home, results[0], _generation_of(project))


def test_two_herds_on_two_keys_build_each_key_once(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    keys = [KEY, CPU_KEY] * 4
    procs = [_start(project, home, key, PROVISIONER_TEST_STEP_DELAY=STEP_DELAY) for key in keys]
    finished = [_finish(p) for p in procs]
    for rc, _out, err in finished:
        assert rc == 0, err
    results = [json.loads(out) for _rc, out, _err in finished]
    for key in (KEY, CPU_KEY):
        mine = [r for r in results if r["key"] == key]
        actions = Counter(str(r["action"]) for r in mine)
        assert actions["build"] + actions["repair"] == 1, (key, actions)
        assert actions["reuse"] == 3, (key, actions)
        assert len({r["python"] for r in mine}) == 1, key
        _assert_recovered(home, mine[0], _generation_of(project, key), key)


# The build machinery a waiter that finds its env ready must never load.
BUILD_MODULES = ("provisioner.build.package_checks", "provisioner.build.installer",
                 "provisioner.build.fetch", "provisioner.build.artifacts",
                 "provisioner.build.package_cache")
# ``ensure`` through the real CLI, reporting at exit which provisioner modules it loaded.
MODULE_PROBE = """
import atexit, json, sys
atexit.register(lambda: sys.__stderr__.write("MODULES=" + json.dumps(sorted(
    m for m in sys.modules if m.startswith("provisioner"))) + "\\n"))
from provisioner.cli import main
sys.argv = ["provisioner", *sys.argv[1:]]
main()
"""


def test_herd_waiters_never_load_the_build_machinery(project: Path, tmp_path: Path) -> None:
    # The builder slows down at each step once it holds the lock; the waiters start while
    # its staging dir exists, so they block on the key's lock and re-plan after it.
    home = tmp_path / "home"

    def start(**extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", MODULE_PROBE, "ensure", CPU_KEY, "--project", str(project),
             "--json"], env=_env(home, **extra), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)

    builder = start(PROVISIONER_TEST_STEP_DELAY="1.0")
    _wait_until(builder, lambda: bool(_staging_dirs(home)))
    waiters = [start() for _ in range(3)]
    runs = []
    for proc in [builder, *waiters]:
        rc, out, err = _finish(proc)
        assert rc == 0, err
        [line] = [ln for ln in err.splitlines() if ln.startswith("MODULES=")]
        runs.append((json.loads(out), set(json.loads(line[len("MODULES="):]))))
    (built, builder_modules), waited = runs[0], runs[1:]
    assert built["action"] == "build"
    assert set(BUILD_MODULES) <= builder_modules  # the probe sees what a build loads
    for result, modules in waited:
        assert result["action"] == "reuse", result
        assert modules.isdisjoint(BUILD_MODULES), sorted(modules & set(BUILD_MODULES))
        assert "provisioner.build.ensure" in modules
    # Started while the build held the lock, they blocked on it (unless one started so slowly
    # that the env was ready before it looked: then it took the lock-free reuse path).
    assert any(float(r["waited_seconds"]) > 0 for r, _ in waited), [r for r, _ in waited]


# --------------------------------------------------------------------------- lock timeout


def test_lock_timeout_names_the_lock_and_exits_2(project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    lock_path = HomeLayout(home).lock_file(KEY)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        rc, out, err = _finish(_start(project, home, KEY, "--lock-timeout", "1"))
        wall = time.monotonic() - t0
        holder_alive = holder.poll() is None
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=PROC_TIMEOUT_S)
    assert rc == 2, err
    # It gave up on its own (the holder still held the lock then), not before its timeout.
    assert wall >= 1.0 and holder_alive, wall
    assert json.loads(out)["error"]["type"] == "LockTimeoutError"  # --json: the error as JSON
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert str(lock_path) in errors[0] and "timed out" in errors[0], errors[0]
    assert not HomeLayout(home).key_dir(KEY).exists(), "nothing may be built without the lock"

    # Once the holder is gone, the same command builds.
    result = _ensure(project, home)
    assert result["action"] == "build"
    _assert_recovered(home, result, _generation_of(project))
