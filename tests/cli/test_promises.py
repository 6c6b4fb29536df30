"""The CLI's promises (issue 8 §2), each checked through the real console script.

Every ``--json`` output is validated against its schema in ``docs/schemas/``.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from provisioner.sample.legacy_venvs import make_legacy_venv

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "docs" / "schemas"
PROVISIONER = Path(sysconfig.get_path("scripts")) / (
    "provisioner.exe" if sys.platform == "win32" else "provisioner"
)
CPU = "sample-cpu-transformers"
CU121 = "sample-cu121-transformers"
LLAMA = "meta-llama/Llama-2-7b-hf"
ANSI = re.compile(r"\x1b\[")
COMMANDS = ["lock", "show-lock", "diff", "sample", "ensure", "verify", "gc", "resolve", "migrate",
            "list", "health", "doctor", "demo", "pack", "mirror"]


def validate(name: str, text: str) -> dict[str, Any]:
    """Parse ``text`` as one JSON object and validate it against ``docs/schemas/<name>``."""
    data = json.loads(text)
    assert isinstance(data, dict), "one object per command, never a top-level list"
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(data, schema, cls=jsonschema.Draft202012Validator)
    return data


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The caller's environment minus provisioner settings; a CUDA 12.1 driver is pretended."""
    base = tmp_path_factory.mktemp("promises-env")
    result = {k: v for k, v in os.environ.items()
              if not k.startswith(("PROVISIONER_", "XDG_", "CONDA_", "UV_", "RUST_LOG"))
              and k != "NO_COLOR"}
    result.update(HOME=str(base), XDG_CACHE_HOME=str(base / "cache"), UV_OFFLINE="1",
                  CONDA_OVERRIDE_CUDA="12.1")
    return result


def run(args: list[str], cwd: Path, env: dict[str, str], **kwargs: Any
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(PROVISIONER), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300, **kwargs)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """A sample project with an old venv for LLAMA; the home is ``<project>/../home``."""
    work = tmp_path_factory.mktemp("promises")
    assert run(["sample", "proj"], work, env).returncode == 0
    project = work / "proj"
    make_legacy_venv(project / "environments", LLAMA, {
        "torch": "2.2.1", "transformers": "4.40.0", "accelerate": "0.26.1",
        "bitsandbytes": "0.43.1"})
    return project


def home_of(project: Path) -> Path:
    return project.parent / "home"


# --- global options -------------------------------------------------------------------------


def test_global_options_before_or_after_the_command(world: Path, env: dict[str, str]) -> None:
    home = home_of(world)
    after = run(["ensure", CPU, "--dry-run", "--json", "--home", str(home), "-q"], world, env)
    before = run(["--home", str(home), "-q", "ensure", CPU, "--dry-run", "--json"], world, env)
    for result in (after, before):
        assert result.returncode == 0, result.stderr
        assert validate("ensure", result.stdout)["prefix"].startswith(str(home))
    # A relative --home is relative to where the command runs, and comes out absolute.
    rel = run(["ensure", CPU, "--dry-run", "--json", "--home", "h2", "--project", "proj"],
              world.parent, env)
    assert validate("ensure", rel.stdout)["prefix"].startswith(str(world.parent / "h2"))


def test_demo_honours_provisioner_home_and_says_where(tmp_path: Path,
                                                      env: dict[str, str]) -> None:
    home = tmp_path / "demo-home"
    result = run(["demo", "--json"], tmp_path, env | {"PROVISIONER_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    report = validate("demo", result.stdout)
    assert report["home"] == str(home) and report["project"].startswith(str(home))
    assert [s["source"] for s in report["scenarios"]] == [
        "legacy", "shared", "shared", "legacy-degraded"]
    assert (home / "envs" / CU121).is_dir()
    assert f"into {home}" in result.stderr
    # Run again: the home is no longer empty, and nothing in it is touched.
    again = run(["demo", "--json", "--home", str(home)], tmp_path, env)
    assert again.returncode == 2
    error = validate("error", again.stdout)["error"]
    assert "not empty" in error["message"] and error["exit_code"] == 2
    assert again.stderr.startswith("error: ")


def test_demo_text_names_its_home(tmp_path: Path, env: dict[str, str]) -> None:
    home = tmp_path / "d"
    result = run(["--home", str(home), "demo"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert f"demo home (envs, package cache, state): {home}" in result.stdout
    assert f"demo project (specs, locks, old venvs): {home / 'demo-project'}" in result.stdout


# --- run ------------------------------------------------------------------------------------


def test_run_options_before_the_double_dash_are_provisioners(world: Path,
                                                             env: dict[str, str]) -> None:
    home = ["--home", str(home_of(world))]
    # No env is built and --no-build forbids it: provisioner's options were parsed, and the
    # command after -- was never run (today's bug ran '--policy' as the command).
    refused = run(["run", "gpt2", "--policy", "ignore", "--no-build", *home, "--", "true"],
                  world, env)
    assert refused.returncode == 2, refused.stderr
    assert "building is disabled" in refused.stderr
    code = "import os, sys; print(os.environ['CONDA_PREFIX']); sys.stderr.write('child says hi\\n')"
    child = run(["run", "gpt2", "--policy", "ignore", *home, "--", "python", "-c", code,
                 "--policy", "-v"], world, env)
    assert child.returncode == 0, child.stderr
    assert Path(child.stdout.strip()).parent.name == CPU
    assert child.stderr == "child says hi\n"  # no provisioner log line in the child's stderr
    verbose = run(["run", "gpt2", "-v", *home, "--", "python", "-c", code], world, env)
    assert "shared env: used" in verbose.stderr
    assert verbose.stderr.endswith("child says hi\n")
    missing = run(["run", "gpt2", *home, "python"], world, env)
    assert missing.returncode == 2 and "unexpected extra argument" in missing.stderr


# --- verbosity ------------------------------------------------------------------------------


def test_verbosity_levels(world: Path, env: dict[str, str], tmp_path: Path) -> None:
    def ensure(*flags: str, home: str) -> str:
        result = run(["ensure", CPU, "--home", str(tmp_path / home), *flags], world, env)
        assert result.returncode == 0, result.stderr
        return result.stderr

    quiet = ensure("-q", home="q")
    normal = ensure(home="n")
    debug = ensure("-v", home="v")
    detail = ensure("-vv", home="vv")
    assert quiet == ""
    assert f"build {CPU}: no env for this key yet" in normal
    assert "ran " not in normal and "project " not in normal
    assert f"home {tmp_path / 'v'}" in debug and "ran " in debug  # provisioner's decisions
    assert "rattler:" not in debug
    decided = run(["resolve", LLAMA, "--home", str(tmp_path / "v"), "-v"], world, env).stderr
    assert f"{LLAMA}: rule meta-llama/* requires bitsandbytes>=0.43, cuda==12.1 -> " in decided
    assert f"{LLAMA}: env key sample-cu121-transformers-bnb, legacy policy prefer" in decided
    assert "legacy policy" not in run(["resolve", LLAMA, "--home", str(tmp_path / "v")],
                                      world, env).stderr
    assert re.search(rf"rattler: {CPU}: transaction of \d+ operation", detail)  # rattler's own
    code = "import os; print(os.environ.get('RUST_LOG'))"
    child = run(["run", "gpt2", "-vv", "--home", str(tmp_path / "n"), "--", "python", "-c", code],
                world, env)
    assert child.stdout.strip() == "uv=debug,rattler=debug"  # what uv reads at -vv


# --- JSON -----------------------------------------------------------------------------------


def test_every_command_json_matches_its_schema(world: Path, env: dict[str, str],
                                               tmp_path: Path) -> None:
    project = Path(shutil.copytree(world, tmp_path / "p", symlinks=True))
    h = ["--home", str(tmp_path / "home")]
    seen: set[str] = set()

    def check(name: str, args: list[str], code: int = 0, cwd: Path = project) -> dict[str, Any]:
        result = run([*args, "--json", *h], cwd, env)
        assert result.returncode == code, result.stderr
        seen.add(name)
        return validate(name, result.stdout)

    assert check("lock", ["lock", "--check"])["check"] is True
    locked = check("lock", ["lock", CPU, "--skip-pip"])
    assert locked["keys"][0]["lockfile"] == str(project / "lockfiles" / f"{CPU}.conda-lock.yml")
    relocked = check("lock", ["lock", CPU, "--update-all", "--skip-pip"])
    assert relocked["keys"][0]["diff"]["changed"] is False  # the sample channel has one build
    shown = check("show-lock", ["show-lock", f"lockfiles/{CPU}.conda-lock.yml"])
    assert shown["path"] == str(project / "lockfiles" / f"{CPU}.conda-lock.yml")
    assert check("show-lock", ["show-lock", CPU])["key"] == CPU
    diff = check("diff", ["diff", f"lockfiles/{CPU}.conda-lock.yml",
                          f"lockfiles/{CU121}.conda-lock.yml"])
    assert diff["old"] == str(project / "lockfiles" / f"{CPU}.conda-lock.yml")
    if shutil.which("git"):
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "locks"]):
            subprocess.run([*git, *args], cwd=project, check=True, capture_output=True)
        since = check("diff", ["diff", "--git", "HEAD", CPU])
        assert [k["key"] for k in since["keys"]] == [CPU] and not since["keys"][0]["changed"]
    sample = check("sample", ["sample", "other"], cwd=tmp_path)
    assert sample["path"] == str(tmp_path / "other")
    dry = check("ensure", ["ensure", CPU, "--dry-run"])
    real = check("ensure", ["ensure", CPU])
    assert set(dry) == set(real) and set(dry["plan"]) == set(real["plan"])
    assert dry["plan"]["packages_to_link"] == real["plan"]["packages_to_link"] > 0
    assert check("ensure", ["ensure", CPU])["plan"]["packages_to_link"] is None  # reuse
    assert check("verify", ["verify", CPU])["ok"] is True
    packed = check("pack", ["pack", CPU, "-o", "cpu.tar"])
    assert packed["path"] == str(project / "cpu.tar") and packed["conda_packages"] > 0
    from_pack = check("ensure", ["ensure", CPU, "--from", "cpu.tar"])
    assert from_pack["action"] == "reuse" and from_pack["pack"]["key"] == CPU
    assert from_pack["pack"]["lock_sha256"] == packed["lock_sha256"]
    mirrored = check("mirror", ["mirror", CPU, CU121, "mirror"])
    mirror_dir = project / "mirror" / "provisioner-sample"
    assert [c["path"] for c in mirrored["channels"]] == [str(mirror_dir)]
    check("gc", ["gc", "--dry-run"])
    assert check("resolve", ["resolve", "gpt2"])["source"] == "shared"
    assert check("resolve", ["resolve", LLAMA])["source"] == "legacy"
    plan = check("migrate", ["migrate", "--all", "--dry-run"])
    assert plan["plan"]["items"][0]["legacy_dir"].startswith(str(project))
    migrated = check("migrate", ["migrate", "--model", LLAMA])
    assert migrated["results"][0]["health"]["checked_at"]
    inventory = check("list", ["list"])
    assert [LLAMA] in [row["models"] for row in inventory["shared"]]
    check("health", ["health"])
    check("health", ["health", "--legacy"])
    check("doctor", ["doctor"])
    seen.add("demo")  # validated in test_demo_honours_provisioner_home_and_says_where
    assert seen == set(COMMANDS)
    assert {p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json")} == {
        *COMMANDS, "error"}


def test_list_shows_migrated_models_and_iso_times(world: Path, env: dict[str, str],
                                                  tmp_path: Path) -> None:
    project = Path(shutil.copytree(world, tmp_path / "p", symlinks=True))
    h = ["--home", str(tmp_path / "home")]
    assert run(["migrate", "--model", LLAMA, *h], project, env).returncode == 0
    inventory = validate("list", run(["list", "--json", *h], project, env).stdout)
    [row] = inventory["shared"]
    assert row["key"] == "sample-cu121-transformers-bnb" and row["models"] == [LLAMA]
    assert row["last_used"] is None  # migrated, not loaded yet
    assert run(["resolve", LLAMA, *h], project, env).returncode == 0
    [row] = validate("list", run(["list", "--json", *h], project, env).stdout)["shared"]
    assert row["models"] == [LLAMA] and row["last_used"].endswith("+00:00")
    text = run(["list", *h], project, env).stdout
    assert re.search(r"sample-cu121-transformers-bnb .* meta-llama/Llama-2-7b-hf$", text, re.M)
    # Once a later load serves it from another key, it is listed there only.
    time.sleep(1.1)  # migrations are recorded to the second
    rules = project / "environment-specs" / "models.yml"
    data = yaml.safe_load(rules.read_text(encoding="utf-8"))
    data["rules"].insert(0, {"model": LLAMA, "env": CPU})
    rules.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert run(["resolve", LLAMA, "--policy", "ignore", *h], project, env).returncode == 0
    rows = validate("list", run(["list", "--json", *h], project, env).stdout)["shared"]
    assert {r["key"]: r["models"] for r in rows} == {CPU: [LLAMA],
                                                      "sample-cu121-transformers-bnb": []}


@pytest.mark.parametrize("args", [["ensure", "no-such-key"], ["lock", "--check", "../x"],
                                  ["ensure", "--no-such-option"], ["resolve", "unknown/model"]])
def test_json_errors(world: Path, env: dict[str, str], args: list[str]) -> None:
    result = run([*args, "--json", "--home", str(home_of(world))], world, env)
    assert result.returncode == 2
    error = validate("error", result.stdout)["error"]
    assert error["exit_code"] == 2 and error["message"]
    assert error["message"] in result.stderr  # the text stays on stderr
    without = run([*args, "--home", str(home_of(world))], world, env)
    assert without.stdout == "" and without.returncode == 2


# --- colour and progress --------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_color_options_and_no_color(world: Path, env: dict[str, str]) -> None:
    assert ANSI.search(run(["lock", "--check", "--color", "always"], world, env).stdout)
    assert not ANSI.search(run(["lock", "--check"], world, env).stdout)  # not a terminal
    assert not ANSI.search(run(["lock", "--check", "--color", "never"], world, env).stdout)
    # NO_COLOR turns colour off where it would be on (here, forced by a pty); --color wins.
    assert ANSI.search(run_on_pty(["lock", "--check"], world, env, stdout=True))
    assert not ANSI.search(run_on_pty(["lock", "--check"], world, env | {"NO_COLOR": "1"},
                                      stdout=True))
    assert ANSI.search(run(["lock", "--check", "--color", "always"], world,
                           env | {"NO_COLOR": "1"}).stdout)
    assert not ANSI.search(run(["--color", "always", "lock", "--check", "--json"], world,
                               env).stdout)


def run_on_pty(args: list[str], cwd: Path, env: dict[str, str], *, stdout: bool = False) -> str:
    """Run with stderr (or stdout) on a pseudo-terminal; return what the terminal got."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(PROVISIONER), *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=slave if stdout else subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL if stdout else slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_progress_only_on_a_terminal(world: Path, env: dict[str, str], tmp_path: Path) -> None:
    hide_cursor = "\x1b[?25l"  # rich's live display hides the cursor while it draws
    on_tty = run_on_pty(["ensure", CPU, "--home", str(tmp_path / "a")], world, env)
    assert hide_cursor in on_tty
    off = run_on_pty(["ensure", CPU, "--home", str(tmp_path / "b"), "--no-progress"], world, env)
    assert hide_cursor not in off and f"{CPU} is ready" in off
    piped = run(["ensure", CPU, "--home", str(tmp_path / "c")], world, env)
    assert not ANSI.search(piped.stderr) and not ANSI.search(piped.stdout)


# --- help, exit codes, completion -----------------------------------------------------------


EXIT_LINES = ["0  ok", "1  a check failed", "2  a user or environment problem", "3  a bug"]


def test_exit_codes_in_help_and_readme(tmp_path: Path, env: dict[str, str]) -> None:
    text = run(["--help"], tmp_path, env).stdout
    assert "Exit codes:" in text
    for line in EXIT_LINES:
        assert line in text
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for code, meaning in (("0", "ok"), ("1", "a check failed"),
                          ("2", "a user or environment problem"), ("3", "a bug")):
        assert f"| {code} | {meaning}" in readme


def test_completion_scripts(tmp_path: Path, env: dict[str, str]) -> None:
    markers = {"bash": "complete -o nosort -F _provisioner_completion provisioner",
               "zsh": "compdef _provisioner_completion provisioner",
               "fish": "complete --no-files --command provisioner"}
    for shell, marker in markers.items():
        result = run(["completion", shell], tmp_path, env)
        assert result.returncode == 0 and marker in result.stdout, result.stdout
    # The script's protocol works against the real command.
    asked = run([], tmp_path, env | {"_PROVISIONER_COMPLETE": "bash_complete",
                                     "COMP_WORDS": "provisioner sh", "COMP_CWORD": "1"})
    assert asked.stdout.split() == ["plain,show-lock"]
    if shutil.which("bash") and sys.platform != "win32":
        script = ('eval "$(provisioner completion bash)"; COMP_WORDS=(provisioner ens); '
                  'COMP_CWORD=1; _provisioner_completion provisioner; echo "${COMPREPLY[@]}"')
        path = os.pathsep.join([str(PROVISIONER.parent), env["PATH"]])
        done = subprocess.run(["bash", "-c", script], env=env | {"PATH": path},
                              capture_output=True, text=True, timeout=60)
        assert done.stdout.split() == ["ensure"], done.stderr
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert 'eval "$(provisioner completion bash)"' in readme


# --- text a new user tripped over -----------------------------------------------------------


def test_health_columns_are_aligned(world: Path, env: dict[str, str], tmp_path: Path) -> None:
    h = ["--home", str(tmp_path / "home")]
    for key in (CPU, CU121):
        assert run(["ensure", key, *h], world, env).returncode == 0
    lines = run(["health", *h], world, env).stdout.splitlines()
    assert len(lines) == 2
    starts = {line.index(str(tmp_path)) for line in lines}
    assert len(starts) == 1, lines  # the path column starts at one offset
    legacy = [line for line in run(["health", "--legacy", *h], world, env).stdout.splitlines()
              if not line.startswith("  ")]
    assert legacy and all(line.split()[1] == "legacy" for line in legacy)


def test_backend_reason_reads_once(world: Path, env: dict[str, str], tmp_path: Path) -> None:
    result = run(["ensure", CPU, "--home", str(tmp_path / "h")], world, env)
    assert "backend rattler (the default, embedded)" in result.stderr
    assert "((" not in result.stderr and "))" not in result.stderr
    dry = run(["ensure", CU121, "--dry-run", "--home", str(tmp_path / "h")], world, env)
    assert "  backend           rattler (the default, embedded)" in dry.stdout.splitlines()


def test_migrate_prints_its_plan_once(world: Path, env: dict[str, str], tmp_path: Path) -> None:
    result = run(["migrate", "--all", "--dry-run", "--home", str(tmp_path / "h")], world, env)
    assert result.returncode == 0, result.stderr
    both = result.stdout + result.stderr
    assert both.count("record the migration in the state file") == 1
    assert result.stderr == ""


def test_diff_names_every_unchanged_package(world: Path, env: dict[str, str]) -> None:
    locks = world / "lockfiles"
    result = run(["diff", str(locks / f"{CPU}.conda-lock.yml"),
                  str(locks / f"{CU121}.conda-lock.yml"), "--json"], world, env)
    data = validate("diff", result.stdout)
    text = run(["diff", str(locks / f"{CPU}.conda-lock.yml"),
                str(locks / f"{CU121}.conda-lock.yml")], world, env).stdout
    for pd in data["platforms"]:
        named = [c["name"] for c in pd["gpu_unchanged"]] + pd["other_unchanged"]
        assert len(named) == pd["counts"]["unchanged"] > 0
        for name in named:
            assert re.search(rf"unchanged: .*\b{re.escape(name)}\b", text)


def test_rule_with_env_and_requires_is_refused_as_documented(
        world: Path, env: dict[str, str], tmp_path: Path) -> None:
    project = Path(shutil.copytree(world, tmp_path / "p", symlinks=True))
    rules = project / "environment-specs" / "models.yml"
    data = yaml.safe_load(rules.read_text(encoding="utf-8"))
    data["rules"].append({"model": "both/*", "env": CPU, "requires": ["torch>=2"]})
    rules.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = run(["resolve", "both/x", "--home", str(tmp_path / "h")], project, env)
    assert result.returncode == 2
    assert "needs exactly one of 'env' or 'requires'" in result.stderr
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "exactly one of `env:` or `requires:`" in readme
