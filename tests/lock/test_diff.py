"""``provisioner diff``: real third-party locks, hand-made locks, and ``--git`` in a real repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conda_lock.lockfile import parse_conda_lock_file

from provisioner.lock.diff import LockDiff, diff_locks, render_markdown, render_text
from provisioner.lock.lockfile import LockData, LockedPackage
from provisioner.sample.project import create_sample_project, sample_platforms
from provisioner.sample.stack import PackageFile, build_conda_package, index_channel

REAL = Path(__file__).resolve().parents[1] / "data" / "real-locks"
PT221 = REAL / "pyrovelocity-pt2.2.1-py311-cu121.conda-lock.yml"
PT231 = REAL / "pyrovelocity-pt2.3.1-cu121.conda-lock.yml"
CPU_5PLAT = REAL / "eotles-ai-research-env-cpu-5plat.conda-lock.yml"
GPU_1PLAT = REAL / "eotles-ai-research-env-gpu.conda-lock.yml"
CU121 = "sample-cu121-transformers"
DEAD_PROXY = "http://127.0.0.1:9"
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def cli_env(home: Path) -> dict[str, str]:
    """The caller's environment minus provisioner/git settings, with no network."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PROVISIONER_", "XDG_", "CONDA_", "UV_", "GIT_"))}
    env.update(HOME=str(home), USERPROFILE=str(home), UV_OFFLINE="1", PYTHONIOENCODING="utf-8",
               GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        env[var] = DEAD_PROXY
    return env


def provisioner(
    args: list[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "provisioner", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


# --- real locks ---------------------------------------------------------------------------


def plain_set_comparison(old: Path, new: Path) -> dict[str, dict[str, set[tuple[str, str]]]]:
    """Independent of provisioner: per platform, (manager, name) sets from conda-lock's parser."""

    def index(path: Path) -> dict[str, dict[tuple[str, str], tuple[str, str]]]:
        out: dict[str, dict[tuple[str, str], tuple[str, str]]] = defaultdict(dict)
        for dep in parse_conda_lock_file(path).package:
            stem = str(dep.url).rsplit("/", 1)[-1].removesuffix(".conda").removesuffix(".tar.bz2")
            build = stem.split("-")[-1] if dep.manager == "conda" else ""
            out[dep.platform][(dep.manager, dep.name)] = (str(dep.version), build)
        return out

    a, b = index(old), index(new)
    result = {}
    for platform in set(a) | set(b):
        before, after = a.get(platform, {}), b.get(platform, {})
        both = set(before) & set(after)
        result[platform] = {
            "added": set(after) - set(before),
            "removed": set(before) - set(after),
            "changed": {k for k in both if before[k] != after[k]},
            "unchanged": {k for k in both if before[k] == after[k]},
        }
    return result


def test_real_locks_gpu_changes_come_first(tmp_path: Path) -> None:
    result = provisioner(["diff", str(PT221), str(PT231)], tmp_path, cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "linux-64: 291 changed, 78 added, 13 removed, 230 unchanged"
    first = lines[2:7]
    assert first[0].split()[:4] == ["python", "3.11.8", "(hab00c5b_0_cpython)", "->"]
    assert first[0].endswith("downgrade")
    assert first[1].split()[:2] == ["pytorch", "2.2.1"]
    assert "2.3.1 (py3.10_cuda12.1_cudnn8.9.2_0)" in first[1]
    assert first[1].endswith("upgrade (CUDA 12.1)")
    assert first[2].split()[0] == "cudnn" and "8.9.7.29" in first[2]
    assert first[3].split()[0] == "nccl"
    assert first[4].startswith("  unchanged: pytorch-cuda 12.1 (ha16c6d3_5), cuda-version 11.8")
    assert lines[7].startswith("  225 other unchanged: _libgcc_mutex, _openmp_mutex, ")
    assert len(lines[7].split(": ", 1)[1].split(", ")) == 225
    assert lines[8] == "  378 other package(s): 287 changed, 78 added, 13 removed"


@pytest.mark.parametrize(("old", "new"), [(PT221, PT231), (CPU_5PLAT, GPU_1PLAT)])
def test_counts_match_a_plain_set_comparison(old: Path, new: Path, tmp_path: Path) -> None:
    result = provisioner(["diff", str(old), str(new), "--json"], tmp_path, cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    expected = plain_set_comparison(old, new)
    assert {p["platform"] for p in data["platforms"]} == set(expected)
    for pd in data["platforms"]:
        want = expected[pd["platform"]]
        assert pd["counts"] == {k: len(want[k]) for k in ("changed", "added", "removed",
                                                         "unchanged")}
        entries = pd["gpu_relevant"] + pd["others"]
        for kind in ("added", "removed"):
            assert {(e["manager"], e["name"]) for e in entries if e["change"] == kind} == want[kind]
        assert {(e["manager"], e["name"]) for e in entries
                if e["change"] not in ("added", "removed")} == want["changed"]


def test_a_platform_only_in_one_lock() -> None:
    from provisioner.lock.diff import diff_files

    diff = diff_files(CPU_5PLAT, GPU_1PLAT)
    presence = {p.platform: p.presence for p in diff.platforms}
    assert presence == {"linux-64": "both", "linux-aarch64": "removed", "osx-64": "removed",
                        "osx-arm64": "removed", "win-64": "removed"}
    win = next(p for p in diff.platforms if p.platform == "win-64")
    assert not win.added and not win.changed and win.unchanged_count == 0 and win.removed
    assert "## a -> b" in render_markdown(diff, "a -> b")
    assert "### win-64 (removed)" in render_markdown(diff, "a -> b")


def test_markdown_of_real_locks_is_a_pr_body() -> None:
    from provisioner.lock.diff import diff_files

    md = render_markdown(diff_files(PT221, PT231), "pyrovelocity")
    lines = md.splitlines()
    assert lines[0] == "## pyrovelocity"
    assert lines[2] == "### linux-64"
    table = lines.index("| Package | Old | New | Change |")
    assert lines[table + 1] == "| --- | --- | --- | --- |"
    assert lines[table + 2] == ("| python | 3.11.8 `hab00c5b_0_cpython` | "
                                "3.10.14 `hd12c33a_0_cpython` | downgrade |")
    assert lines[table + 3].startswith("| pytorch | 2.2.1 `py3.11_cuda12.1_cudnn8.9.2_0` |")
    assert "<details><summary>378 other package(s): 287 changed, 78 added, 13 removed</summary>" \
        in lines
    assert md.endswith("\n</details>\n")
    # Every "other" package has its own row inside the details block.
    start = next(i for i, line in enumerate(lines) if line.startswith("<details>"))
    rows = [line for line in lines[start:] if line.startswith("| ")]
    assert rows[:2] == ["| Package | Old | New | Change |", "| --- | --- | --- | --- |"]
    assert len(rows) == 2 + 378


# --- hand-made locks ----------------------------------------------------------------------


def pkg(name: str, version: str, build: str = "0", *, manager: str = "conda",
        platform: str = "linux-64") -> LockedPackage:
    if manager == "conda":
        url = f"https://conda.anaconda.org/c/{platform}/{name}-{version}-{build}.conda"
    else:
        url = f"https://pypi.invalid/{name}-{version}-py3-none-any.whl"
    return LockedPackage(name=name, version=version, manager=manager, platform=platform,
                         url=url, sha256="0" * 64)


def lock(*packages: LockedPackage, platforms: tuple[str, ...] = ("linux-64",)) -> LockData:
    return LockData(platforms=platforms, channels=("c",), content_hash={}, packages=packages)


def changes(diff: LockDiff) -> dict[tuple[str, str], str]:
    [pd] = diff.platforms
    return {(c.manager, c.name): c.change_text() for c in pd.all_changes()}


def test_added_removed_and_changed() -> None:
    old = lock(pkg("numpy", "1.26.4", "py311_0"), pkg("six", "1.16.0"), pkg("zlib", "1.3", "h1"),
               pkg("openssl", "3.0.13", "h1"), pkg("tzdata", "2024a", "h0"))
    new = lock(pkg("numpy", "2.0.0", "py311_0"), pkg("zlib", "1.2.13", "h1"),
               pkg("openssl", "3.0.13", "h2"), pkg("tzdata", "2024b", "h0"), pkg("rich", "13.7"))
    diff = diff_locks(old, new)
    assert changes(diff) == {
        ("conda", "numpy"): "upgrade", ("conda", "zlib"): "downgrade",
        ("conda", "openssl"): "rebuild", ("conda", "tzdata"): "upgrade",
        ("conda", "rich"): "added", ("conda", "six"): "removed",
    }
    [pd] = diff.platforms
    assert pd.counts == {"changed": 4, "added": 1, "removed": 1, "unchanged": 0}
    assert diff.has_changes
    json.dumps(diff.to_dict())
    assert render_text(diff)[0] == "linux-64: 4 changed, 1 added, 1 removed, 0 unchanged"
    assert render_text(diff)[1] == "  6 other package(s): 4 changed, 1 added, 1 removed"


def test_pip_only_change() -> None:
    conda = (pkg("python", "3.11.8", "hab00c5b_0_cpython"), pkg("pytorch", "2.2.1", "py3.11_cpu_0"))
    old = lock(*conda, pkg("bitsandbytes", "0.43.1", manager="pip"),
               pkg("Typing_Extensions", "4.9.0", manager="pip"))
    new = lock(*conda, pkg("bitsandbytes", "0.43.3", manager="pip"),
               pkg("typing-extensions", "4.9.0", manager="pip"), pkg("peft", "0.10", manager="pip"))
    diff = diff_locks(old, new)
    assert changes(diff) == {("pip", "bitsandbytes"): "upgrade", ("pip", "peft"): "added"}
    [pd] = diff.platforms
    assert pd.unchanged_count == 3  # python, pytorch and typing-extensions (same canonical name)
    lines = render_text(diff)
    assert lines[1].split() == ["bitsandbytes", "(pip)", "0.43.1", "->", "0.43.3", "upgrade"]
    assert lines[2] == ("  unchanged: python 3.11.8 (hab00c5b_0_cpython), "
                        "pytorch 2.2.1 (py3.11_cpu_0)")
    assert lines[3] == "  1 other unchanged: typing-extensions (pip)"
    assert lines[4] == "  1 other package(s): 1 added"
    md = render_markdown(diff, "k")
    assert "| bitsandbytes (pip) | 0.43.1 | 0.43.3 | upgrade |" in md
    assert "| peft (pip) | - | 0.10 | added |" in md


def test_same_name_in_another_manager_is_another_package() -> None:
    old = lock(pkg("bitsandbytes", "0.43.3", manager="pip"))
    new = lock(pkg("bitsandbytes", "0.43.3", "cuda121_py311h0"))
    assert changes(diff_locks(old, new)) == {("pip", "bitsandbytes"): "removed",
                                             ("conda", "bitsandbytes"): "added"}


def test_pytorch_cuda_line_move_is_named() -> None:
    old = lock(pkg("pytorch", "2.2.1", "py3.11_cuda11.8_cudnn8.7.0_0"), pkg("pytorch-cuda", "11.8"),
               pkg("torch", "2.1.0+cu118", manager="pip"))
    new = lock(pkg("pytorch", "2.2.1", "py3.11_cuda12.1_cudnn8.9.2_0"), pkg("pytorch-cuda", "12.1"),
               pkg("torch", "2.1.0+cu121", manager="pip"))
    got = changes(diff_locks(old, new))
    assert got[("conda", "pytorch")] == "rebuild (CUDA 11.8 -> CUDA 12.1)"
    assert got[("conda", "pytorch-cuda")] == "upgrade"
    assert got[("pip", "torch")] == "upgrade (CUDA 11.8 -> CUDA 12.1)"
    cpu = lock(pkg("pytorch", "2.2.1", "py3.11_cpu_0"))
    assert changes(diff_locks(new, cpu))[("conda", "pytorch")] == "rebuild (CUDA 12.1 -> CPU)"


def test_gpu_relevant_order_and_unparseable_versions() -> None:
    old = lock(pkg("aaa", "weird!"), pkg("transformers", "4.36.2"), pkg("python", "3.11.8"),
               pkg("nvidia-cudnn-cu12", "8.9.2.26", manager="pip"), pkg("accelerate", "0.26.1"))
    new = lock(pkg("aaa", "weirder!"), pkg("transformers", "4.41.0"), pkg("python", "3.12.1"),
               pkg("nvidia-cudnn-cu12", "9.1.0.70", manager="pip"), pkg("accelerate", "0.26.1"))
    [pd] = diff_locks(old, new).platforms
    assert [c.name for c in pd.gpu_changes()] == ["python", "transformers", "nvidia-cudnn-cu12"]
    assert [(c.name, c.change) for c in pd.other_changes()] == [("aaa", "changed")]
    assert [c.name for c in pd.gpu_unchanged] == ["accelerate"]


def test_identical_locks_have_no_changes() -> None:
    data = lock(pkg("python", "3.11.8"), pkg("numpy", "1.26.4"))
    diff = diff_locks(data, data)
    assert not diff.has_changes
    assert render_text(diff, "k") == ["k", "linux-64: 0 changed, 0 added, 0 removed, 2 unchanged",
                                      "  unchanged: python 3.11.8 (0)",
                                      "  1 other unchanged: numpy"]
    assert render_markdown(diff, "k") == "## k\n\nNo package changed.\n"


# --- the CLI ------------------------------------------------------------------------------


def assert_user_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr
    if "--json" in result.args:  # the error as JSON on stdout, the text on stderr
        assert needle in json.loads(result.stdout)["error"]["message"]
    else:
        assert result.stdout == ""


def test_cli_usage_errors(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    assert_user_error(provisioner(["diff", str(PT221)], tmp_path, env), "pass two lockfiles")
    assert_user_error(provisioner(["diff", str(PT221), str(PT231), "--json", "--markdown"],
                                  tmp_path, env), "cannot be combined")
    missing = tmp_path / "missing.conda-lock.yml"
    assert_user_error(provisioner(["diff", str(PT221), str(missing)], tmp_path, env),
                      "does not exist")


def test_cli_markdown_of_two_files(tmp_path: Path) -> None:
    result = provisioner(["diff", str(PT221), str(PT231), "--markdown"], tmp_path,
                         cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"## {PT221.name} -> {PT231.name}\n\n### linux-64\n")


# --- --git in a real repository -----------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=provisioner tests", "-c", "user.email=tests@example.invalid",
         "-c", "commit.gpgsign=false", "-c", "core.autocrlf=false", *args],
        cwd=repo, env=cli_env(repo.parent), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A git repo whose first commit holds a locked sample project under proj/."""
    root = tmp_path / "repo"
    root.mkdir()
    create_sample_project(root / "proj")
    (root / ".gitignore").write_text("proj/channel/\nproj/.provisioner-home/\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "locked sample")
    return root


def add_newer_transformers(project: Path) -> None:
    channel = project / "channel"
    build_conda_package(
        channel, "noarch", "transformers", "4.41.0", "pyh_sample_0",
        depends=["numpy >=1.17", "python >=3.8"], noarch="python",
        files=[PackageFile("site-packages/transformers/__init__.py", b'__version__ = "4.41.0"\n')],
    )
    index_channel(channel)


@needs_git
def test_update_all_then_diff_against_the_previous_commit(repo: Path) -> None:
    project = repo / "proj"
    env = cli_env(repo.parent)
    add_newer_transformers(project)
    relock = provisioner(["lock", "--update-all", CU121, "--project", str(project)], repo, env)
    assert relock.returncode == 0, relock.stderr
    out = relock.stdout.splitlines()
    assert out[0].startswith(f"{CU121}: updated lockfiles/{CU121}.conda-lock.yml")
    platforms = sample_platforms()
    assert out[1].startswith(f"  {platforms[0]}: 1 changed, 0 added, 0 removed, ")
    assert out[2].split()[:4] == ["transformers", "4.40.0", "(pyh_sample_0)", "->"]
    assert out[2].endswith("4.41.0 (pyh_sample_0)  upgrade")
    git(repo, "commit", "-q", "-am", "update-all")

    # A pip entry appears in the working tree only.
    add_pip_entry(project / "lockfiles" / f"{CU121}.conda-lock.yml", "peft", "0.10.0", "a")

    result = provisioner(["diff", "--git", "HEAD~1", "--project", str(project), "--json"],
                         repo, env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rev"] == "HEAD~1"
    by_key = {k["key"]: k for k in data["keys"]}
    assert sorted(by_key) == sorted(p.name.removesuffix(".conda-lock.yml")
                                    for p in (project / "lockfiles").glob("*.conda-lock.yml"))
    assert not by_key["sample-cpu-transformers"]["changed"]
    for pd in by_key[CU121]["platforms"]:
        moved = [(c["manager"], c["name"], c["change"]) for c in pd["gpu_relevant"]]
        assert ("conda", "transformers", "upgrade") in moved
        if pd["platform"] == "linux-64":
            assert [(c["manager"], c["name"], c["change"]) for c in pd["others"]] == [
                ("pip", "peft", "added")]
    # Only that key, as a PR body.
    md = provisioner(["diff", "--git", "HEAD~1", CU121, "--markdown"], project, env)
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith(f"## {CU121}\n\n### {platforms[0]}\n")
    assert "| transformers | 4.40.0 `pyh_sample_0` | 4.41.0 `pyh_sample_0` | upgrade |" \
        in md.stdout
    # Against HEAD only the uncommitted pip layer differs.
    text = provisioner(["diff", "--git", "HEAD", CU121], project, env)
    assert text.returncode == 0, text.stderr
    assert "linux-64: 0 changed, 1 added, 0 removed" in text.stdout


def add_pip_entry(lock: Path, name: str, version: str, digit: str) -> None:
    """Append a linux-64 ``manager: pip`` entry (``package:`` is the lock's last key)."""
    text = lock.read_text(encoding="utf-8")
    assert text.rstrip().splitlines()[-1] == "  optional: false"
    lock.write_text(text + (
        f"- name: {name}\n  version: {version}\n  manager: pip\n  platform: linux-64\n"
        f"  dependencies: {{}}\n  url: https://pypi.invalid/{name}-{version}-py3-none-any.whl\n"
        f"  hash:\n    sha256: {digit * 64}\n  category: main\n  optional: false\n"),
        encoding="utf-8")


@needs_git
def test_pip_layer_change_between_commits(repo: Path) -> None:
    project = repo / "proj"
    lock = project / "lockfiles" / f"{CU121}.conda-lock.yml"
    before = lock.read_text(encoding="utf-8")
    add_pip_entry(lock, "bitsandbytes", "0.43.1", "b")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "pip layer")
    lock.write_text(before, encoding="utf-8")
    add_pip_entry(lock, "bitsandbytes", "0.43.3", "c")
    git(repo, "commit", "-q", "-am", "newer bitsandbytes")
    result = provisioner(["diff", "--git", "HEAD~1", CU121], project, cli_env(repo.parent))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == CU121
    linux = lines.index(next(line for line in lines if line.startswith("linux-64:")))
    assert lines[linux].startswith("linux-64: 1 changed, 0 added, 0 removed")
    assert lines[linux + 1].split() == ["bitsandbytes", "(pip)", "0.43.1", "->", "0.43.3",
                                        "upgrade"]


@needs_git
def test_git_errors(repo: Path, tmp_path: Path) -> None:
    project = repo / "proj"
    env = cli_env(repo.parent)
    assert_user_error(provisioner(["diff", "--git", "no-such-rev"], project, env),
                      "unknown git revision")
    assert_user_error(provisioner(["diff", "--git", "--output=x"], project, env),
                      "is not a git revision")
    assert_user_error(provisioner(["diff", "--git", "HEAD", "nokey"], project, env),
                      "no lockfile for nokey")
    outside = tmp_path / "outside"
    shutil.copytree(project, outside / "proj")
    assert_user_error(provisioner(["diff", "--git", "HEAD"], outside / "proj", env),
                      "not inside a git repository")


@needs_git
def test_a_lock_added_since_the_revision(repo: Path) -> None:
    project = repo / "proj"
    lockfiles = project / "lockfiles"
    shutil.copy(lockfiles / f"{CU121}.conda-lock.yml", lockfiles / "brand-new.conda-lock.yml")
    result = provisioner(["diff", "--git", "HEAD", "brand-new", "--json"], project,
                         cli_env(repo.parent))
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)["keys"]
    assert entry["key"] == "brand-new"
    assert {p["presence"] for p in entry["platforms"]} == {"added"}
    assert all(p["counts"]["added"] > 0 and p["counts"]["unchanged"] == 0
               for p in entry["platforms"])
