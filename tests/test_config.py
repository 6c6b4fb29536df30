"""Project configuration: defaults, precedence, paths and validation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from provisioner.config import (
    CONFIG_FILE_NAME,
    Config,
    PipSettings,
    default_home,
    load_config,
)
from provisioner.errors import SpecError

NO_ENV: dict[str, str] = {}


def _project(tmp_path: Path, toml: str | None = None) -> Path:
    project = tmp_path / "project"
    project.mkdir(parents=True)
    if toml is not None:
        (project / CONFIG_FILE_NAME).write_text(toml, encoding="utf-8")
    return project


def _error(project: Path, **kwargs: object) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_config(project, environ=NO_ENV, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    return info.value


def test_defaults(tmp_path: Path) -> None:
    project = _project(tmp_path)
    cfg = load_config(project, environ=NO_ENV)
    assert cfg == Config(
        project=project,
        home=default_home().absolute(),
        backend=None,
        channel_root=None,
        channel_mirrors={},
        pip=PipSettings(),
        legacy_root=project / "environments",
        legacy_policy="prefer",
        force_copy=False,
    )
    assert cfg.specs_dir == project / "environment-specs"
    assert cfg.locks_dir == project / "lockfiles"


def test_default_home_is_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "xdg"))
    home = default_home()
    assert home.name == ("pvn" if sys.platform == "win32" else "provisioner")
    if home.parent != tmp_path / "xdg":  # macOS ignores both variables
        assert Path.home() in home.parents


def test_windows_default_home_is_short_and_keeps_an_earlier_one(tmp_path: Path) -> None:
    local = tmp_path / "AppData" / "Local"
    environ = {"LOCALAPPDATA": str(local), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    home = default_home("win32", environ)
    assert home == local / "pvn"
    assert len(str(home)) == len(str(local / "provisioner")) - 8  # every env path is shorter
    assert default_home("linux", environ) == tmp_path / "xdg" / "provisioner"
    (local / "provisioner" / "envs").mkdir(parents=True)  # a home the earlier default made
    assert default_home("win32", environ) == local / "provisioner"
    (local / "provisioner" / "envs").rmdir()
    (local / "provisioner").rmdir()
    (local / "provisioner").write_text("not a home", encoding="utf-8")
    assert default_home("win32", environ) == local / "pvn"


def test_project_defaults_to_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    project = _project(tmp_path, 'backend = "conda"\n')
    monkeypatch.chdir(project)
    cfg = load_config(environ=NO_ENV)
    assert cfg.project == project
    assert cfg.backend == "conda"


def test_env_var_home(tmp_path: Path) -> None:
    project = _project(tmp_path)
    cfg = load_config(project, environ={"PROVISIONER_HOME": str(tmp_path / "h")})
    assert cfg.home == tmp_path / "h"


FILE = """\
home = "file-home"
backend = "micromamba"
channel-root = "file-root"
"""


def test_file_beats_default(tmp_path: Path) -> None:
    project = _project(tmp_path, FILE)
    cfg = load_config(project, environ=NO_ENV)
    assert cfg.home == project / "file-home"
    assert cfg.backend == "micromamba"
    assert cfg.channel_root == project / "file-root"


def test_env_var_beats_file(tmp_path: Path) -> None:
    project = _project(tmp_path, FILE)
    env = {
        "PROVISIONER_HOME": str(tmp_path / "env-home"),
        "PROVISIONER_BACKEND": "mamba",
        "PROVISIONER_CHANNEL_ROOT": str(tmp_path / "env-root"),
    }
    cfg = load_config(project, environ=env)
    assert cfg.home == tmp_path / "env-home"
    assert cfg.backend == "mamba"
    assert cfg.channel_root == tmp_path / "env-root"


def test_option_beats_env_var(tmp_path: Path) -> None:
    project = _project(tmp_path, FILE)
    env = {
        "PROVISIONER_HOME": str(tmp_path / "env-home"),
        "PROVISIONER_BACKEND": "mamba",
        "PROVISIONER_CHANNEL_ROOT": str(tmp_path / "env-root"),
    }
    cfg = load_config(
        project,
        home=tmp_path / "opt-home",
        channel_root=str(tmp_path / "opt-root"),
        backend="rattler",
        environ=env,
    )
    assert cfg.home == tmp_path / "opt-home"
    assert cfg.backend == "rattler"
    assert cfg.channel_root == tmp_path / "opt-root"


def test_empty_env_var_is_ignored(tmp_path: Path) -> None:
    project = _project(tmp_path, FILE)
    cfg = load_config(project, environ={"PROVISIONER_HOME": "", "PROVISIONER_BACKEND": ""})
    assert cfg.home == project / "file-home"
    assert cfg.backend == "micromamba"


def test_relative_paths_resolve_against_project_not_cwd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    project = _project(
        tmp_path,
        FILE + '\n[pip]\nfind-links = ["wheels"]\n\n[legacy]\nroot = "old-envs"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(project, environ=NO_ENV)
    assert cfg.home == project / "file-home"
    assert cfg.channel_root == project / "file-root"
    assert cfg.pip.find_links == (str(project / "wheels"),)
    assert cfg.legacy_root == project / "old-envs"


def test_home_tilde_is_expanded(tmp_path: Path) -> None:
    project = _project(tmp_path, 'home = "~/prov-home"\n')
    assert load_config(project, environ=NO_ENV).home == Path.home() / "prov-home"


def test_channel_mirrors(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        f"""\
[channels]
pytorch = "mirrors/pytorch"
nvidia = "{tmp_path / 'abs-nvidia'}"
conda-forge = "https://example.org/mirror/conda-forge"
local = "file:///srv/channel"
""",
    )
    cfg = load_config(project, environ=NO_ENV)
    assert cfg.channel_mirrors == {
        "pytorch": str(project / "mirrors" / "pytorch"),
        "nvidia": str(tmp_path / "abs-nvidia"),
        "conda-forge": "https://example.org/mirror/conda-forge",
        "local": "file:///srv/channel",
    }


@pytest.mark.parametrize("value", ['""', "3", "[1]"])
def test_bad_channel_mirror(tmp_path: Path, value: str) -> None:
    err = _error(_project(tmp_path, f"[channels]\npytorch = {value}\n"))
    assert "channel mirror for 'pytorch'" in str(err)


def test_channels_must_be_a_table(tmp_path: Path) -> None:
    assert "[channels] must be a table" in str(_error(_project(tmp_path, 'channels = "x"\n')))


def test_pip_settings(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        """\
[pip]
index-url = "https://example.org/pypi/simple"
find-links = ["wheels", "https://example.org/download/whl"]
no-index = true
""",
    )
    assert load_config(project, environ=NO_ENV).pip == PipSettings(
        index_url="https://example.org/pypi/simple",
        find_links=(str(project / "wheels"), "https://example.org/download/whl"),
        no_index=True,
    )


def test_pip_find_links_must_be_a_list(tmp_path: Path) -> None:
    err = _error(_project(tmp_path, '[pip]\nfind-links = "wheels"\n'))
    assert "pip.find-links must be a list" in str(err)


@pytest.mark.parametrize("value", ["[3]", '[""]', "[[]]"])
def test_pip_find_links_entries_must_be_strings(tmp_path: Path, value: str) -> None:
    err = _error(_project(tmp_path, f"[pip]\nfind-links = {value}\n"))
    assert "'pip.find-links' must be a non-empty string" in str(err)


def test_pip_must_be_a_table(tmp_path: Path) -> None:
    assert "[pip] must be a table" in str(_error(_project(tmp_path, "pip = 3\n")))


@pytest.mark.parametrize("policy", ["prefer", "fallback", "ignore"])
def test_legacy_policies(tmp_path: Path, policy: str) -> None:
    project = _project(tmp_path, f'[legacy]\npolicy = "{policy}"\n')
    assert load_config(project, environ=NO_ENV).legacy_policy == policy


def test_legacy_env_vars_beat_file(tmp_path: Path) -> None:
    project = _project(tmp_path, '[legacy]\npolicy = "ignore"\nroot = "in-file"\n')
    env = {"PROVISIONER_LEGACY_POLICY": "fallback", "PROVISIONER_LEGACY_ROOT": "from-env"}
    cfg = load_config(project, environ=env)
    assert cfg.legacy_policy == "fallback"
    assert cfg.legacy_root == project / "from-env"


def test_bad_legacy_policy_in_file(tmp_path: Path) -> None:
    err = _error(_project(tmp_path, '[legacy]\npolicy = "always"\n'))
    assert "legacy policy 'always' is not one of prefer, fallback, ignore" in str(err)


def test_bad_legacy_policy_in_env(tmp_path: Path) -> None:
    project = _project(tmp_path)
    with pytest.raises(SpecError, match="legacy policy 'sometimes'"):
        load_config(project, environ={"PROVISIONER_LEGACY_POLICY": "sometimes"})


def test_legacy_must_be_a_table(tmp_path: Path) -> None:
    assert "[legacy] must be a table" in str(_error(_project(tmp_path, 'legacy = "x"\n')))


def test_force_copy(tmp_path: Path) -> None:
    project = _project(tmp_path, "[build]\nforce-copy = true\n")
    assert load_config(project, environ=NO_ENV).force_copy is True
    plain = _project(tmp_path / "other")
    assert load_config(plain, environ={"PROVISIONER_FORCE_COPY": "1"}).force_copy is True
    assert load_config(plain, environ={"PROVISIONER_FORCE_COPY": "0"}).force_copy is False


def test_unknown_setting(tmp_path: Path) -> None:
    err = _error(_project(tmp_path, 'home = "h"\nsolver = "fast"\ncache = 1\n'))
    assert str(err) == f"{CONFIG_FILE_NAME}: unknown setting(s) cache, solver"
    assert err.hint is not None and "channel-root" in err.hint


@pytest.mark.parametrize(
    "toml",
    ['home = \n', 'home = "unterminated\n', "[pip\n", 'a = 1\na = 2\n', "= 3\n"],
)
def test_invalid_toml(tmp_path: Path, toml: str) -> None:
    err = _error(_project(tmp_path, toml))
    assert str(err).startswith(f"{CONFIG_FILE_NAME}: invalid TOML: ")


@pytest.mark.parametrize("toml", ['home = ""\n', 'channel-root = ""\n'])
def test_empty_paths_fall_back_to_defaults(tmp_path: Path, toml: str) -> None:
    cfg = load_config(_project(tmp_path, toml), environ=NO_ENV)
    assert cfg.home == default_home().absolute()
    assert cfg.channel_root is None


@pytest.mark.parametrize(
    ("toml", "what"),
    [
        ("home = 3\n", "'home'"),
        ("home = true\n", "'home'"),
        ("channel-root = [1]\n", "'channel-root'"),
    ],
)
def test_non_string_paths(tmp_path: Path, toml: str, what: str) -> None:
    assert f"{what} must be a non-empty string" in str(_error(_project(tmp_path, toml)))


def test_with_overrides_skips_none(tmp_path: Path) -> None:
    cfg = load_config(_project(tmp_path, FILE), environ=NO_ENV)
    changed = cfg.with_overrides(backend="conda", home=None)
    assert changed.backend == "conda"
    assert changed.home == cfg.home


def test_build_limits(tmp_path: Path) -> None:
    project = _project(tmp_path, '[build]\npackage-bytes = "500MB"\nenv-bytes = "2GiB"\n'
                                 'package-files = 123\nmax-ratio = 50\nlink-scripts = "skip"\n')
    limits = load_config(project, environ=NO_ENV).package_limits
    assert (limits.package_bytes, limits.env_bytes) == (500 * 10**6, 2 << 30)
    assert (limits.package_files, limits.max_ratio, limits.link_scripts) == (123, 50, "skip")
    assert load_config(_project(tmp_path / "d"), environ=NO_ENV).package_limits.package_files \
        == 40_000


@pytest.mark.parametrize("toml, what", [
    ('[build]\npackage-bytes = "lots"\n', "build.package-bytes"),
    ("[build]\npackage-files = 0\n", "build.package-files"),
    ("[build]\nenv-files = true\n", "build.env-files"),
    ('[build]\nlink-scripts = "run"\n', "build.link-scripts"),
    ('build = "x"\n', "[build] must be a table"),
])
def test_bad_build_limits(tmp_path: Path, toml: str, what: str) -> None:
    assert what in _error(_project(tmp_path, toml)).message


def test_import_check_mode(tmp_path: Path) -> None:
    assert load_config(_project(tmp_path), environ=NO_ENV).import_check == "memo"
    always = _project(tmp_path / "a", '[build]\nimport-check = "always"\n')
    assert load_config(always, environ=NO_ENV).import_check == "always"
    bad = _project(tmp_path / "b", '[build]\nimport-check = "never"\n')
    assert "import-check must be memo or always" in str(_error(bad))
